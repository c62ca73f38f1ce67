"""`python -m clusterexec.status` and `ClusterExecutor.cluster_info()`: what the master knows."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time

import cloudpickle
import pytest
from conftest import _env, wait_until

pytestmark = pytest.mark.timeout(60)


def status(cluster, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clusterexec.status", cluster.address, "--authkey-file",
                           str(cluster.key_file), *args], capture_output=True, text=True, timeout=30, env=_env())


def test_status_lists_nodes_clients_queue_and_rate(cluster):
    with cluster.executor(name="sweep-42") as ex:
        done = [ex.submit(time.sleep, 0) for _ in range(200)]
        for f in done:
            f.result(timeout=30)
        busy = [ex.submit(time.sleep, 2) for _ in range(5)]
        # Two run; after 200 quick tasks the node may queue the others in its task processes too, where they
        # count as started (as the calls ProcessPoolExecutor queues for its workers do). The master's counts
        # below tell the two apart.
        wait_until(lambda: sum(f.running() for f in busy) >= 2, what="two tasks to run")
        shown = status(cluster)
        data = json.loads(status(cluster, "--json").stdout)
    assert shown.returncode == 0, shown.stderr
    text = shown.stdout
    agent_pid = cluster.workers[0].pid
    assert "1 worker node, 2 processes (2 busy)" in text, text
    assert "3 queued" in text, text
    node_line = next(line for line in text.splitlines() if f" {agent_pid} " in line)
    assert platform.python_version() in node_line and cloudpickle.__version__ in node_line
    assert "sweep-42" in text  # the executor's client row (and not the status command's own)
    assert "clusterexec.status" not in text
    [worker] = data["workers"]
    assert worker["pid"] == agent_pid and worker["nprocs"] == 2 and worker["busy"] == 2
    assert worker["done"] >= 200 and worker["failed"] == 0
    assert worker["python"] == platform.python_version()
    assert 0 <= worker["last_heard"] < 5
    assert data["queued"] == 3 and data["tasks_done"] >= 200 and data["tasks_per_second"] > 0
    [client] = data["clients"]
    assert client["name"] == "sweep-42" and client["pending"] == 5


def test_cluster_info_gives_the_same_data_from_python(cluster):
    with cluster.executor() as ex:
        ex.submit(abs, -1).result(timeout=30)
        info = ex.cluster_info()
    assert [w["pid"] for w in info["workers"]] == [cluster.workers[0].pid]
    assert info["workers"][0]["done"] >= 1
    assert {"queued", "procs", "tasks_per_second", "clients", "version"} <= set(info)


def test_status_of_an_empty_master_says_how_to_add_workers(empty_cluster):
    shown = status(empty_cluster)
    assert shown.returncode == 0
    assert "no worker nodes connected (start one: python -m clusterexec.worker" in shown.stdout


def test_status_errors_are_clear(cluster, tmp_path):
    wrong = tmp_path / "wrong.key"
    wrong.write_text("not the key")
    wrong.chmod(0o600)
    bad_key = subprocess.run([sys.executable, "-m", "clusterexec.status", cluster.address, "--authkey-file",
                              str(wrong)], capture_output=True, text=True, timeout=30, env=_env())
    assert bad_key.returncode == 1 and "key" in bad_key.stderr.lower(), bad_key.stderr
    nobody = subprocess.run([sys.executable, "-m", "clusterexec.status", "127.0.0.1:1", "--authkey-file",
                             str(cluster.key_file)], capture_output=True, text=True, timeout=30, env=_env())
    assert nobody.returncode == 1 and "cannot connect" in nobody.stderr and "Traceback" not in nobody.stderr

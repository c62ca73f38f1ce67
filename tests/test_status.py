"""`python -m clusterexec.status` and `ClusterExecutor.cluster_info()`: what the master knows."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

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


def wait_for_file(path):
    while not os.path.exists(path):
        time.sleep(0.02)
    return path


def raise_value_error():
    raise ValueError("a task that raised")


def die():
    os._exit(3)


def test_the_status_line_and_the_client_row_count_the_same_queued_tasks(cluster, tmp_path):
    release = tmp_path / "release"
    with cluster.executor(name="waiting") as ex:
        try:
            futures = [ex.submit(wait_for_file, str(release)) for _ in range(9)]
            wait_until(lambda: sum(f.running() for f in futures) == 2, what="two tasks to run")
            # The node (2 processes) also holds 2 tasks ahead of time; the other 5 wait at the master.
            cluster.wait_for(lambda info: info["workers"][0]["assigned"] == 4, what="the node to hold 4 tasks")
            assert futures[-1].cancel()  # (a task cancelled at the master waits no more)
            data = json.loads(status(cluster, "--json").stdout)
            text = status(cluster).stdout
        finally:
            release.touch()
    [client] = data["clients"]
    assert data["queued"] == client["queued"] == 6, data
    assert data["running"] == client["running"] == 2, data
    assert client["pending"] == 8
    assert "6 queued" in text, text
    row = next(line for line in text.splitlines() if "waiting" in line).split()
    assert row[4:8] == ["6", "2", "8", "0"], text  # QUEUED RUNNING PENDING DONE


def test_status_counts_tasks_that_raised_apart_from_tasks_whose_process_died(cluster):
    with cluster.executor() as ex:
        assert isinstance(ex.submit(raise_value_error).exception(timeout=30), ValueError)
        ex.options(retries=0).submit(die).exception(timeout=30)
        assert ex.submit(abs, -1).result(timeout=30) == 1
        data = json.loads(status(cluster, "--json").stdout)
        text = status(cluster).stdout
    [worker] = data["workers"]
    assert (worker["done"], worker["raised"], worker["lost"]) == (2, 1, 1), worker
    header = next(line for line in text.splitlines() if line.startswith("NODE")).split()
    row = next(line for line in text.splitlines() if f" {worker['pid']} " in line).split()
    assert header[5:8] == ["DONE", "RAISED", "LOST"], text
    assert row[5:8] == ["2", "1", "1"], text


# Run inside a private network namespace (its own loopback, so no other program's port 7070 is in the way):
# a master on 127.0.0.1:7070, and the status command with no address.
_AT_THE_DEFAULT_ADDRESS = """
import ctypes, json, os, signal, subprocess, sys
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
key_file = sys.argv[1]

def die_with_me():
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG

master = subprocess.Popen([sys.executable, "-m", "clusterexec.master", "--host", "127.0.0.1", "--port", "7070",
                           "--authkey-file", key_file], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                          preexec_fn=die_with_me)
try:
    assert "listening on 127.0.0.1:7070" in master.stdout.readline().decode()
    shown = subprocess.run([sys.executable, "-m", "clusterexec.status", "--json", "--authkey-file", key_file],
                           capture_output=True, text=True, timeout=30)
    print(json.dumps({"code": shown.returncode, "out": shown.stdout, "err": shown.stderr}))
finally:
    master.terminate()
    master.wait(10)
"""


def test_status_with_no_address_asks_localhost_7070_as_the_readme_says(tmp_path):
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert "With no address, `python -m clusterexec.status` asks `localhost:7070`" in readme
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("needs root, unshare and iproute2 for a private network namespace")
    key_file = tmp_path / "key"
    key_file.write_text("status-default-key")
    key_file.chmod(0o600)
    driver = tmp_path / "driver.py"
    driver.write_text(_AT_THE_DEFAULT_ADDRESS)
    run = subprocess.run(["unshare", "--net", sys.executable, str(driver), str(key_file)], capture_output=True,
                         text=True, timeout=60, env=_env())
    if run.returncode != 0 and "unshare failed" in run.stderr:
        pytest.skip(f"cannot make a network namespace here: {run.stderr.strip()}")
    assert run.returncode == 0, run.stderr
    shown = json.loads(run.stdout)
    assert shown["code"] == 0, shown["err"]
    assert json.loads(shown["out"])["address"] == "localhost:7070"

"""clusterexec on SLURM, against a real SLURM (scripts/setup-slurm starts a single-node one; .ci/run runs it).

Every test that needs SLURM is skipped, with the reason, where `sbatch`/`sinfo` are missing or the
controller does not answer; where .ci/run has set SLURM up (CLUSTEREXEC_SLURM_REQUIRED=1) they fail
instead, so CI cannot silently stop covering SLURM. Each test uses its own cluster name and state
directory and cancels its jobs by id at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from conftest import _env, reap, wait_until

import clusterexec.slurm as cs
from clusterexec import AuthenticationError, ClusterExecutor
from clusterexec.client import ClientConnection


def _slurm_missing() -> str | None:
    """Why real SLURM tests cannot run here, or None."""
    for cmd in ("sbatch", "sinfo", "squeue", "scancel", "scontrol"):
        if shutil.which(cmd) is None:
            return f"`{cmd}` not found: no SLURM here (as root, scripts/setup-slurm installs a single-node one)"
    try:
        proc = subprocess.run(["sinfo", "--noheader", "--format=%t"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer within 20 s: the SLURM controller is not responding"
    if proc.returncode != 0:
        return f"the SLURM controller does not answer: {proc.stderr.strip()}"
    states = proc.stdout.split()
    if not any(s.rstrip("*~#$@!%^-+") in ("idle", "mix", "mixed", "alloc", "allocated") for s in states):
        return f"no SLURM node can take jobs (node states: {' '.join(states) or 'none'})"
    return None


@pytest.fixture(scope="module")
def slurm_available():
    reason = _slurm_missing()
    if reason is not None:
        if os.environ.get("CLUSTEREXEC_SLURM_REQUIRED"):
            pytest.fail(f"CLUSTEREXEC_SLURM_REQUIRED is set but SLURM is not usable: {reason}")
        pytest.skip(reason)


def task_job_id(x: int) -> tuple[int, str | None]:
    return x * x, os.environ.get("SLURM_JOB_ID")


class SlurmRun:
    """One cluster name and state directory; runs `python -m clusterexec.slurm` as a user would."""

    def __init__(self, tmp_path: Path):
        self.name = "t" + uuid.uuid4().hex[:10]
        self.state_dir = tmp_path / "slurm-state"
        self.seen_jobs: set[str] = set()

    def cli(self, *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
        command, *rest = args
        extra: list[str] = []
        if "--" in rest:
            i = rest.index("--")
            rest, extra = rest[:i], rest[i:]
        proc = subprocess.run(
            [sys.executable, "-m", "clusterexec.slurm", command, "--name", self.name, "--state-dir",
             str(self.state_dir), *rest, *extra],
            capture_output=True, text=True, timeout=timeout, env=_env())
        self.seen_jobs |= set(self.recorded_jobs()) | set(self.queued_jobs())
        return proc

    def recorded_jobs(self) -> list[str]:
        try:
            data = json.loads((self.state_dir / f"{self.name}.json").read_text())
        except FileNotFoundError:
            return []
        return [data["master_job"], *data["worker_jobs"]]

    def queued_jobs(self) -> list[str]:
        """Ids of this cluster's jobs that are still in the queue (pending, running or completing)."""
        names = f"clusterexec-{self.name}-master,clusterexec-{self.name}-worker"
        out = subprocess.run(["squeue", "--noheader", "--format=%i", f"--name={names}"],
                             capture_output=True, text=True, timeout=30).stdout
        return out.split()

    def cancel_all(self) -> None:
        ids = sorted(self.seen_jobs | set(self.recorded_jobs()) | set(self.queued_jobs()))
        if ids:
            subprocess.run(["scancel", *ids], capture_output=True, timeout=30)


@pytest.fixture
def slurm(slurm_available, tmp_path):
    run = SlurmRun(tmp_path)
    try:
        yield run
    finally:
        run.cancel_all()


@pytest.fixture(scope="module")
def running(slurm_available, tmp_path_factory):
    """A master and two worker nodes of 2 task processes each, started as SLURM jobs by the CLI."""
    run = SlurmRun(tmp_path_factory.mktemp("slurm"))
    try:
        proc = run.cli("start", "--workers", "2", "--nprocs", "2", "--wait-workers", "--timeout", "60")
        assert proc.returncode == 0, proc.stderr
        run.start_output = proc.stdout
        yield run
    finally:
        run.cancel_all()


# ------------------------------------------------------------------------------------------ real SLURM


@pytest.mark.timeout(120)
def test_start_prints_the_address_and_how_to_connect(running):
    address = cs.master_address(running.name, running.state_dir)
    assert f"listening at {address}" in running.start_output
    assert f"ClusterExecutor(slurm={running.name!r})" in running.start_output
    master, *workers = running.recorded_jobs()
    assert len(workers) == 2
    assert master in running.start_output and all(w in running.start_output for w in workers)
    # The master advertises the node's address (NodeAddr), not a name other nodes may not resolve.
    record = json.loads((running.state_dir / f"{running.name}.address").read_text())
    assert record["slurm_job_id"] == master
    assert record["address"] == address == f"{record['host']}:{record['port']}"


@pytest.mark.timeout(120)
def test_map_runs_on_the_worker_jobs(running, monkeypatch):
    master, *workers = running.recorded_jobs()
    monkeypatch.setenv(cs.ENV_STATE_DIR, str(running.state_dir))  # as a user would export it
    with ClusterExecutor(slurm=running.name) as ex:
        results = list(ex.map(task_job_id, range(40)))
        info = ex.cluster_info()
    assert [r for r, _ in results] == [x * x for x in range(40)]
    ran_in = {job for _, job in results}
    assert ran_in <= set(workers), f"tasks ran in jobs {ran_in}, not in the worker jobs {workers}"
    assert len(info["workers"]) == 2 and info["procs"] == 4


@pytest.mark.timeout(120)
def test_master_address_from_outside_the_allocation_connects(running):
    address = cs.master_address(running.name, state_dir=running.state_dir)
    host, port = address.rsplit(":", 1)
    assert host and int(port) > 0
    with ClusterExecutor(address) as ex:
        assert ex.submit(sum, [1, 2, 3]).result(timeout=60) == 6
    out = running.cli("address")
    assert out.returncode == 0 and out.stdout.strip() == address


@pytest.mark.timeout(120)
def test_master_address_inside_an_allocation(running):
    """A job's own program finds the master the same way (srun inside a fresh allocation)."""
    code = ("import clusterexec.slurm as cs, sys; "
            f"print(cs.master_address({running.name!r}, {str(running.state_dir)!r}))")
    proc = subprocess.run(["srun", "--ntasks=1", "--cpus-per-task=1", sys.executable, "-c", code],
                          capture_output=True, text=True, timeout=90, env=_env())
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == cs.master_address(running.name, running.state_dir)


@pytest.mark.timeout(120)
def test_status_lists_the_jobs_and_says_the_master_answers(running):
    proc = running.cli("status")
    assert proc.returncode == 0, proc.stderr
    for job in running.recorded_jobs():
        assert f"job {job:>8}  RUNNING" in proc.stdout
    assert "answers: 2 worker node(s), 4 task process(es)" in proc.stdout
    st = cs.status(running.name, running.state_dir)
    assert st["answers"] and [j["job_id"] for j in st["jobs"]] == running.recorded_jobs()


@pytest.mark.timeout(150)
def test_a_tls_cluster_on_slurm(slurm, certs, monkeypatch):
    """start --tls-*: master and worker jobs use TLS; start, status and a TLS client get through, a plaintext
    client is refused."""
    proc = slurm.cli("start", "--workers", "1", "--nprocs", "2", "--wait-workers", "--timeout", "60",
                     *certs.flags("master"))
    assert proc.returncode == 0, proc.stderr
    assert "tls_cert=" in proc.stdout
    master, worker = slurm.recorded_jobs()
    monkeypatch.setenv(cs.ENV_STATE_DIR, str(slurm.state_dir))
    with ClusterExecutor(slurm=slurm.name, **certs.kwargs("client")) as ex:
        assert {job for _, job in ex.map(task_job_id, range(10))} == {worker}
    st = slurm.cli("status")
    assert st.returncode == 0 and "answers: 1 worker node(s)" in st.stdout, st.stdout + st.stderr
    with pytest.raises(AuthenticationError, match="requires TLS"):
        ClusterExecutor(slurm=slurm.name)
    assert slurm.cli("stop").returncode == 0


@pytest.mark.timeout(60)
def test_start_with_a_bad_certificate_fails_before_submitting(slurm, certs):
    proc = slurm.cli("start", "--workers", "1", "--tls-cert", certs.path("master.pem"), "--tls-ca",
                     certs.path("ca.pem"))
    assert proc.returncode == 1 and "tls" in proc.stderr.lower(), proc.stderr
    assert slurm.recorded_jobs() == [] and slurm.queued_jobs() == []


@pytest.mark.timeout(120)
def test_stop_cancels_the_jobs_and_master_address_then_fails_clearly(slurm):
    proc = slurm.cli("start", "--workers", "1", "--timeout", "60")
    assert proc.returncode == 0, proc.stderr
    jobs = slurm.recorded_jobs()
    assert len(jobs) == 2 and set(slurm.queued_jobs()) == set(jobs)
    address_file = slurm.state_dir / f"{slurm.name}.address"
    assert address_file.exists()

    proc = slurm.cli("stop")
    assert proc.returncode == 0, proc.stderr
    assert " ".join(jobs) in proc.stdout
    assert slurm.queued_jobs() == []  # stop waits until squeue no longer lists them
    assert not address_file.exists() and slurm.recorded_jobs() == []
    with pytest.raises(cs.SlurmError, match=f"no clusterexec cluster named '{slurm.name}'"):
        cs.master_address(slurm.name, slurm.state_dir)
    proc = slurm.cli("status")
    assert proc.returncode == 1 and "start one with" in proc.stderr


@pytest.mark.timeout(120)
def test_master_address_says_the_master_is_gone_when_its_job_was_cancelled_behind_our_back(slurm):
    proc = slurm.cli("start", "--workers", "0", "--timeout", "60")
    assert proc.returncode == 0, proc.stderr
    (master,) = slurm.recorded_jobs()
    subprocess.run(["scancel", master], check=True, timeout=30)
    wait_until(lambda: master not in slurm.queued_jobs(), timeout=60, what="the master job to leave the queue")
    with pytest.raises(cs.SlurmError, match=rf"master of SLURM cluster '{slurm.name}' is gone: job {master}"):
        cs.master_address(slurm.name, slurm.state_dir)
    proc = slurm.cli("stop")
    assert proc.returncode == 0, proc.stderr


@pytest.mark.timeout(60)
def test_start_with_more_cpus_than_exist_fails_fast_and_leaves_no_jobs(slurm):
    proc = slurm.cli("start", "--workers", "1", "--nprocs", "4096", "--timeout", "40", timeout=50)
    assert proc.returncode == 1
    assert "will not run" in proc.stderr and "PartitionConfig" in proc.stderr, proc.stderr
    assert "cancelled the submitted jobs: scancel" in proc.stderr
    wait_until(lambda: slurm.queued_jobs() == [], timeout=30, what="the cancelled jobs to leave the queue")
    assert slurm.recorded_jobs() == []


@pytest.mark.timeout(60)
def test_start_in_a_nonexistent_partition_fails_with_sbatch_s_reason(slurm):
    proc = slurm.cli("start", "--workers", "2", "--partition", "no-such-partition", timeout=50)
    assert proc.returncode == 1
    assert "sbatch refused the master job" in proc.stderr and "invalid partition" in proc.stderr.lower()
    assert slurm.queued_jobs() == [] and slurm.recorded_jobs() == []


@pytest.mark.timeout(60)
def test_start_times_out_with_the_job_states_when_the_jobs_do_not_start(slurm):
    # Extra sbatch arguments after --: a begin time an hour away keeps the jobs pending.
    proc = slurm.cli("start", "--workers", "1", "--timeout", "2", "--", "--begin=now+3600", timeout=50)
    assert proc.returncode == 1
    err = proc.stderr
    assert "did not start within 2 s" in err and "PENDING (BeginTime)" in err, err
    assert "master job" in err and "worker job" in err and "log " in err
    wait_until(lambda: slurm.queued_jobs() == [], timeout=30, what="the cancelled jobs to leave the queue")


@pytest.mark.timeout(120)
def test_a_second_start_under_the_same_name_is_refused(running):
    proc = running.cli("start", "--workers", "1", "--timeout", "10")
    assert proc.returncode == 1 and "is already running" in proc.stderr
    assert running.cli("status").returncode == 0  # the first one is untouched


# ------------------------------------------------------------------------------------------ without SLURM


def test_master_address_without_a_recorded_cluster_raises_slurm_error(tmp_path, monkeypatch):
    with pytest.raises(cs.SlurmError, match="no clusterexec cluster named 'nope'.*start one with"):
        cs.master_address("nope", tmp_path)
    monkeypatch.setenv(cs.ENV_STATE_DIR, str(tmp_path))
    with pytest.raises(cs.SlurmError):  # ClusterExecutor(slurm=...) goes through master_address()
        ClusterExecutor(slurm="nope")
    from clusterexec.errors import ClusterError

    assert issubclass(cs.SlurmError, ClusterError)


def test_sbatch_command_and_job_scripts(tmp_path):
    cluster = cs.SlurmCluster(name="demo", state_dir=tmp_path, master_job="41")
    argv = cs._sbatch_argv(cluster, "worker", 4, "short", "1:00:00", ["--account=me"], dependency="41")
    assert argv[:2] == ["sbatch", "--parsable"]
    for arg in ("--cpus-per-task=4", "--partition=short", "--time=1:00:00", "--dependency=after:41",
                f"--output={tmp_path}/demo-logs/worker-%j.log", "--job-name=clusterexec-demo-worker"):
        assert arg in argv
    assert argv[-1] == "--account=me"  # the user's own arguments come last, so they win
    script = cs._job_script(cluster, "_worker", ["--master-job", "41", "--nprocs", "4"])
    assert script.startswith("#!/bin/sh\n")
    assert f"exec {sys.executable} -m clusterexec.slurm _worker --name demo --state-dir {tmp_path}" in script


def test_cli_rejects_sbatch_arguments_outside_start(capsys):
    with pytest.raises(SystemExit):
        cs.main(["status", "--", "--account=me"])
    assert "for `start` only" in capsys.readouterr().err


@pytest.mark.timeout(30)
def test_master_writes_its_address_file_and_removes_it_on_sigterm(tmp_path):
    path = tmp_path / "sub" / "m.address"
    key_file = tmp_path / "key"
    key_file.write_text("k" * 32)
    key_file.chmod(0o600)
    master = subprocess.Popen(
        [sys.executable, "-m", "clusterexec.master", "--host", "127.0.0.1", "--port", "0", "--authkey-file",
         str(key_file), "--address-file", str(path), "--advertise-host", "node7"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
    try:
        first = master.stdout.readline().decode()
        assert "listening on 127.0.0.1:" in first, master.stderr.read().decode() if not first else first
        record = json.loads(path.read_text())  # written before the first line is printed
        port = int(first.split(":")[1].split()[0])
        assert record["address"] == f"node7:{port}" and record["port"] == port and record["pid"] == master.pid
        assert "start workers:  python -m clusterexec.worker node7:" in master.stdout.readline().decode()
        assert [p.name for p in path.parent.iterdir()] == ["m.address"]  # no temporary file left behind
        # Once it answers a client, its event loop runs and SIGTERM means a clean stop.
        conn = ClientConnection(("127.0.0.1", port), b"k" * 32, name="probe")
        try:
            assert conn.status()["workers"] == []
        finally:
            conn.close()
        master.send_signal(signal.SIGTERM)
        assert master.wait(15) == 0
        assert not path.exists()
    finally:
        reap(master)

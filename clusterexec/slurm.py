"""Run a clusterexec cluster as SLURM jobs, and find its master. `python -m clusterexec.slurm`.

    login node                                        compute nodes (SLURM jobs)
    ──────────                                        ──────────────────────────
    python -m clusterexec.slurm start ──sbatch──────▶ master job: python -m clusterexec.master --port 0
      │ writes STATE/NAME.json (the job ids)            │          --address-file STATE/NAME.address
      │                                                 ▼ once listening, writes (atomically)
      │ polls squeue and ───────────────────▶ STATE/NAME.address  {"address": "node:port", "slurm_job_id", ...}
      │ the address file                                ▲ polled by
      └──sbatch --dependency=after:MASTER ──────▶ worker job ×N: waits for the address file, then
                                                        python -m clusterexec.worker node:port --nprocs K

    your program (anywhere, in or out of an allocation):
      ClusterExecutor(slurm=True) → master_address() reads STATE/NAME.address and checks with squeue
                                    that the master's job is still running

STATE is a directory on the file system the nodes share (default ~/.clusterexec/slurm, or
$CLUSTEREXEC_SLURM_DIR, or --state-dir); NAME names the cluster (default "default"), so one user can run
several. `status` and `stop` act on the job ids recorded in STATE/NAME.json, never on process names. Every
wait is a poll with a deadline; a job that does not start gives an error naming the jobs, their state and
reason in the queue, and their log files, and `start` cancels what it submitted.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .auth import add_tls_arguments
from .errors import ClusterError

__all__ = ["SlurmError", "SlurmCluster", "JobState", "master_address", "start", "status", "stop", "job_states",
           "default_state_dir", "node_address"]

ENV_STATE_DIR = "CLUSTEREXEC_SLURM_DIR"
DEFAULT_NAME = "default"
POLL = 0.25  # seconds between two looks at the queue and the address file
SCHEDULING_WAIT = 15.0  # seconds `start` gives the scheduler, once the master is up, to judge the worker jobs

# Job states in which a job still holds (or waits for) resources, as `squeue` lists them by default.
ACTIVE_STATES = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING",
                 "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD"}
RUNNING_STATES = {"RUNNING", "CONFIGURING"}
# Reasons a pending job gives when it can never start as requested (more CPUs or time than the partition
# allows, an unknown account...): waiting for it would only wait for the timeout.
HOPELESS_REASONS = {"PartitionConfig", "PartitionNodeLimit", "PartitionTimeLimit", "BadConstraints",
                    "InvalidAccount", "InvalidQOS", "DependencyNeverSatisfied", "QOSMaxCpuPerJobLimit",
                    "QOSMaxWallDurationPerJobLimit", "AssocMaxWallDurationPerJobLimit"}
# Reasons of a pending job the scheduler has not really looked at yet.
UNDECIDED_REASONS = {"", "None", "(null)", "Dependency"}


class SlurmError(ClusterError):
    """A SLURM cluster could not be started, found or stopped; the message says which jobs and why."""


@dataclass(frozen=True)
class JobState:
    """One job as `squeue` shows it. `state` is "GONE" once SLURM has forgotten the job."""

    job_id: str
    state: str
    reason: str = ""
    node: str = ""

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    @property
    def hopeless(self) -> bool:
        return self.state == "PENDING" and self.reason in HOPELESS_REASONS

    def describe(self) -> str:
        text = f"{self.job_id} {self.state}"
        if self.reason and self.reason not in ("None", "(null)"):
            text += f" ({self.reason})"
        if self.node and self.state in RUNNING_STATES:
            text += f" on {self.node}"
        return text


@dataclass
class SlurmCluster:
    """What `start` recorded: the jobs of one named cluster, kept in STATE/NAME.json."""

    name: str
    state_dir: Path
    master_job: str
    worker_jobs: list[str] = field(default_factory=list)
    nprocs: int = 1
    authkey_file: str | None = None
    submitted: float = 0.0
    address: str | None = None  # known once the master is up
    tls: list[str] | None = None  # [cert, key, ca], absolute paths, when the cluster uses TLS

    @property
    def tls_args(self) -> list[str]:
        if not self.tls:
            return []
        cert, key, ca = self.tls
        return ["--tls-cert", cert, "--tls-key", key, "--tls-ca", ca]

    def ssl_context(self) -> Any:
        """The client-side TLS context for talking to this cluster's master, or None."""
        if not self.tls:
            return None
        from .auth import tls_context

        return tls_context(False, *self.tls)

    @property
    def state_file(self) -> Path:
        return self.state_dir / f"{self.name}.json"

    @property
    def address_file(self) -> Path:
        return self.state_dir / f"{self.name}.address"

    @property
    def log_dir(self) -> Path:
        return self.state_dir / f"{self.name}-logs"

    @property
    def job_ids(self) -> list[str]:
        return [self.master_job, *self.worker_jobs]

    def log_file(self, job_id: str) -> Path:
        role = "master" if job_id == self.master_job else "worker"
        return self.log_dir / f"{role}-{job_id}.log"

    def save(self) -> None:
        data = {"name": self.name, "master_job": self.master_job, "worker_jobs": self.worker_jobs,
                "nprocs": self.nprocs, "authkey_file": self.authkey_file, "submitted": self.submitted,
                "submit_host": socket.gethostname(), "tls": self.tls}
        _write_atomically(self.state_file, json.dumps(data, indent=1) + "\n")

    @classmethod
    def load(cls, name: str, state_dir: Path) -> SlurmCluster:
        path = state_dir / f"{name}.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise SlurmError(
                f"no clusterexec cluster named {name!r} is recorded in {state_dir} (no {path.name} there); "
                f"start one with: python -m clusterexec.slurm start --workers N{_name_opt(name)}"
                + ("" if state_dir == default_state_dir().absolute() else f" --state-dir {shlex.quote(str(state_dir))}")
            ) from None
        except (OSError, ValueError) as e:
            raise SlurmError(f"cannot read the state of cluster {name!r} from {path}: {e}") from None
        return cls(name=name, state_dir=state_dir, master_job=str(data["master_job"]),
                   worker_jobs=[str(j) for j in data.get("worker_jobs", [])], nprocs=int(data.get("nprocs", 1)),
                   authkey_file=data.get("authkey_file"), submitted=float(data.get("submitted", 0.0)),
                   tls=[str(p) for p in data["tls"]] if data.get("tls") else None)

    def read_address(self) -> dict[str, Any] | None:
        """The master's address record, if the master of *this* cluster's job wrote one."""
        try:
            record = json.loads(self.address_file.read_text())
        except (OSError, ValueError):
            return None
        if str(record.get("slurm_job_id")) != self.master_job:
            return None  # left by an earlier master of the same name
        return record

    def forget(self) -> None:
        for path in (self.state_file, self.address_file):
            try:
                path.unlink()
            except FileNotFoundError:
                pass


# ---------------------------------------------------------------------------------------------- the queue


def default_state_dir() -> Path:
    env = os.environ.get(ENV_STATE_DIR)
    return Path(env).expanduser() if env else Path.home() / ".clusterexec" / "slurm"


def _state_dir(state_dir: str | os.PathLike | None) -> Path:
    return Path(state_dir).expanduser().absolute() if state_dir is not None else default_state_dir().absolute()


def _command(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise SlurmError(f"`{name}` was not found on the PATH: run this on a machine of a SLURM cluster "
                         f"(a login node or inside an allocation)")
    return path


def _run(argv: list[str], *, input: str | None = None, timeout: float = 60.0) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([_command(argv[0]), *argv[1:]], input=input, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SlurmError(f"`{shlex.join(argv)}` did not answer within {timeout:g} s: is slurmctld up?") from None


def job_states(job_ids: Sequence[str]) -> dict[str, JobState]:
    """The state of each job, by id; a job SLURM no longer knows is "GONE"."""
    ids = [str(j) for j in job_ids]
    if not ids:
        return {}
    proc = _run(["squeue", "--noheader", "--states=all", "--jobs", ",".join(ids), "--format=%i|%T|%r|%N"])
    found: dict[str, JobState] = {}
    if proc.returncode != 0:
        if "Invalid job id" not in proc.stderr:
            raise SlurmError(f"squeue failed: {proc.stderr.strip() or proc.stdout.strip()}")
    else:
        for line in proc.stdout.splitlines():
            parts = line.strip().split("|")
            if len(parts) == 4 and parts[0] in ids:
                found[parts[0]] = JobState(*parts)
    return {j: found.get(j, JobState(j, "GONE")) for j in ids}


def node_address() -> str:
    """The address other nodes should use to reach this one: inside a SLURM job, the node's NodeAddr
    (`scontrol show node`), else this machine's name."""
    node = os.environ.get("SLURMD_NODENAME")
    if node and shutil.which("scontrol"):
        try:
            proc = _run(["scontrol", "--oneliner", "show", "node", node], timeout=20)
        except SlurmError:
            proc = None
        if proc is not None and proc.returncode == 0:
            m = re.search(r"\bNodeAddr=(\S+)", proc.stdout)
            if m:
                return m.group(1)
    return socket.getfqdn() or socket.gethostname()


def _tail(path: Path, lines: int = 8) -> str:
    try:
        text = path.read_text(errors="replace").rstrip().splitlines()[-lines:]
    except OSError:
        return f"  ({path} is not there: the job never ran)"
    if not text:
        return f"  ({path} is empty)"
    return "\n".join("  | " + line for line in text)


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _name_opt(name: str) -> str:
    return "" if name == DEFAULT_NAME else f" --name {shlex.quote(name)}"


# ---------------------------------------------------------------------------------------------- public API


def master_address(name: str | None = None, state_dir: str | os.PathLike | None = None) -> str:
    """The "host:port" of the running master of cluster `name` (default "default"), as started by
    `python -m clusterexec.slurm start`. Works on a login node and inside an allocation alike.

        with ClusterExecutor(clusterexec.slurm.master_address()) as ex:   # or ClusterExecutor(slurm=True)
            ...

    Raises `SlurmError` if no such cluster is recorded, its master job is gone or not running yet.
    """
    cluster = SlurmCluster.load(name or DEFAULT_NAME, _state_dir(state_dir))
    record = cluster.read_address()
    if shutil.which("squeue"):
        job = job_states([cluster.master_job])[cluster.master_job]
        if job.state not in RUNNING_STATES:
            again = f"python -m clusterexec.slurm start --workers N{_name_opt(cluster.name)}"
            if job.active:
                raise SlurmError(f"the master of SLURM cluster {cluster.name!r} has not started: job "
                                 f"{job.describe()}; check `python -m clusterexec.slurm status"
                                 f"{_name_opt(cluster.name)}`")
            raise SlurmError(f"the master of SLURM cluster {cluster.name!r} is gone: job {job.describe()} "
                             f"(its log: {cluster.log_file(cluster.master_job)}); start a new one with: {again}")
    if record is None:
        raise SlurmError(f"the master job {cluster.master_job} of SLURM cluster {cluster.name!r} has not written "
                         f"its address to {cluster.address_file} yet; wait a moment, or see its log "
                         f"{cluster.log_file(cluster.master_job)}")
    return str(record["address"])


def _job_script(cluster: SlurmCluster, role: str, args: list[str]) -> str:
    command = shlex.join([sys.executable, "-m", "clusterexec.slurm", role, "--name", cluster.name,
                          "--state-dir", str(cluster.state_dir), *args])
    return (f"#!/bin/sh\n# clusterexec {role.strip('_')} of cluster {cluster.name!r}, "
            f"submitted by python -m clusterexec.slurm start\nexec {command}\n")


def _sbatch_argv(cluster: SlurmCluster, role: str, cpus: int, partition: str | None, time_limit: str | None,
                 sbatch_args: Sequence[str], dependency: str | None = None) -> list[str]:
    argv = ["sbatch", "--parsable", f"--job-name=clusterexec-{cluster.name}-{role}",
            f"--output={cluster.log_dir}/{role}-%j.log", "--ntasks=1", f"--cpus-per-task={cpus}"]
    if partition:
        argv.append(f"--partition={partition}")
    if time_limit:
        argv.append(f"--time={time_limit}")
    if dependency:
        argv.append(f"--dependency=after:{dependency}")
    return [*argv, *sbatch_args]


def _submit(argv: list[str], script: str, what: str) -> str:
    proc = _run(argv, input=script)
    if proc.returncode != 0:
        message = proc.stderr.strip() or proc.stdout.strip() or f"exit status {proc.returncode}"
        raise SlurmError(f"sbatch refused the {what}: {message}\n  command: {shlex.join(argv)}")
    job_id = proc.stdout.strip().split(";")[0]
    if not job_id.isdigit():
        raise SlurmError(f"sbatch gave no job id for the {what}: {proc.stdout!r} {proc.stderr!r}")
    return job_id


def _cancel(job_ids: Sequence[str]) -> None:
    if job_ids:
        _run(["scancel", *job_ids])


def start(workers: int = 1, *, nprocs: int = 1, name: str = DEFAULT_NAME, partition: str | None = None,
          time_limit: str | None = None, sbatch_args: Sequence[str] = (), state_dir: str | os.PathLike | None = None,
          timeout: float = 120.0, wait_workers: bool = False, authkey_file: str | None = None,
          tls_cert: str | None = None, tls_key: str | None = None, tls_ca: str | None = None) -> SlurmCluster:
    """Submit a master job and `workers` worker jobs of `nprocs` task processes each; return once the master
    listens (and, with `wait_workers`, once every worker node has joined it).

    `sbatch_args` go to every sbatch call (`["--account=me", "--qos=short"]`). On any failure, or when the
    jobs do not start within `timeout` seconds, the jobs submitted so far are cancelled and `SlurmError` says
    which jobs, in which state and why, and where their logs are. With `tls_cert`, `tls_key` and `tls_ca`
    (files on the shared file system), master and workers use TLS, all three with that one certificate.
    """
    from .auth import resolve_key, tls_context

    if workers < 0 or nprocs < 1:
        raise ValueError("need workers >= 0 and nprocs >= 1")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"the cluster name {name!r} may hold only letters, digits and . _ -")
    directory = _state_dir(state_dir)
    _command("sbatch")
    try:
        old = SlurmCluster.load(name, directory)
    except SlurmError:
        old = None
    if old is not None:
        alive = [j for j in job_states(old.job_ids).values() if j.active]
        if alive:
            raise SlurmError(f"SLURM cluster {name!r} is already running (jobs "
                             f"{', '.join(j.describe() for j in alive)}): use it, stop it with "
                             f"`python -m clusterexec.slurm stop{_name_opt(name)}`, or choose another --name")
        old.forget()
    # Make sure the key exists before any job needs it (the master would create the default one, but the
    # workers and this process must find the same key).
    key, _ = resolve_key(None, authkey_file, create=True)
    tls = None
    if tls_cert or tls_key or tls_ca:
        tls_context(False, tls_cert, tls_key, tls_ca)  # a bad certificate stops here, not in the jobs
        tls = [str(Path(p).expanduser().absolute()) for p in (tls_cert, tls_key, tls_ca)]
    cluster = SlurmCluster(name=name, state_dir=directory, master_job="", nprocs=nprocs,
                           authkey_file=str(Path(authkey_file).expanduser().absolute()) if authkey_file else None,
                           submitted=time.time(), tls=tls)
    cluster.log_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    key_args = ["--authkey-file", cluster.authkey_file] if cluster.authkey_file else []
    key_args += cluster.tls_args
    try:
        cluster.master_job = _submit(
            _sbatch_argv(cluster, "master", 1, partition, time_limit, sbatch_args),
            _job_script(cluster, "_master", key_args), "master job")
        cluster.save()  # from here on, `stop` can cancel what was submitted even if we are interrupted
        for _ in range(workers):
            cluster.worker_jobs.append(_submit(
                _sbatch_argv(cluster, "worker", nprocs, partition, time_limit, sbatch_args, cluster.master_job),
                _job_script(cluster, "_worker", [*key_args, "--master-job", cluster.master_job,
                                                 "--nprocs", str(nprocs)]), "worker job"))
            cluster.save()
        deadline = time.monotonic() + timeout
        cluster.address = _wait_for_master(cluster, deadline, timeout)
        if wait_workers and workers:
            _wait_for_workers(cluster, key, deadline, timeout)
        else:
            _wait_for_scheduling(cluster, min(deadline, time.monotonic() + SCHEDULING_WAIT))
    except BaseException as e:
        submitted = [j for j in cluster.job_ids if j]
        try:
            _cancel(submitted)
        finally:
            cluster.forget()
        if isinstance(e, SlurmError) and submitted:
            raise SlurmError(f"{e}\n  cancelled the submitted jobs: scancel {' '.join(submitted)}") from None
        raise
    return cluster


def _check_hopeless(cluster: SlurmCluster, jobs: dict[str, JobState]) -> None:
    bad = [jobs[j] for j in cluster.job_ids if jobs[j].hopeless]
    if bad:
        raise SlurmError(f"SLURM will not run {'these jobs' if len(bad) > 1 else 'this job'} of cluster "
                         f"{cluster.name!r} as requested: {', '.join(j.describe() for j in bad)}; "
                         f"ask for fewer CPUs (--nprocs) or less --time, or choose another --partition "
                         f"(see `scontrol show partition`)")


def _wait_for_scheduling(cluster: SlurmCluster, deadline: float) -> None:
    """Wait (a little: until `deadline`) for the scheduler to look at each worker job (it runs, or waits for
    a reason that is not just the master), so that a request that can never be met fails now rather than
    pending forever. A busy cluster's verdict may come later: then `status` shows it."""
    while True:
        jobs = job_states(cluster.worker_jobs)
        _check_hopeless(cluster, {**jobs, cluster.master_job: JobState(cluster.master_job, "RUNNING")})
        if all(j.state != "PENDING" or j.reason not in UNDECIDED_REASONS for j in jobs.values()):
            return
        if time.monotonic() > deadline:
            return  # they may still start: the master is up, and `status` shows them
        time.sleep(POLL)


def _wait_for_master(cluster: SlurmCluster, deadline: float, timeout: float) -> str:
    while True:
        record = cluster.read_address()
        if record is not None:
            return str(record["address"])
        jobs = job_states(cluster.job_ids)
        _check_hopeless(cluster, jobs)
        master = jobs[cluster.master_job]
        if not master.active:
            raise SlurmError(f"the master job {master.describe()} ended before its master was listening; "
                             f"its log {cluster.log_file(cluster.master_job)} ends with:\n"
                             f"{_tail(cluster.log_file(cluster.master_job))}")
        if time.monotonic() > deadline:
            raise SlurmError(_not_started(cluster, jobs, timeout, "the master was not listening"))
        time.sleep(POLL)


def _wait_for_workers(cluster: SlurmCluster, key: bytes, deadline: float, timeout: float) -> None:
    from .address import parse_address
    from .auth import COMMAND_KEY_ADVICE
    from .client import ClientConnection

    conn = ClientConnection(parse_address(cluster.address or ""), key, name="clusterexec.slurm start",
                            connect_timeout=max(1.0, deadline - time.monotonic()), ssl_context=cluster.ssl_context(),
                            key_advice=COMMAND_KEY_ADVICE)
    try:
        while True:
            joined = len(conn.status()["workers"])
            if joined >= len(cluster.worker_jobs):
                return
            jobs = job_states(cluster.job_ids)
            _check_hopeless(cluster, jobs)
            for job_id in cluster.worker_jobs:
                if not jobs[job_id].active:
                    log_file = cluster.log_file(job_id)
                    raise SlurmError(f"the worker job {jobs[job_id].describe()} ended before it joined the master; "
                                     f"its log {log_file} ends with:\n{_tail(log_file)}")
            if time.monotonic() > deadline:
                raise SlurmError(_not_started(cluster, jobs, timeout,
                                              f"{joined} of {len(cluster.worker_jobs)} worker nodes had joined"))
            time.sleep(POLL)
    finally:
        conn.close()


def _not_started(cluster: SlurmCluster, jobs: dict[str, JobState], timeout: float, what: str) -> str:
    lines = [f"the SLURM jobs of cluster {cluster.name!r} did not start within {timeout:g} s ({what}):"]
    for job_id in cluster.job_ids:
        role = "master" if job_id == cluster.master_job else "worker"
        lines.append(f"  {role} job {jobs[job_id].describe()}, log {cluster.log_file(job_id)}")
    lines.append("  check the partition, --time and how busy the cluster is (squeue, sinfo), or give a longer "
                 "--timeout")
    return "\n".join(lines)


def status(name: str | None = None, state_dir: str | os.PathLike | None = None,
           probe_timeout: float = 5.0) -> dict[str, Any]:
    """The recorded jobs of cluster `name` with their queue state, the master's address, and whether it
    answers (then `info` is its `cluster_info()`)."""
    cluster = SlurmCluster.load(name or DEFAULT_NAME, _state_dir(state_dir))
    jobs = job_states(cluster.job_ids)
    record = cluster.read_address()
    result: dict[str, Any] = {
        "name": cluster.name, "state_file": str(cluster.state_file),
        "jobs": [{"role": "master" if j == cluster.master_job else "worker", "job_id": j, "state": jobs[j].state,
                  "reason": jobs[j].reason, "node": jobs[j].node, "log": str(cluster.log_file(j))}
                 for j in cluster.job_ids],
        "address": record["address"] if record else None, "answers": False, "info": None, "error": None}
    if record is None:
        result["error"] = "the master has not written its address (yet)"
    elif jobs[cluster.master_job].state not in RUNNING_STATES:
        result["error"] = f"the master job is {jobs[cluster.master_job].state}"
    else:
        from .auth import resolve_key
        from .client import fetch_status as fetch

        try:
            key, _ = resolve_key(None, cluster.authkey_file)
            result["info"] = fetch(record["address"], key, timeout=probe_timeout, ssl_context=cluster.ssl_context())
            result["answers"] = True
        except Exception as e:  # any failure to talk to it is the answer to "does it answer?"
            result["error"] = f"{type(e).__name__}: {e}"
    return result


def stop(name: str | None = None, state_dir: str | os.PathLike | None = None, timeout: float = 60.0) -> list[str]:
    """Cancel the recorded jobs of cluster `name` (scancel by job id), wait up to `timeout` seconds for them to
    leave the queue, and forget the cluster. Returns the job ids it cancelled."""
    cluster = SlurmCluster.load(name or DEFAULT_NAME, _state_dir(state_dir))
    ids = cluster.job_ids
    proc = _run(["scancel", *ids])
    if proc.returncode != 0 and "Invalid job id" not in proc.stderr:
        raise SlurmError(f"scancel {' '.join(ids)} failed: {proc.stderr.strip()}")
    deadline = time.monotonic() + timeout
    while True:
        jobs = job_states(ids)
        left = [j for j in jobs.values() if j.active]
        if not left:
            break
        if time.monotonic() > deadline:
            raise SlurmError(f"cancelled the jobs of SLURM cluster {cluster.name!r}, but after {timeout:g} s these "
                             f"are still in the queue: {', '.join(j.describe() for j in left)}; "
                             f"run the stop again later, or ask your SLURM administrator")
        time.sleep(POLL)
    cluster.forget()
    return ids


# ---------------------------------------------------------------------------------------------- inside the jobs


def _run_master(args: argparse.Namespace) -> int:
    """The master job: listen on every interface, advertise this node's address, write the address file."""
    cluster = SlurmCluster(name=args.name, state_dir=Path(args.state_dir), master_job="")
    argv = [sys.executable, "-m", "clusterexec.master", "--port", "0", "--address-file", str(cluster.address_file),
            "--advertise-host", node_address()]
    if args.authkey_file:
        argv += ["--authkey-file", args.authkey_file]
    argv += _tls_argv(args)
    sys.stdout.flush()
    os.execv(sys.executable, argv)  # the master itself receives scancel's SIGTERM and removes the file


def _run_worker(args: argparse.Namespace) -> int:
    """A worker job: wait (with a deadline) for the master of this cluster to write its address, then become
    the worker node."""
    cluster = SlurmCluster(name=args.name, state_dir=Path(args.state_dir), master_job=args.master_job)
    deadline = time.monotonic() + args.wait
    next_check = 0.0
    while True:
        record = cluster.read_address()
        if record is not None:
            break
        now = time.monotonic()
        if now > deadline:
            print(f"clusterexec.slurm: the master (job {args.master_job}) wrote no address to "
                  f"{cluster.address_file} within {args.wait:g} s", file=sys.stderr)
            return 1
        if now >= next_check and shutil.which("squeue"):  # ask the controller less often than we look
            next_check = now + 5.0
            job = job_states([args.master_job])[args.master_job]
            if not job.active:
                print(f"clusterexec.slurm: the master job {job.describe()} is over; not starting a worker",
                      file=sys.stderr)
                return 1
        time.sleep(POLL)
    argv = [sys.executable, "-m", "clusterexec.worker", str(record["address"]), "--nprocs", str(args.nprocs)]
    if args.authkey_file:
        argv += ["--authkey-file", args.authkey_file]
    argv += _tls_argv(args)
    print(f"clusterexec.slurm: master of cluster {args.name!r} is at {record['address']}", flush=True)
    os.execv(sys.executable, argv)


def _tls_argv(args: argparse.Namespace) -> list[str]:
    if not args.tls_cert:
        return []
    return ["--tls-cert", args.tls_cert, "--tls-key", args.tls_key, "--tls-ca", args.tls_ca]


# ---------------------------------------------------------------------------------------------- CLI


def _print_status(st: dict[str, Any]) -> None:
    print(f"SLURM cluster {st['name']!r} ({st['state_file']})")
    for job in st["jobs"]:
        where = f" on {job['node']}" if job["node"] and job["state"] in RUNNING_STATES else ""
        why = f" ({job['reason']})" if job["reason"] not in ("", "None", "(null)") else ""
        print(f"  {job['role']:6}  job {job['job_id']:>8}  {job['state']}{why}{where}  log: {job['log']}")
    if st["answers"]:
        info = st["info"]
        print(f"  master at {st['address']} answers: {len(info['workers'])} worker node(s), "
              f"{info.get('procs', '?')} task process(es), {info.get('queued', '?')} task(s) queued")
    else:
        print(f"  master at {st['address'] or '(unknown)'} does not answer: {st['error']}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:  # everything after "--" goes to sbatch as it is
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    parser = argparse.ArgumentParser(
        prog="python -m clusterexec.slurm",
        description="Run a clusterexec master and worker nodes as SLURM jobs; find, inspect and stop them.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{start,status,stop,address}")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--name", default=DEFAULT_NAME, help=f"the cluster's name (default {DEFAULT_NAME!r})")
        p.add_argument("--state-dir", default=None,
                       help=f"directory on the shared file system for job ids, the address and logs (default "
                            f"${ENV_STATE_DIR}, else ~/.clusterexec/slurm)")

    p = sub.add_parser("start", help="submit the master and worker jobs; wait until the master listens",
                       usage="python -m clusterexec.slurm start --workers N [options] [-- extra sbatch args]")
    common(p)
    p.add_argument("--workers", type=int, required=True, metavar="N", help="worker jobs (one worker node each)")
    p.add_argument("--nprocs", type=int, default=1, metavar="K",
                   help="task processes per worker node, and CPUs per worker job (default 1)")
    p.add_argument("--partition", "-p", help="SLURM partition (default: the cluster's default)")
    p.add_argument("--time", "-t", dest="time_limit", help="time limit of the jobs, as sbatch --time")
    p.add_argument("--timeout", type=float, default=120.0, metavar="S",
                   help="seconds to wait for the jobs to start before cancelling them (default 120)")
    p.add_argument("--wait-workers", action="store_true", help="also wait until every worker node has joined")
    p.add_argument("--authkey-file", help="key file for master, workers and clients (default: as usual, "
                                          "~/.clusterexec/authkey, created if missing)")
    add_tls_arguments(p, "master's and workers'")
    p = sub.add_parser("status", help="show the jobs and whether the master answers")
    common(p)
    p = sub.add_parser("stop", help="scancel the jobs and forget the cluster")
    common(p)
    p.add_argument("--timeout", type=float, default=60.0, metavar="S",
                   help="seconds to wait for the jobs to leave the queue (default 60)")
    p = sub.add_parser("address", help="print the master's HOST:PORT")
    common(p)
    for role in ("_master", "_worker"):  # run inside the jobs
        p = sub.add_parser(role)
        common(p)
        p.add_argument("--authkey-file")
        add_tls_arguments(p, "this job's")
        if role == "_worker":
            p.add_argument("--master-job", required=True)
            p.add_argument("--nprocs", type=int, default=1)
            p.add_argument("--wait", type=float, default=300.0)
    args = parser.parse_args(argv)
    if extra and args.command != "start":
        parser.error("extra sbatch arguments after -- are for `start` only")
    try:
        if args.command == "start":
            cluster = start(args.workers, nprocs=args.nprocs, name=args.name, partition=args.partition,
                            time_limit=args.time_limit, sbatch_args=extra, state_dir=args.state_dir,
                            timeout=args.timeout, wait_workers=args.wait_workers, authkey_file=args.authkey_file,
                            tls_cert=args.tls_cert, tls_key=args.tls_key, tls_ca=args.tls_ca)
            opts = _name_opt(cluster.name)
            if args.state_dir:
                opts += f" --state-dir {shlex.quote(str(cluster.state_dir))}"
            slurm_arg = "True" if cluster.name == DEFAULT_NAME else repr(cluster.name)
            if cluster.tls:
                slurm_arg += ", tls_cert=..., tls_key=..., tls_ca=..."
            jobs = job_states(cluster.worker_jobs)
            workers = ", ".join(jobs[j].describe() for j in cluster.worker_jobs) or "(none)"
            print(f"clusterexec master of SLURM cluster {cluster.name!r} listening at {cluster.address}\n"
                  f"  jobs:     master {cluster.master_job}; workers of {cluster.nprocs} task process(es): "
                  f"{workers}\n"
                  f"  connect:  ClusterExecutor(slurm={slurm_arg})  or  ClusterExecutor(\"{cluster.address}\")\n"
                  f"  status:   python -m clusterexec.slurm status{opts}\n"
                  f"  stop:     python -m clusterexec.slurm stop{opts}\n"
                  f"  logs:     {cluster.log_dir}", flush=True)
        elif args.command == "status":
            st = status(args.name, args.state_dir)
            _print_status(st)
            return 0 if st["answers"] else 1
        elif args.command == "stop":
            ids = stop(args.name, args.state_dir, timeout=args.timeout)
            print(f"cancelled SLURM jobs {' '.join(ids)} of cluster {args.name!r}")
        elif args.command == "address":
            print(master_address(args.name, args.state_dir))
        elif args.command == "_master":
            return _run_master(args)
        elif args.command == "_worker":
            return _run_worker(args)
    except (SlurmError, ValueError) as e:
        print(f"clusterexec.slurm: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

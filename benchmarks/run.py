"""Benchmarks: clusterexec against ProcessPoolExecutor (and loky, Dask, Ray when installed).

    python benchmarks/run.py                    # default workloads, 3 repeats: about 15-20 minutes on 2 CPUs
    python benchmarks/run.py --quick            # smaller sizes, 1 repeat: a smoke run of 1-2 minutes
    python benchmarks/run.py --all              # also the slow rss workload: about 30 minutes
    python benchmarks/run.py --only map,pi --repeats 5 --json results.json

These are measurements, not tests: nothing asserts on time. Every workload runs on every backend, each
measurement in a FRESH PROCESS (the parent starts ``python benchmarks/run.py --child WORKLOAD BACKEND``,
which prints one JSON line), so no backend inherits another's warm caches, threads or memory. Each repeat
runs all backends of a workload back to back (their order rotates between repeats), so slow drift of the
machine hits every backend alike. The table shows the MEDIAN over the repeats. For each measurement the
parent also works out how much CPU OTHER processes on the machine used meanwhile (/proc/stat minus the
CPU time of its own process tree); cells with a measurement beside more than 0.25 CPU of such foreign
work are marked "*": on a busy machine, in particular for `factor`, read those with care.

Backends (all with 2 worker processes):

    ppe     concurrent.futures.ProcessPoolExecutor(max_workers=2), default start method of this Python
    local   ClusterExecutor(max_workers=2): a private master + worker node, started by the executor
    cli     ClusterExecutor("127.0.0.1:PORT", authkey=...) against ``python -m clusterexec.master`` plus one
            ``python -m clusterexec.worker --nprocs 2``, which the parent starts for each measurement
            (and waits until the worker has joined), then stops by PID
    loky    loky.get_reusable_executor(max_workers=2)                             (if importable)
    dask    distributed.Client(LocalCluster(n_workers=2, threads_per_worker=1, processes=True))
            .get_executor(pure=False); ``map`` chunks items itself (Dask's ignores chunksize)  (if importable)
    ray     a small concurrent.futures adapter over ray.remote (ray.init(num_cpus=2)), ``submit`` returns
            ObjectRef.future(); ``map`` chunks items itself                        (if importable)

Workloads (full size; --quick divides counts by about 10). Every timed part follows a warm-up that makes
sure both worker processes are up, except for `startup`, which times exactly that:

    roundtrip  sequential submit(noop).result(), 2,000 after 200 warm-up    median µs per round trip (lower is better)
    submit     20,000 submit(noop), then wait for all                        tasks/s  (higher is better)
    map        list(ex.map(noop1, range(100_000), chunksize=1))              tasks/s  (higher is better)
    pi         Monte Carlo pi, 1,000,000 throws, one throw per item, chunksize=10,000; the estimate
               must be within 0.01 of pi (0.03 with --quick)                seconds  (lower is better)
    factor     trial-division factorization of the 5,000 odd numbers from 999,999,999,999, chunksize=25;
               results checked against a serial run in the same child process   seconds  (lower is better)
               and parallel efficiency = serial time / (2 x parallel time)       (higher is better, 1.0 = ideal)
    bytes64    submit(identity, x).result() with x = 64 MiB bytes, 5 round trips after 1 warm-up
    numpy64    the same with a 64 MiB float64 NumPy array
               MiB/s, counting 64 MiB per round trip although the payload travels both ways (higher is better)
    closure50  list(ex.map(fn, range(200), chunksize=1)) where fn carries 50 MiB of captured state (a
               functools.partial over a bytes object, so that plain pickle can carry it to PPE too); PPE
               pickles fn again for every task, clusterexec ships it once per hop and unpickles it once per
               task process (see tests/test_shipping.py)                    seconds  (lower is better)
    startup    from before constructing the executor to the first result of submit(noop)   seconds (lower is better)
               For `cli` only the client's connect + first task is timed: master and worker are already up.
    rss        [slow, only with --all or --only rss] growth of the client's peak RSS while iterating over
               ex.map(noop1, range(300_000), chunksize=1), results discarded as they come; and again with
               buffersize=10,000 ("rss_buffered"), for backends whose map has buffersize (clusterexec;
               ProcessPoolExecutor from Python 3.14)                          MiB  (lower is better)

The ratio columns are ``clusterexec value / ProcessPoolExecutor value`` of the same metric: above 1 is
better for rows marked "higher is better" (tasks/s, MiB/s, efficiency), below 1 is better for rows marked
"lower is better" (µs, seconds, MiB).

Options:

    --only NAME[,NAME]      workloads to run (default: all but the slow ones); `rss` means rss and rss_buffered
    --all                   also run the slow workloads (rss)
    --backends B[,B]        backends to run (default: ppe,local,cli plus every peer that is importable)
    --repeats N             repeats per workload and backend (default 3; 1 with --quick)
    --quick                 smaller sizes and one repeat, for a smoke run
    --json FILE             save every raw measurement (and the medians) as JSON
    --timeout SECONDS       give up on one measurement after this long (default 900)

Task functions live in benchmarks/workloads.py; this script puts benchmarks/ (and the repository root,
so that the working copy of clusterexec is used) on PYTHONPATH for every process it starts. Every
process started here is stopped by its PID; a measurement that leaves a process behind is reported.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import inspect
import json
import math
import os
import platform
import re
import secrets
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(ROOT), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import workloads as W  # noqa: E402

WORKERS = 2
NOISY_CPU = 0.25  # a measurement beside more than this many CPUs of other processes' work is marked noisy
MARKER = "BENCHRESULT "
CORE_BACKENDS = ["ppe", "local", "cli"]
PEER_BACKENDS = {"loky": "loky", "dask": "distributed", "ray": "ray"}  # backend -> module to import
ALL_BACKENDS = CORE_BACKENDS + list(PEER_BACKENDS)


# ================================================================================================ workloads


@dataclass
class Workload:
    name: str
    title: str
    unit: str
    better: str  # "higher" or "lower"
    run: Callable[[Backend, dict], dict]
    full: dict
    quick: dict
    slow: bool = False
    needs_buffersize: bool = False

    def params(self, quick: bool) -> dict:
        return dict(self.quick if quick else self.full)


def warm_up(ex: Executor) -> None:
    """Make sure every worker process is up and has imported the task module."""
    naps = [ex.submit(W.nap, 0.05) for _ in range(WORKERS)]
    noops = [ex.submit(W.noop) for _ in range(4 * WORKERS)]
    for f in naps + noops:
        f.result()


def wl_roundtrip(b: Backend, p: dict) -> dict:
    with b.session() as ex:
        warm_up(ex)
        for _ in range(p["warmup"]):
            ex.submit(W.noop).result()
        times = []
        for _ in range(p["n"]):
            t0 = time.perf_counter()
            ex.submit(W.noop).result()
            times.append(time.perf_counter() - t0)
    times.sort()
    return {"value": statistics.median(times) * 1e6, "n": p["n"],
            "p10_us": times[len(times) // 10] * 1e6, "p90_us": times[len(times) * 9 // 10] * 1e6,
            "mean_us": statistics.fmean(times) * 1e6}


def wl_submit(b: Backend, p: dict) -> dict:
    n = p["n"]
    with b.session() as ex:
        warm_up(ex)
        t0 = time.perf_counter()
        futures = [ex.submit(W.noop) for _ in range(n)]
        t_submitted = time.perf_counter()
        wait_futures(futures)
        t1 = time.perf_counter()
        errors = sum(1 for f in futures if f.exception() is not None)
    if errors:
        raise RuntimeError(f"{errors} of {n} tasks failed")
    return {"value": n / (t1 - t0), "n": n, "seconds": t1 - t0, "submit_seconds": t_submitted - t0}


def wl_map(b: Backend, p: dict) -> dict:
    n = p["n"]
    with b.session() as ex:
        warm_up(ex)
        t0 = time.perf_counter()
        out = list(ex.map(W.noop1, range(n), chunksize=1))
        t1 = time.perf_counter()
    if out != list(range(n)):
        raise RuntimeError("map returned wrong results")
    return {"value": n / (t1 - t0), "n": n, "seconds": t1 - t0}


def wl_pi(b: Backend, p: dict) -> dict:
    n, tol = p["n"], p["tol"]
    with b.session() as ex:
        warm_up(ex)
        t0 = time.perf_counter()
        hits = sum(ex.map(W.throw, range(n), chunksize=p["chunksize"]))
        t1 = time.perf_counter()
    estimate = 4.0 * hits / n
    ok = abs(estimate - math.pi) <= tol
    return {"value": t1 - t0, "n": n, "chunksize": p["chunksize"], "estimate": estimate,
            "error": estimate - math.pi, "tolerance": tol, "ok": ok,
            **({} if ok else {"warning": f"pi estimate {estimate:.5f} is off by more than {tol}"})}


def wl_factor(b: Backend, p: dict) -> dict:
    numbers = [999_999_999_999 + 2 * i for i in range(p["n"])]
    t0 = time.perf_counter()  # serial, in this process, before any executor exists
    expected = [W.factor(x) for x in numbers]
    serial = time.perf_counter() - t0
    with b.session() as ex:
        warm_up(ex)
        t0 = time.perf_counter()
        out = list(ex.map(W.factor, numbers, chunksize=p["chunksize"]))
        parallel = time.perf_counter() - t0
    if out != expected:
        raise RuntimeError("factor: parallel results differ from the serial ones")
    return {"value": parallel, "serial_seconds": serial, "efficiency": serial / (WORKERS * parallel),
            "n": p["n"], "chunksize": p["chunksize"]}


def _payload_roundtrips(b: Backend, p: dict, payload: Any, same: Callable[[Any, Any], bool]) -> dict:
    mib = p["mib"]
    with b.session() as ex:
        warm_up(ex)
        for _ in range(p["warmup"]):
            back = ex.submit(W.identity, payload).result()
            if not same(back, payload):
                raise RuntimeError("identity returned a different payload")
            del back
        t0 = time.perf_counter()
        for _ in range(p["rounds"]):
            back = ex.submit(W.identity, payload).result()
            del back
        dt = time.perf_counter() - t0
    return {"value": mib * p["rounds"] / dt, "mib": mib, "rounds": p["rounds"],
            "seconds_per_roundtrip": dt / p["rounds"]}


def wl_bytes64(b: Backend, p: dict) -> dict:
    size = p["mib"] << 20
    payload = bytes(range(256)) * (size // 256)
    return _payload_roundtrips(b, p, payload, lambda x, y: x == y)


def wl_numpy64(b: Backend, p: dict) -> dict:
    import numpy as np

    payload = np.arange((p["mib"] << 20) // 8, dtype=np.float64)
    return _payload_roundtrips(b, p, payload, lambda x, y: x.dtype == y.dtype and np.array_equal(x, y))


def wl_closure50(b: Backend, p: dict) -> dict:
    n = p["n"]
    payload = bytes(range(256)) * ((p["mib"] << 20) // 256)
    fn = W.with_payload(payload)
    with b.session() as ex:
        warm_up(ex)
        t0 = time.perf_counter()
        out = list(ex.map(fn, range(n), chunksize=1))
        dt = time.perf_counter() - t0
    if out != [i + len(payload) for i in range(n)]:
        raise RuntimeError("closure50: map returned wrong results")
    return {"value": dt, "n": n, "mib": p["mib"], "tasks_per_second": n / dt,
            "mib_if_shipped_per_task": p["mib"] * n}


def wl_startup(b: Backend, p: dict) -> dict:
    t0 = time.perf_counter()
    ex = b.open()
    try:
        ex.submit(W.noop).result()
        dt = time.perf_counter() - t0
    finally:
        t1 = time.perf_counter()
        b.close()
    return {"value": dt, "shutdown_seconds": time.perf_counter() - t1,
            "what": "connect to first result" if b.name == "cli" else "construction to first result"}


def _rss_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Linux: writing 5 to clear_refs resets VmHWM (the peak RSS) to the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rss_map(b: Backend, p: dict) -> dict:
    import resource

    n = p["n"]
    kwargs = {} if p["buffersize"] is None else {"buffersize": p["buffersize"]}
    with b.session() as ex:
        warm_up(ex)
        gc.collect()
        before = _rss_kib("VmRSS")
        exact = before is not None and _reset_peak_rss()
        if before is None:
            import psutil

            before = psutil.Process().memory_info().rss // 1024
        t0 = time.perf_counter()
        count = 0
        for _ in ex.map(W.noop1, range(n), chunksize=1, **kwargs):
            count += 1
        dt = time.perf_counter() - t0
        peak = _rss_kib("VmHWM") if exact else None
        if peak is None:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            if sys.platform == "darwin":
                peak //= 1024
    if count != n:
        raise RuntimeError(f"map yielded {count} results for {n} items")
    return {"value": (peak - before) / 1024, "rss_before_mib": before / 1024, "peak_mib": peak / 1024,
            "seconds": dt, "n": n, "buffersize": p["buffersize"],
            "peak_source": "VmHWM reset before the map" if exact else "ru_maxrss (an upper bound)"}


WORKLOADS: dict[str, Workload] = {w.name: w for w in [
    Workload("roundtrip", "roundtrip (median)", "µs", "lower", wl_roundtrip,
             {"n": 2000, "warmup": 200}, {"n": 200, "warmup": 20}),
    Workload("submit", "submit 20k + wait", "tasks/s", "higher", wl_submit, {"n": 20_000}, {"n": 2_000}),
    Workload("map", "map chunksize=1", "tasks/s", "higher", wl_map, {"n": 100_000}, {"n": 10_000}),
    Workload("pi", "pi 1M throws", "s", "lower", wl_pi,
             {"n": 1_000_000, "chunksize": 10_000, "tol": 0.01},
             {"n": 100_000, "chunksize": 10_000, "tol": 0.03}),
    Workload("factor", "factor 5k odd", "s", "lower", wl_factor,
             {"n": 5_000, "chunksize": 25}, {"n": 500, "chunksize": 5}),
    Workload("bytes64", "bytes 64 MiB", "MiB/s", "higher", wl_bytes64,
             {"mib": 64, "rounds": 5, "warmup": 1}, {"mib": 64, "rounds": 2, "warmup": 1}),
    Workload("numpy64", "numpy 64 MiB", "MiB/s", "higher", wl_numpy64,
             {"mib": 64, "rounds": 5, "warmup": 1}, {"mib": 64, "rounds": 2, "warmup": 1}),
    Workload("closure50", "map fn with 50 MiB state", "s", "lower", wl_closure50,
             {"n": 200, "mib": 50}, {"n": 40, "mib": 50}),
    Workload("startup", "startup", "s", "lower", wl_startup, {}, {}),
    Workload("rss", "rss map 300k", "MiB", "lower", _rss_map,
             {"n": 300_000, "buffersize": None}, {"n": 30_000, "buffersize": None}, slow=True),
    Workload("rss_buffered", "rss map 300k buffersize=10k", "MiB", "lower", _rss_map,
             {"n": 300_000, "buffersize": 10_000}, {"n": 30_000, "buffersize": 1_000}, slow=True,
             needs_buffersize=True),
]}
ALIASES = {"rss": ["rss", "rss_buffered"]}


# ================================================================================================ backends


def _batched(iterator, n):
    import itertools

    while chunk := list(itertools.islice(iterator, n)):
        yield chunk


def chunked_map(submit, fn, iterables, chunksize: int = 1):
    """``Executor.map`` with chunks, for the Dask and Ray adapters: one task per chunk of items."""
    futures = [submit(W.apply_chunk, fn, chunk) for chunk in _batched(zip(*iterables, strict=False), chunksize)]

    def results():
        try:
            for f in futures:
                yield from f.result()
        finally:
            for f in futures:
                f.cancel()

    return results()


class DaskExecutor(Executor):
    def __init__(self, workers: int):
        import logging

        from distributed import Client, LocalCluster

        self.cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                    dashboard_address=None, silence_logs=logging.ERROR)
        self.client = Client(self.cluster)
        # pure=False: the default (pure=True) would merge 20,000 identical submit(noop) into ONE task.
        self.executor = self.client.get_executor(pure=False)

    def submit(self, fn, /, *args, **kwargs):
        return self.executor.submit(fn, *args, **kwargs)

    def map(self, fn, *iterables, timeout=None, chunksize=1):
        return chunked_map(self.submit, fn, iterables, chunksize)

    def shutdown(self, wait=True, *, cancel_futures=False):
        self.executor.shutdown(wait=wait)
        self.client.close()
        self.cluster.close()


class RayExecutor(Executor):
    """Just enough of concurrent.futures over ray.remote for these workloads."""

    def __init__(self, workers: int):
        import ray

        self.ray = ray
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
        self.remotes: dict[Any, Any] = {}

    def submit(self, fn, /, *args, **kwargs):
        remote = self.remotes.get(fn)
        if remote is None:
            remote = self.remotes[fn] = self.ray.remote(fn)
        return remote.remote(*args, **kwargs).future()

    def map(self, fn, *iterables, timeout=None, chunksize=1):
        return chunked_map(self.submit, fn, iterables, chunksize)

    def shutdown(self, wait=True, *, cancel_futures=False):
        self.ray.shutdown()


class Backend:
    """How the measurement child opens and closes one backend's executor."""

    def __init__(self, name: str, address: str | None = None, key_file: str | None = None):
        self.name = name
        self.address = address
        self.key = Path(key_file).read_text().strip() if key_file else None
        self.executor: Executor | None = None
        # Imports happen here, outside every timed region (also that of `startup`).
        if name in ("local", "cli"):
            import clusterexec  # noqa: F401
        elif name in PEER_BACKENDS:
            __import__(PEER_BACKENDS[name])

    def open(self) -> Executor:
        if self.name == "ppe":
            self.executor = ProcessPoolExecutor(max_workers=WORKERS)
        elif self.name == "local":
            from clusterexec import ClusterExecutor

            self.executor = ClusterExecutor(max_workers=WORKERS)
        elif self.name == "cli":
            from clusterexec import ClusterExecutor

            self.executor = ClusterExecutor(self.address, authkey=self.key)
        elif self.name == "loky":
            import loky

            self.executor = loky.get_reusable_executor(max_workers=WORKERS)
        elif self.name == "dask":
            self.executor = DaskExecutor(WORKERS)
        elif self.name == "ray":
            self.executor = RayExecutor(WORKERS)
        else:
            raise ValueError(f"unknown backend {self.name}")
        return self.executor

    def close(self) -> None:
        ex, self.executor = self.executor, None
        if ex is not None:
            ex.shutdown(wait=True)

    @contextlib.contextmanager
    def session(self):
        ex = self.open()
        try:
            yield ex
        finally:
            self.close()


def supports_buffersize(backend: str) -> bool:
    if backend == "ppe":
        return "buffersize" in inspect.signature(ProcessPoolExecutor.map).parameters
    if backend in ("local", "cli"):
        from clusterexec import ClusterExecutor

        return "buffersize" in inspect.signature(ClusterExecutor.map).parameters
    return False  # peers: not measured with buffersize


def child_main(args: argparse.Namespace) -> int:
    workload, backend = args.child
    w = WORKLOADS[workload]
    b = Backend(backend, args.address, args.authkey_file)
    result = w.run(b, w.params(args.quick))
    result.update(workload=workload, backend=backend, unit=w.unit)
    print(MARKER + json.dumps(result), flush=True)
    return 0


# ================================================================================================ processes


def child_env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(HERE), str(ROOT), env.get("PYTHONPATH", "")] if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("CLUSTEREXEC_AUTHKEY", None)
    env["CLUSTEREXEC_AUTHKEY_FILE"] = str(tmp / "no-default-key")  # never touch ~/.clusterexec
    return env


def _cpu_times() -> tuple[int, int, int] | None:
    try:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return sum(values[:8]), idle, sum(values[:3])  # total, idle, user + nice + system


def _busy_cpu_seconds() -> float | None:
    """CPU time spent in user and system mode by every process on the machine since boot."""
    t = _cpu_times()
    return None if t is None else t[2] / os.sysconf("SC_CLK_TCK")


def _our_cpu_seconds() -> float:
    """CPU time of this process and of every descendant it (or a descendant) has waited for."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def session_members(sid: int) -> list[int]:
    """PIDs of the live processes in session `sid` (every process started here leads its own session)."""
    pids = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit():
            pid = int(entry)
            try:
                if os.getsid(pid) == sid and not _is_zombie(pid):
                    pids.append(pid)
            except OSError:
                pass
    return pids


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:120]
    except OSError:
        return "?"


def reap_session(sid: int, grace: float = 5.0) -> list[str]:
    """Wait up to `grace` s for the processes left in session `sid` to exit, then kill each by PID.
    Returns a description of the processes that had to be killed."""
    deadline = time.monotonic() + grace
    while (left := session_members(sid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    killed = []
    for pid in left:
        killed.append(f"{pid} {_cmdline(pid)}")
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    return killed


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    if proc.poll() is None:
        with contextlib.suppress(OSError):
            proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


class CliCluster:
    """A master and one worker node started from the command line, as a user would."""

    def __init__(self, tmp: Path, env: dict[str, str], nprocs: int = WORKERS):
        self.tmp, self.env, self.nprocs = tmp, env, nprocs
        self.key = secrets.token_hex(16)
        self.key_file = tmp / "cluster.key"
        self.key_file.write_text(self.key)
        self.key_file.chmod(0o600)
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []
        self.address = ""

    def start(self, timeout: float = 30.0) -> None:
        master_log = self.tmp / "master.log"
        self.logs.append(master_log)
        with open(master_log, "wb") as log:
            master = subprocess.Popen(
                [sys.executable, "-m", "clusterexec.master", "--host", "127.0.0.1", "--port", "0",
                 "--authkey-file", str(self.key_file)],
                stdout=subprocess.PIPE, stderr=log, env=self.env, start_new_session=True)
        self.procs.append(master)
        line = b""
        deadline = time.monotonic() + timeout
        while not line.endswith(b"\n") and time.monotonic() < deadline:
            ready, _, _ = select.select([master.stdout], [], [], 0.2)
            if ready:
                chunk = os.read(master.stdout.fileno(), 4096)
                if not chunk:
                    break
                line += chunk
        m = re.search(rb"listening on ([\d.]+):(\d+)", line)
        if not m:
            raise RuntimeError(f"master did not start: {line[:200]!r}\n{_tail(master_log)}")
        self.address = f"127.0.0.1:{int(m.group(2))}"
        worker_log = self.tmp / "worker.log"
        self.logs.append(worker_log)
        with open(worker_log, "wb") as log:
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "clusterexec.worker", self.address, "--nprocs", str(self.nprocs),
                 "--authkey-file", str(self.key_file)],
                stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True))
        self._wait_for_worker(deadline)

    def _wait_for_worker(self, deadline: float) -> None:
        from clusterexec import ClusterExecutor

        probe = ClusterExecutor(self.address, authkey=self.key, connect_timeout=10, name="bench-probe")
        try:
            while True:
                info = probe.cluster_info()
                if sum(w.get("nprocs", 0) for w in info["workers"]) >= self.nprocs:
                    return
                if self.procs[1].poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the worker did not join: {info}\n{_tail(self.logs[1])}")
                time.sleep(0.05)
        finally:
            probe.shutdown()

    def stop(self) -> list[str]:
        for proc in reversed(self.procs):  # worker first, then master
            stop_process(proc)
            if proc.stdout:
                proc.stdout.close()
        leftovers = []
        for proc in self.procs:
            leftovers += reap_session(proc.pid, grace=2.0)
        return leftovers


@dataclass
class Measurement:
    workload: str
    backend: str
    repeat: int
    ok: bool = False
    value: float | None = None
    result: dict = field(default_factory=dict)
    error: str = ""
    wall: float = 0.0
    leftovers: list[str] = field(default_factory=list)
    others_cpu: float | None = None  # CPUs used on average by processes not ours during the measurement


def measure(workload: str, backend: str, repeat: int, args: argparse.Namespace, tmp_root: Path) -> Measurement:
    m = Measurement(workload, backend, repeat)
    busy0, ours0 = _busy_cpu_seconds(), _our_cpu_seconds()
    tmp = Path(tempfile.mkdtemp(prefix=f"{workload}-{backend}-", dir=tmp_root))
    env = child_env(tmp)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", workload, backend]
    if args.quick:
        cmd.append("--quick")
    cluster = None
    t0 = time.perf_counter()
    try:
        if backend == "cli":
            cluster = CliCluster(tmp, env)
            cluster.start()
            cmd += ["--address", cluster.address, "--authkey-file", str(cluster.key_file)]
        with open(tmp / "child.stderr", "wb") as err:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env, start_new_session=True)
            try:
                out, _ = proc.communicate(timeout=args.timeout)
            except subprocess.TimeoutExpired:
                m.error = f"TIMEOUT after {args.timeout} s"
                m.leftovers += reap_session(proc.pid, grace=0)
                proc.kill()
                out, _ = proc.communicate()
            except BaseException:
                reap_session(proc.pid, grace=0)
                proc.kill()
                proc.wait()
                raise
        m.leftovers += reap_session(proc.pid)
        lines = [ln for ln in out.decode(errors="replace").splitlines() if ln.startswith(MARKER)]
        if lines and not m.error:
            m.result = json.loads(lines[-1][len(MARKER):])
            m.value = m.result.get("value")
            m.ok = m.value is not None
        elif not m.error:
            m.error = f"exit code {proc.returncode}, no result\n{_tail(tmp / 'child.stderr')}"
        else:
            m.error += "\n" + _tail(tmp / "child.stderr")
    except Exception as e:  # a cluster that would not start, etc.: report and go on
        m.error = f"{type(e).__name__}: {e}"
    finally:
        if cluster is not None:
            left = cluster.stop()
            m.leftovers += [f"(cli cluster) {x}" for x in left]
            if not m.ok:
                m.error += "".join(f"\n--- {p.name}:\n{_tail(p)}" for p in cluster.logs)
        m.wall = time.perf_counter() - t0
        busy1 = _busy_cpu_seconds()
        if busy0 is not None and busy1 is not None and m.wall > 0:
            others = (busy1 - busy0) - (_our_cpu_seconds() - ours0)
            m.others_cpu = max(0.0, others / m.wall)
    if m.ok or not args.keep_tmp:
        shutil.rmtree(tmp, ignore_errors=True)
    return m


# ================================================================================================ report


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit in ("tasks/s", "MiB/s"):
        return f"{value:,.0f}"
    if unit == "µs":
        return f"{value:,.0f}"
    if unit == "s":
        return f"{value:.3f}" if value < 10 else f"{value:.2f}"
    if unit == "MiB":
        return f"{value:.1f}"
    return f"{value:.2f}"


def medians(results: list[Measurement]) -> dict[tuple[str, str], dict[str, Any]]:
    """(row, backend) -> {"value": median or None, "n": ok count, "of": count, "values", "noisy": count}."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    groups: dict[tuple[str, str], list[Measurement]] = {}
    for m in results:
        groups.setdefault((m.workload, m.backend), []).append(m)
    for (workload, backend), ms in groups.items():
        ok = [m for m in ms if m.ok]
        noisy = sum(1 for m in ok if m.others_cpu is not None and m.others_cpu > NOISY_CPU)
        entry = {"value": statistics.median(m.value for m in ok) if ok else None, "n": len(ok), "of": len(ms),
                 "values": [m.value for m in ok], "noisy": noisy}
        out[(workload, backend)] = entry
        if workload == "factor":
            effs = [m.result["efficiency"] for m in ok]
            out[("factor_eff", backend)] = {"value": statistics.median(effs) if effs else None, "n": len(ok),
                                            "of": len(ms), "values": effs, "noisy": noisy}
    return out


ROWS_EXTRA = {"factor_eff": ("factor efficiency", "eff", "higher")}


def row_info(row: str) -> tuple[str, str, str]:
    if row in ROWS_EXTRA:
        return ROWS_EXTRA[row]
    w = WORKLOADS[row]
    return w.title, w.unit, w.better


def print_table(results: list[Measurement], workloads: list[str], backends: list[str],
                skipped: dict[tuple[str, str], str]) -> dict:
    med = medians(results)
    rows: list[str] = []
    for w in workloads:
        rows.append(w)
        if w == "factor":
            rows.append("factor_eff")
    ratio_cols = [b for b in ("local", "cli") if b in backends] if "ppe" in backends else []
    header = ["workload", "unit", "better"] + backends + [f"{b}/ppe" for b in ratio_cols]
    table = [header]
    for row in rows:
        title, unit, better = row_info(row)
        base = row if row != "factor_eff" else "factor"
        line = [title, unit, better]
        for b in backends:
            e = med.get((row, b))
            if (base, b) in skipped:
                line.append("n/a")
            elif e is None:
                line.append("-")
            elif e["value"] is None:
                line.append("FAILED")
            else:
                cell = fmt(e["value"], unit)
                if e["n"] < e["of"]:
                    cell += f" ({e['n']}/{e['of']})"
                if e["noisy"]:
                    cell += "*"
                line.append(cell)
        for b in ratio_cols:
            ce, ppe = med.get((row, b)), med.get((row, "ppe"))
            if ce and ppe and ce["value"] is not None and ppe["value"]:
                line.append(f"{ce['value'] / ppe['value']:.2f}")
            else:
                line.append("-")
        table.append(line)
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for i, r in enumerate(table):
        print("  ".join(c.ljust(widths[j]) if j < 3 else c.rjust(widths[j]) for j, c in enumerate(r)))
        if i == 0:
            print("  ".join("-" * wd for wd in widths))
    return {f"{row}/{b}": e for (row, b), e in med.items()}


# ================================================================================================ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="clusterexec benchmarks (see the module docstring)",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated workloads: " + ", ".join(WORKLOADS))
    parser.add_argument("--all", action="store_true", help="also run the slow workloads (rss)")
    parser.add_argument("--backends", help="comma-separated: " + ", ".join(ALL_BACKENDS))
    parser.add_argument("--repeats", type=int, default=None,
                        help="repeats per workload and backend (default 3, with --quick 1)")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    parser.add_argument("--json", metavar="FILE", help="save the raw measurements here")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per measurement (default 900)")
    parser.add_argument("--keep-tmp", action="store_true", help="keep logs of failed measurements")
    # internal: one measurement
    parser.add_argument("--child", nargs=2, metavar=("WORKLOAD", "BACKEND"), help=argparse.SUPPRESS)
    parser.add_argument("--address", help=argparse.SUPPRESS)
    parser.add_argument("--authkey-file", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def select_workloads(args: argparse.Namespace) -> list[str]:
    if args.only:
        names: list[str] = []
        for name in (n.strip() for n in args.only.split(",") if n.strip()):
            expanded = ALIASES.get(name, [name])
            for n in expanded:
                if n not in WORKLOADS:
                    sys.exit(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")
                if n not in names:
                    names.append(n)
        return [n for n in WORKLOADS if n in names]
    return [n for n, w in WORKLOADS.items() if args.all or not w.slow]


def select_backends(args: argparse.Namespace, notes: list[str]) -> list[str]:
    wanted = [b.strip() for b in args.backends.split(",") if b.strip()] if args.backends else ALL_BACKENDS
    chosen = []
    for b in wanted:
        if b not in ALL_BACKENDS:
            sys.exit(f"unknown backend {b!r}; choose from {', '.join(ALL_BACKENDS)}")
        if b in PEER_BACKENDS and importlib.util.find_spec(PEER_BACKENDS[b]) is None:
            notes.append(f"{b}: skipped, {PEER_BACKENDS[b]} is not importable (pip install "
                         f"{'dask[distributed]' if b == 'dask' else b})")
            continue
        chosen.append(b)
    return [b for b in ALL_BACKENDS if b in chosen]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(args)
    notes: list[str] = []
    workloads = select_workloads(args)
    backends = select_backends(args, notes)
    skipped: dict[tuple[str, str], str] = {}
    for w in workloads:
        if WORKLOADS[w].needs_buffersize:
            for b in backends:
                if not supports_buffersize(b):
                    skipped[(w, b)] = "map has no buffersize"
    if any(b == "ppe" for (_, b) in skipped):
        notes.append(f"rss_buffered: n/a for ppe, ProcessPoolExecutor.map has no buffersize before Python 3.14 "
                     f"(this is {platform.python_version()}); peers are not measured with buffersize")

    import multiprocessing

    print(f"clusterexec benchmarks: Python {platform.python_version()} on {platform.system()} "
          f"{platform.machine()}, {os.cpu_count()} CPUs, {WORKERS} worker processes per backend, "
          f"PPE start method {multiprocessing.get_start_method()}", flush=True)
    print(f"workloads: {', '.join(workloads)}; backends: {', '.join(backends)}; repeats: {args.repeats}"
          f"{'; QUICK sizes' if args.quick else ''}", flush=True)
    for note in notes:
        print(f"note: {note}", flush=True)

    results: list[Measurement] = []
    tmp_root = Path(tempfile.mkdtemp(prefix="clusterexec-bench-"))
    started = time.perf_counter()
    interrupted = False
    try:
        for r in range(args.repeats):
            for w in workloads:
                order = [b for b in backends if (w, b) not in skipped]
                if order:
                    k = r % len(order)
                    order = order[k:] + order[:k]
                for b in order:
                    m = measure(w, b, r, args, tmp_root)
                    results.append(m)
                    unit = WORKLOADS[w].unit
                    if m.ok:
                        status = f"{fmt(m.value, unit)} {unit}"
                        if w == "factor":
                            status += f", efficiency {m.result['efficiency']:.2f}"
                        if w == "pi":
                            status += f", pi ~ {m.result['estimate']:.5f}"
                        if m.result.get("warning"):
                            status += f"  WARNING: {m.result['warning']}"
                    else:
                        status = "FAILED: " + m.error.strip().replace("\n", "\n      ")
                    if m.others_cpu is not None and m.others_cpu > NOISY_CPU:
                        status += f"  [other processes used {m.others_cpu:.1f} CPUs meanwhile]"
                    if m.leftovers:
                        status += f"  LEFTOVER PROCESSES killed: {m.leftovers}"
                    print(f"[{r + 1}/{args.repeats}] {w:<12} {b:<6} {status}  ({m.wall:.1f} s wall)",
                          file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        interrupted = True
        print("interrupted; the table shows what was measured", file=sys.stderr)
    finally:
        if args.keep_tmp:
            print(f"logs of failed measurements kept in {tmp_root}", file=sys.stderr)
        else:
            shutil.rmtree(tmp_root, ignore_errors=True)

    print()
    meds = print_table(results, workloads, backends, skipped)
    print()
    print("Medians over repeats; '(k/n)': only k of n measurements succeeded; '*': noisy (see the end).")
    print("Ratio columns: clusterexec value /", end=" ")
    print("ProcessPoolExecutor value: in 'higher' rows above 1 means clusterexec is better, in 'lower' rows below 1.")
    if "bytes64" in workloads or "numpy64" in workloads:
        print("bytes64/numpy64: MiB/s counts the payload once per round trip, though it travels there and back.")
    if "startup" in workloads and "cli" in backends:
        print("startup: for cli only client connect -> first result (master and worker were already running).")
    if "factor" in workloads:
        print(f"factor efficiency: serial time in the same child / ({WORKERS} x parallel time); 1.0 is ideal.")
    if "pi" in workloads:
        bad = [m for m in results if m.workload == "pi" and m.ok and not m.result.get("ok")]
        print(f"pi: {'every estimate within tolerance' if not bad else f'{len(bad)} estimates OUTSIDE tolerance'}.")
    if any(b in backends for b in ("dask", "ray")):
        print("dask/ray: map is chunked by the adapter in this script (one task per chunk).")
    failed = [m for m in results if not m.ok]
    leftover = [m for m in results if m.leftovers]
    for m in failed:
        print(f"FAILED {m.workload}/{m.backend} repeat {m.repeat + 1}: {m.error.strip().splitlines()[0]}")
    for m in leftover:
        print(f"LEFTOVER processes after {m.workload}/{m.backend} repeat {m.repeat + 1}: {m.leftovers}")
    for note in notes:
        print(f"note: {note}")
    others = sorted(m.others_cpu for m in results if m.others_cpu is not None)
    if others:
        noisy = sum(1 for o in others if o > NOISY_CPU)
        print(f"other processes on this machine used on average {statistics.median(others):.2f} CPUs (median over "
              f"measurements; max {others[-1]:.2f}) of {os.cpu_count()} while measuring; {noisy} of {len(others)} "
              f"measurements (cells marked *) ran beside more than {NOISY_CPU} CPU of other work: expect noise there")
    print(f"total time {time.perf_counter() - started:.0f} s")

    if args.json:
        data = {
            "python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "workers": WORKERS, "quick": args.quick, "repeats": args.repeats, "workloads": workloads,
            "backends": backends, "notes": notes, "interrupted": interrupted,
            "params": {w: WORKLOADS[w].params(args.quick) for w in workloads},
            "medians": meds,
            "measurements": [m.__dict__ for m in results],
        }
        Path(args.json).write_text(json.dumps(data, indent=1, default=str))
        print(f"raw results saved to {args.json}")
    return 1 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())

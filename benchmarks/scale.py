"""Scale: one real master, hundreds of simulated worker nodes, 200,000 no-op tasks.

    this process (driver + client)        python -m clusterexec.master          python scale.py --simulate N
    ┌──────────────────────────┐  TCP     ┌───────────────────────┐  TCP × N   ┌───────────────────────────────┐
    │ ClusterExecutor          │ ───────▶ │ real master:          │ ─────────▶ │ N light asyncio peers, one    │
    │  map(noop1, range(T))    │ ◀─────── │ scheduler, queues     │ ◀───────── │ process: HMAC handshake, hello │
    │ reads /proc/MASTER:      │          │                       │            │ "worker", "tasks" → "results"  │
    │  RSS, peak RSS, CPU time │          └───────────────────────┘            │ at once, "ping" → "pong"       │
    └──────────────────────────┘                                               └───────────────────────────────┘

The simulated nodes speak the real protocol (`clusterexec.protocol`: handshake, frames, the mirrored blob
cache) but run nothing: every task is answered "ok" with a pickled None as soon as it arrives. So the
master's own cost is what is measured, not the cost of running tasks.

For each number of nodes N (default 10 and 500), with T tasks (default 200,000):

    queue   no node connected yet: the client submits T tasks; once the master reports all T queued,
            (master RSS - its RSS before the submit) / T = bytes per queued task (goal: <= 1 KiB)
    drain   the N simulated nodes connect and empty the queue: master CPU time per task, tasks/s
    e2e     with the N nodes connected, list(ex.map(noop1, range(T), chunksize=1)): tasks/s end to end,
            master CPU time per task, master peak RSS

and, in this process, the scheduler alone (sans-I/O) with results trickling in one per flush: the case where
a per-flush cost that grows with N would show (with instant answers, many results share one flush).

Dispatch cost must not grow with N: compare the master's CPU µs per task between N=10 and N=500. On a
machine of 2 CPUs the client, the master and the simulated nodes share them, so tasks/s is bounded by
whichever is slowest; master CPU per task is the number to compare.

    python benchmarks/scale.py                  # N = 10 and 500, T = 200,000, 3 repeats (medians)
    python benchmarks/scale.py --quick          # N = 10 and 100, T = 20,000, 1 repeat
    python benchmarks/scale.py --nodes 10,100,500 --tasks 100000 --repeats 1 --json scale.json

Every process started here is stopped by its PID.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pickle
import platform
import re
import resource
import secrets
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(ROOT), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import cloudpickle  # noqa: E402

from clusterexec import protocol as P  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


# ================================================================================================ simulated nodes


class SimNode(asyncio.Protocol):
    """A worker node that answers every task at once, without running it (and never unpickling anything)."""

    RESULT = pickle.dumps(None, protocol=5)

    def __init__(self, key: bytes, nprocs: int, index: int, stats: dict, on_welcome):
        self.key = key
        self.nprocs = nprocs
        self.index = index
        self.stats = stats
        self.on_welcome = on_welcome
        self.transport: asyncio.Transport | None = None
        self.pending = bytearray()
        self.challenge = P.new_challenge()
        self.stage = "hello"  # → "verdict" → "frames"
        self.reader = P.FrameReader()
        self.cache = P.BlobLRU()  # mirrors the master's per-node LRU of blobs sent to us
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)

    def data_received(self, data: bytes) -> None:
        if self.stage != "frames":
            self.pending += data
            if self.stage == "hello":
                if len(self.pending) < P.SERVER_HELLO.size:
                    return
                hello = bytes(self.pending[: P.SERVER_HELLO.size])
                del self.pending[: P.SERVER_HELLO.size]
                self.transport.write(P.client_proof(self.key, hello, self.challenge))
                self.stage = "verdict"
            if len(self.pending) < P.SERVER_VERDICT_SIZE:
                return
            P.client_check(self.key, self.challenge, bytes(self.pending[: P.SERVER_VERDICT_SIZE]))
            data = bytes(self.pending[P.SERVER_VERDICT_SIZE:])
            self.pending = bytearray()
            self.stage = "frames"
            # The same versions as the client: the master gives a client's tasks only to nodes that can
            # unpickle them.
            self.send({"t": "hello", "role": "worker", "nprocs": self.nprocs, "host": f"sim-{self.index}",
                       "pid": os.getpid(), "python": platform.python_version(),
                       "cloudpickle": cloudpickle.__version__})
            if not data:
                return
        for msg in self.reader.feed(data):
            self.handle(msg)

    def handle(self, msg: P.Message) -> None:
        t = msg.type
        h = msg.header
        if t == "tasks":
            tasks = P.decode_tasks(h["tasks"], msg.buffers, self.cache)
            self.stats["tasks"] += len(tasks)
            self.stats["frames"] += 1
            items, buffers = P.encode_results((task.id, "ok", [self.RESULT], None) for task in tasks)
            self.send({"t": "results", "items": items}, buffers)
        elif t == "ping":
            self.send({"t": "pong"})
        elif t == "cancel":  # everything we got is "running": refuse
            self.send({"t": "cancel_reply", "key": h["key"], "cancelled": [], "refused": h["ids"]})
        elif t == "welcome":
            self.on_welcome()
        # "drop" and "kill": nothing runs here, nothing to stop

    def send(self, header: dict, buffers: list | tuple = ()) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(P.encode(header, buffers))


async def simulate(address: tuple[str, int], key: bytes, n: int, nprocs: int) -> int:
    loop = asyncio.get_running_loop()
    stats = {"tasks": 0, "frames": 0}
    welcomed = 0
    all_in = loop.create_future()

    def on_welcome() -> None:
        nonlocal welcomed
        welcomed += 1
        if welcomed == n and not all_in.done():
            all_in.set_result(None)

    nodes = []
    for start in range(0, n, 50):  # in batches: a burst of hundreds of SYNs can overflow the accept backlog
        batch = await asyncio.gather(*(
            loop.create_connection(lambda i=i: SimNode(key, nprocs, i, stats, on_welcome), *address)
            for i in range(start, min(n, start + 50))))
        for _, proto in batch:
            proto.transport.get_extra_info("socket").setsockopt(6, 1, 1)  # TCP_NODELAY, as the real agent
            nodes.append(proto)
    await asyncio.wait_for(all_in, 60)
    print(f"READY {n}", flush=True)
    done = loop.create_future()
    loop.add_reader(sys.stdin.fileno(), lambda: done.done() or done.set_result(None))  # stdin EOF: stop
    lost = asyncio.gather(*(node.lost for node in nodes))
    await asyncio.wait([done, lost], return_when=asyncio.FIRST_COMPLETED)
    for node in nodes:
        node.transport.close()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print("STATS " + json.dumps({**stats, "cpu": usage.ru_utime + usage.ru_stime,
                                 "lost": sum(1 for node in nodes if node.lost.done())}), flush=True)
    return 0


# ================================================================================================ scheduler alone


def scheduler_cost(nodes: int, tasks: int, per_flush: int, nprocs: int) -> float:
    """µs of `Scheduler` work per task when results trickle in: `per_flush` results of one node, then one
    `schedule()`, as when tasks take a while and finish one at a time (the simulated nodes above answer at
    once, so many results share a flush and hide a per-flush cost that grows with the number of nodes)."""
    from clusterexec.scheduler import Scheduler

    sched = Scheduler()
    sched.add_client(1)
    for i in range(nodes):
        sched.add_node(1000 + i, nprocs)
    blob = P.Blob("0" * 32, b"fn")
    sched.submit(1, [P.Task(i, [blob], [b"args"]) for i in range(tasks)])
    sched.schedule()
    ring = list(sched.nodes.values())
    done = k = 0
    t0 = time.perf_counter()
    while done < tasks // 2:
        node = ring[k % nodes]
        k += 1
        for gid in list(node.assigned)[:per_flush]:
            sched.result(node.id, gid, "ok", [], None)
            done += 1
        sched.schedule()
        for n in sched.dirty_nodes:
            n.out_tasks = []
        sched.dirty_nodes.clear()
        for c in sched.dirty_clients:
            c.out_results = []
        sched.dirty_clients.clear()
    return (time.perf_counter() - t0) / done * 1e6


# ================================================================================================ driver


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (peak RSS) of a process, in bytes."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                out[name] = int(value.split()[0]) * 1024
    return out


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds of a process."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def reset_peak(pid: int) -> None:
    with contextlib.suppress(OSError), open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


def read_line(proc: subprocess.Popen, pattern: str, timeout: float) -> re.Match:
    deadline = time.monotonic() + timeout
    buf = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.2)
        if ready:
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                break
            buf += chunk
            m = re.search(pattern.encode(), buf)
            if m:
                return m
        elif proc.poll() is not None:
            break
    raise RuntimeError(f"expected {pattern!r} from {proc.args[:4]}, got {buf[-500:]!r}")


def stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join(p for p in [str(HERE), str(ROOT), e.get("PYTHONPATH", "")] if p)
    e.pop("CLUSTEREXEC_AUTHKEY", None)
    return e


def wait_queued(ex, n: int, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while True:
        queued = ex.cluster_info()["queued"]
        if queued >= n:
            return time.monotonic()
        if time.monotonic() > deadline:
            raise RuntimeError(f"the master holds {queued} of {n} tasks after {timeout} s")
        time.sleep(0.05)


def run_one(nodes: int, tasks: int, nprocs: int, tmp: Path) -> dict:
    from concurrent.futures import wait as wait_futures

    import workloads as W

    from clusterexec import ClusterExecutor

    key = secrets.token_hex(16)
    key_file = tmp / "key"
    key_file.write_text(key)
    key_file.chmod(0o600)
    master = sim = None
    ex = None
    out: dict = {"nodes": nodes, "nprocs": nprocs, "tasks": tasks}
    try:
        # Heartbeat timeout well above the default: one process of hundreds of simulated nodes, on a machine
        # shared with the client and the master, may be late with a pong, and that is not what is measured.
        master = subprocess.Popen(
            [sys.executable, "-m", "clusterexec.master", "--host", "127.0.0.1", "--port", "0",
             "--authkey-file", str(key_file), "--heartbeat-timeout", "60", "--log-level", "WARNING"],
            stdout=subprocess.PIPE, stderr=open(tmp / "master.log", "wb"), env=env(), start_new_session=True)
        port = int(read_line(master, r"listening on [\d.]+:(\d+)", 30).group(1))
        address = f"127.0.0.1:{port}"
        ex = ClusterExecutor(address, authkey=key, name="scale-bench")
        ex.submit(W.noop)  # queued: no node yet; ships the client's hello and warms the path
        wait_queued(ex, 1, 30)
        time.sleep(0.5)
        rss_idle = proc_status(master.pid)["VmRSS"]

        # -- queue: T tasks held by the master, no node connected
        reset_peak(master.pid)
        cpu0 = proc_cpu(master.pid)
        t0 = time.perf_counter()
        futures = [ex.submit(W.noop) for _ in range(tasks)]
        t_submitted = time.perf_counter()
        wait_queued(ex, tasks + 1, 600)
        t_queued = time.perf_counter()
        mem = proc_status(master.pid)
        out["queue"] = {
            "rss_idle_mib": rss_idle / 2**20, "rss_queued_mib": mem["VmRSS"] / 2**20,
            "peak_mib": mem["VmHWM"] / 2**20, "bytes_per_task": (mem["VmRSS"] - rss_idle) / tasks,
            "peak_bytes_per_task": (mem["VmHWM"] - rss_idle) / tasks,
            "submit_seconds": t_submitted - t0, "queued_seconds": t_queued - t0,
            "master_cpu_us_per_task": (proc_cpu(master.pid) - cpu0) / tasks * 1e6}

        # -- drain: N simulated nodes connect and empty the queue
        cpu0 = proc_cpu(master.pid)
        t0 = time.perf_counter()
        sim = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--simulate", str(nodes), "--address", address,
             "--key-file", str(key_file), "--nprocs", str(nprocs)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(tmp / "sim.log", "wb"), env=env(),
            start_new_session=True)
        read_line(sim, r"READY \d+", 120)
        t_ready = time.perf_counter()
        if wait_futures(futures, timeout=900).not_done:
            raise RuntimeError(f"tasks still pending after 900 s; see {tmp / 'master.log'}")
        dt = time.perf_counter() - t0
        failed = sum(1 for f in futures if f.exception() is not None)
        out["drain"] = {"seconds": dt, "connect_seconds": t_ready - t0, "tasks_per_second": tasks / dt,
                        "master_cpu_us_per_task": (proc_cpu(master.pid) - cpu0) / tasks * 1e6, "failed": failed}
        del futures

        # -- e2e: map with N nodes connected
        reset_peak(master.pid)
        cpu0 = proc_cpu(master.pid)
        me0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        results = list(ex.map(W.noop1, range(tasks), chunksize=1))
        dt = time.perf_counter() - t0
        me1 = resource.getrusage(resource.RUSAGE_SELF)
        if results != [None] * tasks:  # a simulated node answers None to every task: it runs nothing
            raise RuntimeError("map returned something else than the simulated nodes' None")
        mem = proc_status(master.pid)
        out["e2e"] = {"seconds": dt, "tasks_per_second": tasks / dt,
                      "master_cpu_us_per_task": (proc_cpu(master.pid) - cpu0) / tasks * 1e6,
                      "client_cpu_us_per_task": (me1.ru_utime + me1.ru_stime - me0.ru_utime - me0.ru_stime)
                      / tasks * 1e6,
                      "master_peak_mib": mem["VmHWM"] / 2**20}
        ex.shutdown()
        ex = None
        sim.stdin.close()
        stats = json.loads(read_line(sim, r"STATS (\{.*\})", 60).group(1))
        out["sim"] = {**stats, "cpu_us_per_task": stats["cpu"] / (2 * tasks) * 1e6}
        return out
    finally:
        if ex is not None:
            ex.shutdown(wait=False, cancel_futures=True)
        if sim is not None and sim.stdin and not sim.stdin.closed:
            with contextlib.suppress(OSError):
                sim.stdin.close()
        stop(sim)
        stop(master)


def print_scheduler_costs(nodes: list[int], tasks: int, nprocs: int) -> None:
    print("Scheduler alone (sans-I/O, in this process), results trickling in one per flush, median of 3:")
    for n in sorted(set(nodes) | {10, 500, 2000}):
        cost = statistics.median(scheduler_cost(n, min(tasks, 50_000), 1, nprocs) for _ in range(3))
        print(f"  N={n:<5} {cost:6.2f} µs per task")


def median_of(runs: list[dict], phase: str, key: str) -> float:
    return statistics.median(r[phase][key] for r in runs)


def print_table(by_n: dict[int, list[dict]], tasks: int) -> None:
    rows = [
        ("master RSS idle", "MiB", "queue", "rss_idle_mib", "{:.1f}"),
        (f"master RSS, {tasks:,} queued", "MiB", "queue", "rss_queued_mib", "{:.1f}"),
        ("bytes per queued task", "B", "queue", "bytes_per_task", "{:.0f}"),
        ("  peak bytes per queued task", "B", "queue", "peak_bytes_per_task", "{:.0f}"),
        ("master CPU per task, queueing", "µs", "queue", "master_cpu_us_per_task", "{:.1f}"),
        ("drain: nodes connect", "s", "drain", "connect_seconds", "{:.2f}"),
        ("drain: tasks/s", "tasks/s", "drain", "tasks_per_second", "{:,.0f}"),
        ("drain: master CPU per task", "µs", "drain", "master_cpu_us_per_task", "{:.1f}"),
        ("e2e map: tasks/s", "tasks/s", "e2e", "tasks_per_second", "{:,.0f}"),
        ("e2e map: master CPU per task", "µs", "e2e", "master_cpu_us_per_task", "{:.1f}"),
        ("e2e map: client CPU per task", "µs", "e2e", "client_cpu_us_per_task", "{:.1f}"),
        ("e2e map: master peak RSS", "MiB", "e2e", "master_peak_mib", "{:.1f}"),
        ("simulated nodes' CPU per task", "µs", "sim", "cpu_us_per_task", "{:.1f}"),
    ]
    ns = sorted(by_n)
    header = ["", "unit"] + [f"N={n}" for n in ns]
    if len(ns) >= 2:
        header.append(f"N={ns[-1]} / N={ns[0]}")
    table = [header]
    for title, unit, phase, key, f in rows:
        values = [median_of(by_n[n], phase, key) for n in ns]
        line = [title, unit] + [f.format(v) for v in values]
        if len(ns) >= 2:
            line.append(f"{values[-1] / values[0]:.2f}" if values[0] else "-")
        table.append(line)
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for i, r in enumerate(table):
        print("  ".join(c.ljust(widths[j]) if j < 2 else c.rjust(widths[j]) for j, c in enumerate(r)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="clusterexec master at scale (see the module docstring)",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", help="comma-separated numbers of simulated nodes (default 10,500)")
    parser.add_argument("--tasks", type=int, help="tasks per phase (default 200,000)")
    parser.add_argument("--nprocs", type=int, default=2, help="task processes each simulated node claims")
    parser.add_argument("--repeats", type=int, help="runs per N (default 3, with --quick 1); medians shown")
    parser.add_argument("--quick", action="store_true", help="N = 10 and 100, 20,000 tasks, one run")
    parser.add_argument("--json", metavar="FILE", help="save every run here")
    parser.add_argument("--scheduler-only", action="store_true", help="only the sans-I/O scheduler measurement")
    # internal: the simulated nodes
    parser.add_argument("--simulate", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--address", help=argparse.SUPPRESS)
    parser.add_argument("--key-file", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.simulate:
        host, port = args.address.rsplit(":", 1)
        key = Path(args.key_file).read_bytes().strip()
        return asyncio.run(simulate((host, int(port)), key, args.simulate, args.nprocs))

    nodes = [int(n) for n in (args.nodes or ("10,100" if args.quick else "10,500")).split(",")]
    tasks = args.tasks or (20_000 if args.quick else 200_000)
    if args.scheduler_only:
        print_scheduler_costs(nodes, tasks, args.nprocs)
        return 0
    repeats = args.repeats or (1 if args.quick else 3)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited: the master and simulator need N fds
    print(f"clusterexec scale: {tasks:,} tasks, nodes {nodes} × {args.nprocs} claimed processes, "
          f"{repeats} repeat(s), {os.cpu_count()} CPUs, Python {sys.version.split()[0]}", flush=True)
    by_n: dict[int, list[dict]] = {n: [] for n in nodes}
    for r in range(repeats):
        for n in (nodes if r % 2 == 0 else nodes[::-1]):
            with tempfile.TemporaryDirectory(prefix="clusterexec-scale-") as tmp:
                run = run_one(n, tasks, args.nprocs, Path(tmp))
            by_n[n].append(run)
            print(f"[{r + 1}/{repeats}] N={n}: {run['queue']['bytes_per_task']:.0f} B/queued task, drain "
                  f"{run['drain']['tasks_per_second']:,.0f} tasks/s ({run['drain']['master_cpu_us_per_task']:.1f}"
                  f" µs master CPU/task), e2e {run['e2e']['tasks_per_second']:,.0f} tasks/s "
                  f"({run['e2e']['master_cpu_us_per_task']:.1f} µs master CPU/task)", file=sys.stderr, flush=True)
    print()
    print_table(by_n, tasks)
    print()
    print("Medians over repeats. 'bytes per queued task': (master RSS with all tasks queued - RSS before) / tasks; "
          "goal <= 1024.\nCPU per task from /proc/PID/stat (10 ms ticks). The last column is the ratio of the "
          "largest N to the smallest: dispatch cost should not grow with N (ratio ~1).")
    print()
    print_scheduler_costs(nodes, tasks, args.nprocs)
    if args.json:
        Path(args.json).write_text(json.dumps({"tasks": tasks, "runs": by_n}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Fault tolerance as a specification: hung nodes, a master that restarts, clients that vanish, poison tasks,
per-task time limits and kills, and a master that sends garbage to a node agent.

Everything runs in real processes on 127.0.0.1 (the partition test adds a private network namespace of its
own). Task functions live at module level so that task processes import them by reference (tests/ is on
their PYTHONPATH). Every process a test freezes is thawed in a `finally`; every process it starts is
stopped by its PID.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from concurrent.futures import CancelledError
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest
from conftest import Cluster, _env, agent_children, is_gone, read_frame, reap, recv_exact, stop_gently, wait_until

from clusterexec import (
    ClusterExecutor,
    TaskKilled,
    TaskTimeout,
    WorkerLostError,
)
from clusterexec import protocol as P

pytestmark = pytest.mark.timeout(30)

HERE = Path(__file__).resolve().parent
RESULT_TIMEOUT = 15
FAST_BEAT = ("--heartbeat-interval", "0.5", "--heartbeat-timeout", "2")
BEAT_TIMEOUT = 2.0


# ================================================================================================ task functions


def square(x):
    return x * x


def times_three_after_2ms(x):
    time.sleep(0.002)
    return x * 3


def record_and_sleep(directory, x, delay):
    """Leaves a file naming item x, its node agent (parent pid) and its own pid, then works a while."""
    Path(directory, f"{x}-{os.getppid()}-{os.getpid()}").touch()
    time.sleep(delay)
    return x * x, os.getppid()


def record_and_sleep_longer_on(directory, x, slow_agent, slow_delay, delay):
    """Like record_and_sleep, but runs `slow_delay` on the node whose agent is `slow_agent`: those tasks are
    surely still running when that node is cut off."""
    Path(directory, f"{x}-{os.getppid()}-{os.getpid()}").touch()
    time.sleep(slow_delay if os.getppid() == slow_agent else delay)
    return x * x, os.getppid()


def sleep_and_ppid(delay, value):
    time.sleep(delay)
    return value, os.getppid()


def write_pid_and_sleep(directory, name, delay):
    """Leaves a file named after `name` and its pid (read it with `_pid_of`), then sleeps."""
    Path(directory, f"{name}-{os.getpid()}").touch()
    time.sleep(delay)
    return name


def wait_for_file(path, limit):
    """Blocks until `path` exists (at most `limit` seconds): a task that holds a process until released."""
    deadline = time.monotonic() + limit
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)
    return os.getpid()


def touch_and_return(path, value):
    Path(path).touch()
    return value


def die_every_time(attempts_file):
    """Poison: logs each attempt's pid, then kills its own process."""
    with open(attempts_file, "a") as f:
        f.write(f"{os.getpid()}\n")
    os.kill(os.getpid(), signal.SIGKILL)


def die_on_first_attempt(marker, value):
    if not os.path.exists(marker):
        Path(marker).write_text(str(os.getpid()))
        os._exit(3)
    return value


def slow_at(x, slow_item, marker_dir):
    Path(marker_dir, f"{x}").touch()
    if x == slow_item:
        time.sleep(30)
    return x * 10


class ExitWhenUnpickled:
    """Pickles fine; unpickling it ends the process that does so (os._exit)."""

    def __reduce__(self):
        return os._exit, (7,)


class ExitWhenPickled:
    """A result whose pickling ends the task process."""

    def __reduce__(self):
        os._exit(6)


class CallableThatExitsWhenUnpickled:
    def __call__(self):
        return 1

    def __reduce__(self):
        return os._exit, (5,)


def return_value(value):
    return value


def return_exit_when_pickled():
    return ExitWhenPickled()


# ================================================================================================ helpers




def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def _wait_for_log(path: Path, needle: str, within: float = 10.0, count: int = 1) -> str:
    deadline = time.monotonic() + within
    while True:
        text = _read(path)
        if text.count(needle) >= count:
            return text
        if time.monotonic() > deadline:
            raise AssertionError(f"{path.name} does not contain {needle!r} {count} time(s) within {within} s:\n{text}")
        time.sleep(0.05)


def _started(directory: Path) -> list[tuple[int, int, int]]:
    """(item, agent pid, task pid) of every start recorded by `record_and_sleep`."""
    out = []
    for p in directory.iterdir():
        x, ppid, pid = p.name.split("-")
        out.append((int(x), int(ppid), int(pid)))
    return out


def _pid_of(path: Path) -> int:
    """The task process pid in the name of a file left by `write_pid_and_sleep`."""
    return int(path.name.rsplit("-", 1)[1])


def _freeze(agent_pid: int) -> list[int]:
    """SIGSTOP a whole node, agent and task processes, as a hung machine would be."""
    pids = [agent_pid, *agent_children(agent_pid)]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    return pids


def _thaw(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


def _count_calls(futures) -> Counter:
    """A done-callback per Future counting how many times each one resolves."""
    calls: Counter = Counter()
    lock = threading.Lock()

    def make(i):
        def done(_):
            with lock:
                calls[i] += 1
        return done

    for i, f in enumerate(futures):
        f.add_done_callback(make(i))
    return calls


def _worker_ids(info: dict, pid: int) -> list[int]:
    return [w["id"] for w in info["workers"] if w["pid"] == pid]


def _our_client(info: dict, name: str) -> dict:
    [client] = [c for c in info["clients"] if c["name"] == name]
    return client


@contextmanager
def _executor(cluster, **kwargs):
    """`with _executor(cluster) as ex`, except that a failing test does not then wait for its long tasks: they
    are killed, so that the failure shows instead of a timeout."""
    ex = cluster.executor(**kwargs)
    try:
        yield ex
    except BaseException:
        pending = ex._conn.pending_futures()
        ex.shutdown(wait=False, cancel_futures=True)
        for future in pending:
            ex.kill(future)
        raise
    ex.shutdown(wait=True)


@pytest.fixture
def fast_cluster(tmp_path):
    """A master that pings every 0.5 s and presumes a node silent for 2 s hung; no worker node yet."""
    c = Cluster(tmp_path)
    try:
        c.start_master(0, *FAST_BEAT)
        yield c
    finally:
        c.stop()


# ======================================================================================== 1. frozen worker node


def test_frozen_node_tasks_finish_on_the_other_node_and_it_rejoins_as_a_new_node_without_duplicates(
        fast_cluster, tmp_path):
    cluster = fast_cluster
    frozen_node = cluster.start_worker(2)
    healthy = cluster.start_worker(2)
    old_ids = _worker_ids(cluster.info(), frozen_node.pid)
    assert len(old_ids) == 1
    starts = tmp_path / "starts"
    starts.mkdir()
    n = 8
    with _executor(cluster, name="frozen-test") as ex:
        futures = [ex.submit(record_and_sleep_longer_on, str(starts), x, frozen_node.pid, 10, 0.5)
                   for x in range(n)]
        calls = _count_calls(futures)
        wait_until(lambda: any(ppid == frozen_node.pid for _, ppid, _ in _started(starts)),
                    what="a task to start on the node about to freeze")
        frozen = _freeze(frozen_node.pid)
        t0 = time.monotonic()
        try:
            results = [f.result(timeout=RESULT_TIMEOUT) for f in futures]
            elapsed = time.monotonic() - t0
            assert [r[0] for r in results] == [x * x for x in range(n)]
            # Detected within the heartbeat timeout (plus one interval); then at most 8 half-second
            # tasks on 2 processes remain.
            assert elapsed < BEAT_TIMEOUT + 0.5 + 5.5, f"took {elapsed:.1f} s"
            on_frozen = {x for x, ppid, _ in _started(starts) if ppid == frozen_node.pid}
            assert on_frozen
            assert all(results[x][1] == healthy.pid for x in on_frozen), \
                "the frozen node's tasks must have been completed by the healthy node"
            log = _wait_for_log(cluster.log_dir / "master.log", "stopped answering", within=2)
            assert f"worker node {old_ids[0]} " in log
            assert [w["pid"] for w in cluster.info()["workers"]] == [healthy.pid]
        finally:
            _thaw(frozen)
        # Thawed, it finds its connection gone, drops what it was running and joins as a new node.
        info = cluster.wait_for(lambda i: _worker_ids(i, frozen_node.pid), what="the thawed node to rejoin")
        assert _worker_ids(info, frozen_node.pid) != old_ids
        worker_log = _wait_for_log(cluster.log_dir / "worker0.log", "connected to master", count=2)
        assert "lost the connection to the master" in worker_log
        assert frozen_node.poll() is None
        # The task processes it had running those tasks were killed and replaced.
        frozen_task_pids = {pid for _, ppid, pid in _started(starts) if ppid == frozen_node.pid}
        wait_until(lambda: all(is_gone(pid) for pid in frozen_task_pids), what="the stale task processes to go")
        wait_until(lambda: len(agent_children(frozen_node.pid)) == 2, what="replacement task processes")
        # Nothing arrives twice: give a stale result every chance to show up, then count.
        time.sleep(1.0)
        assert all(calls[i] == 1 for i in range(n)), calls
        assert [f.result() for f in futures] == results
        assert _our_client(ex.cluster_info(), "frozen-test")["done"] == n
        # The rejoined node takes work again.
        more = [ex.submit(sleep_and_ppid, 0.3, i) for i in range(8)]
        values = [f.result(timeout=RESULT_TIMEOUT) for f in more]
        assert [v for v, _ in values] == list(range(8))
        assert {ppid for _, ppid in values} == {frozen_node.pid, healthy.pid}


def test_frozen_node_is_reported_as_stopped_answering_after_the_default_timeout(cluster):
    node = cluster.workers[0]
    node_id = cluster.info()["workers"][0]["id"]
    frozen = _freeze(node.pid)
    t0 = time.monotonic()
    try:
        log = _wait_for_log(cluster.log_dir / "master.log", "stopped answering", within=10)
        elapsed = time.monotonic() - t0
        # Within the 5 s default of its last word (plus a margin for this test's polling), and not rashly.
        assert 2.5 < elapsed < 6.5, f"default heartbeat timeout is 5 s; noticed after {elapsed:.1f} s"
        line = next(line for line in log.splitlines() if "stopped answering" in line)
        assert f"worker node {node_id} " in line and "5 s" in line
        assert cluster.info()["workers"] == []
    finally:
        _thaw(frozen)
    cluster.wait_for(lambda i: _worker_ids(i, node.pid), what="the thawed node to rejoin")
    with _executor(cluster) as ex:
        assert ex.submit(square, 6).result(timeout=RESULT_TIMEOUT) == 36


def test_frozen_master_is_presumed_lost_by_agent_and_client_which_reconnect_when_it_thaws(
        fast_cluster, tmp_path, caplog):
    cluster = fast_cluster
    node = cluster.start_worker(2)
    starts = tmp_path / "starts"
    starts.mkdir()
    with _executor(cluster, name="thaw-test") as ex:
        futures = [ex.submit(record_and_sleep, str(starts), x, 0.3) for x in range(12)]
        calls = _count_calls(futures)
        wait_until(lambda: _started(starts), what="a task to start")
        cluster.master.send_signal(signal.SIGSTOP)
        try:
            _wait_for_log(cluster.log_dir / "worker0.log", "no word from the master", within=BEAT_TIMEOUT + 3)
            time.sleep(0.5)
        finally:
            cluster.master.send_signal(signal.SIGCONT)
        results = [f.result(timeout=RESULT_TIMEOUT) for f in futures]
        assert [r[0] for r in results] == [x * x for x in range(12)]
        assert "no word from the master" in caplog.text and "reconnected to the master" in caplog.text
        time.sleep(0.5)
        assert all(calls[i] == 1 for i in range(12)), calls
        info = ex.cluster_info()
        assert [w["pid"] for w in info["workers"]] == [node.pid]
        assert _our_client(info, "thaw-test")["pending"] == 0
        assert list(ex.map(square, range(20))) == [x * x for x in range(20)]


class _SlowLink:
    """A TCP proxy on 127.0.0.1 that forwards each direction at `rate` bytes per second: a slow network."""

    def __init__(self, target: tuple[str, int], rate: float):
        self.target = target
        self.rate = rate
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.sockets: list[socket.socket] = []
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self) -> None:
        while True:
            try:
                a, _ = self.listener.accept()
                b = socket.create_connection(self.target)
            except OSError:
                return
            self.sockets += [a, b]
            for src, dst in ((a, b), (b, a)):
                t = threading.Thread(target=self._pump, args=(src, dst), daemon=True)
                t.start()
                self.threads.append(t)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(16384):
                dst.sendall(data)
                time.sleep(len(data) / self.rate)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        self.listener.close()
        for sock in self.sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        for t in self.threads:
            t.join(5)


def payload_size(data):
    return len(data)


def make_payload(n):
    return b"r" * n


def test_node_busy_moving_a_frame_longer_than_the_heartbeat_timeout_is_not_presumed_hung(fast_cluster, tmp_path):
    """Over a slow link, a big argument or result takes longer than the heartbeat timeout to cross. The bytes
    flowing are a sign of life: the node must not be dropped (which would retry the task forever)."""
    cluster = fast_cluster
    link = _SlowLink(("127.0.0.1", cluster.port), rate=1_000_000)
    node = None
    try:
        log_path = tmp_path / "slow-node.log"
        node = _start_agent(link.address, cluster.key_file, log_path)
        info = cluster.wait_for(lambda i: _worker_ids(i, node.pid), what="the node behind the slow link")
        ids = _worker_ids(info, node.pid)
        size = 3_500_000  # 3.5 s at 1 MB/s, past the 2 s heartbeat timeout
        with _executor(cluster) as ex:
            t0 = time.monotonic()
            incoming = ex.options(retries=0).submit(payload_size, b"a" * size)
            outgoing = ex.options(retries=0).submit(make_payload, size)
            assert incoming.result(timeout=25) == size
            assert len(outgoing.result(timeout=25)) == size
            assert time.monotonic() - t0 > 2 * BEAT_TIMEOUT, "the link was not slow enough to test anything"
        assert "stopped answering" not in _read(cluster.log_dir / "master.log")
        assert "lost the connection" not in _read(log_path)
        assert _worker_ids(cluster.info(), node.pid) == ids
    finally:
        if node is not None:
            reap(node)
        link.close()


def test_a_slow_done_callback_is_not_mistaken_for_a_silent_master(fast_cluster, tmp_path, caplog):
    """Done-callbacks run in the client's IO thread. One that takes longer than the heartbeat timeout must
    not make the client drop its connection (the master would then kill all its running tasks)."""
    cluster = fast_cluster
    cluster.start_worker(2)
    starts = tmp_path / "starts"
    starts.mkdir()
    with _executor(cluster, name="slow-callback") as ex:
        first = ex.submit(sleep_and_ppid, 0.05, "first")
        first.add_done_callback(lambda f: time.sleep(BEAT_TIMEOUT + 1.5))
        others = [ex.submit(record_and_sleep, str(starts), x, 4) for x in range(2)]
        assert [f.result(timeout=RESULT_TIMEOUT)[0] for f in others] == [0, 1]
        assert first.result()[0] == "first"
        assert Counter(x for x, _, _ in _started(starts)) == {0: 1, 1: 1}, "the running tasks were restarted"
        assert "lost the connection to the master" not in caplog.text
        assert _read(cluster.log_dir / "master.log").count("(slow-callback)") == 1


# ======================================================================================== 2. master restart


def _restart_master(cluster, port: int, pause: float = 0.5) -> None:
    old = cluster.master
    old.send_signal(signal.SIGKILL)
    old.wait(5)
    old.stdout.close()
    time.sleep(pause)
    cluster.start_master(port)


@pytest.mark.parametrize("buffersize", [None, 64])
def test_master_killed_mid_map_and_restarted_on_the_same_port_the_map_completes_in_order(cluster, buffersize):
    port = cluster.port
    agent = cluster.workers[0]
    n = 2000
    with _executor(cluster, name="restart-test") as ex:
        results = []
        t0 = time.monotonic()
        for i, value in enumerate(ex.map(times_three_after_2ms, range(n), buffersize=buffersize)):
            results.append(value)
            if i == 300:
                _restart_master(cluster, port)
        assert results == [x * 3 for x in range(n)]
        assert time.monotonic() - t0 < 20
        # The same node agent rejoined the new master, and the client is connected to it.
        info = cluster.wait_for(lambda i: [w["pid"] for w in i["workers"]] == [agent.pid],
                                what="the node to rejoin")
        assert any(c["name"] == "restart-test" for c in info["clients"])
        assert _read(cluster.log_dir / "worker0.log").count("connected to master") == 2
        assert ex.submit(square, 5).result(timeout=RESULT_TIMEOUT) == 25


def test_master_killed_while_long_tasks_run_and_restarted_the_map_completes(cluster, tmp_path):
    port = cluster.port
    agent = cluster.workers[0]
    starts = tmp_path / "starts"
    starts.mkdir()
    n = 6
    with _executor(cluster) as ex:
        it = ex.map(record_and_sleep, [str(starts)] * n, range(n), [0.5] * n)
        wait_until(lambda: len(_started(starts)) >= 2, what="two tasks to start")
        running_at_kill = {x for x, _, _ in _started(starts)}
        _restart_master(cluster, port)
        results = list(it)
        assert [r[0] for r in results] == [x * x for x in range(n)]
        # The tasks running at the time of the kill were run again for the new master.
        starts_per_item = Counter(x for x, _, _ in _started(starts))
        assert all(starts_per_item[x] >= 2 for x in running_at_kill), starts_per_item
        cluster.wait_for(lambda i: [w["pid"] for w in i["workers"]] == [agent.pid], what="the node to rejoin")


# ======================================================================================== 3. client loss


def test_client_killed_has_its_running_tasks_killed_on_the_node_and_others_get_the_workers(cluster, tmp_path):
    agent = cluster.workers[0].pid
    pids_dir = tmp_path / "pids"
    pids_dir.mkdir()
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(HERE)!r})
        from clusterexec import ClusterExecutor
        from test_resilience import write_pid_and_sleep
        ex = ClusterExecutor({cluster.address!r}, authkey={cluster.key!r})
        futures = [ex.submit(write_pid_and_sleep, {str(pids_dir)!r}, i, 30) for i in range(10)]
        while sum(f.running() for f in futures) < 2:
            time.sleep(0.01)
        print("running", flush=True)
        time.sleep(60)
    """)
    doomed = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=_env())
    try:
        assert doomed.stdout.readline().strip() == b"running"
        files = wait_until(lambda: len(list(pids_dir.iterdir())) == 2 and list(pids_dir.iterdir()),
                            what="two pid files")
        task_pids = {_pid_of(p) for p in files}
        assert task_pids <= agent_children(agent)
        doomed.send_signal(signal.SIGKILL)
        doomed.wait(5)
    finally:
        reap(doomed)
    t0 = time.monotonic()
    # Its running tasks are killed on the node, and their processes replaced.
    wait_until(lambda: all(is_gone(pid) for pid in task_pids), timeout=5, what="the dead client's tasks to die")
    assert time.monotonic() - t0 < 4
    replaced = wait_until(lambda: (c := agent_children(agent)) and len(c) == 2 and c, what="replacements")
    assert not replaced & task_pids
    with _executor(cluster, name="next-client") as ex:
        t0 = time.monotonic()
        assert [f.result(timeout=RESULT_TIMEOUT) for f in [ex.submit(square, i) for i in range(4)]] == \
            [0, 1, 4, 9]
        assert time.monotonic() - t0 < 5, "the workers must be free at once, not after the 30 s tasks"
        info = ex.cluster_info()
        assert info["queued"] == 0
        assert [c["name"] for c in info["clients"]] == ["next-client"]
        assert info["workers"][0]["busy"] == 0
    # None of the dead client's queued tasks ever ran.
    assert len(list(pids_dir.iterdir())) == 2


# ======================================================================================== 4. poison tasks


def test_poison_task_fails_after_its_budget_and_the_node_survives(cluster, tmp_path):
    agent = cluster.workers[0]
    [node] = cluster.info()["workers"]
    attempts_file = tmp_path / "attempts"
    with _executor(cluster) as ex:
        poison = ex.submit(die_every_time, str(attempts_file))
        others = [ex.submit(sleep_and_ppid, 0.05, i) for i in range(20)]
        with pytest.raises(WorkerLostError, match="killed by SIGKILL while running the task") as info:
            poison.result(timeout=RESULT_TIMEOUT)
        assert info.value.attempts == 3
        pids = [int(line) for line in attempts_file.read_text().split()]
        assert len(pids) == len(set(pids)) == 3
        # The other tasks ran, on the same node, whose agent never went away.
        assert [f.result(timeout=RESULT_TIMEOUT) for f in others] == [(i, agent.pid) for i in range(20)]
        assert agent.poll() is None
        [after] = ex.cluster_info()["workers"]
        assert (after["id"], after["pid"]) == (node["id"], agent.pid)
        assert after["failed"] >= 3
        wait_until(lambda: len(agent_children(agent.pid)) == 2, what="the node to be whole again")
        assert not set(pids) & agent_children(agent.pid)
        assert list(ex.map(square, range(10))) == [x * x for x in range(10)]


@pytest.mark.parametrize("phase", ["unpickling the function", "unpickling the arguments", "running the initializer",
                                   "pickling the result"])
def test_worker_lost_error_names_the_phase_the_process_died_in(cluster, phase):
    kwargs = {"initializer": os._exit, "initargs": (4,)} if phase == "running the initializer" else {}
    with _executor(cluster, **kwargs) as ex:
        if phase == "unpickling the function":
            future = ex.options(retries=0).submit(CallableThatExitsWhenUnpickled())
        elif phase == "unpickling the arguments":
            future = ex.options(retries=0).submit(return_value, ExitWhenUnpickled())
        elif phase == "running the initializer":
            future = ex.options(retries=0).submit(square, 3)
        else:
            future = ex.options(retries=0).submit(return_exit_when_pickled)
        with pytest.raises(WorkerLostError, match=f"exited with code \\d+ while {phase} ") as info:
            future.result(timeout=RESULT_TIMEOUT)
        assert info.value.exitcode in (4, 5, 6, 7)
        assert info.value.attempts == 1
    with _executor(cluster) as ex:
        assert ex.submit(square, 4).result(timeout=RESULT_TIMEOUT) == 16


# ======================================================================================== 5. per-task options


def test_timeout_fails_with_task_timeout_replaces_the_process_and_leaves_other_tasks_alone(cluster, tmp_path):
    agent = cluster.workers[0].pid
    pids_dir = tmp_path / "pids"
    pids_dir.mkdir()
    with _executor(cluster) as ex:
        others = [ex.submit(sleep_and_ppid, 0.1, i) for i in range(10)]
        t0 = time.monotonic()
        slow = ex.options(timeout=0.5).submit(write_pid_and_sleep, str(pids_dir), "slow", 30)
        with pytest.raises(TaskTimeout, match="time limit of 0.5 s") as info:
            slow.result(timeout=RESULT_TIMEOUT)
        elapsed = time.monotonic() - t0
        assert isinstance(info.value, TimeoutError)
        assert 0.5 <= elapsed < 0.5 + 3.5, f"took {elapsed:.2f} s"
        [pid_file] = pids_dir.iterdir()  # ran once: a time limit is not retried
        slow_pid = _pid_of(pid_file)
        wait_until(lambda: is_gone(slow_pid), what="the timed-out process to be killed")
        wait_until(lambda: (c := agent_children(agent)) and len(c) == 2 and slow_pid not in c,
                    what="its replacement")
        assert [f.result(timeout=RESULT_TIMEOUT)[0] for f in others] == list(range(10))
        # Quick tasks under a limit are unaffected by it, and the executor is still usable.
        assert list(ex.options(timeout=5).map(square, range(10))) == [x * x for x in range(10)]
        assert ex.submit(square, 12).result(timeout=RESULT_TIMEOUT) == 144


def test_timeout_in_a_map_raises_task_timeout_at_the_slow_item(cluster, tmp_path):
    markers = tmp_path / "markers"
    markers.mkdir()
    with _executor(cluster) as ex:
        got = []
        t0 = time.monotonic()
        with pytest.raises(TaskTimeout):
            for value in ex.options(timeout=1).map(slow_at, range(6), [3] * 6, [str(markers)] * 6):
                got.append(value)
        assert time.monotonic() - t0 < 1 + 4.0
        assert got == [0, 10, 20]
        assert {p.name for p in markers.iterdir()} >= {"3"}
        assert list(ex.map(square, range(5))) == [0, 1, 4, 9, 16]


def test_retries_zero_fails_at_the_first_death_and_the_default_budget_recovers(cluster, tmp_path):
    with _executor(cluster) as ex:
        marker = tmp_path / "once"
        with pytest.raises(WorkerLostError, match="exited with code 3 while running the task") as info:
            ex.options(retries=0).submit(die_on_first_attempt, str(marker), "x").result(timeout=RESULT_TIMEOUT)
        assert info.value.attempts == 1
        assert marker.exists()
        marker2 = tmp_path / "twice"
        assert ex.submit(die_on_first_attempt, str(marker2), "recovered").result(timeout=RESULT_TIMEOUT) == "recovered"
        marker3 = tmp_path / "thrice"
        assert ex.options(retries=1).submit(die_on_first_attempt, str(marker3), "ok").result(
            timeout=RESULT_TIMEOUT) == "ok"


def test_kill_a_running_task(cluster, tmp_path):
    agent = cluster.workers[0].pid
    pids_dir = tmp_path / "pids"
    pids_dir.mkdir()
    with _executor(cluster) as ex:
        future = ex.submit(write_pid_and_sleep, str(pids_dir), "victim", 30)
        neighbour = ex.submit(sleep_and_ppid, 0.5, "neighbour")
        pid = _pid_of(wait_until(lambda: list(pids_dir.iterdir()), what="the task to start")[0])
        t0 = time.monotonic()
        assert ex.kill(future) is True
        with pytest.raises(TaskKilled, match="killed while running") as info:
            future.result(timeout=RESULT_TIMEOUT)
        assert time.monotonic() - t0 < 4
        assert isinstance(info.value, CancelledError)
        wait_until(lambda: is_gone(pid), what="the killed task's process to go")
        wait_until(lambda: (c := agent_children(agent)) and len(c) == 2 and pid not in c, what="its replacement")
        assert neighbour.result(timeout=RESULT_TIMEOUT) == ("neighbour", agent)
        assert ex.kill(future) is False  # already done
        assert ex.kill(neighbour) is False
        assert ex.submit(square, 3).result(timeout=RESULT_TIMEOUT) == 9


def test_kill_a_queued_task_it_never_runs(cluster, tmp_path):
    release = tmp_path / "release"
    with _executor(cluster) as ex:
        blockers = [ex.submit(wait_for_file, str(release), 20) for _ in range(2)]
        wait_until(lambda: all(f.running() for f in blockers), what="both processes to be busy")
        queued = [ex.submit(touch_and_return, str(tmp_path / f"ran-{i}"), i) for i in range(6)]
        # Two wait prefetched on the node, four in the master's queue: kill one of each.
        cluster.wait_for(lambda i: i["queued_at_master"] == 4 and i["workers"][0]["assigned"] == 4,
                         what="the queue to settle")
        try:
            assert ex.kill(queued[0]) is True
            assert ex.kill(queued[5]) is True
            for f in (queued[0], queued[5]):
                with pytest.raises(TaskKilled, match="before it started"):
                    f.result(timeout=RESULT_TIMEOUT)
        finally:
            release.touch()
        assert [f.result(timeout=RESULT_TIMEOUT) for f in queued[1:5]] == [1, 2, 3, 4]
        for f in blockers:
            f.result(timeout=RESULT_TIMEOUT)
        assert not (tmp_path / "ran-0").exists()
        assert not (tmp_path / "ran-5").exists()
        assert all((tmp_path / f"ran-{i}").exists() for i in range(1, 5))


def test_terminate_workers_on_a_busy_executor_stops_everything_at_once(cluster, tmp_path):
    agent = cluster.workers[0].pid
    pids_dir = tmp_path / "pids"
    pids_dir.mkdir()
    ex = cluster.executor(name="terminated")
    try:
        futures = [ex.submit(write_pid_and_sleep, str(pids_dir), i, 30) for i in range(10)]
        files = wait_until(lambda: (f := list(pids_dir.iterdir())) and len(f) == 2 and f, what="two tasks to start")
        task_pids = {_pid_of(p) for p in files}
        t0 = time.monotonic()
        ex.terminate_workers()
        assert time.monotonic() - t0 < 5
        assert all(f.done() for f in futures)
        for f in futures:
            assert f.cancelled() or isinstance(f.exception(), TaskKilled)
        assert sum(isinstance(f.exception(), TaskKilled) for f in futures if not f.cancelled()) >= 2
        with pytest.raises(RuntimeError, match="after shutdown"):
            ex.submit(square, 1)
        wait_until(lambda: all(is_gone(pid) for pid in task_pids), timeout=3, what="the running tasks to die")
        cluster.wait_for(lambda i: i["workers"][0]["busy"] == 0 and i["queued"] == 0
                         and not any(c["name"] == "terminated" for c in i["clients"]), what="the cluster to be idle")
        assert len(list(pids_dir.iterdir())) == 2  # nothing queued ever started
    finally:
        ex.shutdown(wait=False)
    wait_until(lambda: len(agent_children(agent)) == 2, what="replacement processes")
    with _executor(cluster) as other:
        t0 = time.monotonic()
        assert other.submit(square, 8).result(timeout=RESULT_TIMEOUT) == 64
        assert time.monotonic() - t0 < 5, "the workers must be free at once, not after the 30 s tasks"


def test_terminate_workers_in_local_mode_leaves_no_process_behind(tmp_path):
    pids_dir = tmp_path / "pids"
    pids_dir.mkdir()
    ex = ClusterExecutor(max_workers=2)
    try:
        local = ex._local.process
        futures = [ex.submit(write_pid_and_sleep, str(pids_dir), i, 30) for i in range(6)]
        wait_until(lambda: len(list(pids_dir.iterdir())) == 2, what="two tasks to start")
        family = [local.pid, *(p.pid for p in psutil.Process(local.pid).children(recursive=True))]
        assert len(family) >= 3
        t0 = time.monotonic()
        ex.terminate_workers()
        assert time.monotonic() - t0 < 5
        assert all(f.done() for f in futures)
        assert local.poll() is not None
        wait_until(lambda: all(is_gone(pid) for pid in family), timeout=3, what="every local process to go")
        assert not [c for c in psutil.Process().children(recursive=True) if c.pid in family]
    finally:
        ex.shutdown(wait=False)
        if ex._local.process.poll() is None:
            ex._local.process.kill()
            ex._local.process.wait()


@pytest.mark.parametrize("kwargs", [{"timeout": -1}, {"timeout": 0}, {"timeout": float("nan")}, {"timeout": "5"},
                                    {"retries": -1}, {"retries": 1.5}, {"retries": True}])
def test_invalid_task_options_raise_value_error(cluster, kwargs):
    with _executor(cluster) as ex:
        with pytest.raises(ValueError):
            ex.options(**kwargs)
        with pytest.raises(ValueError):
            ex.options(timeout=1).options(**kwargs)
        assert ex.options(timeout=5, retries=0).submit(square, 2).result(timeout=RESULT_TIMEOUT) == 4


# ======================================================================================== 6. a hostile master


def _random_non_frame() -> bytes:
    """Random bytes a FrameReader rejects at once (checked here, so the case is deterministic)."""
    rng = random.Random(1234)
    while True:
        data = rng.randbytes(4096)
        try:
            P.FrameReader().feed(data)
        except P.ProtocolError:
            return data


GARBAGE = {
    "random bytes": _random_non_frame(),
    "unknown message type": P.encode_bytes({"t": "format_disk", "now": True}),
    "oversized header length": struct.pack("!HI", 0, 0xFFFFFFFF),
    "oversized buffer length": struct.pack("!HIQ", 1, 10, 1 << 62),
    "header that is not JSON": struct.pack("!HI", 0, 5) + b"{{{{{",
    "malformed tasks message": P.encode_bytes({"t": "tasks", "tasks": [["x", 1]]}),
    "number too large for an id": struct.pack("!HI", 0, 26) + b'{"t":"drop","ids":[1e400]}',
}


class FakeMaster:
    """A TCP server that passes the real server side of the handshake with the right key, reads the agent's
    hello, and then behaves badly. `first(conn)` runs on the first connection, `later(conn)` on the others;
    each returns after the agent has closed the connection (or 5 s)."""

    def __init__(self, key: bytes, first, later):
        self.key = key
        self.first = first
        self.later = later
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.listener.settimeout(0.2)
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.connections = 0
        self.closed_by_agent = 0
        self.hellos: list[dict] = []
        self.errors: list[BaseException] = []
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            with conn:
                conn.settimeout(5)
                try:
                    challenge = P.new_challenge()
                    conn.sendall(P.server_hello(challenge))
                    verdict = P.server_check(self.key, challenge, recv_exact(conn, P.CLIENT_PROOF.size))
                    assert verdict.startswith(P.VERDICT_OK)
                    conn.sendall(verdict)
                    hello = read_frame(conn)
                    self.hellos.append(hello.header)
                    (self.first if self.connections == 1 else self.later)(conn)
                    if _closed_by_peer(conn):
                        self.closed_by_agent += 1
                except (OSError, AssertionError, P.ProtocolError) as e:
                    self.errors.append(e)

    def close(self) -> None:
        self._stop = True
        self._thread.join(10)
        self.listener.close()


def _closed_by_peer(conn: socket.socket, within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    conn.settimeout(0.2)
    while time.monotonic() < deadline:
        try:
            if conn.recv(65536) == b"":
                return True
        except ConnectionResetError:
            return True
        except TimeoutError:
            continue
    return False


def _start_agent(address: str, key_file: Path, log_path: Path, *extra: str) -> subprocess.Popen:
    log = open(log_path, "ab")
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "clusterexec.worker", address, "--nprocs", "1", "--authkey-file", str(key_file),
             *extra], stdout=log, stderr=subprocess.STDOUT, env=_env())
    finally:
        log.close()


@pytest.fixture
def key_file(tmp_path):
    key = os.urandom(16).hex()
    path = tmp_path / "fake.key"
    path.write_text(key)
    path.chmod(0o600)
    return path


@pytest.mark.parametrize("welcomed", [True, False], ids=["after-welcome", "instead-of-welcome"])
@pytest.mark.parametrize("case", list(GARBAGE))
def test_agent_closes_a_connection_carrying_garbage_logs_it_retries_and_gives_up_after_the_window(
        tmp_path, key_file, case, welcomed):
    garbage = GARBAGE[case]

    def first(conn):
        if welcomed:
            conn.sendall(P.encode_bytes({"t": "welcome", "id": 1}))
            time.sleep(0.2)
        conn.sendall(garbage)

    def later(conn):
        conn.sendall(garbage)  # never a welcome again: the agent's window runs out

    fake = FakeMaster(key_file.read_text().encode(), first, later)
    log_path = tmp_path / "agent.log"
    agent = _start_agent(fake.address, key_file, log_path, "--reconnect-window", "1", "--connect-timeout", "1")
    try:
        t0 = time.monotonic()
        code = agent.wait(15)
        elapsed = time.monotonic() - t0
    finally:
        reap(agent)
        fake.close()
    log = _read(log_path)
    assert code == 1, log
    assert elapsed < 8, f"the agent took {elapsed:.1f} s to give up:\n{log}"
    assert "Traceback" not in log and "Fatal error" not in log, log
    assert fake.hellos and fake.hellos[0]["role"] == "worker"
    assert fake.connections >= 2, f"the agent must try again after closing a bad connection:\n{log}"
    assert fake.closed_by_agent >= 1, log
    assert "closing connection from 127.0.0.1" in log, log
    if welcomed:
        assert "lost the connection to the master" in log
        assert "did not come back within 1 s" in log
    else:
        assert "cannot reach the master" in log
    # Its task process did not outlive it.
    assert not [p for p in psutil.Process().children(recursive=True) if p.ppid() == agent.pid]


def test_agent_presumes_a_silent_master_lost_and_reconnects(tmp_path, key_file):
    def first(conn):
        conn.sendall(P.encode_bytes({"t": "welcome", "id": 1, "heartbeat": [0.2, 1.0]}))
        conn.sendall(b"\0\0")  # the start of a frame, then silence

    def later(conn):
        conn.close()

    fake = FakeMaster(key_file.read_text().encode(), first, later)
    log_path = tmp_path / "agent.log"
    agent = _start_agent(fake.address, key_file, log_path, "--reconnect-window", "1")
    try:
        code = agent.wait(15)
    finally:
        reap(agent)
        fake.close()
    log = _read(log_path)
    assert code == 1, log
    assert "no word from the master for 1." in log, log
    assert fake.connections >= 2 and fake.closed_by_agent >= 1, log
    assert "Traceback" not in log


class _Unresponsive:
    """A port on 127.0.0.1 where a master seems to be and does not answer. "syns dropped": its accept queue
    is full, so the kernel drops connection attempts (as for a host that went down); "mute": connections are
    accepted by the kernel and then nothing is ever said (as by a frozen master). With `welcome_first`, the
    first connection gets a real handshake and welcome, then is closed and the port goes unresponsive."""

    def __init__(self, kind: str, key: bytes, welcome_first: bool):
        self.kind = kind
        self.key = key
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(0 if kind == "syns dropped" else 16)
        self.port = self.listener.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self.fillers: list[socket.socket] = []
        self.welcomed = threading.Event()
        self.thread = None
        if welcome_first:
            self.thread = threading.Thread(target=self._serve_once, daemon=True)
            self.thread.start()
        else:
            self._go_unresponsive()

    def _serve_once(self) -> None:
        self.listener.settimeout(10)
        conn, _ = self.listener.accept()
        with conn:
            challenge = P.new_challenge()
            conn.sendall(P.server_hello(challenge))
            conn.sendall(P.server_check(self.key, challenge, recv_exact(conn, P.CLIENT_PROOF.size)))
            read_frame(conn)
            conn.sendall(P.encode_bytes({"t": "welcome", "id": 1}))
            time.sleep(0.3)
            self._go_unresponsive()
            self.welcomed.set()

    def _go_unresponsive(self) -> None:
        if self.kind == "syns dropped":
            for _ in range(3):
                s = socket.socket()
                s.setblocking(False)
                try:
                    s.connect(("127.0.0.1", self.port))
                except BlockingIOError:
                    pass
                self.fillers.append(s)
            time.sleep(0.2)

    def close(self) -> None:
        if self.thread is not None:
            self.thread.join(10)
        for s in self.fillers:
            s.close()
        self.listener.close()


@pytest.mark.parametrize("welcomed", [False, True], ids=["connecting", "reconnecting"])
@pytest.mark.parametrize("kind", ["syns dropped", "mute"])
def test_agent_gives_up_on_an_unresponsive_master_within_its_window(tmp_path, key_file, kind, welcomed):
    """Neither a connect attempt that the kernel would retry for two minutes nor a master that accepts and
    never answers may keep the agent past --connect-timeout / --reconnect-window."""
    target = _Unresponsive(kind, key_file.read_text().encode(), welcome_first=welcomed)
    log_path = tmp_path / "agent.log"
    try:
        if kind == "syns dropped" and not welcomed:
            with socket.socket() as probe:
                probe.settimeout(0.5)
                with pytest.raises(TimeoutError):
                    probe.connect(("127.0.0.1", target.port))  # the premise: connection attempts vanish
        agent = _start_agent(target.address, key_file, log_path, "--connect-timeout", "1", "--reconnect-window", "1")
        try:
            if welcomed:
                assert target.welcomed.wait(10)
            t0 = time.monotonic()
            code = agent.wait(10)
            elapsed = time.monotonic() - t0
        finally:
            reap(agent)
    finally:
        target.close()
    log = _read(log_path)
    assert code == 1, log
    assert elapsed < 1 + 4.0, f"took {elapsed:.1f} s to give up:\n{log}"
    assert ("did not come back within 1 s" if welcomed else "cannot reach the master") in log, log
    assert "Traceback" not in log, log


# ======================================================================================== 7. network partition


class _NetNS:
    def __init__(self):
        tag = f"{os.getpid() % 100000}"
        self.name = f"cxtest{tag}"
        self.veth_host = f"cxh{tag}"
        self.veth_ns = f"cxn{tag}"
        octet = os.getpid() % 250 + 1
        self.host_ip = f"10.213.{octet}.1"
        self.ns_ip = f"10.213.{octet}.2"

    def ip(self, *args: str, ns: bool = False) -> None:
        cmd = ["ip", "netns", "exec", self.name, "ip", *args] if ns else ["ip", *args]
        subprocess.run(cmd, check=True, capture_output=True, timeout=10)

    def create(self) -> None:
        self.ip("netns", "add", self.name)
        self.ip("link", "add", self.veth_host, "type", "veth", "peer", "name", self.veth_ns)
        self.ip("link", "set", self.veth_ns, "netns", self.name)
        self.ip("addr", "add", f"{self.host_ip}/30", "dev", self.veth_host)
        self.ip("link", "set", self.veth_host, "up")
        self.ip("addr", "add", f"{self.ns_ip}/30", "dev", self.veth_ns, ns=True)
        self.ip("link", "set", self.veth_ns, "up", ns=True)
        self.ip("link", "set", "lo", "up", ns=True)

    def remove(self) -> None:
        subprocess.run(["ip", "link", "del", self.veth_host], capture_output=True, timeout=10)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=10)

    def drop_traffic(self) -> None:
        """A partition as a failed switch makes one: every packet between the two ends vanishes, with no error
        and no RST for anyone (unlike a link set down, whose routes go and whose connects fail at once). The
        rules live in the namespace, and go with it."""
        rules = (f"table inet {self.name} {{\n"
                 f"  chain in {{ type filter hook input priority 0; policy accept; ip saddr {self.host_ip} drop; }}\n"
                 f"  chain out {{ type filter hook output priority 0; policy accept; ip daddr {self.host_ip} drop; }}\n"
                 "}\n")
        subprocess.run(["ip", "netns", "exec", self.name, "nft", "-f", "-"], input=rules.encode(), check=True,
                       capture_output=True, timeout=10)

    def let_traffic_through(self) -> None:
        subprocess.run(["ip", "netns", "exec", self.name, "nft", "delete", "table", "inet", self.name],
                       capture_output=True, timeout=10)


@pytest.fixture
def netns():
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 to create a network namespace")
    ns = _NetNS()
    try:
        ns.create()
    except (subprocess.CalledProcessError, OSError) as e:
        ns.remove()
        pytest.skip(f"cannot create a network namespace here: {e}")
    try:
        yield ns
    finally:
        ns.remove()


class _NsCluster(Cluster):
    """A cluster whose master listens on the host end of a private veth link (reachable from the namespace)."""

    host = "127.0.0.1"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def test_partitioned_node_is_given_up_on_its_tasks_rerun_and_it_rejoins_when_the_network_heals(netns, tmp_path):
    cluster = _NsCluster(tmp_path)
    cluster.host = netns.host_ip
    cut_off = None
    try:
        cluster.start_master(0, *FAST_BEAT, "--host", netns.host_ip)
        healthy = cluster.start_worker(2)
        log_path = tmp_path / "partitioned.log"
        log = open(log_path, "ab")
        before = len(cluster.info()["workers"])
        cut_off = subprocess.Popen(
            ["ip", "netns", "exec", netns.name, sys.executable, "-m", "clusterexec.worker", cluster.address,
             "--nprocs", "2", "--authkey-file", str(cluster.key_file)],
            stdout=log, stderr=subprocess.STDOUT, env=_env())
        log.close()
        info = cluster.wait_for(lambda i: len(i["workers"]) > before, what="the namespaced node to join")
        old_ids = _worker_ids(info, cut_off.pid)
        assert old_ids, "`ip netns exec` runs the agent under its own pid"
        starts = tmp_path / "starts"
        starts.mkdir()
        n = 8
        with _executor(cluster, name="partition-test") as ex:
            futures = [ex.submit(record_and_sleep_longer_on, str(starts), x, cut_off.pid, 10, 0.5)
                       for x in range(n)]
            calls = _count_calls(futures)
            wait_until(lambda: any(ppid == cut_off.pid for _, ppid, _ in _started(starts)),
                        what="a task to start on the namespaced node")
            netns.ip("link", "set", netns.veth_ns, "down", ns=True)  # the partition: no FIN, no RST, silence
            t0 = time.monotonic()
            try:
                results = [f.result(timeout=RESULT_TIMEOUT) for f in futures]
                elapsed = time.monotonic() - t0
                assert [r[0] for r in results] == [x * x for x in range(n)]
                assert elapsed < BEAT_TIMEOUT + 0.5 + 5.5, f"took {elapsed:.1f} s"
                on_cut_off = {x for x, ppid, _ in _started(starts) if ppid == cut_off.pid}
                assert all(results[x][1] == healthy.pid for x in on_cut_off)
                _wait_for_log(cluster.log_dir / "master.log", "stopped answering", within=2)
                # Its side gives up on the silent master too, and stops the tasks it was running.
                _wait_for_log(log_path, "no word from the master", within=BEAT_TIMEOUT + 2)
                stale = {pid for _, ppid, pid in _started(starts) if ppid == cut_off.pid}
                wait_until(lambda: all(is_gone(pid) for pid in stale), what="the cut-off node's tasks to stop")
            finally:
                netns.ip("link", "set", netns.veth_ns, "up", ns=True)
            info = cluster.wait_for(lambda i: _worker_ids(i, cut_off.pid), what="the healed node to rejoin")
            assert _worker_ids(info, cut_off.pid) != old_ids
            time.sleep(1.0)
            assert all(calls[i] == 1 for i in range(n)), calls
            assert _our_client(ex.cluster_info(), "partition-test")["done"] == n
    finally:
        if cut_off is not None:
            stop_gently(cut_off)
        cluster.stop()


# The kernel sends a connect's SYNs at 0, 1, 2, 3, 4, 5, 7, 11, 19, 35, then 67 s (Linux 6.x, measured; at 0, 1,
# 3, 7, 15, 31, then 63 s before): a connect attempt left to the kernel misses a network healed in between.
LAST_SYN = 36.0


@pytest.mark.timeout(LAST_SYN + 60)
def test_a_node_cut_off_past_the_kernels_last_syn_rejoins_within_2_s_of_the_heal(netns, tmp_path):
    if shutil.which("nft") is None:
        pytest.skip("needs nft (Debian package nftables; .ci/run installs it) to drop packets silently")
    cluster = _NsCluster(tmp_path)
    cluster.host = netns.host_ip
    log_path = tmp_path / "partitioned.log"
    node = None
    try:
        cluster.start_master(0, *FAST_BEAT, "--host", netns.host_ip)
        log = open(log_path, "ab")
        node = subprocess.Popen(
            ["ip", "netns", "exec", netns.name, sys.executable, "-m", "clusterexec.worker", cluster.address,
             "--nprocs", "1", "--authkey-file", str(cluster.key_file)],
            stdout=log, stderr=subprocess.STDOUT, env=_env())
        log.close()
        info = cluster.wait_for(lambda i: _worker_ids(i, node.pid), what="the namespaced node to join")
        old_ids = _worker_ids(info, node.pid)
        netns.drop_traffic()
        try:
            _wait_for_log(log_path, "no word from the master", within=BEAT_TIMEOUT + 3)
            _wait_for_log(cluster.log_dir / "master.log", "stopped answering", within=2)
            # It tries to reconnect from now on. The partition outlasts the kernel's SYNs of a first attempt.
            time.sleep(LAST_SYN + 1)
        finally:
            netns.let_traffic_through()
        healed = time.monotonic()
        try:
            cluster.wait_for(lambda i: _worker_ids(i, node.pid) not in ([], old_ids), timeout=10,
                             what="the node to rejoin")
        except TimeoutError:
            pytest.fail(f"the node had not rejoined 10 s after the network healed:\n{_read(log_path)}")
        took = time.monotonic() - healed
        assert took < 2.0, f"the node rejoined {took:.1f} s after the network healed:\n{_read(log_path)}"
        with _executor(cluster) as ex:
            assert ex.submit(os.getppid).result(timeout=RESULT_TIMEOUT) == node.pid
        assert "Traceback" not in _read(log_path)
    finally:
        netns.let_traffic_through()
        if node is not None:
            stop_gently(node)
        cluster.stop()


CLIENT_TIMEOUT = 3.0


def _client_in(netns, cluster, submit: str) -> subprocess.Popen:
    """A client run inside the namespace: `submit` (an expression over `ex`) gives its Futures; returns once
    the first has started."""
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(HERE)!r})
        from clusterexec import ClusterExecutor
        from test_resilience import bytes_once_open, write_pid_and_sleep
        ex = ClusterExecutor({cluster.address!r}, authkey={cluster.key!r}, name="cut-off")
        futures = {submit}
        while not futures[0].running():
            time.sleep(0.01)
        print("running", flush=True)
        time.sleep(60)
    """)
    client = subprocess.Popen(["ip", "netns", "exec", netns.name, sys.executable, "-c", script],
                              stdout=subprocess.PIPE, env=_env())
    try:
        assert client.stdout.readline().strip() == b"running"
    except BaseException:
        reap(client)
        raise
    return client


def test_a_client_cut_off_by_the_network_is_given_up_on_and_others_get_its_workers(netns, tmp_path):
    # A client whose machine vanishes sends no FIN: without a limit the master would keep its tasks, running
    # and queued, until TCP gave up (about 15 minutes), holding the workers from everyone else.
    cluster = _NsCluster(tmp_path)
    cluster.host = netns.host_ip
    pids_dir = tmp_path / "pids"
    pids_dir.mkdir()
    cut_off = None
    try:
        cluster.start_master(0, *FAST_BEAT, "--client-timeout", str(CLIENT_TIMEOUT), "--host", netns.host_ip)
        agent = cluster.start_worker(1).pid
        cut_off = _client_in(netns, cluster, f"[ex.submit(write_pid_and_sleep, {str(pids_dir)!r}, i, 30) "
                                             "for i in range(3)]")
        [task_pid] = wait_until(lambda: [_pid_of(p) for p in pids_dir.iterdir()], what="the first task's pid file")
        assert task_pid in agent_children(agent)
        netns.ip("link", "set", netns.veth_ns, "down", ns=True)  # the partition: no FIN, no RST, silence
        t0 = time.monotonic()
        with _executor(cluster, name="next-client") as ex:
            assert ex.submit(square, 7).result(timeout=CLIENT_TIMEOUT + 10) == 49
            assert time.monotonic() - t0 < CLIENT_TIMEOUT + 4, "the worker must be free once the client is given up"
            assert [c["name"] for c in ex.cluster_info()["clients"]] == ["next-client"]
        assert is_gone(task_pid)  # its running task was killed
        assert len(list(pids_dir.iterdir())) == 1  # and its queued ones never ran
        _wait_for_log(cluster.log_dir / "master.log", "stopped acknowledging", within=2)
    finally:
        netns.ip("link", "set", netns.veth_ns, "up", ns=True)
        if cut_off is not None:
            reap(cut_off)
        cluster.stop()


def test_a_client_given_up_on_leaves_nothing_held_for_it_in_the_master(netns, tmp_path):
    # A result on its way to a client whose machine is gone can never leave: the master drops it with the
    # connection, rather than keep both until TCP gives up (a quarter of an hour).
    cluster = _NsCluster(tmp_path)
    cluster.host = netns.host_ip
    gate = tmp_path / "gate"
    cut_off = None
    try:
        master = cluster.start_master(0, *FAST_BEAT, "--client-timeout", str(CLIENT_TIMEOUT), "--host",
                                      netns.host_ip)
        cluster.start_worker(1)
        cut_off = _client_in(netns, cluster, f"[ex.submit(bytes_once_open, {str(gate)!r}, 0, 32 << 20)]")

        def to_the_client():
            return [c for c in psutil.Process(master.pid).net_connections("tcp")
                    if c.raddr and c.raddr.ip == netns.ns_ip]

        assert to_the_client()
        netns.ip("link", "set", netns.veth_ns, "down", ns=True)
        gate.touch()  # its 32 MiB result reaches the master, which cannot pass it on
        _wait_for_log(cluster.log_dir / "master.log", "stopped acknowledging", within=CLIENT_TIMEOUT + 5)
        wait_until(lambda: not to_the_client(), timeout=2, what="the master to let go of the connection")
    finally:
        netns.ip("link", "set", netns.veth_ns, "up", ns=True)
        if cut_off is not None:
            reap(cut_off)
        cluster.stop()


def test_a_client_cut_off_for_longer_than_its_heartbeat_resumes_its_session_and_nothing_runs_twice(netns, tmp_path):
    # The client gives up on the silent connection and reconnects once the network heals; the master still
    # holds its session: its queued and running tasks stay, the results that finished meanwhile are delivered
    # once, and nothing is run a second time.
    cluster = _NsCluster(tmp_path)
    cluster.host = netns.host_ip
    starts = tmp_path / "starts"
    starts.mkdir()
    n = 24
    client = None
    try:
        cluster.start_master(0, *FAST_BEAT, "--host", netns.host_ip)
        cluster.start_worker(2)
        script = textwrap.dedent(f"""
            import sys, time
            sys.path.insert(0, {str(HERE)!r})
            from clusterexec import ClusterExecutor
            from test_resilience import record_and_sleep
            with ClusterExecutor({cluster.address!r}, authkey={cluster.key!r}, name="resumer") as ex:
                futures = [ex.submit(record_and_sleep, {str(starts)!r}, x, 0.25) for x in range({n})]
                while not futures[0].running():
                    time.sleep(0.01)
                print("running", flush=True)
                print([f.result(timeout=60)[0] for f in futures] == [x * x for x in range({n})], flush=True)
        """)
        client = subprocess.Popen(["ip", "netns", "exec", netns.name, sys.executable, "-c", script],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
        assert client.stdout.readline().strip() == b"running"
        netns.ip("link", "set", netns.veth_ns, "down", ns=True)  # the partition: no FIN, no RST, silence
        try:
            # Past the client's heartbeat timeout: it gives up on the connection and tries to reconnect.
            wait_until(lambda: len(list(starts.iterdir())) >= n, timeout=BEAT_TIMEOUT + 10,
                       what="every task to start while the client is cut off")
            time.sleep(BEAT_TIMEOUT + 1)
        finally:
            netns.ip("link", "set", netns.veth_ns, "up", ns=True)
        out, err = client.communicate(timeout=30)
        assert out.strip() == b"True", err.decode()
        assert "reconnected" in err.decode(), err.decode()  # it did lose the connection
        runs = Counter(int(p.name.split("-")[0]) for p in starts.iterdir())
        assert runs == Counter(range(n)), f"tasks run more than once: {sorted(x for x in runs if runs[x] > 1)}"
    finally:
        netns.ip("link", "set", netns.veth_ns, "up", ns=True)
        if client is not None:
            reap(client)
        cluster.stop()


@pytest.mark.parametrize("value", ["-1", "inf", "nan", "soon", "1.5"])  # (1.5: not over twice the 1 s pings)
def test_the_master_refuses_a_client_timeout_that_is_no_number_of_seconds(value):
    done = subprocess.run([sys.executable, "-m", "clusterexec.master", "--port", "0", "--authkey", "k" * 32,
                           "--client-timeout", value], capture_output=True, text=True, timeout=20, env=_env())
    assert done.returncode == 2
    assert "--client-timeout" in done.stderr


def bytes_once_open(gate, i, size):
    """Waits for the file `gate`, then returns `size` bytes."""
    while not os.path.exists(gate):
        time.sleep(0.01)
    return bytes([i % 256]) * size


@pytest.mark.parametrize("pending", ["pings", "results"])
def test_a_frozen_client_is_not_given_up_on_its_machine_still_acknowledges(tmp_path, pending):
    # Stopped (Ctrl-Z, a debugger), its kernel still acknowledges: the pings, or, once more results wait for
    # it than its socket holds, the master's probes of its closed receive window.
    cluster = Cluster(tmp_path)
    client = None
    gate = tmp_path / "gate"
    n, size = (40, 1 << 20) if pending == "results" else (1, 10)
    try:
        cluster.start_master(0, *FAST_BEAT, "--client-timeout", "1.5")
        cluster.start_worker(1)
        script = textwrap.dedent(f"""
            import sys, time
            sys.path.insert(0, {str(HERE)!r})
            from clusterexec import ClusterExecutor
            from test_resilience import bytes_once_open
            with ClusterExecutor({cluster.address!r}, authkey={cluster.key!r}) as ex:
                futures = [ex.submit(bytes_once_open, {str(gate)!r}, i, {size}) for i in range({n})]
                while not futures[0].running():
                    time.sleep(0.01)
                print("running", flush=True)
                values = [f.result(timeout=60) for f in futures]
                print(all(v == bytes([i % 256]) * {size} for i, v in enumerate(values)), flush=True)
        """)
        client = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, env=_env())
        assert client.stdout.readline().strip() == b"running"
        client.send_signal(signal.SIGSTOP)
        try:
            gate.touch()  # the tasks finish while it is stopped: their results wait for it
            time.sleep(8)  # the master's probes of its window back off to seconds apart, past the timeout
        finally:
            client.send_signal(signal.SIGCONT)
        assert client.stdout.readline().strip() == b"True"
        assert client.wait(20) == 0
        stderr = client.stderr.read().decode()
        assert "lost the connection" not in stderr, stderr  # never cut off, so nothing was run twice
        assert "stopped acknowledging" not in _read(cluster.log_dir / "master.log")
    finally:
        if client is not None:
            client.send_signal(signal.SIGCONT)
            reap(client)
        cluster.stop()


def test_a_kill_sent_just_before_the_master_dies_still_holds_after_the_restart(tmp_path):
    cluster = Cluster(tmp_path)
    try:
        cluster.start_master(0)
        port = cluster.port
        cluster.start_worker(1)
        with cluster.executor() as ex:
            future = ex.submit(time.sleep, 30)
            wait_until(future.running, what="the task to start")
            cluster.master.send_signal(signal.SIGSTOP)  # the kill below reaches its socket, never the master
            assert ex.kill(future)
            time.sleep(0.2)
            cluster.master.send_signal(signal.SIGKILL)
            cluster.master.wait(5)
            cluster.start_master(port)
            with pytest.raises(TaskKilled):
                future.result(timeout=20)
    finally:
        cluster.stop()

"""Processes a task starts end with the task: when it returns, when it is killed or times out, when its worker
node stops, and when a local-mode program ends. Whether it started them with Popen or they double-forked into
a session of their own (a daemon), and without harm to the task process, which runs the next task.

Task functions live at module level: worker processes import them by reference (tests/ is on their path).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
from conftest import HERE, _env, reap, wait_until

from clusterexec import TaskKilled, TaskTimeout

pytestmark = pytest.mark.timeout(60)

RESULT_TIMEOUT = 15
GONE_WITHIN = 5.0

# Forks, and the child makes a session of its own and forks again: the grandchild, a daemon, says its pid and
# runs `sleep 300` with its parent long gone, reparented away from the task.
_DAEMONIZE = textwrap.dedent("""
    import os
    if os.fork():
        os._exit(0)
    os.setsid()
    if os.fork():
        os._exit(0)
    print(os.getpid(), flush=True)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.execvp("sleep", ["sleep", "300"])
""")


# ================================================================================================ task functions


def start_leftovers(pid_dir: str) -> dict:
    """Starts `sleep 300` with Popen, and a daemon; returns at once, both still running. Each one's pid is the
    name of a file in `pid_dir` that holds its start time (for the test's cleanup)."""
    child = subprocess.Popen(["sleep", "300"])
    daemon = int(subprocess.run([sys.executable, "-c", _DAEMONIZE], stdout=subprocess.PIPE, check=True,
                                timeout=10).stdout)
    left = []
    for pid in (child.pid, daemon):
        started = psutil.Process(pid).create_time()  # (raises if it is not running)
        Path(pid_dir, str(pid)).write_text(repr(started))
        left.append((pid, started))
    return {"task": os.getpid(), "left": left}


def start_leftovers_and_wait(pid_dir: str) -> None:
    start_leftovers(pid_dir)
    time.sleep(300)


def task_pid() -> int:
    return os.getpid()


# ================================================================================================ helpers


def _recorded(pid_dir: Path) -> list[tuple[int, float]]:
    return [(int(f.name), float(f.read_text())) for f in pid_dir.iterdir() if f.read_text()]


def _running(pid: int, started: float) -> bool:
    """The process `pid` that started at `started` still runs (not a zombie; not another process since)."""
    try:
        p = psutil.Process(pid)
        return p.create_time() == started and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_gone(left: list[tuple[int, float]]) -> None:
    wait_until(lambda: not any(_running(pid, t) for pid, t in left), timeout=GONE_WITHIN,
               what=f"the processes the task left ({[pid for pid, _ in left]}) to be stopped")


@pytest.fixture
def pid_dir(tmp_path):
    """Where the tasks write the pids of what they start; what still runs of it at the end is killed."""
    d = tmp_path / "leftovers"
    d.mkdir()
    try:
        yield d
    finally:
        for pid, started in _recorded(d):
            if _running(pid, started):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def one_process_node(empty_cluster):
    """A master and a worker node of one task process: (cluster, the worker's Popen)."""
    return empty_cluster, empty_cluster.start_worker(1)


# ================================================================================================ tests


def test_processes_a_task_leaves_running_are_stopped_when_it_returns(one_process_node, pid_dir):
    cluster, node = one_process_node
    with cluster.executor() as ex:
        done = ex.submit(start_leftovers, str(pid_dir)).result(timeout=RESULT_TIMEOUT)
        assert len(done["left"]) == 2
        _wait_gone(done["left"])
        # The task process itself lives on, runs the next task, and has reaped what it killed.
        assert ex.submit(task_pid).result(timeout=RESULT_TIMEOUT) == done["task"]
        assert [p.pid for p in psutil.Process(node.pid).children(recursive=True)] == [done["task"]]


def test_processes_of_a_task_killed_for_its_time_limit_are_stopped(one_process_node, pid_dir):
    cluster, _ = one_process_node
    with cluster.executor() as ex:
        future = ex.options(timeout=2, retries=0).submit(start_leftovers_and_wait, str(pid_dir))
        left = wait_until(lambda: len(_recorded(pid_dir)) == 2 and _recorded(pid_dir), timeout=RESULT_TIMEOUT,
                          what="the task to start its processes")
        with pytest.raises(TaskTimeout):
            future.result(timeout=RESULT_TIMEOUT)
        _wait_gone(left)


def test_processes_of_a_killed_task_are_stopped(one_process_node, pid_dir):
    cluster, _ = one_process_node
    with cluster.executor() as ex:
        future = ex.submit(start_leftovers_and_wait, str(pid_dir))
        left = wait_until(lambda: len(_recorded(pid_dir)) == 2 and _recorded(pid_dir), timeout=RESULT_TIMEOUT,
                          what="the task to start its processes")
        assert ex.kill(future)
        with pytest.raises(TaskKilled):
            future.result(timeout=RESULT_TIMEOUT)
        _wait_gone(left)


def test_processes_of_a_running_task_are_stopped_with_its_node(empty_cluster, pid_dir):
    cluster = empty_cluster
    node = cluster.start_worker(1, "--grace", "0.5")
    with cluster.executor() as ex:
        future = ex.submit(start_leftovers_and_wait, str(pid_dir))
        left = wait_until(lambda: len(_recorded(pid_dir)) == 2 and _recorded(pid_dir), timeout=RESULT_TIMEOUT,
                          what="the task to start its processes")
        node.send_signal(signal.SIGTERM)  # it leaves, and hands back its task after its grace period
        assert node.wait(10) == 0
        _wait_gone(left)
        assert ex.kill(future)  # (queued again, with no node to run it)


def test_processes_a_task_started_end_with_a_local_mode_program(pid_dir):
    program = textwrap.dedent(f"""
        import os, sys, time
        sys.path.insert(0, {str(HERE)!r})
        from clusterexec import ClusterExecutor
        from test_leftover_processes import start_leftovers_and_wait
        ex = ClusterExecutor(max_workers=1)
        ex.submit(start_leftovers_and_wait, {str(pid_dir)!r})
        while len(os.listdir({str(pid_dir)!r})) < 2:
            time.sleep(0.01)
        print("started", flush=True)
        sys.stdin.readline()
        os._exit(0)  # the program ends, its task still running
    """)
    proc = subprocess.Popen([sys.executable, "-c", program], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            env=_env())
    try:
        assert proc.stdout.readline().strip() == b"started"
        left = wait_until(lambda: len(_recorded(pid_dir)) == 2 and _recorded(pid_dir), what="the pid files")
        assert all(_running(pid, t) for pid, t in left)
        proc.stdin.close()
        assert proc.wait(10) == 0
        _wait_gone(left)
    finally:
        reap(proc)


def forkserver_pool_map(n: int) -> tuple[int, list[int]]:
    import multiprocessing

    with multiprocessing.get_context("forkserver").Pool(1) as pool:
        return os.getpid(), pool.map(abs, range(-n, 0))


def test_multiprocessing_helpers_serve_the_next_task_in_the_process(one_process_node):
    """multiprocessing's forkserver and resource tracker outlive a task on purpose, for the process's next tasks:
    they are not the task's leftovers (killed, the second task's Pool would fail with ChildProcessError)."""
    cluster, _ = one_process_node
    with cluster.executor() as ex:
        first = ex.submit(forkserver_pool_map, 3).result(timeout=RESULT_TIMEOUT)
        second = ex.submit(forkserver_pool_map, 2).result(timeout=RESULT_TIMEOUT)
    assert first[1] == [3, 2, 1] and second[1] == [2, 1]
    assert first[0] == second[0]

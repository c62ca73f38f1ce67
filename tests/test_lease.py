"""Local mode's short cut: a task submitted while the executor has nothing else in flight runs on a task
process the client borrows from its agent, without the hops through the master (client.py, `_Lease`;
supervisor.py, `Supervisor._on_lender`). Everything a user relies on must hold there as on the master's path:
every way of waiting for a Future, crashes and retries, kills, output, shared memory, the function cache, and
sharing the processes with tasks that go through the master.

Each test first makes sure the executor holds a process (`borrowing`) and that its task really went the
short way (`LEASED`), so that none of them can pass through the master's path by accident.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, as_completed, wait
from pathlib import Path

import pytest
from conftest import die_leaving_a_child_that_holds_the_socket, kill_children_named_in, wait_until

from clusterexec import ClusterExecutor, TaskKilled, WorkerLostError, shm
from clusterexec import client as C
from clusterexec import protocol as P
from clusterexec.executor import _cancel_all

pytestmark = pytest.mark.timeout(120)


def noop():
    return None


def square(x):
    return x * x


def slow_square(x):
    time.sleep(0.3)
    return x * x


def whoami():
    return os.getpid()


def pid_after_a_nap(_):
    time.sleep(0.002)
    return os.getpid()


def identity(x):
    return x


def fail(message):
    raise ValueError(message)


def exit_process(code):
    os._exit(code)


def exit_counting(path, code):
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")
    os._exit(code)


def exit_once(marker, code):
    """Kill the process the first time (the marker does not exist yet), succeed the next."""
    path = Path(marker)
    if not path.exists():
        path.write_text("crashed once")
        os._exit(code)
    return "second time lucky"


def count_run(path, value, nap=0.0):
    with open(path, "a") as f:
        f.write("run\n")
    time.sleep(nap)
    return value


def crash_when_told_once(go, marker):
    path = Path(marker)
    if not path.exists():
        wait_for_file(go)
        path.write_text("crashed once")
        os._exit(3)
    return "ran again"


def start_then_sleep(path, seconds):
    Path(path).touch()
    time.sleep(seconds)


def wait_for_file(path, timeout=60):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(path)
        time.sleep(0.01)
    return os.getpid()


def print_then_wait(go):
    print("tick from the borrowed process", flush=True)
    return wait_for_file(go)


def interval(path, seconds):
    """Record when this task ran, and where."""
    start = time.time()
    time.sleep(seconds)
    Path(path).write_text(f"{os.getpid()} {start} {time.time()}")


def initialized_value():
    return INITIALIZED


def set_initialized(value):
    global INITIALIZED
    INITIALIZED = value


INITIALIZED = None


@pytest.fixture
def ex():
    with ClusterExecutor(max_workers=2) as executor:
        yield executor


def borrowing(ex) -> C._Lease:
    """Run tasks until the executor holds an idle borrowed process, and return it."""
    def held():
        lease = ex._conn._lease
        if lease is None or lease.record is not None:
            ex.submit(noop).result()
            return False
        return True
    wait_until(held, timeout=30, what="the executor to borrow a task process")
    return ex._conn._lease


def leased(ex, fn, *args):
    """Submit on the borrowed process, and check that it went there."""
    borrowing(ex)
    future = ex.submit(fn, *args)
    # (Nobody reads its result before result() is called, or LEASE_LOOK has passed: it is still in flight.)
    assert future._cx_record.state == C.LEASED, "the task went through the master"
    return future


# ------------------------------------------------------------------------------------------ results


def test_sequential_tasks_run_on_the_borrowed_process_with_results_and_exceptions(ex):
    lease = borrowing(ex)
    for i in range(50):
        future = ex.submit(square, i)
        assert future._cx_record.state == C.LEASED
        assert future.running()
        assert not future.cancel(), "a task on a borrowed process has started: it cannot be cancelled"
        assert future.result(timeout=30) == i * i
    assert ex.submit(whoami).result() == lease.pid
    future = leased(ex, fail, "from the borrowed process")
    with pytest.raises(ValueError, match="from the borrowed process") as info:
        future.result(timeout=30)
    assert isinstance(info.value.__cause__, Exception) and "fail" in str(info.value.__cause__)
    offset = 7
    assert leased(ex, lambda x: x + offset, 35).result(timeout=30) == 42
    assert isinstance(leased(ex, fail, "x").exception(timeout=30), ValueError)


def test_executor_without_lender_still_works(monkeypatch):
    monkeypatch.setenv("CLUSTEREXEC_LEND", "0")
    with ClusterExecutor(max_workers=2) as ex:
        assert [ex.submit(square, i).result() for i in range(5)] == [0, 1, 4, 9, 16]
        assert ex._conn._lease is None and ex._conn._lender is None


@pytest.mark.parametrize("how", ["wait", "as_completed", "callback", "done", "asyncio", "shutdown"])
def test_every_way_of_waiting_resolves_a_task_on_the_borrowed_process(tmp_path, how, monkeypatch):
    """Only result() and exception() read the borrowed process's socket themselves; every other way of waiting
    must get the IO thread to read it at once. (Without a waiter the IO thread would read it after LEASE_LOOK:
    made an hour here, so that only the waiting itself can get the result read.)"""
    monkeypatch.setattr(C, "LEASE_LOOK", 3600.0)
    go = tmp_path / "go"
    with ClusterExecutor(max_workers=2) as ex:
        future = leased(ex, wait_for_file, str(go))
        time.sleep(0.2)  # the task runs, and no one calls result()
        go.write_text("")
        if how == "wait":
            done, _ = wait([future], timeout=30, return_when=FIRST_COMPLETED)
            assert done == {future}
        elif how == "as_completed":
            assert next(as_completed([future], timeout=30)) is future
        elif how == "callback":
            seen = []
            future.add_done_callback(seen.append)
            wait_until(lambda: seen == [future], timeout=30, what="the done-callback")
        elif how == "done":
            wait_until(future.done, timeout=30, what="done() to turn true")
        elif how == "asyncio":
            async def main():
                return await asyncio.wait_for(asyncio.wrap_future(future), 30)
            asyncio.run(main())
        elif how == "shutdown":
            ex.shutdown(wait=True)
        assert future.done()
    assert isinstance(future.result(), int)


def test_result_timeout_on_the_borrowed_process_then_the_result(ex, tmp_path):
    go = tmp_path / "go"
    future = leased(ex, wait_for_file, str(go))
    pid = ex._conn._lease.pid
    with pytest.raises(TimeoutError):
        future.result(timeout=0.3)
    assert not future.done()
    go.write_text("")
    assert future.result(timeout=30) == pid
    # The process is still usable on the short way.
    assert leased(ex, square, 9).result(timeout=30) == 81


# ------------------------------------------------------------------------------------------ failures


def test_crash_on_the_borrowed_process_is_retried_through_the_master(ex, tmp_path):
    marker = tmp_path / "crashed"
    future = leased(ex, exit_once, str(marker), 3)
    assert future.result(timeout=60) == "second time lucky"
    assert marker.exists()
    assert leased(ex, square, 4).result(timeout=30) == 16  # a new process is lent


def test_task_that_always_kills_the_borrowed_process_counts_that_attempt(ex, tmp_path):
    runs = tmp_path / "runs"
    future = leased(ex, exit_counting, str(runs), 5)
    with pytest.raises(WorkerLostError, match="exited with code 5 while running the task") as info:
        future.result(timeout=60)
    assert info.value.attempts == 3
    assert len(runs.read_text().split()) == 3, "the run on the borrowed process counts towards the two retries"
    borrowing(ex)
    f = ex.options(retries=0).submit(exit_process, 6)
    assert f._cx_record.state == C.LEASED
    with pytest.raises(WorkerLostError, match="exited with code 6 while running the task") as info:
        f.result(timeout=60)
    assert info.value.attempts == 1
    assert leased(ex, square, 5).result(timeout=30) == 25


def test_death_is_reported_even_if_a_child_of_the_task_keeps_the_socket_open(ex, tmp_path):
    """No end-of-file reaches the caller reading for its result: the agent's report must end its wait."""
    try:
        future = ex.options(retries=0).submit(die_leaving_a_child_that_holds_the_socket, str(tmp_path)) \
            if borrowing(ex) else None
        assert future._cx_record.state == C.LEASED
        with pytest.raises(WorkerLostError, match="code 3"):
            future.result(timeout=6)
        assert leased(ex, square, 7).result(timeout=30) == 49
    finally:
        kill_children_named_in(tmp_path)


def test_done_callback_run_by_the_reading_caller_may_wait_for_the_next_task(ex):
    """result() reads the borrowed process's answer in the caller's thread, so a done-callback runs there:
    it must not be left as the socket's reader while it waits for another task on that process."""
    seen = []

    def then(future):
        follow = ex.submit(square, future.result())
        seen.append(follow._cx_record.state)
        seen.append(follow.result(timeout=30))

    future = leased(ex, square, 3)
    # (Appended directly: add_done_callback would, through the hook, have the IO thread read the result.)
    future._done_callbacks.append(then)
    assert future.result(timeout=30) == 9
    assert seen == [C.LEASED, 81]
    assert leased(ex, square, 4).result(timeout=30) == 16


def test_done_callback_on_the_io_thread_waiting_for_a_task_gets_a_clear_error(ex):
    """The IO thread runs done-callbacks and delivers results: waiting there would wait for itself."""
    errors = []
    followers = []

    def then(future):
        followers.append(ex.submit(square, 5))
        try:
            followers[0].result(timeout=30)
        except RuntimeError as e:
            errors.append(str(e))

    # The master's path (a time limit), and slow enough that the callback is added before it ends: the
    # callback then runs on the IO thread.
    first = ex.options(timeout=60).submit(slow_square, 3)
    first.add_done_callback(then)
    assert first.result(timeout=30) == 9
    wait_until(lambda: errors, timeout=30, what="the callback's error")
    assert "done-callback cannot wait" in errors[0]
    assert followers[0].result(timeout=30) == 25


def test_ctrl_c_in_result_leaves_the_task_to_finish(ex, tmp_path):
    """As with ProcessPoolExecutor: Ctrl-C interrupts the wait, not the task, and its Future still resolves."""
    go = tmp_path / "go"
    future = leased(ex, wait_for_file, str(go))
    pid = ex._conn._lease.pid
    # (A shell starts a background job with SIGINT ignored, and Python then leaves it so: say what Ctrl-C does.)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            future.result(timeout=30)
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)
    assert not future.done()
    go.touch()
    assert future.result(timeout=30) == pid
    assert leased(ex, square, 8).result(timeout=30) == 64


def test_kill_stops_a_task_on_the_borrowed_process(ex, tmp_path):
    started = tmp_path / "started"
    future = leased(ex, start_then_sleep, str(started), 60)
    pid = ex._conn._lease.pid
    wait_until(started.exists, timeout=30, what="the task to start")
    assert ex.kill(future)
    with pytest.raises(TaskKilled, match="killed while running"):
        future.result(timeout=30)
    wait_until(lambda: not os.path.exists(f"/proc/{pid}") or "zombie" in Path(f"/proc/{pid}/status").read_text()
               .lower(), timeout=10, what="the killed process to be gone")
    assert leased(ex, square, 6).result(timeout=30) == 36


def test_a_result_sent_before_the_process_died_is_delivered_not_run_again(ex, tmp_path, monkeypatch):
    """The task ended and its result waits unread in the socket when the process dies (killed here from
    outside; ex.kill() racing the task's end does the same): the client reads what the process sent before it
    decides on a retry."""
    monkeypatch.setattr(C, "LEASE_LOOK", 3600.0)  # nobody reads the socket until the report comes
    runs = tmp_path / "runs"
    future = leased(ex, count_run, str(runs), "the value")
    wait_until(lambda: runs.exists(), timeout=30, what="the task to run")
    time.sleep(0.3)  # its result is in the socket by now
    assert future._cx_record.state == C.LEASED
    pid = ex._conn._lease.pid
    os.kill(pid, signal.SIGKILL)  # (not ex.kill(), whose look at the Future has the IO thread read it first)
    wait_until(lambda: ex._conn._lease is None or ex._conn._lease.pid != pid, timeout=10,
               what="the client to hear of the death")
    assert future.result(timeout=30) == "the value"
    assert runs.read_text() == "run\n"


def test_cancelling_a_task_retried_after_its_borrowed_process_died_leaves_it_to_finish(ex, tmp_path):
    """Its Future is running (it started on the borrowed process): cancelling it (as map's clean-up and
    shutdown(cancel_futures=True) do) must not take its retry out of the queue, leaving the Future running
    forever."""
    crash, go, marker = tmp_path / "crash", tmp_path / "go", tmp_path / "crashed"
    future = leased(ex, crash_when_told_once, str(crash), str(marker))
    record = future._cx_record
    blockers = [ex.submit(wait_for_file, str(go)) for _ in range(2)]  # the other process, then the new one
    wait_until(blockers[0].running, timeout=30, what="the first blocker to start")
    crash.touch()
    wait_until(lambda: record.state == C.SENT, timeout=30, what="the retry to go to the master")
    _cancel_all([future])
    go.touch()
    assert future.result(timeout=30) == "ran again"
    assert all(isinstance(b.result(timeout=30), int) for b in blockers)


def test_kill_sent_before_the_task_starts_still_kills_it(ex):
    future = leased(ex, time.sleep, 60)
    ex.kill(future)  # at once: the process may not have read the task yet
    with pytest.raises(TaskKilled):
        future.result(timeout=30)


def test_borrowed_process_killed_from_outside_while_idle_is_replaced(ex):
    lease = borrowing(ex)
    os.kill(lease.pid, signal.SIGKILL)
    wait_until(lambda: ex._conn._lease is not lease, timeout=10, what="the client to drop the dead process")
    assert [ex.submit(square, i).result(timeout=30) for i in range(5)] == [0, 1, 4, 9, 16]
    assert borrowing(ex).pid != lease.pid


def test_terminate_workers_with_a_task_on_the_borrowed_process(tmp_path):
    ex = ClusterExecutor(max_workers=2)
    future = leased(ex, time.sleep, 60)
    pid = ex._conn._lease.pid
    child = ex._local.process.pid
    ex.terminate_workers()
    assert future.done()
    with pytest.raises(TaskKilled):
        future.result()
    wait_until(lambda: not os.path.exists(f"/proc/{pid}"), timeout=10, what="the borrowed process to exit")
    wait_until(lambda: not os.path.exists(f"/proc/{child}"), timeout=10, what="the local cluster to exit")


# ------------------------------------------------------------------------------------------ sharing


def test_tasks_submitted_together_run_at_once_on_both_processes(ex, tmp_path):
    """The first goes to the borrowed process, the second through the master: the agent's other process
    runs it meanwhile, and the borrowed one goes back once the master's tasks need it."""
    borrowing(ex)
    a, b = tmp_path / "a", tmp_path / "b"
    first = ex.submit(interval, str(a), 1.0)
    second = ex.submit(interval, str(b), 1.0)
    assert first._cx_record.state == C.LEASED and second._cx_record.state != C.LEASED
    first.result(timeout=30), second.result(timeout=30)
    pid_a, start_a, end_a = a.read_text().split()
    pid_b, start_b, end_b = b.read_text().split()
    assert pid_a != pid_b
    assert float(start_b) < float(end_a) and float(start_a) < float(end_b), "the two tasks did not overlap"
    # Then a map uses both processes, and the short way is taken again after it.
    pids = set(ex.map(pid_after_a_nap, range(400)))
    assert len(pids) == 2
    assert leased(ex, square, 3).result(timeout=30) == 9


def test_function_cache_stays_in_step_between_the_client_and_the_agent(ex):
    """A function's blob goes to a task process once: the client and the agent take turns sending it tasks,
    each carrying on from the other's record of what that process holds, evictions included."""
    big = bytes(range(256)) * 4096  # 1 MiB carried by the closure

    def size_plus(x):
        return len(big) + x

    pids = set(ex.map(pid_after_a_nap, range(200)))
    assert len(pids) == 2
    for round_ in range(3):
        assert leased(ex, size_plus, round_).result(timeout=30) == len(big) + round_
        assert list(ex.map(size_plus, range(100))) == [len(big) + i for i in range(100)]
    # Evicted while lent: more distinct functions than a process's cache holds push size_plus out of the
    # borrowed process's cache. The agent must then send it again, not name it by its hash (the process
    # would die of an unknown blob, and its tasks would run again elsewhere).
    for i in range(300):
        fn = eval(f"lambda x: x + {i}")  # noqa: S307 - a distinct function each time
        assert leased(ex, fn, 1).result(timeout=30) == i + 1
    assert list(ex.map(size_plus, range(100))) == [len(big) + i for i in range(100)]
    assert set(ex.map(pid_after_a_nap, range(200))) == pids, "a task process died"


def test_initializer_runs_for_tasks_on_the_borrowed_process():
    with ClusterExecutor(max_workers=2, initializer=set_initialized, initargs=("ready",)) as ex:
        assert leased(ex, initialized_value).result(timeout=30) == "ready"


def test_options_the_agent_keeps_are_not_borrowed(ex):
    borrowing(ex)
    f = ex.options(timeout=30).submit(square, 2)
    assert f._cx_record.state != C.LEASED
    assert f.result(timeout=30) == 4
    with ClusterExecutor(max_workers=2, max_tasks_per_child=3) as limited:
        futures = [limited.submit(whoami) for _ in range(1)]
        assert all(f._cx_record.state != C.LEASED for f in futures)
        pids = [limited.submit(whoami).result(timeout=30) for _ in range(7)]
        assert len(set(pids)) >= 3


# ------------------------------------------------------------------------------------------ data and output


def test_large_data_through_shared_memory_on_the_borrowed_process(ex):
    payload = os.urandom(8 << 20)
    assert leased(ex, identity, payload).result(timeout=60) == payload
    np = pytest.importorskip("numpy")
    array = np.arange(2 << 20, dtype=np.float64)
    back = leased(ex, identity, array).result(timeout=60)
    assert np.array_equal(back, array)
    directory = Path(shm.SHM_DIR) / ex._shm_prefix
    wait_until(lambda: not [p for p in directory.iterdir() if not p.name.endswith(shm.FREE)], timeout=10,
               what="the segments of finished tasks to be gone or pooled")


def test_output_of_a_task_on_the_borrowed_process_arrives_while_it_runs(ex, tmp_path, capfd):
    go = tmp_path / "go"
    future = leased(ex, print_then_wait, str(go))
    pid = ex._conn._lease.pid
    seen = []

    def printed():
        seen.append(capfd.readouterr().out)
        return "tick from the borrowed process" in "".join(seen)

    wait_until(printed, timeout=10, what="the task's output, while nobody calls result()")
    assert f":{pid}] tick from the borrowed process" in "".join(seen)
    go.write_text("")
    assert future.result(timeout=30) == pid


def test_output_of_sequential_tasks_on_the_borrowed_process(ex, capfd):
    borrowing(ex)
    for i in range(20):
        f = ex.submit(print, f"line {i}")
        assert f._cx_record.state == C.LEASED
        f.result(timeout=30)
    out = capfd.readouterr().out
    assert [line.split("] ", 1)[1] for line in out.splitlines() if "] line " in line] == \
        [f"line {i}" for i in range(20)]


# ------------------------------------------------------------------------------------------ protocol


def test_blob_cache_records_travel_and_malformed_ones_are_refused():
    lru = P.BlobLRU()
    lru.add("a" * 64, 10)
    lru.add("b" * 64, 20)
    lru.touch("a" * 64)
    again = P.BlobLRU.restored(lru.export())
    assert again.export() == [["b" * 64, 20], ["a" * 64, 10]]
    for bad in ([["a", -1]], [["a", "1"]], [[1, 1]], [["a", 1], ["a", 2]], [["a"]], "ab", 5,
                [[str(i), 1] for i in range(300)], [["a", 1 << 39], ["b", 1 << 39]]):
        with pytest.raises((ValueError, TypeError)):
            P.BlobLRU.restored(bad)
    # One blob larger than the whole cache is kept (add() never evicts the last entry): that travels too.
    huge = P.BlobLRU()
    huge.add("h" * 32, 600 << 20)
    assert P.BlobLRU.restored(huge.export()).export() == [["h" * 32, 600 << 20]]


def test_agent_survives_malformed_messages_from_the_client(ex):
    borrowing(ex)
    lender = ex._conn._lender
    for junk in (b"not json", b"{}", b'{"t": "return", "pid": "x", "sent": 5}', b'{"t": "kill", "pid": 1}',
                 b'{"t": "return", "pid": 1, "sent": [["a", -1]]}', b'{"t": "nonsense"}'):
        lender.send(junk)
    assert [ex.submit(square, i).result(timeout=30) for i in range(5)] == [0, 1, 4, 9, 16]
    assert list(ex.map(square, range(100))) == [i * i for i in range(100)]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))

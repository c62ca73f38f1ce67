"""What happens when things break: task processes and whole nodes dying, things that cannot be pickled,
exceptions that cannot travel, and several clients competing for the same workers.

Every test runs a real master and real worker nodes (see conftest.py). Task functions live at module level
so that the worker processes import them by reference (tests/ is on their PYTHONPATH).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import pytest
from conftest import (
    agent_children,
    die_leaving_a_child_that_holds_the_socket,
    is_gone,
    kill_children_named_in,
    reap,
    wait_until,
)

import clusterexec
from clusterexec import ClusterError, ClusterUnavailable, RemoteError, SerializationError, WorkerLostError

pytestmark = pytest.mark.timeout(40)

RESULT_TIMEOUT = 15


# ================================================================================================ task functions


def square(x):
    return x * x


def add(x, y):
    return x + y


def pid_of_task_process():
    return os.getpid()


def sleep_and_return(delay, value):
    time.sleep(delay)
    return value


def _die(how: str) -> None:
    if how == "exit":
        os._exit(3)
    elif how == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif how == "segfault":
        ctypes.string_at(0)  # reads address 0: SIGSEGV
    raise AssertionError(f"still alive after {how}")


def die_on_first_attempt(marker: str, how: str, value):
    """Dies the first time it runs (the marker file remembers it), succeeds on the retry."""
    if not os.path.exists(marker):
        with open(marker, "w") as f:
            f.write(str(os.getpid()))
        _die(how)
    return value, os.getpid()


def die_every_time(attempts_file: str, how: str):
    """Poison: logs each attempt's pid, then dies."""
    with open(attempts_file, "a") as f:
        f.write(f"{os.getpid()}\n")
    _die(how)


def record_start_and_sleep(directory: str, x, delay):
    """Leaves a file saying which node agent (parent pid) started item x, then works for a while."""
    Path(directory, f"{x}-{os.getppid()}-{os.getpid()}").touch()
    time.sleep(delay)
    return x * x, os.getppid()


def return_generator():
    return (i for i in range(3))


def return_lock():
    return threading.Lock()


def _refuse_to_unpickle(where):
    raise ValueError(f"this object refuses to be unpickled ({where})")


class UnpicklableHere:
    """Pickles fine; unpickling it anywhere raises ValueError."""

    def __init__(self, where="anywhere"):
        self.where = where

    def __reduce__(self):
        return _refuse_to_unpickle, (self.where,)


class UnloadableCallable:
    """A callable that pickles but cannot be unpickled in the task process."""

    def __call__(self, x):
        return x

    def __reduce__(self):
        return _refuse_to_unpickle, ("function",)


def return_unloadable_result():
    return UnpicklableHere("result")


def identity(x):
    return x


class LockedError(Exception):
    """An exception that cannot be pickled: it holds a lock."""

    def __init__(self, message):
        super().__init__(message)
        self.lock = threading.Lock()


class NeedsTwoArgs(Exception):
    """Pickles, but unpickling calls NeedsTwoArgs(message) which lacks an argument."""

    def __init__(self, a, b):
        super().__init__(f"{a} and {b}")
        self.a = a
        self.b = b


def raise_locked_error(message):
    raise LockedError(message)


def raise_needs_two_args(a, b):
    raise NeedsTwoArgs(a, b)


def raise_value_error(message):
    raise ValueError(message)


# ================================================================================================ helpers




def _still_usable(ex) -> None:
    assert ex.submit(add, 20, 22).result(timeout=RESULT_TIMEOUT) == 42
    assert list(ex.map(square, range(10))) == [x * x for x in range(10)]


# ======================================================================================== 1. dying task processes


@pytest.mark.parametrize("how", ["exit", "sigkill", "segfault"])
def test_task_process_killed_mid_task_is_retried_elsewhere(cluster, tmp_path, how):
    marker = tmp_path / "attempted"
    agent = cluster.workers[0].pid
    with cluster.executor() as ex:
        before = agent_children(agent)
        assert len(before) == 2
        value, pid = ex.submit(die_on_first_attempt, str(marker), how, "survived").result(timeout=RESULT_TIMEOUT)
        assert value == "survived"
        dead_pid = int(marker.read_text())
        assert pid != dead_pid, "the retry must run in another (live) process"
        # The dead process was replaced: the node is back to two task processes, without the dead one.
        after = wait_until(lambda: (c := agent_children(agent)) and len(c) == 2 and c,
                            what="the replacement task process")
        assert dead_pid not in after
        assert is_gone(dead_pid)
        _still_usable(ex)


@pytest.mark.parametrize("how, detail", [("exit", "code 3"), ("sigkill", "SIGKILL"), ("segfault", "SIGSEGV")])
def test_task_that_kills_its_process_every_time_fails_with_worker_lost_after_the_retry_budget(
        cluster, tmp_path, how, detail):
    attempts_file = tmp_path / "attempts"
    with cluster.executor() as ex:
        good_before = [ex.submit(square, i) for i in range(5)]
        poison = ex.submit(die_every_time, str(attempts_file), how)
        good_after = [ex.submit(square, i) for i in range(5, 10)]
        with pytest.raises(WorkerLostError) as info:
            poison.result(timeout=RESULT_TIMEOUT)
        err = info.value
        assert isinstance(err, BrokenProcessPool)
        assert isinstance(err, clusterexec.ClusterError)
        pids = [int(line) for line in attempts_file.read_text().split()]
        assert len(pids) == 3, f"default budget is 2 retries = 3 attempts, got {pids}"
        assert len(set(pids)) == 3, "each attempt ran in a fresh process"
        assert err.attempts == 3
        message = str(err)
        assert detail in message
        assert str(err.pid) in message and err.pid == pids[-1]
        assert err.host and err.host in message
        if how == "exit":
            assert err.exitcode == 3
        else:
            assert err.signal == detail
        assert [f.result(timeout=RESULT_TIMEOUT) for f in good_before + good_after] == [i * i for i in range(10)]
        _still_usable(ex)
    # The node is whole again.
    wait_until(lambda: len(agent_children(cluster.workers[0].pid)) == 2, what="replacement processes")


def test_poison_item_in_a_map_raises_worker_lost_after_the_items_before_it(cluster, tmp_path):
    attempts_file = tmp_path / "attempts"
    with cluster.executor() as ex:
        results = []
        with pytest.raises(WorkerLostError):
            for value in ex.map(_map_item, range(9), [str(attempts_file)] * 9):
                results.append(value)
        assert results == [i * 10 for i in range(8)]
        assert len(attempts_file.read_text().split()) == 3
        _still_usable(ex)


def _map_item(i, attempts_file):
    if i == 8:
        die_every_time(attempts_file, "exit")
    return i * 10


def test_each_poison_task_has_its_own_retry_budget(cluster, tmp_path):
    """Two poison tasks are attempted three times each, then fail; the tasks around them all succeed."""
    attempts_file = tmp_path / "attempts"
    with cluster.executor() as ex:
        futures = [ex.submit(die_every_time, str(attempts_file), "exit") for _ in range(2)]
        ok = [ex.submit(square, i) for i in range(20)]
        for f in futures:
            with pytest.raises(WorkerLostError):
                f.result(timeout=RESULT_TIMEOUT)
        assert len(attempts_file.read_text().split()) == 6
        assert [f.result(timeout=RESULT_TIMEOUT) for f in ok] == [i * i for i in range(20)]


def test_whole_worker_node_killed_reruns_its_tasks_on_the_other_node(cluster, tmp_path):
    cluster.start_worker(2)
    doomed, survivor = cluster.workers
    starts = tmp_path / "starts"
    starts.mkdir()
    with cluster.executor() as ex:
        futures = [ex.submit(record_start_and_sleep, str(starts), x, 0.4) for x in range(16)]
        # Wait until the doomed node is running some of our tasks, then kill its agent outright.
        wait_until(lambda: any(p.name.split("-")[1] == str(doomed.pid) for p in starts.iterdir()),
                    what="a task to start on the first node")
        doomed_children = agent_children(doomed.pid)
        assert doomed_children
        doomed.send_signal(signal.SIGKILL)
        doomed.wait(5)
        results = [f.result(timeout=RESULT_TIMEOUT) for f in futures]
        assert [r[0] for r in results] == [x * x for x in range(16)]
        started_on_doomed = {int(p.name.split("-")[0]) for p in starts.iterdir()
                             if p.name.split("-")[1] == str(doomed.pid)}
        rerun = {x for x in started_on_doomed if results[x][1] == survivor.pid}
        assert rerun, "tasks that were running on the killed node must be re-run on the other one"
        # Its task processes did not outlive it.
        wait_until(lambda: all(is_gone(pid) for pid in doomed_children), what="orphaned task processes to die")
        info = ex.cluster_info()
        assert [w["pid"] for w in info["workers"]] == [survivor.pid]
        _still_usable(ex)


def test_task_that_kills_its_whole_node_every_time_fails_after_the_retry_budget(empty_cluster):
    for _ in range(3):
        empty_cluster.start_worker(1)
    with empty_cluster.executor() as ex:
        # Every task process imports this module first, so that the poison below acts at once.
        pids = {f.result(timeout=RESULT_TIMEOUT) for f in [ex.submit(sleep_and_pid, 0.2) for _ in range(6)]}
        assert len(pids) == 3
        future = ex.submit(kill_my_node)
        try:
            with pytest.raises(WorkerLostError, match="worker node went away"):
                future.result(timeout=4)
        finally:
            ex.shutdown(wait=False, cancel_futures=True)


def sleep_and_pid(delay):
    time.sleep(delay)
    return os.getpid()


def kill_my_node():
    os.kill(os.getppid(), signal.SIGKILL)
    time.sleep(10)


def test_only_node_killed_mid_batch_tasks_wait_and_finish_when_a_new_node_joins(cluster, tmp_path):
    """With its only node gone, a map waits (it does not fail) and completes when a new node joins."""
    starts = tmp_path / "starts"
    starts.mkdir()
    with cluster.executor() as ex:
        futures = [ex.submit(record_start_and_sleep, str(starts), x, 0.3) for x in range(6)]
        wait_until(lambda: any(starts.iterdir()), what="a task to start")
        node = cluster.workers[0]
        node.send_signal(signal.SIGKILL)
        node.wait(5)
        time.sleep(0.3)
        assert not any(f.done() for f in futures)
        cluster.start_worker(2)
        assert [f.result(timeout=RESULT_TIMEOUT)[0] for f in futures] == [x * x for x in range(6)]


def test_a_master_that_stays_away_past_the_window_fails_pending_futures_and_stops_the_node(empty_cluster):
    cluster = empty_cluster
    agent = cluster.start_worker(2, "--reconnect-window", "1")
    ex = cluster.executor(reconnect_window=1.0)
    try:
        assert ex.submit(square, 3).result(timeout=RESULT_TIMEOUT) == 9
        children = agent_children(agent.pid)
        futures = [ex.submit(sleep_and_return, 5, i) for i in range(4)]
        wait_until(lambda: any(f.running() for f in futures), what="a task to start")
        cluster.master.send_signal(signal.SIGKILL)
        cluster.master.wait(5)
        t0 = time.monotonic()
        for f in futures:
            with pytest.raises(ClusterUnavailable, match="did not come back within 1 s"):
                f.result(timeout=RESULT_TIMEOUT)
        assert time.monotonic() - t0 < 4
        with pytest.raises(ClusterUnavailable):
            ex.submit(square, 2)
        # The node gives up too: it stops its task processes and exits non-zero, saying why.
        assert agent.wait(10) != 0
        wait_until(lambda: all(is_gone(pid) for pid in children), what="the task processes to stop")
        assert "did not come back" in (cluster.log_dir / "worker0.log").read_text()
        # Shutting the broken executor down neither raises nor hangs.
        t0 = time.monotonic()
        ex.shutdown()
        assert time.monotonic() - t0 < 2
    finally:
        ex.shutdown(wait=False)


def test_client_killed_mid_map_frees_the_workers_for_other_clients(cluster):
    script = textwrap.dedent(f"""
        import sys, time
        from clusterexec import ClusterExecutor
        ex = ClusterExecutor({cluster.address!r}, authkey={cluster.key!r})
        futures = [ex.submit(time.sleep, 3) for _ in range(100)]
        while not any(f.running() for f in futures):
            time.sleep(0.01)
        print("running", flush=True)
        time.sleep(60)
    """)
    doomed = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    try:
        assert doomed.stdout.readline().strip() == b"running"
        doomed.send_signal(signal.SIGKILL)
        doomed.wait(5)
    finally:
        reap(doomed)
    with cluster.executor() as ex:
        t0 = time.monotonic()
        assert ex.submit(square, 7).result(timeout=RESULT_TIMEOUT) == 49
        assert time.monotonic() - t0 < 2.5, "the dead client's 3 s tasks must be dropped, not run"
        info = ex.cluster_info()
        assert info["queued"] == 0
        assert len(info["clients"]) == 1


# ======================================================================================== 2. serialization


def test_unpicklable_function_fails_that_future_alone_with_serialization_error(cluster):
    lock = threading.Lock()
    with cluster.executor() as ex:
        ok1 = ex.submit(square, 3)
        bad = ex.submit(lambda x: (lock, x), 1)
        ok2 = ex.submit(square, 4)
        with pytest.raises(SerializationError) as info:
            bad.result(timeout=RESULT_TIMEOUT)
        assert info.value.phase == "pickling the function"
        assert "pickling the function" in str(info.value)
        assert "lock" in str(info.value)
        assert (ok1.result(timeout=RESULT_TIMEOUT), ok2.result(timeout=RESULT_TIMEOUT)) == (9, 16)
        with pytest.raises(SerializationError, match="pickling the function"):
            list(ex.map(lambda x: (lock, x), range(3)))
        _still_usable(ex)


def test_unpicklable_argument_fails_that_future_alone_with_serialization_error(cluster):
    with cluster.executor() as ex:
        futures = [ex.submit(identity, i) for i in range(3)]
        bad = ex.submit(identity, threading.Lock())
        futures += [ex.submit(identity, i) for i in range(3, 6)]
        with pytest.raises(SerializationError) as info:
            bad.result(timeout=RESULT_TIMEOUT)
        assert info.value.phase == "pickling the arguments"
        assert "pickling the arguments" in str(info.value) and "lock" in str(info.value)
        assert [f.result(timeout=RESULT_TIMEOUT) for f in futures] == list(range(6))
        # In a map, the bad item fails when reached; the items before it are delivered.
        got = []
        with pytest.raises(SerializationError, match="pickling the arguments"):
            for v in ex.map(identity, [0, 1, threading.Lock(), 3]):
                got.append(v)
        assert got == [0, 1]
        _still_usable(ex)


def test_argument_that_cannot_be_unpickled_on_the_worker_fails_with_serialization_error(cluster):
    with cluster.executor() as ex:
        ok = [ex.submit(identity, i) for i in range(4)]
        bad = ex.submit(identity, UnpicklableHere("argument"))
        with pytest.raises(SerializationError) as info:
            bad.result(timeout=RESULT_TIMEOUT)
        assert info.value.phase == "unpickling the arguments"
        assert "unpickling the arguments" in str(info.value)
        assert "refuses to be unpickled (argument)" in str(info.value)
        assert [f.result(timeout=RESULT_TIMEOUT) for f in ok] == list(range(4))
        _still_usable(ex)


def test_function_that_cannot_be_unpickled_on_the_worker_fails_with_serialization_error(cluster):
    with cluster.executor() as ex:
        bad = [ex.submit(UnloadableCallable(), i) for i in range(3)]
        ok = [ex.submit(square, i) for i in range(4)]
        for f in bad:
            with pytest.raises(SerializationError) as info:
                f.result(timeout=RESULT_TIMEOUT)
            assert info.value.phase == "unpickling the function"
            assert "unpickling the function" in str(info.value) and "refuses to be unpickled" in str(info.value)
        assert [f.result(timeout=RESULT_TIMEOUT) for f in ok] == [0, 1, 4, 9]
        _still_usable(ex)


@pytest.mark.parametrize("fn, what", [(return_generator, "generator"), (return_lock, "lock")])
def test_unpicklable_result_fails_that_future_alone_with_serialization_error(cluster, fn, what):
    with cluster.executor() as ex:
        ok = [ex.submit(square, i) for i in range(3)]
        bad = ex.submit(fn)
        ok += [ex.submit(square, i) for i in range(3, 6)]
        with pytest.raises(SerializationError) as info:
            bad.result(timeout=RESULT_TIMEOUT)
        assert info.value.phase == "pickling the result"
        message = str(info.value)
        assert "pickling the result" in message and what in message
        assert "pid" in message  # says where it happened
        assert [f.result(timeout=RESULT_TIMEOUT) for f in ok] == [i * i for i in range(6)]
        _still_usable(ex)


def test_result_that_cannot_be_unpickled_on_the_client_fails_with_serialization_error(cluster):
    with cluster.executor() as ex:
        ok = [ex.submit(square, i) for i in range(3)]
        bad = ex.submit(return_unloadable_result)
        with pytest.raises(SerializationError) as info:
            bad.result(timeout=RESULT_TIMEOUT)
        assert info.value.phase == "unpickling the result"
        assert "unpickling the result" in str(info.value)
        assert "refuses to be unpickled (result)" in str(info.value)
        assert [f.result(timeout=RESULT_TIMEOUT) for f in ok] == [0, 1, 4]
        _still_usable(ex)


def test_exception_that_cannot_be_pickled_reaches_the_caller_as_remote_error(cluster):
    with cluster.executor() as ex:
        ok = ex.submit(square, 5)
        bad = ex.submit(raise_locked_error, "the disk is on fire")
        with pytest.raises(RemoteError) as info:
            bad.result(timeout=RESULT_TIMEOUT)
        err = info.value
        assert err.type_name.endswith("LockedError")
        assert err.remote_message == "the disk is on fire"
        assert "raise_locked_error" in err.traceback and "LockedError" in err.traceback
        assert "LockedError" in str(err) and "the disk is on fire" in str(err)
        assert "could not be pickled" in str(err)
        assert ok.result(timeout=RESULT_TIMEOUT) == 25
        _still_usable(ex)


def test_exception_that_cannot_be_unpickled_reaches_the_caller_as_remote_error(cluster):
    with cluster.executor() as ex:
        bad = ex.submit(raise_needs_two_args, "left", "right")
        ok = ex.submit(square, 6)
        with pytest.raises(RemoteError) as info:
            bad.result(timeout=RESULT_TIMEOUT)
        err = info.value
        assert err.type_name.endswith("NeedsTwoArgs")
        assert err.remote_message == "left and right"
        assert "raise_needs_two_args" in err.traceback
        assert "could not be unpickled" in str(err)
        assert ok.result(timeout=RESULT_TIMEOUT) == 36
        _still_usable(ex)


def test_ordinary_exception_travels_as_itself_with_the_remote_traceback(cluster):
    with cluster.executor() as ex:
        with pytest.raises(ValueError, match="plain failure") as info:
            ex.submit(raise_value_error, "plain failure").result(timeout=RESULT_TIMEOUT)
        assert "raise_value_error" in str(info.value.__cause__)
        _still_usable(ex)


# ======================================================================================== 5. several clients


def test_second_client_is_served_while_first_clients_long_queue_drains(cluster):
    with cluster.executor() as a, cluster.executor() as b:
        a_futures = [a.submit(sleep_and_return, 0.05, i) for i in range(200)]
        wait_until(lambda: any(f.done() for f in a_futures), what="A's first results")
        t0 = time.monotonic()
        assert b.submit(square, 12).result(timeout=RESULT_TIMEOUT) == 144
        b_latency = time.monotonic() - t0
        a_pending = sum(not f.done() for f in a_futures)
        assert a_pending >= 150, f"B waited for A's queue: only {a_pending} of A's 200 tasks were left"
        assert b_latency < 1.0
        assert [f.result(timeout=RESULT_TIMEOUT) for f in a_futures] == list(range(200))


def test_worker_joining_mid_map_picks_up_the_queued_tasks(empty_cluster):
    with empty_cluster.executor() as ex:
        results = ex.map(square, range(50), timeout=RESULT_TIMEOUT)
        time.sleep(0.3)
        info = ex.cluster_info()
        assert info["queued"] == 50 and info["workers"] == []
        empty_cluster.start_worker(2)
        assert list(results) == [x * x for x in range(50)]


def test_second_worker_joining_mid_map_shares_the_work(cluster):
    with cluster.executor() as ex:
        futures = [ex.submit(record_start_and_sleep, _scratch(cluster), x, 0.1)
                   for x in range(30)]
        time.sleep(0.2)
        newcomer = cluster.start_worker(2)
        results = [f.result(timeout=RESULT_TIMEOUT) for f in futures]
        assert [r[0] for r in results] == [x * x for x in range(30)]
        assert any(r[1] == newcomer.pid for r in results), "the new node must take part"


def _scratch(cluster) -> str:
    d = cluster.log_dir / "scratch"
    d.mkdir(exist_ok=True)
    return str(d)


def test_several_clients_at_once_each_get_their_own_results(cluster):
    def run(k):
        with cluster.executor() as ex:
            mapped = list(ex.map(add, range(100), [k * 1000] * 100))
            submitted = [ex.submit(add, i, -k) for i in range(50)]
            return mapped, [f.result(timeout=RESULT_TIMEOUT) for f in submitted]

    with ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(run, range(4)))
    for k, (mapped, submitted) in enumerate(outcomes):
        assert mapped == [i + k * 1000 for i in range(100)]
        assert submitted == [i - k for i in range(50)]


def test_one_client_failing_tasks_does_not_disturb_another(cluster, tmp_path):
    with cluster.executor() as a, cluster.executor() as b:
        poison = [a.submit(die_every_time, str(tmp_path / "attempts"), "sigkill") for _ in range(2)]
        good = [b.submit(sleep_and_return, 0.01, i) for i in range(40)]
        assert [f.result(timeout=RESULT_TIMEOUT) for f in good] == list(range(40))
        done, _ = wait(poison, timeout=RESULT_TIMEOUT)
        assert len(done) == 2
        assert all(isinstance(f.exception(), WorkerLostError) for f in poison)


@pytest.mark.parametrize("opts", [{"retries": "x"}, {"timeout": "x"}, {"timeout": -1}, {"mtpc": 0},
                                  {"chunk": 7}, {"init": 1}, {"shm": [5]}, {"no such option": 1}, ["retries"]])
def test_a_malformed_task_option_fails_that_task_alone(cluster, tmp_path, opts):
    # Sent as a client could send it (executor.options() would have refused it): the master refuses that task,
    # and the worker node, the other client and the sender's other tasks go on as if nothing happened.
    from clusterexec import serialization as S

    attempts = tmp_path / "attempts"
    with cluster.executor() as sender, cluster.executor() as other:
        nodes = {w["pid"] for w in cluster.info()["workers"]}
        args = S.dumps(((str(attempts), "sigkill"), {}), "pickling the arguments")
        bad = sender._conn.submit([S.function_blob(die_every_time)], args, opts)
        good = [other.submit(sleep_and_return, 0.01, i) for i in range(20)]
        with pytest.raises(ClusterError, match="the master refused the task"):
            bad.result(timeout=RESULT_TIMEOUT)
        assert [f.result(timeout=RESULT_TIMEOUT) for f in good] == list(range(20))
        assert sender.submit(square, 3).result(timeout=RESULT_TIMEOUT) == 9
        assert {w["pid"] for w in cluster.info()["workers"]} == nodes
        assert not attempts.exists()  # it never ran


def test_a_task_process_that_dies_is_noticed_even_if_a_child_it_forked_keeps_running(cluster, tmp_path):
    try:
        with cluster.executor() as ex:
            future = ex.submit(die_leaving_a_child_that_holds_the_socket, str(tmp_path))
            start = time.monotonic()
            with pytest.raises(WorkerLostError, match="code 3"):
                future.result(timeout=6)
            assert time.monotonic() - start < 5
            _still_usable(ex)
    finally:
        kill_children_named_in(tmp_path)


def make_bytes(n):
    return b"x" * n


def test_oversized_task_data_and_results_fail_their_future_alone_with_a_clear_error(tmp_path):
    from conftest import Cluster

    c = Cluster(tmp_path)
    try:
        c.start_master(0, "--max-frame-mb", "1")
        c.start_worker(2)
        with c.executor() as ex:
            big_arg = ex.submit(len, b"x" * (2 << 20))
            big_result = ex.submit(make_bytes, 2 << 20)
            fine = [ex.submit(make_bytes, 1000) for _ in range(50)]  # many small ones still batch together
            with pytest.raises(ClusterError, match="more than the master accepts"):
                big_arg.result(timeout=RESULT_TIMEOUT)
            with pytest.raises(SerializationError, match="more than the master accepts") as info:
                big_result.result(timeout=RESULT_TIMEOUT)
            assert info.value.phase == "sending the result"
            assert all(f.result(timeout=RESULT_TIMEOUT) == b"x" * 1000 for f in fine)
            _still_usable(ex)
            assert len(ex.cluster_info()["workers"]) == 1, "the node kept its connection"
    finally:
        c.stop()

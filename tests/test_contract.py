"""The `concurrent.futures.Executor` contract, as `ProcessPoolExecutor` has it, as specifications.

The same test body runs against

    process  ProcessPoolExecutor(max_workers=2)
    local    ClusterExecutor(max_workers=2)           (a private master and node on this machine)
    cluster  ClusterExecutor(<the `cluster` fixture>)  (master and a node of 2 processes, from the command line)

wherever the behaviour should match. A few specifications are ClusterExecutor's own (lambdas, exact
cancellation, exceptions inside a chunk, no process left behind by local mode) and run on `local` and
`cluster` only. Functions sent to a ProcessPoolExecutor must be importable, so they live at module level.
"""

from __future__ import annotations

import gc
import inspect
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from concurrent.futures import FIRST_COMPLETED, CancelledError, Future, ProcessPoolExecutor, as_completed, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import psutil
import pytest
from conftest import reap

from clusterexec import ClusterExecutor

HERE = Path(__file__).resolve().parent
DEADLINE = 10.0  # seconds any single wait in this file may take

# ============================================================================================ task functions
# Module level, so that ProcessPoolExecutor (and the cluster fixture's workers) can import them.

_INIT_VALUE = "not initialized"


def square(x):
    return x * x


def add(x, y):
    return x + y


def echo(*args, **kwargs):
    return args, kwargs


def getpid(_=None):
    return os.getpid()


def sleep_then_return(delay, value):
    time.sleep(delay)
    return value


def fail_at(x, bad):
    if x == bad:
        raise ValueError(f"bad item {x}", x)
    return x


def identity(x):
    return x


def fail_at_seven(x):
    return fail_at(x, 7)


class CustomError(Exception):
    pass


def raise_custom_error(*args):
    raise CustomError(*args)


def raise_key_error(key):
    return {}[key]


def raise_system_exit(code):
    raise SystemExit(code)


def return_unpicklable():
    return threading.Lock()


def die():
    os._exit(7)


def failing_initializer():
    raise CustomError("the initializer failed")


def length(data):
    return len(data)


def make_bytes(n):
    return b"y" * n


def touch(path, *_):
    Path(path).touch()
    return os.getpid()


def sleep_and_print(delay, text):
    time.sleep(delay)
    print(text, flush=True)


def touch_after(path, delay):
    time.sleep(delay)
    Path(path).touch()
    return os.getpid()


def block(release, started=None, limit=DEADLINE):
    """Occupy a task process until the file `release` exists (or `limit` seconds pass)."""
    if started is not None:
        Path(started).touch()
    deadline = time.monotonic() + limit
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.01)
    return os.getpid()


class Weakly:
    """A result that can be watched with a weakref."""


def make_weakly(_):
    return Weakly()


def crash_first_time(marker, *_):
    """Die on the first run (which leaves `marker`); later runs return "ran again"."""
    if not os.path.exists(marker):
        Path(marker).touch()
        os._exit(13)
    return "ran again"


def signal_if_alive(pid, signum):
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


class SignalOnArrival:
    """An argument whose unpickling sends `signum` to `pid` (if it still runs): it acts the moment a task
    process receives it, before the function runs."""

    def __init__(self, pid, signum):
        self.pid, self.signum = pid, signum

    def __reduce__(self):
        return signal_if_alive, (self.pid, self.signum)


def set_global(value):
    global _INIT_VALUE
    _INIT_VALUE = value


def read_global(_=None):
    return _INIT_VALUE


# ============================================================================================ helpers


def wait_until(predicate, timeout=DEADLINE, what="the condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def descendants() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def assert_all_gone(pids, timeout=DEADLINE):
    deadline = time.monotonic() + timeout
    while True:
        left = sorted(p for p in pids if alive(p))
        if not left:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"processes still alive {timeout} s later: "
                                 f"{[(p, _cmdline(p)) for p in left]}")
        time.sleep(0.05)


def _cmdline(pid):
    try:
        return " ".join(psutil.Process(pid).cmdline())[:120]
    except psutil.Error:
        return "?"


PPE_HAS_BUFFERSIZE = "buffersize" in inspect.signature(ProcessPoolExecutor.map).parameters


class Gate:
    """Files that block task processes until released, and marker files tasks create when they run."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.release_path = directory / "release"
        self._n = itertools.count()

    def occupy(self, ex, count=None) -> list[Future]:
        """Make `count` (default: every) task process of `ex` busy; return once all of them have started."""
        count = ex._max_workers if count is None else count
        started = [self.dir / f"started-{next(self._n)}" for _ in range(count)]
        futures = [ex.submit(block, str(self.release_path), str(s)) for s in started]
        wait_until(lambda: all(s.exists() for s in started), what=f"{count} blocking tasks to start")
        return futures

    def release(self) -> None:
        self.release_path.touch()

    def markers(self, n: int, prefix: str = "marker") -> list[Path]:
        return [self.dir / f"{prefix}-{next(self._n)}" for _ in range(n)]


@pytest.fixture
def gate(tmp_path):
    return Gate(tmp_path)


def _new_executor(kind, request, max_workers=2, **kwargs):
    if kind == "process":
        return ProcessPoolExecutor(max_workers=max_workers, **kwargs)
    if kind == "local":
        return ClusterExecutor(max_workers=max_workers, **kwargs)
    # The fixture's single node has 2 task processes whatever max_workers says.
    return request.getfixturevalue("cluster").executor(**kwargs)


def _factory(request, gate):
    kind = request.param
    if kind == "cluster":
        request.getfixturevalue("cluster")
    created = []

    def make(max_workers=2, **kwargs):
        ex = _new_executor(kind, request, max_workers, **kwargs)
        created.append(ex)
        return ex

    make.kind = kind
    return make, created


def _teardown(gate, created):
    gate.release()  # never leave a task blocked: shutdown(wait=True) would wait for it
    for ex in created:
        ex.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(params=["process", "local", "cluster"])
def make_executor(request, gate):
    """Makes executors of one kind (ProcessPoolExecutor, local mode, the cluster fixture); shuts them down."""
    make, created = _factory(request, gate)
    yield make
    _teardown(gate, created)


@pytest.fixture(params=["process", "local"])
def make_local_executor(request, gate):
    """Executors that start their own processes on this machine: ProcessPoolExecutor and local mode."""
    make, created = _factory(request, gate)
    yield make
    _teardown(gate, created)


@pytest.fixture(params=["local", "cluster"])
def make_cluster_executor(request, gate):
    """ClusterExecutor only: local mode and the cluster fixture."""
    make, created = _factory(request, gate)
    yield make
    _teardown(gate, created)


def is_cluster(make) -> bool:
    return make.kind in ("local", "cluster")


# ============================================================================================ submit


def test_submit_returns_a_future_with_the_result(make_executor):
    ex = make_executor()
    future = ex.submit(add, 2, 3)
    assert isinstance(future, Future)
    assert future.result(timeout=DEADLINE) == 5
    assert future.done() and not future.cancelled() and not future.running()
    assert future.exception() is None


def test_submit_passes_positional_and_keyword_arguments(make_executor):
    ex = make_executor()
    assert ex.submit(echo, 1, "two", x=3).result(timeout=DEADLINE) == ((1, "two"), {"x": 3})


def test_submit_accepts_keyword_arguments_named_fn_and_self(make_executor):
    ex = make_executor()
    assert ex.submit(echo, fn="f", self="s").result(timeout=DEADLINE) == ((), {"fn": "f", "self": "s"})


def test_submit_takes_the_function_positionally_only(make_executor):
    ex = make_executor()
    with pytest.raises(TypeError):
        ex.submit(fn=square, x=1)


def test_result_with_timeout_raises_timeout_error_while_the_task_runs(make_executor, gate):
    ex = make_executor()
    (busy,) = gate.occupy(ex, 1)
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        busy.result(timeout=0.2)
    assert time.monotonic() - start < 5
    gate.release()
    assert busy.result(timeout=DEADLINE) > 0


# ============================================================================================ map


def test_map_yields_results_in_input_order(make_executor):
    ex = make_executor()
    delays = [0.3, 0.2, 0.1, 0.0, 0.0, 0.1]  # later items finish first
    assert list(ex.map(sleep_then_return, delays, range(6))) == list(range(6))


def test_map_with_several_iterables_stops_at_the_shortest(make_executor):
    ex = make_executor()
    assert list(ex.map(add, [1, 2, 3], [10, 20])) == [11, 22]
    assert list(ex.map(add, [1, 2, 3], itertools.count(100))) == [101, 103, 105]


def test_map_of_nothing_yields_nothing(make_executor):
    ex = make_executor()
    assert list(ex.map(square, [])) == []
    assert list(ex.map(square)) == []


def test_map_consumes_a_generator(make_executor):
    ex = make_executor()
    assert list(ex.map(square, (i for i in range(20)))) == [i * i for i in range(20)]


def _inputs_then_error():
    yield 1
    yield 2
    raise CustomError("the input broke")


def test_map_propagates_an_exception_from_its_input(make_executor):
    ex = make_executor()
    with pytest.raises(CustomError):
        list(ex.map(square, _inputs_then_error()))
    assert ex.submit(square, 3).result(timeout=DEADLINE) == 9


@pytest.mark.parametrize("chunksize", [2, 7, 1000])
def test_map_with_chunksize_returns_every_result_in_order(make_executor, chunksize):
    ex = make_executor()
    assert list(ex.map(square, range(50), chunksize=chunksize)) == [i * i for i in range(50)]


@pytest.mark.parametrize("kind", [range, list, tuple, iter, str])
def test_map_chunks_of_one_iterable_of_any_kind_give_every_item_in_order(make_executor, kind):
    """One iterable's chunks travel as its items (a range or list as a slice of it), not as argument tuples."""
    ex = make_executor()
    items = {range: range(17), str: "abcdefghijklmnopq"}.get(kind) or kind(range(17))
    expected = list(range(17)) if kind is iter else list(items)
    assert list(ex.map(identity, items, chunksize=5)) == expected


def test_map_chunk_of_one_iterable_raises_at_the_failing_item_after_the_ones_before_it(make_cluster_executor):
    ex = make_cluster_executor()
    got = []
    with pytest.raises(ValueError) as info:
        for value in ex.map(fail_at_seven, range(20), chunksize=5):
            got.append(value)
    assert got == list(range(7))
    assert info.value.args == ("bad item 7", 7)


@pytest.mark.parametrize("chunksize", [0, -1])
def test_map_rejects_chunksize_below_one(make_executor, chunksize):
    ex = make_executor()
    with pytest.raises(ValueError):
        ex.map(square, [1], chunksize=chunksize)


def test_map_timeout_raises_timeout_error(make_executor, gate):
    ex = make_executor()
    results = ex.map(block, [str(gate.release_path)], timeout=0.3)
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        next(results)
    assert time.monotonic() - start < 5


def test_map_timeout_counts_from_the_call_to_map(make_executor, gate):
    ex = make_executor()
    results = ex.map(block, [str(gate.release_path)], timeout=1.0)
    time.sleep(1.1)
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        next(results)
    assert time.monotonic() - start < 0.8  # not a fresh 1.0 s from the first next()


def test_map_timeout_cancels_the_tasks_not_yet_started(make_executor, gate):
    ex = make_executor()
    busy = gate.occupy(ex)
    markers = gate.markers(10)
    results = ex.map(touch, [str(m) for m in markers], timeout=0.3)
    with pytest.raises(TimeoutError):
        next(results)
    gate.release()
    for future in busy:
        future.result(timeout=DEADLINE)
    assert ex.submit(square, 2).result(timeout=DEADLINE) == 4
    ex.shutdown(wait=True)
    ran = [m.name for m in markers if m.exists()]
    if is_cluster(make_executor):
        assert ran == []  # none had started, and all were cancelled
    else:
        # ProcessPoolExecutor cannot cancel what it already moved to its call queue (max_workers + 1 items).
        assert len(ran) <= ex._max_workers + 1, ran


def test_unpicklable_argument_fails_the_future_not_the_executor(make_executor):
    ex = make_executor()
    future = ex.submit(echo, threading.Lock())
    assert future.exception(timeout=DEADLINE) is not None
    with pytest.raises(TypeError):  # ClusterExecutor's is a SerializationError too
        future.result()
    assert ex.submit(square, 3).result(timeout=DEADLINE) == 9


@pytest.mark.parametrize("chunksize", [1, 3])
def test_map_raises_at_the_failing_item_after_the_results_before_it(make_executor, chunksize):
    ex = make_executor()
    results = ex.map(fail_at, range(9), [3] * 9, chunksize=chunksize)  # item 3 starts a chunk of 3
    got = []
    with pytest.raises(ValueError) as info:
        for value in results:
            got.append(value)
    assert got == [0, 1, 2]
    assert info.value.args == ("bad item 3", 3)
    assert list(results) == []  # the iteration is over


@pytest.mark.parametrize("chunksize", [2, 3, 5])
def test_map_raises_inside_a_chunk_after_the_results_before_it(make_cluster_executor, chunksize):
    # ProcessPoolExecutor loses the results before the failing item in its chunk; ClusterExecutor keeps them.
    ex = make_cluster_executor()
    got = []
    with pytest.raises(ValueError) as info:
        for value in ex.map(fail_at, range(20), [9] * 20, chunksize=chunksize):
            got.append(value)
    assert got == list(range(9))
    assert info.value.args == ("bad item 9", 9)
    assert "fail_at" in str(info.value.__cause__)


def test_map_exception_raised_lazily_while_earlier_results_are_consumed(make_executor):
    ex = make_executor()
    results = ex.map(fail_at, range(5), [4] * 5)
    assert [next(results) for _ in range(4)] == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        next(results)


@pytest.mark.parametrize("chunksize", [1, 3])
def test_map_does_not_keep_a_yielded_result_alive(make_executor, chunksize):
    # As CPython's test_free_reference: once the caller drops a result, nothing of the executor's holds it.
    ex = make_executor()
    for obj in ex.map(make_weakly, range(7), chunksize=chunksize):
        ref = weakref.ref(obj)
        del obj
        gc.collect()
        wait_until(lambda ref=ref: ref() is None, timeout=5, what="the dropped result to be freed")


# ------------------------------------------------------------------------------------------ buffersize


def _skip_without_buffersize(make):
    if make.kind == "process" and not PPE_HAS_BUFFERSIZE:
        pytest.skip(f"ProcessPoolExecutor.map has no buffersize on Python {sys.version_info[:2]}")


class Counting:
    """Wraps an iterator and counts the items pulled from it."""

    def __init__(self, iterable):
        self.pulled = 0
        self._it = iter(iterable)

    def __iter__(self):
        return self

    def __next__(self):
        value = next(self._it)
        self.pulled += 1
        return value


@pytest.mark.parametrize("buffersize", [1, 4])
def test_map_with_buffersize_pulls_a_bounded_number_of_inputs_ahead(make_executor, buffersize):
    _skip_without_buffersize(make_executor)
    ex = make_executor()
    inputs = Counting(itertools.count())  # endless: without buffersize map() would never return
    results = ex.map(square, inputs, buffersize=buffersize)
    assert inputs.pulled <= buffersize
    for yielded, value in enumerate(results, 1):
        assert value == (yielded - 1) ** 2
        assert inputs.pulled <= yielded + buffersize
        if yielded == 30:
            break
    results.close()
    assert inputs.pulled <= 30 + buffersize


def test_map_with_buffersize_and_chunksize_pulls_a_bounded_number_of_inputs_ahead(make_executor):
    _skip_without_buffersize(make_executor)
    ex = make_executor()
    buffersize, chunksize = 2, 5
    inputs = Counting(itertools.count())
    results = ex.map(square, inputs, buffersize=buffersize, chunksize=chunksize)
    for yielded, value in enumerate(results, 1):
        assert value == (yielded - 1) ** 2
        assert inputs.pulled <= yielded + (buffersize + 1) * chunksize
        if yielded == 40:
            break
    results.close()


def test_map_with_buffersize_yields_everything_of_a_finite_input(make_executor):
    _skip_without_buffersize(make_executor)
    ex = make_executor()
    assert list(ex.map(add, range(25), range(100, 125), buffersize=3)) == [100 + 2 * i for i in range(25)]


@pytest.mark.parametrize(("buffersize", "error"), [(0, ValueError), (-1, ValueError), (1.5, TypeError),
                                                   ("2", TypeError)])
def test_map_rejects_invalid_buffersize(make_executor, buffersize, error):
    _skip_without_buffersize(make_executor)
    ex = make_executor()
    with pytest.raises(error):
        ex.map(square, [1], buffersize=buffersize)


# ============================================================================================ shutdown


def test_submit_after_shutdown_raises_runtime_error(make_executor):
    ex = make_executor()
    assert ex.submit(square, 2).result(timeout=DEADLINE) == 4
    ex.shutdown()
    with pytest.raises(RuntimeError):
        ex.submit(square, 3)
    with pytest.raises(RuntimeError):
        ex.map(square, [1, 2])


def test_shutdown_twice_is_harmless(make_executor):
    ex = make_executor()
    ex.submit(square, 2).result(timeout=DEADLINE)
    ex.shutdown()
    ex.shutdown()
    ex.shutdown(wait=False)


def test_shutdown_waits_for_pending_futures(make_executor):
    ex = make_executor()
    futures = [ex.submit(sleep_then_return, 0.1, i) for i in range(6)]
    ex.shutdown(wait=True)
    assert all(f.done() for f in futures)
    assert [f.result() for f in futures] == list(range(6))


def test_shutdown_without_wait_returns_at_once_and_tasks_still_finish(make_executor, gate):
    ex = make_executor()
    (busy,) = gate.occupy(ex, 1)
    queued = ex.submit(square, 7)
    start = time.monotonic()
    ex.shutdown(wait=False)
    assert time.monotonic() - start < 2
    with pytest.raises(RuntimeError):
        ex.submit(square, 3)
    gate.release()
    assert busy.result(timeout=DEADLINE) > 0
    assert queued.result(timeout=DEADLINE) == 49


def test_context_manager_shuts_down_and_waits_on_exit(make_executor):
    with make_executor() as ex:
        futures = [ex.submit(sleep_then_return, 0.2, i) for i in range(3)]
    assert all(f.done() for f in futures)
    assert [f.result() for f in futures] == [0, 1, 2]
    with pytest.raises(RuntimeError):
        ex.submit(square, 1)


@pytest.mark.parametrize("wait_for_it", [True, False])
def test_shutdown_cancel_futures_cancels_queued_tasks_which_never_run(make_executor, gate, wait_for_it):
    ex = make_executor()
    busy = gate.occupy(ex)
    markers = gate.markers(10)
    queued = [ex.submit(touch, str(m)) for m in markers]
    time.sleep(0.2)  # let the queued tasks travel as far as they will (call queue, master, node prefetch)
    timer = threading.Timer(0.5, gate.release)
    timer.start()
    try:
        ex.shutdown(wait=wait_for_it, cancel_futures=True)
    finally:
        timer.cancel()
        gate.release()
    if wait_for_it:
        assert all(f.done() for f in busy + queued)
    else:
        # Not concurrent.futures.wait(): ProcessPoolExecutor never notifies its waiters of these cancellations.
        wait_until(lambda: all(f.done() for f in busy + queued), what="every future to be done")
    cancelled = [f.cancelled() for f in queued]
    if is_cluster(make_executor):
        # Nothing queued had started, and ClusterExecutor cancels even what a node prefetched.
        assert all(cancelled), cancelled
    else:
        # ProcessPoolExecutor cannot cancel what it already moved to its call queue (max_workers + 1 items).
        assert sum(cancelled) >= len(queued) - (ex._max_workers + 1), cancelled
    time.sleep(0.2)
    for future, marker in zip(queued, markers, strict=True):
        if future.cancelled():
            assert not marker.exists(), "a task whose future was cancelled ran"
        else:
            assert future.result() > 0 and marker.exists()


@pytest.mark.parametrize("seed", [1, 2])
def test_cancel_is_honest_while_tasks_start_and_finish(make_executor, gate, seed):
    # cancel() races with tasks starting: True must mean the task never runs, False that it runs to the end.
    ex = make_executor()
    markers = gate.markers(120)
    futures = [ex.submit(touch_after, str(m), 0.003) for m in markers]
    order = list(range(len(futures)))
    random.Random(seed).shuffle(order)
    answers = {}
    for i in order:
        answers[i] = futures[i].cancel()
        assert futures[i].cancelled() == answers[i]
        time.sleep(0.002)  # let tasks start and finish meanwhile
    ex.shutdown(wait=True)
    time.sleep(0.2)
    for i, (future, marker) in enumerate(zip(futures, markers, strict=True)):
        if answers[i]:
            assert future.cancelled() and not marker.exists(), f"task {i}: cancelled, yet it ran"
        else:
            assert future.result(timeout=0) > 0 and marker.exists(), f"task {i}: not cancelled, yet it did not run"
    assert any(answers.values())


# ------------------------------------------------------------------------------------------ terminate_workers


@pytest.mark.parametrize("stop", ["terminate_workers", "kill_workers"])
def test_terminate_workers_fails_running_tasks_with_broken_process_pool_and_cancels_the_rest(make_executor, gate,
                                                                                              stop):
    if make_executor.kind == "process" and not hasattr(ProcessPoolExecutor, stop):
        pytest.skip(f"ProcessPoolExecutor has no {stop}() on Python {sys.version_info[:2]}")
    ex = make_executor()
    busy = gate.occupy(ex)
    markers = gate.markers(6)
    queued = [ex.submit(touch, str(m)) for m in markers]
    getattr(ex, stop)()
    wait_until(lambda: all(f.done() for f in busy + queued), what="every future to be done")
    for future in busy:
        assert isinstance(future.exception(timeout=0), BrokenProcessPool)
    for future, marker in zip(queued, markers, strict=True):
        assert future.cancelled() or isinstance(future.exception(timeout=0), BrokenProcessPool)
        assert not marker.exists(), "a queued task ran after terminate_workers()"
    if is_cluster(make_executor):
        assert all(f.cancelled() for f in queued)
    else:
        # ProcessPoolExecutor fails what it already moved to its call queue (max_workers + 1 items) as broken.
        assert sum(f.cancelled() for f in queued) >= len(queued) - (ex._max_workers + 1)
    with pytest.raises(RuntimeError):
        ex.submit(square, 1)


# ============================================================================================ options


def test_max_workers_attribute(make_executor):
    ex = make_executor(max_workers=2)
    assert ex._max_workers == 2


def test_max_workers_attribute_is_what_was_asked(make_local_executor):
    ex = make_local_executor(max_workers=3)
    assert ex._max_workers == 3


def test_default_max_workers_is_what_process_pool_executor_uses():
    with ProcessPoolExecutor() as ppe, ClusterExecutor() as ex:
        assert ex._max_workers == ppe._max_workers


@pytest.mark.parametrize("bad", [0, -1])
def test_max_workers_must_be_positive(make_local_executor, bad):
    with pytest.raises(ValueError):
        make_local_executor(max_workers=bad)


def test_initializer_runs_in_the_worker_processes_before_tasks(make_executor):
    ex = make_executor(initializer=set_global, initargs=("initialized",))
    assert set(ex.map(read_global, range(8))) == {"initialized"}
    assert read_global() == "not initialized"  # it ran there, not here


def test_initializer_runs_in_every_new_process(make_executor):
    ex = make_executor(initializer=set_global, initargs=("initialized",), max_tasks_per_child=1)
    assert [ex.submit(read_global).result(timeout=DEADLINE) for _ in range(3)] == ["initialized"] * 3


def test_initializer_must_be_callable(make_local_executor):
    with pytest.raises(TypeError):
        make_local_executor(initializer=42)


def test_max_tasks_per_child_one_runs_every_task_in_a_new_process(make_executor):
    ex = make_executor(max_tasks_per_child=1)
    pids = [ex.submit(getpid).result(timeout=DEADLINE) for _ in range(4)]
    pids += list(ex.map(getpid, range(4)))
    assert len(set(pids)) == len(pids), pids


def test_max_tasks_per_child_two_reuses_each_process_at_most_twice(make_executor):
    ex = make_executor(max_workers=1, max_tasks_per_child=2)
    pids = [ex.submit(getpid).result(timeout=DEADLINE) for _ in range(6)]
    assert max(pids.count(p) for p in pids) <= 2, pids
    assert len(set(pids)) >= 3, pids


@pytest.mark.parametrize("bad", [0, -1])
def test_max_tasks_per_child_must_be_positive(make_local_executor, bad):
    with pytest.raises(ValueError):
        make_local_executor(max_tasks_per_child=bad)


# ============================================================================================ futures


def test_futures_work_with_wait(make_executor, gate):
    ex = make_executor()
    (slow,) = gate.occupy(ex, 1)
    fast = ex.submit(square, 3)
    done, not_done = wait([slow, fast], timeout=DEADLINE, return_when=FIRST_COMPLETED)
    assert done == {fast} and not_done == {slow}
    done, not_done = wait([slow, fast], timeout=0.1)
    assert done == {fast} and not_done == {slow}
    gate.release()
    done, not_done = wait([slow, fast], timeout=DEADLINE)
    assert done == {slow, fast} and not not_done


def test_futures_work_with_as_completed(make_executor, gate):
    ex = make_executor()
    (slow,) = gate.occupy(ex, 1)
    quick = [ex.submit(square, i) for i in range(3)]
    seen = []
    for future in as_completed([slow, *quick], timeout=DEADLINE):
        seen.append(future)
        if len(seen) == len(quick):
            gate.release()
    assert set(seen[:3]) == set(quick)
    assert seen[3] is slow  # each future once, in the order they finished


def test_wait_and_as_completed_count_a_cancelled_future_as_done(make_executor, gate):
    ex = make_executor()
    busy = gate.occupy(ex)
    queued = [ex.submit(square, i) for i in range(2 * ex._max_workers + 2)]
    time.sleep(0.2)
    last = queued[-1]  # beyond ProcessPoolExecutor's call queue and a node's prefetch
    assert last.cancel() is True
    gate.release()
    everything = [*busy, *queued]
    done, not_done = wait(everything, timeout=DEADLINE)
    assert not not_done and last in done
    assert set(as_completed(everything, timeout=DEADLINE)) == set(everything)


def test_as_completed_timeout_raises_timeout_error(make_executor, gate):
    ex = make_executor()
    busy = gate.occupy(ex, 1)
    with pytest.raises(TimeoutError):
        for _ in as_completed(busy, timeout=0.2):
            pass


@pytest.mark.parametrize("outcome", ["result", "exception"])
def test_done_callback_fires_exactly_once(make_executor, outcome):
    ex = make_executor()
    calls = []
    future = ex.submit(square, 5) if outcome == "result" else ex.submit(raise_custom_error, "x")
    future.add_done_callback(calls.append)
    wait([future], timeout=DEADLINE)
    wait_until(lambda: calls, what="the done-callback")
    time.sleep(0.2)
    assert calls == [future]
    late = []
    future.add_done_callback(late.append)  # added after completion: called at once, in this thread
    assert late == [future]
    assert calls == [future]


def test_cancel_of_a_started_task_returns_false(make_executor, gate):
    ex = make_executor()
    (busy,) = gate.occupy(ex, 1)
    wait_until(busy.running, what="running() of a started task")
    assert busy.cancel() is False
    assert not busy.cancelled()
    assert busy.running()
    gate.release()
    assert busy.result(timeout=DEADLINE) > 0
    assert not busy.running()
    assert busy.cancel() is False  # nor once finished


# ============================================================================================ exceptions


def test_exception_keeps_its_type_and_args(make_executor):
    ex = make_executor()
    future = ex.submit(raise_custom_error, "message", 42)
    with pytest.raises(CustomError) as info:
        future.result(timeout=DEADLINE)
    assert info.value.args == ("message", 42)
    assert type(future.exception()) is CustomError


def test_builtin_exception_keeps_its_type_and_args(make_executor):
    ex = make_executor()
    with pytest.raises(KeyError) as info:
        ex.submit(raise_key_error, "missing").result(timeout=DEADLINE)
    assert info.value.args == ("missing",)


def test_exception_cause_carries_the_remote_traceback(make_executor):
    ex = make_executor()
    exc = ex.submit(raise_custom_error, "boom").exception(timeout=DEADLINE)
    cause = exc.__cause__
    assert cause is not None
    text = str(cause)
    assert "Traceback" in text
    assert "raise_custom_error" in text  # the function that raised
    assert "CustomError" in text


@pytest.mark.parametrize("chunksize", [1, 4])
def test_exception_from_map_carries_the_remote_traceback(make_executor, chunksize):
    ex = make_executor()
    with pytest.raises(CustomError) as info:
        list(ex.map(raise_custom_error, ["a", "b"], chunksize=chunksize))
    assert info.value.args == ("a",)
    assert "raise_custom_error" in str(info.value.__cause__)


def test_system_exit_raised_in_a_task_travels_as_an_exception(make_executor):
    ex = make_executor()
    exc = ex.submit(raise_system_exit, 3).exception(timeout=DEADLINE)
    assert type(exc) is SystemExit and exc.args == (3,)
    assert ex.submit(square, 3).result(timeout=DEADLINE) == 9


def test_unpicklable_result_fails_the_future_not_the_executor(make_executor):
    ex = make_executor()
    assert ex.submit(return_unpicklable).exception(timeout=DEADLINE) is not None
    assert ex.submit(square, 3).result(timeout=DEADLINE) == 9


def test_task_whose_process_dies_fails_with_broken_process_pool(make_executor):
    ex = make_executor()
    assert isinstance(ex.submit(die).exception(timeout=DEADLINE), BrokenProcessPool)


def test_failing_initializer_fails_tasks_with_broken_process_pool(make_executor):
    ex = make_executor(initializer=failing_initializer)
    assert isinstance(ex.submit(square, 2).exception(timeout=DEADLINE), BrokenProcessPool)


def test_large_arguments_and_results_round_trip(make_executor):
    ex = make_executor()
    big = bytes(range(256)) * 4096  # 1 MiB
    assert ex.submit(length, big).result(timeout=DEADLINE) == len(big)
    assert ex.submit(make_bytes, 3 << 20).result(timeout=DEADLINE) == b"y" * (3 << 20)
    assert list(ex.map(length, [big, big[:10]], chunksize=2)) == [len(big), 10]


def test_a_done_callback_may_submit_more_work(make_executor):
    ex = make_executor()
    second = []
    done = threading.Event()

    def callback(future):
        second.append(ex.submit(square, future.result()))
        done.set()

    ex.submit(square, 3).add_done_callback(callback)
    assert done.wait(DEADLINE)
    assert second[0].result(timeout=DEADLINE) == 81


def test_executor_stays_usable_after_a_task_raised(make_executor):
    ex = make_executor()
    assert isinstance(ex.submit(raise_custom_error).exception(timeout=DEADLINE), CustomError)
    assert ex.submit(square, 9).result(timeout=DEADLINE) == 81


# ============================================================================================ ClusterExecutor only


def test_lambdas_and_closures_work(make_cluster_executor):
    ex = make_cluster_executor()
    offset = 10

    def make_adder(n):
        def adder(x):
            return x + n + offset
        return adder

    assert ex.submit(lambda x: x + offset, 1).result(timeout=DEADLINE) == 11
    assert list(ex.map(lambda x, y: x * y, [1, 2, 3], [4, 5, 6])) == [4, 10, 18]
    assert list(ex.map(make_adder(100), range(3), chunksize=2)) == [110, 111, 112]


def test_cancelled_task_never_runs(make_cluster_executor, gate):
    ex = make_cluster_executor(max_workers=1)
    busy = gate.occupy(ex)
    # More than a node prefetches (2 x nprocs), so some wait at the node and some at the master.
    markers = gate.markers(2 * ex._max_workers + 3)
    queued = [ex.submit(touch, str(m)) for m in markers]
    time.sleep(0.2)  # let them reach the master and the node
    callbacks = []
    for future in queued:
        assert not future.running()
        future.add_done_callback(callbacks.append)
        assert future.cancel() is True
        assert future.cancelled() and future.done() and not future.running()
        assert future.cancel() is True  # cancelling again still says cancelled
        with pytest.raises(CancelledError):
            future.result(timeout=0)
    gate.release()
    for future in busy:
        future.result(timeout=DEADLINE)
    # Once a task submitted afterwards has run, the node has had every chance to run the cancelled ones.
    assert list(ex.map(square, range(2 * ex._max_workers))) == [i * i for i in range(2 * ex._max_workers)]
    time.sleep(0.3)
    assert [m.name for m in markers if m.exists()] == []
    assert callbacks == queued  # each cancelled future's callback fired exactly once
    done, not_done = wait(queued, timeout=0)  # and wait() counts them done
    assert not not_done


def test_shutdown_never_cancels_a_task_whose_process_died_while_it_waits(make_executor, gate):
    # The task starts, then its process dies while shutdown(cancel_futures=True) waits: it ran, so it is not
    # one of the pending tasks that cancel_futures cancels. It ends with its result (run again) or a
    # BrokenProcessPool, never CANCELLED.
    ex = make_executor()
    marker = gate.dir / "crashed"
    future = ex.submit(crash_first_time, str(marker))
    wait_until(marker.exists, what="the task to start")
    ex.shutdown(wait=True, cancel_futures=True)
    assert not future.cancelled()
    if future.exception() is None:
        assert future.result() == "ran again"
    else:
        assert isinstance(future.exception(), BrokenProcessPool)


def test_a_task_that_may_have_started_on_a_lost_node_is_not_cancelled_by_shutdown(empty_cluster, gate):
    # Its node freezes before it can report the start, and then dies: the master cannot know whether the task
    # ran, so cancel_futures must not cancel it (that would say True for a task that ran). It runs again
    # once a node comes back.
    node = empty_cluster.start_worker(1)
    ex = empty_cluster.executor()
    try:
        assert ex.submit(square, 2).result(timeout=DEADLINE) == 4  # (its process has imported this module)
        marker = gate.dir / "crashed"
        future = ex.submit(crash_first_time, str(marker), SignalOnArrival(node.pid, signal.SIGSTOP))
        wait_until(marker.exists, what="the task to start")
        wait_until(lambda: psutil.Process(node.pid).status() == psutil.STATUS_STOPPED, what="the node to freeze")
        node.kill()
        node.wait(DEADLINE)
        empty_cluster.wait_for(lambda info: not info["workers"], what="the master to drop the node")
        assert not future.running(), "the node reported the start before it froze: the test proves nothing"
        stopping = threading.Thread(target=ex.shutdown, kwargs={"wait": True, "cancel_futures": True})
        stopping.start()
        wait_until(lambda: future.running() or future.done(), what="the cancel to be answered")
        assert not future.cancelled()
        empty_cluster.start_worker(1)
        stopping.join(DEADLINE)
        assert not stopping.is_alive()
        assert future.result(timeout=0) == "ran again"
    finally:
        ex.shutdown(wait=False, cancel_futures=True)


def test_cancel_is_false_for_a_task_that_started_on_a_node_that_froze_before_saying_so(tmp_path, gate):
    # The node never answers the cancel; once the master gives it up, it must not take the silence for a
    # success: the task may have started (here it did), so cancel() says False, as for a running task.
    from conftest import Cluster

    cluster = Cluster(tmp_path)
    try:
        cluster.start_master(0, "--heartbeat-timeout", "2")
        node = cluster.start_worker(1)
        with cluster.executor() as ex:
            assert ex.submit(square, 2).result(timeout=DEADLINE) == 4  # (its process has imported this module)
            marker = gate.dir / "ran"
            future = ex.submit(touch, str(marker), SignalOnArrival(node.pid, signal.SIGSTOP))
            wait_until(marker.exists, what="the task to run")
            wait_until(lambda: psutil.Process(node.pid).status() == psutil.STATUS_STOPPED, what="the node to freeze")
            assert not future.running(), "the node reported the start before it froze: the test proves nothing"
            assert future.cancel() is False
            assert not future.cancelled()
            node.kill()
            cluster.start_worker(1)
            assert future.result(timeout=DEADLINE) > 0  # (it runs again: at least once)
    finally:
        cluster.stop()


def test_wait_counts_futures_cancelled_by_shutdown_as_done(make_cluster_executor, gate):
    # Stronger than ProcessPoolExecutor, whose waiters never hear of these cancellations.
    ex = make_cluster_executor()
    busy = gate.occupy(ex)
    queued = [ex.submit(square, i) for i in range(6)]
    ex.shutdown(wait=False, cancel_futures=True)
    assert all(f.cancelled() for f in queued)
    done, not_done = wait(queued, timeout=DEADLINE)
    assert not not_done
    assert set(as_completed(queued, timeout=DEADLINE)) == set(queued)
    gate.release()
    assert all(f.result(timeout=DEADLINE) > 0 for f in busy)


def test_cancel_of_a_task_at_the_back_of_the_queue_leaves_the_others_running(make_cluster_executor, gate):
    ex = make_cluster_executor(max_workers=1)
    busy = gate.occupy(ex)
    markers = gate.markers(2 * ex._max_workers + 3)
    queued = [ex.submit(touch, str(m)) for m in markers]
    time.sleep(0.2)
    cancel = set(range(0, len(queued), 2))  # every other one, from the front (at the node) to the back
    for i in sorted(cancel, reverse=True):
        assert queued[i].cancel() is True
    gate.release()
    for future in busy:
        future.result(timeout=DEADLINE)
    for i, (future, marker) in enumerate(zip(queued, markers, strict=True)):
        if i in cancel:
            assert future.cancelled()
        else:
            assert future.result(timeout=DEADLINE) > 0
            assert marker.exists()
    time.sleep(0.3)
    assert [i for i in cancel if markers[i].exists()] == []


def test_running_becomes_true_once_a_task_starts(make_cluster_executor, gate):
    ex = make_cluster_executor(max_workers=1)
    busy = gate.occupy(ex)
    queued = ex.submit(square, 6)
    time.sleep(0.2)
    assert not queued.running()  # waiting for a process: not started
    for future in busy:
        wait_until(future.running, what="running() of a started task")
    gate.release()
    assert queued.result(timeout=DEADLINE) == 36
    assert not queued.running()


def test_max_workers_in_local_mode_runs_that_many_tasks_at_once(gate):
    with ClusterExecutor(max_workers=2) as ex:
        busy = gate.occupy(ex, 2)  # both start although neither finishes
        assert len(busy) == 2
        gate.release()
        assert len({f.result(timeout=DEADLINE) for f in busy}) == 2


def test_max_workers_may_be_given_positionally_in_local_mode():
    ex = ClusterExecutor(3)
    try:
        assert ex._max_workers == 3
        assert ex.submit(square, 4).result(timeout=DEADLINE) == 16
    finally:
        ex.shutdown()


# ============================================================================================ no process left behind


@pytest.mark.parametrize("kind", ["process", "local"])
def test_shutdown_leaves_no_process_behind(kind):
    before = descendants()
    ex = ProcessPoolExecutor(2) if kind == "process" else ClusterExecutor(max_workers=2)
    try:
        assert list(ex.map(square, range(4))) == [0, 1, 4, 9]
        started = descendants() - before
        assert set(ex.map(getpid, range(8))) <= started  # tasks ran in processes this executor started
    finally:
        ex.shutdown()
    assert_all_gone(started)


@pytest.mark.parametrize("kind", ["process", "local"])
def test_garbage_collected_executor_leaves_no_process_behind(kind):
    before = descendants()
    ex = ProcessPoolExecutor(2) if kind == "process" else ClusterExecutor(max_workers=2)
    ref = weakref.ref(ex)
    try:
        assert list(ex.map(square, range(4))) == [0, 1, 4, 9]
        started = descendants() - before
        assert started
        del ex
        gc.collect()
        assert ref() is None, "the executor was not garbage collected"
        assert_all_gone(started)
    finally:
        if ref() is not None:
            ref().shutdown()


@pytest.mark.parametrize("kind", ["process", "local"])
def test_futures_outlive_their_garbage_collected_executor(kind, gate):
    ex = ProcessPoolExecutor(2) if kind == "process" else ClusterExecutor(max_workers=2)
    ref = weakref.ref(ex)
    try:
        (busy,) = gate.occupy(ex, 1)
        queued = [ex.submit(square, i) for i in range(4)]
        del ex
        gc.collect()
        assert ref() is None, "the executor was not garbage collected"
        gate.release()
        assert busy.result(timeout=DEADLINE) > 0
        assert [f.result(timeout=DEADLINE) for f in queued] == [0, 1, 4, 9]
    finally:
        gate.release()
        if ref() is not None:
            ref().shutdown()


_SCRIPT = textwrap.dedent("""
    import json, sys, time
    sys.path.insert(0, {here!r})
    import psutil
    from concurrent.futures import ProcessPoolExecutor
    from clusterexec import ClusterExecutor
    import test_contract

    # The guard, as a script must have it for ProcessPoolExecutor where the start method is not fork
    # (forkserver by default from Python 3.14): its processes import the main module again.
    if __name__ == "__main__":
        kind, marker, mode = sys.argv[1:4]
        ex = ProcessPoolExecutor(2) if kind == "process" else ClusterExecutor(max_workers=2)
        assert list(ex.map(test_contract.square, range(4))) == [0, 1, 4, 9]
        print(json.dumps([p.pid for p in psutil.Process().children(recursive=True)]), flush=True)
        if mode == "pending":
            ex.submit(test_contract.touch_after, marker, 0.5)
        elif mode == "hang":
            time.sleep(60)
        # exit with the executor still open
""")


def _run_script(tmp_path, kind, mode):
    script = tmp_path / "script.py"
    script.write_text(_SCRIPT.format(here=str(HERE)))
    marker = tmp_path / "pending-marker"
    proc = subprocess.Popen([sys.executable, str(script), kind, str(marker), mode],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, marker


def _first_line(proc):
    line = proc.stdout.readline()
    if not line:
        proc.wait(5)
        raise AssertionError(f"the script failed: {proc.stderr.read()}")
    return set(json.loads(line))


@pytest.mark.parametrize("kind", ["process", "local"])
def test_script_exiting_with_the_executor_open_leaves_no_process_behind(tmp_path, kind):
    proc, _ = _run_script(tmp_path, kind, "idle")
    try:
        pids = _first_line(proc)
        assert pids
        _, err = proc.communicate(timeout=DEADLINE)
        assert proc.returncode == 0, err
        assert_all_gone(pids)
    finally:
        reap(proc)


@pytest.mark.parametrize("kind", ["process", "local"])
def test_pending_task_completes_when_a_script_exits_with_the_executor_open(tmp_path, kind):
    proc, marker = _run_script(tmp_path, kind, "pending")
    try:
        pids = _first_line(proc)
        _, err = proc.communicate(timeout=DEADLINE)
        assert proc.returncode == 0, err
        assert marker.exists(), "the task submitted before exit did not run"
        assert_all_gone(pids)
    finally:
        reap(proc)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("case", ["local, unpicklable initargs", "cluster, unpicklable initargs",
                                  "cluster, wrong key", "no master at the address"])
def test_a_constructor_that_raises_leaves_nothing_behind(request, case):
    from clusterexec import AuthenticationError, ClusterUnavailable, SerializationError

    kwargs: dict = {}
    error: type[BaseException] = SerializationError
    if case.startswith("cluster"):
        cluster = request.getfixturevalue("cluster")
        kwargs = {"address": cluster.address, "authkey": cluster.key}
    elif case.startswith("no master"):
        kwargs = {"address": f"127.0.0.1:{_free_port()}", "authkey": "k", "connect_timeout": 1}
        error = ClusterUnavailable
    if case.endswith("initargs"):
        kwargs.update(initializer=set_global, initargs=(threading.Lock(),))
    if case.endswith("wrong key"):
        kwargs["authkey"] = "not the key"
        error = AuthenticationError
    me = psutil.Process()
    threads, fds, children = set(threading.enumerate()), me.num_fds(), descendants()
    with pytest.raises(error):
        ClusterExecutor(**kwargs)
    assert set(threading.enumerate()) == threads
    assert me.num_fds() == fds
    assert_all_gone(descendants() - children)


_NO_WAIT_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {here!r})
    from concurrent.futures import ProcessPoolExecutor
    from clusterexec import ClusterExecutor
    import test_contract

    if __name__ == "__main__":
        kind, address, key = sys.argv[1:4]
        if kind == "process":
            ex = ProcessPoolExecutor(2)
        elif kind == "local":
            ex = ClusterExecutor(max_workers=2)
        else:
            ex = ClusterExecutor(address, authkey=key)
        ex.submit(test_contract.sleep_and_print, 0.5, "apple")
        ex.shutdown(wait=False)
        print("shut down", flush=True)
""")


@pytest.mark.parametrize("kind", ["process", "local", "cluster"])
def test_tasks_pending_at_shutdown_without_wait_run_before_the_program_exits(tmp_path, request, kind):
    # As CPython's test_hang_gh83386: the program's exit waits for them, and their output shows.
    address = key = ""
    if kind == "cluster":
        cluster = request.getfixturevalue("cluster")
        address, key = cluster.address, cluster.key
    script = tmp_path / "no_wait.py"
    script.write_text(_NO_WAIT_SCRIPT.format(here=str(HERE)))
    before = descendants()
    proc = subprocess.run([sys.executable, str(script), kind, address, key], capture_output=True, text=True,
                          timeout=DEADLINE)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "shut down"
    assert len(lines) == 2 and lines[1].endswith("apple"), proc.stdout
    assert proc.stderr == ""
    assert_all_gone(descendants() - before)


def test_local_mode_leaves_no_process_behind_when_the_user_process_is_killed(tmp_path):
    proc, _ = _run_script(tmp_path, "local", "hang")
    try:
        pids = _first_line(proc)
        assert pids
        proc.send_signal(signal.SIGKILL)
        proc.wait(DEADLINE)
        assert_all_gone(pids)
    finally:
        reap(proc)


def test_a_buffered_map_consumed_after_shutdown_yields_what_was_in_flight_then_raises():
    from clusterexec import ClusterExecutor

    with ClusterExecutor(max_workers=1) as ex:
        it = ex.map(square, range(8), buffersize=2)
    got = []
    with pytest.raises(RuntimeError, match="after shutdown"):
        for value in it:
            got.append(value)
    assert got == [0, 1]

"""The client's fast paths give the same results as the slow ones they skip.

    function_blob   a function pickled by reference: its blob cached, never one pickled by value
    dumps           plain data through the C pickler, everything else through cloudpickle
    map             items queued in batches (containers only), buffersize still a bound
    submit          sent from the caller's thread while nothing else is in flight
    Future          resolved with one lock acquisition and a lighter Condition
"""

from __future__ import annotations

import functools
import gc
import math
import pickle
import sys
import threading
import time
import weakref
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, as_completed, wait

import cloudpickle
import pytest
from conftest import private_package as make_package
from conftest import wait_until

from clusterexec import ClusterExecutor, SerializationError
from clusterexec import client as C
from clusterexec import protocol as P
from clusterexec import serialization as S

pytestmark = pytest.mark.timeout(120)


def square(x):
    return x * x


def identity(x):
    return x


def touch(path):
    with open(path, "w"):
        pass
    return path


class Point:
    def __init__(self, x, y):
        self.x = x
        self.y = y

    def __eq__(self, other):
        return type(other) is Point and (self.x, self.y) == (other.x, other.y)


class Meters(int):
    pass


@pytest.fixture
def private_package(tmp_path, monkeypatch):
    """A package importable here but not on the cluster fixture's worker node."""
    with make_package(tmp_path, monkeypatch, "fastpath_pkg_q3",
                      {"__init__.py": "def simulate(x):\n    return x * 10\n"}) as module:
        yield module


# ------------------------------------------------------------------------------------------ function_blob


def test_a_function_pickled_by_reference_is_pickled_once():
    assert S.function_blob(square) is S.function_blob(square)
    assert S.function_blob(len) is S.function_blob(len)
    assert S.function_blob(math.sqrt) is S.function_blob(math.sqrt)
    assert pickle.loads(S.function_blob(square).data) is square


def test_functions_pickled_by_value_are_never_cached():
    state = []

    def closure(x):
        return len(state) + x

    first = S.function_blob(closure)
    state.append(1)  # what it captures changed: a new blob
    assert S.function_blob(closure).hash != first.hash
    part = functools.partial(square, 2)
    assert S.function_blob(part) is not S.function_blob(part)
    lam = lambda x: x  # noqa: E731
    assert S.function_blob(lam) is not S.function_blob(lam)
    bound = [].append  # a builtin bound to an object pickles that object
    assert S.function_blob(bound) is not S.function_blob(bound)
    lam.__module__ = "__main__"
    assert S.function_blob(lam) is not S.function_blob(lam)


def test_the_cache_follows_the_by_value_registry_whoever_changes_it(private_package):
    fn = private_package.simulate
    by_reference = S.function_blob(fn)
    assert S.function_blob(fn) is by_reference
    cloudpickle.register_pickle_by_value(private_package)  # directly, not through modules=
    try:
        by_value = S.function_blob(fn)
        assert by_value.hash != by_reference.hash
        assert S.function_blob(fn) is not by_value
    finally:
        cloudpickle.unregister_pickle_by_value(private_package)
    assert S.function_blob(fn).hash == by_reference.hash


def test_a_rebound_module_attribute_is_not_served_from_the_cache(private_package):
    old = private_package.simulate
    S.function_blob(old)
    private_package.simulate = lambda x: -x
    try:
        # The old function is no longer found under its name: cloudpickle sends it by value now.
        assert S.function_blob(old).hash != S.function_blob(private_package.simulate).hash
        assert pickle.loads(S.function_blob(old).data)(3) == 30
    finally:
        private_package.simulate = old


def test_a_function_cached_by_reference_travels_by_value_with_modules(cluster, private_package):
    S.function_blob(private_package.simulate)  # cached by reference: the worker node cannot import it
    with cluster.executor(modules=[private_package]) as ex:
        assert ex.submit(private_package.simulate, 4).result(timeout=30) == 40
        assert list(ex.map(private_package.simulate, [1, 2])) == [10, 20]


# ------------------------------------------------------------------------------------------ dumps


@pytest.mark.parametrize("obj", [
    None, True, 3, -(1 << 100), 2.5, "text", b"bytes", ((1,), {}), (("a", 2.0, None),), [1, [2, (3, {"k": b""})]],
    {"a": 1, 2: "b"}, ((b"x" * 1000,), {"key": "value"}),
])
def test_plain_data_pickles_to_the_same_bytes_as_through_cloudpickle(obj):
    assert S._plain(obj)
    assert S.dumps(obj, "pickling the arguments") == [cloudpickle.dumps(obj, protocol=S.PROTOCOL)]


def test_anything_else_goes_through_cloudpickle():
    big = b"x" * (S._OOB_MIN + 1)
    assert not S._plain(((big,), {}))
    assert len(S.dumps(((big,), {}), "pickling the arguments")) == 2  # still out of band
    assert not S._plain(list(range(1000)))
    assert not S._plain(((Point(1, 2),), {}))
    assert not S._plain(((Meters(3),), {}))
    loop = []
    loop.append(loop)
    assert not S._plain(loop)
    assert S.loads(S.dumps(loop, "pickling"), "unpickling")[0][0] is not None


def test_a_class_of_main_is_pickled_by_value():
    cls = type("Local", (int,), {"__module__": "__main__"})  # not findable in __main__: plain pickle fails
    with pytest.raises(pickle.PicklingError):
        pickle.dumps(cls(5))
    value = S.loads(S.dumps(((cls(5),), {}), "pickling the arguments"), "unpickling")
    assert value[0][0] == 5 and type(value[0][0]).__name__ == "Local"


# ------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def ex():
    with ClusterExecutor(max_workers=2) as executor:
        yield executor


def test_instances_and_subclasses_from_a_test_module_round_trip(ex):
    assert ex.submit(identity, Point(1, 2)).result(timeout=30) == Point(1, 2)
    value = ex.submit(identity, Meters(7)).result(timeout=30)
    assert type(value) is Meters and value == 7
    assert list(ex.map(identity, [Point(0, 1), None, {"a": [1]}])) == [Point(0, 1), None, {"a": [1]}]


def test_many_sequential_round_trips(ex):
    for i in range(300):
        assert ex.submit(square, i).result(timeout=30) == i * i


def test_map_with_an_unpicklable_item_in_the_middle_of_a_batch(ex):
    items = list(range(600))
    items[300] = threading.Lock()
    it = ex.map(square, items)
    got = [next(it) for _ in range(300)]
    assert got == [i * i for i in range(300)]
    with pytest.raises(SerializationError, match="pickling the arguments"):
        next(it)


def test_map_with_buffersize_has_at_most_that_many_items_taken(ex):
    taken = []

    def items():
        for i in range(1000):
            taken.append(i)
            yield i

    it = ex.map(square, items(), buffersize=5)
    assert len(taken) == 5
    assert next(it) == 0
    assert len(taken) == 6
    assert list(it) == [i * i for i in range(1, 1000)]
    it = ex.map(square, list(range(1000)), buffersize=300)  # a container: batched, still bounded
    assert next(it) == 0
    assert list(it) == [i * i for i in range(1, 1000)]


def test_map_over_a_list_gives_every_result_in_order(ex):
    n = 3000
    assert list(ex.map(square, list(range(n)))) == [i * i for i in range(n)]
    assert list(ex.map(square, range(n), chunksize=7)) == [i * i for i in range(n)]


def test_map_queues_each_item_of_a_generator_as_it_comes(ex, tmp_path):
    """Making the next item may wait for an earlier item's task: that task must not be held back."""

    def items():
        for i in range(3):
            path = tmp_path / f"item-{i}"
            yield str(path)
            wait_until(path.exists, timeout=30, what=f"the task of item {i}")

    assert list(ex.map(touch, items())) == [str(tmp_path / f"item-{i}") for i in range(3)]


def test_map_queues_the_items_before_a_failing_iterable(ex, tmp_path):
    def items():
        for i in range(5):
            yield str(tmp_path / f"before-{i}")
        raise ValueError("the input broke")

    with pytest.raises(ValueError, match="the input broke"):
        ex.map(touch, items())
    for i in range(5):
        wait_until((tmp_path / f"before-{i}").exists, timeout=30, what=f"the task of item {i}")


def test_map_progress_bar_counts_every_item(ex, monkeypatch):
    from clusterexec import progress

    counted = []

    class Bar:
        def update(self, n):
            counted.append(n)

    monkeypatch.setattr(progress, "start", lambda total, name: Bar())
    monkeypatch.setattr(progress, "finish", lambda bar: None)
    assert list(ex.map(square, list(range(700)), progress=True)) == [i * i for i in range(700)]
    wait_until(lambda: sum(counted) == 700, timeout=10, what="the bar's count")
    assert list(ex.map(square, range(50), chunksize=8, progress=True)) == [i * i for i in range(50)]
    wait_until(lambda: sum(counted) == 750, timeout=10, what="the bar's count")


# ------------------------------------------------------------------------------------------ Futures


def test_cluster_future_sets_what_future_sets():
    assert set(vars(Future())) | {"_cx_record"} == set(vars(C.ClusterFuture()))
    # _Condition leaves out exactly the bound methods threading.Condition stores per instance.
    bound = {"acquire", "release", "_release_save", "_acquire_restore", "_is_owned"}
    if sys.version_info >= (3, 14):
        bound.add("locked")
    assert set(vars(threading.Condition())) == {"_lock", "_waiters"} | bound
    assert set(vars(C._Condition())) == {"_lock", "_waiters"}
    assert all(callable(getattr(C._Condition, name, None)) for name in bound)


def test_a_future_condition_answers_what_a_threading_condition_answers():
    mine, theirs = C.ClusterFuture()._condition, threading.Condition(threading.RLock())
    for cond in (mine, theirs):
        assert cond.acquire(timeout=1)
        assert cond._is_owned()
        if sys.version_info >= (3, 14):
            assert cond.locked()
        cond.release()
        assert not cond._is_owned()
        if sys.version_info >= (3, 14):
            assert not cond.locked()
        else:
            assert not hasattr(cond, "locked")


def test_set_result_wakes_result_wait_and_as_completed_and_runs_callbacks():
    futures = [C.ClusterFuture() for _ in range(4)]
    seen = []
    futures[0].add_done_callback(lambda f: seen.append(f.result()))
    box = {}
    threads = [
        threading.Thread(target=lambda: box.setdefault("result", futures[0].result(timeout=10))),
        threading.Thread(target=lambda: box.setdefault("wait", wait(futures[1:3], timeout=10,
                                                                    return_when=FIRST_COMPLETED))),
        threading.Thread(target=lambda: box.setdefault("as_completed", next(as_completed([futures[3]], 10)))),
    ]
    for t in threads:
        t.start()
    time.sleep(0.2)
    C._set_result(futures[0], "zero")
    C._set_exception(futures[2], KeyError("two"))
    C._set_result(futures[3], 3)
    for t in threads:
        t.join(10)
    assert box["result"] == "zero" and seen == ["zero"]
    assert box["wait"].done == {futures[2]}
    assert box["as_completed"] is futures[3]
    with pytest.raises(KeyError):
        futures[2].result()
    C._set_result(futures[2], "late")  # already done: ignored, as before
    futures[1].cancel()
    C._set_result(futures[1], "late")
    assert futures[1].cancelled()


class Oops(Exception):
    pass


def fail(x):
    raise Oops(x)


def test_a_future_and_its_result_go_when_the_caller_drops_them_without_the_gc(ex):
    # Kept until the next garbage collection, a loop over 64 MiB results grew by 64 MiB a task.
    gc.collect()
    gc.disable()
    try:
        done = ex.submit(identity, Point(1, 2))
        failed = ex.submit(fail, 3)
        value = done.result(timeout=30)
        error = failed.exception(timeout=30)
        assert isinstance(error, Oops)
        refs = [weakref.ref(done), weakref.ref(value), weakref.ref(failed), weakref.ref(error)]
        del done, value, failed, error
        wait_until(lambda: all(ref() is None for ref in refs), timeout=5, what="the Futures to be freed")
    finally:
        gc.enable()


def test_cancelled_futures_go_when_the_caller_drops_them_without_the_gc():
    with ClusterExecutor(max_workers=1) as ex:
        blocker = ex.submit(time.sleep, 1.0)
        wait_until(blocker.running, what="the blocker to start")
        gc.collect()
        gc.disable()
        try:
            futures = [ex.submit(identity, Point(i, i)) for i in range(20)]  # queued behind the blocker
            refs = [weakref.ref(f) for f in futures]
            assert all(f.cancel() for f in futures)
            del futures
            wait_until(lambda: all(ref() is None for ref in refs), timeout=5, what="the Futures to be freed")
        finally:
            gc.enable()
        blocker.result(timeout=30)


def test_queue_frame_sends_the_same_bytes_in_fewer_pieces():
    holder = type("Holder", (), {})()
    holder._wbuf = deque()
    buffers = [b"a" * 10, b"", memoryview(b"b" * 5000), b"c" * 20, bytearray(b"d" * 3)]
    C.ClientConnection._queue_frame(holder, {"t": "submit", "tasks": []}, buffers)
    expected = b"".join(bytes(p) for p in P.encode({"t": "submit", "tasks": []}, buffers))
    assert b"".join(bytes(v) for v in holder._wbuf) == expected
    assert all(v.nbytes for v in holder._wbuf) and len(holder._wbuf) < 2 + len(buffers)

"""Local mode moves large arguments and results through /dev/shm: correct, private, and nothing left behind."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from conftest import _env, is_gone, reap, wait_until

from clusterexec import ClusterError, ClusterExecutor, SerializationError, TaskKilled, TaskTimeout, WorkerLostError
from clusterexec import protocol as P
from clusterexec import shm as SHM
from clusterexec.client import ClusterFuture, _Record

pytestmark = [pytest.mark.timeout(90),
              pytest.mark.skipif(not SHM.available(), reason="needs a writable /dev/shm")]


def segments(prefix: str) -> list[str]:
    return glob.glob(os.path.join(SHM.SHM_DIR, glob.escape(prefix), "*"))


def in_use(prefix: str) -> list[str]:
    """Segments of PREFIX outside the pool of free ones."""
    return [path for path in segments(prefix) if not path.endswith(SHM.FREE)]


def pooled(prefix: str) -> int:
    return sum(os.stat(path).st_size for path in segments(prefix) if path.endswith(SHM.FREE))


def identity(x):
    return x


def scale_in_place(a, factor):
    a *= factor  # the task's copy: the caller's array must not change
    return float(a.sum())


def die_once_then_measure(marker, data):
    if not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(3)
    return len(data), data[:4], data[-4:]


def test_large_bytes_and_arrays_round_trip_and_leave_nothing_behind():
    payload = os.urandom(8 << 20)
    array = np.random.default_rng(1).random(1 << 20)
    with ClusterExecutor(max_workers=2) as ex:
        prefix = ex._shm_prefix
        assert prefix
        # The cluster's segments are in a directory of its own, which only this user may enter.
        assert os.stat(os.path.join(SHM.SHM_DIR, prefix)).st_mode & 0o777 == 0o700
        assert ex.submit(identity, payload).result(timeout=60) == payload
        back = ex.submit(identity, array).result(timeout=60)
        assert np.array_equal(back, array)
        back[0] = -1.0  # what comes back is an ordinary writable array
        results = list(ex.map(identity, [payload[: (1 << 20) + i] for i in range(6)]))
        assert [len(r) for r in results] == [(1 << 20) + i for i in range(6)]
        assert ex.submit(identity, (payload, {"k": payload})).result(timeout=60) == (payload, {"k": payload})
        wait_until(lambda: not in_use(prefix), what="the segments to be removed or pooled")
        assert 0 < pooled(prefix) <= SHM.pool_limit()
    assert not os.path.exists(os.path.join(SHM.SHM_DIR, prefix))  # its directory too


def test_a_task_changes_only_its_own_copy():
    array = np.ones(1 << 20)
    with ClusterExecutor(max_workers=1) as ex:
        assert ex.submit(scale_in_place, array, 3.0).result(timeout=60) == 3.0 * array.size
        assert ex.submit(scale_in_place, array, 2.0).result(timeout=60) == 2.0 * array.size
    assert (array == 1.0).all()


def test_a_retried_task_finds_its_arguments_again(tmp_path):
    data = os.urandom(4 << 20)
    with ClusterExecutor(max_workers=1) as ex:
        prefix = ex._shm_prefix
        size, head, tail = ex.submit(die_once_then_measure, str(tmp_path / "died"), data).result(timeout=60)
        wait_until(lambda: not in_use(prefix), what="the segments to be removed or pooled")
    assert (size, head, tail) == (len(data), data[:4], data[-4:])


def test_pooled_segments_carry_each_payload_whole_whatever_its_size():
    # Each segment is written over a pooled one of another size: shrunk, grown, or the same.
    sizes = [8 << 20, 2 << 20, 12 << 20, (1 << 20) + 1, 12 << 20, 5 << 20]
    payloads = [bytes([i]) * 7 + os.urandom(size - 7) for i, size in enumerate(sizes)]
    with ClusterExecutor(max_workers=2) as ex:
        prefix = ex._shm_prefix
        for payload in payloads:
            assert ex.submit(identity, payload).result(timeout=60) == payload
        assert list(ex.map(identity, payloads * 3)) == payloads * 3  # in flight together, pool shared
        wait_until(lambda: not in_use(prefix), what="the segments to be removed or pooled")
        assert 0 < pooled(prefix) <= SHM.pool_limit()


def hold_then_measure(seconds, data):
    time.sleep(seconds)
    return len(data)


@pytest.mark.parametrize("end", ["kill", "timeout"])
def test_the_argument_of_a_killed_task_is_removed_not_pooled(end):
    # A killed task's process may still be reading its arguments: its segment must never be written again.
    with ClusterExecutor(max_workers=1) as ex:
        prefix = ex._shm_prefix
        submit = ex.options(timeout=1).submit if end == "timeout" else ex.submit
        future = submit(hold_then_measure, 30, os.urandom(4 << 20))
        wait_until(future.running, what="the task to start")
        assert len(in_use(prefix)) == 1
        if end == "kill":
            assert ex.kill(future)
        with pytest.raises(TaskKilled if end == "kill" else TaskTimeout):
            future.result(timeout=30)
        wait_until(lambda: not in_use(prefix), what="the segment to be removed")
        assert pooled(prefix) == 0
        assert ex.submit(hold_then_measure, 0, os.urandom(4 << 20)).result(timeout=60) == 4 << 20
        wait_until(lambda: not in_use(prefix), what="the segment to be pooled")
        assert pooled(prefix) == 4 << 20


def test_task_processes_write_their_results_over_pooled_segments_too():
    data = os.urandom(2 << 20)
    with ClusterExecutor(max_workers=1) as ex:
        prefix = ex._shm_prefix

        def pool_after(rounds):
            for _ in range(rounds):
                assert ex.submit(identity, data).result(timeout=60) == data
            wait_until(lambda: not in_use(prefix), what="the segments to be pooled")
            return sorted(os.path.basename(p) for p in segments(prefix))

        first = pool_after(2)
        # Each round the client takes a segment for the argument and the task process one for the result,
        # and both come back: the pool neither grows nor shrinks. (Had the task process written a new file,
        # it would grow by one a round.)
        assert len(pool_after(5)) == len(first) == 2


def test_a_segment_name_in_use_is_never_written_over(monkeypatch):
    prefix = SHM.new_prefix()
    try:
        SHM.recycle([SHM.put(os.urandom(1 << 20), prefix)], prefix)
        monkeypatch.setattr(SHM, "_counter", iter([7]))
        taken = os.path.join(SHM.SHM_DIR, prefix, f"{prefix}-{os.getpid()}-7")
        with open(taken, "wb") as f:  # (a process of a reused pid left it, say)
            f.write(b"someone else's")
        with pytest.raises(FileExistsError):
            SHM.put(os.urandom(1 << 20), prefix)
        with open(taken, "rb") as f:
            assert f.read() == b"someone else's"
        assert pooled(prefix) == 1 << 20  # and the pooled segment is still there
    finally:
        SHM.remove_prefix(prefix)


def test_the_pool_gives_the_smallest_free_segment_that_fits_and_keeps_to_its_limit(monkeypatch):
    prefix = SHM.new_prefix()
    try:
        small, large = SHM.put(os.urandom(1 << 20), prefix), SHM.put(os.urandom(3 << 20), prefix)
        SHM.recycle([small, large], prefix)
        assert pooled(prefix) == 4 << 20 and not in_use(prefix)
        data = os.urandom((1 << 20) - 5)
        marker = SHM.put(data, prefix)  # over the 1 MiB one, cut to size
        assert pooled(prefix) == 3 << 20
        assert SHM.get(marker, prefix, unlink=True) == data  # read whole into a new bytes, and pooled again
        assert pooled(prefix) == (4 << 20) - 5
        monkeypatch.setattr(SHM, "_pool_limit", 5 << 20)
        over = SHM.put(os.urandom(2 << 20), prefix)  # takes the 3 MiB one (the only one that fits)
        assert pooled(prefix) == (1 << 20) - 5
        also = SHM.put(os.urandom(5 << 20), prefix)  # none fits: the largest is grown
        assert pooled(prefix) == 0
        SHM.recycle([over, also], prefix)  # 2 MiB fits under the limit; 5 MiB more would not: removed
        assert pooled(prefix) == 2 << 20 and not in_use(prefix)
        array = memoryview(os.urandom(2 << 20)).cast("d")
        mapped = SHM.put(array, prefix)  # anything but a bytes is mapped where it lies, and only removed
        back = SHM.get(mapped, prefix, unlink=True)
        assert isinstance(back, memoryview) and back.tobytes() == array.tobytes()
        assert not segments(prefix)
    finally:
        SHM.remove_prefix(prefix)


def pause(seconds):
    time.sleep(seconds)


def zeros(n):
    return bytes(n)


class _ExitOnFlush:
    """Stands in for sys.stdout: a task process flushes it right after writing a result to shared memory."""

    def write(self, text):
        return len(text)

    def flush(self):
        os._exit(3)


def zeros_then_die(n):
    sys.stdout = _ExitOnFlush()
    return bytes(n)


def test_a_result_written_by_a_process_that_died_before_sending_it_is_removed():
    with ClusterExecutor(max_workers=1) as ex:
        prefix = ex._shm_prefix
        future = ex.options(retries=0).submit(zeros_then_die, 2 << 20)
        with pytest.raises(WorkerLostError):
            future.result(timeout=60)
        # The dead process wrote its result's segment but never sent the marker: no one else knows its name.
        wait_until(lambda: not in_use(prefix), what="the dead process's segment to be removed")
        assert ex.submit(zeros, 2 << 20).result(timeout=60) == bytes(2 << 20)  # and the cluster goes on


def test_a_result_nobody_wants_any_more_is_removed_or_pooled():
    with ClusterExecutor(max_workers=1) as ex:
        prefix = ex._shm_prefix
        for _ in range(20):  # both functions quick, so a task of one queues in the process behind the other
            ex.submit(pause, 0).result(timeout=60)
            ex.submit(zeros, 1).result(timeout=60)
        first = ex.submit(pause, 0.5)
        unwanted = ex.submit(zeros, 2 << 20)  # queued behind it; its result will be discarded
        wait_until(first.running, what="the first task to start")
        assert ex.kill(unwanted)
        with pytest.raises(TaskKilled):
            unwanted.result(timeout=30)
        first.result(timeout=30)
        wait_until(lambda: not in_use(prefix), what="the unwanted result's segment to be removed or pooled")


def test_only_the_unsent_results_of_the_dead_process_are_removed():
    prefix = SHM.new_prefix()
    try:
        mine = {task: SHM.put(os.urandom(1 << 20), prefix, task) for task in (1, 12, 2)}
        untagged = SHM.put(os.urandom(1 << 20), prefix)  # an argument, say
        SHM.recycle([SHM.put(os.urandom(1 << 20), prefix, 1)], prefix)  # in the pool: everyone's
        SHM.remove_unsent(prefix, os.getpid() + 1, {1, 12, 2})  # another process's: none of these
        assert len(in_use(prefix)) == 4
        SHM.remove_unsent(prefix, os.getpid(), {1, 2})
        assert SHM.get(mine[12], prefix) and SHM.get(untagged, prefix)
        assert sorted(in_use(prefix)) == sorted(os.path.join(SHM.SHM_DIR, prefix, SHM._parse(m, prefix)[1])
                                                for m in (mine[12], untagged))
        assert pooled(prefix) == 1 << 20
    finally:
        SHM.remove_prefix(prefix)


def test_a_marker_is_honoured_only_for_a_segment_of_this_cluster():
    # Markers come from peers: one must not make this process read or remove another cluster's segments,
    # or any other file.
    mine, theirs = SHM.new_prefix(), SHM.new_prefix()
    try:
        data = os.urandom(1 << 20)
        their_marker = SHM.put(data, theirs)
        for marker in [their_marker, SHM.MARKER_COPIED + b"clusterexec-1-2-3/../../etc/passwd",
                       SHM.MARKER_COPIED + their_marker[len(SHM.MARKER_COPIED):] + b"\0",
                       SHM.MARKER + b"../../etc-passwd-x-y", b"clusterexec-shm-copied:\xff\xfe-1-2"]:
            with pytest.raises(ValueError):
                SHM.get(marker, mine, unlink=True)
            SHM.recycle([marker], mine)
            SHM.remove([marker], mine)
        assert SHM.get(their_marker, theirs) == data  # untouched, and still there
    finally:
        SHM.remove_prefix(mine)
        SHM.remove_prefix(theirs)


def test_a_result_claiming_shared_memory_from_a_remote_worker_fails_alone(cluster):
    # Shared memory is for local mode: a worker elsewhere cannot have the client open files by name.
    with ClusterExecutor(cluster.address, authkey=cluster.key) as ex:
        future = ex.submit(identity, 1)
        assert future.result(timeout=60) == 1
        record = _Record(ex._conn, 0, ClusterFuture(), None, False)
        ex._conn._resolve(record, "ok", [b"x", SHM.MARKER_COPIED + b"clusterexec-1-2-3"], {"shm": [1]})
        with pytest.raises(SerializationError, match="shared memory"):
            record.future.result(timeout=5)
        assert ex.submit(identity, 2).result(timeout=60) == 2


@pytest.mark.parametrize("info", [{"shm": ["x", 7, None]}, {"shm": 3}, "not a dict", ["shm"]])
def test_a_malformed_result_fails_its_own_future_and_the_client_goes_on(info):
    with ClusterExecutor(max_workers=1) as ex:
        conn = ex._conn
        records = [_Record(conn, tid, ClusterFuture(), None, False) for tid in (10**9, 10**9 + 1)]
        with conn._lock:
            for record in records:
                conn._pending[record.id] = record
        items = [[records[0].id, "ok", 1, info], [records[1].id, "raise", 0, info]]
        conn._handle([P.Message({"t": "results", "items": items}, [memoryview(b"x")])])
        for record in records:  # each fails alone, with a clusterexec error; nothing hangs
            with pytest.raises(ClusterError):
                record.future.result(timeout=5)
        assert ex.submit(identity, 3).result(timeout=60) == 3
        # A duplicate (its record already gone) with such an info is dropped without harm too.
        conn._handle([P.Message({"t": "results", "items": [[records[0].id, "ok", 1, info]]}, [memoryview(b"x")])])
        assert ex.submit(identity, 4).result(timeout=60) == 4


KILLED_CLIENT = textwrap.dedent("""
    import os, sys, time
    from clusterexec import ClusterExecutor, TaskKilled, TaskTimeout, WorkerLostError

    def hold(data):
        time.sleep(60)

    def big(_):
        return os.urandom(2 << 20)

    ex = ClusterExecutor(max_workers=2)
    futures = [ex.submit(hold, os.urandom(2 << 20)) for _ in range(4)]
    done = ex.submit(big, 0)  # its result segment is written; the client dies before reading... or after
    print(ex._shm_prefix, ex._local.process.pid, flush=True)
    time.sleep(60)
""")


def test_a_killed_client_leaves_no_segment_behind(tmp_path):
    script = tmp_path / "client.py"
    script.write_text(KILLED_CLIENT)
    client = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, env=_env())
    try:
        prefix, child = client.stdout.readline().decode().split()
        wait_until(lambda: len(segments(prefix)) >= 4, what="the argument segments")
        client.send_signal(signal.SIGKILL)
        client.wait(10)
        wait_until(lambda: is_gone(int(child)), timeout=20, what="the local cluster to stop")
        assert not os.path.exists(os.path.join(SHM.SHM_DIR, prefix))  # its directory too
    finally:
        reap(client)

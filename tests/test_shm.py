"""Local mode moves large arguments and results through /dev/shm: correct, private, and nothing left behind."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import _env, is_gone, reap, wait_until

from clusterexec import ClusterExecutor
from clusterexec import shm as SHM

pytestmark = [pytest.mark.timeout(90),
              pytest.mark.skipif(not SHM.available(), reason="needs a writable /dev/shm")]


def segments(prefix: str) -> list[str]:
    return glob.glob(os.path.join(SHM.SHM_DIR, glob.escape(prefix) + "-*"))


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
        assert ex.submit(identity, payload).result(timeout=60) == payload
        back = ex.submit(identity, array).result(timeout=60)
        assert np.array_equal(back, array)
        back[0] = -1.0  # what comes back is an ordinary writable array
        results = list(ex.map(identity, [payload[: (1 << 20) + i] for i in range(6)]))
        assert [len(r) for r in results] == [(1 << 20) + i for i in range(6)]
        assert ex.submit(identity, (payload, {"k": payload})).result(timeout=60) == (payload, {"k": payload})
        wait_until(lambda: not segments(prefix), what="the segments to be removed")
    assert not segments(prefix)


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
        wait_until(lambda: not segments(prefix), what="the segments to be removed")
    assert (size, head, tail) == (len(data), data[:4], data[-4:])


KILLED_CLIENT = textwrap.dedent("""
    import os, sys, time
    from clusterexec import ClusterExecutor

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
        assert not segments(prefix)
    finally:
        reap(client)

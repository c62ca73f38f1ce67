"""Quick tasks are pipelined: the agent queues several in each task process, and a task process sends the
results of quick ones together. None of that may change what a user sees: a process dying among queued
tasks charges only the task it died of, a killed task leaves the tasks queued behind it unharmed, output
still reaches the client, and a long task does not hold up the quick ones that come after it.

Real master and worker processes, as everywhere (see conftest.py).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from clusterexec import TaskKilled, WorkerLostError

pytestmark = pytest.mark.timeout(60)

RESULT_TIMEOUT = 30


def square(x):
    return x * x


def die_at(x, poison):
    if x == poison:
        os._exit(3)
    return x


def sleep_marked(marker, seconds):
    Path(marker).write_text("started")
    time.sleep(seconds)
    return "slept"


def shout(x):
    print(f"item {x} says hello")
    return x


def test_a_process_dying_among_queued_quick_tasks_charges_only_the_task_it_died_of(cluster):
    """With no retries, a crash fails exactly one Future: tasks that had finished in that process (their
    results still held back there) and tasks queued behind it run again, uncharged."""
    with cluster.executor() as ex:
        futures = [ex.options(retries=0).submit(die_at, x, 2500) for x in range(4000)]
        failed = []
        for x, f in enumerate(futures):
            try:
                assert f.result(timeout=RESULT_TIMEOUT) == x
            except WorkerLostError:
                failed.append(x)
        assert failed == [2500]
        assert ex.submit(square, 7).result(timeout=RESULT_TIMEOUT) == 49


def test_a_poison_item_among_quick_ones_is_retried_on_its_own_budget(cluster, tmp_path):
    """Each attempt at the poison item kills a process full of queued quick tasks; every other item still
    succeeds, and the poison one fails only after its own three attempts."""
    with cluster.executor() as ex:
        futures = [ex.submit(die_at, x, 1000) for x in range(3000)]
        with pytest.raises(WorkerLostError):
            futures[1000].result(timeout=RESULT_TIMEOUT)
        assert [f.result(timeout=RESULT_TIMEOUT) for i, f in enumerate(futures) if i != 1000] == [
            x for x in range(3000) if x != 1000]


def test_killing_a_long_task_spares_the_quick_tasks_queued_behind_it(cluster, tmp_path):
    marker = tmp_path / "started"
    with cluster.executor() as ex:
        before = [ex.submit(square, x) for x in range(1000)]
        long = ex.submit(sleep_marked, str(marker), 120)
        after = [ex.submit(square, x) for x in range(1000)]
        deadline = time.monotonic() + RESULT_TIMEOUT
        while not marker.exists():
            assert time.monotonic() < deadline, "the long task never started"
            time.sleep(0.01)
        assert ex.kill(long)
        with pytest.raises(TaskKilled):
            long.result(timeout=RESULT_TIMEOUT)
        assert [f.result(timeout=RESULT_TIMEOUT) for f in before + after] == [x * x for x in range(1000)] * 2


def test_a_long_task_does_not_hold_up_the_quick_tasks_after_it(cluster, tmp_path):
    """Only the few quick tasks already queued behind it in its process wait for it; the other process
    runs the rest meanwhile."""
    with cluster.executor() as ex:
        for f in [ex.submit(square, x) for x in range(2000)]:  # the processes are known to be quick now
            f.result(timeout=RESULT_TIMEOUT)
        long = ex.submit(sleep_marked, str(tmp_path / "m"), 4)
        after = [ex.submit(square, x) for x in range(2000)]
        seen = threading.Event()
        done_when_long_ended = []

        def snapshot(_):
            done_when_long_ended.append(sum(f.done() for f in after))
            seen.set()

        long.add_done_callback(snapshot)
        assert long.result(timeout=RESULT_TIMEOUT) == "slept"
        assert seen.wait(RESULT_TIMEOUT)
        assert done_when_long_ended[0] >= 2000 - 200, done_when_long_ended
        assert [f.result(timeout=RESULT_TIMEOUT) for f in after] == [x * x for x in range(2000)]


def test_every_line_printed_by_quick_tasks_reaches_the_client(cluster, capfd):
    with cluster.executor() as ex:
        assert list(ex.map(shout, range(1500))) == list(range(1500))
    out = capfd.readouterr().out
    lines = [line for line in out.splitlines() if "says hello" in line]
    assert sorted(int(line.split("item ")[1].split()[0]) for line in lines) == list(range(1500))


def nap_on_node(seconds):
    time.sleep(seconds)
    return os.getppid()  # the worker node's agent


def test_a_node_gives_back_what_it_took_ahead_once_tasks_turn_slow(cluster):
    """Quick tasks make a node ask for many tasks ahead of time. When the next ones turn out slow it gives
    back what it holds beyond its due, so that a node joining now shares the slow work."""
    first = cluster.workers[0].pid
    with cluster.executor() as ex:
        assert list(ex.map(square, range(3000))) == [x * x for x in range(3000)]
        slow = [ex.submit(nap_on_node, 1.0) for _ in range(16)]
        time.sleep(0.5)  # the first node has had them all handed over by now, and has seen them turn slow
        second = cluster.start_worker(2).pid
        nodes = [f.result(timeout=RESULT_TIMEOUT) for f in slow]
    assert set(nodes) <= {first, second}
    assert nodes.count(second) >= 4, nodes

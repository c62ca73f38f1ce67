"""SIGTERM and Ctrl-C: a worker node finishes or hands back its tasks, charging no retry; the master tells
its clients why it goes."""

from __future__ import annotations

import logging
import os
import signal
import time

import pytest
from conftest import wait_until

from clusterexec import ClusterUnavailable, TaskKilled

pytestmark = pytest.mark.timeout(90)


def napping(seconds, tag):
    time.sleep(seconds)
    return tag, os.getpid()


def test_sigterm_lets_running_tasks_finish_and_hands_back_the_queued(tmp_path, empty_cluster):
    c = empty_cluster
    leaving = c.start_worker(2)
    with c.executor() as ex:
        ex = ex.options(retries=0)  # a handed-back task must not count as a failed attempt
        running = [ex.submit(napping, 1.5, i) for i in range(2)]
        queued = [ex.submit(napping, 0.1, i) for i in range(2, 6)]
        wait_until(lambda: all(f.running() for f in running), what="the first tasks to start")
        leaving.send_signal(signal.SIGTERM)
        c.start_worker(2)
        done_first = [f.result(timeout=30) for f in running]
        done_later = [f.result(timeout=30) for f in queued]
    assert [tag for tag, _ in done_first] == [0, 1]
    assert [tag for tag, _ in done_later] == [2, 3, 4, 5]
    # The running ones finished where they were; the queued ones ran on the new node.
    assert not {pid for _, pid in done_first} & {pid for _, pid in done_later}
    assert leaving.wait(10) == 0
    assert "handed back" in (tmp_path / "master.log").read_text()


def test_tasks_still_running_after_the_grace_period_are_handed_back(empty_cluster):
    c = empty_cluster
    leaving = c.start_worker(1, "--grace", "0.5")
    with c.executor() as ex:
        future = ex.options(retries=0).submit(napping, 4, "long")
        wait_until(future.running, what="the task to start")
        started = time.monotonic()
        leaving.send_signal(signal.SIGTERM)
        assert leaving.wait(10) == 0
        assert time.monotonic() - started < 5, "the worker should leave after its grace period"
        c.start_worker(1)
        assert future.result(timeout=30)[0] == "long"  # ran again elsewhere, though retries=0


def test_a_second_signal_hands_back_at_once(empty_cluster):
    c = empty_cluster
    leaving = c.start_worker(1, "--grace", "60")
    with c.executor() as ex:
        future = ex.options(retries=0).submit(napping, 30, "long")
        wait_until(future.running, what="the task to start")
        leaving.send_signal(signal.SIGINT)
        time.sleep(0.3)
        assert leaving.poll() is None, "the first signal waits for the running task"
        leaving.send_signal(signal.SIGINT)
        assert leaving.wait(10) == 0
        assert not future.done()
        info = c.wait_for(lambda i: not i["workers"], what="the node to leave")
        assert info["queued"] == 1  # handed back, waiting for a node
        assert ex.kill(future)
        with pytest.raises(TaskKilled):
            future.result(timeout=10)


def test_the_master_tells_clients_why_it_goes(empty_cluster, caplog):
    c = empty_cluster
    c.start_worker(1)
    with caplog.at_level(logging.WARNING, logger="clusterexec.client"):
        ex = c.executor(reconnect_window=1.0)
        try:
            future = ex.submit(napping, 30, "never")
            wait_until(future.running, what="the task to start")
            c.master.send_signal(signal.SIGTERM)
            with pytest.raises(ClusterUnavailable) as info:
                future.result(timeout=20)
        finally:
            ex.shutdown(wait=False, cancel_futures=True)
    assert "the master shut down (the master received SIGTERM)" in str(info.value)
    assert "shutting down (the master received SIGTERM)" in caplog.text
    assert c.master.wait(10) == 0

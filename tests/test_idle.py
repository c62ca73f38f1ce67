"""Idle means idle: a worker agent with nothing to do sleeps until the master speaks, whatever it ran before."""

from __future__ import annotations

import time

import psutil
import pytest

pytestmark = pytest.mark.timeout(60)

WINDOW = 2.0  # seconds the agent is watched
# The master's heartbeat, the agent's watchdog and a few late flushes wake it a handful of times in WINDOW.
# A timer that fires every 20 ms would wake it about 100 times.
MOST_WAKEUPS = 25


def wakeups(pid: int, seconds: float) -> int:
    """How many times the process went to sleep and was woken (voluntary context switches) in `seconds`."""
    process = psutil.Process(pid)
    before = process.num_ctx_switches().voluntary
    time.sleep(seconds)
    return process.num_ctx_switches().voluntary - before


def test_an_agent_sleeps_after_a_map_of_quick_tasks(cluster):
    agent = cluster.workers[0].pid
    with cluster.executor() as ex:
        # Quick tasks: the agent pipelines them and asks the master for more ahead of time.
        assert list(ex.map(abs, range(-5000, 0))) == list(range(5000, 0, -1))
        time.sleep(0.5)  # (the last results and the master's acknowledgements settle)
        woken = wakeups(agent, WINDOW)
        assert woken <= MOST_WAKEUPS, f"an idle agent woke {woken} times in {WINDOW:g} s"
        # And it still wakes for work.
        assert list(ex.map(abs, range(-3, 0))) == [3, 2, 1]

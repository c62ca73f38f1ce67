"""A function used many times is shipped once: per hop by content hash, never cached by object identity.

    client ──blob once──▶ master ──blob once──▶ node agent ──blob once per task process──▶ unpickled once there

The closure below captures a `Recorder`: 50 MB of bytes plus a value, whose unpickling appends the pid of
the unpickling process to a log file. Counting the lines per pid tells how often each task process received
and unpickled the function; the kernel's counters of the master's TCP connections tell how many bytes crossed it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from conftest import agent_children

PAYLOAD_MB = 50
ITEMS = 200


class Recorder:
    """A big object that logs (by pid) every time it is unpickled."""

    def __init__(self, log: str, payload: bytes, value: int):
        self.log = log
        self.payload = payload
        self.value = value

    def __reduce__(self):
        return _rebuild, (self.log, self.payload, self.value)


def _rebuild(log: str, payload: bytes, value: int) -> Recorder:
    with open(log, "a") as f:
        f.write(f"{os.getpid()}\n")
    return Recorder(log, payload, value)


def closure_over(state: Recorder):
    # A nested function is pickled by value, with `state` in its closure cell: the whole 50 MB travels.
    def task(x: int) -> tuple[int, int, int]:
        return x + state.value, len(state.payload), os.getpid()

    return task


def unpicklings(log: Path) -> Counter:
    if not log.exists():
        return Counter()
    return Counter(int(line) for line in log.read_text().split())


def master_traffic(port: int) -> tuple[int, int]:
    """(bytes received, bytes sent) over the master's open TCP connections, from the kernel (`ss -ti`)."""
    out = subprocess.run(["ss", "-tinH", "state", "established", f"( sport = :{port} )"],
                         capture_output=True, text=True, check=True).stdout
    received = sum(int(n) for n in re.findall(r"bytes_received:(\d+)", out))
    sent = sum(int(n) for n in re.findall(r"bytes_sent:(\d+)", out))
    return received, sent


needs_ss = pytest.mark.skipif(sys.platform != "linux" or shutil.which("ss") is None,
                              reason="counts the master's bytes with Linux's `ss -ti`")


@needs_ss
@pytest.mark.timeout(180)
def test_closure_over_50_mb_is_shipped_once_per_task_process_and_never_stale(cluster, tmp_path):
    log = tmp_path / "unpickled.log"
    state = Recorder(str(log), os.urandom(PAYLOAD_MB << 20), value=1)
    task = closure_over(state)
    agent_pid = cluster.workers[0].pid
    size = len(state.payload)

    with cluster.executor() as ex:
        received0, sent0 = master_traffic(cluster.port)
        out = list(ex.map(task, range(ITEMS), chunksize=1))
        received1, sent1 = master_traffic(cluster.port)
        assert [(x, n) for x, n, _ in out] == [(i + 1, size) for i in range(ITEMS)]
        ran_in = {pid for _, _, pid in out}
        counts = unpicklings(log)
        # Each task process that ran tasks unpickled the closure exactly once, and nobody else did
        # (retries would add processes, never a second unpickling in the same one).
        assert set(counts) == ran_in
        assert max(counts.values()) == 1
        assert ran_in <= agent_children(agent_pid)  # no process died, so no retry: at most the node's 2
        # Bytes through the master: per task they would be 200 × 50 MB = 10 GB each way; shipped once, the
        # master reads one copy from the client and writes one copy to the node.
        assert size <= received1 - received0 < 2 * size, received1 - received0
        assert size <= sent1 - sent0 < 2 * size, sent1 - sent0

        # The same function object, its captured state changed: the new content has a new hash, so the
        # second map ships (and unpickles) the new state; an identity cache would have run the old one.
        state.value = 1000
        out = list(ex.map(task, range(ITEMS), chunksize=1))
        assert [x for x, _, _ in out] == [i + 1000 for i in range(ITEMS)]
        ran_in_too = {pid for _, _, pid in out}
        counts = unpicklings(log)
        assert all(counts[pid] <= 2 for pid in counts)
        assert all(counts[pid] >= 1 for pid in ran_in_too)
        assert sum(counts.values()) <= len(ran_in) + len(ran_in_too)

        # And back to the first value: still the value of now, whatever is cached.
        state.value = 1
        assert ex.submit(task, 5).result()[0] == 6


@needs_ss
@pytest.mark.timeout(180)
def test_repeated_submit_of_a_big_closure_crosses_the_master_once(cluster, tmp_path):
    log = tmp_path / "unpickled.log"
    state = Recorder(str(log), os.urandom(PAYLOAD_MB << 20), value=7)
    task = closure_over(state)
    size = len(state.payload)
    with cluster.executor() as ex:
        received0, sent0 = master_traffic(cluster.port)
        futures = [ex.submit(task, i) for i in range(20)]
        out = [f.result() for f in futures]
        received1, sent1 = master_traffic(cluster.port)
    assert [x for x, _, _ in out] == [i + 7 for i in range(20)]
    counts = unpicklings(log)
    assert set(counts) == {pid for _, _, pid in out}
    assert max(counts.values()) == 1
    assert size <= received1 - received0 < 2 * size
    assert size <= sent1 - sent0 < 2 * size

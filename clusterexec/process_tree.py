"""The process tree below a worker node: who is whose child, and killing what a task left running.

    agent (subreaper) ──fork──▶ task process (its own session, a subreaper too) ──▶ what its tasks start
                                                                                    └─▶ their orphans

Both the agent (see worker.py) and each task process (see task_process.py) are child subreapers: an orphan
comes back to the nearest of them, not to init, and `children` finds it there. Every pid these functions
signal is a child not yet reaped, or a group its unreaped leader holds: the signal cannot reach a stranger.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36


def prctl(option: int, value: int) -> None:
    """Linux's prctl(2) for this process, where there is one (elsewhere, or if it fails, nothing happens)."""
    if sys.platform != "linux":
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def become_subreaper() -> None:
    """Orphans of our descendants come to us instead of init (PR_SET_CHILD_SUBREAPER); not inherited."""
    prctl(PR_SET_CHILD_SUBREAPER, 1)


def children(pid: int) -> list[int]:
    """The pids of a process's children, zombies included."""
    if not os.path.exists(f"/proc/{pid}/task/{pid}/children"):
        return _children_by_scan(pid)  # a kernel without CONFIG_PROC_CHILDREN
    kids: list[int] = []
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return kids
    for tid in threads:  # (a child belongs to the thread that forked it, or that adopted it)
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                kids.extend(int(k) for k in f.read().split())
        except OSError:
            continue  # a thread that has ended
    return kids


def _children_by_scan(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat[stat.rindex(b")") + 2:].split()[1]) == pid:
                kids.append(int(entry))
    return kids


def kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def kill_group(pid: int) -> None:
    """SIGKILL to the process group `pid` leads, or to `pid` alone if it leads none (yet: a task process
    makes its session early, but may be killed before)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        kill_quietly(pid)

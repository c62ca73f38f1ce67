"""A worker node's state, without I/O: which task waits, which process holds which, what the master hears.

    master ─"tasks"─▶ tasks_arrived ─▶ queue ─dispatch(now)─▶ Dispatch.runs {process: [task, …]}: the agent
                                                │               sends each list to its process as one "run"
                                                └─ a quick function's tasks wait in a quick process, behind
                                                   the one it runs (pipelined); see Process.depth
    task process ─result─▶ result(…) ──┐
                 ─output─▶ printed(…) ─┼─▶ outbox ─flush(now)─▶ "output", "results", "prefetch" messages
                 ─died──▶ process_died ┘      (its culprit reported, its other tasks queued again)
    master ─cancel/drop/kill─▶ cancel, drop, kill_tasks ─▶ the reply, processes to kill, "killed" results
    leaving ─▶ leave(): the queue goes back; hand_back_running(): what still runs when the grace is over

The agent (worker.py) owns the sockets, the processes, the clock and the timers. It feeds events in and does
what comes back: it sends, kills, forks and arms timers. Nothing here blocks, reads the clock or signals
anyone (`now` comes in as an argument), so every decision is tested without a process: tests/test_node_state.py.

Ids are the master's ids for tasks (it never sees ours: we have none). A process's tasks run in the order
they were given; the first is the one it runs (or is about to).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator
from typing import Any, NamedTuple

from . import protocol as P

# Short tasks are pipelined: a task process that is quick to answer gets further tasks queued behind the one
# it runs, about PIPELINE_WORK seconds of them (at most PIPELINE_MAX), so it finds its next task waiting
# instead of sleeping until the agent is scheduled again. A task that takes PIPELINE_WORK or longer is sent
# to an idle process only; so is one with a time limit, max_tasks_per_child or a suspect past.
PIPELINE_WORK = 0.005
PIPELINE_MAX = 64
SLOW_AFTER = 0.05  # seconds a task runs before its node stops asking for tasks ahead of time (see ask_prefetch)
NOT_PIPELINED = ("timeout", "mtpc", "confirm")
_FN_TIMES_MAX = 1024  # functions whose recent task durations the node remembers
_INF = float("inf")


def default_nprocs() -> int:
    """Task processes per node when not told: the CPUs this process may use."""
    counter = getattr(os, "process_cpu_count", None) or os.cpu_count
    return counter() or 1


def pipelined(task: P.Task) -> bool:
    """May anything wait behind this task in its process, or may it wait behind another? Not with options
    that need it to start at a known moment: a time limit, max_tasks_per_child, a start to confirm."""
    opts = task.opts
    return not opts or not any(k in opts for k in NOT_PIPELINED)


def _lately(average: float, sample: float) -> float:
    """A moving average of task durations (inf: none known yet)."""
    return sample if average == _INF else 0.75 * average + 0.25 * sample


class Process:
    """The node's view of one task process. The agent's subclass adds what it talks to it through."""

    __slots__ = ("pid", "tasks", "skip", "attached", "eof", "head_since", "service", "killed", "runs",
                 "retiring", "kill_for", "kill_reason", "lent")

    def __init__(self, pid: int):
        self.pid = pid
        self.tasks: deque[P.Task] = deque()  # given to it, in order: the first runs (or is about to)
        self.skip: set[int] = set()  # its tasks nobody wants any more (dropped, handed back): no result, no loss
        self.attached = False  # its connection is up: it may be given tasks
        self.eof = False  # it closed its connection: it is dying
        self.head_since = 0.0  # when the first of `tasks` became first
        self.service = _INF  # seconds per task lately (a moving average); inf until it is known
        self.killed = False
        # Killed on purpose because of one of its tasks: which, and what to report for it (a time limit,
        # ex.kill(); None when nobody wants its result). Its other tasks are innocent and run again.
        self.kill_for: int | None = None
        self.kill_reason: dict[str, Any] | None = None
        self.runs = 0  # results received, counted as the task process counts them for max_tasks_per_child
        self.retiring = False  # reached max_tasks_per_child: it exits on its own, give it no task
        self.lent = False  # lent to the local client, which talks to it directly (see supervisor.Supervisor._on_lender)

    @property
    def usable(self) -> bool:
        """Attached, alive, not retiring, and not lent: it may be given tasks (or lent)."""
        return self.attached and not self.killed and not self.eof and not self.retiring and not self.lent

    @property
    def task(self) -> P.Task | None:
        """The task it runs now (or is about to run), if any."""
        return self.tasks[0] if self.tasks else None

    def depth(self, now: float, patience: float = PIPELINE_WORK) -> int:
        """How many tasks it may hold: one, or a few milliseconds' worth of quick ones. Not while its current
        task has run longer than `patience`: the tasks behind that one wait for it (at most those given
        before we noticed)."""
        if self.service >= PIPELINE_WORK or (self.tasks and now - self.head_since > patience):
            return 1
        return max(1, min(PIPELINE_MAX, int(PIPELINE_WORK / max(self.service, 1e-6))))

    def __repr__(self) -> str:
        return f"<Process {self.pid} tasks={[t.id for t in self.tasks]}>"


class Dispatch:
    """What one dispatch decided: the tasks for each process, and what must happen before they are sent."""

    __slots__ = ("runs", "reports", "deadlines")

    def __init__(self) -> None:
        self.runs: dict[Process, list[P.Task]] = {}  # each list goes to its process as one "run" message
        # "started" messages for the master, to send before the runs: tasks whose start must be known before
        # they can run (the "confirm" option: suspected of killing their node).
        self.reports: list[dict[str, Any]] | tuple = ()
        self.deadlines: list[tuple[Process, int, float]] | tuple = ()  # time limits to arm: (process, id, s)


class Death(NamedTuple):
    """What a task process's death means (see NodeState.process_died)."""

    culprit: int | None  # the task reported for it (lost, timed out, killed), if any
    lost: bool  # reported "lost": it died on its own while running `culprit`
    back: list[int]  # its innocent tasks, to hand back to the master (leaving)
    replace: bool  # start a new task process in its place


_NOTHING = Dispatch()
_NONE: list[int] = []  # (never appended to)
_KILLED_QUEUED = {"kind": "killed", "started": False}
_KILLED_RUNNING = {"kind": "killed", "started": True}


class NodeState:
    """The node's queue of tasks, its task processes' tasks, and the messages due to the master.

    For example (the agent does the same, with its sockets)::

        node = NodeState(nprocs=1, host="n1")
        p = node.add(Process(100))
        node.attached(p)
        node.tasks_arrived([task])                       # from the master's "tasks"
        node.dispatch(now).runs                          # {p: [task]}: send it to process 100
        node.result(p, task.id, "ok", bufs, None, now)   # True: the buffers go on to the master
        node.flush(now)                                  # [({"t": "results", ...}, buffers), ...]
    """

    def __init__(self, nprocs: int, host: str = ""):
        self.nprocs = nprocs
        self.host = host  # named in the errors this node reports
        self.procs: dict[int, Process] = {}
        self.queue: deque[P.Task] = deque()  # handed to us by the master, not given to a process yet
        self.leaving = False  # finishing up: no new tasks
        self.closing = False  # stopping: nothing runs again, nothing is replaced
        self.max_frame = P.DEFAULT_MAX_FRAME  # what the master accepts in one frame (from its welcome)
        # The outbox: what the master hears at the next flush.
        self.started: list[int] = []  # given since the last "started" report
        self.results: list[tuple[int, str, list[Any], Any]] = []
        self.output: list[tuple[list[Any], list[Any]]] = []  # ([id, pid, stream, dropped], [data])
        self.output_dropped: dict[tuple[int, int], int] = {}  # (id, pid) → bytes dropped while backlogged
        self.prefetch_asked = 0  # tasks we last asked the master to hand us ahead of time (0: its default)
        self.fn_took: dict[str, float] = {}  # function blob hash → seconds per task lately

    # ------------------------------------------------------------------------------------------ processes

    def add(self, proc: Process) -> Process:
        """A task process was started; it gets tasks once `attached`."""
        self.procs[proc.pid] = proc
        return proc

    def attached(self, proc: Process) -> None:
        """Its connection is up."""
        proc.attached = True

    def hung_up(self, proc: Process) -> None:
        """It closed its connection: it is dying (process_died follows)."""
        proc.eof = True

    def lendable(self) -> Iterator[Process]:
        """Processes that may be lent to the local client: usable and idle, while the node takes tasks."""
        if self.closing or self.leaving:
            return
        for proc in self.procs.values():
            if proc.usable and not proc.tasks:
                yield proc

    def lend(self, proc: Process) -> None:
        proc.lent = True

    def take_back(self, proc: Process) -> None:
        proc.lent = False

    # ------------------------------------------------------------------------------------------ tasks in

    def tasks_arrived(self, tasks: list[P.Task]) -> list[int]:
        """Tasks from the master. Returns the ids to hand straight back (we are leaving), usually none."""
        if self.leaving:
            return [task.id for task in tasks]
        self.queue.extend(tasks)
        return _NONE

    def dispatch(self, now: float) -> Dispatch:
        """Give queued tasks to processes: first one to each idle process, then quick tasks queue up behind
        quick ones, round-robin, as deep as each process is quick."""
        queue = self.queue
        if self.leaving or not queue:
            return _NOTHING
        out = Dispatch()
        ready = [p for p in self.procs.values() if p.usable]
        for proc in ready:
            if not queue:
                break
            if not proc.tasks:
                self._give(proc, queue.popleft(), out, now)
        room = [p for p in ready if p.tasks and len(p.tasks) < p.depth(now) and pipelined(p.tasks[0])]
        while queue and room and self._quick(queue[0]):
            for proc in list(room):
                if not queue or not self._quick(queue[0]):
                    break
                self._give(proc, queue.popleft(), out, now)
                if len(proc.tasks) >= proc.depth(now):
                    room.remove(proc)
        return out

    def _quick(self, task: P.Task) -> bool:
        """May this task wait behind another in a task process? Only if its function's tasks have been quick
        lately: a slow function's tasks go to idle processes, and to other nodes if those are idle first."""
        return pipelined(task) and self.fn_took.get(task.deps[0].hash, PIPELINE_WORK) < PIPELINE_WORK

    def _give(self, proc: Process, task: P.Task, out: Dispatch, now: float) -> None:
        if not proc.tasks:
            proc.head_since = now
        proc.tasks.append(task)
        batch = out.runs.get(proc)
        if batch is None:
            out.runs[proc] = [task]
        else:
            batch.append(task)
        self.started.append(task.id)
        opts = task.opts
        if opts:
            if opts.get("confirm"):
                # Suspected of killing its node: the master hears of the start before the task can run.
                report = self.take_started()
                if report is not None:
                    out.reports = [*out.reports, report]
            limit = opts.get("timeout")
            if limit:  # (never queued behind another task: it starts now)
                out.deadlines = [*out.deadlines, (proc, task.id, float(limit))]

    # ------------------------------------------------------------------------------------------ from processes

    def result(self, proc: Process, gid: int, status: str, bufs: list[Any], info: Any, now: float) -> bool:
        """A task's result from its process. True: it goes on to the master with `bufs`; False: nobody
        will read `bufs` (the caller frees them)."""
        tasks = proc.tasks
        proc.runs += 1
        if not tasks or tasks[0].id != gid:
            return False
        task = tasks.popleft()
        took = now - proc.head_since
        proc.service = _lately(proc.service, took)
        proc.head_since = now
        fn = task.deps[0].hash
        fn_took = self.fn_took
        if fn not in fn_took and len(fn_took) >= _FN_TIMES_MAX:
            fn_took.clear()
        fn_took[fn] = _lately(fn_took.get(fn, _INF), took)
        if task.opts:
            mtpc = task.opts.get("mtpc")
            if mtpc and proc.runs >= mtpc:
                proc.retiring = True
        if gid in proc.skip:
            proc.skip.discard(gid)
            return False
        if self.output_dropped:
            lost_output = self.output_dropped.pop((gid, proc.pid), 0)
            if lost_output:
                self.output.append(([gid, proc.pid, 2, lost_output], [b""]))
        size = P.nbytes(bufs)
        if size > self.max_frame:  # the master would refuse the frame: fail this task alone
            self.results.append((gid, "error", [], {
                "kind": "serialization", "phase": "sending the result", "type": "clusterexec.ClusterError",
                "message": f"the result is {size >> 20} MiB, more than the master accepts in one message "
                           f"({self.max_frame >> 20} MiB; see python -m clusterexec.master --max-frame-mb)",
                "pid": proc.pid, "host": self.host}))
            return False
        self.results.append((gid, status, bufs, info))
        return True

    def unwanted_head(self, proc: Process) -> bool:
        """After its results: has it started a task nobody wants any more? Then it is to be killed (True)."""
        tasks = proc.tasks
        if proc.skip and tasks and tasks[0].id in proc.skip and not proc.killed:
            self._kill_for(proc, tasks[0].id, None)
            return True
        return False

    def printed(self, proc: Process, gid: int, streams: list[Any], data: list[Any], dropped: int,
               backlogged: bool) -> bool:
        """What a task printed: on to the master, unless the link to it is backed up (then counted, dropped).
        True when something is due to be sent."""
        # (A task process holds quick results back to send several at once: the task that printed may be
        # one behind the first.)
        if gid in proc.skip or not any(t.id == gid for t in proc.tasks):
            return False
        key = (gid, proc.pid)
        if backlogged:
            self.output_dropped[key] = self.output_dropped.get(key, 0) + dropped + P.nbytes(data)
            return False
        dropped += self.output_dropped.pop(key, 0)
        for stream, piece in zip(streams, data, strict=True):
            self.output.append(([gid, proc.pid, int(stream), dropped], [piece]))
            dropped = 0
        if dropped:
            self.output.append(([gid, proc.pid, 2, dropped], [b""]))
        return True

    def process_died(self, proc: Process, running: int | None, info: dict[str, Any]) -> Death:
        """A task process is gone. `running`: the task it said it was running (None if unknown); `info`:
        how it ended (pid, host, exitcode or signal, phase), reported for the task it died of.

        It ran its tasks in order and wrote down the one it was running: those before it had finished (their
        results, held back to go out together, died with it), those after it had not started. Only the task
        it died of counts: the one it was killed for, or else the one running. The others run again."""
        self.procs.pop(proc.pid, None)
        tasks = proc.tasks
        held = {t.id for t in tasks}
        if proc.kill_for is not None:
            culprit = proc.kill_for
        else:
            culprit = running if running in held else tasks[0].id if tasks else None
        again = [t for t in tasks if t.id != culprit and t.id not in proc.skip]
        reported = None
        lost = False
        if culprit in held and culprit not in proc.skip:
            reported = culprit
            if proc.kill_reason is not None:
                self.results.append((culprit, "error", [], dict(info, **proc.kill_reason)))
            else:
                lost = True
                self.results.append((culprit, "lost", [], info))
        tasks.clear()
        back = _NONE
        if again and not self.closing:
            if self.leaving:
                back = [t.id for t in again]
            else:
                self.queue.extendleft(reversed(again))
        return Death(reported, lost, back, not self.closing)

    # ------------------------------------------------------------------------------------------ from the master

    def cancel(self, key: int, gids: list[int]) -> dict[str, Any]:
        """Cancel tasks that have not reached a process; those that have are refused. Returns the reply."""
        wanted = set(gids)
        cancelled = [t.id for t in self.queue if t.id in wanted]
        if cancelled:
            gone = set(cancelled)
            self.queue = deque(t for t in self.queue if t.id not in gone)
        refused = sorted(wanted.difference(cancelled))
        return {"t": "cancel_reply", "key": key, "cancelled": cancelled, "refused": refused}

    def drop(self, gids: list[int]) -> list[Process]:
        """Forget tasks (the master settled them otherwise): no result, no loss. Returns the processes to
        kill, those running one of them; a task waiting in a process is stopped when it comes up."""
        gone = set(gids)
        self.queue = deque(t for t in self.queue if t.id not in gone)
        kill = []
        for proc in self.procs.values():
            mine = [t.id for t in proc.tasks if t.id in gone]
            if mine:
                proc.skip.update(mine)
                if proc.tasks[0].id in gone:
                    self._kill_for(proc, proc.tasks[0].id, None)
                    kill.append(proc)
        return kill

    def kill_tasks(self, gids: list[int]) -> list[Process]:
        """ex.kill(): a task not started yet ends "killed" at once; a running one with its process (returned,
        to kill; its death reports the task)."""
        wanted = set(gids)
        for task in [t for t in self.queue if t.id in wanted]:
            self.queue.remove(task)
            self.results.append((task.id, "error", [], dict(_KILLED_QUEUED)))
        kill = []
        for proc in self.procs.values():
            for task in list(proc.tasks)[1:]:
                if task.id in wanted and task.id not in proc.skip:  # queued in the process: not run yet
                    proc.skip.add(task.id)
                    self.results.append((task.id, "error", [], dict(_KILLED_QUEUED)))
            head = proc.task
            if head is not None and head.id in wanted and head.id not in proc.skip:
                self._kill_for(proc, head.id, dict(_KILLED_RUNNING))
                kill.append(proc)
        return kill

    def deadline_passed(self, proc: Process, gid: int, limit: float) -> bool:
        """Task `gid`'s time limit is over. True: it still runs, kill its process."""
        head = proc.task
        if head is not None and head.id == gid and proc.kill_for is None:
            self._kill_for(proc, gid, {"kind": "timeout", "timeout": limit})
            return True
        return False

    def _kill_for(self, proc: Process, gid: int, reason: dict[str, Any] | None) -> None:
        if proc.kill_for is None:
            proc.kill_for, proc.kill_reason = gid, reason
        proc.killed = True

    def forget_session(self) -> list[Process]:
        """The master is gone (a new one will hand its tasks out again): drop everything done for it.
        Returns the processes to kill, those with tasks."""
        self.queue.clear()
        kill = []
        for proc in self.procs.values():
            if proc.tasks:
                proc.skip.update(t.id for t in proc.tasks)
                proc.killed = True
                kill.append(proc)
        self.prefetch_asked = 0
        self.discard_outbox()
        self.output_dropped = {}
        return kill

    # ------------------------------------------------------------------------------------------ leaving

    def leave(self) -> list[int]:
        """Take no new tasks. Returns the queued ones, to hand back."""
        self.leaving = True
        back = [t.id for t in self.queue]
        self.queue.clear()
        return back

    def hand_back_running(self) -> list[int]:
        """The grace is over: the tasks still in processes go back (not as losses: their results and deaths
        are not reported any more). Returns their ids."""
        unfinished = [t.id for p in self.procs.values() for t in p.tasks if t.id not in p.skip]
        if unfinished:
            for proc in self.procs.values():
                proc.skip.update(t.id for t in proc.tasks)
        return unfinished

    def running(self) -> int:
        """Tasks in processes (a few milliseconds' worth of quick ones at most wait behind each)."""
        return sum(len(p.tasks) for p in self.procs.values())

    def idle(self) -> bool:
        """No process holds a task."""
        return not any(p.tasks for p in self.procs.values())

    def holds_tasks(self) -> bool:
        return bool(self.queue) or not self.idle()

    # ------------------------------------------------------------------------------------------ to the master

    def take_started(self) -> dict[str, Any] | None:
        """The "started" report: tasks given since the last one that still run. Sent a moment late on
        purpose: a short task's result usually arrives first, and then no "started" travels for it."""
        if not self.started:
            return None
        running = {t.id for p in self.procs.values() for t in p.tasks}
        started = [g for g in self.started if g in running]
        self.started = []
        return {"t": "started", "ids": started} if started else None

    def flush(self, now: float) -> list[tuple[dict[str, Any], list[Any]]]:
        """The messages due to the master, in frames it accepts: output first (before the results, which
        may end the tasks that printed it), then results, then a new prefetch request if one is due."""
        out: list[tuple[dict[str, Any], list[Any]]] = []
        if self.output:
            for group in P.in_frames(self.output, lambda o: P.nbytes(o[1]), self.max_frame):
                out.append(({"t": "output", "items": [item for item, _ in group]},
                            [data for _, bufs in group for data in bufs]))
            self.output = []
        if self.results:
            for group in P.in_frames(self.results, P.result_size, self.max_frame):
                items, buffers = P.encode_results(group)
                out.append(({"t": "results", "items": items}, buffers))
            self.results = []
        ask = self.ask_prefetch(now)
        if ask is not None:
            out.append((ask, []))
        return out

    def discard_outbox(self) -> None:
        """No master to send to."""
        self.started = []
        self.results = []
        self.output = []

    def ask_prefetch(self, now: float) -> dict[str, Any] | None:
        """Quick tasks: ask the master to hand us more of them ahead of time, enough to keep every task
        process's pipeline full while the next batch is on its way. Slow ones: back to its default, and
        give back what we hold beyond it, so that other nodes may run it. None: nothing to ask.

        Tasks already waiting in a process behind a long one count on top, so that they never use up the
        room the other processes need: those must not starve until the long task ends. A process counts as
        slow here only once its task has run SLOW_AFTER: a moment's hiccup must not send tasks back."""
        procs = list(self.procs.values())
        depths = [p.depth(now, SLOW_AFTER) for p in procs]
        quick = sum(depths)
        stuck = sum(max(0, len(p.tasks) - d) for p, d in zip(procs, depths, strict=True))
        want = (2 * quick if quick > len(procs) else 0) + stuck
        back = []
        if quick <= len(procs) and len(self.queue) > self.nprocs:
            back = [self.queue.pop().id for _ in range(len(self.queue) - self.nprocs)][::-1]
        asked = self.prefetch_asked
        if not back and (want == asked or (want and asked and asked / 2 <= want <= asked * 2)):
            return None
        self.prefetch_asked = want
        return {"t": "prefetch", "n": want, "back": back} if back else {"t": "prefetch", "n": want}

"""A worker node: the agent process and its task processes. `python -m clusterexec.worker HOST[:PORT]`.

    master ══TCP══▶ Agent (asyncio, never runs user code, never unpickles)
                      │ queue of tasks the master handed us (prefetched, not started)
                      │ one idle task process ← one task: it is "started" from here on; a process that
                      │ answers quickly also gets quick functions' next tasks queued behind it (pipelined)
                      ├──socketpair──▶ task process 1: unpickle fn (cached by hash), run, pickle result
                      ├──socketpair──▶ task process 2
                      └── …  a process that dies mid-task is reaped, reported "lost" with its exit code
                             or signal, and replaced; the master decides on a retry.
    local client ◀══lender══▶ (local mode only) an idle task process's socket is lent to the client, which
                      runs a task there itself while it has nothing else in flight; see Agent._on_lender.

Task processes are forked from the agent, which is single-threaded, so start-up is fast and they inherit
the imports; what runs in them is task_process.py. Each asks the kernel to kill it if the agent dies (PR_SET_PDEATHSIG), so no process outlives
its node. Only the agent talks to the master; it answers even while every task process runs user code.

Processes a task starts end with the task. Each task process leads a session of its own and is a child
subreaper, as is the agent: what a task leaves running stays below its task process, even a daemon that
double-forked (orphans come back to the nearest subreaper, not to init). When a task ends, its process kills
and reaps whatever it has below it before it sends the result (one waitid() per results message says whether
there is anything), but for multiprocessing's forkserver and resource tracker, which serve its next tasks.
When a task process dies or is killed (a time limit, ex.kill(), the node stopping), the agent kills its
session's process group, then every child of its own that is no task process: the orphans it left.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import mmap
import os
import platform
import signal
import socket
import ssl
import sys
import time
from collections import deque
from typing import Any

import cloudpickle

from . import protocol as P
from . import shm
from .address import DEFAULT_PORT, parse_address
from .auth import (
    COMMAND_KEY_ADVICE,
    MissingKeyError,
    add_tls_arguments,
    resolve_key,
    tls_failure,
    tls_from_arguments,
)
from .connection import OUTPUT_BACKLOG, FramedConnection, LinkEnd, backlog, loop_is_idle
from .local import default_nprocs
from .process_tree import become_subreaper, children, kill_group, kill_quietly
from .task_process import IDLE, PHASE, PHASES, task_process_main

log = logging.getLogger("clusterexec.worker")

STARTED_DELAY = 0.002  # seconds a task runs before the master (and the Future) hear it started
# Short tasks are pipelined: a task process that is quick to answer gets further tasks queued behind the one
# it runs, about PIPELINE_WORK seconds of them (at most PIPELINE_MAX), so it finds its next task waiting
# instead of sleeping until the agent is scheduled again. A task that takes PIPELINE_WORK or longer is sent
# to an idle process only, as before; so is one with a time limit, max_tasks_per_child or a suspect past.
PIPELINE_WORK = 0.005
PIPELINE_MAX = 64
SLOW_AFTER = 0.05  # seconds a task runs before its node stops asking for tasks ahead of time (see _ask_prefetch)
_NOT_PIPELINED = ("timeout", "mtpc", "confirm")
LEND_MESSAGE_MAX = 1 << 16  # bytes in one message between a local client and its agent (see Agent._on_lender)
# Reaching the master: seconds one TCP connect may take (the kernel's own first SYN timeout; see
# Agent._open_socket), and then the authentication, with TLS, until the master's welcome.
CONNECT_ATTEMPT = 1.0
HANDSHAKE_ATTEMPT = 10.0


# ================================================================================================ agent


class _Proc:
    """The agent's view of one task process."""

    __slots__ = ("pid", "conn", "tasks", "sent", "skip", "eof", "eof_at", "head_since", "service", "killed", "runs",
                 "retiring", "pidfd", "phase", "deadline", "kill_for", "kill_reason", "lent")

    def __init__(self, pid: int):
        self.pid = pid
        self.conn: FramedConnection | None = None
        # Tasks sent to it, in order; it runs them in order, so the first is the one running (or about to).
        self.tasks: deque[P.Task] = deque()
        self.sent = P.BlobLRU()
        self.skip: set[int] = set()  # its tasks nobody wants any more (dropped, handed back): no result, no loss
        self.eof = False
        self.eof_at = 0.0
        self.head_since = 0.0  # when the first of `tasks` became first
        self.service = float("inf")  # seconds per task lately (a moving average); inf until it is known
        self.killed = False
        self.pidfd: int | None = None
        self.phase: mmap.mmap | None = None
        self.deadline: asyncio.TimerHandle | None = None
        # Killed on purpose because of one of its tasks: which, and what to report for it (a time limit,
        # ex.kill(); None when nobody wants its result). Its other tasks are innocent and run again.
        self.kill_for: int | None = None
        self.kill_reason: dict[str, Any] | None = None
        self.runs = 0  # results received, counted as the task process counts them for max_tasks_per_child
        self.retiring = False  # reached max_tasks_per_child: it exits on its own, give it no task
        self.lent = False  # lent to the local client, which talks to it directly (see Agent._on_lender)

    @property
    def usable(self) -> bool:
        """Attached, alive, not retiring, and not lent: it may be given tasks (or lent)."""
        return self.conn is not None and not self.killed and not self.eof and not self.retiring and not self.lent

    @property
    def task(self) -> P.Task | None:
        """The task it runs now (or is about to run), if any."""
        return self.tasks[0] if self.tasks else None

    def depth(self, patience: float = PIPELINE_WORK) -> int:
        """How many tasks it may hold: one, or a few milliseconds' worth of quick ones. Not while its current
        task has run longer than `patience`: the tasks behind that one wait for it (at most those given
        before we noticed)."""
        if self.service >= PIPELINE_WORK or (self.tasks and time.monotonic() - self.head_since > patience):
            return 1
        return max(1, min(PIPELINE_MAX, int(PIPELINE_WORK / max(self.service, 1e-6))))


def _pipelined(task: P.Task) -> bool:
    opts = task.opts
    return not opts or not any(k in opts for k in _NOT_PIPELINED)


_FN_TIMES_MAX = 1024  # functions whose recent task durations the agent remembers


def _lately(average: float, sample: float) -> float:
    """A moving average of task durations (inf: none known yet)."""
    return sample if average == float("inf") else 0.75 * average + 0.25 * sample


class Agent:
    """Connects to the master, supervises `nprocs` task processes, and relays tasks and results."""

    def __init__(self, address: tuple[str, int], key: bytes, nprocs: int | None = None,
                 *, connect_timeout: float = 60.0, reconnect_window: float = 60.0,
                 ssl_context: ssl.SSLContext | None = None):
        self.address = address
        self.key = key
        self.nprocs = nprocs or default_nprocs()
        self.connect_timeout = connect_timeout
        self.reconnect_window = reconnect_window
        self.ssl_context = ssl_context  # TLS towards the master (never on an in-process link)
        self.host = socket.gethostname()
        self.conn: FramedConnection | LinkEnd | None = None
        self.procs: dict[int, _Proc] = {}
        self.queue: deque[P.Task] = deque()
        self.cache = P.BlobLRU()
        self.closed = asyncio.Event()
        self.closing = False
        self.leaving = False  # finishing up after SIGTERM: no new tasks
        self._all_idle: asyncio.Future | None = None  # set when leaving and no task runs any more
        self._welcome: asyncio.Future | None = None
        self._out_started: list[int] = []
        self._out_results: list[tuple[int, str, list[Any], Any]] = []
        self._out_output: list[tuple[list[Any], list[Any]]] = []  # ([gid, pid, stream, dropped], [data])
        self._output_dropped: dict[tuple[int, int], int] = {}  # (gid, pid) → bytes dropped while backlogged
        self._flush_scheduled = False
        self._started_scheduled = False
        self._prefetch_asked = 0  # tasks we last asked the master to hand us ahead of time (0: its default)
        self._recheck: asyncio.TimerHandle | None = None  # looks again whether tasks have turned slow
        self._fn_took: dict[str, float] = {}  # function blob hash → seconds per task lately
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last_heard = 0.0
        self.max_frame = P.DEFAULT_MAX_FRAME  # what the master accepts in one frame (from its welcome)
        self._heartbeat: tuple[float, float] | None = None  # (interval, timeout) the master asked for
        self._watchdog: asyncio.TimerHandle | None = None
        self.failure: BaseException | None = None
        self.lender: socket.socket | None = None  # local mode: where the client asks to borrow a task process
        self._strays_timer: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------------------------------------ lifecycle

    async def start(self, link: LinkEnd | None = None, lender: socket.socket | None = None) -> None:
        """Start the task processes and connect to the master (retrying until `connect_timeout`).

        `link`: the agent's end of an in-process link to a master in this event loop, instead of TCP.
        `lender`: local mode's channel to its one client, which borrows idle task processes over it.
        """
        self._loop = asyncio.get_running_loop()
        become_subreaper()  # what a dead task process leaves comes to us (see _stop_strays)
        for _ in range(self.nprocs):
            self._spawn()
        if lender is not None:
            lender.setblocking(False)
            self.lender = lender
            self._loop.add_reader(lender.fileno(), self._on_lender)
        if link is not None:
            self._welcome = self._loop.create_future()
            self.conn = link
            link.bind(self._on_ready, self._on_master_messages, self._on_master_lost)
            await self._welcome
        else:
            await self._connect(self.connect_timeout)

    async def _connect(self, window: float) -> None:
        """Connect and authenticate, retrying with backoff for `window` seconds; a refused key is final."""
        loop = self._loop
        deadline = time.monotonic() + window
        delay = 0.05
        host, port = self.address
        warned = False
        while True:
            began = time.monotonic()
            try:
                sock = await self._open_socket(host, port, deadline)
                # The handshake too has a bound of its own: the network may fail again halfway through it.
                handshake = max(0.1, min(HANDSHAKE_ATTEMPT, deadline - time.monotonic()))
                self._welcome = loop.create_future()
                _, conn = await loop.create_connection(
                    lambda: FramedConnection(role="client", key=self.key, on_ready=self._on_ready,
                                             on_messages=self._on_master_messages, on_lost=self._on_master_lost,
                                             key_advice=COMMAND_KEY_ADVICE),
                    sock=sock, ssl=self.ssl_context, server_hostname=host if self.ssl_context else None,
                    ssl_handshake_timeout=handshake if self.ssl_context else None)
                self.conn = conn
                try:
                    await asyncio.wait_for(asyncio.shield(self._welcome), handshake)
                except TimeoutError:
                    self.conn = None  # so that its loss is not taken for the loss of an established session
                    conn.close()
                    raise
                return
            except (P.AuthenticationError, P.VersionMismatch):
                raise
            except (OSError, P.ProtocolError) as e:
                if self.closing:
                    raise ConnectionError("stopped") from None
                if isinstance(e, ssl.SSLError):
                    message, final = tls_failure(e, f"the master at {host}:{port}")
                    if final:  # a certificate or TLS/plaintext mismatch: retrying cannot help
                        raise P.AuthenticationError(message) from None
                    e = ConnectionError(message)
                # The delay spaces attempts out; one that timed out has waited already.
                wait = max(0.0, began + delay - time.monotonic())
                if time.monotonic() + wait > deadline:
                    reason = str(e) or "no answer"
                    raise ConnectionError(f"cannot reach the master at {host}:{port}: {reason}") from None
                if not warned:
                    log.warning("master at %s:%s not reachable (%s); retrying for up to %.0f s", host, port,
                                str(e) or "no answer", window)
                    warned = True
                await asyncio.sleep(wait)
                delay = min(delay * 2, 1.0)

    async def _open_socket(self, host: str, port: int, deadline: float) -> socket.socket:
        """A TCP connection to the master, each address tried for CONNECT_ATTEMPT seconds at most.

        Not longer: when the SYNs vanish (a partition, a host down) the kernel resends them ever more rarely,
        the last within a minute at 35 s (31 s on older kernels), so one long attempt would miss a network that
        heals after that. A new attempt sends a SYN at once."""
        # Resolve in this thread: the agent must stay single-threaded so that fork() is safe.
        last: OSError | None = None
        for family, type_, proto, _, addr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
            sock = socket.socket(family, type_, proto)
            sock.setblocking(False)
            _forget_stale_registration(self._loop, sock.fileno())
            try:
                await asyncio.wait_for(self._loop.sock_connect(sock, addr),
                                       max(0.1, min(CONNECT_ATTEMPT, deadline - time.monotonic())))
            except OSError as e:  # (TimeoutError too)
                sock.close()
                last = e
                continue
            except BaseException:  # cancelled (out of time)
                sock.close()
                raise
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        raise last or OSError(f"cannot resolve {host}")

    def _on_ready(self, conn: FramedConnection) -> None:
        conn.send({"t": "hello", "role": "worker", "nprocs": self.nprocs, "host": self.host, "pid": os.getpid(),
                   "python": platform.python_version(), "cloudpickle": cloudpickle.__version__})

    async def stop(self) -> None:
        self.closing = True
        if self._watchdog is not None:
            self._watchdog.cancel()
        self._close_lender()
        if self.conn is not None:
            self.conn.close()
        for proc in list(self.procs.values()):
            self._kill(proc)
        deadline = time.monotonic() + 5
        while (self.procs or self._kill_strays()) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
            for proc in list(self.procs.values()):
                self._reap(proc)
        self.closed.set()

    async def leave(self, grace: float) -> None:
        """Leave the cluster without losing work (SIGTERM, Ctrl-C): take no new tasks and hand the queued
        ones back at once; give the running ones `grace` seconds to finish and send their results; hand back
        whatever still runs then, and stop. The master requeues what it gets back, charging no retry."""
        if self.leaving or self.closing:
            return
        self.leaving = True
        try:
            await self._finish_up(grace)
        except Exception:  # (whatever went wrong on the way, a node told to stop stops)
            log.exception("error while leaving the cluster; stopping now")
        finally:
            await self.stop()

    async def _finish_up(self, grace: float) -> None:
        # Tasks already in a task process count as running: a few milliseconds' worth of quick ones at most.
        running = sum(len(p.tasks) for p in self.procs.values())
        began = time.monotonic()
        if running and grace > 0:
            log.info("leaving: handing back %d queued tasks; giving %d running ones up to %g s to finish",
                     len(self.queue), running, grace)
        else:
            log.info("leaving: handing back %d queued and %d running tasks", len(self.queue), running)
        self._hand_back([t.id for t in self.queue])
        self.queue.clear()
        if running and grace > 0:
            self._all_idle = self._loop.create_future()
            try:
                await asyncio.wait_for(asyncio.shield(self._all_idle), grace)
            except TimeoutError:
                pass
        unfinished = [t.id for p in self.procs.values() for t in p.tasks if t.id not in p.skip]
        if unfinished:
            log.warning("leaving: %d tasks still running after %.1f s; handing them back", len(unfinished),
                        time.monotonic() - began)
            for proc in self.procs.values():
                proc.skip.update(t.id for t in proc.tasks)  # not a loss: the master hears "handed back" instead
            self._hand_back(unfinished)

    def hurry(self) -> None:
        """Stop waiting for running tasks: hand them back now."""
        if self._all_idle is not None and not self._all_idle.done():
            self._all_idle.set_result(None)

    def _hand_back(self, gids: list[int]) -> None:
        conn = self.conn
        if conn is None or conn.closed:
            return
        self._flush()  # results of finished tasks go first
        conn.send({"t": "leaving", "ids": gids})

    # ------------------------------------------------------------------------------------------ master link

    def _on_master_messages(self, conn: FramedConnection, messages: list[P.Message]) -> None:
        if conn is not self.conn:
            return
        self._last_heard = self._loop.time()
        for msg in messages:
            t = msg.type
            h = msg.header
            try:
                if t == "tasks":
                    tasks = P.decode_tasks(h["tasks"], msg.buffers, self.cache)
                    if self.leaving:
                        self._hand_back([task.id for task in tasks])
                    else:
                        self.queue.extend(tasks)
                elif t == "ping":
                    conn.send({"t": "pong"})
                elif t == "cancel":
                    self._cancel(int(h["key"]), [int(g) for g in h["ids"]])
                elif t == "drop":
                    self._drop([int(g) for g in h["ids"]])
                elif t == "kill":
                    self._kill_tasks([int(g) for g in h["ids"]])
                elif t == "shutdown":
                    log.warning("the master is shutting down (%s)", h.get("reason", "no reason given"))
                elif t == "welcome":
                    log.info("connected to master %s:%s as node %s with %d processes",
                             *self.address, h.get("id"), self.nprocs)
                    self.max_frame = int(h.get("max_frame") or P.DEFAULT_MAX_FRAME)
                    if isinstance(conn, FramedConnection):
                        conn.reader.max_frame = max(conn.reader.max_frame, self.max_frame)
                    beat = h.get("heartbeat")
                    if beat and not isinstance(conn, LinkEnd):
                        self._heartbeat = (float(beat[0]), float(beat[1]))
                        self._arm_watchdog()
                    if self._welcome is not None and not self._welcome.done():
                        self._welcome.set_result(True)
                else:
                    raise P.ProtocolError(f"unknown message type {t!r} from the master")
            except (LookupError, TypeError, ValueError, AttributeError, ArithmeticError) as e:
                # ArithmeticError: int(1e400) in JSON is an OverflowError, not a ValueError.
                raise P.ProtocolError(f"malformed {t!r} message: {type(e).__name__}: {e}") from None
        self._dispatch()

    def _arm_watchdog(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        self._watchdog = self._loop.call_later(self._heartbeat[0], self._check_master)

    def _check_master(self) -> None:
        """A master that sends nothing (not even its pings) for the heartbeat timeout is presumed gone."""
        conn = self.conn
        if self.closing or conn is None or conn.closed or self._heartbeat is None:
            return
        # Bytes of a frame still arriving count as word from the master (see FramedConnection.last_heard).
        silent = self._loop.time() - max(self._last_heard, getattr(conn, "last_heard", 0.0))
        if silent > self._heartbeat[1]:
            conn.fail(TimeoutError(f"no word from the master for {silent:.1f} s"), abort=True)
            return
        # Our own sign of life, unasked: the master's pings may be stuck behind a big frame it is sending us.
        conn.send({"t": "pong"})
        self._arm_watchdog()

    def _on_master_lost(self, conn: FramedConnection, exc: BaseException | None) -> None:
        if self.closing or conn is not self.conn:
            return
        if self._welcome is not None and not self._welcome.done():
            # Lost while connecting: _connect decides whether to try again.
            self._welcome.set_exception(exc if isinstance(exc, Exception) else
                                        ConnectionError(f"the master closed the connection: {exc or 'no reason'}"))
            return
        if self._watchdog is not None:
            self._watchdog.cancel()
        in_flight = len(self.queue) + sum(len(p.tasks) for p in self.procs.values())
        if isinstance(conn, LinkEnd) or self.reconnect_window <= 0 or isinstance(exc, P.AuthenticationError):
            log.warning("lost the connection to the master (%s); stopping", exc or "closed")
            self.failure = ConnectionError("lost the connection to the master")
            self._loop.create_task(self.stop())
            return
        log.warning("lost the connection to the master (%s); dropping %d tasks and reconnecting for up to %.0f s",
                    exc or "closed", in_flight, self.reconnect_window)
        self._forget_session()
        self._loop.create_task(self._reconnect())

    def _forget_session(self) -> None:
        """The master (maybe a restarted one) will hand its tasks out again: stop all we were doing for it."""
        self.queue.clear()
        for proc in self.procs.values():
            if proc.tasks:
                proc.skip.update(t.id for t in proc.tasks)
                self._kill(proc)
        self.cache = P.BlobLRU()
        self._prefetch_asked = 0
        self._out_started = []
        self._out_results = []
        self._out_output = []
        self._output_dropped = {}

    async def _reconnect(self) -> None:
        try:
            await self._connect(self.reconnect_window)
        except (ConnectionError, P.ProtocolError, P.AuthenticationError, P.VersionMismatch) as e:
            if not self.closing:
                self.failure = ConnectionError(f"the master did not come back within "
                                               f"{self.reconnect_window:.0f} s: {e}")
                await self.stop()

    def _cancel(self, key: int, gids: list[int]) -> None:
        wanted = set(gids)
        cancelled = [t.id for t in self.queue if t.id in wanted]
        if cancelled:
            gone = set(cancelled)
            self.queue = deque(t for t in self.queue if t.id not in gone)
        refused = sorted(wanted.difference(cancelled))
        self.conn.send({"t": "cancel_reply", "key": key, "cancelled": cancelled, "refused": refused})

    def _drop(self, gids: list[int]) -> None:
        gone = set(gids)
        self.queue = deque(t for t in self.queue if t.id not in gone)
        for proc in self.procs.values():
            mine = [t.id for t in proc.tasks if t.id in gone]
            if mine:
                proc.skip.update(mine)
                if proc.task.id in gone:  # running: stop it (a queued one is stopped when it comes up)
                    self._kill_for(proc, proc.task.id, None)

    def _kill_tasks(self, gids: list[int]) -> None:
        wanted = set(gids)
        for task in [t for t in self.queue if t.id in wanted]:
            self.queue.remove(task)
            self._out_results.append((task.id, "error", [], {"kind": "killed", "started": False}))
        for proc in self.procs.values():
            for task in list(proc.tasks)[1:]:
                if task.id in wanted and task.id not in proc.skip:  # queued in the process: not run yet
                    proc.skip.add(task.id)
                    self._out_results.append((task.id, "error", [], {"kind": "killed", "started": False}))
            if proc.task is not None and proc.task.id in wanted and proc.task.id not in proc.skip:
                self._kill_for(proc, proc.task.id, {"kind": "killed", "started": True})
        self._schedule_flush()

    def _on_deadline(self, proc: _Proc, gid: int, limit: float) -> None:
        if proc.task is not None and proc.task.id == gid and proc.kill_for is None:
            log.warning("task exceeded its time limit of %g s in process %d; killing the process", limit, proc.pid)
            self._kill_for(proc, gid, {"kind": "timeout", "timeout": limit})

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _started_timer(self) -> None:
        self._started_scheduled = False
        self._flush_started()

    def _flush_started(self) -> None:
        """Tell the master which tasks are running, a moment late on purpose: a short task's result
        usually arrives first, and then no "started" message travels at all for it."""
        if not self._out_started:
            return
        running = {t.id for p in self.procs.values() for t in p.tasks}
        started = [g for g in self._out_started if g in running]
        self._out_started = []
        if started and self.conn is not None and not self.conn.closed:
            self.conn.send({"t": "started", "ids": started})

    def _flush(self) -> None:
        self._flush_scheduled = False
        conn = self.conn
        if conn is None or conn.closed:
            self._out_started.clear()
            self._out_results.clear()
            self._out_output.clear()
            return
        if self._out_output:  # before the results, which may end the tasks that printed it
            for group in P.in_frames(self._out_output, lambda o: P.nbytes(o[1]), self.max_frame):
                conn.send({"t": "output", "items": [item for item, _ in group]},
                          [data for _, bufs in group for data in bufs])
            self._out_output = []
        if self._out_results:
            for group in P.in_frames(self._out_results, P.result_size, self.max_frame):
                items, buffers = P.encode_results(group)
                conn.send({"t": "results", "items": items}, buffers)
            self._out_results = []
        self._ask_prefetch(conn)

    def _ask_prefetch(self, conn: Any) -> None:
        """Quick tasks: ask the master to hand us more of them ahead of time, enough to keep every task
        process's pipeline full while the next batch is on its way. Slow ones: back to its default, and
        give back what we hold beyond it, so that other nodes may run it.

        Tasks already waiting in a process behind a long one count on top, so that they never use up the
        room the other processes need: those must not starve until the long task ends. A process counts as
        slow here only once its task has run SLOW_AFTER: a moment's hiccup must not send tasks back."""
        procs = list(self.procs.values())
        depths = [p.depth(SLOW_AFTER) for p in procs]
        quick = sum(depths)
        stuck = sum(max(0, len(p.tasks) - d) for p, d in zip(procs, depths, strict=True))
        want = (2 * quick if quick > len(procs) else 0) + stuck
        back = []
        if quick <= len(procs) and len(self.queue) > self.nprocs:
            back = [self.queue.pop().id for _ in range(len(self.queue) - self.nprocs)][::-1]
        asked = self._prefetch_asked
        if not back and (want == asked or (want and asked and asked / 2 <= want <= asked * 2)):
            return
        self._prefetch_asked = want
        conn.send({"t": "prefetch", "n": want, "back": back} if back else {"t": "prefetch", "n": want})

    # ------------------------------------------------------------------------------------------ lending

    # Local mode: while the client has nothing else in flight (a loop of submit(...).result(), say), it runs its
    # task on an idle task process of ours directly, sparing the hops through the master and this agent. It asks
    # over `lender` (a SOCK_SEQPACKET pair from LocalCluster, one JSON message per packet); we pass it the
    # process's socket, stop reading it and give the process nothing until it comes back with the client's copy
    # of the blob-cache mirror. The process stays ours: we kill it when the client asks, and when it dies we reap
    # and replace it and tell the client how, for the client to report or retry its task.

    def _on_lender(self) -> None:
        try:
            data = self.lender.recv(LEND_MESSAGE_MAX)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the client is gone: nobody wants what runs on a lent process any more
            self._close_lender()
            for proc in self.procs.values():
                if proc.lent:
                    self._kill(proc)
            return
        try:
            msg = json.loads(data)
            kind = msg["t"]
            if kind == "lend":
                self._lend()
            elif kind == "return":
                self._take_back(self.procs.get(msg["pid"]), msg["sent"])
            elif kind == "kill":
                self._kill_lent(self.procs.get(msg["pid"]), int(msg["task"]) if "task" in msg else None)
        except (ValueError, TypeError, KeyError) as e:
            log.warning("malformed message from the local client: %s", e)

    def _lend(self) -> None:
        proc = None
        if not self.closing and not self.leaving:
            proc = next((p for p in self.procs.values()
                         if p.usable and not p.tasks and p.pidfd is not None and not backlog(p.conn)), None)
        if proc is None:
            self._tell_lender({"t": "no"})
            return
        transport = proc.conn.transport
        transport.pause_reading()
        proc.lent = True
        sock = transport.get_extra_info("socket")
        if not self._tell_lender({"t": "lent", "pid": proc.pid, "host": self.host, "sent": proc.sent.export()},
                                 sock.fileno()):
            proc.lent = False
            transport.resume_reading()

    def _take_back(self, proc: _Proc | None, sent: Any) -> None:
        if proc is None or not proc.lent:
            return
        try:
            proc.sent = P.BlobLRU.restored(sent)
        except (ValueError, TypeError) as e:
            log.warning("a task process came back with a malformed cache list (%s); replacing it", e)
            self._kill(proc)  # we no longer know which functions it holds
            return
        proc.lent = False
        proc.conn.transport.resume_reading()
        self._dispatch()

    def _kill_lent(self, proc: _Proc | None, task: int | None) -> None:
        """The client's kill of a task on a lent process: unless another task of the client's runs there now
        (this one ended, and the client sent the next), which the client would then have to run again. With
        no task, the process itself is of no use to the client any more."""
        if proc is None or not proc.lent or proc.phase is None:
            return
        phase, running = PHASE.unpack_from(proc.phase)
        if task is None or running == task or phase == IDLE:
            self._kill(proc)

    def _tell_lender(self, msg: dict[str, Any], fd: int | None = None) -> bool:
        lender = self.lender
        if lender is None:
            return False
        data = json.dumps(msg).encode()
        try:
            if fd is None:
                lender.send(data)
            else:
                socket.send_fds(lender, [data], [fd])
        except OSError as e:  # (a few small messages at most are ever unread: the client's thread reads them)
            log.error("cannot reach the local client to lend it a task process: %s", e)
            return False
        return True

    def _close_lender(self) -> None:
        if self.lender is not None:
            self._loop.remove_reader(self.lender.fileno())
            self.lender.close()
            self.lender = None

    # ------------------------------------------------------------------------------------------ processes

    def _dispatch(self) -> None:
        if self.leaving:
            if self._all_idle is not None and not self._all_idle.done() and all(
                    p.task is None for p in self.procs.values()):
                self._all_idle.set_result(None)
            return
        if not self.queue:
            return
        queue = self.queue
        ready = [p for p in self.procs.values() if p.usable]
        batches: dict[_Proc, list[P.Task]] = {}
        for proc in ready:  # first one task to each idle process
            if not queue:
                break
            if not proc.tasks:
                self._give(proc, queue.popleft(), batches)
        # Then quick tasks queue up behind quick ones, round-robin, as deep as each process is quick.
        room = [p for p in ready if p.tasks and len(p.tasks) < p.depth() and _pipelined(p.tasks[0])]
        while queue and room and self._quick(queue[0]):
            for proc in list(room):
                if not queue or not self._quick(queue[0]):
                    break
                self._give(proc, queue.popleft(), batches)
                if len(proc.tasks) >= proc.depth():
                    room.remove(proc)
        for proc, tasks in batches.items():
            entries, buffers = P.encode_tasks(((t.id, t) for t in tasks), proc.sent)
            proc.conn.send({"t": "run", "tasks": entries}, buffers)
        if self._prefetch_asked and self._recheck is None:
            self._recheck = self._loop.call_later(4 * PIPELINE_WORK, self._look_again)
        if self._out_started and not self._started_scheduled:
            self._started_scheduled = True
            self._loop.call_later(STARTED_DELAY, self._started_timer)

    def _quick(self, task: P.Task) -> bool:
        """May this task wait behind another in a task process? Only if its function's tasks have been quick
        lately: a slow function's tasks go to idle processes, and to other nodes if those are idle first."""
        return _pipelined(task) and self._fn_took.get(task.deps[0].hash, PIPELINE_WORK) < PIPELINE_WORK

    def _look_again(self) -> None:
        """While we hold tasks ahead of time: have they turned slow? (Then _ask_prefetch gives back the
        surplus, for other nodes to run.) Nothing else may happen here for as long as the tasks run. Once we
        hold none, there is nothing to look at: an idle node sleeps until the next tasks (_dispatch looks
        again from then on)."""
        self._recheck = None
        conn = self.conn
        if conn is not None and not conn.closed and not self.leaving:
            self._ask_prefetch(conn)
        if self._prefetch_asked and not self.closing and self._holds_tasks():
            self._recheck = self._loop.call_later(4 * PIPELINE_WORK, self._look_again)

    def _holds_tasks(self) -> bool:
        return bool(self.queue) or any(p.tasks for p in self.procs.values())

    def _give(self, proc: _Proc, task: P.Task, batches: dict[_Proc, list[P.Task]]) -> None:
        if not proc.tasks:
            proc.head_since = time.monotonic()
        proc.tasks.append(task)
        batches.setdefault(proc, []).append(task)
        self._out_started.append(task.id)
        if task.opts:
            if task.opts.get("confirm"):
                # Suspected of killing its node: the master hears of the start before the task can run.
                self._flush_started()
            limit = task.opts.get("timeout")
            if limit:  # (never queued behind another task: it starts now)
                proc.deadline = self._loop.call_later(float(limit), self._on_deadline, proc, task.id, float(limit))

    def _spawn(self) -> None:
        parent_sock, child_sock = socket.socketpair()
        phase = mmap.mmap(-1, PHASE.size)  # anonymous and shared: survives fork, read by us when the child dies
        pid = os.fork()
        if pid == 0:  # child
            try:
                parent_sock.close()
                task_process_main(child_sock, phase)
            finally:
                os._exit(0)
        child_sock.close()
        proc = _Proc(pid)
        proc.phase = phase
        self.procs[pid] = proc
        self._watch_exit(proc)
        parent_sock.setblocking(False)

        def factory() -> FramedConnection:
            conn = FramedConnection(role="none", key=None, on_ready=_no_op,
                                    on_messages=self._on_proc_messages, on_lost=self._on_proc_lost)
            conn.state = proc
            return conn

        self._loop.create_task(self._attach(proc, parent_sock, factory))

    async def _attach(self, proc: _Proc, sock: socket.socket, factory) -> None:
        _, conn = await self._loop.create_unix_connection(factory, sock=sock)
        proc.conn = conn
        self._dispatch()

    def _on_proc_messages(self, conn: FramedConnection, messages: list[P.Message]) -> None:
        proc: _Proc = conn.state
        for msg in messages:
            if msg.type == "output":
                self._task_output(proc, msg)
                continue
            if msg.type != "results":
                raise P.ProtocolError(f"unexpected {msg.type!r} from a task process")
            items = msg.header["items"]
            for item, bufs in zip(items, P.split_buffers(items, msg.buffers), strict=True):
                self._task_result(proc, item, bufs)
            head = proc.task
            if head is not None and head.id in proc.skip and not proc.killed:
                self._kill_for(proc, head.id, None)  # it has started a task nobody wants any more
        self._dispatch()
        if not self._flush_scheduled and loop_is_idle(self._loop):
            self._flush()  # no other process's results to wait for in this loop iteration
        else:
            self._schedule_flush()

    def _task_result(self, proc: _Proc, item: list[Any], bufs: list[memoryview]) -> None:
        gid, status, _, info = item
        task = proc.task
        proc.runs += 1
        if task is None or task.id != gid:
            _discard(bufs, info)
            return
        proc.tasks.popleft()
        now = time.monotonic()
        took = now - proc.head_since
        proc.service = _lately(proc.service, took)
        proc.head_since = now
        fn = task.deps[0].hash
        if fn not in self._fn_took and len(self._fn_took) >= _FN_TIMES_MAX:
            self._fn_took.clear()
        self._fn_took[fn] = _lately(self._fn_took.get(fn, float("inf")), took)
        mtpc = (task.opts or {}).get("mtpc")
        if mtpc and proc.runs >= mtpc:
            proc.retiring = True
        if proc.deadline is not None:
            proc.deadline.cancel()
            proc.deadline = None
        if task.id in proc.skip:
            proc.skip.discard(task.id)
            _discard(bufs, info)
            return
        lost_output = self._output_dropped.pop((task.id, proc.pid), 0)
        if lost_output:
            self._out_output.append(([task.id, proc.pid, 2, lost_output], [b""]))
        size = P.nbytes(bufs)
        if size > self.max_frame:  # the master would refuse the frame: fail this task alone
            _discard(bufs, info)
            self._out_results.append((task.id, "error", [], {
                "kind": "serialization", "phase": "sending the result", "type": "clusterexec.ClusterError",
                "message": f"the result is {size >> 20} MiB, more than the master accepts in one message "
                           f"({self.max_frame >> 20} MiB; see python -m clusterexec.master --max-frame-mb)",
                "pid": proc.pid, "host": self.host}))
        else:
            self._out_results.append((task.id, status, bufs, info))

    def _task_output(self, proc: _Proc, msg: P.Message) -> None:
        """What a task printed: on to the master, unless the link to it is backed up (then counted, dropped)."""
        h = msg.header
        gid = h["id"]
        # (A task process holds quick results back to send several at once: the task that printed may be
        # one behind the first.)
        if gid in proc.skip or not any(t.id == gid for t in proc.tasks):
            return
        key = (gid, proc.pid)
        dropped = int(h.get("dropped", 0))
        if backlog(self.conn) > OUTPUT_BACKLOG:
            self._output_dropped[key] = self._output_dropped.get(key, 0) + dropped + P.nbytes(msg.buffers)
            return
        dropped += self._output_dropped.pop(key, 0)
        for stream, data in zip(h["s"], msg.buffers, strict=True):
            self._out_output.append(([gid, proc.pid, int(stream), dropped], [data]))
            dropped = 0
        if dropped:
            self._out_output.append(([gid, proc.pid, 2, dropped], [b""]))
        self._schedule_flush()

    def _on_proc_lost(self, conn: FramedConnection, exc: BaseException | None) -> None:
        proc: _Proc = conn.state
        proc.eof = True
        proc.eof_at = time.monotonic()
        self._reap(proc)

    def _watch_exit(self, proc: _Proc) -> None:
        """Learn of the process's exit from the kernel, not only from its socket: a process it forked may
        keep that socket open long after it died."""
        try:
            proc.pidfd = os.pidfd_open(proc.pid)
        except (AttributeError, OSError):
            return  # no pidfd here: end-of-file on its socket tells us instead
        self._loop.add_reader(proc.pidfd, self._on_exit, proc)

    def _on_exit(self, proc: _Proc) -> None:
        self._close_pidfd(proc)
        # Its last result may still be unread in the socket; read it before deciding the task was lost.
        self._loop.call_later(0.05, self._reap, proc)

    def _close_pidfd(self, proc: _Proc) -> None:
        if proc.pidfd is not None:
            self._loop.remove_reader(proc.pidfd)
            os.close(proc.pidfd)
            proc.pidfd = None

    def _kill_for(self, proc: _Proc, gid: int, reason: dict[str, Any] | None) -> None:
        if proc.kill_for is None:
            proc.kill_for, proc.kill_reason = gid, reason
        self._kill(proc)

    def _kill(self, proc: _Proc) -> None:
        """Kill a task process and the processes of its session's group: what its task started dies with it.
        (Unreaped, it still holds its pid, and so its group's id: the signal can reach nobody else.)"""
        proc.killed = True
        kill_group(proc.pid)

    def _reap(self, proc: _Proc) -> None:
        """Collect a dead process: report its task as lost, start a replacement."""
        if proc.pid not in self.procs:
            return
        try:
            # Look before reaping: while it is a zombie, its pid (its group's id) cannot be anyone else's.
            exited = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
            if exited:
                kill_group(proc.pid)  # the processes its tasks started
            pid, status = os.waitpid(proc.pid, 0) if exited else (0, 0)
        except ChildProcessError:
            pid, status = proc.pid, 0
        if pid == 0:  # closed its socket but still exiting: look again shortly
            if not proc.killed and proc.eof and time.monotonic() - proc.eof_at > 5:
                self._kill(proc)  # it closed its connection but lingers: it is of no use any more
            self._loop.call_later(0.005, self._reap, proc)
            return
        del self.procs[proc.pid]
        self._close_pidfd(proc)
        self._stop_strays()
        if proc.conn is not None:
            proc.conn.close()
        info: dict[str, Any] = {"pid": proc.pid, "host": self.host}
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            info["signal"] = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        else:
            info["exitcode"] = os.WEXITSTATUS(status)
        running = None
        if proc.phase is not None:
            code, running = PHASE.unpack_from(proc.phase)
            info["phase"] = PHASES[code] if code < len(PHASES) else "?"
            proc.phase.close()
        if proc.lent:  # the client ran its task there itself: it reports (or retries) the task
            self._tell_lender({"t": "died", "pid": proc.pid, "task": running, "info": info})
        if proc.deadline is not None:
            proc.deadline.cancel()
        # It ran its tasks in order and wrote down the one it was running: those before it had finished (their
        # results, held back to go out together, died with it), those after it had not started. Only the task
        # it died of counts: the one it was killed for, or else the one running. The others run again.
        held = {t.id for t in proc.tasks}
        prefix = os.environ.get(shm.ENV_PREFIX)
        if prefix and held:  # local mode: results it wrote to shared memory and never sent
            shm.remove_unsent(prefix, proc.pid, held)
        if proc.kill_for is not None:
            culprit = proc.kill_for
        else:
            culprit = running if running in held else proc.task.id if proc.tasks else None
        again = [t for t in proc.tasks if t.id != culprit and t.id not in proc.skip]
        if culprit in held and culprit not in proc.skip:
            if proc.kill_reason is not None:
                self._out_results.append((culprit, "error", [], dict(info, **proc.kill_reason)))
            else:
                log.warning("task process %d died while running a task (%s); replacing it", proc.pid,
                            f"signal {info['signal']}" if "signal" in info else f"exit code {info['exitcode']}")
                self._out_results.append((culprit, "lost", [], info))
            self._schedule_flush()
        proc.tasks.clear()
        if again and not self.closing:
            if self.leaving:
                self._hand_back([t.id for t in again])
            else:
                self.queue.extendleft(reversed(again))
        if not self.closing:
            self._spawn()

    def _stop_strays(self) -> None:
        """Kill the orphans dead task processes left (they came to us, the subreaper: whatever we did not
        fork ourselves), and reap them; look again until none is left, as each may leave orphans too."""
        if self._kill_strays() and self._strays_timer is None and not self.closing:
            self._strays_timer = self._loop.call_later(0.01, self._strays_again)

    def _strays_again(self) -> None:
        self._strays_timer = None
        self._stop_strays()

    def _kill_strays(self) -> bool:
        """One round of _stop_strays; True if there were any."""
        strays = [pid for pid in children(os.getpid()) if pid not in self.procs]
        for pid in strays:  # (our children, unreaped: their pids are not anyone else's)
            kill_quietly(pid)
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
        return bool(strays)

def _discard(bufs: list[Any], info: Any) -> None:
    """A result nobody will read: its shared-memory segments (local mode) go back to the pool or away."""
    prefix = os.environ.get(shm.ENV_PREFIX)
    if prefix:
        shm.recycle(shm.result_markers(bufs, info), prefix)


def _forget_stale_registration(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    """Drop whatever the loop's selector still holds for this descriptor number.

    Seen on Python 3.13: after a write to a master that had hung up (EPIPE, when a frozen agent is thawed),
    the old socket was closed while still registered, and its number, reused by the next socket, then
    failed every registration (ENOENT from epoll), so the agent never reconnected."""
    selector = getattr(loop, "_selector", None)
    if selector is None:
        return
    try:
        selector.unregister(fd)
    except (KeyError, ValueError):
        pass


def _no_op(conn: FramedConnection) -> None:
    pass


# ================================================================================================ CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m clusterexec.worker",
        description="Start a clusterexec worker node: an agent and its task processes, connected to a master.")
    parser.add_argument("address", help=f"the master, HOST or HOST:PORT (default port {DEFAULT_PORT})")
    parser.add_argument("--nprocs", type=int, default=None, help="task processes (default: the CPU count)")
    parser.add_argument("--authkey-file", help="file holding the shared key (default ~/.clusterexec/authkey)")
    parser.add_argument("--authkey", help="the shared key itself (visible in `ps`; prefer a key file)")
    parser.add_argument("--connect-timeout", type=float, default=60.0,
                        help="seconds to keep trying to reach the master at start (default 60)")
    parser.add_argument("--reconnect-window", type=float, default=60.0,
                        help="seconds to keep trying to reach a master that went away, e.g. to restart "
                             "(default 60; 0 exits at once)")
    parser.add_argument("--grace", type=float, default=30.0, metavar="S",
                        help="on SIGTERM or Ctrl-C, seconds running tasks get to finish before they are handed "
                             "back to the master (default 30; a second signal hands them back at once)")
    add_tls_arguments(parser, "this worker node's")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    try:
        address = parse_address(args.address)
        key, _ = resolve_key(args.authkey, args.authkey_file)
        args.ssl_context = tls_from_arguments(args, server=False)
    except (ValueError, MissingKeyError, OSError) as e:  # TLSConfigError is a ValueError
        print(f"clusterexec.worker: {e}", file=sys.stderr)
        return 2
    if args.nprocs is not None and args.nprocs < 1:
        print("clusterexec.worker: --nprocs must be at least 1", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_run(address, key, args))
    except KeyboardInterrupt:
        return 0


async def _run(address: tuple[str, int], key: bytes, args: argparse.Namespace) -> int:
    agent = Agent(address, key, args.nprocs, connect_timeout=args.connect_timeout,
                  reconnect_window=args.reconnect_window, ssl_context=args.ssl_context)
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        # The first signal leaves gracefully; a second one (an impatient Ctrl-C) hands back at once.
        if agent.leaving:
            agent.hurry()
        else:
            loop.create_task(agent.leave(args.grace))

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    try:
        await agent.start()
    except (ConnectionError, P.ProtocolError) as e:
        print(f"clusterexec.worker: {e}", file=sys.stderr)
        await agent.stop()
        return 1
    await agent.closed.wait()
    if agent.failure is not None:
        print(f"clusterexec.worker: {agent.failure}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

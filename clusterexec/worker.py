"""A worker node: the agent process and its task processes. `python -m clusterexec.worker HOST[:PORT]`.

    master ══TCP══▶ Agent (asyncio, never runs user code, never unpickles)
                      │ NodeState (node_state.py, no I/O): the queue of tasks the master handed us, which
                      │ process holds which, pipelining, prefetch, what a dead process's tasks become.
                      │ The agent feeds it events (tasks, results, deaths, cancels) and does what it says.
                      ├──socketpair──▶ task process 1 (task_process.py): unpickle fn (cached by hash), run,
                      ├──socketpair──▶ task process 2                    pickle result
                      └── …  a process that dies mid-task is reaped, reported "lost" with its exit code
                             or signal, and replaced; the master decides on a retry.
    local client ◀══lender══▶ (local mode only) an idle task process's socket is lent to the client, which
                      runs a task there itself while it has nothing else in flight; see supervisor.py.

Task processes are forked from the agent, which is single-threaded, so start-up is fast and they inherit
the imports. Each asks the kernel to kill it if the agent dies (PR_SET_PDEATHSIG), so no process outlives
its node. Only the agent talks to the master; it answers even while every task process runs user code.

Processes a task starts end with the task. Each task process leads a session of its own and is a child
subreaper, as is the agent: what a task leaves running stays below its task process, even a daemon that
double-forked (orphans come back to the nearest subreaper, not to init). When a task ends, its process kills
and reaps whatever it has below it before it sends the result (one waitid() per results message says whether
there is anything), but for multiprocessing's forkserver and resource tracker, which serve its next tasks.
When a task process dies or is killed (a time limit, ex.kill(), the node stopping), the agent kills its
session's process group, then every child of its own that is no task process: the orphans it left
(process_tree.py).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import signal
import socket
import ssl
import sys
import time
from typing import Any

import cloudpickle

from . import node_state as N
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
from .supervisor import Proc, Supervisor

log = logging.getLogger("clusterexec.worker")

STARTED_DELAY = 0.002  # seconds a task runs before the master (and the Future) hear it started
PIPELINE_WORK = N.PIPELINE_WORK  # (a task process's pipeline: see node_state)
# Reaching the master: seconds one TCP connect may take (the kernel's own first SYN timeout; see
# Agent._open_socket), and then the authentication, with TLS, until the master's welcome.
CONNECT_ATTEMPT = 1.0
HANDSHAKE_ATTEMPT = 10.0


# ================================================================================================ agent


class Agent:
    """Connects to the master, supervises `nprocs` task processes, and relays tasks and results."""

    def __init__(self, address: tuple[str, int], key: bytes, nprocs: int | None = None,
                 *, connect_timeout: float = 60.0, reconnect_window: float = 60.0,
                 ssl_context: ssl.SSLContext | None = None):
        self.address = address
        self.key = key
        self.nprocs = nprocs or N.default_nprocs()
        self.connect_timeout = connect_timeout
        self.reconnect_window = reconnect_window
        self.ssl_context = ssl_context  # TLS towards the master (never on an in-process link)
        self.host = socket.gethostname()
        self.node = N.NodeState(self.nprocs, self.host)  # the queue, the processes' tasks, the outbox
        self.conn: FramedConnection | LinkEnd | None = None
        self.cache = P.BlobLRU()
        self.closed = asyncio.Event()
        self._all_idle: asyncio.Future | None = None  # set when leaving and no task runs any more
        self._welcome: asyncio.Future | None = None
        self._flush_scheduled = False
        self._started_scheduled = False
        self._recheck: asyncio.TimerHandle | None = None  # looks again whether tasks have turned slow
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last_heard = 0.0
        self._heartbeat: tuple[float, float] | None = None  # (interval, timeout) the master asked for
        self._watchdog: asyncio.TimerHandle | None = None
        self.failure: BaseException | None = None
        # The task processes: forks, kills, reaps them, and lends idle ones to the local client.
        self.supervisor = Supervisor(self.node, self.host, self._on_proc_messages, self._dispatch, self._on_death)

    @property
    def closing(self) -> bool:
        """Stopping: nothing runs again, nothing is replaced."""
        return self.node.closing

    @property
    def leaving(self) -> bool:
        """Finishing up after SIGTERM: no new tasks."""
        return self.node.leaving

    # ------------------------------------------------------------------------------------------ lifecycle

    async def start(self, link: LinkEnd | None = None, lender: socket.socket | None = None) -> None:
        """Start the task processes and connect to the master (retrying until `connect_timeout`).

        `link`: the agent's end of an in-process link to a master in this event loop, instead of TCP.
        `lender`: local mode's channel to its one client, which borrows idle task processes over it.
        """
        self._loop = asyncio.get_running_loop()
        self.supervisor.start(self.nprocs, lender)
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
        self.node.closing = True
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self.conn is not None:
            self.conn.close()
        await self.supervisor.stop()
        self.closed.set()

    async def leave(self, grace: float) -> None:
        """Leave the cluster without losing work (SIGTERM, Ctrl-C): take no new tasks and hand the queued
        ones back at once; give the running ones `grace` seconds to finish and send their results; hand back
        whatever still runs then, and stop. The master requeues what it gets back, charging no retry."""
        if self.leaving or self.closing:
            return
        queued = self.node.leave()
        try:
            await self._finish_up(grace, queued)
        except Exception:  # (whatever went wrong on the way, a node told to stop stops)
            log.exception("error while leaving the cluster; stopping now")
        finally:
            await self.stop()

    async def _finish_up(self, grace: float, queued: list[int]) -> None:
        node = self.node
        # Tasks already in a task process count as running: a few milliseconds' worth of quick ones at most.
        running = node.running()
        began = time.monotonic()
        if running and grace > 0:
            log.info("leaving: handing back %d queued tasks; giving %d running ones up to %g s to finish",
                     len(queued), running, grace)
        else:
            log.info("leaving: handing back %d queued and %d running tasks", len(queued), running)
        self._hand_back(queued)
        if running and grace > 0:
            self._all_idle = self._loop.create_future()
            try:
                await asyncio.wait_for(asyncio.shield(self._all_idle), grace)
            except TimeoutError:
                pass
        unfinished = node.hand_back_running()  # not losses: the master hears "handed back" instead
        if unfinished:
            log.warning("leaving: %d tasks still running after %.1f s; handing them back", len(unfinished),
                        time.monotonic() - began)
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
            h = msg.header
            t = P.check_message("master", h)
            try:
                if t == "tasks":
                    back = self.node.tasks_arrived(P.decode_tasks(h["tasks"], msg.buffers, self.cache))
                    if back:
                        self._hand_back(back)
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
                    self.node.max_frame = int(h.get("max_frame") or P.DEFAULT_MAX_FRAME)
                    if isinstance(conn, FramedConnection):
                        conn.reader.max_frame = max(conn.reader.max_frame, self.node.max_frame)
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
        in_flight = len(self.node.queue) + self.node.running()
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
        for proc in self.node.forget_session():
            self.supervisor.kill(proc)
        self.cache = P.BlobLRU()

    async def _reconnect(self) -> None:
        try:
            await self._connect(self.reconnect_window)
        except (ConnectionError, P.ProtocolError, P.AuthenticationError, P.VersionMismatch) as e:
            if not self.closing:
                self.failure = ConnectionError(f"the master did not come back within "
                                               f"{self.reconnect_window:.0f} s: {e}")
                await self.stop()

    def _cancel(self, key: int, gids: list[int]) -> None:
        self.conn.send(self.node.cancel(key, gids))

    def _drop(self, gids: list[int]) -> None:
        for proc in self.node.drop(gids):
            self.supervisor.kill(proc)

    def _kill_tasks(self, gids: list[int]) -> None:
        for proc in self.node.kill_tasks(gids):
            self.supervisor.kill(proc)
        self._schedule_flush()

    def _on_deadline(self, proc: Proc, gid: int, limit: float) -> None:
        if self.node.deadline_passed(proc, gid, limit):
            log.warning("task exceeded its time limit of %g s in process %d; killing the process", limit, proc.pid)
            self.supervisor.kill(proc)

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _started_timer(self) -> None:
        self._started_scheduled = False
        self._flush_started()

    def _flush_started(self) -> None:
        """Tell the master which tasks are running, a moment late on purpose (see NodeState.take_started)."""
        report = self.node.take_started()
        if report is not None and self.conn is not None and not self.conn.closed:
            self.conn.send(report)

    def _on_death(self, death: N.Death) -> None:
        """A task process died (the supervisor replaces it): report its task, hand back the others if leaving."""
        if death.culprit is not None:
            self._schedule_flush()
        if death.back:
            self._hand_back(death.back)

    def _flush(self) -> None:
        self._flush_scheduled = False
        conn = self.conn
        if conn is None or conn.closed:
            self.node.discard_outbox()
            return
        for header, buffers in self.node.flush(time.monotonic()):
            conn.send(header, buffers)

    # ------------------------------------------------------------------------------------------ processes

    def _dispatch(self) -> None:
        node = self.node
        if node.leaving:
            if self._all_idle is not None and not self._all_idle.done() and node.idle():
                self._all_idle.set_result(None)
            return
        if not node.queue:
            return
        todo = node.dispatch(time.monotonic())
        if todo.reports and self.conn is not None and not self.conn.closed:
            for report in todo.reports:  # (before the tasks can run)
                self.conn.send(report)
        for proc, gid, limit in todo.deadlines:
            proc.deadline = self._loop.call_later(limit, self._on_deadline, proc, gid, limit)
        for proc, tasks in todo.runs.items():
            entries, buffers = P.encode_tasks(((t.id, t) for t in tasks), proc.sent)
            proc.conn.send({"t": "run", "tasks": entries}, buffers)
        if node.prefetch_asked and self._recheck is None:
            self._recheck = self._loop.call_later(4 * PIPELINE_WORK, self._look_again)
        if node.started and not self._started_scheduled:
            self._started_scheduled = True
            self._loop.call_later(STARTED_DELAY, self._started_timer)

    def _look_again(self) -> None:
        """While we hold tasks ahead of time: have they turned slow? (Then NodeState.ask_prefetch gives back
        the surplus, for other nodes to run.) Nothing else may happen here for as long as the tasks run. Once
        we hold none, there is nothing to look at: an idle node sleeps until the next tasks (_dispatch looks
        again from then on)."""
        self._recheck = None
        node = self.node
        conn = self.conn
        if conn is not None and not conn.closed and not node.leaving:
            ask = node.ask_prefetch(time.monotonic())
            if ask is not None:
                conn.send(ask)
        if node.prefetch_asked and not node.closing and node.holds_tasks():
            self._recheck = self._loop.call_later(4 * PIPELINE_WORK, self._look_again)

    def _on_proc_messages(self, conn: FramedConnection, messages: list[P.Message]) -> None:
        proc: Proc = conn.state
        node = self.node
        for msg in messages:
            if msg.type == "output":
                h = msg.header
                if node.printed(proc, h["id"], h["s"], msg.buffers, int(h.get("dropped", 0)),
                               backlog(self.conn) > OUTPUT_BACKLOG):
                    self._schedule_flush()
                continue
            if msg.type != "results":
                raise P.ProtocolError(f"unexpected {msg.type!r} from a task process")
            items = msg.header["items"]
            for item, bufs in zip(items, P.split_buffers(items, msg.buffers), strict=True):
                gid, status, _, info = item
                if not node.result(proc, gid, status, bufs, info, time.monotonic()):
                    _discard(bufs, info)
            if proc.deadline is not None and not proc.tasks:  # (a task with a time limit runs alone)
                proc.deadline.cancel()
                proc.deadline = None
            if node.unwanted_head(proc):
                self.supervisor.kill(proc)  # it has started a task nobody wants any more
        self._dispatch()
        if not self._flush_scheduled and loop_is_idle(self._loop):
            self._flush()  # no other process's results to wait for in this loop iteration
        else:
            self._schedule_flush()


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

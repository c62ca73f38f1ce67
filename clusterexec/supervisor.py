"""A worker node's task processes, as the agent sees them: forked, attached, watched, killed and reaped.

    Agent ──spawn──▶ Supervisor ──fork──▶ task process (task_process.py) ══socketpair══▶ FramedConnection
                        │ pidfd: the kernel says when it exits (its socket may outlive it in a child it forked)
                        │ reap: waitpid, how it ended (exit code or signal, the phase it was in: shared memory)
                        │       ──▶ NodeState.process_died ──▶ Agent (its results, hand-backs), a replacement
                        │ kill: SIGKILL to its session's process group; then the orphans it left (strays)
    local client ◀══lender══▶ an idle process's socket is lent to the client (see "Lending" below)

The agent (worker.py) decides what to kill and when, from the node's state (node_state.py); this class does
the system calls. It runs in the agent's event loop, and the agent must stay single-threaded: it forks.
"""

from __future__ import annotations

import asyncio
import json
import logging
import mmap
import os
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

from . import node_state as N
from . import protocol as P
from . import shm
from .connection import FramedConnection, backlog
from .process_tree import become_subreaper, children, kill_group, kill_quietly
from .task_process import IDLE, PHASE, PHASES, task_process_main

log = logging.getLogger("clusterexec.worker")

LEND_MESSAGE_MAX = 1 << 16  # bytes in one message between a local client and its agent (see Supervisor._on_lender)


class Proc(N.Process):
    """One task process: its state in the node (N.Process), and what the agent talks to it through."""

    __slots__ = ("conn", "sent", "eof_at", "pidfd", "phase", "deadline")

    def __init__(self, pid: int):
        super().__init__(pid)
        self.conn: FramedConnection | None = None
        self.sent = P.BlobLRU()  # the blobs it holds (sent by hash only from now on)
        self.eof_at = 0.0
        self.pidfd: int | None = None
        self.phase: mmap.mmap | None = None
        self.deadline: asyncio.TimerHandle | None = None  # its task's time limit (see Agent._on_deadline)


class Supervisor:
    """Starts `nprocs` task processes and keeps that many running; lends idle ones to the local client.

    `on_messages(conn, messages)`: what a process sent (conn.state is its Proc). `on_ready()`: a process may
    take tasks now. `on_death(death)`: a process is gone, and what that means (N.Death); a replacement follows.
    """

    def __init__(self, node: N.NodeState, host: str, on_messages: Callable[[FramedConnection, list[P.Message]], None],
                 on_ready: Callable[[], None], on_death: Callable[[N.Death], None]):
        self.node = node
        self.host = host
        self._on_messages = on_messages
        self._on_ready = on_ready
        self._on_death = on_death
        self._loop: asyncio.AbstractEventLoop | None = None
        self.lender: socket.socket | None = None  # local mode: where the client asks to borrow a task process
        self._strays_timer: asyncio.TimerHandle | None = None

    def start(self, nprocs: int, lender: socket.socket | None = None) -> None:
        """Fork the task processes; `lender`: local mode's channel to its one client."""
        self._loop = asyncio.get_running_loop()
        become_subreaper()  # what a dead task process leaves comes to us (see _stop_strays)
        for _ in range(nprocs):
            self.spawn()
        if lender is not None:
            lender.setblocking(False)
            self.lender = lender
            self._loop.add_reader(lender.fileno(), self._on_lender)

    async def stop(self, patience: float = 5.0) -> None:
        """Kill every task process, and what they left, and reap them (for `patience` seconds at most)."""
        self._close_lender()
        node = self.node
        for proc in list(node.procs.values()):
            self.kill(proc)
        deadline = time.monotonic() + patience
        while (node.procs or self._kill_strays()) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
            for proc in list(node.procs.values()):
                self._reap(proc)

    # ------------------------------------------------------------------------------------------ processes

    def spawn(self) -> None:
        """Fork a task process; it takes tasks once its connection is up (on_ready)."""
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
        proc = Proc(pid)
        proc.phase = phase
        self.node.add(proc)
        self._watch_exit(proc)
        parent_sock.setblocking(False)

        def factory() -> FramedConnection:
            conn = FramedConnection(role="none", key=None, on_ready=_no_op,
                                    on_messages=self._on_messages, on_lost=self._on_proc_lost)
            conn.state = proc
            return conn

        self._loop.create_task(self._attach(proc, parent_sock, factory))

    async def _attach(self, proc: Proc, sock: socket.socket, factory) -> None:
        _, conn = await self._loop.create_unix_connection(factory, sock=sock)
        proc.conn = conn
        self.node.attached(proc)
        self._on_ready()

    def _on_proc_lost(self, conn: FramedConnection, exc: BaseException | None) -> None:
        proc: Proc = conn.state
        self.node.hung_up(proc)
        proc.eof_at = time.monotonic()
        self._reap(proc)

    def _watch_exit(self, proc: Proc) -> None:
        """Learn of the process's exit from the kernel, not only from its socket: a process it forked may
        keep that socket open long after it died."""
        try:
            proc.pidfd = os.pidfd_open(proc.pid)
        except (AttributeError, OSError):
            return  # no pidfd here: end-of-file on its socket tells us instead
        self._loop.add_reader(proc.pidfd, self._on_exit, proc)

    def _on_exit(self, proc: Proc) -> None:
        self._close_pidfd(proc)
        # Its last result may still be unread in the socket; read it before deciding the task was lost.
        self._loop.call_later(0.05, self._reap, proc)

    def _close_pidfd(self, proc: Proc) -> None:
        if proc.pidfd is not None:
            self._loop.remove_reader(proc.pidfd)
            os.close(proc.pidfd)
            proc.pidfd = None

    def kill(self, proc: Proc) -> None:
        """Kill a task process and the processes of its session's group: what its task started dies with it.
        (Unreaped, it still holds its pid, and so its group's id: the signal can reach nobody else.)"""
        proc.killed = True
        kill_group(proc.pid)

    def _reap(self, proc: Proc) -> None:
        """Collect a dead process: report its task as lost, start a replacement."""
        if proc.pid not in self.node.procs:
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
                self.kill(proc)  # it closed its connection but lingers: it is of no use any more
            self._loop.call_later(0.005, self._reap, proc)
            return
        self._close_pidfd(proc)
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
        prefix = os.environ.get(shm.ENV_PREFIX)
        if prefix and proc.tasks:  # local mode: results it wrote to shared memory and never sent
            shm.remove_unsent(prefix, proc.pid, {t.id for t in proc.tasks})
        death = self.node.process_died(proc, running, info)
        self._stop_strays()  # (what it left: it is not one of our task processes any more)
        if death.lost:
            log.warning("task process %d died while running a task (%s); replacing it", proc.pid,
                        f"signal {info['signal']}" if "signal" in info else f"exit code {info['exitcode']}")
        self._on_death(death)
        if death.replace:
            self.spawn()

    def _stop_strays(self) -> None:
        """Kill the orphans dead task processes left (they came to us, the subreaper: whatever we did not
        fork ourselves), and reap them; look again until none is left, as each may leave orphans too."""
        if self._kill_strays() and self._strays_timer is None and not self.node.closing:
            self._strays_timer = self._loop.call_later(0.01, self._strays_again)

    def _strays_again(self) -> None:
        self._strays_timer = None
        self._stop_strays()

    def _kill_strays(self) -> bool:
        """One round of _stop_strays; True if there were any."""
        strays = [pid for pid in children(os.getpid()) if pid not in self.node.procs]
        for pid in strays:  # (our children, unreaped: their pids are not anyone else's)
            kill_quietly(pid)
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
        return bool(strays)

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
            for proc in self.node.procs.values():
                if proc.lent:
                    self.kill(proc)
            return
        try:
            msg = json.loads(data)
            kind = P.check_message("borrower", msg)
            if kind == "lend":
                self._lend()
            elif kind == "return":
                self._take_back(self.node.procs.get(msg["pid"]), msg["sent"])
            elif kind == "kill":
                self._kill_lent(self.node.procs.get(msg["pid"]), int(msg["task"]) if "task" in msg else None)
        except (ValueError, TypeError, KeyError, RecursionError, P.ProtocolError) as e:
            log.warning("malformed message from the local client: %s", e)

    def _lend(self) -> None:
        node = self.node
        proc = next((p for p in node.lendable() if p.pidfd is not None and not backlog(p.conn)), None)
        if proc is None:
            self._tell_lender({"t": "no"})
            return
        transport = proc.conn.transport
        transport.pause_reading()
        node.lend(proc)
        sock = transport.get_extra_info("socket")
        if not self._tell_lender({"t": "lent", "pid": proc.pid, "host": self.host, "sent": proc.sent.export()},
                                 sock.fileno()):
            node.take_back(proc)
            transport.resume_reading()

    def _take_back(self, proc: Proc | None, sent: Any) -> None:
        if proc is None or not proc.lent:
            return
        try:
            proc.sent = P.BlobLRU.restored(sent)
        except (ValueError, TypeError) as e:
            log.warning("a task process came back with a malformed cache list (%s); replacing it", e)
            self.kill(proc)  # we no longer know which functions it holds
            return
        self.node.take_back(proc)
        proc.conn.transport.resume_reading()
        self._on_ready()

    def _kill_lent(self, proc: Proc | None, task: int | None) -> None:
        """The client's kill of a task on a lent process: unless another task of the client's runs there now
        (this one ended, and the client sent the next), which the client would then have to run again. With
        no task, the process itself is of no use to the client any more."""
        if proc is None or not proc.lent or proc.phase is None:
            return
        phase, running = PHASE.unpack_from(proc.phase)
        if task is None or running == task or phase == IDLE:
            self.kill(proc)

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


def _no_op(conn: FramedConnection) -> None:
    pass

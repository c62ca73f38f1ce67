"""The client's connection to the master and the one thread that owns it.

    caller threads                          IO thread ("clusterexec-client")
    submit(): pickle in the caller ──▶ outbox ──wake──▶ one "submit" frame for everything queued
    Future.cancel() ──▶ unsent: cancelled here                 │
                   └──▶ sent: cancel request ────────────────▶ │ ──TCP──▶ master
    Future ◀── set_running / set_result / set_exception ◀───── │ ◀──TCP── started / results / cancel_reply

Callers never touch the socket; the IO thread never pickles user objects (it only unpickles results). A task
stays in `pending` with its payload until its Future resolves, so nothing is lost while it is in flight.

Local mode adds a shortcut for a task submitted while nothing else is in flight (a loop of
`submit(...).result()`): the client borrows an idle task process from its agent (`_Lease`, over the "lender"
channel), the caller sends the task to it directly, and `result()` reads the answer in the caller's thread
(any other way of waiting has the IO thread read it). The lease goes back as soon as tasks go through the
master, and the agent still supervises the process: it kills it on request, and reports its death, after
which the task is retried through the master or fails as it would there.

Done-callbacks run on the thread that resolves the Future, the IO thread most often: one that waits there
for an unfinished task gets a RuntimeError (it would wait for itself).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import platform
import select
import selectors
import signal
import socket
import ssl
import sys
import threading
import time
import warnings
from collections import deque
from concurrent.futures import Future
from concurrent.futures._base import CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED, PENDING, RUNNING
from typing import Any

import cloudpickle

from . import protocol as P
from . import serialization as S
from . import shm
from .address import DEFAULT_PORT, parse_address
from .auth import COMMAND_KEY_ADVICE, PROGRAM_KEY_ADVICE, tls_failure
from .errors import (
    ClusterError,
    ClusterUnavailable,
    ClusterWarning,
    IncompatibleWorkers,
    InitializerError,
    RemoteError,
    SerializationError,
    TaskKilled,
    TaskTimeout,
    WorkerLostError,
    WorkersTerminated,
)
from .progress import output_above_bars
from .scheduler import DEFAULT_RETRIES
from .version import __version__

log = logging.getLogger("clusterexec.client")

UNSENT, SENT, CANCELLED_HERE, DONE, LEASED = range(5)  # LEASED: sent to a borrowed task process (see _Lease)
_MAX_IOV = 512
_TLS_RECV_BUDGET = 4 << 20
_TLS_JOIN = 1 << 16  # small pieces are joined up to this size before encryption
_JOIN_BELOW = 1 << 10  # pieces of a frame smaller than this are copied together before sending
_LEND_MESSAGE_MAX = 1 << 16  # as supervisor.LEND_MESSAGE_MAX
LEASE_LOOK = 0.05  # seconds a leased task runs before the IO thread reads its socket if no caller does
LEASE_IDLE = 1.0  # seconds a borrowed process stays idle before it goes back to the agent
_AWAIT_POLL = 0.25  # seconds a caller waits on a borrowed process's socket before it looks again
ACK_EVERY = 0.5  # seconds after a result before we tell the master we have it ("got"; see _tell_got)
ACK_RESULTS = 1024  # or after this many results
# Task ids on a borrowed process: apart from the master's, which the same process has seen and whose
# shared-memory results may still be on their way (see shm.remove_unsent).
_LEASE_IDS = 1 << 62


class PartialChunk:
    """Outcome of a map chunk whose item raised: the values before it, then the exception."""

    __slots__ = ("values", "error")

    def __init__(self, values: list[Any], error: BaseException):
        self.values = values
        self.error = error


class _Condition(threading.Condition):
    """A Future's Condition without the bound methods of its lock that threading.Condition stores in each
    instance (five, six from Python 3.14 with locked()): a Future is made per task, and while thousands are
    pending the garbage collector traverses every one of those objects again and again."""

    hook = None  # the Future of a task on a borrowed process: called when anyone but result() looks at it

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._waiters = deque()

    def __enter__(self) -> bool:
        if self.hook is not None:
            self.hook()
        return self._lock.__enter__()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:  # RLock.acquire's signature
        if self.hook is not None:  # (wait() and as_completed() acquire, the Future's own methods enter)
            self.hook()
        return self._lock.acquire(blocking, timeout)

    def release(self) -> None:
        self._lock.release()

    def _release_save(self) -> Any:
        return self._lock._release_save()

    def _acquire_restore(self, state: Any) -> None:
        self._lock._acquire_restore(state)

    def _is_owned(self) -> bool:
        return self._lock._is_owned()

    if hasattr(threading.RLock(), "locked"):  # Python 3.14: a Condition's locked() is its lock's

        def locked(self) -> bool:
            return self._lock.locked()


class ClusterFuture(Future):
    """A Future whose `cancel()` asks the cluster, so it succeeds only if the task has not started."""

    def __init__(self) -> None:
        # Future.__init__ with a lighter Condition (see _Condition); tests/test_client_fastpaths.py checks
        # that these are still all the attributes Future.__init__ sets.
        self._condition = _Condition()
        self._state = PENDING
        self._result = None
        self._exception = None
        self._waiters: list[Any] = []
        self._done_callbacks: list[Any] = []
        self._cx_record: _Record | None = None

    def cancel(self) -> bool:
        with self._condition:
            if self._state in (RUNNING, FINISHED):
                return False
            if self._state in (CANCELLED, CANCELLED_AND_NOTIFIED):
                return True
        record = self._cx_record
        if record is not None and not record.conn.cancel([record])[0]:
            return False
        if not super().cancel():
            return False
        self._notify_cancelled()
        return True

    def result(self, timeout: float | None = None) -> Any:
        record = self._cx_record
        if record is not None:
            timeout = record.conn._before_waiting(record, timeout)
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        record = self._cx_record
        if record is not None:
            timeout = record.conn._before_waiting(record, timeout)
        return super().exception(timeout)

    def _notify_cancelled(self) -> None:
        """Count a cancelled Future as done in `wait()` and `as_completed()` now: no executor thread will
        ever dequeue it to do so (ProcessPoolExecutor's does), so without this they would wait forever."""
        with self._condition:
            if self._state == CANCELLED:
                self.set_running_or_notify_cancel()
            self._cx_record = None  # (see _settle)


class _Record:
    __slots__ = ("id", "future", "task", "state", "chunk", "conn", "kill_requested")

    def __init__(self, conn: ClientConnection, task_id: int, future: ClusterFuture, task: P.Task, chunk: bool):
        self.conn = conn
        self.id = task_id
        self.future = future
        self.task = task
        self.state = UNSENT
        self.chunk = chunk
        self.kill_requested: bool | str = False  # or why: "kill" or "terminate" (see kill())


class _Lease:
    """A task process of the local agent that this client borrows, and the one task it runs there (if any)."""

    __slots__ = ("sock", "pid", "host", "sent", "frames", "record", "sent_at", "idle_since", "sending", "wanted",
                 "reader", "dead", "died", "dropped")

    def __init__(self, sock: socket.socket, pid: int, host: str, sent: P.BlobLRU):
        self.sock = sock
        self.pid = pid
        self.host = host
        self.sent = sent  # the mirror of its blob cache, which goes back with the process
        self.frames = P.FrameReader()
        self.record: _Record | None = None
        self.sent_at = 0.0
        self.idle_since = time.monotonic()
        self.sending = False  # a caller thread writes its task to the socket: do not close it under that thread
        self.wanted = False  # the IO thread waits for that write to end (to give the process back)
        # Who reads the socket: None (nobody: the process is idle, or the caller has yet to ask for its result),
        # the ident of a thread in result() or exception() (see _await_lease), or "io" (the IO thread's selector).
        self.reader: int | str | None = None
        self.dead = False  # its socket reached end-of-file: the agent's report of how it died is on its way
        self.died: dict[str, Any] | None = None  # that report, while a caller still reads (see _lease_died)
        self.dropped = False  # given back, or dead: close the socket once no caller uses it


def _leasable(task: P.Task, max_frame: int) -> bool:
    """May this task run on a borrowed process? Not with a time limit or max_tasks_per_child, which the agent
    keeps, nor when its data is too large for one frame (the master's path fails it with the right error)."""
    opts = task.opts
    return not (opts and ("timeout" in opts or "mtpc" in opts)) and P.task_size(task) <= max_frame


def _send_to_lease(lease: _Lease, pieces: list[Any]) -> None:
    """Write a frame's pieces to a borrowed process's (non-blocking) socket, waiting while it is full; give up
    once the process is known dead (a process it forked may keep the socket open, and never read)."""
    sock = lease.sock
    views = [v for v in (memoryview(p).cast("B") for p in pieces) if v.nbytes]
    poller = None
    while views:
        try:
            # (MSG_NOSIGNAL: a program that set SIGPIPE back to its default must not die of a dead process.)
            sent = sock.sendmsg(views[:_MAX_IOV], (), socket.MSG_NOSIGNAL)
        except (BlockingIOError, InterruptedError):
            if poller is None:
                poller = select.poll()
                poller.register(sock, select.POLLOUT)
            if not poller.poll(_AWAIT_POLL * 1000) and (lease.dead or lease.dropped):
                raise BrokenPipeError("the borrowed task process is gone") from None
            continue
        P.sent_off(views, sent)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        part = sock.recv(n - len(buf))
        if not part:
            raise ConnectionError("the master closed the connection during the handshake "
                                  "(is this a clusterexec master, and does it accept our key?)")
        buf += part
    return bytes(buf)


class ClientConnection:
    """One authenticated connection to a master, its IO thread, and the Futures in flight on it."""

    def __init__(self, address: tuple[str, int], key: bytes, *, name: str = "", connect_timeout: float = 30.0,
                 reconnect_window: float = 0.0, ssl_context: Any = None, compat_wait: float = 60.0,
                 lender: socket.socket | None = None, key_advice: str = PROGRAM_KEY_ADVICE):
        self.address = address
        self.key_advice = key_advice  # what to do when the master rejects our key
        self.ssl_context = ssl_context
        self.compat_wait = compat_wait
        self.key = key
        self.name = name
        self.connect_timeout = connect_timeout
        self.reconnect_window = reconnect_window
        # Our session with the master, to resume if the connection is lost (see _reconnect): its token, the
        # results received in it, and how many of those we told the master about ("got").
        self._session: str | None = None
        self._got = 0
        self._got_told = 0
        self._got_since = 0.0  # when the first result we have not told of came
        self._adopt(*self._open(connect_timeout))
        self._lock = threading.Lock()
        self._outbox: list[_Record] = []
        self._cancel_out: list[tuple[int, list[int]]] = []
        self._kill_out: list[int] = []
        self._cancel_waiters: dict[int, tuple[threading.Event, list[set[int]], list[int]]] = {}  # req → (.., ids)
        self._cancel_ids = itertools.count(1)
        self._status_waiters: deque[tuple[threading.Event, list[dict[str, Any]]]] = deque()
        self._status_out = 0
        self._pending: dict[int, _Record] = {}
        self._output = TaskOutput()
        self._ids = itertools.count(1)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._woken = False
        self._stopping = False
        self._close_when_idle = False
        self._on_idle_close: list[Any] = []
        self.broken: BaseException | None = None
        self.shm_prefix: str | None = None  # local mode: the segments results may come in (see shm.py)
        self.master_shutdown: str | None = None  # the reason the master gave when it said it was stopping
        self._warned: dict[Any, Any] = {}  # the warnings registry of the master's notices
        # Local mode: the channel to the agent that lends us task processes, and the one we hold (see _Lease).
        self._lender = lender
        if lender is not None:
            lender.setblocking(False)
        self._lease: _Lease | None = None
        self._lease_asked = False
        # When a Future's hook, a caller's timeout or shutdown last asked the IO thread to read the lease (for the
        # task then on it: a request older than the lease's task is stale).
        self._lease_io_wanted = 0.0
        self._sel: selectors.BaseSelector | None = None
        self._idle = threading.Condition(self._lock)
        self._thread = threading.Thread(target=self._run, name="clusterexec-client", daemon=True)
        self._thread.start()

    def _open(self, timeout: float) -> tuple[socket.socket, P.FrameReader, dict[str, Any]]:
        """Connect, authenticate both ways and say hello; returns the socket, its reader and the welcome."""
        host, port = self.address
        try:
            sock = socket.create_connection(self.address, timeout=timeout)
        except OSError as e:
            # Tried once, as README says: a program pointed at a wrong address learns it at once.
            refused = " (nothing listens there; a program does not wait for a master to start)" \
                if isinstance(e, ConnectionRefusedError) else ""
            raise ClusterUnavailable(
                f"cannot connect to the clusterexec master at {host}:{port}: {e.strerror or e}{refused}. "
                "Is `python -m clusterexec.master` running there, and is the port right?") from None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.ssl_context is not None:  # TLS first; the key handshake below then runs inside it
                sock = self.ssl_context.wrap_socket(sock, server_hostname=host, do_handshake_on_connect=False)
                sock.do_handshake()
            my_challenge = P.new_challenge()
            key = self.key
            sock.sendall(P.client_proof(key, _recv_exact(sock, P.SERVER_HELLO.size), my_challenge))
            P.client_check(key, my_challenge, _recv_exact(sock, P.SERVER_VERDICT_SIZE), self.key_advice)
            hello = {"t": "hello", "role": "client", "name": self.name, "host": socket.gethostname(),
                     "pid": os.getpid(), "python": platform.python_version(), "cloudpickle": cloudpickle.__version__,
                     "version": __version__, "compat_wait": self.compat_wait}
            if self.reconnect_window > 0:
                hello["acks"] = 1  # we say which results we have, so we may resume our session (see _reconnect)
                if self._session is not None:
                    hello["resume"] = {"session": self._session, "got": self._got}
            sock.sendall(P.encode_bytes(hello))
            reader = P.FrameReader()
            welcome = None
            while welcome is None:
                data = sock.recv(1 << 16)
                if not data:
                    raise ConnectionError("the master closed the connection after authentication")
                msgs = reader.feed(data)
                if msgs:
                    welcome = msgs[0].header
                    early = msgs[1:]  # what the master said right after (a notice, say): handled by _serve
            if welcome.get("t") != "welcome":
                raise P.ProtocolError(f"expected a welcome from the master, got {welcome.get('t')!r}")
            welcome["_early"] = early
        except TimeoutError:
            sock.close()
            raise ClusterUnavailable(f"the master at {host}:{port} did not answer within {timeout} s") from None
        except (P.AuthenticationError, P.VersionMismatch, P.ProtocolError):
            sock.close()
            raise
        except ssl.SSLError as e:  # (the master may refuse our certificate after our side of TLS is done)
            sock.close()
            message, final = tls_failure(e, f"the master at {host}:{port}")
            if final:
                raise P.AuthenticationError(message) from None
            raise ClusterUnavailable(message) from None
        except OSError as e:  # it hung up or reset the connection during the handshake
            sock.close()
            raise ClusterUnavailable(f"the master at {host}:{port} dropped the connection: {e}") from None
        except BaseException:
            sock.close()
            raise
        sock.settimeout(None)
        sock.setblocking(False)
        return sock, reader, welcome

    def _adopt(self, sock: socket.socket, reader: P.FrameReader, welcome: dict[str, Any]) -> None:
        """Make a fresh connection the current one (first connect, or reconnect to a restarted master)."""
        self._sock = sock
        self._reader = reader
        self.client_id = welcome["id"]
        self._early: list[P.Message] = welcome.pop("_early", [])
        self.procs = int(welcome.get("procs") or 0)
        beat = welcome.get("heartbeat")
        self._heartbeat = (float(beat[0]), float(beat[1])) if beat else None
        self.max_frame = int(welcome.get("max_frame") or P.DEFAULT_MAX_FRAME)
        session = welcome.get("session")
        self.resumed = bool(welcome.get("resumed")) and session == self._session
        if session != self._session:  # a new session: nothing received in it yet
            self._session = session
            self._got = self._got_told = 0
        reader.max_frame = max(reader.max_frame, self.max_frame)
        self._last_heard = time.monotonic()
        self._sent_blobs = P.BlobLRU()  # the other side's cache is new too
        self._tls_retry = False  # OpenSSL wants the head of _wbuf again, unchanged
        self._tls_read_wants_write = False  # a TLS read must first send (a key update): wait until writable
        self._wbuf: deque[memoryview] = deque()

    # ------------------------------------------------------------------------------------------ callers

    def submit(self, deps: list[P.Blob], bufs: list[Any], opts: dict[str, Any] | None, chunk: bool = False,
               future: ClusterFuture | None = None) -> ClusterFuture:
        future = future or ClusterFuture()
        task = P.Task(0, deps, bufs, opts)
        with self._lock:
            if self.broken is not None:
                raise ClusterUnavailable(f"the connection to the master is gone: {self.broken}")
            record = _Record(self, next(self._ids), future, task, chunk)
            future._cx_record = record
            lease = self._lease
            load = self._master_load()
            if lease is not None and lease.record is None and not lease.sending and not lease.dead \
                    and lease.died is None and load < self._nprocs and _leasable(task, self.max_frame):
                record.state = LEASED
                lease.record = record
                lease.sent_at = time.monotonic()
                lease.sending = True
                self._pending[record.id] = record
                future.set_running_or_notify_cancel()  # (never cancelled: cancel() refuses LEASED records)
                future._condition.hook = self._lease_touched
            else:
                lease = None
                self._ask_lease_locked()  # (with nothing in flight, before this task joins the master's)
                self._outbox.append(record)
                self._wake_locked()
        if lease is not None:
            self._run_leased(lease, record)
        return future

    def _run_leased(self, lease: _Lease, record: _Record) -> None:
        """Send a task to the borrowed process, from the caller's thread (no wake-up of the IO thread)."""
        done = False
        try:
            entries, buffers = P.encode_tasks(((_LEASE_IDS + record.id, record.task),), lease.sent)
            _send_to_lease(lease, P.encode({"t": "run", "tasks": entries}, buffers))
            done = True
        except OSError:
            done = True  # it died: its socket's end-of-file and the agent's report reach a reader
        finally:
            with self._lock:
                lease.sending = False
                if not done:  # (interrupted): the process may hold half a frame; its death retries the task
                    self._lease_broken(lease)
                self._close_if_unused(lease)
                if lease.wanted and not lease.dropped:
                    lease.wanted = False
                    self._wake_locked()

    def _lease_broken(self, lease: _Lease) -> None:
        """The borrowed process is of no use any more (a frame half sent or half read): have the agent kill
        it. Its report of the death then settles the task, as for any death (see _lease_died)."""
        lease.dead = True
        if lease.reader == "io":
            if threading.current_thread() is self._thread:
                self._unwatch_lease(lease)
            else:
                self._wake_locked()  # (the IO thread lets go of it, see _tend_lease)
        self._tell_lender({"t": "kill", "pid": lease.pid})  # (whatever it runs: it is of no use)

    def submit_many(self, deps: list[P.Blob], tasks: list[tuple[list[Any], dict[str, Any] | None]],
                    chunk: bool = False) -> list[ClusterFuture]:
        """Queue tasks that share their blobs, as `submit` does one by one, with one acquisition of the lock
        (which the IO thread needs too) and at most one wake-up of the IO thread."""
        futures = [ClusterFuture() for _ in tasks]
        records = [_Record(self, 0, future, P.Task(0, deps, bufs, opts), chunk)
                   for future, (bufs, opts) in zip(futures, tasks, strict=True)]
        for record in records:
            record.future._cx_record = record
        with self._lock:
            if self.broken is not None:
                raise ClusterUnavailable(f"the connection to the master is gone: {self.broken}")
            ids = self._ids
            for record in records:
                record.id = next(ids)
            self._outbox.extend(records)
            self._wake_locked()
        return futures

    def _wake_locked(self) -> None:
        # Once broken, the IO thread has exited and closed the wake pipe (its fd numbers may be reused).
        if not self._woken and self.broken is None:
            self._woken = True
            try:
                os.write(self._wake_w, b"\0")
            except BlockingIOError:
                pass

    def cancel(self, records: list[_Record], timeout: float = 30.0) -> list[bool]:
        """Cancel tasks that have not started. Returns one bool per record."""
        answer: dict[int, bool] = {}
        remote: list[_Record] = []
        with self._lock:
            for r in records:
                if r.future._state != PENDING:
                    # Running (its "started" came, or it ran on a borrowed process and goes round again).
                    answer[r.id] = False
                elif r.state == UNSENT:
                    r.state = CANCELLED_HERE
                    r.task = None  # (the IO thread drops the record itself when it next takes the outbox)
                    answer[r.id] = True
                elif r.state == SENT and self.broken is None:
                    remote.append(r)
                else:  # (LEASED: it runs already)
                    answer[r.id] = r.state == CANCELLED_HERE
            if remote and threading.current_thread() is self._thread:
                # A done-callback cancelling another Future: we cannot wait for the master here.
                for r in remote:
                    answer[r.id] = False
                remote = []
            if remote:
                req = next(self._cancel_ids)
                event = threading.Event()
                box: list[set[int]] = []
                ids = [r.id for r in remote]
                self._cancel_waiters[req] = (event, box, ids)
                self._cancel_out.append((req, ids))
                self._wake_locked()
        if remote:
            if event.wait(timeout) and box:
                cancelled = box[0]
            else:
                cancelled = set()
            for r in remote:
                answer[r.id] = r.id in cancelled
        return [answer[r.id] for r in records]

    def status(self, timeout: float = 10.0) -> dict[str, Any]:
        """The master's view of the cluster: worker nodes, clients, queue depth."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("cluster_info() cannot be called from a done-callback")
        event = threading.Event()
        box: list[dict[str, Any]] = []
        with self._lock:
            if self.broken is not None:
                raise ClusterUnavailable(f"the connection to the master is gone: {self.broken}")
            self._status_waiters.append((event, box))
            self._status_out += 1
            self._wake_locked()
        if not event.wait(timeout) or not box:
            raise ClusterUnavailable(f"the master did not answer a status request within {timeout} s")
        return box[0]

    def kill(self, record: _Record, why: str = "kill") -> bool:
        """Stop a task whether or not it started; its Future fails with TaskKilled (with WorkersTerminated,
        also a BrokenProcessPool, when `why` is "terminate": ProcessPoolExecutor.terminate_workers())."""
        with self._lock:
            if record.state == UNSENT:
                record.state = CANCELLED_HERE
                record.task = None
                unsent = True
            elif record.state == SENT and self.broken is None:
                record.kill_requested = why
                self._kill_out.append(record.id)
                self._wake_locked()
                return True
            elif record.state == LEASED and self.broken is None:
                record.kill_requested = why
                lease = self._lease
                if lease is not None and lease.record is record:
                    self._tell_lender({"t": "kill", "pid": lease.pid, "task": _LEASE_IDS + record.id})
                return True
            else:
                return False
        if unsent:
            _set_exception(record.future, error_from_info("error", {"kind": "killed", "why": why}))
        return True

    def pending_futures(self) -> list[ClusterFuture]:
        with self._lock:
            return [r.future for r in self._outbox if r.state == UNSENT] + \
                   [r.future for r in self._pending.values()]

    def wait_idle(self) -> None:
        """Block until every submitted task has resolved (or the connection broke)."""
        with self._idle:
            lease = self._lease
            if lease is not None and lease.record is not None and lease.reader is None:
                self._lease_io_wanted = time.monotonic()  # nobody else may ever read its result
                self._wake_locked()
            while (self._outbox or self._pending) and self.broken is None:
                self._idle.wait(0.5)

    def close(self, wait_idle: bool = False) -> None:
        """Close now, or (wait_idle) once nothing is pending; pending Futures fail if closed under them."""
        with self._lock:
            if self.broken is not None:
                return  # already closed: the IO thread is gone and the wake pipe's fds are closed (maybe reused)
            if wait_idle:
                self._close_when_idle = True
            else:
                self._stopping = True
            self._wake_locked()
        if not wait_idle and threading.current_thread() is not self._thread:
            self._thread.join(5)

    def on_close(self, callback: Any) -> None:
        self._on_idle_close.append(callback)

    # ------------------------------------------------------------------------------------------ lease (local mode)

    def _tell_lender(self, msg: dict[str, Any]) -> bool:
        lender = self._lender
        if lender is None:
            return False
        try:
            lender.send(json.dumps(msg).encode())
        except OSError:
            return False  # the local cluster is stopping: the master's connection says so too
        return True

    def _from_lender(self) -> None:
        """The agent's answers: a process lent (its socket attached), none free, or how a lent process died."""
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(self._lender, _LEND_MESSAGE_MAX, 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data, fds = b"", []
            if not data:  # the local cluster stopped; the master's connection tells the Futures
                self._sel.unregister(self._lender)
                with self._lock:
                    self._lender.close()
                    self._lender = None
                return
            try:
                msg = json.loads(data)
                kind = P.check_message("lender", msg)
            except (ValueError, RecursionError, P.ProtocolError) as e:  # (our own agent: a bug, not an attack)
                log.warning("ignored a malformed message from the local agent: %s", e)
                kind = None
            if kind == "lent" and fds:
                fd = fds.pop()
                os.set_inheritable(fd, False)  # (a subprocess the user starts must not hold it)
                self._borrowed(socket.socket(fileno=fd), msg)
            elif kind in ("lent", "no"):
                self._lease_asked = False
            elif kind == "died":
                self._lease_died(msg)
            for fd in fds:
                os.close(fd)

    def _borrowed(self, sock: socket.socket, msg: dict[str, Any]) -> None:
        sock.setblocking(False)
        try:
            sent = P.BlobLRU.restored(msg["sent"])
        except (ValueError, TypeError) as e:  # (a bug): not worth the executor; the agent takes it back
            log.error("the agent lent a task process with a malformed cache list: %s", e)
            sock.close()
            self._lease_asked = False
            self._tell_lender({"t": "return", "pid": msg["pid"], "sent": msg["sent"]})
            return
        lease = _Lease(sock, int(msg["pid"]), str(msg.get("host")), sent)
        with self._lock:
            self._lease_asked = False
            self._lease = lease
            self._give_back_locked()

    @property
    def _nprocs(self) -> int:
        return self.procs or 1

    def _master_load(self) -> int:
        """Tasks in flight through the master (call with the lock held)."""
        lease = self._lease
        return len(self._pending) + len(self._outbox) - (lease is not None and lease.record is not None)

    def _ask_lease_locked(self) -> None:
        """Borrow a process if we have none and nothing is in flight. (Not as soon as one process is idle: with
        a steady few tasks in flight, say map with a small buffersize, it would go back and forth.)"""
        if self._lender is not None and self._lease is None and not self._lease_asked \
                and self._master_load() == 0:
            self._lease_asked = self._tell_lender({"t": "lend"})

    def _give_back_locked(self, idle: bool = False) -> None:
        """Give the borrowed process back if it is idle and the master's tasks would use it (or, `idle`, if it
        has been idle for LEASE_IDLE)."""
        lease = self._lease
        if lease is None or lease.record is not None or lease.dead or lease.died is not None or (
                not idle and self._master_load() < self._nprocs):
            return
        if lease.sending:
            lease.wanted = True  # (the caller wakes us when done)
            return
        self._lease = None
        self._tell_lender({"t": "return", "pid": lease.pid, "sent": lease.sent.export()})
        self._close_lease(lease)

    def _close_lease(self, lease: _Lease) -> None:
        """Stop reading a lease's socket, and close it unless a caller still uses it (then that caller does)."""
        self._unwatch_lease(lease)
        lease.dropped = True
        self._close_if_unused(lease)

    @staticmethod
    def _close_if_unused(lease: _Lease) -> None:
        """Close a dropped lease's socket once no thread sends on it or reads it (call with the lock held; every
        thread that lets go of it calls this). Closing twice does nothing."""
        if lease.dropped and not lease.sending and lease.reader is None:
            lease.sock.close()

    def _unwatch_lease(self, lease: _Lease) -> None:
        """In the IO thread: stop reading the lease's socket there, if it did."""
        if lease.reader == "io":
            lease.reader = None
            if self._sel is not None:
                self._sel.unregister(lease.sock)

    def _tend_lease(self) -> None:
        """In the IO thread, whenever it wakes: read the borrowed process's socket while a task runs there that no
        caller waits for in result() (so that its output flows and its Future resolves), stop when it is idle,
        and give it back when it has been idle for LEASE_IDLE."""
        with self._lock:
            lease = self._lease
            if lease is None:
                return
            wanted = self._lease_io_wanted >= lease.sent_at
            # Its death reported, and nobody reading on (a caller interrupted while it did): see to it here.
            died = lease.died if lease.reader is None else None
            if lease.reader == "io":
                if lease.record is None or lease.dead:
                    self._unwatch_lease(lease)
            elif lease.reader is None and not lease.dead and died is None:
                if lease.record is not None:
                    if wanted or self._close_when_idle or time.monotonic() - lease.sent_at >= LEASE_LOOK:
                        lease.reader = "io"
                        self._sel.register(lease.sock, selectors.EVENT_READ, "lease")
                elif time.monotonic() - lease.idle_since >= LEASE_IDLE:
                    self._give_back_locked(idle=True)
        if died is not None:
            self._lease_died(died)

    def _lease_touched(self) -> None:
        """The hook of a leased task's Future: someone waits for it other than in result() (wait(), a callback,
        done()): the IO thread reads its result."""
        if threading.current_thread() is self._thread:
            return
        with self._lock:
            lease = self._lease
            if lease is not None and lease.record is not None and lease.reader is None:
                self._lease_io_wanted = time.monotonic()
                self._wake_locked()

    def _before_waiting(self, record: _Record, timeout: float | None) -> float | None:
        """result() or exception() of a task not known done: read it here if it is on the borrowed process.
        Returns what is left of `timeout`."""
        if threading.current_thread() is self._thread and record.state not in (DONE, CANCELLED_HERE):
            # (A done-callback run by the IO thread would wait for the thread that delivers the result.)
            raise RuntimeError("a done-callback cannot wait for the result of a task that has not finished: it "
                               "runs on the thread that delivers results (wait in another thread, or chain "
                               "another callback)")
        if record.state == LEASED:
            return self._await_lease(record, timeout)
        return timeout

    def _await_lease(self, record: _Record, timeout: float | None) -> float | None:
        """result() or exception() of a task on the borrowed process: read its result in this thread, sparing the
        wake-up of the IO thread and the hand-over between threads. Returns what is left of `timeout`."""
        me = threading.get_ident()
        with self._lock:
            lease = self._lease
            if lease is None or lease.record is not record or lease.dead or lease.died is not None \
                    or lease.reader is not None:
                return timeout
            lease.reader = me
        deadline = None if timeout is None else time.monotonic() + timeout
        reading = False
        try:
            poller = select.poll()
            poller.register(lease.sock, select.POLLIN)
            # (Polls are bounded: the task may end otherwise than by a word on this socket, say when the agent
            # reports its process dead while a process it forked keeps the socket open.)
            while record.state == LEASED and lease.reader == me and not lease.dead and lease.died is None:
                left = _AWAIT_POLL if deadline is None else min(_AWAIT_POLL, deadline - time.monotonic())
                if poller.poll(max(left, 0.0) * 1000):  # (a timeout of 0 still takes what has arrived)
                    reading = True
                    self._read_lease(lease)
                    reading = False
                if left <= 0:
                    break
        except BaseException:
            if reading:
                self._lease_interrupted(lease, record)
            raise
        finally:
            with self._lock:
                if lease.reader == me:
                    lease.reader = None
                    self._close_if_unused(lease)
                    if not lease.dropped and lease.died is None and record.state == LEASED:
                        # (A timeout, an interrupt, or its end.) The IO thread reads on.
                        self._lease_io_wanted = time.monotonic()
                        self._wake_locked()
                died = lease.died if lease.reader is None and lease is self._lease else None
            if died is not None:
                self._lease_died(died)
        return None if deadline is None else max(0.0, deadline - time.monotonic())

    def _lease_interrupted(self, lease: _Lease, record: _Record) -> None:
        """A caller was interrupted (Ctrl-C) while it read the borrowed process's socket: bytes may be lost, the
        result among them. The process goes (a task that had not ended runs again through the master); a
        result taken but not delivered fails its Future rather than leave it waiting forever."""
        with self._lock:
            # (The Future's state is read without its lock: wait() may hold that lock while its hook waits
            # for ours.)
            lost = record.state == DONE and record.future._state in (PENDING, RUNNING)
            if record.state == LEASED and not lease.dead:
                self._lease_broken(lease)  # bytes of its result may be gone with the interrupt
            if lost:
                self._pending.pop(record.id, None)
                if lease.record is record:
                    lease.record = None
        if lost:
            _set_exception(record.future, ClusterError(
                "the task's result was lost: the thread reading it was interrupted"))

    def _read_lease(self, lease: _Lease) -> bool:
        """Read what the borrowed process sent (in whichever thread is its reader) and handle it. False when
        nothing was there, or at its end."""
        try:
            n = lease.sock.recv_into(lease.frames.get_buffer())
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            n = 0
        try:
            messages = lease.frames.filled(n) if n else None
        except P.ProtocolError as e:  # (a bug: the process is ours, and runs our code between tasks)
            log.error("malformed frame from task process %d: %s", lease.pid, e)
            messages = None
        if messages is None:  # it died (or is about to be killed): the agent says how, see _lease_died
            with self._lock:
                if n:  # it is alive but of no use: have it killed
                    self._lease_broken(lease)
                else:
                    lease.dead = True
                    self._unwatch_lease(lease)
            return False
        for msg in messages:
            if msg.type == "results":
                self._lease_results(lease, msg)
                continue
            record = lease.record
            h = msg.header
            if msg.type == "output" and record is not None and h.get("id") == _LEASE_IDS + record.id:
                items = []
                dropped = int(h.get("dropped", 0))
                for stream in h["s"]:
                    items.append([record.id, lease.host, lease.pid, stream, dropped])
                    dropped = 0
                buffers = list(msg.buffers)
                if dropped:
                    items.append([record.id, lease.host, lease.pid, 2, dropped])
                    buffers.append(b"")
                self._output.write(items, buffers)
        return True

    def _lease_results(self, lease: _Lease, msg: P.Message) -> None:
        items = msg.header["items"]
        for item, bufs in zip(items, P.split_buffers(items, msg.buffers), strict=True):
            with self._lock:
                record = lease.record
                if record is not None and item[0] == _LEASE_IDS + record.id and record.state == LEASED:
                    record.state = DONE  # (first: see _lease_interrupted)
                    lease.record = None
                    lease.idle_since = time.monotonic()
                    self._pending.pop(record.id, None)
                    record.task = None
                    record.future._condition.hook = None
                    if lease.reader == threading.get_ident() and lease.died is None:
                        # A caller reading for its result stops here: the done-callbacks about to run in this
                        # thread may submit and wait for another task on this process.
                        lease.reader = None
                    self._give_back_locked()
                    self._notify_if_idle_locked()
                else:
                    record = None
            if record is None:
                self._drop_segments(bufs, item[3])
                continue
            if self._output.partial:
                self._output.task_done(record.id)
            try:
                self._resolve(record, item[1], bufs, item[3])
            except Exception as e:
                self._drop_segments(bufs, item[3])
                _set_exception(record.future, P.ProtocolError(
                    f"malformed result from task process {lease.pid}: {type(e).__name__}: {e}"))

    def _lease_died(self, msg: dict[str, Any]) -> None:
        """A lent process died: report or retry the task it had, as the master would. What it sent before it
        died comes first: its last output, even its result (a kill that came just after the task ended)."""
        me = threading.get_ident()
        with self._lock:
            lease = self._lease
            if lease is None or lease.pid != msg.get("pid"):
                return
            if isinstance(lease.reader, int) and lease.reader != me:
                lease.died = msg  # a caller reads for its result: it reads what is left, then comes here
                return
            self._unwatch_lease(lease)
            lease.reader = me
            lease.died = msg  # (no new task for it)
        try:
            while self._read_lease(lease):
                pass
        finally:
            with self._lock:
                if lease.reader == me:
                    lease.reader = None
                    self._close_if_unused(lease)  # (dropped meanwhile, by _shut say, and left to this reader)
        with self._lock:
            if lease is not self._lease:
                return
            self._lease = None
            self._close_lease(lease)
            record, lease.record = lease.record, None
            if record is None or record.state != LEASED:
                return
            record.future._condition.hook = None
            info = msg.get("info") or {}
            wire_id = _LEASE_IDS + record.id
            started = msg.get("task") == wire_id
            if self.shm_prefix:  # results it wrote to shared memory and never sent
                shm.remove_unsent(self.shm_prefix, lease.pid, {wire_id})
            self._pending.pop(record.id, None)
            error = None
            opts = record.task.opts or {}
            if record.kill_requested:
                error = error_from_info("error", dict(info, kind="killed", started=started,
                                                      why=record.kill_requested))
            elif started and opts.get("retries", DEFAULT_RETRIES) < 1:
                error = error_from_info("lost", info)
            if error is not None:
                record.state = DONE
                record.task = None
                self._notify_if_idle_locked()
            else:  # again, through the master (counting this attempt if it started)
                if started:
                    record.task.opts = {**opts, "tried": 1}
                record.state = UNSENT
                self._outbox.append(record)
                self._wake_locked()
        if self._output.partial:
            self._output.task_done(record.id)
        if error is not None:
            _set_exception(record.future, error)

    # ------------------------------------------------------------------------------------------ IO thread

    def _run(self) -> None:
        error: BaseException | None = None
        while True:
            try:
                self._serve()
                break
            except (OSError, P.ProtocolError) as e:
                fatal = isinstance(e, P.AuthenticationError | P.VersionMismatch)
                if fatal or self._stopping or self.reconnect_window <= 0:
                    error = e
                    if self.master_shutdown and not fatal:
                        error = ConnectionError(f"the master shut down ({self.master_shutdown})")
                    break
                try:
                    back = self._reconnect(e)
                except (P.AuthenticationError, P.VersionMismatch) as e2:
                    error = e2
                    break
                if not back:
                    why = f"the master shut down ({self.master_shutdown})" if self.master_shutdown else str(e)
                    error = ConnectionError(f"{why}; it did not come back within {self.reconnect_window:g} s")
                    break
            except BaseException as e:  # a bug here must not leave Futures hanging
                log.exception("clusterexec client thread failed")
                error = e
                break
        self._shut(error)

    def _serve(self) -> None:
        """Move bytes until asked to stop (returns) or the connection fails (raises)."""
        sel = selectors.DefaultSelector()
        sock = self._sock
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        sel.register(sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if self._wbuf else 0), "sock")
        if self._lender is not None:
            sel.register(self._lender, selectors.EVENT_READ, "lender")
        self._sel = sel
        writing = bool(self._wbuf)
        beat = self._heartbeat
        if self._early:
            early, self._early = self._early, []
            self._handle(early)
        try:
            while True:
                # Bytes TLS has already decrypted wait inside the SSL object, where no selector sees them.
                tls_pending = self.ssl_context is not None and sock.pending() > 0
                wait = beat[0] if beat else None
                if self._lease is not None:  # (see _tend_lease)
                    wait = LEASE_LOOK if wait is None else min(wait, LEASE_LOOK)
                if self._got != self._got_told:  # (see _tell_got)
                    due = max(0.0, self._got_since + ACK_EVERY - time.monotonic())
                    wait = due if wait is None else min(wait, due)
                events = sel.select(0 if tls_pending else wait)
                readable = tls_pending
                for key, mask in events:
                    if key.data == "wake":
                        try:
                            os.read(self._wake_r, 4096)
                        except BlockingIOError:
                            pass
                        self._take_outbox()
                    elif key.data == "lease":
                        lease = self._lease
                        if lease is not None and lease.reader == "io":
                            self._read_lease(lease)
                    elif key.data == "lender":
                        self._from_lender()
                    elif mask & selectors.EVENT_READ or self._tls_read_wants_write:
                        readable = True
                if readable:
                    self._receive()
                if self._lease is not None:
                    self._tend_lease()
                if beat and time.monotonic() - self._last_heard > beat[1] and not any(
                        key.data == "sock" and m & selectors.EVENT_READ for key, m in sel.select(0)):
                    # (Bytes waiting unread mean the master did speak while this thread was busy, say in a
                    # slow done-callback or unpickling a big result: that is not silence.)
                    raise ConnectionError(f"no word from the master for {beat[1]:g} s")
                with self._lock:
                    if self._got != self._got_told:
                        self._tell_got()
                    if self._wbuf:
                        self._write()
                    want_write = bool(self._wbuf) or self._tls_read_wants_write
                if want_write != writing:
                    writing = want_write
                    sel.modify(sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if writing else 0), "sock")
                with self._lock:
                    if self._stopping:
                        return
                    if self._close_when_idle and not self._outbox and not self._pending and not self._wbuf:
                        return
        finally:
            self._sel = None
            sel.close()
            lease = self._lease
            if lease is not None and lease.reader == "io":
                lease.reader = None

    def _tell_got(self) -> None:
        """Tell the master how many results of our session we have, so that it can let go of them, every
        ACK_EVERY seconds or ACK_RESULTS results while they come (it keeps them until then: see _reconnect)."""
        if self._got - self._got_told >= ACK_RESULTS or time.monotonic() - self._got_since >= ACK_EVERY:
            self._queue_frame({"t": "got", "n": self._got})
            self._got_told = self._got

    def _reconnect(self, error: BaseException) -> bool:
        """Reach the master again (it may be restarting) and resubmit every unfinished task.

        Returns False when it did not come back within `reconnect_window`. Delivery stays exactly-once: a
        task's Future resolves from the first result that arrives, on whichever connection."""
        host, port = self.address
        log.warning("lost the connection to the master at %s:%s (%s); reconnecting for up to %.0f s",
                    host, port, error, self.reconnect_window)
        # The old socket stays open until we are back: closing it would tell the master (once the network
        # heals) that we left, and it would drop the session we want to resume.
        old = self._sock
        deadline = time.monotonic() + self.reconnect_window
        delay = 0.05
        try:
            while True:
                if self._stopping:
                    return False
                try:
                    opened = self._open(max(0.1, min(self.connect_timeout, 5.0, deadline - time.monotonic())))
                    break
                except (P.AuthenticationError, P.VersionMismatch):
                    raise
                except (ClusterUnavailable, OSError, P.ProtocolError):
                    if time.monotonic() + delay > deadline:
                        return False
                    time.sleep(delay)
                    delay = min(delay * 2, 1.0)
        finally:
            try:
                old.close()
            except OSError:
                pass
        with self._lock:
            self._adopt(*opened)
            self.master_shutdown = None
            # Everything unfinished goes again. A master that kept our session keeps what it has and drops the
            # duplicates; one that did not (it restarted) runs them.
            resend = sorted((r for r in self._pending.values() if r.state != LEASED), key=lambda r: r.id)
            status_waiters = list(self._status_waiters)
            self._status_waiters.clear()
            self._queue_tasks(resend)
            if self.resumed:  # its answers to our cancels will come on this connection; say them again
                waiters = []
                for req, (_, _, ids) in self._cancel_waiters.items():
                    self._queue_frame({"t": "cancel", "req": req, "ids": ids})
            else:
                waiters = list(self._cancel_waiters.values())
                self._cancel_waiters.clear()
            killed = [r.id for r in resend if r.kill_requested]
            if killed:  # a kill may have died with the old master: say it again
                self._queue_frame({"t": "kill", "ids": killed})
        for event, box, _ in waiters:
            box.append(set())  # a cancel lost with the old connection cancelled nothing
            event.set()
        for event, _ in status_waiters:
            event.set()
        if self.resumed:
            log.warning("reconnected to the master at %s:%s, which kept our session and tasks", host, port)
        else:
            log.warning("reconnected to the master at %s:%s; resubmitted %d unfinished tasks", host, port,
                        len(resend))
        return True

    def _shut(self, error: BaseException | None) -> None:
        with self._lock:
            reason = error or ConnectionError("the executor was shut down")
            self.broken = reason
            records = [r for r in self._outbox if r.state == UNSENT] + list(self._pending.values())
            self._outbox.clear()
            self._pending.clear()
            waiters = list(self._cancel_waiters.values()) + list(self._status_waiters)
            self._cancel_waiters.clear()
            self._status_waiters.clear()
            lease, self._lease = self._lease, None
            if lease is not None:
                if lease.record is not None:  # (it fails below with the rest)
                    lease.record.state = DONE
                    lease.record.future._condition.hook = None
                    lease.record = None
                self._close_lease(lease)
            self._idle.notify_all()
        for event, *_ in waiters:
            event.set()
        with self._lock:
            if self._lender is not None:
                self._lender.close()  # (the agent then kills a process it lent us)
                self._lender = None
        try:
            self._sock.close()
        finally:
            os.close(self._wake_r)
            os.close(self._wake_w)
        if records:
            if error is not None:
                log.error("lost the connection to the master at %s:%s (%s); failing %d pending tasks",
                          *self.address, error, len(records))
            for r in records:
                _set_exception(r.future, ClusterUnavailable(
                    f"the connection to the master at {self.address[0]}:{self.address[1]} was lost before "
                    f"this task finished ({reason})"))
        for callback in self._on_idle_close:
            try:
                callback()
            except Exception:
                log.exception("error while stopping the local cluster")

    def _take_outbox(self) -> None:
        with self._lock:
            too_large = self._take_outbox_locked()
        for future, error in too_large:  # outside the lock: done-callbacks may submit
            _set_exception(future, error)

    def _take_outbox_locked(self) -> list[tuple[ClusterFuture, BaseException]]:
        self._woken = False
        records = self._outbox
        self._outbox = []
        cancels = self._cancel_out
        self._cancel_out = []
        status_requests, self._status_out = self._status_out, 0
        kills, self._kill_out = self._kill_out, []
        sending = []
        sizes = []
        limit = self.max_frame
        too_large = []
        for r in records:
            if r.state != UNSENT:
                continue
            size = P.task_size(r.task)
            if size > limit:
                # The master would refuse the frame and close the connection: fail this task alone.
                r.state = DONE
                too_large.append((r.future, ClusterError(
                    f"the task's data is {size >> 20} MiB, more than the master accepts in one message "
                    f"({limit >> 20} MiB; see python -m clusterexec.master --max-frame-mb)")))
                continue
            r.state = SENT
            self._pending[r.id] = r
            sending.append(r)
            sizes.append(size)
        self._queue_tasks(sending, sizes)
        self._give_back_locked()
        for req, ids in cancels:
            self._queue_frame({"t": "cancel", "req": req, "ids": ids})
        for _ in range(status_requests):
            self._queue_frame({"t": "status"})
        if kills:
            self._queue_frame({"t": "kill", "ids": kills})
        return too_large

    def _queue_tasks(self, records: list[_Record], sizes: list[int] | None = None) -> None:
        """Queue "submit" frames for these records; `sizes`: their `task_size`s, when already known."""
        if sizes is None:
            sizes = [P.task_size(r.task) for r in records]
        for group in P.in_frames(zip(records, sizes, strict=True), _second, self.max_frame):
            entries, buffers = P.encode_tasks(((r.id, r.task) for r, _ in group), self._sent_blobs)
            self._queue_frame({"t": "submit", "tasks": entries}, buffers)

    def _queue_frame(self, header: dict[str, Any], buffers: list[Any] = ()) -> None:
        wbuf = self._wbuf
        small: list[bytes] = []  # a run of small pieces goes out joined: fewer pieces for sendmsg and _write
        for piece in [*P.encode(header, buffers), None]:
            if type(piece) is bytes and len(piece) < _JOIN_BELOW:
                small.append(piece)
                continue
            if small:
                joined = b"".join(small)
                if joined:
                    wbuf.append(memoryview(joined))
                small = []
            if piece is not None:
                view = memoryview(piece).cast("B")
                if view.nbytes:
                    wbuf.append(view)

    def _receive(self) -> None:
        """Read what has arrived and handle the messages it completes; raises ConnectionError at end-of-file.

        Reads go straight into the frame reader's buffer: a large frame's own memory, once its size is known.
        Plain TCP: one read. TLS: one record per read, so read on until the SSL object wants more from the
        network, within a budget that lets writes through during a long download."""
        sock = self._sock
        reader = self._reader
        tls = self.ssl_context is not None
        self._tls_read_wants_write = False
        got = 0
        while True:
            try:
                n = sock.recv_into(reader.get_buffer())
            except (BlockingIOError, InterruptedError, ssl.SSLWantReadError):
                return
            except ssl.SSLWantWriteError:
                self._tls_read_wants_write = True
                return
            if not n:
                raise ConnectionError("the master closed the connection")
            self._last_heard = time.monotonic()
            self._handle(reader.filled(n))
            got += n
            if not tls or got >= _TLS_RECV_BUDGET:
                return

    def _write(self) -> None:
        if self.ssl_context is not None:
            self._write_tls()
            return
        wbuf = self._wbuf
        while wbuf:
            pieces = list(itertools.islice(wbuf, _MAX_IOV))
            try:
                sent = self._sock.sendmsg(pieces)
            except (BlockingIOError, InterruptedError):
                return
            while sent:
                head = wbuf[0]
                if sent >= head.nbytes:
                    sent -= head.nbytes
                    wbuf.popleft()
                else:
                    wbuf[0] = head[sent:]
                    sent = 0

    def _write_tls(self) -> None:
        """An SSLSocket has no sendmsg: send piece by piece, small pieces first joined into one TLS record's
        worth. After SSLWantWrite/WantRead OpenSSL must be given the same bytes again: the head stays as is."""
        wbuf = self._wbuf
        while wbuf:
            if not self._tls_retry and len(wbuf) > 1 and wbuf[0].nbytes < _TLS_JOIN:
                joined = []
                total = 0
                while wbuf and total + wbuf[0].nbytes <= _TLS_JOIN:
                    joined.append(wbuf.popleft())
                    total += joined[-1].nbytes
                wbuf.appendleft(memoryview(b"".join(joined)) if len(joined) > 1 else joined[0])
            head = wbuf[0]
            try:
                sent = self._sock.send(head)
            except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                self._tls_retry = True
                return
            self._tls_retry = False
            if sent >= head.nbytes:
                wbuf.popleft()
            else:
                wbuf[0] = head[sent:]

    def _handle(self, messages: list[P.Message]) -> None:
        for msg in messages:
            h = msg.header
            t = P.check_message("master", h)
            if t == "results":
                items = h["items"]
                if self._session is not None:
                    if self._got == self._got_told:
                        self._got_since = time.monotonic()
                    self._got += len(items)
                resolved = []
                for item, bufs in zip(items, P.split_buffers(items, msg.buffers), strict=True):
                    record = self._pending.pop(item[0], None)
                    if record is None:  # a duplicate after a retry: the first delivery won
                        self._drop_segments(bufs, item[3])
                        continue
                    record.state = DONE
                    record.task = None
                    resolved.append((record, item[1], bufs, item[3]))
                    if self._output.partial:
                        self._output.task_done(item[0])
                for record, status, bufs, info in resolved:
                    try:
                        self._resolve(record, status, bufs, info)
                    except Exception as e:  # a malformed result fails its own Future, not this thread
                        self._drop_segments(bufs, info)
                        _set_exception(record.future, P.ProtocolError(
                            f"malformed result from the master: {type(e).__name__}: {e}"))
                with self._lock:
                    self._notify_if_idle_locked()
                    self._ask_lease_locked()
            elif t == "output":
                self._output.write(h["items"], msg.buffers)
            elif t == "started":
                for tid in h["ids"]:
                    record = self._pending.get(tid)
                    if record is not None and record.future._state == PENDING:
                        record.future.set_running_or_notify_cancel()
            elif t == "cancel_reply":
                cancelled = set(h["cancelled"])
                for tid in cancelled:
                    record = self._pending.pop(tid, None)
                    if record is not None:
                        record.state = CANCELLED_HERE
                        record.task = None
                for tid in h["refused"]:
                    # Refused means a task process has it: it is running, even if "started" is still on its way.
                    record = self._pending.get(tid)
                    if record is not None and record.future._state == PENDING:
                        record.future.set_running_or_notify_cancel()
                waiter = self._cancel_waiters.pop(h["req"], None)
                if waiter is not None:
                    waiter[1].append(cancelled)
                    waiter[0].set()
                with self._lock:
                    self._notify_if_idle_locked()
            elif t == "ping":
                pass  # the master is alive; any message says so
            elif t == "notice":
                # From this thread a stack location would only point here: name the master instead. The master
                # says it again each time this client or an odd node (re)connects: shown once per executor, as
                # the warnings module does for a warning raised in one place (unless filters say "always").
                warnings.warn_explicit(str(h.get("text")), ClusterWarning, f"clusterexec master {self.address[0]}",
                                       self.address[1], module="clusterexec", registry=self._warned)
            elif t == "shutdown":
                self.master_shutdown = str(h.get("reason") or "no reason given")
                log.warning("the clusterexec master at %s:%s is shutting down (%s)%s", *self.address,
                            self.master_shutdown, f"; waiting up to {self.reconnect_window:g} s for it to come back"
                            if self.reconnect_window > 0 and self._pending else "")
            elif t == "status":
                with self._lock:
                    waiter = self._status_waiters.popleft() if self._status_waiters else None
                if waiter is not None:
                    waiter[1].append({k: v for k, v in h.items() if k != "t"})
                    waiter[0].set()
            else:
                raise P.ProtocolError(f"unknown message type {t!r} from the master")

    def _notify_if_idle_locked(self) -> None:
        """Nothing in flight any more: wake wait_idle()."""
        if not self._pending and not self._outbox:
            self._idle.notify_all()

    def _drop_segments(self, bufs: list[Any], info: Any) -> None:
        """The shared-memory segments of a result nobody will read (local mode)."""
        if self.shm_prefix:
            shm.remove(shm.result_markers(bufs, info), self.shm_prefix)

    def _resolve(self, record: _Record, status: str, bufs: list[Any], info: Any) -> None:
        future = record.future
        if status == "ok":
            try:
                if info and info.get("shm"):
                    try:
                        if not self.shm_prefix:
                            raise ValueError("shared memory is for local mode only")
                        bufs = shm.restore(bufs, info["shm"], self.shm_prefix, unlink=True)
                    except (OSError, ValueError, TypeError, IndexError) as e:
                        self._drop_segments(bufs, info)  # (those after the one that failed)
                        raise SerializationError(f"error unpickling the result: its shared memory cannot be read: {e}",
                                                 phase="unpickling the result") from None
                value = S.loads(bufs, "unpickling the result")
            except SerializationError as e:
                _set_exception(future, e)
                return
            _set_result(future, value)
            return
        if status == "raise":
            npartial = info.get("npartial", 0)
            exc = S.rebuild_exception(bufs[npartial:], info)
            if record.chunk:
                try:
                    values = S.loads(bufs[:npartial], "unpickling the result") if npartial else []
                except SerializationError as e:
                    values, exc = [], e
                _set_result(future, PartialChunk(values, exc))
            else:
                _set_exception(future, exc)
            return
        info = info or {}
        if record.kill_requested and info.get("kind") == "killed":
            info = dict(info, why=record.kill_requested)
        _set_exception(future, error_from_info(status, info, bufs))


class TaskOutput:
    """Writes what tasks printed to this process's stdout and stderr, each line prefixed with the worker host
    and the task process's pid. A line is written once complete (or when its task ends), so lines printed
    at the same time by different tasks do not interleave mid-line."""

    def __init__(self) -> None:
        self.partial: dict[tuple[int, int], tuple[str, bytes]] = {}  # (task id, stream) → (prefix, line start)
        # The IO thread writes, and so does a caller reading a borrowed process's output (see _await_lease).
        self._lock = threading.Lock()

    def write(self, items: list[Any], buffers: list[memoryview]) -> None:
        if len(items) != len(buffers):
            raise P.ProtocolError("output items and buffers differ in number")
        with self._lock:
            self._write(items, buffers)

    def _write(self, items: list[Any], buffers: list[memoryview]) -> None:
        out: dict[int, list[str]] = {1: [], 2: []}
        for (tid, host, pid, stream, dropped), data in zip(items, buffers, strict=True):
            stream = 1 if stream == 1 else 2
            prefix = f"[{host}:{pid}] "
            key = (tid, stream)
            data = bytes(data)
            if key in self.partial:
                data = self.partial.pop(key)[1] + data
            lines = data.split(b"\n")
            if len(lines[-1]) > 1 << 16:  # a very long line, or \r progress output: do not hold it all back
                lines.append(b"")
            elif lines[-1]:
                self.partial[key] = (prefix, lines[-1])
            out[stream].extend(prefix + line.decode("utf-8", "replace") + "\n" for line in lines[:-1])
            if dropped:
                out[2].append(f"{prefix}[clusterexec: {dropped} bytes of this task's output were dropped "
                              "because they came faster than they could be delivered]\n")
        self._emit(out)

    def task_done(self, tid: int) -> None:
        """The task ended: write what it left without a final newline."""
        out: dict[int, list[str]] = {1: [], 2: []}
        with self._lock:
            for stream in (1, 2):
                left = self.partial.pop((tid, stream), None)
                if left is not None:
                    out[stream].append(left[0] + left[1].decode("utf-8", "replace") + "\n")
            self._emit(out)

    @staticmethod
    def _emit(out: dict[int, list[str]]) -> None:
        if not out[1] and not out[2]:
            return
        with output_above_bars():
            for stream, lines in out.items():
                if not lines:
                    continue
                target = sys.stdout if stream == 1 else sys.stderr
                try:
                    target.write("".join(lines))
                    target.flush()
                except (OSError, ValueError, AttributeError):
                    pass  # closed or missing: nowhere to write, and no reason to fail the tasks


def fetch_status(address: str | tuple[str, int], key: bytes, *, timeout: float = 10.0, ssl_context: Any = None
          ) -> dict[str, Any]:
    """Ask the master at `address` for its status (connecting as a short-lived client, not listed), as
    `python -m clusterexec.status` and the launchers do."""
    host_port = parse_address(address, DEFAULT_PORT) if isinstance(address, str) else tuple(address)
    conn = ClientConnection(host_port, key, name="clusterexec.status", connect_timeout=timeout,
                            ssl_context=ssl_context, key_advice=COMMAND_KEY_ADVICE)
    try:
        info = conn.status(timeout)
    finally:
        conn.close()
    info["clients"] = [c for c in info.get("clients", []) if c.get("id") != conn.client_id]
    info["address"] = f"{host_port[0]}:{host_port[1]}"
    return info


def error_from_info(status: str, info: dict[str, Any], bufs: list[Any] = ()) -> BaseException:
    """The clusterexec error for a task that failed outside user code (`bufs`: the SerializationError itself,
    pickled, when one failed the task on the worker)."""
    where = f"on host {info.get('host', '?')}, pid {info.get('pid', '?')}"
    if status == "lost":
        return _worker_lost(info)
    kind = info.get("kind")
    detail = f"{info.get('type', '?')}: {info.get('message', '')}"
    if kind == "timeout":
        return TaskTimeout(f"task exceeded its time limit of {info.get('timeout')} s {where}; "
                           "its process was killed")
    if kind == "killed":
        if info.get("why") == "terminate":
            return WorkersTerminated(f"terminate_workers() stopped the task while it ran {where}"
                                     if info.get("started") else "terminate_workers() stopped the task")
        if info.get("started"):
            return TaskKilled(f"task was killed while running {where}")
        return TaskKilled("task was killed before it started")
    if kind == "incompatible":
        return IncompatibleWorkers(str(info.get("message")))
    if kind == "refused":
        return ClusterError(f"the master refused the task: {info.get('message')}")
    if kind == "initializer":
        error: BaseException = InitializerError(f"the executor's initializer failed {where}: {detail}")
    elif kind == "serialization":
        phase = info.get("phase", "")
        if str(info.get("type", "")).startswith("clusterexec.errors.SerializationError"):
            detail = str(info.get("message", "")).removeprefix(f"error {phase}: ")  # "TypeError: ..."
        message = f"task failed while {phase} {where}: {detail}"
        error = SerializationError(message, phase=phase)
        if bufs:
            try:
                sent = S.loads(bufs, "unpickling the error")
            except SerializationError:
                pass  # its class cannot be rebuilt here: the description will do
            else:
                if isinstance(sent, SerializationError):
                    sent.args = (message,)
                    sent.phase = phase
                    error = sent
    else:
        error = RemoteError(f"task failed {where}: {detail}", type_name=info.get("type", ""),
                            remote_message=info.get("message", ""), traceback=info.get("traceback", ""))
    tb = info.get("traceback")
    if tb and not isinstance(error, RemoteError):
        error.__cause__ = S.RemoteTraceback(tb)
    return error


def _worker_lost(info: dict[str, Any]) -> WorkerLostError:
    """The task's process or node died on its last attempt: which one (pid, host) and how it ended, in the
    message, in the attributes, and (as Python 3.15's BrokenProcessPool has it) in the `__cause__`."""
    host, pid, sig, code = info.get("host", "?"), info.get("pid", "?"), info.get("signal"), info.get("exitcode")
    if info.get("node_lost"):
        reason = info.get("reason", "disconnected")
        how = f"the worker node went away ({reason}) on host {host}, node agent pid {pid}"
        ended = f"worker node on host {host} (agent pid {pid}) went away: {reason}"
    else:
        if sig:
            how = f"its task process was killed by {sig}"
            number = getattr(signal.Signals, sig, None)
            ended = f"exit code -{int(number)} ({sig})" if number is not None else f"signal {sig}"
        elif code is not None:
            how = f"its task process exited with code {code}"
            ended = f"exit code {code}"
        else:
            how = "its task process ended"
            ended = "no exit status known"
        if info.get("phase"):
            how += f" while {info['phase']}"
        how += f" on host {host}, pid {pid}"
        ended = f"task process {pid} on host {host} terminated abruptly with {ended}"
    attempts = info.get("attempts", 1)
    error = WorkerLostError(f"task failed: {how}, on each of {attempts} attempts" if attempts > 1
                            else f"task failed: {how}",
                            host=info.get("host"), pid=info.get("pid"), exitcode=code, signal=sig, attempts=attempts)
    error.__cause__ = S.RemoteTraceback(ended)
    return error


# Future.set_result and set_exception, unless the Future is already done (cancelled here, say), with one
# acquisition of its lock instead of two and no notify_all when no thread waits in result() or exception().
# Waiters of wait() and as_completed() are told as Future itself does.

def _set_result(future: Future, value: Any) -> None:
    _settle(future, value, None)


def _set_exception(future: Future, exc: BaseException) -> None:
    _settle(future, None, exc)


def _settle(future: Future, value: Any, exc: BaseException | None) -> None:
    with future._condition:
        if future._state not in (PENDING, RUNNING):
            return
        future._result = value
        future._exception = exc
        future._state = FINISHED
        future._cx_record = None  # the record points back at the Future: left, the pair waits for the gc
        for waiter in future._waiters:
            if exc is None:
                waiter.add_result(future)
            else:
                waiter.add_exception(future)
        if future._condition._waiters:
            future._condition.notify_all()
    future._invoke_callbacks()


def _second(pair: tuple[Any, Any]) -> Any:
    return pair[1]

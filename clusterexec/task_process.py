"""A task process: runs the tasks its agent sends, one after another, and sends back their results.

    agent ══socketpair (fd 3)══▶ TaskRunner.serve: "run" [task, task, …] ──▶ todo
                                   each task: unpickle fn (cached by blob hash) and args, run it, pickle
                                   the result; quick results are held a moment to travel together
          ◀═════════════════════ "results" [[id, status, nbuffers, info], …] + buffers
          ◀═════════════════════ "output" (what fds 1 and 2 got, tagged with the task: see _Output)
    shared memory (PHASE) ◀───── phase and running task id, for the agent to read if we die

The process is forked by the agent (worker.py), which never runs user code; everything here does. It leads
a session of its own and is a subreaper: what a task leaves running is stopped before the task's result
goes out (see _stop_leftovers). It dies with its agent (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import fcntl
import gc
import itertools
import logging
import mmap
import multiprocessing
import os
import select
import signal
import socket
import struct
import sys
import threading
import time
from collections import deque
from typing import Any

from . import protocol as P
from . import serialization as S
from . import shm
from .process_tree import PR_SET_PDEATHSIG, become_subreaper, children, kill_quietly, prctl


def _set_parent_death_signal() -> None:
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # (the agent gone, killed even: so are we)


# What a task process is doing, written to a few bytes of memory it shares with its agent, so that when
# the process dies (os._exit, a segfault, the OOM killer) the agent can say in which phase, and which of the
# tasks it held was running: its phase (one byte) and the task's id.
PHASE = struct.Struct("=B7xq")
_RUNNING_ID = struct.Struct("=q")
# A result may wait up to HOLD_FOR seconds in its task process, to go out with those of the next tasks, when
# those are queued there already and their function took less than QUICK last time. Never more than
# HOLD_MAX results or HOLD_BYTES bytes.
HOLD_FOR = 0.001
QUICK = 0.0002
HOLD_MAX = 64
HOLD_BYTES = 1 << 16
PHASES = ("waiting for a task", "unpickling the function", "running the initializer", "unpickling the arguments",
          "running the task", "pickling the result", "sending the result", "pickling the exception")
(IDLE, _UNPICKLING_FN, _INITIALIZING, _UNPICKLING_ARGS, _RUNNING, _PICKLING_RESULT,
 _SENDING_RESULT, _PICKLING_EXCEPTION) = range(len(PHASES))


class TaskRunner:
    """State of one task process: the functions it has unpickled, initializers it has run."""

    def __init__(self, sock: socket.socket, phase: mmap.mmap, output: _Output | None = None):
        self.sock = sock
        self.phase = phase
        self.output = output
        self.send_lock = output.lock if output is not None else threading.Lock()
        self.shm_prefix = os.environ.get(shm.ENV_PREFIX)  # local mode: large results via shared memory
        self.functions: dict[str, Any] = {}
        self.sources: dict[str, S.Sources] = {}  # blob hash → the source lines it carries (see serialization)
        self.authkeys: dict[str, bytes] = {}  # blob hash → its client's multiprocessing authkey
        self.authkey: bytes | None = None  # the one this process uses now
        self.cache = P.BlobLRU(on_evict=self._evicted)
        self.initialized: dict[str, BaseException | None] = {}
        self.tasks_run = 0
        # Results of quick tasks wait (at most HOLD_FOR) to travel together while more tasks are queued here.
        self.held: list[list[Any]] = []
        self.held_bufs: list[Any] = []
        self.held_bytes = 0
        self.held_since = 0.0

    def _evicted(self, h: str) -> None:
        self.functions.pop(h, None)
        self.sources.pop(h, None)
        self.authkeys.pop(h, None)
        self.initialized.pop(h, None)

    def _load(self, blob: P.Blob, phase: str, sent: Any = ()) -> Any:
        fn = self.functions.get(blob.hash)
        if fn is None:
            extras = S.blob_extras(blob.data)
            if extras.get("sources"):
                self.sources[blob.hash] = extras["sources"]
            if isinstance(extras.get("authkey"), bytes):
                self.authkeys[blob.hash] = extras["authkey"]
                self._use_authkey_of(blob)  # (a function may hold a Manager proxy too)
            fn = S.loads([blob.data], phase, sent)
            self.functions[blob.hash] = fn
        return fn

    def _use_authkey_of(self, blob: P.Blob) -> None:
        """Use the multiprocessing authkey of the client this function came from, as ProcessPoolExecutor's
        children inherit their parent's: its Manager proxies connect to its managers with it. A node serves
        several clients, so this is for every task (a look-up, mostly)."""
        key = self.authkeys.get(blob.hash)
        if key is not None and key is not self.authkey:
            multiprocessing.current_process().authkey = key
            self.authkey = key

    def _show_sources_of(self, blob: P.Blob) -> None:
        """A traceback about to be formatted shows the source lines that came with this function."""
        S.task_sources = self.sources.get(blob.hash)

    def serve(self) -> None:
        reader = P.FrameReader()
        sock = self.sock
        todo: deque[P.Task] = deque()  # the agent queues quick tasks here, behind the one running
        took: dict[str, float] = {}  # function blob hash → seconds its last task took
        while True:
            if not todo:
                try:  # with results held back, only look: if nothing came, they go out before we sleep
                    n = sock.recv_into(reader.get_buffer(), 0, socket.MSG_DONTWAIT if self.held else 0)
                except BlockingIOError:
                    self._send_held()
                    continue
                if not n:
                    return
                for msg in reader.filled(n):
                    if msg.type == "run":
                        todo.extend(P.decode_tasks(msg.header["tasks"], msg.buffers, self.cache))
                continue
            task = todo.popleft()
            fn_hash = task.deps[0].hash
            if self.held and took.get(fn_hash, HOLD_FOR) >= QUICK:
                self._send_held()  # this one may take a while: nobody waits for a result behind it
            opts = task.opts or {}
            output = self.output
            if output is not None:
                output.begin(task.id, opts.get("out", 1))
            _RUNNING_ID.pack_into(self.phase, 8, task.id)
            began = time.monotonic()
            status, bufs, info = self.run(task)
            self.tasks_run += 1
            self.phase[0] = _SENDING_RESULT
            if self.shm_prefix and status == "ok":
                bufs, moved = shm.offload(bufs, self.shm_prefix, task.id)
                if moved:
                    info = {"shm": moved}
            if output is not None:
                output.flush_streams()
                with self.send_lock:
                    output.end()  # the task's output travels ahead of its result
            now = time.monotonic()
            took[fn_hash] = now - began
            if not self.held:
                self.held_since = now
            self.held.append([task.id, status, len(bufs), info])
            self.held_bufs.extend(bufs)
            self.held_bytes += P.nbytes(bufs)
            del bufs
            if len(self.held) >= HOLD_MAX or now - self.held_since >= HOLD_FOR or self.held_bytes >= HOLD_BYTES:
                self._send_held()
            self.phase[0] = IDLE
            mtpc = opts.get("mtpc")
            if mtpc and self.tasks_run >= mtpc:
                self._send_held()
                return

    def _send_held(self) -> None:
        """Send the results held back, in one frame; first stop what their tasks left running."""
        if not self.held:
            return
        if _haschildren():
            _stop_leftovers()
        pieces = P.encode({"t": "results", "items": self.held}, self.held_bufs)
        self.held = []
        self.held_bufs = []
        self.held_bytes = 0
        with self.send_lock:
            _send_all(self.sock, pieces)

    def run(self, task: P.Task) -> tuple[str, list[Any], Any]:
        opts = task.opts or {}
        phase = self.phase
        sent = opts.get("byval", ())  # (modules the executor sends by value: see S.missing_module_hint)
        try:
            phase[0] = _UNPICKLING_FN
            fn = self._load(task.deps[0], "unpickling the function", sent)
            self._use_authkey_of(task.deps[0])
            if opts.get("init"):
                phase[0] = _INITIALIZING
                self._initialize(task.deps[1], sent)
            phase[0] = _UNPICKLING_ARGS
            bufs = task.bufs
            if opts.get("shm"):
                try:
                    if not self.shm_prefix:
                        raise ValueError("shared memory is for local mode only")
                    bufs = shm.restore(bufs, opts["shm"], self.shm_prefix)
                except (OSError, ValueError, TypeError, IndexError) as e:
                    raise S.SerializationError(
                        f"error unpickling the arguments: their shared memory cannot be read: {e}",
                        phase="unpickling the arguments") from None
            payload = S.loads(bufs, "unpickling the arguments", sent)
        except S.SerializationError as e:
            self._show_sources_of(task.deps[0])
            return _error_result(e, kind="serialization", phase=e.phase)
        except _InitializerFailed as e:
            self._show_sources_of(task.deps[1])
            return _error_result(e.error, kind="initializer", phase="running the initializer")
        phase[0] = _RUNNING
        if opts.get("chunk"):
            return self._run_chunk(fn, payload, opts["chunk"] == P.CHUNK_OF_ITEMS, task.deps[0], sent)
        args, kwargs = payload
        try:
            value = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - SystemExit and KeyboardInterrupt travel too
            _note_missing_module(exc, sent)
            self._show_sources_of(task.deps[0])
            phase[0] = _PICKLING_EXCEPTION
            bufs, info = S.dumps_exception(exc)
            return "raise", bufs, info
        phase[0] = _PICKLING_RESULT
        try:
            return "ok", S.dumps(value, "pickling the result"), None
        except S.SerializationError as e:
            self._show_sources_of(task.deps[0])
            return _error_result(e, kind="serialization", phase=e.phase)

    def _run_chunk(self, fn: Any, chunk: Any, items: bool, blob: P.Blob, sent: Any = ()) -> tuple[str, list[Any], Any]:
        """A map chunk: argument tuples, or (`items`) the items of a single iterable, a range perhaps.

        `list.extend` keeps what it appended when the iterator raises: the values before the failing item."""
        values: list[Any] = []
        try:
            values.extend(map(fn, chunk) if items else itertools.starmap(fn, chunk))
        except BaseException as exc:  # noqa: BLE001
            _note_missing_module(exc, sent)
            self._show_sources_of(blob)
            self.phase[0] = _PICKLING_EXCEPTION
            bufs, info = S.dumps_exception(exc)
            self.phase[0] = _PICKLING_RESULT
            try:
                partial = S.dumps(values, "pickling the result")
            except S.SerializationError as e:
                return _error_result(e, kind="serialization", phase=e.phase)
            info["npartial"] = len(partial)
            return "raise", [*partial, *bufs], info
        self.phase[0] = _PICKLING_RESULT
        try:
            return "ok", S.dumps(values, "pickling the result"), None
        except S.SerializationError as e:
            self._show_sources_of(blob)
            return _error_result(e, kind="serialization", phase=e.phase)

    def _initialize(self, blob: P.Blob, sent: Any = ()) -> None:
        if blob.hash in self.initialized:
            error = self.initialized[blob.hash]
            if error is not None:
                raise _InitializerFailed(error)
            return
        try:
            initializer, initargs = self._load(blob, "unpickling the initializer", sent)
            initializer(*initargs)
        except BaseException as exc:  # noqa: BLE001
            self.initialized[blob.hash] = exc
            raise _InitializerFailed(exc) from None
        self.initialized[blob.hash] = None


F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
OUTPUT_DELAY = 0.02  # seconds output waits in a task process for more to send along with it
OUTPUT_LIMIT = 1 << 20  # bytes of output a task process holds unsent; more is dropped, and the loss reported


class _Output:
    """Captures what the task process writes to file descriptors 1 and 2 (print, warnings, logging, C code,
    child processes alike) through pipes, and sends it to the agent tagged with the running task.

    A reader thread drains the pipes and sends what it found OUTPUT_DELAY later, batched. When a task ends,
    its own thread drains them before sending the result, so a task's output always travels ahead of its
    result. A task whose executor said ``output=False``, and output written between tasks, goes to the
    worker's own stdout and stderr instead. Unsent output is bounded by OUTPUT_LIMIT: a task printing in a
    loop is slowed down by the pipe, then loses lines (and the client is told how many bytes), but never
    makes anyone's memory grow."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.lock = threading.Lock()  # guards the socket, `pending` and the task tag
        self.task_id: int | None = None
        self.forward = True
        self.pending: list[tuple[int, bytes]] = []  # (1 for stdout or 2 for stderr, data)
        self.size = 0
        self.dropped = 0
        self.original = {1: os.dup(1), 2: os.dup(2)}
        self.readers: dict[int, int] = {}  # pipe's read end → the descriptor it captures
        for fd in (1, 2):
            r, w = os.pipe()
            try:
                fcntl.fcntl(w, F_SETPIPE_SZ, 1 << 20)  # room for bursts between two reads of the pump
            except OSError:
                pass
            os.dup2(w, fd)
            os.close(w)
            os.set_blocking(r, False)
            self.readers[r] = fd
        for stream in (sys.stdout, sys.stderr):
            if stream is not None and hasattr(stream, "reconfigure"):
                stream.reconfigure(line_buffering=True)  # a pipe would make stdout block-buffered
        self._idle_check = select.poll()
        for r in self.readers:
            self._idle_check.register(r, select.POLLIN)
        threading.Thread(target=self._pump, name="clusterexec-output", daemon=True).start()

    def begin(self, task_id: int, forward: Any) -> None:
        with self.lock:
            self.task_id = task_id
            self.forward = bool(forward)

    def flush_streams(self) -> None:
        """Push what Python still buffers into the pipes (outside the lock: a full pipe waits for the pump)."""
        for stream in (sys.stdout, sys.stderr):
            try:
                if stream is not None:
                    stream.flush()
            except (OSError, ValueError):
                pass

    def end(self) -> None:
        """The task is over: send all its output now. Call with `lock` held, just before its result."""
        if self._idle_check.poll(0):
            self._drain()
        self._send()
        self.task_id = None

    def _pump(self) -> None:
        poller = select.poll()
        for r in self.readers:
            poller.register(r, select.POLLIN)
        while True:
            poller.poll()
            # Keep reading for OUTPUT_DELAY (the pipes must not fill and stall the task), then send it all in
            # one message; sooner when much has piled up.
            deadline = time.monotonic() + OUTPUT_DELAY
            while True:
                with self.lock:
                    self._drain()
                    if self.size >= OUTPUT_LIMIT // 2:
                        self._send()
                left = deadline - time.monotonic()
                if left <= 0 or not poller.poll(left * 1000):
                    break
            with self.lock:
                self._drain()
                self._send()

    def _drain(self) -> None:
        for r, fd in self.readers.items():
            while True:
                try:
                    data = os.read(r, 1 << 16)
                except BlockingIOError:
                    break
                if not data:
                    break
                if self.task_id is None or not self.forward:
                    _write_all(self.original[fd], data)
                elif self.size + len(data) > OUTPUT_LIMIT:
                    self.dropped += len(data)
                else:
                    self.pending.append((fd, data))
                    self.size += len(data)

    def _send(self) -> None:
        if not (self.pending or self.dropped) or self.task_id is None:
            return
        header = {"t": "output", "id": self.task_id, "s": [fd for fd, _ in self.pending]}
        if self.dropped:
            header["dropped"] = self.dropped
        _send_all(self.sock, P.encode(header, [data for _, data in self.pending]))
        self.pending = []
        self.size = 0
        self.dropped = 0


def _haschildren() -> bool:
    """Is any process below us, running or a zombie? One system call, made once per results message."""
    try:
        os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return False
    return True


def _stop_leftovers(patience: float = 5.0) -> None:
    """Kill and reap every process below this task process: what the tasks run here left running. Those that
    are orphaned on the way come back to us (we are a subreaper) and are found in the next round."""
    me = os.getpid()
    deadline = time.monotonic() + patience
    spared = _multiprocessing_helpers()
    while True:
        kids = [pid for pid in children(me) if pid not in spared]
        if not kids:
            return
        for pid in kids:  # (our children, unreaped: their pids are not anyone else's)
            kill_quietly(pid)
        for pid in kids:
            while True:
                try:
                    if os.waitpid(pid, os.WNOHANG)[0]:
                        break
                except ChildProcessError:  # reaped by the task's own thread meanwhile
                    break
                if time.monotonic() > deadline:
                    return  # stuck in the kernel (a hung mount, say): left for the next results message
                time.sleep(0.001)


def _multiprocessing_helpers() -> set[int]:
    """multiprocessing's forkserver and resource tracker, if a task started them: they serve every later task
    in this process too (and fail it if killed: the forkserver's owner would find its pid reaped), so they
    stay, and end with the process."""
    helpers = set()
    for module, instance, field in (("multiprocessing.forkserver", "_forkserver", "_forkserver_pid"),
                                    ("multiprocessing.resource_tracker", "_resource_tracker", "_pid")):
        pid = getattr(getattr(sys.modules.get(module), instance, None), field, None)
        if isinstance(pid, int):
            helpers.add(pid)
    return helpers


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except OSError:
            return


def _send_all(sock: socket.socket, pieces: list[Any]) -> None:
    """Send a frame's pieces without joining them: a large result is not copied on its way out."""
    views = [memoryview(p).cast("B") for p in pieces]
    views = [v for v in views if v.nbytes]
    while views:
        P.sent_off(views, sock.sendmsg(views[:512]))


def _note_missing_module(exc: BaseException, sent: Any = ()) -> None:
    hint = S.missing_module_hint(exc, sent)
    if hint:
        exc.add_note(hint)


class _InitializerFailed(Exception):
    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error


def _error_result(exc: BaseException, *, kind: str, phase: str) -> tuple[str, list[Any], Any]:
    info = S.exception_info(exc)
    info.update(kind=kind, phase=phase, pid=os.getpid(), host=socket.gethostname())
    bufs: list[Any] = []
    if isinstance(exc, S.SerializationError):
        # The error itself travels, so that it is still a TypeError, a PicklingError... in the caller.
        try:
            bufs = S.dumps(exc, "pickling the error")
        except S.SerializationError:
            pass  # its description alone, then
    return "error", bufs, info


def task_process_main(sock: socket.socket, phase: mmap.mmap) -> None:
    _set_parent_death_signal()
    # A session (and process group) of our own, and the subreaper of all below us: what a task starts is
    # ours to find and stop when the task ends (see _stop_leftovers), and the agent's when we die.
    try:
        os.setsid()
    except OSError:  # (cannot fail in a child just forked, which leads no group)
        pass
    become_subreaper()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the agent, which decides
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        signal.set_wakeup_fd(-1)  # the agent's event loop is not ours
    except ValueError:
        pass
    gc.freeze()  # never collect (and so never close) the agent's objects inherited by fork
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    # Our socket becomes fd 3 and everything else the agent had open is closed, so the master
    # connection and sibling sockets do not live on in this process.
    fd = sock.detach()
    if fd != 3:
        os.dup2(fd, 3)
        os.close(fd)
    os.closerange(4, 65536)
    sock = socket.socket(fileno=3)
    sock.setblocking(True)
    # Start as a fresh interpreter would: the agent's log handlers write to the worker's terminal, and
    # its INFO level would let a task's logging.info through to nowhere in particular.
    logging.root.handlers.clear()
    logging.root.setLevel(logging.WARNING)
    output = _Output(sock)
    try:
        TaskRunner(sock, phase, output).serve()
    except (ConnectionError, OSError):
        pass
    finally:
        sys.stdout.flush()
        sys.stderr.flush()

"""`ClusterExecutor`: the `concurrent.futures.Executor` users hold.

    submit(fn, *args) ─ pickle fn (a blob named by its content hash) and (args, kwargs) in the caller's thread
                      └─▶ ClientConnection.submit ─▶ Future
    map(fn, *its)     ─ pickle fn once; one task per item, or per chunk of `chunksize` items;
                        with `buffersize`, at most that many tasks in flight, refilled as results are yielded
    shutdown()        ─ cancel what is queued (cancel_futures), wait, close the connection, stop local mode

With no address the executor starts its own master and node on this machine (`local.LocalCluster`).
"""

from __future__ import annotations

import atexit
import functools
import itertools
import os
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future
from typing import Any

from . import protocol as P
from . import serialization as S
from . import shm
from .address import DEFAULT_PORT, parse_address
from .auth import PROGRAM_KEY_ADVICE, resolve_key
from .client import ClientConnection, ClusterFuture, PartialChunk
from .errors import ClusterError, SerializationError
from .local import LocalCluster
from .node_state import default_nprocs


class ClusterExecutor(Executor):
    """An executor whose tasks run in the task processes of a clusterexec cluster.

    ``ClusterExecutor("head-node:7070")`` connects to a running master (``python -m clusterexec.master``);
    ``ClusterExecutor(max_workers=4)`` starts a private master and worker node on this machine and stops
    them on shutdown, like ``ProcessPoolExecutor(max_workers=4)``.

    Functions travel with cloudpickle, so lambdas and closures work. A task whose process dies is retried
    on another process (twice by default) before its Future fails with `WorkerLostError`.

    >>> with ClusterExecutor(max_workers=2) as ex:
    ...     list(ex.map(lambda x: x * x, range(5)))
    [0, 1, 4, 9, 16]
    """

    def __init__(self, address: str | tuple[str, int] | None = None, max_workers: int | None = None, *,
                 authkey: str | bytes | None = None, initializer: Callable[..., Any] | None = None,
                 initargs: tuple = (), max_tasks_per_child: int | None = None, mp_context: Any = None,
                 connect_timeout: float = 30.0, reconnect_window: float = 60.0, name: str | None = None,
                 slurm: bool | str = False,
                 tls_cert: str | None = None, tls_key: str | None = None, tls_ca: str | None = None,
                 modules: Iterable[Any] = (), output: bool = True, compatible_wait: float = 60.0):
        if isinstance(address, int) and not isinstance(address, bool):
            # ClusterExecutor(8), as one would write ProcessPoolExecutor(8)
            address, max_workers = None, address
        if max_workers is not None:
            if not isinstance(max_workers, int) or max_workers <= 0:
                raise ValueError("max_workers must be greater than 0")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        if max_tasks_per_child is not None:
            if not isinstance(max_tasks_per_child, int):
                raise TypeError("max_tasks_per_child must be an integer")
            if max_tasks_per_child <= 0:
                raise ValueError("max_tasks_per_child must be >= 1")
        # Everything that can fail before anything is started goes first; what is started after is stopped again
        # if the constructor fails: a constructor that raises leaves no process, thread or socket behind.
        ssl_context = None
        if tls_cert or tls_key or tls_ca:
            from .auth import TLSConfigError, tls_context
            if address is None and not slurm:
                raise TLSConfigError("tls_cert, tls_key and tls_ca are for a cluster address: local mode talks to its "
                                     "private master over 127.0.0.1 only and does not use TLS")
            ssl_context = tls_context(server=False, cert=tls_cert, key=tls_key, ca=tls_ca)
        if slurm and address is None:
            from .slurm import master_address
            address = master_address(None if slurm is True else slurm)
        key = None
        key_advice = PROGRAM_KEY_ADVICE
        if address is not None:
            host_port = parse_address(address, DEFAULT_PORT) if isinstance(address, str) else tuple(address)
            key, where = resolve_key(authkey, advice=PROGRAM_KEY_ADVICE)
            source = "authkey=" if authkey is not None else where
            key_advice = f"this program's key came from {source}; {PROGRAM_KEY_ADVICE}"
        self._by_value = S.send_by_value(modules)
        self._local: LocalCluster | None = None
        self._opts: dict[str, Any] = {}
        self._init_blob = None
        try:
            if initializer is not None:
                self._init_blob = S.function_blob((initializer, tuple(initargs)), "pickling the initializer")
                self._opts["init"] = 1
            if address is None:
                self._local = LocalCluster(max_workers or default_nprocs())
                host_port, key = self._local.address, self._local.key
            self._conn = self._connect(host_port, key, name, connect_timeout, ssl_context, compatible_wait,
                                       reconnect_window, key_advice)
        except BaseException:
            S.stop_by_value(self._by_value)
            raise
        self.address = f"{host_port[0]}:{host_port[1]}"
        self._shm_prefix = self._local.shm_prefix if self._local is not None else None
        self._conn.shm_prefix = self._shm_prefix  # results in shared memory are accepted from this cluster only
        self._max_workers = max_workers or max(1, self._conn.procs)
        if max_tasks_per_child is not None:
            self._opts["mtpc"] = max_tasks_per_child
        if not output:
            self._opts["out"] = 0
        if self._by_value:  # (for the hint of a task that imports one of them: see S.missing_module_hint)
            self._opts["byval"] = list(self._by_value)
        self._shutdown_lock = threading.Lock()
        self._shutdown = False
        if self._local is not None:
            self._conn.on_close(self._local.stop)
        self._conn.on_close(functools.partial(_draining.discard, self._conn))
        # Garbage collected while still open: finish what is pending in the background, then close and
        # stop local mode. Interpreter exit with the executor open, or shut down without waiting: wait for
        # pending work, as ProcessPoolExecutor does (see _shutdown_at_exit). Either way no process is left behind.
        self._finalizer = weakref.finalize(self, _close_when_idle, self._conn)
        self._finalizer.atexit = False
        _open_executors.add(self)

    def _connect(self, host_port: tuple[str, int], key: bytes, name: str | None, connect_timeout: float,
                 ssl_context: Any, compatible_wait: float, reconnect_window: float,
                 key_advice: str) -> ClientConnection:
        """The connection to the master; in local mode it takes over the lender channel, and the private cluster
        is stopped if it cannot be made."""
        lender = None
        if self._local is not None:  # the connection owns it from here
            lender, self._local.lender = self._local.lender, None
        try:
            return ClientConnection(host_port, key, name=name or _default_name(), connect_timeout=connect_timeout,
                                    ssl_context=ssl_context, compat_wait=compatible_wait, lender=lender,
                                    key_advice=key_advice,
                                    reconnect_window=0.0 if self._local is not None else reconnect_window)
        except BaseException:
            if lender is not None:
                lender.close()
            if self._local is not None:
                self._local.stop()
            raise

    # ------------------------------------------------------------------------------------------ submit

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        return self._submit(fn, args, kwargs, None)

    def _submit(self, fn: Callable[..., Any], args: tuple, kwargs: dict, extra: dict | None) -> Future:
        with self._shutdown_lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
        try:
            blob = S.function_blob(fn)
            bufs = S.dumps((args, kwargs), "pickling the arguments")
        except SerializationError as e:
            return _failed(e)
        opts = {**self._opts, **extra} if extra else self._opts
        return self._send(self._deps(blob), bufs, opts, False)

    def _send(self, deps: list[Any], bufs: list[Any], opts: dict[str, Any], chunk: bool) -> Future:
        """Queue one task; in local mode its large buffers go through shared memory."""
        bufs, task_opts, markers = self._offload(bufs, opts)
        try:
            future = self._conn.submit(deps, bufs, task_opts, chunk=chunk)
        except BaseException:
            shm.remove(markers, self._shm_prefix)
            raise
        if markers:
            future.add_done_callback(functools.partial(_remove_segments, markers, self._shm_prefix))  # (retries too)
        return future

    def _send_many(self, deps: list[Any], payloads: list[list[Any]], opts: dict[str, Any],
                   chunk: bool) -> list[Future]:
        """Queue tasks that share their function and options (a batch of `map`) with one call to the connection."""
        if len(payloads) == 1:
            return [self._send(deps, payloads[0], opts, chunk)]
        tasks = []
        segments = []
        for bufs in payloads:
            bufs, task_opts, markers = self._offload(bufs, opts)
            tasks.append((bufs, task_opts))
            segments.append(markers)
        try:
            futures = self._conn.submit_many(deps, tasks, chunk=chunk)
        except BaseException:
            for markers in segments:
                if markers:
                    shm.remove(markers, self._shm_prefix)
            raise
        for future, markers in zip(futures, segments, strict=True):
            if markers:
                future.add_done_callback(functools.partial(_remove_segments, markers, self._shm_prefix))
        return futures

    def _offload(self, bufs: list[Any], opts: dict[str, Any]) -> tuple[list[Any], dict[str, Any] | None, list[Any]]:
        """A task's buffers and options as sent, and the markers of the buffers moved to shared memory (local
        mode, large buffers), to remove once the task is over."""
        if self._shm_prefix is not None:
            bufs, moved = shm.offload(bufs, self._shm_prefix)
            if moved:
                return bufs, {**opts, "shm": moved}, [bufs[i] for i in moved]
        return bufs, opts or None, []

    def options(self, *, timeout: float | None = None, retries: int | None = None) -> TaskOptions:
        """The same executor with per-call task options, keeping every keyword free for your function.

        ``timeout``: seconds a task may run (from its start, not counting time in the queue); past it, its
        process is killed and replaced and its Future fails with `TaskTimeout` (a `TimeoutError`).
        ``retries``: how many times a task is run again after its process or node died (default 2).

        >>> ex.options(timeout=60, retries=0).submit(simulate, params)  # doctest: +SKIP
        """
        return TaskOptions(self, _task_options(timeout, retries))

    def kill(self, future: Future) -> bool:
        """Stop the task behind `future`, even if it is running: its process is killed and replaced, and the
        Future fails with `TaskKilled`. Returns False if the Future is already done or not ours."""
        record = getattr(future, "_cx_record", None)
        if record is None or future.done() or record.conn is not self._conn:
            return False
        return self._conn.kill(record)

    def terminate_workers(self) -> None:
        """Stop all of this executor's work at once and shut it down (as in Python 3.14's ProcessPoolExecutor).

        Queued tasks are cancelled and running ones killed; on a shared cluster only this executor's tasks
        are touched. In local mode the private cluster is stopped. Pending Futures end cancelled or, as
        `ProcessPoolExecutor`'s running ones, with a `BrokenProcessPool`: `WorkersTerminated`, which is
        also a `TaskKilled`."""
        with self._shutdown_lock:
            self._shutdown = True
        pending = self._conn.pending_futures()
        _cancel_all(pending)
        for future in pending:
            record = getattr(future, "_cx_record", None)
            if record is not None and not future.done():
                self._conn.kill(record, why="terminate")
        self.shutdown(wait=True)

    kill_workers = terminate_workers  # processes are always stopped with SIGKILL: there is no gentler way

    def _deps(self, blob: Any) -> list[Any]:
        return [blob, self._init_blob] if self._init_blob is not None else [blob]

    # ------------------------------------------------------------------------------------------ map

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any], timeout: float | None = None,
            chunksize: int = 1, buffersize: int | None = None, progress: bool = False) -> Iterator[Any]:
        """Like `ProcessPoolExecutor.map`, with `buffersize` (Python 3.14) on every Python.

        Results come in input order. With ``chunksize > 1`` items travel in chunks; an exception raised for
        an item is raised when the iteration reaches that item, after the results before it. With
        ``buffersize=N`` at most N tasks are in flight, so an endless generator maps in bounded memory.
        ``progress=True`` shows a progress bar (tqdm if installed, else a line on stderr) counting items as
        their tasks finish.
        """
        return self._map(fn, iterables, timeout, chunksize, buffersize, None, progress)

    def _map(self, fn: Callable[..., Any], iterables: tuple, timeout: float | None, chunksize: int,
             buffersize: int | None, extra: dict | None, progress: bool = False) -> Iterator[Any]:
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        if buffersize is not None:
            if not isinstance(buffersize, int):
                raise TypeError("buffersize must be an integer or None")
            if buffersize < 1:
                raise ValueError("buffersize must be None or > 0")
        with self._shutdown_lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
        end_time = None if timeout is None else timeout + time.monotonic()
        chunked = chunksize > 1
        zipped: Iterator[Any]
        if chunked and len(iterables) == 1:
            zipped = _item_chunks(iterables[0], chunksize)  # the items themselves: no 1-tuple per item
        elif chunked:
            zipped = _batched(zip(*iterables, strict=False), chunksize)
        else:
            zipped = zip(*iterables, strict=False)
        try:
            deps = self._deps(S.function_blob(fn))
        except SerializationError as e:
            deps = None
            error = e
        opts = {**self._opts, **(extra or {})}
        if chunked:
            opts["chunk"] = P.CHUNK_OF_ITEMS if len(iterables) == 1 else P.CHUNK_OF_ARGS
        bar = _progress_bar(iterables, getattr(fn, "__name__", "map")) if progress else None

        def prepare(item: Any) -> tuple[list[Any] | Future, int]:
            """The item's pickled arguments (or its failed Future) and how many items it counts for."""
            n = len(item) if chunked else 1
            if deps is None:
                return _failed(error), n
            try:
                return S.dumps(item if chunked else (item, {}), "pickling the arguments"), n
            except SerializationError as e:
                return _failed(e), n

        def send(batch: list[tuple[list[Any] | Future, int]]) -> list[Future]:
            ready = [bufs for bufs, _ in batch if type(bufs) is list]
            sent = iter(self._send_many(deps, ready, opts, chunked) if ready else ())
            futures = [next(sent) if type(bufs) is list else bufs for bufs, _ in batch]
            if bar is not None:
                for future, (_, n) in zip(futures, batch, strict=True):
                    future.add_done_callback(functools.partial(_advance, bar, n))
            return futures

        def make(item: Any) -> Future:
            return send([prepare(item)])[0]

        def make_all(items: Iterator[Any], size: int) -> deque[Future]:
            """Futures for all of `items`, queued `size` at a time, or after _MAP_BATCH_WAIT if sooner (large
            items: the first tasks should not wait for the pickling of many more)."""
            futures: deque[Future] = deque()
            batch: list[tuple[list[Any] | Future, int]] = []
            clock = time.monotonic
            started = clock()
            try:
                for item in items:
                    batch.append(prepare(item))
                    if len(batch) >= size or clock() - started >= _MAP_BATCH_WAIT:
                        full, batch = batch, []
                        futures.extend(send(full))
                        started = clock()
            finally:  # (the iteration failed: what came before it still runs, as when queued one by one)
                futures.extend(send(batch))
            return futures

        # Batches only over containers, whose items are all there: an item of a generator is queued as soon as
        # it is made, since making the next one may wait (for a while, or even for this item's result).
        size = _MAP_BATCH if all(type(it) in _CONTAINERS for it in iterables) else 1
        futures = make_all(zipped if buffersize is None else itertools.islice(zipped, buffersize), size)
        return self._results(futures, zipped if buffersize else None, make, end_time, chunked, bar)

    def _results(self, futures: deque[Future], more: Iterator[Any] | None, make: Callable[[Any], Future],
                 end_time: float | None, chunked: bool, bar: Any = None) -> Iterator[Any]:
        # No name in this frame holds a result (or its Future) across a `yield`: once the caller drops a result,
        # it is freed, as with ProcessPoolExecutor. Big results are memory the caller must be able to let go.

        def take() -> Any:
            """The next result, after queueing the next input's task (buffersize); a Future that failed or
            timed out is cancelled, so that its task does not run for nothing."""
            nonlocal more
            future = futures.popleft()
            try:
                value = future.result(None if end_time is None else end_time - time.monotonic())
            except BaseException:
                future.cancel()
                raise
            if more is not None:
                if self._shutdown:
                    # No new task after shutdown: yield what is in flight, then say why it stops.
                    more = None
                    futures.append(_failed(RuntimeError("cannot schedule new futures after shutdown")))
                else:
                    item = next(more, _END)
                    if item is _END:
                        more = None
                    else:
                        futures.append(make(item))
            return value

        try:
            while futures:
                if not chunked:
                    yield take()
                    continue
                chunk = take()
                error = None
                if isinstance(chunk, PartialChunk):
                    chunk, error = chunk.values, chunk.error
                if type(chunk) is not list:
                    chunk = list(chunk)
                chunk.reverse()  # (popped one by one: a yielded item stays only with the caller)
                while chunk:
                    yield chunk.pop()
                if error is not None:
                    raise error
        finally:
            _cancel_all(futures)
            if bar is not None:
                from .progress import finish

                finish(bar)

    # ------------------------------------------------------------------------------------------ shutdown

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._shutdown_lock:
            self._shutdown = True
        if cancel_futures:
            _cancel_all(self._conn.pending_futures())
        if wait:
            self._conn.wait_idle()
            self._conn.close()
            if self._local is not None:
                self._local.stop()
        else:
            _close_when_idle(self._conn)
        self._closed()

    def _closed(self) -> None:
        self._finalizer.detach()
        _open_executors.discard(self)
        names, self._by_value = self._by_value, []
        S.stop_by_value(names)

    def __exit__(self, exc_type: Any, exc_val: Any, exc_tb: Any) -> bool:
        """``shutdown(wait=True)``, as `Executor.__exit__`, with Ctrl-C made plain.

        After a first Ctrl-C (in the body, or while this waits) it says on stderr how many tasks it waits for;
        a second one stops them. Either way the program then ends with one KeyboardInterrupt, the first."""
        interrupt = exc_val if isinstance(exc_val, KeyboardInterrupt) else None
        told = False
        while True:
            try:
                if interrupt is not None and not told:
                    told = True
                    self._say_waiting()
                self.shutdown(wait=True)
                break
            except KeyboardInterrupt as e:
                if interrupt is None:
                    interrupt = e
                    continue
                self._stop_now()
                break
        if interrupt is None or interrupt is exc_val:
            return False  # (the body's own exception, if any, goes on)
        raise interrupt

    def _say_waiting(self) -> None:
        pending = self._conn.pending_futures()
        if not pending:
            return
        running = sum(1 for f in pending if f.running())
        print(f"clusterexec: waiting for {_tasks(len(pending))} to finish ({running} running, "
              f"{len(pending) - running} queued); press Ctrl-C again to stop them", file=sys.stderr, flush=True)

    def _stop_now(self) -> None:
        """The second Ctrl-C: leave at once. Closing the connection stops every task of this executor: the
        master drops the tasks of a client that left, and a node kills those of them that run (local mode
        stops its whole cluster). Pending Futures fail with ClusterUnavailable."""
        with self._shutdown_lock:
            self._shutdown = True
        self._conn.close()
        if self._local is not None:
            self._local.stop()
        self._closed()

    # ------------------------------------------------------------------------------------------ misc

    def cluster_info(self) -> dict[str, Any]:
        """What the master knows: ``workers`` (host, pid, nprocs, busy, done, raised, lost, python), ``clients``
        (queued, running, pending, done), ``queued`` and ``procs``. The counterpart of minimalcluster's
        ``list_workers()``."""
        return self._conn.status()

    def __repr__(self) -> str:
        mode = "local" if self._local is not None else "remote"
        return f"<ClusterExecutor {self.address} ({mode}), max_workers={self._max_workers}>"


class TaskOptions:
    """`ClusterExecutor.options(...)`: submit and map with per-call task options (time limit, retries)."""

    def __init__(self, executor: ClusterExecutor, opts: dict[str, Any]):
        self._executor = executor
        self._opts = opts

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        return self._executor._submit(fn, args, kwargs, self._opts)

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any], timeout: float | None = None,
            chunksize: int = 1, buffersize: int | None = None, progress: bool = False) -> Iterator[Any]:
        return self._executor._map(fn, iterables, timeout, chunksize, buffersize, self._opts, progress)

    def options(self, *, timeout: float | None = None, retries: int | None = None) -> TaskOptions:
        return TaskOptions(self._executor, {**self._opts, **_task_options(timeout, retries)})


def _task_options(timeout: float | None, retries: int | None) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    if timeout is not None:
        if not isinstance(timeout, int | float) or isinstance(timeout, bool) or not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")
        opts["timeout"] = float(timeout)
    if retries is not None:
        if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
            raise ValueError(f"retries must be an integer >= 0, not {retries!r}")
        opts["retries"] = retries
    return opts


_END = object()
_MAP_BATCH = 256  # map's items queued with one call to the connection (one lock, one wake-up of its thread)
_MAP_BATCH_WAIT = 0.001  # seconds
_CONTAINERS = frozenset({list, tuple, range, dict, set, frozenset, str, bytes, bytearray})
_open_executors: weakref.WeakSet[ClusterExecutor] = weakref.WeakSet()


def _progress_bar(iterables: tuple, name: str) -> Any:
    from . import progress

    try:
        total: int | None = min(len(it) for it in iterables) if iterables else 0
    except TypeError:
        total = None  # a generator: the bar counts without a total
    return progress.start(total, name)


# Connections that close once their tasks are done (shutdown(wait=False), a garbage-collected executor). The
# program's exit waits for them, so what was submitted still runs and its output still shows.
_draining: set[ClientConnection] = set()


def _close_when_idle(conn: ClientConnection) -> None:
    _draining.add(conn)
    conn.close(wait_idle=True)
    if conn.broken is not None:  # (closed already: its on_close callbacks have run)
        _draining.discard(conn)


@atexit.register
def _shutdown_at_exit() -> None:
    for executor in list(_open_executors):
        if not executor._shutdown:
            executor.shutdown(wait=True)
    for conn in list(_draining):
        conn.wait_idle()
        conn.close()


def _default_name() -> str:
    return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"


def _tasks(n: int) -> str:
    return f"{n} task" if n == 1 else f"{n} tasks"


def _failed(error: BaseException) -> Future:
    future: Future = ClusterFuture()
    future.set_exception(error)
    return future


def _cancel_all(futures: Iterable[Future]) -> None:
    """Cancel many Futures with one request per connection instead of one round trip each."""
    by_conn: dict[Any, list[Any]] = {}
    for f in futures:
        record = getattr(f, "_cx_record", None)
        if record is None:
            f.cancel()
        elif not f.done():
            by_conn.setdefault(record.conn, []).append(record)
    for conn, records in by_conn.items():
        for record, ok in zip(records, conn.cancel(records), strict=True):
            if ok and Future.cancel(record.future):
                record.future._notify_cancelled()


def _advance(bar: Any, n: int, _: Future) -> None:
    bar.update(n)


def _remove_segments(markers: list[Any], prefix: str, future: Future) -> None:
    """A task is over: its argument segments go. Those read into a copy may be written again (shm.py) once a
    task process is surely done reading them: when the task came back with its result or its own exception,
    not when a kill, a lost worker or a cancel ended it."""
    if not future.cancelled() and not isinstance(future.exception(), ClusterError):
        shm.recycle(markers, prefix)
    else:
        shm.remove(markers, prefix)


def _item_chunks(source: Iterable[Any], n: int) -> Iterator[Any]:
    """Chunks of one iterable's items. A range, list or tuple is sliced: a chunk of `range(10**6)` travels
    as a small range, not as 10,000 pickled ints."""
    if type(source) in (range, list, tuple):
        return (source[i : i + n] for i in range(0, len(source), n))
    return _batched(iter(source), n)


def _batched(iterator: Iterator[Any], n: int) -> Iterator[list[Any]]:
    while chunk := list(itertools.islice(iterator, n)):
        yield chunk

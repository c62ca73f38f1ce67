"""Pickling for the two ends that run user code: the client and the task processes.

    client                                        task process
    fn ──cloudpickle──▶ function blob (by hash) ──▶ cached unpickled fn
    (args, kwargs) ──pickle 5──▶ [main, oob…] ───▶ args, kwargs
    value / exception ◀──────── [main, oob…] ◀─── pickle 5 of the result, or of (exception)

Large buffers (bytes, NumPy arrays) ride as pickle protocol 5 out-of-band buffers: separate frame buffers
that master and agent forward without looking inside. Every failure says which phase failed.

A function sent by value (defined in `__main__` or a notebook, a lambda, a closure) keeps its file name, and
its blob carries the source lines of its code after the pickle itself (`_SourcePickler`): a traceback from
a task shows the file, the line and its text, as a local run would, even where the file does not exist.
Every function blob also carries the client's multiprocessing authkey, which the task process uses while it
serves that client (see `blob_extras`).
"""

from __future__ import annotations

import contextlib
import copyreg
import importlib
import io
import linecache
import multiprocessing
import os
import pickle
import socket
import struct
import sys
import threading
import traceback
import types
import weakref
from collections.abc import Collection, Iterator
from typing import Any

import cloudpickle

from . import memory
from .errors import RemoteError, SerializationError, serialization_error
from .protocol import Blob, blob_hash

PROTOCOL = 5
# Out-of-band only pays off for large buffers; small ones stay inline in the main pickle.
_OOB_MIN = 64 * 1024


def dumps(obj: Any, phase: str) -> list[Any]:
    """Pickle `obj` into [main, *out-of-band buffers]; raises SerializationError naming the phase."""
    if _plain(obj):
        # The C pickler alone: cloudpickle makes a Pickler, a BytesIO and a closure per call, for the same bytes.
        try:
            return [pickle.dumps(obj, protocol=PROTOCOL)]
        except (Exception, SystemExit) as e:
            raise failed(e, phase) from e
    oob: list[Any] = []
    wrapped: set[int] = set()  # ids of the `bytes` that _OutOfBandBytes carries

    def callback(buf: pickle.PickleBuffer) -> bool:
        raw = buf.raw()
        if raw.nbytes < _OOB_MIN:
            return True  # serialize in band
        # A `bytes` that unpickles as a `bytes` travels as itself: that tells shared memory (shm.py) that
        # the receiver copies it out.
        whole = raw.obj
        oob.append(whole if type(whole) is bytes and id(whole) in wrapped else raw)
        return False

    try:
        main = cloudpickle.dumps(_big_bytes_out_of_band(obj, 3, wrapped), protocol=PROTOCOL,
                                 buffer_callback=callback)
    except (Exception, SystemExit) as e:  # a __reduce__ calling sys.exit() is a pickling failure too
        raise failed(e, phase) from e
    return [main, *oob]


def failed(e: BaseException, phase: str, hint: str = "") -> SerializationError:
    """The SerializationError for `e`, raised by pickle or by user code while `phase`: also an instance of
    `e`'s class, so that code written for ProcessPoolExecutor (``except pickle.PicklingError:``) catches it."""
    hint = hint or _inherited_only_hint(e)
    return serialization_error(f"error {phase}: {type(e).__name__}: {e}{'. ' + hint if hint else ''}",
                               phase=phase, original=e)


_ATOMS = frozenset({type(None), bool, int, float, str})
_PLAIN_BUDGET = 64  # items walked at most: a longer argument or result is not worth a walk per call


def _plain(obj: Any) -> bool:
    """Whether `obj` is small plain data (None, bool, int, float, str, small bytes, and tuples, lists and
    dicts of those), which the C pickler pickles exactly as cloudpickle does. Exact types only: a subclass
    may live in `__main__`, which only cloudpickle sends by value."""
    stack = [obj]
    budget = _PLAIN_BUDGET
    while stack:
        x = stack.pop()
        kind = type(x)
        if kind in _ATOMS:
            continue
        if kind is tuple or kind is list:
            budget -= len(x)
            if budget < 0:
                return False
            stack.extend(x)
        elif kind is dict:
            budget -= 2 * len(x)
            if budget < 0:
                return False
            stack.extend(x.keys())
            stack.extend(x.values())
        elif kind is bytes:
            if len(x) >= _OOB_MIN:  # goes out of band: see _big_bytes_out_of_band
                return False
        else:
            return False
    return True


class _OutOfBandBytes:
    """Pickles a large `bytes` as an out-of-band buffer (pickle copies `bytes` into its stream otherwise),
    and unpickles as the same `bytes` (see `_bytes_from`)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes):
        self.data = data

    def __reduce_ex__(self, protocol: int) -> Any:
        return _bytes_from, (pickle.PickleBuffer(self.data),)


def _bytes_from(buffer: Any) -> bytes:
    """A large `bytes` from its out-of-band buffer: the buffer itself when it already is one (read whole from
    shared memory), else a copy in memory that is quick to fill."""
    return buffer if type(buffer) is bytes else memory.bytes_from(buffer)


def _big_bytes_out_of_band(obj: Any, depth: int, wrapped: set[int]) -> Any:
    """`obj` with the large `bytes` near its top (an argument, an item of `map`, a result) wrapped to travel
    out of band, their ids added to `wrapped`; everything else untouched."""
    kind = type(obj)
    if kind is bytes:
        if len(obj) < _OOB_MIN:
            return obj
        wrapped.add(id(obj))
        return _OutOfBandBytes(obj)
    if depth <= 0:
        return obj
    if kind is tuple or kind is list:
        if len(obj) > 8:  # a chunk of map items, a list of results: not worth a walk per item
            return obj
        items = [_big_bytes_out_of_band(item, depth - 1, wrapped) for item in obj]
        return kind(items) if any(a is not b for a, b in zip(items, obj, strict=True)) else obj
    if kind is dict and 0 < len(obj) <= 8:
        out = {k: _big_bytes_out_of_band(v, depth - 1, wrapped) for k, v in obj.items()}
        return out if any(out[k] is not v for k, v in obj.items()) else obj
    return obj


def loads(buffers: list[Any], phase: str, sent: Collection[str] = ()) -> Any:
    try:
        return pickle.loads(buffers[0], buffers=buffers[1:])
    except (Exception, SystemExit) as e:
        raise failed(e, phase, missing_module_hint(e, sent)) from e


def _inherited_only_hint(exc: BaseException) -> str:
    """For multiprocessing's Queue, Lock, Event, Value...: why they cannot travel, and what can."""
    text = str(exc)
    if not isinstance(exc, RuntimeError) or "should only be shared between processes through inheritance" not in text:
        return ""
    what = text.split(" objects should", 1)[0] or "such"
    return (f"A multiprocessing {what} object lives in a pipe or a semaphore that only the processes started "
            "after it (its children) share, and clusterexec's task processes are not this program's children. "
            "Use a Manager's instead, which any process that can reach the manager may use: "
            "manager = multiprocessing.Manager(), then manager.Queue(), manager.Lock(), manager.Event(), "
            "manager.Value()... (for the logging cookbook's QueueHandler, give manager.Queue() in initargs)")


def missing_module_hint(exc: BaseException, sent: Collection[str] = ()) -> str:
    """For a module missing where a task runs: which one, and how to send it along. `sent`: the modules the
    task's executor already sends by value (``modules=``), which only an import statement can miss."""
    if not isinstance(exc, ModuleNotFoundError) or not exc.name:
        return ""
    top = exc.name.partition(".")[0]
    where = f"this worker ({socket.gethostname()})"
    given = next((m for m in sent if exc.name == m or exc.name.startswith(m + ".")), None)
    if given is not None:
        return (f"The module {exc.name!r} is not installed on {where}. It is sent with the tasks "
                f"(modules=[{given}]), which carries the functions and classes they use, not the module itself: "
                f"an import statement run in a task still needs it installed. Install it there, or use it "
                f"through the functions you pass instead of importing it in the task")
    return (f"The module {exc.name!r} is not installed on {where}: install it there, or send it with the "
            f"tasks: ClusterExecutor(..., modules=[{top}])")


_by_value: dict[str, int] = {}  # module name → executors that asked for it to be pickled by value


def send_by_value(modules: Any) -> list[str]:
    """Have cloudpickle pickle these modules' functions and classes by value, so workers need no copy of
    them. Accepts modules or their names; returns the names, for `stop_by_value`."""
    names = []
    for module in modules:
        if isinstance(module, str):
            module = importlib.import_module(module)
        if not isinstance(module, types.ModuleType):
            raise TypeError(f"modules= takes modules or module names, not {type(module).__name__}")
        if _by_value.get(module.__name__, 0) == 0:
            if module.__name__ in cloudpickle.list_registry_pickle_by_value():
                continue  # registered by the user: theirs to keep
            cloudpickle.register_pickle_by_value(module)
            _by_reference.clear()
        _by_value[module.__name__] = _by_value.get(module.__name__, 0) + 1
        names.append(module.__name__)
    return names


def stop_by_value(names: list[str]) -> None:
    for name in names:
        left = _by_value.get(name, 0) - 1
        if left > 0:
            _by_value[name] = left
            continue
        _by_value.pop(name, None)
        module = sys.modules.get(name)
        if module is not None:
            try:
                cloudpickle.unregister_pickle_by_value(module)
            except ValueError:
                pass
            _by_reference.clear()


# Blobs of functions cloudpickle pickles by reference: (module, qualname) → (the function, its blob). Such a
# pickle holds nothing but the two names, so it cannot go stale; functions pickled by value (lambdas,
# closures, `__main__`, modules sent by value) are never cached, as what they capture may change.
_by_reference: dict[tuple[Any, Any], tuple[Any, Blob]] = {}
_BY_REFERENCE_MAX = 1024
_should_pickle_by_reference = getattr(cloudpickle.cloudpickle, "_should_pickle_by_reference", None)
_lookup_module_and_qualname = getattr(cloudpickle.cloudpickle, "_lookup_module_and_qualname", None)
_FUNCTION_TYPES = (types.FunctionType, types.BuiltinFunctionType)


def _pickled_by_reference(fn: Any) -> bool:
    """Whether cloudpickle pickles `fn` by reference now (the registry of modules sent by value, or the module's
    attribute, may have changed since the last call): asked of cloudpickle itself, so both always agree."""
    kind = type(fn)
    if kind is types.FunctionType:
        return _should_pickle_by_reference is not None and _should_pickle_by_reference(fn)
    if kind is types.BuiltinFunctionType:  # cloudpickle leaves these to pickle: by reference when found there
        return (isinstance(fn.__self__, types.ModuleType) and _lookup_module_and_qualname is not None
                and _lookup_module_and_qualname(fn) is not None)
    return False


def function_blob(fn: Any, phase: str = "pickling the function") -> Blob:
    """Pickle a callable by value where needed (lambdas, closures); identical content gives the same hash.

    The blob also carries this process's multiprocessing authkey (see `blob_extras`)."""
    key = None
    authkey = multiprocessing.current_process().authkey  # (the same object until someone sets another)
    if type(fn) in _FUNCTION_TYPES and isinstance(getattr(fn, "__module__", None), str):
        key = (fn.__module__, getattr(fn, "__qualname__", None))
        hit = _by_reference.get(key)
        if hit is not None and hit[0] is fn and hit[2] is authkey and _pickled_by_reference(fn):
            return hit[1]
        if not _pickled_by_reference(fn):
            key = None
    try:
        data = _dumps_with_extras(fn, bytes(authkey))
    except (Exception, SystemExit) as e:
        raise failed(e, phase) from e
    blob = Blob(blob_hash(data), data)
    if key is not None and _pickled_by_reference(fn):  # (by reference before and after: so were these bytes)
        if len(_by_reference) >= _BY_REFERENCE_MAX:
            _by_reference.clear()
        _by_reference[key] = (fn, blob, authkey)
    return blob


# ------------------------------------------------------------------------------- what travels with a function
# A function blob is [the function's pickle][pickle of its extras][their length, 4 bytes][magic]. pickle.loads
# stops at the end of the first pickle, so a reader that knows nothing of the rest still works. The extras:
#   "sources"  {file name: {line number: line}}: the lines of the code pickled by value, for tracebacks;
#   "authkey"  the client's multiprocessing authkey: a task process uses it as its own before it unpickles the
#              client's function or arguments, as ProcessPoolExecutor's children inherit their parent's, so
#              that multiprocessing.Manager() proxies connect back to their manager.

_EXTRAS_MAGIC = b"CXext1\n"
_EXTRAS_TAIL = struct.Struct("<I")
_DYNAMIC_CODE = "<dynamic-code>"  # the file name cloudpickle gives every code object it pickles
_code_reduce = getattr(cloudpickle.cloudpickle, "_code_reduce", None)
# Source lines noted per code object, by id (a lambda submitted in a loop is pickled again at each submit):
# id → (a weak reference to it, its file name, its lines).
_snippets: dict[int, tuple[Any, str, dict[int, str]]] = {}
_SNIPPETS_MAX = 4096
Sources = dict[str, dict[int, str]]


class _SourcePickler(cloudpickle.Pickler):
    """cloudpickle's Pickler, except that each code object it pickles by value keeps its file name and has its
    source lines noted in `sources`."""

    def __init__(self, file: Any) -> None:
        # (The C pickler reads the table once, when it is initialized: set it first.)
        self.dispatch_table = _source_dispatch_table()
        super().__init__(file, protocol=PROTOCOL)


_collected = threading.local()  # .sources: what the _SourcePickler at work in this thread has noted
_table: tuple[dict[Any, Any], dict[Any, Any]] | None = None  # (copyreg's table as it was, ours made from it)


def _source_dispatch_table() -> dict[Any, Any]:
    """cloudpickle's reducers, with ours for code objects, in one plain dict: the C pickler looks a plain dict
    up without calling back into Python (cloudpickle's own table is a ChainMap). Made again when someone has
    registered a reducer with copyreg since."""
    global _table
    if _table is None or _table[0] != copyreg.dispatch_table:
        table = dict(copyreg.dispatch_table)
        table.update(cloudpickle.Pickler._dispatch_table)
        table[types.CodeType] = _reduce_code
        _table = (dict(copyreg.dispatch_table), table)
    return _table[1]


def _filename_index() -> int | None:
    """Where cloudpickle puts the file name among the arguments that rebuild a code object."""
    if _code_reduce is None:
        return None
    args = _code_reduce(_filename_index.__code__)[1]
    found = [i for i, a in enumerate(args) if type(a) is str and a == _DYNAMIC_CODE]
    return found[0] if len(found) == 1 else None


_FILENAME_AT = _filename_index()


def _reduce_code(code: types.CodeType) -> Any:
    rebuild, args = _code_reduce(code)
    filename = code.co_filename
    args = (*args[:_FILENAME_AT], filename, *args[_FILENAME_AT + 1:])
    noted = _snippets.get(id(code))
    if noted is None or noted[0]() is not code or noted[1] != filename:
        if len(_snippets) >= _SNIPPETS_MAX:
            _snippets.clear()
        noted = _snippets[id(code)] = (weakref.ref(code), filename, _source_of(code))
    sources = getattr(_collected, "sources", None)
    if noted[2] and sources is not None:
        sources.setdefault(filename, {}).update(noted[2])
    return rebuild, args


def _source_of(code: types.CodeType) -> dict[int, str]:
    """The lines of `code` in its file, as this process's linecache has them (IPython puts cells there)."""
    lines = linecache.getlines(code.co_filename)
    if not lines:
        return {}
    first = code.co_firstlineno
    numbers = [line for _, _, line in code.co_lines() if line is not None]
    last = min(max(numbers, default=first), len(lines))
    return {n: lines[n - 1] for n in range(max(first, 1), last + 1)}


def _dumps_with_extras(fn: Any, authkey: bytes) -> bytes:
    file = io.BytesIO()
    extras: dict[str, Any] = {"authkey": authkey}
    if _FILENAME_AT is None:  # (a cloudpickle that makes code objects otherwise: its file names, then)
        cloudpickle.Pickler(file, protocol=PROTOCOL).dump(fn)
    else:
        outer = getattr(_collected, "sources", None)  # (a __reduce__ that pickles a function itself)
        _collected.sources = sources = {}
        try:
            _SourcePickler(file).dump(fn)
        finally:
            _collected.sources = outer
        if sources:
            extras["sources"] = sources
    start = file.tell()
    pickle.dump(extras, file, protocol=PROTOCOL)
    file.write(_EXTRAS_TAIL.pack(file.tell() - start))
    file.write(_EXTRAS_MAGIC)
    return file.getvalue()


def blob_extras(data: Any) -> dict[str, Any]:
    """What a function blob carries after the function's pickle: {"sources": ..., "authkey": ...}, or {}."""
    view = memoryview(data)
    tail = len(_EXTRAS_MAGIC) + _EXTRAS_TAIL.size
    if len(view) < tail or view[-len(_EXTRAS_MAGIC):] != _EXTRAS_MAGIC:
        return {}
    (size,) = _EXTRAS_TAIL.unpack(view[-tail:-len(_EXTRAS_MAGIC)])
    try:
        extras = pickle.loads(view[-tail - size:-tail])
    except Exception:  # noqa: BLE001 - the function itself will say what is wrong with the blob
        return {}
    return extras if isinstance(extras, dict) else {}


@contextlib.contextmanager
def _shown(sources: Sources | None) -> Iterator[None]:
    """While formatting a traceback: linecache gives the lines of `sources` for their files, over what the
    file on this machine (if any) has, so that the text shown is that of the code that ran."""
    if not sources:
        yield
        return
    saved = {}
    try:
        for filename, numbered in sources.items():
            if not isinstance(filename, str) or not isinstance(numbered, dict) or not numbered:
                continue
            saved[filename] = linecache.cache.get(filename)
            lines = list(linecache.getlines(filename))
            last = max(numbered)
            if len(lines) < last:
                lines.extend(["\n"] * (last - len(lines)))
            for n, line in numbered.items():
                lines[n - 1] = line
            # (No modification time: linecache.checkcache leaves such an entry alone.)
            linecache.cache[filename] = (sum(map(len, lines)), None, lines, filename)
        yield
    finally:
        for filename, entry in saved.items():
            if entry is None:
                linecache.cache.pop(filename, None)
            else:
                linecache.cache[filename] = entry


_RUNNER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "task_process.py")


def _user_frames(tb: types.TracebackType | None) -> types.TracebackType | None:
    """`tb` without its first frames, those of clusterexec's task runner: the user's code comes first."""
    while tb is not None and tb.tb_frame.f_code.co_filename == _RUNNER:
        tb = tb.tb_next
    return tb


task_sources: Sources | None = None  # in a task process: those of the function that runs now


class RemoteTraceback(Exception):
    """Attached as `__cause__` of an exception raised in a task: the traceback text from the worker."""

    def __init__(self, tb: str):
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


def exception_info(exc: BaseException) -> dict[str, str]:
    with _shown(task_sources):
        tb = "".join(traceback.format_exception(type(exc), exc, _user_frames(exc.__traceback__)))
    try:
        message = str(exc)
    except Exception:
        message = "<str() of the exception failed>"
    return {"type": f"{type(exc).__module__}.{type(exc).__qualname__}", "message": message, "traceback": tb}


def dumps_exception(exc: BaseException) -> tuple[list[Any], dict[str, Any]]:
    """Pickle an exception raised by user code. When it cannot be pickled, what travels instead is a
    SerializationError (and RemoteError) of the pickling error's class that describes it, or failing that
    only its description (`info`)."""
    info: dict[str, Any] = exception_info(exc)
    tb, exc.__traceback__ = exc.__traceback__, None
    try:
        return dumps(exc, "pickling the exception"), info
    except SerializationError as e:
        info["pickle_error"] = str(e)
        try:
            return dumps(_not_sent(info, e.__cause__), "pickling the exception"), info
        except SerializationError:
            return [], info
    finally:
        exc.__traceback__ = tb


def _not_sent(info: dict[str, Any], error: BaseException | None) -> SerializationError:
    """The error that stands for a task's exception that could not be pickled (`error` says why)."""
    return serialization_error(
        f"task raised {info.get('type')}: {info.get('message')} "
        f"(the exception could not be pickled: {info.get('pickle_error')})",
        phase="pickling the exception", original=error, remote=_remote(info))


def _remote(info: dict[str, Any]) -> dict[str, str]:
    return {"type_name": info.get("type", ""), "remote_message": info.get("message", ""),
            "traceback": info.get("traceback", "")}


def rebuild_exception(buffers: list[Any], info: dict[str, Any]) -> BaseException:
    """The exception to raise in the caller, with the remote traceback as its cause."""
    tb = info.get("traceback", "")
    if "pickle_error" in info:  # what travels is the SerializationError that says so (see dumps_exception)
        if buffers:
            try:
                exc = loads(buffers, "unpickling the exception")
            except SerializationError:
                pass
            else:
                if isinstance(exc, RemoteError):
                    return exc
        return _not_sent(info, None)
    if buffers:
        try:
            exc = loads(buffers, "unpickling the exception")
        except SerializationError as e:
            return serialization_error(
                f"task raised {info.get('type')}: {info.get('message')} "
                f"(the exception could not be unpickled here: {e})",
                phase="unpickling the exception", original=e.__cause__, remote=_remote(info))
        if isinstance(exc, BaseException):
            exc.__cause__ = RemoteTraceback(tb)
            return exc
        return RemoteError(f"task raised a non-exception object of type {type(exc).__name__}", traceback=tb)
    return _not_sent(info, None)  # (from an older worker)

"""Pickling for the two ends that run user code: the client and the task processes.

    client                                        task process
    fn ──cloudpickle──▶ function blob (by hash) ──▶ cached unpickled fn
    (args, kwargs) ──pickle 5──▶ [main, oob…] ───▶ args, kwargs
    value / exception ◀──────── [main, oob…] ◀─── pickle 5 of the result, or of (exception)

Large buffers (bytes, NumPy arrays) ride as pickle protocol 5 out-of-band buffers: separate frame buffers
that master and agent forward without looking inside. Every failure says which phase failed.
"""

from __future__ import annotations

import importlib
import pickle
import socket
import sys
import traceback
import types
from collections.abc import Collection
from typing import Any

import cloudpickle

from . import memory
from .errors import RemoteError, SerializationError
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
            raise SerializationError(f"error {phase}: {type(e).__name__}: {e}", phase=phase) from e
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
        raise SerializationError(f"error {phase}: {type(e).__name__}: {e}", phase=phase) from e
    return [main, *oob]


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
        hint = missing_module_hint(e, sent)
        raise SerializationError(f"error {phase}: {type(e).__name__}: {e}{'. ' + hint if hint else ''}",
                                 phase=phase) from e


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
    """Pickle a callable by value where needed (lambdas, closures); identical content gives the same hash."""
    key = None
    if type(fn) in _FUNCTION_TYPES and isinstance(getattr(fn, "__module__", None), str):
        key = (fn.__module__, getattr(fn, "__qualname__", None))
        hit = _by_reference.get(key)
        if hit is not None and hit[0] is fn and _pickled_by_reference(fn):
            return hit[1]
        if not _pickled_by_reference(fn):
            key = None
    try:
        data = cloudpickle.dumps(fn, protocol=PROTOCOL)
    except (Exception, SystemExit) as e:
        raise SerializationError(f"error {phase}: {type(e).__name__}: {e}", phase=phase) from e
    blob = Blob(blob_hash(data), data)
    if key is not None and _pickled_by_reference(fn):  # (by reference before and after: so were these bytes)
        if len(_by_reference) >= _BY_REFERENCE_MAX:
            _by_reference.clear()
        _by_reference[key] = (fn, blob)
    return blob


class RemoteTraceback(Exception):
    """Attached as `__cause__` of an exception raised in a task: the traceback text from the worker."""

    def __init__(self, tb: str):
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


def exception_info(exc: BaseException) -> dict[str, str]:
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        message = str(exc)
    except Exception:
        message = "<str() of the exception failed>"
    return {"type": f"{type(exc).__module__}.{type(exc).__qualname__}", "message": message, "traceback": tb}


def dumps_exception(exc: BaseException) -> tuple[list[Any], dict[str, Any]]:
    """Pickle an exception raised by user code; when it cannot be pickled, only its description travels."""
    info: dict[str, Any] = exception_info(exc)
    tb, exc.__traceback__ = exc.__traceback__, None
    try:
        return dumps(exc, "pickling the exception"), info
    except SerializationError as e:
        info["pickle_error"] = str(e)
        return [], info
    finally:
        exc.__traceback__ = tb


def rebuild_exception(buffers: list[Any], info: dict[str, Any]) -> BaseException:
    """The exception to raise in the caller, with the remote traceback as its cause."""
    tb = info.get("traceback", "")
    if buffers:
        try:
            exc = loads(buffers, "unpickling the exception")
        except SerializationError as e:
            exc = RemoteError(
                f"task raised {info.get('type')}: {info.get('message')} "
                f"(the exception could not be unpickled here: {e})",
                type_name=info.get("type", ""), remote_message=info.get("message", ""), traceback=tb)
        else:
            if isinstance(exc, BaseException):
                exc.__cause__ = RemoteTraceback(tb)
                return exc
            exc = RemoteError(f"task raised a non-exception object of type {type(exc).__name__}", traceback=tb)
    else:
        exc = RemoteError(
            f"task raised {info.get('type')}: {info.get('message')} "
            f"(the exception could not be pickled: {info.get('pickle_error')})",
            type_name=info.get("type", ""), remote_message=info.get("message", ""), traceback=tb)
    return exc

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
from typing import Any

import cloudpickle

from .errors import RemoteError, SerializationError
from .protocol import Blob, blob_hash

PROTOCOL = 5
# Out-of-band only pays off for large buffers; small ones stay inline in the main pickle.
_OOB_MIN = 64 * 1024


def dumps(obj: Any, phase: str) -> list[Any]:
    """Pickle `obj` into [main, *out-of-band buffers]; raises SerializationError naming the phase."""
    oob: list[Any] = []

    def callback(buf: pickle.PickleBuffer) -> bool:
        raw = buf.raw()
        if raw.nbytes < _OOB_MIN:
            return True  # serialize in band
        oob.append(raw)
        return False

    try:
        main = cloudpickle.dumps(_big_bytes_out_of_band(obj, 3), protocol=PROTOCOL, buffer_callback=callback)
    except (Exception, SystemExit) as e:  # a __reduce__ calling sys.exit() is a pickling failure too
        raise SerializationError(f"error {phase}: {type(e).__name__}: {e}", phase=phase) from e
    return [main, *oob]


class _OutOfBandBytes:
    """Pickles a large `bytes` as an out-of-band buffer (pickle copies `bytes` into its stream otherwise),
    and unpickles as the same `bytes`."""

    __slots__ = ("data",)

    def __init__(self, data: bytes):
        self.data = data

    def __reduce_ex__(self, protocol: int) -> Any:
        return bytes, (pickle.PickleBuffer(self.data),)


def _big_bytes_out_of_band(obj: Any, depth: int) -> Any:
    """`obj` with the large `bytes` near its top (an argument, an item of `map`, a result) wrapped to travel
    out of band; everything else untouched."""
    kind = type(obj)
    if kind is bytes:
        return _OutOfBandBytes(obj) if len(obj) >= _OOB_MIN else obj
    if depth <= 0:
        return obj
    if kind is tuple or kind is list:
        if len(obj) > 8:  # a chunk of map items, a list of results: not worth a walk per item
            return obj
        items = [_big_bytes_out_of_band(item, depth - 1) for item in obj]
        return kind(items) if any(a is not b for a, b in zip(items, obj, strict=True)) else obj
    if kind is dict and 0 < len(obj) <= 8:
        wrapped = {k: _big_bytes_out_of_band(v, depth - 1) for k, v in obj.items()}
        return wrapped if any(wrapped[k] is not v for k, v in obj.items()) else obj
    return obj


def loads(buffers: list[Any], phase: str) -> Any:
    try:
        return pickle.loads(buffers[0], buffers=buffers[1:])
    except (Exception, SystemExit) as e:
        hint = missing_module_hint(e)
        raise SerializationError(f"error {phase}: {type(e).__name__}: {e}{'. ' + hint if hint else ''}",
                                 phase=phase) from e


def missing_module_hint(exc: BaseException) -> str:
    """For a module missing where a task runs: which one, and how to send it along."""
    if not isinstance(exc, ModuleNotFoundError) or not exc.name:
        return ""
    top = exc.name.partition(".")[0]
    return (f"The module {exc.name!r} is not installed on this worker ({socket.gethostname()}): install it "
            f"there, or send it with the tasks: ClusterExecutor(..., modules=[{top}])")


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


def function_blob(fn: Any, phase: str = "pickling the function") -> Blob:
    """Pickle a callable by value where needed (lambdas, closures); identical content gives the same hash."""
    try:
        data = cloudpickle.dumps(fn, protocol=PROTOCOL)
    except (Exception, SystemExit) as e:
        raise SerializationError(f"error {phase}: {type(e).__name__}: {e}", phase=phase) from e
    return Blob(blob_hash(data), data)


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

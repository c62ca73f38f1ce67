"""Exceptions a clusterexec user may catch.

They subclass what `concurrent.futures` code already catches, so a program written for
`ProcessPoolExecutor` handles cluster failures without changes.
"""

from __future__ import annotations

from concurrent.futures import BrokenExecutor, CancelledError
from concurrent.futures.process import BrokenProcessPool
from typing import Any

__all__ = [
    "AuthenticationError",
    "ClusterError",
    "ClusterUnavailable",
    "ClusterWarning",
    "IncompatibleWorkers",
    "InitializerError",
    "ProtocolError",
    "RemoteError",
    "SerializationError",
    "TaskKilled",
    "TaskTimeout",
    "VersionMismatch",
    "WorkerLostError",
    "WorkersTerminated",
]


class ClusterError(Exception):
    """Base class of the errors clusterexec itself raises."""


class ProtocolError(ClusterError):
    """A peer sent bytes that are not a valid clusterexec frame (or is not a clusterexec peer at all)."""


class AuthenticationError(ClusterError, ConnectionError):
    """The other side does not share our key."""


class VersionMismatch(ClusterError, ConnectionError):
    """The other side speaks another version of the clusterexec protocol."""


class WorkerLostError(ClusterError, BrokenProcessPool):
    """The process (or whole node) running a task died, on every attempt the retry budget allowed.

    Subclasses `BrokenProcessPool`, so `except BrokenProcessPool:` written for `ProcessPoolExecutor`
    still catches it; unlike there, the executor stays usable and other tasks are unaffected.
    """

    def __init__(self, message: str, *, host: str | None = None, pid: int | None = None,
                 exitcode: int | None = None, signal: str | None = None, attempts: int = 1):
        super().__init__(message)
        self.host = host
        self.pid = pid
        self.exitcode = exitcode
        self.signal = signal
        self.attempts = attempts


class InitializerError(ClusterError, BrokenProcessPool):
    """The executor's `initializer` raised in a task process, so the task could not run there."""


class TaskTimeout(ClusterError, TimeoutError):
    """The task ran past the time limit set with `ex.options(timeout=...)`; its process was killed."""


class TaskKilled(ClusterError, CancelledError):
    """The task was stopped by `ex.kill(future)` (or `terminate_workers()`); a running one had its process
    killed. Subclasses `concurrent.futures.CancelledError`."""


class WorkersTerminated(TaskKilled, BrokenProcessPool):
    """`terminate_workers()` or `kill_workers()` stopped the task, as its process was running it.

    Also a `BrokenProcessPool`: what Python 3.14's `ProcessPoolExecutor` fails such tasks with, so
    `except BrokenProcessPool:` written for it still catches this one."""


class ClusterUnavailable(ClusterError, BrokenExecutor):
    """The master cannot be reached (or went away) and the executor cannot go on."""


class IncompatibleWorkers(ClusterError, RuntimeError):
    """No connected worker node can run the task: every one has another Python major.minor or cloudpickle
    major.minor than the client, and none with matching versions joined within `compatible_wait` seconds."""


class ClusterWarning(UserWarning):
    """Something the cluster wants the user to know that does not fail a task (say, worker nodes with other
    Python or cloudpickle versions, which will not get this client's tasks)."""


class SerializationError(ClusterError):
    """Something could not be pickled or unpickled. `phase` says which thing and where.

    Phases: ``"pickling the function"``, ``"pickling the arguments"``, ``"unpickling the function"``,
    ``"unpickling the arguments"``, ``"pickling the result"``, ``"unpickling the result"``,
    ``"pickling the exception"``, ``"unpickling the exception"``.

    The error raised is also an instance of the class of the error that pickle (or a ``__reduce__``) raised,
    as with `ProcessPoolExecutor`, so ``except pickle.PicklingError:`` or ``except TypeError:`` around
    ``result()`` keeps working; that original error is its ``__cause__`` (or, when it was raised on a worker,
    its traceback text is).
    """

    def __init__(self, message: str, *, phase: str = ""):
        super().__init__(message)
        self.phase = phase


class RemoteError(ClusterError):
    """A task raised an exception that could not travel back as itself.

    Carries the original exception's type name, message and remote traceback text.
    """

    def __init__(self, message: str, *, type_name: str = "", remote_message: str = "", traceback: str = ""):
        super().__init__(message)
        self.type_name = type_name
        self.remote_message = remote_message
        self.traceback = traceback

    def __str__(self) -> str:
        text = super().__str__()
        if self.traceback:
            text += "\n\nRemote traceback:\n" + self.traceback.rstrip()
        return text


# ------------------------------------------------------------------------------- typed serialization errors
# A SerializationError for an error of class C is an instance of a class made once per C, with bases
# (SerializationError, C), or (SerializationError, RemoteError, C) when a task's exception is what could not
# travel. Such an instance pickles as (C, message, attributes): it travels from a worker like any exception.

_typed: dict[tuple[type, bool], type] = {}
# Attributes of the original error worth keeping (SystemExit's exit code, ImportError's module name, ...):
# plain values only.
_KEPT = ("code", "name", "path", "errno", "strerror", "filename", "filename2")


def serialization_error(message: str, *, phase: str, original: BaseException | None = None,
                        remote: dict[str, str] | None = None) -> SerializationError:
    """A SerializationError that is also an instance of `original`'s class (or of the nearest class above it
    that can be combined with SerializationError), and a RemoteError when `remote` (``type_name``,
    ``remote_message``, ``traceback``) describes a task's exception that could not travel."""
    attrs = {}
    if original is not None:
        for name in _KEPT:
            value = getattr(original, name, None)
            if value is None or isinstance(value, (str, int)):
                if value is not None:
                    attrs[name] = value
    return _make_typed(type(original) if original is not None else None, remote is not None, message, phase,
                       dict(remote or {}), attrs)


def _make_typed(original: type | None, is_remote: bool, message: str, phase: str, remote: dict[str, str],
                attrs: dict[str, Any]) -> SerializationError:
    for cls in _typed_classes(original, is_remote):
        try:
            exc = cls.__new__(cls, message)
            cls.__init__(exc, message, phase=phase, **remote)
            for name, value in attrs.items():
                setattr(exc, name, value)
        except (TypeError, AttributeError, ValueError):
            continue  # a class whose constructor insists on other arguments: the next one up
        exc._cx_original = original
        exc._cx_attrs = attrs
        return exc
    raise AssertionError("unreachable: SerializationError itself always works")


def _typed_classes(original: type | None, is_remote: bool) -> list[type]:
    """The classes to try, most specific first: one per class of `original`'s MRO below Exception."""
    plain = _typed_class(None, is_remote)
    if original is None or not issubclass(original, BaseException) or issubclass(original, ClusterError):
        return [plain]
    classes = []
    for base in original.__mro__:
        if base in (Exception, BaseException, object):
            break
        cls = _typed_class(base, is_remote)
        if cls is not None:
            classes.append(cls)
    return [*classes, plain]


def _typed_class(original: type | None, is_remote: bool) -> type | None:
    key = (original, is_remote)
    cls = _typed.get(key)
    if cls is not None or key in _typed:
        return cls
    if original is None and not is_remote:
        return SerializationError
    bases: tuple[type, ...] = (SerializationError, RemoteError) if is_remote else (SerializationError,)
    name = "SerializationError"
    if original is not None:
        bases += (original,)
        name = f"SerializationError[{original.__name__}]"
    namespace = {"__module__": __name__, "__qualname__": name, "__init__": _typed_init, "__str__": _typed_str,
                 "__reduce__": _typed_reduce, "__doc__": SerializationError.__doc__}
    try:
        cls = type(name, bases, namespace)
    except TypeError:  # a class that cannot be subclassed, or whose layout conflicts with Exception's
        cls = None
    _typed[key] = cls
    return cls


def _typed_init(self: SerializationError, message: str, *, phase: str = "", type_name: str = "",
                remote_message: str = "", traceback: str = "") -> None:
    BaseException.__init__(self, message)  # not the original class's: it may want other arguments
    self.phase = phase
    if isinstance(self, RemoteError):
        self.type_name = type_name
        self.remote_message = remote_message
        self.traceback = traceback


def _typed_str(self: SerializationError) -> str:
    text = BaseException.__str__(self)
    if isinstance(self, RemoteError) and self.traceback:
        text += "\n\nRemote traceback:\n" + self.traceback.rstrip()
    return text


def _typed_reduce(self: SerializationError) -> Any:
    remote = {}
    if isinstance(self, RemoteError):
        remote = {"type_name": self.type_name, "remote_message": self.remote_message, "traceback": self.traceback}
    state = {k: v for k, v in self.__dict__.items()
             if k not in ("phase", "type_name", "remote_message", "traceback", "_cx_original", "_cx_attrs")}
    return _rebuild_typed, (self._cx_original, isinstance(self, RemoteError), str(self.args[0]) if self.args else "",
                            self.phase, remote, self._cx_attrs, state)


def _rebuild_typed(original: type | None, is_remote: bool, message: str, phase: str, remote: dict[str, str],
                   attrs: dict[str, Any], state: dict[str, Any]) -> SerializationError:
    exc = _make_typed(original, is_remote, message, phase, remote, attrs)
    exc.__dict__.update(state)
    return exc

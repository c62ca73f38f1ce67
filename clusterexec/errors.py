"""Exceptions a clusterexec user may catch.

They subclass what `concurrent.futures` code already catches, so a program written for
`ProcessPoolExecutor` handles cluster failures without changes.
"""

from __future__ import annotations

from concurrent.futures import BrokenExecutor, CancelledError
from concurrent.futures.process import BrokenProcessPool

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

"""clusterexec: a `concurrent.futures` executor whose workers run on other machines.

    from clusterexec import ClusterExecutor
    with ClusterExecutor("head-node:7070") as ex:      # or ClusterExecutor(max_workers=4) for local mode
        results = list(ex.map(simulate, parameters))
"""

from .address import DEFAULT_PORT
from .auth import MissingKeyError, TLSConfigError
from .errors import (
    AuthenticationError,
    ClusterError,
    ClusterUnavailable,
    ClusterWarning,
    IncompatibleWorkers,
    InitializerError,
    ProtocolError,
    RemoteError,
    SerializationError,
    TaskKilled,
    TaskTimeout,
    VersionMismatch,
    WorkerLostError,
    WorkersTerminated,
)
from .executor import ClusterExecutor
from .version import __version__

__all__ = [
    "DEFAULT_PORT",
    "AuthenticationError",
    "ClusterError",
    "ClusterExecutor",
    "ClusterUnavailable",
    "ClusterWarning",
    "IncompatibleWorkers",
    "InitializerError",
    "MissingKeyError",
    "ProtocolError",
    "RemoteError",
    "SerializationError",
    "TaskKilled",
    "TaskTimeout",
    "TLSConfigError",
    "VersionMismatch",
    "WorkerLostError",
    "WorkersTerminated",
    "__version__",
]

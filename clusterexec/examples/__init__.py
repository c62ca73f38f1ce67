"""Runnable examples, after minimalcluster's README: each works in local mode or against a running cluster.

    python -m clusterexec.examples.pi        estimate pi from 1,000,000 random throws, in chunks
    python -m clusterexec.examples.factor    naive factorization of the 5,000 odd numbers from 999999999999 on
    python -m clusterexec.examples.pairs     a function of two arguments fed with pairs

Every example takes the same options:

    (none)                                 local mode: a private cluster on this machine, one task process per CPU
    --workers N                            local mode with N task processes
    --address HOST[:PORT] [--authkey-file F]
                                           use a running master (`python -m clusterexec.master`); the key comes
                                           from F, else $CLUSTEREXEC_AUTHKEY, else ~/.clusterexec/authkey
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from .. import AuthenticationError, ClusterExecutor, ClusterUnavailable
from ..auth import MissingKeyError, resolve_key


def parse_args(prog: str, description: str, argv: list[str] | None = None,
               add_arguments: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """The options every example shares, plus whatever `add_arguments` adds."""
    parser = argparse.ArgumentParser(prog=f"python -m {prog}", description=description)
    where = parser.add_argument_group("where the tasks run (default: local mode, one process per CPU)")
    where.add_argument("--workers", type=int, metavar="N", help="local mode with N task processes")
    where.add_argument("--address", metavar="HOST[:PORT]",
                       help="a running master, as printed by `python -m clusterexec.master` (default port 7070)")
    where.add_argument("--authkey-file", metavar="FILE",
                       help="the cluster's key file (default: $CLUSTEREXEC_AUTHKEY, else ~/.clusterexec/authkey)")
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    if args.address is None and args.authkey_file is not None:
        parser.error("--authkey-file goes with --address (local mode makes its own key)")
    if args.address is not None and args.workers is not None:
        parser.error("--workers sets the size of local mode; with --address the cluster's workers are used")
    if args.workers is not None and args.workers < 1:
        parser.error("--workers must be at least 1")
    args.parser = parser
    return args


def open_executor(args: argparse.Namespace) -> ClusterExecutor:
    """A local-mode executor, or one connected to the master named by ``--address``."""
    if args.address is None:
        return ClusterExecutor(max_workers=args.workers)
    try:
        # The same precedence as `python -m clusterexec.worker --authkey-file F`.
        key, _ = resolve_key(None, args.authkey_file)
    except (MissingKeyError, OSError) as e:
        args.parser.exit(2, f"{args.parser.prog}: {e}\n")
    try:
        return ClusterExecutor(args.address, authkey=key)
    except (ClusterUnavailable, AuthenticationError) as e:
        args.parser.exit(1, f"{args.parser.prog}: {e}\n")


def describe(ex: ClusterExecutor, args: argparse.Namespace) -> str:
    """Where the tasks ran, for the examples' last line, from the master's own view (`cluster_info()`)."""
    info = ex.cluster_info()
    nodes = len(info["workers"])
    mode = "local mode" if args.address is None else f"the cluster at {ex.address}"
    procs = info["procs"]
    return f"{mode}, {procs} task process{'es' if procs != 1 else ''} on {nodes} worker node{'s' if nodes != 1 else ''}"

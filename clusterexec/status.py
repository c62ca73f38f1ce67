"""`python -m clusterexec.status [ADDRESS]`: what a running master knows, as a table or as JSON.

    $ python -m clusterexec.status head-node
    master head-node:7070 · clusterexec 0.1.0 · Python 3.11.7 · up 2h03m
    2 worker nodes, 16 processes (12 busy) · 1,204 queued · 215.3 tasks/s · 90,122 done

    NODE  HOST    PID   PROCS  BUSY  DONE    RAISED  LOST  PYTHON  CLOUDPICKLE  LAST HEARD
    1     node-1  4711  8      8     45,020  12      0     3.11.7  3.1.1        0.3 s ago
    ...

The same data from Python: `ClusterExecutor.cluster_info()`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from .address import DEFAULT_PORT
from .auth import MissingKeyError, add_tls_arguments, resolve_key, tls_from_arguments
from .client import fetch_status as fetch
from .errors import ClusterError


def render(info: dict[str, Any]) -> str:
    """The human-readable table."""
    workers = info.get("workers", [])
    clients = info.get("clients", [])
    procs = sum(w.get("nprocs") or 0 for w in workers)
    busy = sum(w.get("busy") or 0 for w in workers)
    lines = [
        f"master {info.get('address', '?')} · clusterexec {info.get('version', '?')} · "
        f"Python {info.get('python', '?')} · up {_duration(info.get('uptime', 0))}",
        f"{_plural(len(workers), 'worker node')}, {_plural(procs, 'process', 'processes')} ({busy} busy) · "
        f"{info.get('queued', 0):,} queued · {info.get('tasks_per_second', 0):,.1f} tasks/s · "
        f"{info.get('tasks_done', 0):,} done",
        "",
    ]
    if workers:
        # DONE: results the node sent (RAISED of them raised an exception); LOST: tasks whose process died.
        lines += _table(["NODE", "HOST", "PID", "PROCS", "BUSY", "DONE", "RAISED", "LOST", "PYTHON", "CLOUDPICKLE",
                         "LAST HEARD"],
                        [[w.get("id"), w.get("host"), w.get("pid"), w.get("nprocs"), w.get("busy"),
                          f"{w.get('done') or 0:,}", f"{w.get('raised') or 0:,}",
                          f"{w.get('lost', w.get('failed')) or 0:,}", w.get("python"),
                          w.get("cloudpickle"), _ago(w.get("last_heard"))] for w in workers])
    else:
        lines.append("no worker nodes connected (start one: python -m clusterexec.worker HOST)")
    lines.append("")
    if clients:
        lines += _table(["CLIENT", "HOST", "PID", "NAME", "QUEUED", "RUNNING", "PENDING", "DONE"],
                        [[c.get("id"), c.get("host"), c.get("pid"), c.get("name"), f"{c.get('queued') or 0:,}",
                          f"{c.get('running') or 0:,}", f"{c.get('pending') or 0:,}", f"{c.get('done') or 0:,}"]
                         for c in clients])
    else:
        lines.append("no clients connected")
    return "\n".join(lines)


def _table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    cells = [headers] + [["-" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells]


def _plural(n: int, one: str, many: str | None = None) -> str:
    return f"{n:,} {one if n == 1 else (many or one + 's')}"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h{minutes:02d}m"
    return f"{hours // 24}d{hours % 24:02d}h"


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return "now" if seconds < 0.05 else f"{seconds:.1f} s ago"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m clusterexec.status",
        description="Show a clusterexec master's worker nodes, clients, queue and throughput.")
    parser.add_argument("address", nargs="?", default=None,
                        help=f"the master, HOST or HOST:PORT (default localhost:{DEFAULT_PORT}, or the SLURM "
                             "cluster's master with --slurm)")
    parser.add_argument("--json", action="store_true", help="print the raw data as JSON, for scripts")
    parser.add_argument("--authkey-file", help="file holding the shared key (default ~/.clusterexec/authkey)")
    parser.add_argument("--authkey", help="the shared key itself (visible in `ps`; prefer a key file)")
    parser.add_argument("--slurm", nargs="?", const="default", metavar="NAME",
                        help="find the master started by `python -m clusterexec.slurm start` (cluster NAME)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the master (default 10)")
    add_tls_arguments(parser, "this client's")
    args = parser.parse_args(argv)
    try:
        address = args.address
        if address is None and args.slurm:
            from .slurm import master_address
            address = master_address(args.slurm)
        address = address or f"localhost:{DEFAULT_PORT}"
        key, _ = resolve_key(args.authkey, args.authkey_file)
        ssl_context = tls_from_arguments(args, server=False)  # TLSConfigError is a ValueError
        info = fetch(address, key, timeout=args.timeout, ssl_context=ssl_context)
    except (ValueError, MissingKeyError, OSError, ClusterError) as e:
        print(f"clusterexec.status: {e}", file=sys.stderr)
        return 1
    try:
        if args.json:
            json.dump(info, sys.stdout, indent=2, sort_keys=True)
            print()
        else:
            print(render(info))
        sys.stdout.flush()
    except BrokenPipeError:  # `... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())

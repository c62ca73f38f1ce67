"""The master: an asyncio server around `Scheduler`. `python -m clusterexec.master`.

    client ─submit/cancel─▶ ┌──────────── Master ────────────┐ ─tasks/cancel/drop─▶ node agent
                            │ FramedConnection per peer       │
    client ◀─started/results│  → Scheduler (queues, fairness) │ ◀─started/results── node agent
                            │  → one flush per loop iteration │
                            └─────────────────────────────────┘

Every connection authenticates first (see `protocol`), then says hello with its role. Payloads are
forwarded as the opaque buffers they arrived in; the master never unpickles anything. Output is coalesced:
events only mark peers dirty, and one callback per loop iteration writes each dirty peer a single frame
per message type.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import platform
import signal
import socket
import sys
import time
from typing import Any

from . import __version__
from . import protocol as P
from .address import DEFAULT_PORT
from .auth import MissingKeyError, resolve_key
from .connection import FramedConnection, LinkEnd, local_link
from .scheduler import Scheduler

log = logging.getLogger("clusterexec.master")

class Master:
    """Routes tasks from clients to worker nodes and results back. Runs inside an asyncio loop."""

    def __init__(self, key: bytes, *, prefetch: int | None = None, heartbeat_interval: float = 1.0,
                 heartbeat_timeout: float = 5.0, max_frame: int = P.DEFAULT_MAX_FRAME):
        self.key = key
        self.max_frame = max_frame
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self._beat: asyncio.TimerHandle | None = None
        self.scheduler = Scheduler(prefetch=prefetch)
        self.server: asyncio.base_events.Server | None = None
        self.address: tuple[str, int] | None = None
        self._ids = itertools.count(1)
        self._client_conn: dict[int, FramedConnection] = {}
        self._client_cache: dict[int, P.BlobLRU] = {}
        self._node_conn: dict[int, FramedConnection] = {}
        self._node_sent: dict[int, P.BlobLRU] = {}
        self._flush_scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.started_at = time.time()

    async def start(self, host: str = "0.0.0.0", port: int = DEFAULT_PORT) -> tuple[str, int]:
        self._loop = asyncio.get_running_loop()
        self.server = await self._loop.create_server(self._new_connection, host, port, reuse_address=True)
        sockname = self.server.sockets[0].getsockname()
        self.address = (sockname[0], sockname[1])
        self._beat = self._loop.call_later(self.heartbeat_interval, self._heartbeat)
        return self.address

    def close(self) -> None:
        if self._beat is not None:
            self._beat.cancel()
        if self.server is not None:
            self.server.close()
        for conn in [*self._client_conn.values(), *self._node_conn.values()]:
            conn.close()

    def local_link(self) -> LinkEnd:
        """An in-process connection for an agent running in this event loop; returns the agent's end."""
        mine, theirs = local_link(self._loop)
        mine.bind(_no_op, self._on_messages, self._on_lost)
        return theirs

    def _new_connection(self) -> FramedConnection:
        return FramedConnection(role="server", key=self.key, on_ready=_no_op,
                                on_messages=self._on_messages, on_lost=self._on_lost, max_frame=self.max_frame)

    # ------------------------------------------------------------------------------------------ input

    def _on_messages(self, conn: FramedConnection, messages: list[P.Message]) -> None:
        conn.last_heard = self._loop.time()
        for msg in messages:
            try:
                kind = conn.state[0] if conn.state else None
                if kind == "client":
                    self._client_message(conn.state[1], msg)
                elif kind == "node":
                    self._node_message(conn.state[1], msg)
                elif msg.type == "hello":
                    self._hello(conn, msg.header)
                else:
                    raise P.ProtocolError(f"expected hello, got {msg.type!r}")
            except (LookupError, TypeError, ValueError, AttributeError, ArithmeticError) as e:
                raise P.ProtocolError(f"malformed {msg.type!r} message: {type(e).__name__}: {e}") from None
            if conn.closed:
                return
        self._schedule_flush()

    def _hello(self, conn: FramedConnection, header: dict[str, Any]) -> None:
        role = header["role"]
        if role == "client":
            cid = next(self._ids)
            self.scheduler.add_client(cid, _peer_info(conn, header))
            self._client_conn[cid] = conn
            self._client_cache[cid] = P.BlobLRU()
            conn.state = ("client", cid)
            conn.send({"t": "welcome", "id": cid, "procs": self.scheduler.total_procs(),
                       "nodes": len(self.scheduler.nodes), "version": __version__,
                       "heartbeat": [self.heartbeat_interval, self.heartbeat_timeout], "max_frame": self.max_frame})
            log.info("client %d connected from %s (%s)", cid, conn.peer, header.get("name", "?"))
        elif role == "worker":
            nprocs = int(header["nprocs"])
            if nprocs < 1:
                raise ValueError("nprocs must be at least 1")
            nid = next(self._ids)
            self.scheduler.add_node(nid, nprocs, _peer_info(conn, header))
            self._node_conn[nid] = conn
            self._node_sent[nid] = P.BlobLRU()
            conn.state = ("node", nid)
            conn.send({"t": "welcome", "id": nid, "heartbeat": [self.heartbeat_interval, self.heartbeat_timeout],
                       "max_frame": self.max_frame})
            log.info("worker node %d joined from %s: host %s, pid %s, %d processes",
                     nid, conn.peer, header.get("host"), header.get("pid"), nprocs)
        elif role == "status":
            conn.state = ("status", 0)
            conn.send({"t": "status", **self.status()})
        else:
            raise ValueError(f"unknown role {role!r}")

    def _client_message(self, cid: int, msg: P.Message) -> None:
        h = msg.header
        t = msg.type
        if t == "submit":
            tasks = P.decode_tasks(h["tasks"], msg.buffers, self._client_cache[cid])
            self.scheduler.submit(cid, tasks)
        elif t == "cancel":
            self.scheduler.cancel(cid, int(h["req"]), [int(i) for i in h["ids"]])
        elif t == "kill":
            self.scheduler.kill(cid, [int(i) for i in h["ids"]])
        elif t == "status":
            self._client_conn[cid].send({"t": "status", **self.status()})
        else:
            raise P.ProtocolError(f"unknown message type {t!r} from a client")

    def _node_message(self, nid: int, msg: P.Message) -> None:
        h = msg.header
        t = msg.type
        sched = self.scheduler
        if t == "results":
            items = h["items"]
            for item, bufs in zip(items, P.split_buffers(items, msg.buffers), strict=True):
                gid, status, _, info = item
                if status not in ("ok", "raise", "error", "lost"):
                    raise ValueError(f"unknown result status {status!r}")
                sched.result(nid, int(gid), status, bufs, info)
        elif t == "started":
            sched.started(nid, [int(g) for g in h["ids"]])
        elif t == "pong":
            pass  # its arrival is the point
        elif t == "cancel_reply":
            sched.cancel_reply(nid, int(h["key"]), [int(g) for g in h["cancelled"]],
                               [int(g) for g in h["refused"]])
        else:
            raise P.ProtocolError(f"unknown message type {t!r} from a worker node")

    def _on_lost(self, conn: FramedConnection, exc: BaseException | None) -> None:
        if not conn.state:
            return
        kind, ident = conn.state
        if kind == "client":
            self._client_conn.pop(ident, None)
            self._client_cache.pop(ident, None)
            self.scheduler.remove_client(ident)
            log.info("client %d disconnected", ident)
        elif kind == "node":
            self._node_conn.pop(ident, None)
            self._node_sent.pop(ident, None)
            node = self.scheduler.nodes.get(ident)
            running = len(node.assigned) if node else 0
            if isinstance(exc, TimeoutError):
                reason = f"it stopped answering heartbeats for {self.heartbeat_timeout:g} s"
                log.warning("worker node %d (%s) stopped answering for %g s: presumed hung or unreachable; "
                            "its %d tasks in flight go to other workers", ident,
                            node.info.get("host") if node else "?", self.heartbeat_timeout, running)
            else:
                reason = "the worker node disconnected"
                log.info("worker node %d left (%d tasks in flight go back to the queue)", ident, running)
            self.scheduler.remove_node(ident, {"reason": reason})
        self._schedule_flush()

    def _heartbeat(self) -> None:
        """Ping every peer; a worker node silent for `heartbeat_timeout` is presumed hung or cut off, and
        its tasks go to other nodes. (If it comes back, its connection is gone: it reconnects as a new node
        and drops what it was running.) Clients take the pings as a sign of our own life."""
        now = self._loop.time()
        for conn in list(self._node_conn.values()):
            if isinstance(conn, LinkEnd):
                continue
            # Checked once per interval, so give up one interval early: a silent node is declared dead
            # within heartbeat_timeout of its last word, never later.
            if now - getattr(conn, "last_heard", now) > self.heartbeat_timeout - self.heartbeat_interval:
                conn.fail(TimeoutError("no heartbeat"))
            else:
                conn.send({"t": "ping"})
        for conn in self._client_conn.values():
            conn.send({"t": "ping"})
        self._beat = self._loop.call_later(self.heartbeat_interval, self._heartbeat)

    # ------------------------------------------------------------------------------------------ output

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled and self._loop is not None:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        sched = self.scheduler
        sched.schedule()
        for node in sched.dirty_nodes:
            conn = self._node_conn.get(node.id)
            if conn is None:
                continue
            if node.out_drop:
                conn.send({"t": "drop", "ids": node.out_drop})
                node.out_drop = []
            if node.out_kill:
                conn.send({"t": "kill", "ids": node.out_kill})
                node.out_kill = []
            if node.out_cancel:
                for key, gids in node.out_cancel:
                    conn.send({"t": "cancel", "key": key, "ids": gids})
                node.out_cancel = []
            if node.out_tasks:
                for group in P.in_frames(node.out_tasks, lambda ts: P.task_size(ts.task), self.max_frame):
                    entries, buffers = P.encode_tasks(((ts.gid, ts.task) for ts in group), self._node_sent[node.id])
                    conn.send({"t": "tasks", "tasks": entries}, buffers)
                node.out_tasks = []
        sched.dirty_nodes.clear()
        for client in sched.dirty_clients:
            conn = self._client_conn.get(client.id)
            if conn is None:
                continue
            if client.out_started:
                conn.send({"t": "started", "ids": client.out_started})
                client.out_started = []
            if client.out_results:
                for group in P.in_frames(client.out_results, P.result_size, self.max_frame):
                    items, buffers = P.encode_results(group)
                    conn.send({"t": "results", "items": items}, buffers)
                client.out_results = []
            for reply in client.out_cancel_replies:
                conn.send({"t": "cancel_reply", **reply})
            client.out_cancel_replies = []
        sched.dirty_clients.clear()

    # ------------------------------------------------------------------------------------------ status

    def status(self) -> dict[str, Any]:
        sched = self.scheduler
        return {
            "version": __version__,
            "uptime": time.time() - self.started_at,
            "queued": sched.queued(),
            "procs": sched.total_procs(),
            "workers": [
                {"id": n.id, "host": n.info.get("host"), "pid": n.info.get("pid"), "nprocs": n.nprocs,
                 "busy": len(n.assigned), "done": n.tasks_done, "failed": n.tasks_failed,
                 "python": n.info.get("python"), "address": n.info.get("address")}
                for n in sched.nodes.values()
            ],
            "clients": [
                {"id": c.id, "host": c.info.get("host"), "pid": c.info.get("pid"), "name": c.info.get("name"),
                 "queued": len(c.queue), "pending": len(c.tasks), "done": c.tasks_done}
                for c in sched.clients.values()
            ],
        }


def _peer_info(conn: FramedConnection, header: dict[str, Any]) -> dict[str, Any]:
    return {"host": str(header.get("host", "?")), "pid": header.get("pid"), "name": header.get("name"),
            "python": header.get("python"), "cloudpickle": header.get("cloudpickle"), "address": conn.peer}


def _no_op(conn: FramedConnection) -> None:
    pass


def advertised_host(bound: str) -> str:
    """The host name to print for others to connect to."""
    if bound in ("0.0.0.0", "::", ""):
        return socket.gethostname()
    return bound


def python_version() -> str:
    return platform.python_version()


# ---------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m clusterexec.master",
        description="Start a clusterexec master: the router between clients and worker nodes.")
    parser.add_argument("--host", default="0.0.0.0",
                        help="interface to listen on (default: all; use 127.0.0.1 for this machine only)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help=f"TCP port (default {DEFAULT_PORT}; 0 picks a free one)")
    parser.add_argument("--authkey-file", help="file holding the shared key (default ~/.clusterexec/authkey, "
                                               "created with owner-only permissions if missing)")
    parser.add_argument("--authkey", help="the shared key itself (visible to other users in `ps`; prefer a key file "
                                          "or CLUSTEREXEC_AUTHKEY)")
    parser.add_argument("--workers", type=int, default=0, metavar="N",
                        help="also run N task processes here, as a worker node of this master")
    parser.add_argument("--heartbeat-interval", type=float, default=1.0, metavar="S",
                        help="seconds between pings to each peer (default 1)")
    parser.add_argument("--heartbeat-timeout", type=float, default=5.0, metavar="S",
                        help="a worker node silent this long is presumed dead and its tasks go elsewhere "
                             "(default 5)")
    parser.add_argument("--max-frame-mb", type=int, default=P.DEFAULT_MAX_FRAME >> 20, metavar="MB",
                        help="largest message a peer may send, which bounds what the master buffers for one "
                             f"connection (default {P.DEFAULT_MAX_FRAME >> 20})")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    if not 0 < args.heartbeat_interval < args.heartbeat_timeout:
        print("clusterexec.master: need 0 < --heartbeat-interval < --heartbeat-timeout", file=sys.stderr)
        return 2
    try:
        key, source = resolve_key(args.authkey, args.authkey_file, create=True)
    except (MissingKeyError, OSError) as e:
        print(f"clusterexec.master: {e}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_serve(key, source, args))
    except KeyboardInterrupt:
        return 0


async def _serve(key: bytes, source: str, args: argparse.Namespace) -> int:
    master = Master(key, heartbeat_interval=args.heartbeat_interval, heartbeat_timeout=args.heartbeat_timeout,
                    max_frame=args.max_frame_mb << 20)
    try:
        host, port = await master.start(args.host, args.port)
    except OSError as e:
        print(f"clusterexec.master: cannot listen on {args.host}:{args.port}: {e.strerror or e}", file=sys.stderr)
        return 2
    shown = advertised_host(host)
    print(f"clusterexec master listening on {host}:{port} (key from {source})\n"
          f"  start workers:  python -m clusterexec.worker {shown}:{port}\n"
          f"  connect:        ClusterExecutor(\"{shown}:{port}\")", flush=True)
    agent = None
    if args.workers:
        from .worker import Agent
        agent = Agent(("127.0.0.1", port), key, nprocs=args.workers)
        await agent.start(link=master.local_link())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")
    if agent is not None:
        await agent.stop()
    master.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The master: an asyncio server around `Scheduler`. `python -m clusterexec.master`.

    client ─submit/cancel─▶ ┌──────────── Master ────────────┐ ─tasks/cancel/drop─▶ node agent
                            │ FramedConnection per peer       │
    client ◀─started/results│  → Scheduler (queues, fairness) │ ◀─started/results── node agent
                            │  → one flush per loop iteration │
                            └─────────────────────────────────┘

With --tls-*, each new connection first meets a gate (`_TLSGate`): a TLS handshake against the cluster CA,
or, for a peer that does not start TLS, a "TLS required" answer and the door. Then, in TLS or not, every
connection authenticates (see `protocol`) and says hello with its role. Payloads are
forwarded as the opaque buffers they arrived in; the master never unpickles anything. Output is coalesced:
events only mark peers dirty, and one callback per loop iteration writes each dirty peer a single frame
per message type.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import ctypes
import gc
import itertools
import json
import logging
import os
import platform
import resource
import secrets
import signal
import socket
import ssl
import struct
import sys
import time
from asyncio import sslproto
from collections import deque
from collections.abc import Callable
from typing import Any

from . import protocol as P
from . import shm
from .address import DEFAULT_PORT
from .auth import MissingKeyError, TLSConfigError, add_tls_arguments, resolve_key, tls_from_arguments
from .connection import OUTPUT_BACKLOG, FramedConnection, LinkEnd, backlog, local_link, loop_is_idle
from .scheduler import Scheduler
from .version import __version__

log = logging.getLogger("clusterexec.master")

# How long a TLS master waits for a new connection's first TLS bytes before it decides the peer is a
# plaintext clusterexec client or worker (which waits for our hello in silence) and says TLS is required.
# A TLS peer sends its ClientHello as soon as TCP connects, so this only needs to cover a stalled peer.
TLS_SNIFF_TIMEOUT = 3.0

# Unauthenticated connections (in the TLS or the key handshake) the master holds at once. One more closes the
# oldest: a flood of peers that never authenticate costs at most this many connections' worth of memory, and
# cannot keep out a real peer, whose handshakes take milliseconds (it would take this many new connections
# within those milliseconds to push it out).
UNAUTHENTICATED_MAX = 1024
# Of those, how many may be in a TLS handshake at once, the oldest making room likewise: each holds OpenSSL's
# handshake state. A peer gets that far only once its whole first TLS record (the ClientHello) has arrived;
# until then it costs a socket and a few small objects, and it has TLS_SNIFF_TIMEOUT from its connect.
TLS_HANDSHAKES_MAX = 64
TLS_HANDSHAKE_TIMEOUT = 5.0
TLS_RECORD_MAX = 5 + (1 << 14) + 2048  # a record's 5-byte header and its largest body
# Bytes a TLS connection reads from its socket at a time until its peer has proved the key; then asyncio's
# default (256 KiB, which each connection would otherwise hold from its first byte).
TLS_PRE_AUTH_READ = 16 * 1024
# After this many unauthenticated connections, the memory they took is handed back to the system once few are
# left (at most once per TRIM_INTERVAL): a garbage collection first, since asyncio's transports are reference
# cycles (each holds a bound method of its own), and with them the TLS state they hold; then malloc_trim, for
# what the C allocator would otherwise keep. Without both the master stays near its peak.
TRIM_AFTER = 256
TRIM_INTERVAL = 10.0
EVICTION_LOG_INTERVAL = 10.0

# What a client that may resume its session (see Master._resume) can leave unconfirmed before it loses that
# right: results sent, and their bytes. It confirms every half second or so (see client.ACK_EVERY).
UNCONFIRMED_RESULTS = 1 << 20
UNCONFIRMED_BYTES = 1 << 30


class _ResultLog:
    """The results sent to one client in its session, numbered from 1, kept until it says it has them ("got"),
    so that a client cut off by the network gets again those lost with its old connection."""

    __slots__ = ("session", "sent", "acked", "items", "nbytes")

    def __init__(self, session: str):
        self.session = session
        self.sent = 0
        self.acked = 0
        self.items: deque[tuple[Any, int]] = deque()  # (result, its size)
        self.nbytes = 0

    def add(self, results: list[Any]) -> bool:
        """Log results about to be sent; False when too much is unconfirmed to keep any more."""
        for result in results:
            size = P.result_size(result)
            self.items.append((result, size))
            self.nbytes += size
        self.sent += len(results)
        return len(self.items) <= UNCONFIRMED_RESULTS and self.nbytes <= UNCONFIRMED_BYTES

    def ack(self, n: int) -> None:
        while self.acked < n:
            _, size = self.items.popleft()
            self.nbytes -= size
            self.acked += 1

    def unacked(self) -> list[Any]:
        return [result for result, _ in self.items]


# At its open-files limit the master cannot accept; asyncio reports each failed accept (about a hundred a
# second). One line per this many seconds says so instead.
ACCEPT_FAILURE_LOG_INTERVAL = 10.0


class Master:
    """Routes tasks from clients to worker nodes and results back. Runs inside an asyncio loop."""

    def __init__(self, key: bytes, *, prefetch: int | None = None, heartbeat_interval: float = 1.0,
                 heartbeat_timeout: float = 5.0, max_frame: int = P.DEFAULT_MAX_FRAME,
                 ssl_context: ssl.SSLContext | None = None, client_timeout: float = 60.0):
        self.key = key
        # A client whose machine no longer acknowledges our pings for this long is gone (see _unanswered_for).
        self.client_timeout = client_timeout
        self.ssl_context = ssl_context  # TLS on every connection (see _TLSGate); None: plain TCP
        self._tls_tasks: set[asyncio.Task] = set()  # TLS handshakes under way (see _tls_handshake)
        # Connections that have not authenticated yet, oldest first, with how to close each (see _admit).
        self._unauthenticated: dict[Any, Callable[[], None]] = {}
        self._tls_handshakes: dict[Any, Callable[[], None]] = {}
        self._admitted = 0  # unauthenticated connections since memory was last handed back
        self._trim_quiet_until = float("-inf")
        self._evicted = 0  # closed to make room, not yet logged
        self._evicted_quiet_until = float("-inf")
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
        self._sessions: dict[str, int] = {}  # session token → client id, for clients that may resume (see _resume)
        self._result_logs: dict[int, _ResultLog] = {}  # client id → results it was sent and has not confirmed
        self._client_output: dict[int, list[tuple[list[Any], Any]]] = {}  # client id → task output to send
        # client id → {(task id, host, pid): bytes of its output dropped while the client lagged, not yet told}
        self._output_dropped: dict[int, dict[tuple[int, Any, int], int]] = {}
        self._compat_wait: dict[int, float] = {}  # client id → seconds it waits while only incompatible nodes are here
        self._stranded: dict[int, float] = {}  # client id → since when its queued tasks have had no compatible node
        self._node_conn: dict[int, FramedConnection] = {}
        self._node_sent: dict[int, P.BlobLRU] = {}
        self._flush_scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.started_at = time.time()
        self.tasks_done = 0  # results received from nodes, for the recent rate in `status`
        self._rate_samples: deque[tuple[float, int]] = deque(maxlen=11)  # (time, tasks_done), one per beat

    async def start(self, host: str = "0.0.0.0", port: int = DEFAULT_PORT) -> tuple[str, int]:
        self._loop = asyncio.get_running_loop()
        self._loop.set_exception_handler(_AcceptFailures(self._loop.get_exception_handler()))
        factory = self._new_plain_connection if self.ssl_context is None else self._new_gate
        # (A deep listen queue: hundreds of nodes may connect at once, as a SLURM array starts.)
        self.server = await self._loop.create_server(factory, host, port, reuse_address=True, backlog=1024)
        sockname = self.server.sockets[0].getsockname()
        self.address = (sockname[0], sockname[1])
        self._beat = self._loop.call_later(self.heartbeat_interval, self._heartbeat)
        self._rate_samples.append((self._loop.time(), 0))
        return self.address

    def announce_shutdown(self, reason: str) -> None:
        """Tell every client and node why the connections are about to close."""
        for conn in [*self._client_conn.values(), *self._node_conn.values()]:
            conn.send({"t": "shutdown", "reason": reason})

    def close(self) -> None:
        if self._beat is not None:
            self._beat.cancel()
        if self.server is not None:
            self.server.close()
        for close in list(self._unauthenticated.values()):
            close()
        for task in list(self._tls_tasks):
            task.cancel()
        for conn in [*self._client_conn.values(), *self._node_conn.values()]:
            conn.close()

    def local_link(self) -> LinkEnd:
        """An in-process connection for an agent running in this event loop; returns the agent's end."""
        mine, theirs = local_link(self._loop)
        mine.direct = True  # tasks reach the agent at once; its results come back a loop iteration later
        mine.bind(_no_op, self._on_messages, self._on_lost)
        return theirs

    def _new_connection(self, on_ready: Callable[[FramedConnection], None]) -> FramedConnection:
        return FramedConnection(role="server", key=self.key, on_ready=on_ready,
                                on_messages=self._on_messages, on_lost=self._on_lost, max_frame=self.max_frame)

    def _new_plain_connection(self) -> FramedConnection:
        conn = self._new_connection(self._authenticated)
        self._admit(self._unauthenticated, UNAUTHENTICATED_MAX, conn, _evict(conn))
        return conn

    def _authenticated(self, conn: FramedConnection) -> None:
        self._unauthenticated.pop(conn, None)

    # ------------------------------------------------------------------------------------------ unauthenticated

    def _admit(self, table: dict[Any, Callable[[], None]], limit: int, key: Any, close: Callable[[], None]) -> None:
        """Count a connection in `table` (unauthenticated, or in a TLS handshake), closing the oldest there if
        it is full. `close` closes it; whatever ends it takes it out of the table."""
        while len(table) >= limit:
            oldest = next(iter(table))
            self._evicted += 1
            table.pop(oldest)()
        table[key] = close
        if table is self._unauthenticated:
            self._admitted += 1

    def _check_unauthenticated(self, now: float) -> None:
        """Once a beat: say how many unauthenticated connections were closed to make room (a line per
        EVICTION_LOG_INTERVAL at most), and hand memory back after a burst of them."""
        if self._evicted and now >= self._evicted_quiet_until:
            log.warning("closed %d unauthenticated connections to make room for new ones (at most %d at once, %d "
                        "of them in a TLS handshake): many peers are connecting without authenticating",
                        self._evicted, UNAUTHENTICATED_MAX, TLS_HANDSHAKES_MAX)
            self._evicted = 0
            self._evicted_quiet_until = now + EVICTION_LOG_INTERVAL
        if (self._admitted >= TRIM_AFTER and len(self._unauthenticated) <= TRIM_AFTER // 16
                and now >= self._trim_quiet_until):
            self._admitted = 0
            self._trim_quiet_until = now + TRIM_INTERVAL
            gc.collect()
            _malloc_trim()

    # ------------------------------------------------------------------------------------------ TLS

    def _new_gate(self) -> _TLSGate:
        return _TLSGate(self)

    def _start_tls(self, gate: _TLSGate, sock: socket.socket) -> None:
        """A gate saw a whole ClientHello on `sock`: run the TLS handshake, at most TLS_HANDSHAKES_MAX at once."""
        task = self._loop.create_task(self._tls_handshake(gate, sock))
        self._tls_tasks.add(task)
        task.add_done_callback(self._tls_tasks.discard)
        gate.task = task
        self._admit(self._tls_handshakes, TLS_HANDSHAKES_MAX, gate, gate.close)

    async def _tls_handshake(self, gate: _TLSGate, sock: socket.socket) -> None:
        """The TLS handshake against the cluster CA, in a transport of its own on `sock`, within
        TLS_HANDSHAKE_TIMEOUT; then the connection authenticates with the key as any other. Until it has, it
        reads TLS_PRE_AUTH_READ bytes at a time (see _TLSServerProtocol)."""
        gate.handed = None  # ours to close from here on
        loop = self._loop
        peer = gate.peer
        tls_transport: asyncio.BaseTransport | None = None
        protocol: _TLSServerProtocol | None = None

        def authenticated(conn: FramedConnection) -> None:
            self._authenticated(conn)
            if protocol is not None:
                protocol.authenticated()

        handshake = loop.create_future()
        try:
            conn = self._new_connection(authenticated)
            try:
                tls_transport, protocol = await loop.connect_accepted_socket(
                    lambda: _TLSServerProtocol(loop, conn, self.ssl_context, handshake, server_side=True,
                                               ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT), sock)
                sock = None
                gate.tls_transport = tls_transport  # closing the gate now aborts it: the wait below ends
                await handshake
            except (OSError, TimeoutError) as e:
                if isinstance(e, ssl.SSLCertVerificationError):
                    why = f"its certificate is not signed by our CA ({e.verify_message})"
                elif isinstance(e, ssl.SSLError):
                    why = e.reason or str(e)
                elif isinstance(e, ConnectionAbortedError):
                    why = str(e)
                elif isinstance(e, ConnectionError):
                    why = "it hung up (does it trust our certificate? its --tls-ca must be our CA)"
                else:
                    why = str(e) or type(e).__name__
                log.warning("rejected connection from %s: TLS handshake failed: %s", peer, why)
                return
            if conn.transport is None:
                if not gate.closed:  # (closed to make room: counted, and said once per interval)
                    log.info("connection from %s closed during the TLS handshake", peer)
            elif not conn.ready and not conn.closed:  # counted as itself from now on, until it authenticates
                self._unauthenticated.pop(gate, None)
                self._admit(self._unauthenticated, UNAUTHENTICATED_MAX, conn, _evict(conn))
            tls_transport = None  # the connection's own now
        finally:
            self._tls_handshakes.pop(gate, None)
            self._unauthenticated.pop(gate, None)
            if sock is not None:
                sock.close()
            if tls_transport is not None:
                tls_transport.abort()
            # No reference cycles left behind (gate and task; this frame, the future and the exception in
            # it): what a failed handshake held goes when it ends, not at the next full garbage collection.
            gate.task = gate.tls_transport = None
            handshake = None

    # ------------------------------------------------------------------------------------------ input

    def _on_messages(self, conn: FramedConnection, messages: list[P.Message]) -> None:
        conn.last_heard = self._loop.time()
        for msg in messages:
            try:
                kind = conn.state[0] if conn.state else None
                if kind == "client":
                    P.check_message("client", msg.header)
                    self._client_message(conn.state[1], msg)
                elif kind == "node":
                    P.check_message("node", msg.header)
                    self._node_message(conn.state[1], msg)
                elif msg.header.get("t") == "hello":
                    P.check_message("node" if msg.header.get("role") == "worker" else "client", msg.header)
                    self._hello(conn, msg.header)
                else:
                    raise P.ProtocolError(f"expected hello, got {msg.header.get('t')!r}")
            except (LookupError, TypeError, ValueError, AttributeError, ArithmeticError) as e:
                raise P.ProtocolError(f"malformed {msg.type!r} message: {type(e).__name__}: {e}") from None
            if conn.closed:
                return
        if not self._flush_scheduled and loop_is_idle(self._loop):
            self._flush()  # nothing else to batch this with: one loop iteration sooner
        else:
            self._schedule_flush()

    def _hello(self, conn: FramedConnection, header: dict[str, Any]) -> None:
        role = header["role"]
        if role == "client":
            resume = header.get("resume")
            if resume is not None and self._resume(conn, header, resume):
                return
            cid = next(self._ids)
            client = self.scheduler.add_client(cid, _peer_info(conn, header), compat_key(header))
            self._compat_wait[cid] = float(header.get("compat_wait", 60.0))
            self._client_conn[cid] = conn
            self._client_cache[cid] = P.BlobLRU()
            conn.state = ("client", cid)
            session = None
            if header.get("acks"):  # it says which results it has: it may resume this session if cut off
                session = secrets.token_hex(16)
                self._sessions[session] = cid
                self._result_logs[cid] = _ResultLog(session)
            conn.send({"t": "welcome", "id": cid, "procs": self.scheduler.total_procs(),
                       "nodes": len(self.scheduler.nodes), "version": __version__, "session": session,
                       "heartbeat": [self.heartbeat_interval, self.heartbeat_timeout], "max_frame": self.max_frame})
            log.info("client %d connected from %s (%s)", cid, conn.peer, header.get("name", "?"))
            odd = [n for n in self.scheduler.nodes.values() if n.compat != client.compat]
            if odd:
                conn.send({"t": "notice", "text": _incompatible_text(client, odd)})
        elif role == "worker":
            nprocs = int(header["nprocs"])
            if nprocs < 1:
                raise ValueError("nprocs must be at least 1")
            nid = next(self._ids)
            node = self.scheduler.add_node(nid, nprocs, _peer_info(conn, header), compat_key(header))
            self._node_conn[nid] = conn
            self._node_sent[nid] = P.BlobLRU()
            conn.state = ("node", nid)
            conn.send({"t": "welcome", "id": nid, "heartbeat": [self.heartbeat_interval, self.heartbeat_timeout],
                       "max_frame": self.max_frame})
            log.info("worker node %d joined from %s: host %s, pid %s, %d processes, Python %s, cloudpickle %s",
                     nid, conn.peer, header.get("host"), header.get("pid"), nprocs, header.get("python"),
                     header.get("cloudpickle"))
            for client in self.scheduler.clients.values():
                if client.compat != node.compat and client.id in self._client_conn:
                    self._client_conn[client.id].send({"t": "notice", "text": _incompatible_text(client, [node])})
        elif role == "status":
            conn.state = ("status", 0)
            conn.send({"t": "status", **self.status()})
        else:
            raise ValueError(f"unknown role {role!r}")

    def _resume(self, conn: FramedConnection, header: dict[str, Any], resume: Any) -> bool:
        """A client that lost its connection (cut off by the network, say) is back on a new one, within its
        session: its queued and running tasks are still here. It gets again the results it had not received,
        and the old connection, if we had not noticed its loss, is dropped without ending the session.
        Returns False when there is no such session any more (a restarted master): it starts a new one."""
        cid = self._sessions.get(str(resume["session"]))
        got = resume["got"]
        results = self._result_logs.get(cid)
        client = self.scheduler.clients.get(cid)
        if client is None or results is None:
            return False
        if type(got) is not int or not results.acked <= got <= results.sent:
            raise P.ProtocolError(f"a resuming client says it has {got!r} results of its session, "
                                  f"but it was sent {results.sent}")
        old = self._client_conn.get(cid)
        if old is not None and old is not conn:
            old.state = None  # (its loss no longer ends the session)
            old.fail(ConnectionError("the client resumed its session on a new connection"), abort=True)
        self._client_conn[cid] = conn
        self._client_cache[cid] = P.BlobLRU()  # (the client starts a new cache with every connection)
        conn.state = ("client", cid)
        client.info.update(_peer_info(conn, header))
        results.ack(got)
        again = list(results.unacked())
        # It resubmits all it waits for: those whose results are on their way again, or still to be sent, are
        # done already.
        client.resent = {r[0] for r in again} | {r[0] for r in client.out_results}
        conn.send({"t": "welcome", "id": cid, "procs": self.scheduler.total_procs(),
                   "nodes": len(self.scheduler.nodes), "version": __version__, "session": results.session,
                   "resumed": True, "heartbeat": [self.heartbeat_interval, self.heartbeat_timeout],
                   "max_frame": self.max_frame})
        for group in P.in_frames(again, P.result_size, self.max_frame):
            items, buffers = P.encode_results(group)
            conn.send({"t": "results", "items": items}, buffers)
        log.info("client %d resumed its session from %s (%s); %d of its results sent again, %d tasks still queued "
                 "or running", cid, conn.peer, header.get("name", "?"), len(again), len(client.tasks))
        self.scheduler.dirty_clients.add(client)
        return True

    def _client_message(self, cid: int, msg: P.Message) -> None:
        h = msg.header
        t = msg.type
        if t == "submit":
            # Verified: node caches, and the agents and task processes behind them, know blobs by hash alone.
            tasks = P.decode_tasks(h["tasks"], msg.buffers, self._client_cache[cid], verify=True)
            self.scheduler.submit(cid, tasks)
        elif t == "cancel":
            self.scheduler.cancel(cid, int(h["req"]), [int(i) for i in h["ids"]])
        elif t == "kill":
            self.scheduler.kill(cid, [int(i) for i in h["ids"]])
        elif t == "status":
            self._client_conn[cid].send({"t": "status", **self.status()})
        elif t == "got":
            results = self._result_logs.get(cid)
            n = h["n"]
            if results is not None:
                if type(n) is not int or not results.acked <= n <= results.sent:
                    raise ValueError(f"it says it has {n!r} results, of {results.sent} sent")
                results.ack(n)
        else:
            raise P.ProtocolError(f"unknown message type {t!r} from a client")

    def _node_message(self, nid: int, msg: P.Message) -> None:
        h = msg.header
        t = msg.type
        sched = self.scheduler
        if t == "results":
            items = h["items"]
            self.tasks_done += len(items)
            for item, bufs in zip(items, P.split_buffers(items, msg.buffers), strict=True):
                gid, status, _, info = item
                if status not in ("ok", "raise", "error", "lost"):
                    raise ValueError(f"unknown result status {status!r}")
                sched.result(nid, int(gid), status, bufs, info)
        elif t == "output":
            self._task_output(nid, h["items"], msg.buffers)
        elif t == "started":
            sched.started(nid, [int(g) for g in h["ids"]])
        elif t == "pong":
            pass  # its arrival is the point
        elif t == "prefetch":
            sched.set_prefetch(nid, int(h["n"]), [int(g) for g in h.get("back", ())])
        elif t == "leaving":
            back = sched.node_leaving(nid, [int(g) for g in h["ids"]])
            log.info("worker node %d is leaving; it handed back %d tasks", nid, len(back))
        elif t == "cancel_reply":
            sched.cancel_reply(nid, int(h["key"]), [int(g) for g in h["cancelled"]],
                               [int(g) for g in h["refused"]])
        else:
            raise P.ProtocolError(f"unknown message type {t!r} from a worker node")

    def _task_output(self, nid: int, items: list[Any], buffers: list[memoryview]) -> None:
        """Route what tasks printed to their clients. A client that does not keep up loses output (and is
        told how much), so a task printing in a loop cannot fill the master's memory."""
        if len(items) != len(buffers):
            raise ValueError("output items and buffers differ in number")
        node = self.scheduler.nodes[nid]
        host = node.info.get("host")
        for (gid, pid, stream, dropped), data in zip(items, buffers, strict=True):
            ts = self.scheduler.task(int(gid))
            if ts is None or ts.node is not node:
                continue
            cid = ts.client.id
            conn = self._client_conn.get(cid)
            if conn is None:
                continue
            if backlog(conn) > OUTPUT_BACKLOG:
                lost = self._output_dropped.setdefault(cid, {})
                key = (ts.task.id, host, int(pid))
                lost[key] = lost.get(key, 0) + len(data) + int(dropped)
                continue
            self._client_output.setdefault(cid, []).append(([ts.task.id, host, int(pid), int(stream), int(dropped)],
                                                            data))
            self.scheduler.dirty_clients.add(ts.client)

    def _on_lost(self, conn: FramedConnection, exc: BaseException | None) -> None:
        if not conn.state:
            self._unauthenticated.pop(conn, None)
            return
        kind, ident = conn.state
        if kind == "client":
            self._client_conn.pop(ident, None)
            self._client_cache.pop(ident, None)
            self._client_output.pop(ident, None)
            self._output_dropped.pop(ident, None)
            self._compat_wait.pop(ident, None)
            self._stranded.pop(ident, None)
            results = self._result_logs.pop(ident, None)
            if results is not None:
                self._sessions.pop(results.session, None)
            client = self.scheduler.clients.get(ident)
            running = sum(1 for ts in client.tasks.values() if ts.node is not None) if client else 0
            self.scheduler.remove_client(ident)
            if isinstance(exc, TimeoutError):
                log.warning("client %d (%s) stopped acknowledging for %g s: presumed gone with its machine or "
                            "network; its %d tasks on worker nodes are stopped and its queued ones dropped", ident,
                            conn.peer, self.client_timeout, running)
            else:
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
        self._rate_samples.append((now, self.tasks_done))
        for conn in list(self._node_conn.values()):
            if isinstance(conn, LinkEnd):
                continue
            # Checked once per interval, so give up one interval early: a silent node is declared dead
            # within heartbeat_timeout of its last word, never later.
            if now - getattr(conn, "last_heard", now) > self.heartbeat_timeout - self.heartbeat_interval:
                conn.fail(TimeoutError("no heartbeat"), abort=True)
            else:
                conn.send({"t": "ping"})
        for conn in list(self._client_conn.values()):
            if self.client_timeout and _unanswered_for(conn) > self.client_timeout:
                conn.fail(TimeoutError("its machine stopped acknowledging"), abort=True)
            else:
                conn.send({"t": "ping"})
        for cid in self._output_dropped:  # to tell them, once they have caught up
            client = self.scheduler.clients.get(cid)
            if client is not None:
                self.scheduler.dirty_clients.add(client)
                self._schedule_flush()
        self._check_stranded(now)
        self._check_unauthenticated(now)
        self._beat = self._loop.call_later(self.heartbeat_interval, self._heartbeat)

    def _check_stranded(self, now: float) -> None:
        """Fail the queued tasks of a client that only incompatible nodes could run, once it has waited its
        `compat_wait`. (With no node at all, tasks wait: nodes may still be starting.)"""
        sched = self.scheduler
        groups = {n.compat for n in sched.nodes.values()}
        for client in sched.clients.values():
            if not client.queue or not groups or client.compat in groups:
                self._stranded.pop(client.id, None)
                continue
            since = self._stranded.setdefault(client.id, now)
            wait = self._compat_wait.get(client.id, 60.0)
            if now - since < wait:
                continue
            self._stranded.pop(client.id, None)
            failed = sched.fail_queued(client.id, {
                "kind": "incompatible",
                "message": _incompatible_text(client, list(sched.nodes.values()), waited=wait)})
            log.warning("client %d: failed %d tasks that no connected worker node can run", client.id, failed)
            self._schedule_flush()

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
            output = self._client_output.pop(client.id, None)
            if client.id in self._output_dropped:
                output = self._drop_notices(client, conn) + (output or [])
            if output:  # ahead of the results, which may end the tasks that printed it
                conn.send({"t": "output", "items": [item for item, _ in output]}, [data for _, data in output])
            if client.out_started:
                conn.send({"t": "started", "ids": client.out_started})
                client.out_started = []
            if client.out_results:
                results = self._result_logs.get(client.id)
                if results is not None and not results.add(client.out_results):
                    # It has not said what it received for too long (or these are huge): no resuming then.
                    del self._result_logs[client.id]
                    self._sessions.pop(results.session, None)
                for group in P.in_frames(client.out_results, P.result_size, self.max_frame):
                    items, buffers = P.encode_results(group)
                    conn.send({"t": "results", "items": items}, buffers)
                client.out_results = []
            for reply in client.out_cancel_replies:
                conn.send({"t": "cancel_reply", **reply})
            client.out_cancel_replies = []
        sched.dirty_clients.clear()

    def _drop_notices(self, client: Any, conn: Any) -> list[tuple[list[Any], bytes]]:
        """Tell a client how much output it lost: for tasks ending now, at once (a few bytes, ahead of
        their results); for the others, once it has caught up."""
        lost = self._output_dropped[client.id]
        if backlog(conn) <= OUTPUT_BACKLOG // 2:
            keys = list(lost)
        else:
            ending = {r[0] for r in client.out_results}
            keys = [key for key in lost if key[0] in ending]
        notices = [([*key, 2, lost.pop(key)], b"") for key in keys]
        if not lost:
            del self._output_dropped[client.id]
        return notices

    # ------------------------------------------------------------------------------------------ status

    def status(self) -> dict[str, Any]:
        """What `python -m clusterexec.status` and `ClusterExecutor.cluster_info()` show."""
        sched = self.scheduler
        now = self._loop.time() if self._loop is not None else 0.0
        rate = 0.0
        if self._rate_samples:
            t0, n0 = self._rate_samples[0]
            if now - t0 > 0.1:
                rate = (self.tasks_done - n0) / (now - t0)

        def heard(n: Any) -> float | None:
            conn = self._node_conn.get(n.id)
            if isinstance(conn, LinkEnd):
                return 0.0  # in this process: always current
            last = getattr(conn, "last_heard", None)
            return round(max(0.0, now - last), 3) if last is not None else None

        load = sched.load()
        at_master = sum(q for q, _, _ in load.values())
        ahead = sum(q for _, q, _ in load.values())
        return {
            "version": __version__,
            "python": python_version(),
            "uptime": time.time() - self.started_at,
            # Waiting to run: in the master's queues, or handed to a node ahead of time (prefetched). The
            # clients' "queued" add up to it.
            "queued": at_master + ahead,
            "queued_at_master": at_master,
            "running": sum(r for _, _, r in load.values()),
            "procs": sched.total_procs(),
            "tasks_done": self.tasks_done,
            "tasks_per_second": round(rate, 1),
            "workers": [
                {"id": n.id, "host": n.info.get("host"), "pid": n.info.get("pid"), "nprocs": n.nprocs,
                 "busy": min(len(n.assigned), n.nprocs), "assigned": len(n.assigned), "done": n.tasks_done,
                 "raised": n.tasks_raised, "lost": n.tasks_lost,
                 "failed": n.tasks_lost,  # (the name "lost" had before: kept for scripts that read it)
                 "python": n.info.get("python"), "cloudpickle": n.info.get("cloudpickle"),
                 "address": n.info.get("address"), "last_heard": heard(n)}
                for n in sched.nodes.values()
            ],
            "clients": [
                {"id": c.id, "host": c.info.get("host"), "pid": c.info.get("pid"), "name": c.info.get("name"),
                 "queued": load[c.id][0] + load[c.id][1], "running": load[c.id][2], "pending": len(c.tasks),
                 "done": c.tasks_done}
                for c in sched.clients.values()
            ],
        }


# The start of Linux's struct tcp_info (linux/tcp.h), up to tcpi_last_ack_recv.
_TCP_INFO = struct.Struct("=8B9I4I")


def _unanswered_for(conn: FramedConnection) -> float:
    """Seconds the peer's machine has left what we sent unacknowledged; 0 when nothing waits for an answer.

    Asked of the kernel (TCP_INFO), which acknowledges for a process that is busy, stopped or not reading:
    only a machine that is down or cut off stops answering. While the peer's receive window is closed
    (it is not reading, and we have more to send), nothing of ours is in flight and the kernel probes the
    window instead: only a second probe left unanswered counts then, as probes grow minutes apart."""
    option = getattr(socket, "TCP_INFO", None)
    sock = conn.transport.get_extra_info("socket") if conn.transport is not None else None
    if option is None or sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return 0.0
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, option, _TCP_INFO.size)
    except OSError:
        return 0.0
    if len(raw) < _TCP_INFO.size:
        return 0.0
    info = _TCP_INFO.unpack(raw)
    probes, in_flight, last_ack_ms = info[3], info[12], info[20]
    if not in_flight and probes < 2:
        return 0.0
    return last_ack_ms / 1000


def _peer_info(conn: FramedConnection, header: dict[str, Any]) -> dict[str, Any]:
    return {"host": str(header.get("host", "?")), "pid": header.get("pid"), "name": header.get("name"),
            "python": header.get("python"), "cloudpickle": header.get("cloudpickle"), "address": conn.peer}


def compat_key(header: dict[str, Any]) -> str:
    """Peers with equal keys can run each other's pickles: the same Python major.minor and the same
    cloudpickle major.minor (patch levels may differ)."""
    def minor(version: Any) -> str:
        return ".".join(str(version).split(".")[:2]) if version else "?"

    return f"Python {minor(header.get('python'))}, cloudpickle {minor(header.get('cloudpickle'))}"


def _incompatible_text(client: Any, nodes: list[Any], waited: float | None = None) -> str:
    odd = [n for n in nodes if n.compat != client.compat]
    listed = "; ".join(f"{n.info.get('host')} (pid {n.info.get('pid')}) has Python {n.info.get('python')}, "
                       f"cloudpickle {n.info.get('cloudpickle')}" for n in odd[:5])
    if len(odd) > 5:
        listed += f"; and {len(odd) - 5} more"
    mine = f"Python {client.info.get('python')}, cloudpickle {client.info.get('cloudpickle')}"
    if waited is not None:
        return (f"no connected worker node can run this client's tasks: it has {mine}, and for {waited:g} s "
                f"every worker node had another Python or cloudpickle version ({listed}). Start workers with "
                f"the same Python major.minor and cloudpickle major.minor.")
    return (f"worker nodes with other versions will not get this client's tasks: this client has {mine}; "
            f"{listed}. Pickles only travel between the same Python major.minor and cloudpickle major.minor.")


def _no_op(conn: FramedConnection) -> None:
    pass


class _AcceptFailures:
    """The loop's exception handler: asyncio's reports of failed accepts (out of file descriptors, or of
    memory) become one log line per ACCEPT_FAILURE_LOG_INTERVAL; everything else goes where it went before.
    (asyncio retries the accept a second later by itself.)"""

    MESSAGE = "socket.accept() out of system resource"

    def __init__(self, previous: Any):
        self.previous = previous
        self.failed = 0
        self.quiet_until = float("-inf")

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if context.get("message") != self.MESSAGE or not isinstance(exc, OSError):
            if self.previous is not None:
                self.previous(loop, context)
            else:
                loop.default_exception_handler(context)
            return
        self.failed += 1
        now = loop.time()
        if now < self.quiet_until:
            return
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        log.error("cannot accept new connections: %s (this process may open %d files); they wait in the "
                  "listen queue, and accepting resumes as connections close (%d failed accepts since the previous "
                  "such line, at most one every %g s). Raise the limit (ulimit -n) if this is legitimate load",
                  exc.strerror or exc, soft, self.failed, ACCEPT_FAILURE_LOG_INTERVAL)
        self.failed = 0
        self.quiet_until = now + ACCEPT_FAILURE_LOG_INTERVAL


def raise_open_files_limit() -> None:
    """Raise this process's soft limit on open files to its hard limit: each connection costs one, and
    the default soft limit (often 1,024) is far below what a master serving many nodes and clients needs."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:  # Linux refuses a soft limit above fs.nr_open
        try:
            with open("/proc/sys/fs/nr_open") as f:
                hard = int(f.read())
        except (OSError, ValueError):
            return
    if soft == resource.RLIM_INFINITY or soft >= hard:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    except (OSError, ValueError) as e:
        log.debug("could not raise the open-files limit from %d to %d: %s", soft, hard, e)


class _TLSServerProtocol(sslproto.SSLProtocol):
    """asyncio's TLS protocol, except that:

    - a failed handshake sends its alert before the connection closes. asyncio drops it, so a peer whose
      certificate we refuse would only see the connection close after its side of a TLS 1.3 handshake had
      completed, with no reason; with the alert it reports "unknown ca".
    - until its peer has proved the key, it reads TLS_PRE_AUTH_READ bytes at a time, into a buffer that
      small, rather than asyncio's 256 KiB from the first byte on (see `authenticated`)."""

    max_size = TLS_PRE_AUTH_READ

    def authenticated(self) -> None:
        """The peer has proved the key: read as much at a time as asyncio does (the buffer grows on the
        next read)."""
        self.max_size = sslproto.SSLProtocol.max_size

    def _on_handshake_complete(self, handshake_exc: BaseException | None) -> None:
        if handshake_exc is not None:
            try:
                self._process_outgoing()
            except Exception:  # the alert is a courtesy: never let it hide the handshake's own error
                pass
        super()._on_handshake_complete(handshake_exc)


class _TLSGate(asyncio.Protocol):
    """The first protocol of a connection to a TLS master: it looks at the first bytes, then starts TLS or
    turns the connection away. It never reads: it peeks, through a duplicate of the socket, so that the
    handshake then runs on an untouched stream, in a transport of its own (see Master._tls_handshake).

    A TLS client speaks first (its ClientHello starts with 0x16); a clusterexec peer without TLS waits in
    silence for our hello. So: no byte within TLS_SNIFF_TIMEOUT, or a first byte that does not start a TLS
    record, gets `TLS_REQUIRED_HELLO` (a plaintext clusterexec client or worker turns it into "the master
    requires TLS") and the door. A TLS record gets the handshake once it has arrived whole, within the same
    TLS_SNIFF_TIMEOUT: a peer that sends part of a ClientHello and stalls costs a socket and this object,
    never TLS state. Waiting is callbacks, not a task, to keep that small; SO_RCVLOWAT makes the socket
    readable only once the bytes waited for are all there (or the peer has gone)."""

    def __init__(self, master: Master):
        self.master = master
        self.loop = master._loop
        self.peer = "?"
        self.transport: asyncio.BaseTransport | None = None
        self.probe: socket.socket | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.task: asyncio.Task | None = None
        self.handed: socket.socket | None = None  # the socket handed to a TLS handshake that has not begun
        self.tls_transport: asyncio.BaseTransport | None = None  # the TLS handshake's
        self.closed = False
        self.want = 1  # bytes waited for: the first, then a record header, then the whole record

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.pause_reading()  # type: ignore[attr-defined]
        self.transport = transport
        self.peer = _transport_peer(transport)
        master = self.master
        master._admit(master._unauthenticated, UNAUTHENTICATED_MAX, self, self.close)
        try:
            self.probe = transport.get_extra_info("socket").dup()
        except OSError as e:  # out of file descriptors: the accepts that fail next say so (_AcceptFailures)
            log.debug("closing connection from %s: %s", self.peer, e)
            self.close()
            return
        self.loop.add_reader(self.probe.fileno(), self._readable)
        self.timer = self.loop.call_later(TLS_SNIFF_TIMEOUT, self._timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.probe is not None:  # (not once handed on)
            self.close()

    def _readable(self) -> None:
        probe = self.probe
        try:
            data = probe.recv(TLS_RECORD_MAX, socket.MSG_PEEK)
        except OSError:
            data = b""
        if len(data) < self.want:  # readable, yet short: the peer hung up (or reset)
            self.close()
            return
        if data[0] != 0x16:
            self._tls_required()
            return
        if len(data) < 5:
            self._wait_for(5)
            return
        size = 5 + int.from_bytes(data[3:5], "big")
        if size > TLS_RECORD_MAX:
            log.warning("rejected connection from %s: its first TLS record claims %d bytes", self.peer, size)
            self.close()
        elif len(data) < size:
            self._wait_for(size)
        else:  # the whole first record: over to asyncio's TLS (the first transport never read a byte)
            self._stop_waiting()
            self.probe, self.handed = None, probe
            self.transport.abort()  # type: ignore[attr-defined]
            self.master._start_tls(self, probe)

    def _wait_for(self, n: int) -> None:
        self.want = n
        try:
            self.probe.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, n)
        except OSError:
            self.close()

    def _timeout(self) -> None:
        self.timer = None
        if self.want == 1:
            self._tls_required()
        else:
            log.info("closing connection from %s: no whole TLS ClientHello within %g s", self.peer,
                     TLS_SNIFF_TIMEOUT)
            self.close()

    def _tls_required(self) -> None:
        log.warning("rejected connection from %s: it did not start TLS, which this master requires", self.peer)
        self._stop_waiting()
        self.transport.write(P.TLS_REQUIRED_HELLO)  # type: ignore[attr-defined]
        self.transport.close()
        self._forget()

    def _stop_waiting(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.probe is not None:
            self.loop.remove_reader(self.probe.fileno())
            try:
                self.probe.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
            except OSError:
                pass

    def _forget(self) -> None:
        if self.probe is not None:
            self.probe.close()
            self.probe = None
        self.master._unauthenticated.pop(self, None)

    def close(self) -> None:
        """Close the connection, wherever it is in the gate or the TLS handshake (also to make room)."""
        self.closed = True
        self._stop_waiting()
        self._forget()
        if self.transport is not None:
            self.transport.abort()  # type: ignore[attr-defined]
        if self.tls_transport is not None:  # in the handshake: its end ends the task
            self.tls_transport.abort()  # type: ignore[attr-defined]
        elif self.task is not None:
            self.task.cancel()  # (a task cancelled before it began never runs its clean-up: hence `handed`)
            self.task = None
        if self.handed is not None:
            self.handed.close()
            self.handed = None


def _evict(conn: FramedConnection) -> Callable[[], None]:
    """How to close an unauthenticated connection to make room for a new one."""
    return lambda: conn.fail(ConnectionAbortedError("too many unauthenticated connections"), abort=True)


_trim: Any = None


def _malloc_trim() -> None:
    """Hand memory the C allocator keeps in its free lists back to the system (glibc only)."""
    global _trim
    if _trim is None:
        try:
            _trim = ctypes.CDLL(None).malloc_trim
            _trim.argtypes = [ctypes.c_size_t]
            _trim.restype = ctypes.c_int
        except (OSError, AttributeError):
            _trim = False
    if _trim:
        _trim(0)


def _transport_peer(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return "?"




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
    parser.add_argument("--client-timeout", type=float, default=60.0, metavar="S",
                        help="a client whose machine acknowledges nothing for this long (down, or cut off by the "
                             "network) is given up on: its running tasks are stopped, its queued ones dropped "
                             "(default 60; more than twice --heartbeat-interval, or 0 to leave it to TCP, which "
                             "gives up after about 15 minutes)")
    parser.add_argument("--max-frame-mb", type=int, default=P.DEFAULT_MAX_FRAME >> 20, metavar="MB",
                        help="largest message a peer may send, which bounds what the master buffers for one "
                             f"connection (default {P.DEFAULT_MAX_FRAME >> 20})")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    parser.add_argument("--address-file", metavar="PATH",
                        help="once listening, write the address others should use to PATH (JSON: address, host, "
                             "port, pid, slurm_job_id), atomically; removed when the master stops")
    parser.add_argument("--advertise-host", metavar="HOST",
                        help="the host name others should connect to, in the printed lines and the address file "
                             "(default: --host, or this machine's name when listening on all interfaces)")
    add_tls_arguments(parser, "this master's")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    raise_open_files_limit()
    try:
        args.ssl_context = tls_from_arguments(args, server=True)
    except TLSConfigError as e:
        print(f"clusterexec.master: {e}", file=sys.stderr)
        return 2
    if not 0 < args.heartbeat_interval < args.heartbeat_timeout:
        print("clusterexec.master: need 0 < --heartbeat-interval < --heartbeat-timeout", file=sys.stderr)
        return 2
    if not (args.client_timeout == 0 or 2 * args.heartbeat_interval < args.client_timeout < float("inf")):
        # (Below two intervals, a result caught in flight after a quiet interval could look unanswered.)
        print("clusterexec.master: --client-timeout must be 0 (off) or a number of seconds over twice "
              "--heartbeat-interval", file=sys.stderr)
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


def _write_address_file(path: str, host: str, port: int) -> str:
    """Tell others where this master is: JSON in `path`, written to a temporary file and renamed into place
    so that a reader never sees half a file (`clusterexec.slurm` polls for it)."""
    path = os.path.abspath(os.path.expanduser(path))
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    record = {"address": shown, "host": host, "port": port, "pid": os.getpid(),
              "hostname": socket.gethostname(), "slurm_job_id": os.environ.get("SLURM_JOB_ID")}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(record, f)
        f.write("\n")
    os.replace(tmp, path)
    return path


def _remove_address_file(path: str) -> None:
    """Remove the address file if it is still ours (a newer master may have replaced it)."""
    try:
        with open(path) as f:
            if json.load(f).get("pid") != os.getpid():
                return
        os.unlink(path)
    except (OSError, ValueError):
        pass


async def _serve(key: bytes, source: str, args: argparse.Namespace) -> int:
    master = Master(key, heartbeat_interval=args.heartbeat_interval, heartbeat_timeout=args.heartbeat_timeout,
                    max_frame=args.max_frame_mb << 20, ssl_context=args.ssl_context,
                    client_timeout=args.client_timeout)
    # Signals first: a SIGTERM right after start (say, scancel) still stops cleanly and removes the
    # address file.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    received: list[str] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda s=sig: (received.append(s.name), stop.set()))
    try:
        host, port = await master.start(args.host, args.port)
    except OSError as e:
        print(f"clusterexec.master: cannot listen on {args.host}:{args.port}: {e.strerror or e}", file=sys.stderr)
        return 2
    shown = args.advertise_host or advertised_host(host)
    if args.address_file:
        try:
            address_file = _write_address_file(args.address_file, shown, port)
        except OSError as e:
            master.close()
            print(f"clusterexec.master: cannot write the address file {args.address_file}: {e}", file=sys.stderr)
            return 2
        # Removed at interpreter exit, which follows every clean stop (SIGTERM, SIGINT, scancel).
        atexit.register(_remove_address_file, address_file)
    if args.ssl_context is None:
        print(f"clusterexec master listening on {host}:{port} (key from {source})\n"
              f"  start workers:  python -m clusterexec.worker {shown}:{port}\n"
              f"  connect:        ClusterExecutor(\"{shown}:{port}\")", flush=True)
    else:
        print(f"clusterexec master listening on {host}:{port} with TLS (key from {source}; peers need a "
              f"certificate signed by the CA in {args.tls_ca})\n"
              f"  start workers:  python -m clusterexec.worker {shown}:{port} --tls-cert CERT --tls-key KEY "
              f"--tls-ca {args.tls_ca}\n"
              f"  connect:        ClusterExecutor(\"{shown}:{port}\", tls_cert=CERT, tls_key=KEY, "
              f"tls_ca=\"{args.tls_ca}\")", flush=True)
    agent = None
    if args.workers:
        from .worker import Agent
        agent = Agent(("127.0.0.1", port), key, nprocs=args.workers)
        await agent.start(link=master.local_link())
    await stop.wait()
    reason = f"the master received {received[0] if received else 'a stop request'}"
    log.info("shutting down (%s); telling %d clients and %d worker nodes", reason,
             len(master._client_conn), len(master._node_conn))
    master.announce_shutdown(reason)
    if agent is not None:
        await agent.stop()
    master.close()
    return 0


# ---------------------------------------------------------------------------------------------- local mode


async def _run_local(config: dict, port_fd: int, lender: socket.socket | None) -> None:
    from .worker import Agent

    key = bytes.fromhex(config["key"])
    prefix = config.get("shm_prefix")
    if prefix:
        os.environ[shm.ENV_PREFIX] = prefix  # for the task processes the agent forks
    master = Master(key)
    _, port = await master.start("127.0.0.1", 0)
    agent = Agent(("127.0.0.1", port), key, nprocs=int(config["nprocs"]), connect_timeout=10)
    await agent.start(link=master.local_link(), lender=lender)
    os.write(port_fd, f"{port}\n".encode())
    os.close(port_fd)
    loop = asyncio.get_running_loop()
    parent_gone = asyncio.Event()
    stdin = sys.stdin.buffer.raw

    def on_stdin() -> None:
        try:
            data = os.read(stdin.fileno(), 4096)
        except OSError:
            data = b""
        if not data:
            parent_gone.set()

    loop.add_reader(stdin.fileno(), on_stdin)
    closed = asyncio.ensure_future(agent.closed.wait())
    gone = asyncio.ensure_future(parent_gone.wait())
    await asyncio.wait([closed, gone], return_when=asyncio.FIRST_COMPLETED)
    loop.remove_reader(stdin.fileno())
    await agent.stop()
    master.close()
    if prefix:
        shm.remove_prefix(prefix)  # segments of results never collected, of a client that died


def run_local() -> None:
    """The child process of a local-mode executor (see local.LocalCluster): a master on 127.0.0.1 and one node in
    its event loop, until the executor closes our stdin (or its process ends, which closes it too)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the user's Ctrl-C is for the user's program
    # The user's Futures already carry every failure; the cluster's own warnings would only repeat them.
    logging.getLogger("clusterexec").setLevel(logging.ERROR)
    port_fd = int(sys.argv[1])
    lender = socket.socket(fileno=int(sys.argv[2])) if len(sys.argv) > 2 else None
    line = sys.stdin.buffer.readline()
    if not line:
        return
    config = json.loads(line)
    sys.path[:] = config["sys_path"]
    asyncio.run(_run_local(config, port_fd, lender))


if __name__ == "__main__":
    sys.exit(main())

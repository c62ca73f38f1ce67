"""The asyncio shell around `protocol`: one framed, authenticated connection.

    bytes ─▶ buffer_updated ─▶ handshake (server or client role, fixed sizes) ─▶ FrameReader ─▶ on_messages
    (a buffered protocol: the socket is read straight into the FrameReader's buffer, so a large frame's
    bytes land where they stay, with no copy in between)
    send(header, buffers) ─▶ transport.writelines (no joining of large buffers; on Python 3.11 a large frame
    goes to the transport a slice at a time, see _pace)

Used by the master (server role), the node agent towards the master (client role) and the agent towards its
task processes (no handshake: a private socketpair). Malformed input closes this connection alone.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from . import protocol as P

log = logging.getLogger("clusterexec.connection")

HANDSHAKE_TIMEOUT = 10.0
_PACE_LARGE = sys.version_info < (3, 12)
_PACE_SLICE = 1 << 18


_scratch = threading.local()  # one read buffer per thread, shared by that thread's connections


def _thread_scratch() -> memoryview:
    view = getattr(_scratch, "view", None)
    if view is None:
        view = _scratch.view = memoryview(bytearray(P.FrameReader.SCRATCH))
    return view


class FramedConnection(asyncio.BufferedProtocol):
    def __init__(self, *, role: str, key: bytes | None,
                 on_ready: Callable[[FramedConnection], None],
                 on_messages: Callable[[FramedConnection, list[P.Message]], None],
                 on_lost: Callable[[FramedConnection, BaseException | None], None],
                 max_header: int = P.DEFAULT_MAX_HEADER, max_frame: int = P.DEFAULT_MAX_FRAME,
                 key_advice: str = "use the master's key"):
        assert role in ("server", "client", "none")
        self.role = role
        self.key = key
        self.key_advice = key_advice  # (client role: what to do when the master rejects our key)
        self.on_ready = on_ready
        self.on_messages = on_messages
        self.on_lost = on_lost
        self.reader = P.FrameReader(max_header, max_frame, scratch=_thread_scratch())
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.ready = False
        self.closed = False
        self.error: BaseException | None = None
        self.state: Any = None  # what the owner attaches (a client, a node, a task process)
        # Loop time of the last bytes received, whole frames or not: a peer in the middle of sending us a
        # frame bigger than (bandwidth × heartbeat timeout) is alive, though no message has arrived yet.
        self.last_heard = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending = bytearray()
        self._handshake_buffer = memoryview(bytearray(256))  # the few bytes before authentication
        self._challenge = P.new_challenge()
        self._timer: asyncio.TimerHandle | None = None
        self._sent_proof = False
        self._paced: deque[memoryview] = deque()
        self._close_when_paced = False

    # ------------------------------------------------------------------------------------------ asyncio

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.closed:  # failed before it was made (the master closed it to make room): nothing to do
            transport.abort()  # type: ignore[attr-defined]
            return
        self.transport = transport  # type: ignore[assignment]
        # Kept: asyncio.get_running_loop() costs a getpid() system call on every call before Python 3.12.
        self._loop = asyncio.get_running_loop()
        self.last_heard = self._loop.time()
        if _PACE_LARGE:
            transport.set_write_buffer_limits(high=0)  # resume_writing() then says when it is empty
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self.peer = f"{peer[0]}:{peer[1]}"
        if self.role == "none":
            self._become_ready()
            return
        self._timer = self._loop.call_later(HANDSHAKE_TIMEOUT, self._handshake_timeout)
        if self.role == "server":
            transport.write(P.server_hello(self._challenge))  # type: ignore[attr-defined]

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.ready:
            return self.reader.get_buffer()
        return self._handshake_buffer

    def buffer_updated(self, nbytes: int) -> None:
        if self.closed:
            return
        if not self.ready:  # (ready cannot change between get_buffer and this call)
            self.data_received(bytes(self._handshake_buffer[:nbytes]))
            return
        self.last_heard = self._loop.time()
        self._take(self.reader.filled, nbytes)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self.last_heard = self._loop.time()
        if not self.ready:
            self._pending += data
            try:
                self._handshake_step()
            except (P.ProtocolError, ConnectionError) as e:
                self.fail(e)
                return
            if not self.ready or not self._pending:
                return
            data, self._pending = bytes(self._pending), bytearray()
        self._take(self.reader.feed, data)

    def _take(self, read: Callable[[Any], list[P.Message]], arg: Any) -> None:
        """Let the reader take new bytes and hand on the messages they complete. Malformed input, or a
        message its handler finds malformed, closes this connection."""
        try:
            messages = read(arg)
            if messages:
                self.on_messages(self, messages)
        except P.ProtocolError as e:
            log.warning("closing connection from %s: %s", self.peer, e)
            self.fail(e)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed and self.role != "none":  # the peer went away (we did not close it)
            if not self.ready and self.role == "server":
                log.info("connection from %s closed before authenticating", self.peer)
            elif self.reader.buffered:
                log.warning("connection with %s closed in the middle of a frame (%d bytes unread)",
                            self.peer, self.reader.buffered)
        self.closed = True
        self._paced.clear()
        if self._timer is not None:
            self._timer.cancel()
        self._report_lost(self.error or exc)

    def _report_lost(self, exc: BaseException | None) -> None:
        on_lost, self.on_lost = self.on_lost, _ignore_lost
        on_lost(self, exc)

    # ------------------------------------------------------------------------------------------ handshake

    def _handshake_step(self) -> None:
        buf = self._pending
        if self.role == "server":
            if len(buf) < P.CLIENT_PROOF.size:
                return
            verdict = P.server_check(self.key or b"", self._challenge, bytes(buf[: P.CLIENT_PROOF.size]))
            del buf[: P.CLIENT_PROOF.size]
            self.transport.write(verdict)  # type: ignore[union-attr]
            if not verdict.startswith(P.VERDICT_OK):
                reason = "wrong protocol version" if verdict.startswith(P.VERDICT_WRONG_VERSION) else "wrong key"
                log.warning("rejected connection from %s: %s", self.peer, reason)
                raise P.AuthenticationError(reason)
            self._become_ready()
        else:  # client
            if not self._sent_proof:
                if len(buf) < P.SERVER_HELLO.size:
                    return
                proof = P.client_proof(self.key or b"", bytes(buf[: P.SERVER_HELLO.size]), self._challenge)
                del buf[: P.SERVER_HELLO.size]
                self.transport.write(proof)  # type: ignore[union-attr]
                self._sent_proof = True
            if len(buf) < P.SERVER_VERDICT_SIZE:
                return
            P.client_check(self.key or b"", self._challenge, bytes(buf[: P.SERVER_VERDICT_SIZE]), self.key_advice)
            del buf[: P.SERVER_VERDICT_SIZE]
            self._become_ready()

    def _become_ready(self) -> None:
        self.ready = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.on_ready(self)

    def _handshake_timeout(self) -> None:
        if not self.ready and not self.closed:
            log.warning("closing connection from %s: no authentication within %.0f s", self.peer, HANDSHAKE_TIMEOUT)
            self.fail(TimeoutError("authentication timed out"))

    # ------------------------------------------------------------------------------------------ output

    def send(self, header: dict[str, Any], buffers: list[Any] | tuple = ()) -> None:
        # (is_closing: asyncio closes a transport itself when the peer hangs up, and calls connection_lost only
        # once what it still holds has left, maybe never; from Python 3.12 a write in between raises TypeError.)
        if self.closed or self.transport is None or self.transport.is_closing():
            return
        pieces = P.encode(header, buffers)
        # (len > 2: a frame with buffers; a header alone is small, and its size is not worth counting here)
        if self._paced or (_PACE_LARGE and len(pieces) > 2 and P.nbytes(pieces) >= P.FrameReader.LARGE):
            self._paced.extend(memoryview(p).cast("B") for p in pieces)
            self._pace()
        else:
            self.transport.writelines(pieces)

    def unsent(self) -> int:
        """Bytes sent on this connection that its peer has not taken yet."""
        waiting = sum(piece.nbytes for piece in self._paced)
        if self.transport is None:
            return waiting
        try:
            return waiting + self.transport.get_write_buffer_size()
        except (AttributeError, RuntimeError):
            return waiting

    def _pace(self) -> None:
        """Python 3.11's transport copies into a buffer of its own whatever the kernel does not take at once
        (64 MiB at a time, for a large frame), and its writelines joins everything first. So a large frame
        goes to it a slice at a time, each once the last has left: all but a slice's tail is sent from the
        sender's own memory. Later Pythons send from our buffers as they are."""
        transport = self.transport
        paced = self._paced
        while paced and not transport.get_write_buffer_size():
            piece = paced[0]
            if piece.nbytes > _PACE_SLICE:
                paced[0] = piece[_PACE_SLICE:]
                piece = piece[:_PACE_SLICE]
            else:
                paced.popleft()
            transport.write(piece)
        if not paced and self._close_when_paced:
            transport.close()

    def pause_writing(self) -> None:
        pass  # (with a high-water mark of 0, only its counterpart matters: see _pace)

    def resume_writing(self) -> None:
        if self._paced:
            self._pace()

    def fail(self, error: BaseException, abort: bool = False) -> None:
        """Close this connection because of `error` (reported once through on_lost). `abort`: the peer is
        presumed dead, so drop what waits to be sent at once, rather than keep it (and the socket) until the
        kernel gives up on delivering it."""
        if self.closed:
            return
        self.error = error
        self.closed = True
        self._paced.clear()
        if self.transport is not None:
            if abort:
                self.transport.abort()
            else:
                self.transport.close()
        if self._timer is not None:
            self._timer.cancel()
        self._report_lost(error)

    def close(self) -> None:
        """Close once everything sent has left (as a transport's close does with its own buffer)."""
        if self.transport is not None and not self.closed:
            self.closed = True
            if self._paced:
                self._close_when_paced = True
            else:
                self.transport.close()


# Bytes written to a connection and not yet taken by its peer beyond which task output is dropped (and
# counted) rather than buffered: a task printing in a loop must not fill the agent's or the master's memory.
OUTPUT_BACKLOG = 8 << 20


def loop_is_idle(loop: asyncio.AbstractEventLoop) -> bool:
    """True when no other callback waits to run in this iteration of the loop: then work that is usually put
    off to batch it with theirs (a flush) may as well be done now. False when it cannot tell."""
    ready = getattr(loop, "_ready", None)
    return ready is not None and not ready


def backlog(conn: Any) -> int:
    """Bytes written to a connection that its peer has not taken yet (0 for an in-process link)."""
    unsent = getattr(conn, "unsent", None)
    return unsent() if unsent is not None else 0


def _ignore_lost(conn: FramedConnection, exc: BaseException | None) -> None:
    pass


class LinkEnd:
    """One end of an in-process link: the same interface as `FramedConnection`, without a socket.

    The master and an agent living in the same event loop (local mode, `master --workers N`) talk through
    a pair of these: messages are handed over as they are, batched into one delivery per loop iteration,
    with no encoding, no copy and no system call. An end marked `direct` hands its messages over at once
    instead (one loop iteration less per hop), unless the other end is busy handling earlier ones; only one
    of the two ends may be direct, so that neither side's handler ever runs inside the other's.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self.other: LinkEnd | None = None
        self.peer = "in-process"
        self.ready = True
        self.closed = False
        self.error: BaseException | None = None
        self.state: Any = None
        self.on_messages: Callable[[Any, list[P.Message]], None] | None = None
        self.on_lost: Callable[[Any, BaseException | None], None] = _ignore_lost
        self._inbox: list[P.Message] = []
        self._scheduled = False
        self._delivering = False
        self.direct = False

    def bind(self, on_ready: Callable[[Any], None], on_messages: Callable[[Any, list[P.Message]], None],
             on_lost: Callable[[Any, BaseException | None], None]) -> None:
        self.on_messages = on_messages
        self.on_lost = on_lost
        on_ready(self)

    def send(self, header: dict[str, Any], buffers: list[Any] | tuple = ()) -> None:
        other = self.other
        if self.closed or other is None or other.closed:
            return
        other._inbox.append(P.Message(header, [memoryview(b).cast("B") for b in buffers]))
        if other._scheduled:
            return
        if self.direct and not other._delivering:
            other._deliver()
            return
        other._scheduled = True
        self._loop.call_soon(other._deliver)

    def _deliver(self) -> None:
        self._scheduled = False
        messages, self._inbox = self._inbox, []
        if self.closed or not messages or self.on_messages is None:
            return
        self._delivering = True
        try:
            self.on_messages(self, messages)
        except P.ProtocolError as e:
            log.warning("closing in-process link: %s", e)
            self.fail(e)
        finally:
            self._delivering = False

    def fail(self, error: BaseException | None, abort: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        self.error = error
        on_lost, self.on_lost = self.on_lost, _ignore_lost
        self._loop.call_soon(on_lost, self, error)
        if self.other is not None:
            self.other.fail(None)

    def close(self) -> None:
        self.fail(None)


def local_link(loop: asyncio.AbstractEventLoop) -> tuple[LinkEnd, LinkEnd]:
    a, b = LinkEnd(loop), LinkEnd(loop)
    a.other, b.other = b, a
    return a, b

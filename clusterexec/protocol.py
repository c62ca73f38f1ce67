"""Wire format shared by client, master, node agent and task processes (sans-I/O).

Nothing here touches a socket: bytes go in, messages come out, and the other way round.

    connection opens
      server ──  MAGIC | version | challenge_s ─────────────────────────▶ client     (38 bytes)
      server ◀── MAGIC | version | HMAC(key, "C"+challenge_s) | challenge_c ── client (70 bytes)
      server ──  "OK" | HMAC(key, "S"+challenge_c) ─────────────────────▶ client     (34 bytes)
                 or "NO"/"VV" + 32 zero bytes, then close (wrong key / wrong version)
    a TLS master answers a peer that does not start TLS with TLS_REQUIRED | version | 32 zero bytes, then
    closes; under TLS the same handshake runs inside the encrypted connection.
    then frames, both ways:

      ┌────────┬─────────────┬──────────────────┬──────────────┬─────────┬───┬─────────┐
      │ nbufs  │ header_len  │ nbufs × buf_len  │ header (JSON)│ buf 0   │ … │ buf n-1 │
      │ u16    │ u32         │ u64 each         │ {"t": type…} │ opaque  │   │ opaque  │
      └────────┴─────────────┴──────────────────┴──────────────┴─────────┴───┴─────────┘

Headers are JSON, so reading one can never run code; buffers are opaque bytes (pickles, out-of-band
pickle buffers, function blobs) that only the client and the task processes ever unpickle.

Tasks travel in batches. A task names the blobs it depends on (its pickled function, its client's
initializer) by content hash. Each connection keeps a *mirrored* LRU of the blobs already sent over it:
the sender's `BlobLRU` and the receiver's `BlobLRU` see the same additions and touches in the same order,
so they evict the same entries, and a blob is sent again only when the receiver no longer has it. That is
how a function used by a 100,000-task map crosses each hop once.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import mmap
import os
import struct
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import AuthenticationError, ProtocolError, VersionMismatch  # noqa: F401 - raised from here
from .memory import large_buffer

PROTOCOL_VERSION = 2  # 2: large `bytes` unpickle through clusterexec.serialization._bytes_from
MAGIC = b"CLEX"
TLS_REQUIRED = b"CLXT"  # in place of MAGIC: "this master requires TLS" (see TLS_REQUIRED_HELLO)
CHALLENGE_SIZE = 32
DIGEST_SIZE = 32

SERVER_HELLO = struct.Struct("!4sH32s")  # magic, version, challenge
CLIENT_PROOF = struct.Struct("!4sH32s32s")  # magic, version, digest, challenge
SERVER_VERDICT_SIZE = 2 + DIGEST_SIZE
VERDICT_OK = b"OK"
VERDICT_WRONG_KEY = b"NO"
VERDICT_WRONG_VERSION = b"VV"
TLS_REQUIRED_HELLO = SERVER_HELLO.pack(TLS_REQUIRED, PROTOCOL_VERSION, bytes(CHALLENGE_SIZE))

_PREFIX = struct.Struct("!HI")
_BUFLEN = struct.Struct("!Q")

# A task's opts["chunk"]: its payload is a chunk of `map`, of argument tuples or of one iterable's items.
CHUNK_OF_ARGS = 1
CHUNK_OF_ITEMS = 2
MAX_TRIED = 16  # attempts a client may say a task has had before it was submitted ("tried")

DEFAULT_MAX_HEADER = 64 * 1024 * 1024
DEFAULT_MAX_FRAME = 4 * 1024 * 1024 * 1024  # the master's --max-frame-mb; a task's data must fit
MAX_BUFFERS = 65535


def _is_int(value: Any, low: int, high: int) -> bool:
    return type(value) is int and low <= value <= high


def _is_seconds(value: Any) -> bool:
    return type(value) in (int, float) and 0 < value < 1e9  # (also false for NaN)


# Task options: every key a task's `opts` may hold, who writes it, and what its value must be. The master
# checks a client's tasks against this table (`task_error`) before anything reads them: the scheduler
# (retries, tried), the node (timeout, confirm, mtpc) and the task process (init, out, chunk, shm).
TASK_OPTIONS: dict[str, Callable[[Any], bool]] = {
    "retries": lambda v: _is_int(v, 0, 1_000_000),  # executor.options(retries=N): runs again after a death
    "timeout": _is_seconds,  # executor.options(timeout=S): seconds it may run
    "tried": lambda v: _is_int(v, 1, MAX_TRIED),  # attempts made before submission (a borrowed process died)
    "confirm": lambda v: _is_int(v, 0, 1),  # the scheduler: report the start at once (its last node died)
    "mtpc": lambda v: _is_int(v, 1, 1 << 31),  # max_tasks_per_child
    "init": lambda v: _is_int(v, 0, 1),  # its second blob is the executor's initializer
    "out": lambda v: _is_int(v, 0, 1),  # 0: leave what it prints on the worker
    "chunk": lambda v: v in (CHUNK_OF_ARGS, CHUNK_OF_ITEMS) and type(v) is int,  # a chunk of map
    "shm": lambda v: type(v) is list and all(type(i) is int and i >= 0 for i in v),  # buffers in shared memory
    "byval": lambda v: type(v) is list and all(type(m) is str for m in v),  # modules sent with it (modules=)
}


def task_error(task: Task) -> str | None:
    """What is wrong with a task as a client sent it (its options, or what they say of its blobs and buffers),
    or None."""
    opts = task.opts
    if not task.deps:
        return "a task needs its function's blob"
    if opts is None:
        return None
    if type(opts) is not dict:
        return f"task options must be a mapping, not {type(opts).__name__}"
    for key, value in opts.items():
        check = TASK_OPTIONS.get(key)
        if check is None:
            return f"unknown task option {key!r}"
        if not check(value):
            return f"task option {key!r} has an invalid value {value!r}"
    if opts.get("init") and len(task.deps) < 2:
        return "task option 'init' without the initializer's blob"
    if any(i >= len(task.bufs) for i in opts.get("shm", ())):
        return "task option 'shm' names a buffer the task does not have"
    return None


# ---------------------------------------------------------------------------------------------- messages

# Every message that travels after the handshake, declared once: (who sends it, its type "t") → its fields and
# the JSON type each must have ("name?" for a field that may be missing). The roles: "client" (an executor, or
# the status command), "master", "node" (a worker node's agent), "lender" (the local-mode agent, on the
# channel over which it lends a client an idle task process) and "borrower" (that client, on the same channel).
# A process run as a task process speaks "run"/"results"/"output" with whoever holds its socket (see worker.py).
# Receivers check what they are sent with `check_message` before they read a field.
_INT, _NUM, _STR, _LIST, _DICT = int, (int, float), str, list, dict
MESSAGES: dict[tuple[str, str], dict[str, Any]] = {
    # client → master
    ("client", "hello"): {"role": _STR, "name?": _STR, "host?": _STR, "pid?": _INT, "python?": _STR,
                          "cloudpickle?": _STR, "version?": _STR, "compat_wait?": _NUM, "acks?": _INT,
                          "resume?": _DICT},
    ("client", "submit"): {"tasks": _LIST},
    ("client", "cancel"): {"req": _INT, "ids": _LIST},
    ("client", "kill"): {"ids": _LIST},
    ("client", "status"): {},
    ("client", "got"): {"n": _INT},  # results of its session received so far (see master.Master._resume)
    # node → master
    ("node", "hello"): {"role": _STR, "nprocs": _INT},
    ("node", "results"): {"items": _LIST},
    ("node", "output"): {"items": _LIST},
    ("node", "started"): {"ids": _LIST},
    ("node", "pong"): {},
    ("node", "prefetch"): {"n": _INT, "back?": _LIST},
    ("node", "leaving"): {"ids": _LIST},
    ("node", "cancel_reply"): {"key": _INT, "cancelled": _LIST, "refused": _LIST},
    # master → client, node or status command
    ("master", "welcome"): {"id": _INT, "heartbeat?": _LIST, "max_frame?": _INT, "procs?": _INT, "nodes?": _INT,
                            "version?": _STR, "session?": (str, type(None)), "resumed?": bool},
    ("master", "results"): {"items": _LIST},
    ("master", "output"): {"items": _LIST},
    ("master", "started"): {"ids": _LIST},
    ("master", "cancel_reply"): {"req": _INT, "cancelled": _LIST, "refused": _LIST},
    ("master", "status"): {},  # (what Master.status() returns, read by the status command and cluster_info())
    ("master", "notice"): {"text": _STR},
    ("master", "shutdown"): {"reason?": _STR},
    ("master", "ping"): {},
    ("master", "tasks"): {"tasks": _LIST},
    ("master", "cancel"): {"key": _INT, "ids": _LIST},
    ("master", "kill"): {"ids": _LIST},
    ("master", "drop"): {"ids": _LIST},
    # the local-mode agent and its client, on the lender channel (see worker.Agent._lend, client._Lease)
    ("borrower", "lend"): {},
    ("borrower", "return"): {"pid": _INT, "sent": _LIST},
    ("borrower", "kill"): {"pid": _INT, "task?": _INT},
    ("lender", "lent"): {"pid": _INT, "host": _STR, "sent": _LIST},
    ("lender", "no"): {},
    ("lender", "died"): {"pid": _INT, "task?": (int, type(None)), "info?": (dict, type(None))},
}


def check_message(sender: str, header: Any) -> str:
    """The type of a message from `sender`, once its header has every field `MESSAGES` declares for it, each of
    the right type; raises `ProtocolError` otherwise (the receiver closes that connection, and only that one)."""
    if type(header) is not dict:
        raise ProtocolError(f"a message header must be a JSON object, not {type(header).__name__}")
    kind = header.get("t")
    fields = MESSAGES.get((sender, kind)) if type(kind) is str else None
    if fields is None:
        raise ProtocolError(f"unknown message type {kind!r} from a {sender}")
    for name, types in fields.items():
        optional = name.endswith("?")
        name = name.rstrip("?")
        if name not in header:
            if optional:
                continue
            raise ProtocolError(f"{kind!r} message from a {sender} without its field {name!r}")
        value = header[name]
        if not isinstance(value, types) or (type(value) is bool and types in (_INT, _NUM)):
            raise ProtocolError(f"{kind!r} message from a {sender}: field {name!r} has the wrong type "
                                f"({type(value).__name__})")
    return kind


# ---------------------------------------------------------------------------------------------- handshake


def new_challenge() -> bytes:
    return os.urandom(CHALLENGE_SIZE)


def _digest(key: bytes, role: bytes, challenge: bytes) -> bytes:
    return hmac.new(key, role + challenge, hashlib.sha256).digest()


def server_hello(challenge: bytes) -> bytes:
    return SERVER_HELLO.pack(MAGIC, PROTOCOL_VERSION, challenge)


def client_proof(key: bytes, hello: bytes, my_challenge: bytes) -> bytes:
    """Answer a server hello; raises if the server is not a clusterexec master of our version."""
    magic, version, challenge = SERVER_HELLO.unpack(hello)
    if magic == TLS_REQUIRED:
        raise AuthenticationError(
            "the master requires TLS: give this client tls_cert=, tls_key= and tls_ca= (a worker or the status "
            "command: --tls-cert, --tls-key, --tls-ca), with a certificate signed by the cluster's CA")
    if magic != MAGIC:
        raise ProtocolError("the server is not a clusterexec master (wrong greeting); check the address and port")
    if version != PROTOCOL_VERSION:
        raise VersionMismatch(
            f"the master speaks clusterexec protocol {version}, this program speaks {PROTOCOL_VERSION}; "
            "install the same clusterexec version on every machine"
        )
    return CLIENT_PROOF.pack(MAGIC, PROTOCOL_VERSION, _digest(key, b"C", challenge), my_challenge)


def server_check(key: bytes, my_challenge: bytes, proof: bytes) -> bytes:
    """Check a client's proof; returns the verdict to send (starting with VERDICT_OK when accepted)."""
    magic, version, digest, challenge = CLIENT_PROOF.unpack(proof)
    if magic != MAGIC:
        return VERDICT_WRONG_KEY + bytes(DIGEST_SIZE)
    if version != PROTOCOL_VERSION:
        return VERDICT_WRONG_VERSION + bytes(DIGEST_SIZE)
    if not hmac.compare_digest(digest, _digest(key, b"C", my_challenge)):
        return VERDICT_WRONG_KEY + bytes(DIGEST_SIZE)
    return VERDICT_OK + _digest(key, b"S", challenge)


def client_check(key: bytes, my_challenge: bytes, verdict: bytes, advice: str = "use the master's key") -> None:
    """Check the server's verdict; raises a clear error unless both sides proved the key. `advice`: how the
    caller's user gives it the right key (a program, a worker and a command each have their own ways)."""
    word, digest = verdict[:2], verdict[2:]
    if word == VERDICT_WRONG_VERSION:
        raise VersionMismatch("the master rejected our protocol version; install the same clusterexec everywhere")
    if word != VERDICT_OK:
        raise AuthenticationError(f"the master rejected our authentication key: {advice}")
    if not hmac.compare_digest(digest, _digest(key, b"S", my_challenge)):
        raise AuthenticationError("the master could not prove it knows our authentication key; refusing to talk to it")


# ---------------------------------------------------------------------------------------------- frames


_JSON = json.JSONEncoder(separators=(",", ":"))  # (json.dumps with any option makes a new encoder per call)


def encode(header: dict[str, Any], buffers: Sequence[Any] = ()) -> list[Any]:
    """One frame as a list of byte-like pieces, ready for `writelines`/`sendmsg` without joining."""
    head = _JSON.encode(header).encode()
    if len(buffers) > MAX_BUFFERS:
        raise ValueError(f"a frame carries at most {MAX_BUFFERS} buffers")
    lens = [memoryview(b).nbytes for b in buffers]
    prefix = _PREFIX.pack(len(buffers), len(head)) + b"".join(_BUFLEN.pack(n) for n in lens)
    return [prefix, head, *buffers]


def sent_off(views: list[memoryview], sent: int) -> None:
    """Drop the first `sent` bytes from a list of pieces being written (what one sendmsg took)."""
    while sent:
        if sent >= views[0].nbytes:
            sent -= views.pop(0).nbytes
        else:
            views[0] = views[0][sent:]
            sent = 0


def encode_bytes(header: dict[str, Any], buffers: Sequence[Any] = ()) -> bytes:
    return b"".join(bytes(p) if not isinstance(p, bytes) else p for p in encode(header, buffers))


@dataclass(slots=True)
class Message:
    header: dict[str, Any]
    buffers: list[memoryview]

    @property
    def type(self) -> str:
        return self.header["t"]


class FrameReader:
    """Turns a byte stream into `Message`s. Raises `ProtocolError` on anything malformed or oversized.

    Small frames are cut out of an accumulating buffer. A large frame (a big array, say) gets a buffer of
    its exact size as soon as its length is known: its message buffers are views of that one allocation.
    Bytes go in either by `feed` (copied in), or straight from the socket: `get_buffer` says where to read
    (the unfilled rest of a large frame, or else a scratch buffer), `filled` how much was read. Read that
    way, a large frame's bytes are copied once, by the kernel, to where they stay.
    """

    LARGE = 1 << 20
    PREALLOCATE = 64 << 20
    SCRATCH = 1 << 18  # what one read takes at most between large frames (asyncio's own read size)

    def __init__(self, max_header: int = DEFAULT_MAX_HEADER, max_frame: int = DEFAULT_MAX_FRAME,
                 scratch: memoryview | None = None):
        self.max_header = max_header
        self.max_frame = max_frame
        self._buf = bytearray()
        self._need: tuple[int, int, list[int]] | None = None  # header_len, payload_len, buffer lens
        self._frame: mmap.mmap | bytearray | None = None  # a large frame being filled in place
        self._filled = 0
        # `feed` copies out whatever it is given before it returns, so readers that take turns in one
        # thread may share a scratch buffer.
        self._scratch = scratch

    def get_buffer(self) -> memoryview:
        """Where the next bytes of the stream should be read into; then call `filled` with their count."""
        if self._frame is not None:
            return memoryview(self._frame)[self._filled :]
        if self._scratch is None:
            self._scratch = memoryview(bytearray(self.SCRATCH))
        return self._scratch

    def filled(self, n: int) -> list[Message]:
        """The messages completed by `n` bytes read into the buffer `get_buffer` returned."""
        if self._frame is None:
            return self.feed(self._scratch[:n])
        self._filled += n
        if self._filled < len(self._frame):
            return []
        return [self._frame_done()]

    def _frame_done(self) -> Message:
        frame = self._frame
        self._frame, self._filled = None, 0
        return self._message(frame)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Message]:
        out: list[Message] = []
        if self._frame is not None:
            data = memoryview(data).cast("B")
            frame = self._frame
            n = min(len(data), len(frame) - self._filled)
            frame[self._filled : self._filled + n] = data[:n]
            self._filled += n
            if self._filled < len(frame):
                return out
            out.append(self._frame_done())
            data = data[n:]
            if not data:
                return out
        self._buf += data
        buf = self._buf
        pos = 0
        while True:
            if self._need is None:
                if len(buf) - pos < _PREFIX.size:
                    break
                nbufs, head_len = _PREFIX.unpack_from(buf, pos)
                if head_len > self.max_header:
                    raise ProtocolError(f"frame header of {head_len} bytes exceeds the limit of {self.max_header}")
                if len(buf) - pos < _PREFIX.size + 8 * nbufs:
                    break
                lens = list(struct.unpack_from(f"!{nbufs}Q", buf, pos + _PREFIX.size))
                total = sum(lens)
                if total > self.max_frame:
                    raise ProtocolError(f"frame of {total} bytes exceeds the limit of {self.max_frame}")
                pos += _PREFIX.size + 8 * nbufs
                self._need = (head_len, total, lens)
            head_len, total, lens = self._need
            size = head_len + total
            have = len(buf) - pos
            if have < size:
                # Allocate the whole frame only once its sender has shown it means it: a peer merely
                # claiming a huge frame must not make us reserve that much memory.
                if size >= self.LARGE and (size <= self.PREALLOCATE or have * 8 >= size):
                    frame = large_buffer(size)
                    with memoryview(buf) as view:
                        frame[:have] = view[pos:]
                    pos += have
                    self._frame, self._filled = frame, have
                break
            with memoryview(buf) as view:
                frame = bytes(view[pos : pos + size])
            pos += size
            out.append(self._message(frame))
        if pos:
            del buf[:pos]
        return out

    def _message(self, frame: bytes | bytearray) -> Message:
        head_len, _, lens = self._need
        self._need = None
        try:
            header = json.loads(bytes(frame[:head_len]))
        except (ValueError, UnicodeDecodeError) as e:
            raise ProtocolError(f"frame header is not JSON: {e}") from None
        except RecursionError:  # nested deeper than the parser recurses: no header we send is
            raise ProtocolError("frame header is nested too deep") from None
        if not isinstance(header, dict) or not isinstance(header.get("t"), str):
            raise ProtocolError("frame header has no message type")
        view = memoryview(frame)
        buffers = []
        off = head_len
        for n in lens:
            buffers.append(view[off : off + n])
            off += n
        return Message(header, buffers)

    @property
    def buffered(self) -> int:
        return len(self._buf) + self._filled


# ---------------------------------------------------------------------------------------------- blobs


def blob_hash(data: bytes | memoryview) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


class BlobLRU:
    """One side of a per-connection mirrored blob cache.

    The sender keeps sizes only; the receiver keeps the values. Both call `touch` when a task refers to a
    blob and `add` when the blob travels inline, in the same order, so both evict the same entries.
    """

    def __init__(self, max_bytes: int = 512 * 1024 * 1024, max_items: int = 256,
                 on_evict: Callable[[str], None] | None = None):
        self.max_bytes = max_bytes
        self.max_items = max_items
        self.on_evict = on_evict
        self._items: OrderedDict[str, tuple[int, Any]] = OrderedDict()
        self._bytes = 0

    def __contains__(self, h: str) -> bool:
        return h in self._items

    def __len__(self) -> int:
        return len(self._items)

    def touch(self, h: str) -> bool:
        if h in self._items:
            self._items.move_to_end(h)
            return True
        return False

    def get(self, h: str) -> Any:
        return self._items[h][1]

    def export(self) -> list[list[Any]]:
        """A sender's state, oldest first, for another sender to carry on from (see `restored`)."""
        return [[h, size] for h, (size, _) in self._items.items()]

    @classmethod
    def restored(cls, entries: Any) -> BlobLRU:
        """A sender's mirror rebuilt from `export()`; ValueError or TypeError if `entries` are not such a list."""
        lru = cls()
        for h, size in entries:
            if not isinstance(h, str) or type(size) is not int or size < 0 or h in lru._items:
                raise ValueError(f"not a cache entry: {h!r}, {size!r}")
            lru._items[h] = (size, None)
            lru._bytes += size
        if len(lru._items) > lru.max_items or (lru._bytes > lru.max_bytes and len(lru._items) > 1):
            raise ValueError("more cache entries than a cache holds")  # (`add` keeps one entry, however large)
        return lru

    def add(self, h: str, size: int, value: Any = None) -> None:
        old = self._items.pop(h, None)
        if old is not None:
            self._bytes -= old[0]
        self._items[h] = (size, value)
        self._bytes += size
        while (self._bytes > self.max_bytes or len(self._items) > self.max_items) and len(self._items) > 1:
            victim, (vsize, _) = self._items.popitem(last=False)
            self._bytes -= vsize
            if self.on_evict is not None:
                self.on_evict(victim)


@dataclass(slots=True)
class Blob:
    hash: str
    data: Any  # bytes-like


@dataclass(slots=True)
class Task:
    """What travels for one task: an id meaningful on this hop, its blobs, its payload and options."""

    id: int
    deps: list[Blob]
    bufs: list[Any]
    opts: dict[str, Any] | None = None
    # bookkeeping of the holder, never sent:
    extra: Any = field(default=None, compare=False)


def encode_tasks(tasks: Iterable[tuple[int, Task]], sent: BlobLRU) -> tuple[list[Any], list[Any]]:
    """Entries for a header and the flat buffer list of (id on this hop, task) pairs.

    Blobs the receiver still has are sent by hash only.
    """
    entries: list[Any] = []
    buffers: list[Any] = []
    for task_id, task in tasks:
        hashes = []
        inline = []
        for blob in task.deps:
            hashes.append(blob.hash)
            if sent.touch(blob.hash):
                inline.append(0)
            else:
                sent.add(blob.hash, memoryview(blob.data).nbytes)
                inline.append(1)
                buffers.append(blob.data)
        buffers.extend(task.bufs)
        entries.append([task_id, hashes, inline, len(task.bufs), task.opts])
    return entries, buffers


SMALL_BUFFER = 4096  # a task's buffers smaller than this are copied out of their frame (see decode_tasks)


def decode_tasks(entries: Any, buffers: list[memoryview], cache: BlobLRU, *, verify: bool = False) -> list[Task]:
    """Inverse of `encode_tasks`; raises `ProtocolError` for malformed entries or unknown blobs.

    `verify`: check each blob that arrives against the hash it is sent under (the master does, for what
    clients send). Blobs are cached and forwarded by hash, so a blob sent under another's hash would
    otherwise stand in for that blob wherever the hash is known: on a worker node, for another client.

    Queued tasks are many, so each should be small: tasks share one `Blob` object per blob (the cache
    keeps it), and a small buffer is copied out of its frame (a `bytes` of a few dozen bytes is smaller than
    a view, and it does not keep the whole frame alive until the frame's last task is done)."""
    tasks = []
    pos = 0
    try:
        for task_id, hashes, inline, nbufs, opts in entries:
            deps = []
            for h, is_inline in zip(hashes, inline, strict=True):
                if is_inline:
                    data = buffers[pos]
                    pos += 1
                    if verify and blob_hash(data) != h:
                        raise ProtocolError(f"a blob sent under hash {str(h)[:40]!r} does not match its hash")
                    cache.add(h, data.nbytes, Blob(h, data))
                elif not cache.touch(h):
                    raise ProtocolError(f"task refers to blob {h} that was never sent")
                deps.append(cache.get(h))
            if pos + nbufs > len(buffers) or nbufs < 0:
                raise ProtocolError("task entry claims more buffers than the frame has")
            tasks.append(Task(int(task_id), deps,
                              [b.tobytes() if b.nbytes < SMALL_BUFFER else b for b in buffers[pos : pos + nbufs]],
                              opts))
            pos += nbufs
    except (TypeError, ValueError, IndexError) as e:
        raise ProtocolError(f"malformed task entry: {e}") from None
    if pos != len(buffers):
        raise ProtocolError("frame has buffers that no task claims")
    return tasks


def split_buffers(items: Sequence[Sequence[Any]], buffers: list[memoryview],
                  count_index: int = 2) -> list[list[memoryview]]:
    """Give each result item its buffers (item[count_index] says how many); validates counts."""
    out = []
    pos = 0
    for item in items:
        n = item[count_index]
        if not isinstance(n, int) or n < 0 or pos + n > len(buffers):
            raise ProtocolError("result entry claims more buffers than the frame has")
        out.append(buffers[pos : pos + n])
        pos += n
    if pos != len(buffers):
        raise ProtocolError("frame has buffers that no result claims")
    return out


# ---------------------------------------------------------------------------------------------- sizes


def nbytes(buffers: Iterable[Any]) -> int:
    return sum(memoryview(b).nbytes for b in buffers)


def task_size(task: Task) -> int:
    """Bytes a task may put in a frame (its blobs counted as if they travelled inline)."""
    return nbytes(task.bufs) + nbytes(blob.data for blob in task.deps)


def in_frames(items: Iterable[Any], size: Callable[[Any], int], limit: int) -> Iterable[list[Any]]:
    """Group items, in order, so that each group fits in one frame of at most `limit` buffer bytes."""
    group: list[Any] = []
    total = 0
    for item in items:
        n = size(item)
        if group and total + n > limit:
            yield group
            group, total = [], 0
        group.append(item)
        total += n
    if group:
        yield group


def encode_results(results: Iterable[tuple[int, str, list[Any], Any]]) -> tuple[list[Any], list[Any]]:
    """Entries [id, status, nbufs, info] for a "results" header, and the flat buffer list."""
    items = []
    buffers: list[Any] = []
    for task_id, status, bufs, info in results:
        items.append([task_id, status, len(bufs), info])
        buffers.extend(bufs)
    return items, buffers


def result_size(result: tuple[int, str, list[Any], Any]) -> int:
    return nbytes(result[2])

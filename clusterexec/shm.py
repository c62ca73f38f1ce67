"""Large buffers through shared memory in local mode, instead of through two sockets each way.

    client ── arguments ≥ 1 MiB: written to /dev/shm/PREFIX-N ──────────────▶ task process maps it (copy on write)
    client ◀── result buffers ≥ 1 MiB: written to /dev/shm/PREFIX-N by the task ── client maps it, unlinks it

Only in local mode, where the client and its task processes share one machine. The master and agent still
see opaque buffers: a buffer that went through shared memory travels as a small marker naming its segment,
and the task's `opts["shm"]` (arguments) or the result's `info["shm"]` (results) lists which buffers those
are. The client unlinks argument segments when the task's Future resolves, and result segments as soon as
it has mapped them; the local-mode child removes whatever is left of PREFIX when it stops, so nothing
survives even a SIGKILLed client.
"""

from __future__ import annotations

import glob
import itertools
import mmap
import os
import secrets
from typing import Any

SHM_DIR = "/dev/shm"
MIN_SIZE = 1 << 20  # smaller buffers are cheaper through the socket
MARKER = b"clusterexec-shm:"
ENV_PREFIX = "CLUSTEREXEC_SHM_PREFIX"  # set in local mode's child, inherited by its task processes

_counter = itertools.count()


def available() -> bool:
    return os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK)


def new_prefix() -> str:
    return f"clusterexec-{os.getpid()}-{secrets.token_hex(4)}"


def put(data: Any, prefix: str) -> bytes:
    """Write `data` to a new segment; returns the marker to send in its place. Raises OSError (say, a full
    /dev/shm), for the caller to send the buffer the usual way instead."""
    name = f"{prefix}-{os.getpid()}-{next(_counter)}"
    path = os.path.join(SHM_DIR, name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(data).cast("B")
        while view:
            view = view[os.write(fd, view):]
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)
    return MARKER + name.encode()


def get(marker: Any, unlink: bool = False) -> memoryview:
    """The segment a marker names, mapped copy-on-write: writable, and changes stay in this process."""
    name = _name(marker)
    path = os.path.join(SHM_DIR, name)
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        mapped = mmap.mmap(fd, size, access=mmap.ACCESS_COPY) if size else b""
    finally:
        os.close(fd)
        if unlink:
            remove([marker])
    return memoryview(mapped)


def remove(markers: list[Any]) -> None:
    for marker in markers:
        try:
            os.unlink(os.path.join(SHM_DIR, _name(marker)))
        except (OSError, ValueError):
            pass


def remove_prefix(prefix: str) -> None:
    """Everything left of one local cluster."""
    for path in glob.glob(os.path.join(SHM_DIR, glob.escape(prefix) + "-*")):
        try:
            os.unlink(path)
        except OSError:
            pass


def offload(buffers: list[Any], prefix: str) -> tuple[list[Any], list[int]]:
    """Move the large buffers to shared memory: the new buffer list and the indices now holding markers
    (the list itself, and no index, when none is large)."""
    large = [i for i, buf in enumerate(buffers) if _size(buf) >= MIN_SIZE]
    if not large:
        return buffers, []
    moved: list[int] = []
    out = list(buffers)
    for i in large:
        try:
            out[i] = put(buffers[i], prefix)
        except OSError:
            continue  # no room in /dev/shm: this one goes through the socket
        moved.append(i)
    return out, moved


def _size(buf: Any) -> int:
    # (Most buffers are small `bytes`: their size is told without making a memoryview of each.)
    return len(buf) if type(buf) is bytes else memoryview(buf).nbytes


def restore(buffers: list[Any], indices: list[int], unlink: bool = False) -> list[Any]:
    out = list(buffers)
    for i in indices:
        out[i] = get(out[i], unlink=unlink)
    return out


def _name(marker: Any) -> str:
    raw = bytes(marker)
    if not raw.startswith(MARKER):
        raise ValueError("not a shared-memory marker")
    name = raw[len(MARKER):].decode()
    if "/" in name or not name.startswith("clusterexec-"):
        raise ValueError(f"bad shared-memory segment name {name!r}")
    return name

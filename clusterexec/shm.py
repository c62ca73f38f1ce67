"""Large buffers through shared memory in local mode, instead of through two sockets each way.

    client ── arguments ≥ 1 MiB: written to /dev/shm/PREFIX/PREFIX-PID-N ──────▶ task process reads or maps it
    client ◀── result buffers ≥ 1 MiB: written there by the task process ──────── client reads or maps it

Only in local mode, where the client and its task processes share one machine. The master and agent still
see opaque buffers: a buffer that went through shared memory travels as a small marker naming its segment,
and the task's `opts["shm"]` (arguments) or the result's `info["shm"]` (results) lists which buffers those
are. There are two kinds of segment, told apart by the marker:

- **mapped**: an array's memory, say. The reader maps the segment copy-on-write and keeps the mapping as the
  buffer: nothing is copied. The segment is unlinked (by the client: an argument's when the task's Future
  resolves, a result's once mapped), and its memory goes when the last mapping does.
- **copied**: a whole `bytes` (a large `bytes` argument or result, or a large main pickle), which the reader
  turns into a new `bytes` anyway. It reads the segment straight into one and never maps it, so once read
  the segment can be written again: it goes to a pool of free segments (see pool_limit), and the next
  large buffer is written over its pages rather than into new ones (page faults are most of the cost of
  writing 64 MiB into a new tmpfs file: 35 ms against 10). An argument's segment is recycled only when its
  task came back with a result or its own exception, that is when a task process has read it for the last
  time; after a kill, a crash or a cancel it is unlinked instead.

Each local cluster keeps its segments in a directory of its own, /dev/shm/PREFIX (mode 0700): nobody else
sees their names, and looking for free segments lists only ours. Markers come from peers, so every reader
passes its own PREFIX and a marker naming anything else is refused. The pool is shared by the client and
its task processes: a free segment is named PREFIX-…-free, and taken by renaming it, which only one process
can do. A result nobody will read goes as soon as that is known: the agent recycles those it discards
(their task was killed meanwhile), and removes those a task process wrote but died before sending (named
after their task for this). The local-mode child removes PREFIX's directory when it stops, pool included,
so nothing survives even a SIGKILLed client.
"""

from __future__ import annotations

import itertools
import mmap
import os
import secrets
import shutil
from typing import Any

from . import memory

SHM_DIR = "/dev/shm"
MIN_SIZE = 1 << 20  # smaller buffers are cheaper through the socket
MARKER = b"clusterexec-shm:"  # a mapped segment
MARKER_COPIED = b"clusterexec-shm-copied:"  # a segment read into a new `bytes`
FREE = "-free"  # the suffix of a segment in the pool
POOL_MAX = 256 << 20  # free segments kept for reuse, in bytes, per local cluster (see pool_limit)
ENV_PREFIX = "CLUSTEREXEC_SHM_PREFIX"  # set in local mode's child, inherited by its task processes

_counter = itertools.count()


def available() -> bool:
    return os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK)


def new_prefix() -> str | None:
    """A new local cluster's prefix, its directory made; None when /dev/shm will not have it."""
    prefix = f"clusterexec-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        os.mkdir(os.path.join(SHM_DIR, prefix), 0o700)
    except OSError:
        return None
    return prefix


def _path(prefix: str, name: str) -> str:
    """Where a segment of `prefix` lives: in the cluster's directory."""
    return os.path.join(SHM_DIR, prefix, name)


def put(data: Any, prefix: str, task: int | None = None) -> bytes:
    """Write `data` to a segment (a free one when the pool has one); returns the marker to send in its place:
    a copied segment's for a `bytes`, a mapped one's for anything else. Raises OSError (say, a full
    /dev/shm, or the name taken already), for the caller to send the buffer the usual way instead.

    A task process names the task whose result it writes: should it die before the marker is sent, the
    agent finds the segment by that name (see remove_unsent)."""
    tag = "" if task is None else f"t{task}."
    name = f"{prefix}-{os.getpid()}-{tag}{next(_counter)}"
    path = _path(prefix, name)
    view = memoryview(data).cast("B")
    # The name is ours only if we create it: a pooled segment is then renamed over this empty file.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        taken = _take_free(prefix, path, view.nbytes)
        if taken is not None:
            os.close(fd)
            fd = taken
        offset = 0
        while offset < len(view):
            offset += os.pwrite(fd, view[offset:], offset)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)
    return (MARKER_COPIED if type(data) is bytes else MARKER) + name.encode()


def _take_free(prefix: str, path: str, size: int) -> int | None:
    """A segment from the pool, renamed over `path` and cut to `size`, open for writing; None when the pool
    has none. The smallest that holds `size`, else the largest (whose pages are reused as far as they go)."""
    free = _free_segments(prefix)
    free.sort()
    fits = [f for f in free if f[0] >= size]
    for _, candidate in fits or reversed(free):
        try:
            fd = os.open(candidate, os.O_WRONLY)
        except OSError:
            continue  # taken meanwhile
        try:
            os.rename(candidate, path)  # atomic: of several processes opening it, one renames it
        except OSError:
            os.close(fd)
            continue
        try:
            os.ftruncate(fd, size)
        except BaseException:
            os.close(fd)
            raise
        return fd
    return None


def pool_limit() -> int:
    """Bytes of free segments to keep: POOL_MAX, or a quarter of /dev/shm when that is smaller (a container's
    /dev/shm may hold 64 MiB in all)."""
    global _pool_limit
    if _pool_limit is None:
        try:
            st = os.statvfs(SHM_DIR)
            _pool_limit = min(POOL_MAX, st.f_blocks * st.f_frsize // 4)
        except OSError:
            _pool_limit = 0
    return _pool_limit


_pool_limit: int | None = None


def _free_segments(prefix: str) -> list[tuple[int, str]]:
    """(size, path) of every segment in the pool of PREFIX."""
    out = []
    try:
        with os.scandir(os.path.join(SHM_DIR, prefix)) as entries:
            for entry in entries:
                if entry.name.endswith(FREE):
                    try:
                        out.append((entry.stat().st_size, entry.path))
                    except OSError:
                        pass  # taken meanwhile
    except OSError:
        pass
    return out


def get(marker: Any, prefix: str, unlink: bool = False) -> bytes | memoryview:
    """What a marker stands for: a copied segment as a new `bytes` (then recycled, when `unlink`), a mapped
    one mapped copy-on-write (writable, and changes stay in this process; then unlinked, when `unlink`).
    Raises ValueError for a marker that names no segment of this local cluster (of `prefix`)."""
    copied, name = _parse(marker, prefix)
    fd = os.open(_path(prefix, name), os.O_RDONLY)
    read = False
    try:
        size = os.fstat(fd).st_size
        if copied:
            data: Any = memory.bytes_read(fd, size)
        else:
            data = mmap.mmap(fd, size, access=mmap.ACCESS_COPY) if size else b""
        read = True
    finally:
        os.close(fd)
        if unlink:
            (recycle if copied and read else remove)([marker], prefix)
    return data if copied else memoryview(data)


def recycle(markers: list[Any], prefix: str) -> None:
    """Put copied segments nobody reads any more in the pool (while it has room), and remove the rest.
    Markers that name no segment of `prefix` are ignored, as in `remove`."""
    for marker in markers:
        try:
            copied, name = _parse(marker, prefix)
        except ValueError:
            continue
        path = _path(prefix, name)
        try:
            if copied and not name.endswith(FREE):
                size = os.stat(path).st_size
                if size + sum(s for s, _ in _free_segments(prefix)) <= pool_limit():
                    os.rename(path, path + FREE)
                    continue
            os.unlink(path)
        except OSError:
            pass


def remove(markers: list[Any], prefix: str) -> None:
    for marker in markers:
        try:
            os.unlink(_path(prefix, _parse(marker, prefix)[1]))
        except (OSError, ValueError):
            pass


def remove_unsent(prefix: str, pid: int, tasks: set[int]) -> None:
    """Remove the result segments process `pid` wrote for these tasks: it died before their markers
    reached anyone, so no one else knows their names. (Not the pool's: those belong to every process.)"""
    start = f"{prefix}-{pid}-t"
    try:
        with os.scandir(os.path.join(SHM_DIR, prefix)) as entries:
            doomed = [entry.path for entry in entries if entry.name.startswith(start)
                      and not entry.name.endswith(FREE) and _task_of(entry.name[len(start):]) in tasks]
    except OSError:
        return
    for path in doomed:
        try:
            os.unlink(path)
        except OSError:
            pass


def _task_of(rest: str) -> int | None:
    head, dot, _ = rest.partition(".")
    return int(head) if dot and head.isdigit() else None


def remove_prefix(prefix: str) -> None:
    """Everything left of one local cluster: its directory."""
    shutil.rmtree(os.path.join(SHM_DIR, prefix), ignore_errors=True)


def offload(buffers: list[Any], prefix: str, task: int | None = None) -> tuple[list[Any], list[int]]:
    """Move the large buffers to shared memory: the new buffer list and the indices now holding markers
    (the list itself, and no index, when none is large). `task`: see put."""
    large = [i for i, buf in enumerate(buffers) if _size(buf) >= MIN_SIZE]
    if not large:
        return buffers, []
    moved: list[int] = []
    out = list(buffers)
    for i in large:
        try:
            out[i] = put(buffers[i], prefix, task)
        except OSError:
            continue  # no room in /dev/shm: this one goes through the socket
        moved.append(i)
    return out, moved


def _size(buf: Any) -> int:
    # (Most buffers are small `bytes`: their size is told without making a memoryview of each.)
    return len(buf) if type(buf) is bytes else memoryview(buf).nbytes


def result_markers(buffers: list[Any], info: Any) -> list[Any]:
    """The markers among a result's buffers, as its `info["shm"]` lists them, whatever a peer put there."""
    if not (isinstance(info, dict) and isinstance(info.get("shm"), list)):
        return []
    return [buffers[i] for i in info["shm"] if isinstance(i, int) and 0 <= i < len(buffers)]


def restore(buffers: list[Any], indices: list[int], prefix: str, unlink: bool = False) -> list[Any]:
    out = list(buffers)
    for i in indices:
        out[i] = get(out[i], prefix, unlink=unlink)
    return out


def _parse(marker: Any, prefix: str) -> tuple[bool, str]:
    """(whether the segment is a copied one, its name) of a marker naming a segment of `prefix`. Markers come
    from peers: one that names anything else (another cluster's segment, say) raises ValueError."""
    raw = bytes(marker)
    if raw.startswith(MARKER):
        copied, raw = False, raw[len(MARKER):]
    elif raw.startswith(MARKER_COPIED):
        copied, raw = True, raw[len(MARKER_COPIED):]
    else:
        raise ValueError("not a shared-memory marker")
    name = raw.decode(errors="replace")
    if "/" in name or "\0" in name or not name.startswith(prefix + "-") or name.count("-") < 3:
        raise ValueError(f"bad shared-memory segment name {name!r}")
    return copied, name

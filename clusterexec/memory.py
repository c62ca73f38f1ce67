"""Memory for large buffers, filled once and asked to come in huge pages.

Fresh memory costs a page fault per 4 KiB page the first time it is written: for 64 MiB that is 16,384
faults, as long as the copy itself. Asked for transparent huge pages first (`madvise(MADV_HUGEPAGE)`,
honoured when the kernel's THP setting is `always` or `madvise`), it takes one fault per 2 MiB. Measured on
Linux 6.18 for 64 MiB: `bytes(view)` 27 ms, a `bytes` filled this way 7 ms; a `bytearray` 59 ms, an
anonymous mapping filled this way 4 ms. (On a virtual machine that hands free memory back to its host, a
huge page unused for a while costs the host a fault when it comes back: seen here as the odd 150-200 ms
copy. The medians still gain. CLUSTEREXEC_HUGE_PAGES=0 in the environment turns the advice off.)

- `large_buffer(size)`: writable memory for a large frame, which a socket then fills.
- `bytes_from(buffer)` and `bytes_read(fd, size)`: a new `bytes` holding a copy of a buffer, or of a file's
  first `size` bytes. A `bytes` cannot be mapped or grown, so it is made with its contents unset
  (`PyBytes_FromStringAndSize(NULL, n)`, through `ctypes`) and filled before anyone else can see it. Where
  that is not possible (no `ctypes`, another Python), these fall back to plain copies.
"""

from __future__ import annotations

import mmap
import os
import sys
from typing import Any

# Below this, plain copies: malloc may serve a smaller block from its heap (glibc maps anything from 32 MiB
# up on its own), and advice given there would stay on the heap for good.
HUGE_MIN = 32 << 20
_HUGE_PAGE = 2 << 20
# CLUSTEREXEC_HUGE_PAGES=0 turns the advice off (say, on a VM that returns free memory to its host, where a
# huge page unused for a while is slow to come back): large buffers are then filled in 4 KiB pages.
_HUGE_PAGES = hasattr(mmap, "MADV_HUGEPAGE") and os.environ.get("CLUSTEREXEC_HUGE_PAGES", "1") != "0"


def large_buffer(size: int) -> mmap.mmap | bytearray:
    """Writable, zeroed memory of `size` bytes. Not a bytearray: that zeroes every page first, as long again
    as filling them. Fresh private anonymous memory is zero and untouched until written."""
    try:
        buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except (AttributeError, OSError):
        return bytearray(size)
    if _HUGE_PAGES:
        try:
            buf.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass
    return buf


def bytes_from(buffer: Any) -> bytes:
    """`bytes(buffer)`, faster for large buffers."""
    view = memoryview(buffer)
    fresh = _new_bytes(view.nbytes) if view.nbytes >= HUGE_MIN and view.c_contiguous else None
    if fresh is None:
        return bytes(view)
    data, target = fresh
    with target:
        target[:] = view if view.format == "B" and view.ndim == 1 else view.cast("B")
    return data


def bytes_read(fd: int, size: int) -> bytes:
    """The first `size` bytes of the file `fd` (which must have them) as a new `bytes`."""
    fresh = _new_bytes(size) if size >= HUGE_MIN else None
    if fresh is None:
        data = os.pread(fd, size, 0)
        if len(data) < size:  # (one read returns at most 2 GiB on Linux)
            parts = [data]
            done = len(data)
            while done < size and parts[-1]:
                parts.append(os.pread(fd, size - done, done))
                done += len(parts[-1])
            data = b"".join(parts)
        if len(data) != size:
            raise OSError(f"short read: {len(data)} of {size} bytes")
        return data
    data, target = fresh
    done = 0
    with target:
        while done < size:
            n = os.preadv(fd, [target[done:]], done)
            if n <= 0:
                raise OSError(f"short read: {done} of {size} bytes")
            done += n
    return data


_api: Any = None  # (new bytes, memory view, address of, madvise) once loaded; False where unavailable
_PyBUF_WRITE = 0x200


def _new_bytes(size: int) -> tuple[bytes, memoryview] | None:
    """A new `bytes` of `size` with its contents unset, and a writable view of them (to fill before the
    `bytes` is shown to anyone, and to release after), or None where this cannot be done. The interior of
    the allocation, which malloc has just mapped and nothing has touched, is asked for huge pages."""
    global _api
    if _api is None:
        _api = _load_api()
    if not _api:
        return None
    new_bytes, memory_view, address_of, madvise = _api
    data = new_bytes(None, size)
    if type(data) is not bytes or len(data) != size:
        return None
    address = address_of(data)
    start = -(-address // _HUGE_PAGE) * _HUGE_PAGE
    end = (address + size) // _HUGE_PAGE * _HUGE_PAGE
    if madvise is not None and end > start:
        madvise(start, end - start, mmap.MADV_HUGEPAGE)  # advice only: a failure changes nothing
    return data, memory_view(address, size, _PyBUF_WRITE)


def _load_api() -> Any:
    """The C functions `_new_bytes` needs, through prototypes of our own (the shared `ctypes.pythonapi`
    attributes are anyone's to reconfigure), and a check that they do what we think. CPython only."""
    if sys.implementation.name != "cpython":
        return False
    try:
        import ctypes

        api = ctypes.pythonapi
        new_bytes = ctypes.PYFUNCTYPE(ctypes.py_object, ctypes.c_char_p, ctypes.c_ssize_t)(
            ("PyBytes_FromStringAndSize", api))
        memory_view = ctypes.PYFUNCTYPE(ctypes.py_object, ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int)(
            ("PyMemoryView_FromMemory", api))

        def address_of(data: bytes) -> int:
            return ctypes.cast(data, ctypes.c_void_p).value  # (ctypes passes a bytes as its contents' address)

        probe = new_bytes(b"clusterexec probe", 17)
        if ctypes.string_at(address_of(probe), 17) != b"clusterexec probe":
            return False
        memory_view(address_of(probe), 5, _PyBUF_WRITE)[:] = b"CLUST"
        if probe != b"CLUSTerexec probe":  # written where the object's own contents are, not a copy of them
            return False
        madvise = None
        if _HUGE_PAGES:
            try:
                madvise = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)(
                    ("madvise", ctypes.CDLL(None)))
            except (OSError, AttributeError):
                madvise = None
    except Exception:  # noqa: BLE001 - any surprise here means plain copies, not a failure
        return False
    return new_bytes, memory_view, address_of, madvise

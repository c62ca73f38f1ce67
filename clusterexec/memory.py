"""Memory for large buffers, filled once and asked to come in huge pages.

Fresh memory costs a page fault per 4 KiB page the first time it is written: for 64 MiB that is 16,384
faults, as long as the copy itself. Asked for transparent huge pages first (`madvise(MADV_HUGEPAGE)`,
honoured when the kernel's THP setting is `always` or `madvise`), it takes one fault per 2 MiB. Measured on
Linux 6.18 for 64 MiB: `bytes(view)` 27 ms, a `bytes` filled this way 7 ms; a `bytearray` 59 ms, an
anonymous mapping filled this way 4 ms. (On a virtual machine that hands free memory back to its host, a
huge page unused for a while costs the host a fault when it comes back: seen here as the odd 150-200 ms
copy. The medians still gain.)

- `large_buffer(size)`: writable memory for a large frame, which a socket then fills.
- `bytes_from(buffer)` and `bytes_read(fd, size)`: a new `bytes` holding a copy of a buffer, or of a file's
  first `size` bytes. A `bytes` cannot be mapped or grown, so it is made with its contents unset
  (`PyBytes_FromStringAndSize(NULL, n)`, through `ctypes`) and filled before anyone else can see it. Where
  that is not possible (no `ctypes`, another Python), these fall back to plain copies.
"""

from __future__ import annotations

import mmap
import os
from typing import Any

HUGE_MIN = 4 << 20  # below this, huge pages save little: plain copies
_HUGE_PAGE = 2 << 20
_HUGE_PAGES = hasattr(mmap, "MADV_HUGEPAGE")


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
    while done < size:
        n = os.preadv(fd, [target[done:]], done)
        if n <= 0:
            raise OSError(f"short read: {done} of {size} bytes")
        done += n
    return data


_api: Any = None  # (PyBytes_FromStringAndSize, madvise, ctypes) once loaded; False where unavailable


def _new_bytes(size: int) -> tuple[bytes, memoryview] | None:
    """A new `bytes` of `size` with its contents unset, and a writable view of them, or None where this
    cannot be done. The interior of the allocation (which malloc maps fresh and leaves untouched) is asked
    for huge pages before the caller writes it."""
    global _api
    if _api is None:
        _api = _load_api()
    if not _api:
        return None
    new, madvise, ctypes = _api
    data = new(None, size)
    address = ctypes.cast(data, ctypes.c_void_p).value
    start = -(-address // _HUGE_PAGE) * _HUGE_PAGE
    end = (address + size) // _HUGE_PAGE * _HUGE_PAGE
    if madvise is not None and end > start:
        madvise(start, end - start, mmap.MADV_HUGEPAGE)  # advice only: a failure changes nothing
    return data, memoryview((ctypes.c_char * size).from_address(address)).cast("B")


def _load_api() -> Any:
    try:
        import ctypes

        new = ctypes.pythonapi.PyBytes_FromStringAndSize
    except (ImportError, AttributeError, OSError):
        return False
    new.restype = ctypes.py_object
    new.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t]
    # The address ctypes gives for a `bytes` must be where its contents are: checked once.
    probe = new(b"clusterexec", 11)
    if ctypes.string_at(ctypes.cast(probe, ctypes.c_void_p).value, 11) != b"clusterexec":
        return False
    madvise = None
    if _HUGE_PAGES:
        try:
            madvise = ctypes.CDLL(None, use_errno=True).madvise
            madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            madvise.restype = ctypes.c_int
        except (OSError, AttributeError):
            madvise = None
    return new, madvise, ctypes

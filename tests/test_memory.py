"""Large `bytes` are made in memory that is quick to fill, and hold exactly what they were made from."""

from __future__ import annotations

import ctypes
import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from clusterexec import memory as M
from clusterexec import serialization as S

pytestmark = pytest.mark.timeout(60)

SIZES = [0, 1, M.HUGE_MIN - 1, M.HUGE_MIN, M.HUGE_MIN + 4097, 3 * M.HUGE_MIN + 5]


@pytest.mark.parametrize("size", SIZES)
def test_bytes_from_a_buffer_and_from_a_file_hold_the_same_bytes(size, tmp_path):
    data = os.urandom(size)
    copy = M.bytes_from(memoryview(data))
    assert type(copy) is bytes and copy == data
    path = tmp_path / "data"
    path.write_bytes(data + b"tail")
    fd = os.open(path, os.O_RDONLY)
    try:
        assert M.bytes_read(fd, size) == data
        with pytest.raises(OSError, match="short read"):
            M.bytes_read(fd, size + 5)
    finally:
        os.close(fd)


@pytest.mark.skipif(sys.implementation.name != "cpython", reason="the fast path is CPython's")
def test_the_fast_path_is_taken_and_keeps_to_its_own_ctypes_prototypes():
    fresh = M._new_bytes(M.HUGE_MIN)
    assert fresh is not None  # else every test here passes on plain copies alone
    fresh[1].release()
    shared = ctypes.pythonapi.PyBytes_FromStringAndSize
    saved = shared.restype, shared.argtypes
    shared.restype, shared.argtypes = ctypes.c_void_p, None  # another library's settings
    try:
        data = os.urandom(M.HUGE_MIN + 1)
        copy = M.bytes_from(data)
        assert type(copy) is bytes and copy == data
    finally:
        shared.restype, shared.argtypes = saved


def test_bytes_from_views_of_any_shape_and_format():
    array = np.random.default_rng(0).random((4096, 1025))  # 32 MiB of float64, 2-D
    assert M.bytes_from(array) == array.tobytes()
    assert M.bytes_from(memoryview(array).cast("B").cast("d")) == array.tobytes()
    strided = array[:, ::2]  # not contiguous: copied in order, the slow way
    assert M.bytes_from(strided) == strided.tobytes()
    frame = M.large_buffer(M.HUGE_MIN * 2)
    frame[-3:] = b"end"
    assert M.bytes_from(memoryview(frame)[M.HUGE_MIN:]) == bytes(M.HUGE_MIN - 3) + b"end"


class Carrier:
    """Hands its own bytes to pickle as an out-of-band buffer: it must get a buffer back, not our `bytes`."""

    def __init__(self, data):
        self.data = data

    def __reduce_ex__(self, protocol):
        return Carrier, (pickle.PickleBuffer(self.data),)


def test_a_large_bytes_pickles_out_of_band_as_itself_and_comes_back_equal():
    data = os.urandom(M.HUGE_MIN + 11)
    main, *oob = S.dumps(({"x": data}, data[:100]), "pickling")
    assert len(oob) == 1 and oob[0] is data  # the caller's object, not a copy: shared memory copies it once
    back = S.loads([main, memoryview(bytearray(data))], "unpickling")  # as off a socket: a new bytes
    assert back == ({"x": data}, data[:100]) and type(back[0]["x"]) is bytes
    whole = bytes(data)
    assert S.loads([main, whole], "unpickling")[0]["x"] is whole  # as read from shared memory: taken as is
    _, carried = S.dumps(Carrier(data), "pickling")
    assert type(carried) is memoryview  # someone else's buffer travels as a buffer (mapped, in local mode)


HUGE_PAGE_FLAG = textwrap.dedent("""
    import os, sys
    from clusterexec import memory as M

    def flags_at(address):
        lines = open("/proc/self/smaps").read().splitlines()
        for i, line in enumerate(lines):
            fields = line.split()
            if "-" in fields[0] and len(fields) > 4:
                start, end = (int(x, 16) for x in fields[0].split("-"))
                inside = start <= address < end
            elif inside and line.startswith("VmFlags:"):
                return line.split()[1:]

    data = M.bytes_from(os.urandom(2 * M.HUGE_MIN))
    frame = M.large_buffer(M.HUGE_MIN)
    import ctypes
    middle = ctypes.cast(data, ctypes.c_void_p).value + M.HUGE_MIN
    frame_at = ctypes.addressof(ctypes.c_char.from_buffer(frame))
    print("hg" in flags_at(middle), "hg" in flags_at(frame_at))
""")


@pytest.mark.skipif(not os.path.exists("/sys/kernel/mm/transparent_hugepage/enabled"), reason="no THP here")
@pytest.mark.parametrize("setting", ["", "0"])
def test_huge_pages_are_asked_for_unless_turned_off(setting):
    env = {**os.environ, "CLUSTEREXEC_HUGE_PAGES": setting}
    out = subprocess.run([sys.executable, "-c", HUGE_PAGE_FLAG], env=env, capture_output=True, text=True,
                         timeout=60, check=True).stdout.split()
    assert out == (["False", "False"] if setting == "0" else ["True", "True"])

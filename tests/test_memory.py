"""Large `bytes` are made in memory that is quick to fill, and hold exactly what they were made from."""

from __future__ import annotations

import os

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


def test_bytes_from_views_of_any_shape_and_format():
    array = np.random.default_rng(0).random((1024, 1024))  # 8 MiB of float64, 2-D
    assert M.bytes_from(array) == array.tobytes()
    assert M.bytes_from(memoryview(array).cast("B").cast("d")) == array.tobytes()
    strided = array[:, ::2]  # not contiguous: copied in order, the slow way
    assert M.bytes_from(strided) == strided.tobytes()
    frame = M.large_buffer(M.HUGE_MIN * 2)
    frame[-3:] = b"end"
    assert M.bytes_from(memoryview(frame)[M.HUGE_MIN:]) == bytes(M.HUGE_MIN - 3) + b"end"


def test_a_large_bytes_pickles_out_of_band_as_itself_and_comes_back_equal():
    data = os.urandom(M.HUGE_MIN + 11)
    main, *oob = S.dumps(({"x": data}, data[:100]), "pickling")
    assert len(oob) == 1 and oob[0] is data  # the caller's object, not a copy: shared memory copies it once
    back = S.loads([main, memoryview(bytearray(data))], "unpickling")  # as off a socket: a new bytes
    assert back == ({"x": data}, data[:100]) and type(back[0]["x"]) is bytes
    whole = bytes(data)
    assert S.loads([main, whole], "unpickling")[0]["x"] is whole  # as read from shared memory: taken as is

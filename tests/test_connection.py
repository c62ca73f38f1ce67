"""FramedConnection over a real socket pair, both ends in one event loop: large frames, order, close, backlog.

Each test runs with and without pacing, the way large frames are sent on Python 3.11 (see
`FramedConnection._pace`), so both paths are checked on every Python.
"""

import asyncio
import os
import socket

import pytest

from clusterexec import connection
from clusterexec.connection import FramedConnection, backlog


@pytest.fixture(params=[False, True], ids=["unpaced", "paced"])
def paced(request, monkeypatch):
    monkeypatch.setattr(connection, "_PACE_LARGE", request.param)
    return request.param


async def connected_pair():
    """A sender and a receiver; returns them, the receiver's messages, and a future set when it is closed."""
    loop = asyncio.get_running_loop()
    got = []
    lost = loop.create_future()

    def end(on_messages, on_lost):
        return lambda: FramedConnection(role="none", key=None, on_ready=lambda conn: None,
                                        on_messages=on_messages, on_lost=on_lost)

    a, b = socket.socketpair()
    _, sender = await loop.connect_accepted_socket(end(lambda c, m: None, lambda c, e: None), a)
    _, receiver = await loop.connect_accepted_socket(
        end(lambda c, m: got.extend(m), lambda c, e: lost.done() or lost.set_result(e)), b)
    return sender, receiver, got, lost


def test_large_frames_between_small_ones_arrive_whole_and_in_order_though_closed_at_once(paced):
    big1, big2 = os.urandom(20 << 20), os.urandom(10 << 20)

    async def main():
        sender, _, got, lost = await connected_pair()
        sender.send({"t": "a"}, [b"1"])
        sender.send({"t": "big"}, [b"x", big1])
        sender.send({"t": "b"})
        sender.send({"t": "big"}, [big2])
        sender.send({"t": "c"}, [b"3"])
        waiting = backlog(sender)
        in_transport = sender.transport.get_write_buffer_size()
        sender.close()  # long before all of it has left: close must not lose any of it
        await asyncio.wait_for(lost, 60)
        return got, waiting, in_transport

    got, waiting, in_transport = asyncio.run(main())
    assert [m.type for m in got] == ["a", "big", "b", "big", "c"]
    assert got[1].buffers[1] == big1 and got[3].buffers[0] == big2 and bytes(got[4].buffers[0]) == b"3"
    assert waiting > 20 << 20  # most of it was still waiting when counted
    if paced:  # the transport holds at most a slice's tail: the rest was never copied into its buffer
        assert in_transport <= connection._PACE_SLICE


def test_backlog_counts_what_the_peer_has_not_taken_until_it_takes_it(paced):
    async def main():
        sender, receiver, got, _ = await connected_pair()
        receiver.transport.pause_reading()
        sender.send({"t": "big"}, [bytes(32 << 20)])
        await asyncio.sleep(0.2)
        stuck = backlog(sender)
        receiver.transport.resume_reading()
        for _ in range(600):
            if got:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.05)
        drained = backlog(sender)
        sender.close()
        receiver.close()
        return stuck, drained, got

    stuck, drained, got = asyncio.run(main())
    assert stuck > 16 << 20  # a peer that reads nothing: the master then drops task output, not memory
    assert len(got) == 1 and got[0].buffers[0].nbytes == 32 << 20
    assert drained == 0

"""A worker node told to stop exits within its grace, whatever its connection to the master is doing.

The case that used to go wrong: the master hangs up (end of file) while the agent still has bytes queued for
it. asyncio then closes the transport at once but reports the loss only once those bytes have left, which
may be never; a write in between raised TypeError inside `Agent.leave` (Python 3.12 and later), and the
worker stayed up, leaving for ever.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import signal
import socket
import struct
import subprocess
import sys
import termios
import time

import pytest
from conftest import _env, reap, recv_exact, wait_until

from clusterexec import protocol as P
from clusterexec import serialization as S
from clusterexec.connection import FramedConnection

pytestmark = pytest.mark.timeout(60)

GRACE = 3.0


def print_a_lot_then_wait(marker: str) -> None:
    line = "x" * 1023
    for _ in range(48 * 1024):  # 48 MiB of output: far more than the sockets on the way hold
        print(line)
    sys.stdout.flush()
    open(marker, "w").close()
    time.sleep(60)


def _unread(sock: socket.socket) -> int:
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]


def test_a_worker_whose_master_hung_up_with_bytes_still_queued_exits_within_its_grace(tmp_path):
    key = os.urandom(16).hex()
    key_file = tmp_path / "key"
    key_file.write_text(key)
    key_file.chmod(0o600)
    marker = tmp_path / "printed"
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # (the agent's bytes pile up on its side)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(20)
    log = open(tmp_path / "worker.log", "wb")
    worker = subprocess.Popen(
        [sys.executable, "-m", "clusterexec.worker", f"127.0.0.1:{listener.getsockname()[1]}", "--nprocs", "1",
         "--authkey-file", str(key_file), "--grace", str(GRACE)], stdout=log, stderr=subprocess.STDOUT, env=_env())
    try:
        # A master that speaks just enough: the handshake, a welcome and one task, and then reads nothing.
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(10)
            challenge = P.new_challenge()
            conn.sendall(P.server_hello(challenge))
            verdict = P.server_check(key.encode(), challenge, recv_exact(conn, P.CLIENT_PROOF.size))
            assert verdict.startswith(P.VERDICT_OK)
            conn.sendall(verdict)
            conn.sendall(P.encode_bytes({"t": "welcome", "id": 1}))
            task = P.Task(1, [S.function_blob(print_a_lot_then_wait)], S.dumps(((str(marker),), {}), "test"))
            entries, buffers = P.encode_tasks([(1, task)], P.BlobLRU())
            conn.sendall(P.encode_bytes({"t": "tasks", "tasks": entries}, buffers))
            wait_until(marker.exists, 30, what="the task to print its output")
            wait_until(lambda: _unread(conn) > 0, 10, what="the agent's output to arrive")
            # The master hangs up its side, the agent's output still queued behind it.
            conn.shutdown(socket.SHUT_WR)
            time.sleep(0.5)  # (for the agent to read the end of file: nothing outside it shows when it has)
            told = time.monotonic()
            worker.send_signal(signal.SIGTERM)
            try:
                code = worker.wait(GRACE + 10)
            except subprocess.TimeoutExpired:
                pytest.fail("the worker did not exit after SIGTERM:\n" + (tmp_path / "worker.log").read_text())
            took = time.monotonic() - told
        output = (tmp_path / "worker.log").read_text()
        assert "Traceback" not in output, output
        assert took < GRACE + 5, f"the worker took {took:.1f} s to stop, with a grace of {GRACE} s"
        assert code == 0, output
    finally:
        reap(worker)
        log.close()
        listener.close()


def test_sending_on_a_connection_whose_transport_is_closing_does_nothing():
    """asyncio closes a transport itself when the peer hangs up, and says so (connection_lost) only later."""

    async def main() -> None:
        ours, theirs = socket.socketpair()
        try:
            loop = asyncio.get_running_loop()
            lost = loop.create_future()
            transport, conn = await loop.create_connection(
                lambda: FramedConnection(role="none", key=None, on_ready=lambda c: None,
                                         on_messages=lambda c, m: None,
                                         on_lost=lambda c, e: lost.done() or lost.set_result(e)),
                sock=ours)
            transport.close()  # as asyncio does on end of file
            conn.send({"t": "pong"})
            conn.send({"t": "results", "items": []}, [b"x" * 100])
            await asyncio.wait_for(lost, 5)
        finally:
            theirs.close()

    asyncio.run(main())

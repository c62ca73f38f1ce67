"""The floor under a sequential round trip: what the process layout alone costs, before any of our code.

    python benchmarks/floor.py [--rounds 3000]

Prints, from one run, the median `submit(noop).result()` round trip of ProcessPoolExecutor(2) and of two
bare relays written with nothing but sockets, threads and `selectors`, shaped like clusterexec's paths:

    3 processes (today's local mode):  caller ─pipe─▶ IO thread ─TCP─▶ relay ─socketpair─▶ echo process,
                                       and back the same way, the caller woken by a Condition
    2 processes (no master hop):       caller ─pipe─▶ IO thread ─socketpair─▶ echo process, and back

Each bare relay moves 60 bytes and does no other work, so its time is wake-ups and system calls only:
whatever clusterexec adds on top of the 3-process floor is its own Python (pickling, framing, JSON,
scheduling, asyncio). Compare with `python benchmarks/run.py --only roundtrip`.

Two more rows sketch a local mode without the master and agent in between: the client's own pieces
(function blob, cloudpickle arguments, "run" and "results" frames, a ClusterFuture) talking straight to a
real task process (`task_process.TaskRunner`) over a socketpair; the task sent by the IO thread as today, or
by the caller itself. What they lack (scheduling, kills, time limits, crash reports, output) is what such
a design would have to add back without giving up their speed.
"""

from __future__ import annotations

import argparse
import mmap
import os
import selectors
import socket
import statistics
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

from workloads import noop

from clusterexec import protocol as P
from clusterexec import serialization as S
from clusterexec.client import ClusterFuture, _set_result
from clusterexec.task_process import TaskRunner

MESSAGE = b"x" * 60


def _echo(sock: socket.socket) -> None:
    while data := sock.recv(4096):
        sock.sendall(data)


def _relay(upstream: socket.socket, downstream: socket.socket) -> None:
    """Forward bytes both ways until either side closes."""
    sel = selectors.DefaultSelector()
    sel.register(upstream, selectors.EVENT_READ, downstream)
    sel.register(downstream, selectors.EVENT_READ, upstream)
    while True:
        for key, _ in sel.select():
            data = key.fileobj.recv(1 << 16)
            if not data:
                return
            key.data.sendall(data)


def _relay_tcp(port: int, downstream: socket.socket) -> None:
    upstream = socket.create_connection(("127.0.0.1", port))
    upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    _relay(upstream, downstream)


def _io_loop(wake_r: int, sock: socket.socket, on_wake, on_readable) -> None:
    """A chain's IO thread: `on_wake()` each time the caller writes the wake pipe, `on_readable()` when
    `sock` has data (False at its end-of-file). Returns when the pipe or the socket ends."""
    sel = selectors.DefaultSelector()
    sel.register(wake_r, selectors.EVENT_READ, "wake")
    sel.register(sock, selectors.EVENT_READ, "sock")
    while True:
        for key, _ in sel.select():
            if key.data == "wake":
                if not os.read(wake_r, 64):
                    return
                on_wake()
            elif not on_readable():
                return


def bare_chain(rounds: int, with_relay: bool) -> float:
    """Median seconds per round trip through a bare chain (see the module docstring)."""
    ctx = get_context("fork")
    near, far = socket.socketpair()
    children = [ctx.Process(target=_echo, args=(far,), daemon=True)]
    listener = None
    if with_relay:
        listener = socket.create_server(("127.0.0.1", 0))
        children.append(ctx.Process(target=_relay_tcp, args=(listener.getsockname()[1], near), daemon=True))
    for child in children:
        child.start()
    if listener is not None:
        conn, _ = listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        listener.close()
    else:
        conn = near
    wake_r, wake_w = os.pipe()
    replies: list[bytes] = []
    arrived = threading.Condition()

    def receive() -> bool:
        data = conn.recv(1 << 16)
        if data:
            with arrived:
                replies.append(data)
                arrived.notify()
        return bool(data)

    thread = threading.Thread(target=_io_loop, args=(wake_r, conn, lambda: conn.sendall(MESSAGE), receive),
                              daemon=True)
    thread.start()
    times = []
    try:
        for _ in range(rounds):
            t0 = time.perf_counter()
            os.write(wake_w, b"\0")
            with arrived:
                while not replies:
                    arrived.wait()
                replies.clear()
            times.append(time.perf_counter() - t0)
    finally:
        os.close(wake_w)  # the IO thread reads end-of-file and returns
        thread.join(5)
        os.close(wake_r)
        for sock in (conn, near, far):
            sock.close()
        for child in children:
            child.terminate()
            child.join(5)
    return statistics.median(times[rounds // 10:])


def parts_chain(rounds: int, caller_sends: bool) -> float:
    """Median seconds per round trip: clusterexec's client pieces and a real task process, nothing between."""
    near, far = socket.socketpair()
    pid = os.fork()  # (no other thread runs now)
    if pid == 0:
        near.close()
        try:
            TaskRunner(far, mmap.mmap(-1, 16), None).serve()
        finally:
            os._exit(0)
    far.close()
    lock = threading.Lock()
    pending: dict[int, ClusterFuture] = {}
    outbox: list[tuple[int, P.Task]] = []
    sent = P.BlobLRU()
    wake_r, wake_w = os.pipe()

    def send_locked(tasks: list[tuple[int, P.Task]]) -> None:
        entries, buffers = P.encode_tasks(tasks, sent)
        near.sendmsg(P.encode({"t": "run", "tasks": entries}, buffers))

    reader = P.FrameReader()

    def send_outbox() -> None:
        with lock:
            send_locked(outbox[:])
            outbox.clear()

    def receive() -> bool:
        n = near.recv_into(reader.get_buffer())
        for msg in reader.filled(n) if n else ():
            items = msg.header["items"]
            for item, bufs in zip(items, P.split_buffers(items, msg.buffers), strict=True):
                with lock:
                    future = pending.pop(item[0])
                _set_result(future, S.loads(bufs, "unpickling the result"))
        return bool(n)

    thread = threading.Thread(target=_io_loop, args=(wake_r, near, send_outbox, receive), daemon=True)
    thread.start()
    times = []
    try:
        for tid in range(1, rounds + rounds // 10 + 1):
            t0 = time.perf_counter()
            task = P.Task(0, [S.function_blob(noop)], S.dumps(((), {}), "pickling the arguments"), None)
            future = ClusterFuture()
            with lock:
                pending[tid] = future
                if caller_sends:
                    send_locked([(tid, task)])
                else:
                    outbox.append((tid, task))
                    os.write(wake_w, b"\0")
            future.result()
            times.append(time.perf_counter() - t0)
    finally:
        os.close(wake_w)
        thread.join(5)
        os.close(wake_r)
        near.close()  # the task process reads end-of-file and exits
        os.waitpid(pid, 0)
    return statistics.median(times[rounds // 10:])


def ppe_round_trip(rounds: int) -> float:
    with ProcessPoolExecutor(2) as ex:
        for _ in range(rounds // 10):
            ex.submit(noop).result()
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            ex.submit(noop).result()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3000)
    args = parser.parse_args()
    ppe = ppe_round_trip(args.rounds)
    rows = [("ProcessPoolExecutor(2)", ppe),
            ("bare chain, 3 processes (local mode's layout)", bare_chain(args.rounds, with_relay=True)),
            ("bare chain, 2 processes (no master hop)", bare_chain(args.rounds, with_relay=False)),
            ("our pieces, 2 processes, IO thread sends", parts_chain(args.rounds, caller_sends=False)),
            ("our pieces, 2 processes, caller sends", parts_chain(args.rounds, caller_sends=True))]
    width = max(len(name) for name, _ in rows)
    print(f"{'median round trip':{width}}  {'µs':>6}  {'/PPE':>5}")
    for name, seconds in rows:
        print(f"{name:{width}}  {seconds * 1e6:6.0f}  {seconds / ppe:5.2f}")


if __name__ == "__main__":
    main()

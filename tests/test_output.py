"""What tasks print reaches the client: prefixed with host and pid, in order, before the result; bounded."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import warnings

import psutil
import pytest
from conftest import Cluster, _env, reap, wait_until

from clusterexec import ClusterExecutor
from clusterexec.client import TaskOutput

pytestmark = pytest.mark.timeout(90)


def chatty(i):
    print("hello from task", i)
    print("complaint from task", i, file=sys.stderr)
    return os.getpid()


def counting(n):
    for k in range(n):
        print(f"line {k:04d}")
    return os.getpid()


def warns_and_logs():
    warnings.warn("this parameter looks odd", stacklevel=1)
    logging.getLogger("mytask").warning("logged from a task")
    logging.getLogger("mytask").info("not shown: INFO is below the default level")
    os.system("echo from a child process")
    return os.getpid()


@pytest.fixture(params=["local", "cli"])
def executor(request, tmp_path):
    if request.param == "local":
        with ClusterExecutor(max_workers=2) as ex:
            yield ex
        return
    c = Cluster(tmp_path)
    try:
        c.start_master()
        c.start_worker(2)
        with c.executor() as ex:
            yield ex
    finally:
        c.stop()


def test_print_reaches_the_client_prefixed_before_the_result(executor, capsys):
    pids = [executor.submit(chatty, i).result() for i in range(3)]
    out, err = capsys.readouterr()  # read right after result(): the output must already be there
    host = socket.gethostname()
    for i, pid in enumerate(pids):
        assert f"[{host}:{pid}] hello from task {i}\n" in out
        assert f"[{host}:{pid}] complaint from task {i}\n" in err
    assert "complaint" not in out and "hello" not in err


def test_lines_of_a_task_stay_in_order(executor, capsys):
    pid = executor.submit(counting, 300).result()
    out, _ = capsys.readouterr()
    mine = [line for line in out.splitlines() if line.startswith(f"[{socket.gethostname()}:{pid}] line ")]
    assert [line.rsplit(" ", 1)[1] for line in mine] == [f"{k:04d}" for k in range(300)]


def test_warnings_logging_and_child_processes_are_forwarded(executor, capsys):
    pid = executor.submit(warns_and_logs).result()
    out, err = capsys.readouterr()
    prefix = f"[{socket.gethostname()}:{pid}] "
    assert any(line.startswith(prefix) and "UserWarning: this parameter looks odd" in line for line in err.splitlines())
    assert prefix + "logged from a task\n" in err  # as Python prints it with no logging set up
    assert "not shown" not in err
    assert prefix + "from a child process" in out


def test_output_false_keeps_it_off_the_client(tmp_path, capsys):
    c = Cluster(tmp_path)
    try:
        c.start_master()
        c.start_worker(1)
        with c.executor(output=False) as ex:
            pid = ex.submit(chatty, 7).result()
        out, err = capsys.readouterr()
        assert "hello from task 7" not in out and "complaint" not in err
        # It went where a worker's output goes without clusterexec: the worker's own terminal (its log here).
        wait_until(lambda: "hello from task 7" in (tmp_path / "worker0.log").read_text(), what="the worker's log")
        assert f":{pid}]" not in (tmp_path / "worker0.log").read_text()
    finally:
        c.stop()


def test_partial_lines_are_joined_and_flushed_when_the_task_ends(capsys):
    out = TaskOutput()
    out.write([[1, "h", 5, 1, 0], [1, "h", 5, 1, 0]], [memoryview(b"abc"), memoryview(b"def\nghi")])
    assert capsys.readouterr().out == "[h:5] abcdef\n"
    out.task_done(1)
    assert capsys.readouterr().out == "[h:5] ghi\n"
    out.write([[2, "h", 6, 2, 1234]], [memoryview(b"")])
    assert "1234 bytes of this task's output were dropped" in capsys.readouterr().err


FLOOD = textwrap.dedent("""
    import os, sys, time
    from clusterexec import ClusterExecutor

    def flood(seconds):
        line = "x" * 1000 + "\\n"
        end = time.monotonic() + seconds
        n = 0
        while time.monotonic() < end:
            sys.stdout.write(line * 100)
            n += 100
            time.sleep(0.001)
        return n

    with ClusterExecutor(sys.argv[1], authkey=sys.argv[2]) as ex:
        f = ex.submit(flood, 4.0)
        print("SUBMITTED", flush=True, file=sys.stderr)
        n = f.result()
        print("PRINTED", n, flush=True, file=sys.stderr)
""")


def test_a_flooding_task_cannot_fill_the_masters_memory(tmp_path):
    """A client that does not read (stopped) while its task prints ~100 MB/s: the master drops output past
    its backlog limit instead of buffering it, and the client learns how much was dropped."""
    c = Cluster(tmp_path)
    try:
        c.start_master()
        c.start_worker(1)
        master = psutil.Process(c.master.pid)
        before = master.memory_info().rss
        script = tmp_path / "flood.py"
        script.write_text(FLOOD)
        client = subprocess.Popen([sys.executable, str(script), c.address, c.key], env=_env(),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            assert client.stderr.readline().startswith(b"SUBMITTED")
            c.wait_for(lambda info: info["running"] == 1, what="the flood to start")  # not just queued
            client.send_signal(signal.SIGSTOP)
            peak = before
            deadline = time.monotonic() + 6
            while time.monotonic() < deadline:
                peak = max(peak, master.memory_info().rss)
                time.sleep(0.05)
            client.send_signal(signal.SIGCONT)
            rest = client.communicate(timeout=60)[1].decode()
        finally:
            reap(client)
        assert client.returncode == 0, rest
        printed = int(rest.split("PRINTED", 1)[1].split()[0]) * 1001
        assert printed > 100 << 20, "the task should have printed far more than the master may buffer"
        assert peak - before < 64 << 20, f"master grew by {(peak - before) >> 20} MiB"
        assert "output were dropped" in rest
    finally:
        c.stop()

"""Ctrl-C in a program that leaves `with ClusterExecutor(...)`: the first says what the exit waits for, the
second stops the running tasks, and the program ends with one KeyboardInterrupt."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import is_gone, reap, wait_until

pytestmark = pytest.mark.timeout(90)

# The program under test. Its tasks write their pid to a file and run until a file named "release" appears.
# Where the first Ctrl-C lands: "body" (waiting for results inside the with block) or "exit" (the block is
# done and its exit waits for the tasks).
PROGRAM = """
import os, signal, sys, time
from pathlib import Path
signal.signal(signal.SIGINT, signal.default_int_handler)  # (ignored in a shell's background job otherwise)
from clusterexec import ClusterExecutor

where, address, folder = sys.argv[1], sys.argv[2] or None, Path(sys.argv[3])

def task(i):
    (folder / f"pid-{i}").write_text(str(os.getpid()))
    while not (folder / "release").exists():
        time.sleep(0.05)
    return i

with ClusterExecutor(address, max_workers=2) as ex:
    futures = [ex.submit(task, i) for i in range(3)]
    while sum(f.running() for f in futures) < 2:
        time.sleep(0.02)
    print("ready", flush=True)
    if where == "body":
        [f.result() for f in futures]
print("after the with block", flush=True)
"""


class Program:
    """The program above as a child process, with its output collected line by line."""

    def __init__(self, tmp_path: Path, where: str, address: str, key: str | None):
        script = tmp_path / "program.py"
        script.write_text(PROGRAM)
        self.folder = tmp_path / "tasks"
        self.folder.mkdir()
        env = dict(os.environ)
        if key is not None:
            env["CLUSTEREXEC_AUTHKEY"] = key
        self.proc = subprocess.Popen([sys.executable, str(script), where, address, str(self.folder)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.out: list[str] = []
        self.err: list[str] = []
        self._readers = [threading.Thread(target=self._collect, args=(pipe, lines), daemon=True)
                         for pipe, lines in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _collect(pipe, lines: list[str]) -> None:
        for line in pipe:
            lines.append(line)

    def wait_for_line(self, lines: list[str], text: str, timeout: float = 30.0) -> str:
        def found():
            if self.proc.poll() is not None and not any(text in line for line in lines):
                time.sleep(0.2)  # (let the readers finish)
                raise AssertionError(f"the program ended ({self.proc.returncode}) before saying {text!r}:\n"
                                     + "".join(self.out + self.err))
            return next((line for line in lines if text in line), None)
        return wait_until(found, timeout, what=f"the program to say {text!r}")

    def task_pids(self) -> list[int]:
        return [int(p.read_text()) for p in sorted(self.folder.glob("pid-*"))]

    def finish(self, timeout: float = 30.0) -> int:
        code = self.proc.wait(timeout)
        for reader in self._readers:
            reader.join(5)
        return code

    def close(self) -> None:
        reap(self.proc)


@pytest.fixture(params=["local", "remote"])
def address_and_key(request):
    if request.param == "local":
        yield "", None
    else:
        c = request.getfixturevalue("cluster")
        yield c.address, c.key


@pytest.mark.parametrize("where", ["body", "exit"])
def test_first_ctrl_c_says_what_the_exit_waits_for_and_the_second_stops_the_tasks(tmp_path, where, address_and_key):
    program = Program(tmp_path, where, *address_and_key)
    try:
        program.wait_for_line(program.out, "ready")
        pids = program.task_pids()
        assert len(pids) == 2

        program.proc.send_signal(signal.SIGINT)
        said = program.wait_for_line(program.err, "Ctrl-C again")
        assert "waiting for 3 tasks to finish (2 running, 1 queued)" in said
        assert "press Ctrl-C again to stop them" in said
        time.sleep(0.5)  # (the program must still be waiting, not leaving: a short look is enough to see it)
        assert program.proc.poll() is None
        assert not any(is_gone(pid) for pid in pids), "the first Ctrl-C must not stop running tasks"

        program.proc.send_signal(signal.SIGINT)
        assert program.finish(30) == -signal.SIGINT  # an uncaught KeyboardInterrupt
        err = "".join(program.err)
        assert err.count("KeyboardInterrupt") == 1, err
        assert "During handling of the above exception" not in err
        assert "Traceback" in err and err.count("Traceback") == 1, err
        assert not any("after the with block" in line for line in program.out)
        wait_until(lambda: all(is_gone(pid) for pid in pids), 15, what="the running tasks to be stopped")
    finally:
        program.close()


@pytest.mark.parametrize("where", ["body", "exit"])
def test_after_one_ctrl_c_the_tasks_finish_and_the_program_ends_with_keyboard_interrupt(tmp_path, where):
    program = Program(tmp_path, where, "", None)
    try:
        program.wait_for_line(program.out, "ready")
        program.proc.send_signal(signal.SIGINT)
        program.wait_for_line(program.err, "Ctrl-C again")
        (program.folder / "release").touch()
        assert program.finish(30) == -signal.SIGINT
        assert len(program.task_pids()) == 3  # the queued task ran too, as shutdown(wait=True) promises
        err = "".join(program.err)
        assert err.count("KeyboardInterrupt") == 1, err
        assert "During handling of the above exception" not in err
        assert not any("after the with block" in line for line in program.out)
    finally:
        program.close()

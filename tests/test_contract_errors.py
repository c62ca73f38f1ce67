"""The contract for errors, as `ProcessPoolExecutor` has it: what reaches the caller when pickling fails,
what a remote traceback shows, how a lost process is named, and what may travel as an argument.

Each body runs against the three kinds of `tests/test_contract.py` (its `make_executor` fixture):
``process`` (ProcessPoolExecutor), ``local`` (local mode) and ``cluster`` (a master and a node started from
the command line). Where ProcessPoolExecutor does something else, the body says so and why.
"""

from __future__ import annotations

import logging
import logging.handlers
import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import textwrap
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.managers import SyncManager
from pathlib import Path

import pytest
import test_contract
from conftest import reap
from test_contract import DEADLINE

from clusterexec import RemoteError, SerializationError, WorkerLostError
from clusterexec.serialization import RemoteTraceback

# The fixtures of test_contract.py: the same three kinds of executor, shut down after each test.
gate = test_contract.gate
make_executor = test_contract.make_executor

# ============================================================================================ pickling errors
# Module level, so that ProcessPoolExecutor's children (and the cluster's workers) can import them.

PICKLE_ERRORS = [TypeError, AttributeError, pickle.PicklingError, pickle.UnpicklingError, SystemExit]


def raise_error(cls, text):
    raise cls(text)


def identity(x):
    return x


class FailsWhenPickled:
    """Its __reduce__ raises `cls`; callable, so it can be the function too."""

    def __init__(self, cls):
        self.cls = cls

    def __call__(self, *args):
        return args

    def __reduce__(self):
        raise self.cls(f"{self.cls.__name__} while pickled")


class FailsWhenUnpickled:
    """Pickles fine; unpickling it raises `cls`."""

    def __init__(self, cls):
        self.cls = cls

    def __call__(self, *args):
        return args

    def __reduce__(self):
        return raise_error, (self.cls, f"{self.cls.__name__} while unpickled")


class ErrorFailsWhenPickled(Exception):
    def __init__(self, cls):
        super().__init__("a task's exception")
        self.cls = cls

    def __reduce__(self):
        raise self.cls(f"{self.cls.__name__} while pickled")


class ErrorFailsWhenUnpickled(Exception):
    def __init__(self, cls):
        super().__init__("a task's exception")
        self.cls = cls

    def __reduce__(self):
        return raise_error, (self.cls, f"{self.cls.__name__} while unpickled")


def return_fails_when_pickled(cls):
    return FailsWhenPickled(cls)


def return_fails_when_unpickled(cls):
    return FailsWhenUnpickled(cls)


def raise_error_fails_when_pickled(cls):
    raise ErrorFailsWhenPickled(cls)


def raise_error_fails_when_unpickled(cls):
    raise ErrorFailsWhenUnpickled(cls)


# What to submit to make pickle fail with `cls` in each phase: (function, argument).
FAILING_IN = {
    "pickling the function": lambda cls: (FailsWhenPickled(cls), 1),
    "pickling the arguments": lambda cls: (identity, FailsWhenPickled(cls)),
    "unpickling the function": lambda cls: (FailsWhenUnpickled(cls), 1),
    "unpickling the arguments": lambda cls: (identity, FailsWhenUnpickled(cls)),
    "pickling the result": lambda cls: (return_fails_when_pickled, cls),
    "unpickling the result": lambda cls: (return_fails_when_unpickled, cls),
    "pickling the exception": lambda cls: (raise_error_fails_when_pickled, cls),
    "unpickling the exception": lambda cls: (raise_error_fails_when_unpickled, cls),
}
ON_THE_WORKER = ("unpickling the function", "unpickling the arguments", "pickling the result",
                 "pickling the exception")


@pytest.mark.parametrize("phase", list(FAILING_IN))
def test_an_error_raised_while_pickling_or_unpickling_reaches_the_caller_as_its_own_class(make_executor, phase):
    ppe = make_executor.kind == "process"
    ex = None
    for cls in PICKLE_ERRORS:
        if ppe and cls is SystemExit and phase in ("pickling the function", "pickling the arguments"):
            continue  # ProcessPoolExecutor's queue feeder thread dies of it: that Future never resolves
        if ex is None or ppe:
            ex = make_executor()  # (ProcessPoolExecutor is broken after an unpickling error)
        fn, arg = FAILING_IN[phase](cls)
        future = ex.submit(fn, arg)  # never raises here: the Future carries the error
        try:
            future.result(timeout=DEADLINE)
        except cls:  # what code written for ProcessPoolExecutor catches
            err = future.exception()
        except BaseException as e:  # noqa: BLE001
            err = e
        if ppe and phase.startswith("unpickling"):
            # ProcessPoolExecutor breaks: a child dies of it, or its result thread does.
            assert isinstance(err, BrokenProcessPool), repr(err)
            continue
        assert isinstance(err, cls), f"{cls.__name__} {phase}: got {err!r}"
        if ppe:
            continue
        assert isinstance(err, SerializationError), repr(err)
        assert err.phase == phase
        text = str(err)
        assert phase in text and cls.__name__ in text, text
        if phase.endswith("the exception"):
            # ...and it still describes the task's own exception, which could not travel.
            assert isinstance(err, RemoteError), repr(err)
            assert err.type_name.endswith("ErrorFails" + ("WhenPickled" if "unpickling" not in phase
                                                          else "WhenUnpickled"))
            assert err.remote_message == "a task's exception"
        elif phase in ON_THE_WORKER:
            assert isinstance(err.__cause__, RemoteTraceback), repr(err.__cause__)
            assert cls.__name__ in str(err.__cause__)
        else:
            assert type(err.__cause__) is cls  # the error pickle raised here
        if cls is SystemExit:
            assert err.code == f"SystemExit while {'unpickled' if 'unpickling' in phase else 'pickled'}"
    assert make_executor().submit(identity, 3).result(timeout=DEADLINE) == 3


def test_a_serialization_error_pickles_as_itself():
    """It can travel: raised in a task (a nested executor's), it reaches the caller with its class and phase."""
    from clusterexec.errors import serialization_error

    err = serialization_error("error pickling the result: TypeError: no", phase="pickling the result",
                              original=TypeError("no"))
    copy = pickle.loads(pickle.dumps(err))
    assert type(copy) is type(err)
    assert isinstance(copy, TypeError) and isinstance(copy, SerializationError)
    assert copy.phase == "pickling the result" and str(copy) == str(err)
    exit_error = pickle.loads(pickle.dumps(serialization_error("x", phase="p", original=SystemExit(3))))
    assert isinstance(exit_error, SystemExit) and exit_error.code == 3


# ============================================================================================ a lost process


def note_pid_then_die(directory, how):
    """Write this process's pid down as a file in `directory`, then die: exit code 7, or SIGKILL."""
    Path(directory, str(os.getpid())).touch()
    if how == "exit":
        os._exit(7)
    os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.parametrize("how", ["exit", "signal"])
def test_a_task_whose_process_dies_names_that_process_and_how_it_ended(make_executor, tmp_path, how):
    pids = tmp_path / "pids"
    pids.mkdir()
    ex = make_executor()
    err = ex.submit(note_pid_then_die, str(pids), how).exception(timeout=3 * DEADLINE)
    assert isinstance(err, BrokenProcessPool), repr(err)
    ended = "terminated abruptly with exit code " + ("7" if how == "exit" else "-9")
    if make_executor.kind == "process":
        if sys.version_info >= (3, 15):  # gh-139462: its cause says so
            assert ended in str(err.__cause__), repr(err.__cause__)
        return
    died = {int(p.name) for p in pids.iterdir()}  # one process per attempt
    assert isinstance(err, WorkerLostError)
    assert err.pid in died and err.attempts == len(died)
    assert err.host
    text = str(err)
    assert f"pid {err.pid}" in text, text
    if how == "exit":
        assert err.exitcode == 7 and err.signal is None
        assert "exited with code 7 while running the task" in text, text
    else:
        assert err.exitcode is None and err.signal == "SIGKILL"
        assert "killed by SIGKILL while running the task" in text, text
    # As Python 3.15's BrokenProcessPool: the cause says which process ended and how.
    assert isinstance(err.__cause__, RemoteTraceback)
    assert f"task process {err.pid} on host {err.host} {ended}" in str(err.__cause__)
    copy = pickle.loads(pickle.dumps(err))  # it travels with its attributes (raised in a task, say)
    assert (copy.pid, copy.exitcode, copy.signal, copy.attempts) == (err.pid, err.exitcode, err.signal,
                                                                      err.attempts)


# ============================================================================================ remote tracebacks

_TRACEBACK_SCRIPT = textwrap.dedent("""\
    import linecache, os, sys, traceback
    from concurrent.futures import ProcessPoolExecutor


    def helper(x):
        return 10 // x  # the failing line


    def compute(x):
        return helper(x) + 1


    if __name__ == "__main__":
        kind = sys.argv[1]
        linecache.getlines(__file__)  # this program has its source at hand, as any running program does...
        if kind != "process":
            os.unlink(__file__)  # ...but the machine where its tasks run has no such file
            from clusterexec import ClusterExecutor
        if kind == "process":
            ex = ProcessPoolExecutor(1)
        elif kind == "local":
            ex = ClusterExecutor(max_workers=1)
        else:
            ex = ClusterExecutor(sys.argv[2], authkey=sys.argv[3])
        with ex:
            calls = [lambda: ex.submit(compute, 0).result(), lambda: list(ex.map(compute, [1, 0], chunksize=2))]
            if kind != "process":  # (ProcessPoolExecutor cannot send a lambda)
                calls.append(lambda: ex.submit(lambda x: 1 / x, 0).result())
            for call in calls:
                try:
                    call()
                except ZeroDivisionError as e:
                    print("".join(traceback.format_exception(e.__cause__)))
                    print("=" * 20)
""")


def test_remote_traceback_of_a_function_from_main_shows_its_file_and_lines(make_executor, request, tmp_path):
    script = tmp_path / "main_script.py"
    script.write_text(_TRACEBACK_SCRIPT)
    args = [sys.executable, str(script), make_executor.kind]
    if make_executor.kind == "cluster":
        cluster = request.getfixturevalue("cluster")
        args += [cluster.address, cluster.key]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        out, err = proc.communicate(timeout=3 * DEADLINE)
    finally:
        reap(proc)
    assert proc.returncode == 0, err
    remote = [part for part in out.split("=" * 20) if part.strip()]
    assert len(remote) == (2 if make_executor.kind == "process" else 3), out
    for text in remote[:2]:  # compute → helper, by submit and by a chunk of map
        assert f'File "{script}", line 10, in compute\n    return helper(x) + 1' in text, text
        assert f'File "{script}", line 6, in helper\n    return 10 // x  # the failing line' in text, text
    if make_executor.kind != "process":
        assert f'File "{script}", line 28, in <lambda>\n' in remote[2], remote[2]
        assert "calls.append(lambda: ex.submit(lambda x: 1 / x, 0).result())" in remote[2], remote[2]
        for text in remote:
            assert "<dynamic-code>" not in text, text
            assert "/clusterexec/" not in text, text  # no frame of clusterexec's task runner


# ============================================================================================ Manager proxies


def put_in(shared, key, value):
    shared[key] = value
    return shared[key]


def log_to(queue):
    """The logging cookbook's initializer: this process's records go to `queue`, a Manager's Queue."""
    logging.getLogger().addHandler(logging.handlers.QueueHandler(queue))


def log_hello(x):
    logging.getLogger("clusterexec-test").warning("hello %s from %d", x, os.getpid())
    return os.getpid()


@pytest.fixture
def tcp_manager():
    """A multiprocessing Manager listening on TCP, as one that workers on other machines reach."""
    manager = SyncManager(address=("127.0.0.1", 0))
    manager.start()
    try:
        yield manager
    finally:
        manager.shutdown()


def test_manager_proxies_work_as_arguments_and_as_initargs(make_executor, tcp_manager):
    shared = tcp_manager.dict()
    records = tcp_manager.Queue()
    ex = make_executor(initializer=log_to, initargs=(records,))
    assert ex.submit(put_in, shared, "a", 1).result(timeout=DEADLINE) == 1
    assert list(ex.map(put_in, [shared] * 3, "bcd", [2, 3, 4], chunksize=2)) == [2, 3, 4]
    assert dict(shared) == {"a": 1, "b": 2, "c": 3, "d": 4}
    pid = ex.submit(log_hello, 7).result(timeout=DEADLINE)
    assert records.get(timeout=DEADLINE).getMessage() == f"hello 7 from {pid}"


def test_an_argument_that_cannot_travel_says_why_and_what_to_use_instead(make_executor):
    ex = make_executor()
    queue = multiprocessing.Queue()
    try:
        err = ex.submit(identity, queue).exception(timeout=DEADLINE)
        assert isinstance(err, RuntimeError), repr(err)  # (ProcessPoolExecutor's too)
        assert "only be shared between processes through inheritance" in str(err)
        if make_executor.kind == "process":
            # Its children may inherit one through initargs, created before them: ours are no children.
            ex2 = make_executor(initializer=log_to, initargs=(queue,))
            pid = ex2.submit(log_hello, 1).result(timeout=DEADLINE)
            assert queue.get(timeout=DEADLINE).getMessage() == f"hello 1 from {pid}"
            return
        assert isinstance(err, SerializationError) and err.phase == "pickling the arguments"
        assert "manager.Queue()" in str(err), str(err)
        before = test_contract.descendants()
        with pytest.raises(RuntimeError, match=r"pickling the initializer.*manager\.Queue\(\)"):
            make_executor(initializer=log_to, initargs=(queue,))
        assert test_contract.descendants() <= before  # it said so before it started anything
    finally:
        queue.close()
        queue.join_thread()

"""The phase-labelled error matrix: every place a task's life can fail, every way it can fail there.

    client                      worker task process                          client
    pickling the function   ─▶  unpickling the function                      unpickling the result
    pickling the arguments  ─▶  unpickling the arguments ─▶ running the task  unpickling the exception
                                pickling the result / pickling the exception ─▶

Ways to fail: an exception, ``sys.exit()``, ``os._exit()``, a segfault (``ctypes.string_at(0)``). Each is
triggered in exactly one phase by a helper object: `FailsWhenPickled` fails inside its ``__reduce__``;
`FailsWhenUnpickled` pickles fine and its ``__reduce__`` names `fail_now` as the function that rebuilds it,
so it fails when (and where) it is unpickled. Failures while running come from the task function itself.

For each combination the caller gets a clear error naming the phase, or the task's own exception when the
task itself raised (``SystemExit`` included), never a hang, and the executor stays usable. The one thing
no library can survive is a hard crash of the caller's own process (``os._exit``/segfault while the client
pickles or unpickles): those cases run in a subprocess, and the test asserts that the subprocess dies with
that exit code or signal and that the cluster it started does not outlive it.

Most cases run in local mode (``ClusterExecutor(max_workers=2)``); a few against a master and node started
from the command line (the `cluster` fixture). Deterministic crashes use ``retries=0``: retrying one only
repeats the crash.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import psutil
import pytest
from conftest import is_gone

from clusterexec import ClusterExecutor, RemoteError, SerializationError, WorkerLostError
from clusterexec.serialization import RemoteTraceback

pytestmark = pytest.mark.timeout(60)

HERE = Path(__file__).resolve().parent
RESULT_TIMEOUT = 15  # seconds: "never a hang" means every result() below returns well within this
EXIT_CODE = 7

HOWS = ["raise", "sys.exit", "os._exit", "segfault"]
SOFT = ["raise", "sys.exit"]  # the process survives: the failure is an ordinary Python exception
HARD = ["os._exit", "segfault"]  # the process that hits it dies on the spot


# ================================================================================================ failures


class DeliberateError(Exception):
    pass


def fail_now(how: str, where: str):
    """Fail the way `how` says. Called from a __reduce__ (pickling) or by the unpickler (unpickling)."""
    if how == "raise":
        raise DeliberateError(f"deliberate failure {where}")
    if how == "sys.exit":
        sys.exit(EXIT_CODE)
    if how == "os._exit":
        os._exit(EXIT_CODE)
    if how == "segfault":
        ctypes.string_at(0)  # reads address 0: SIGSEGV
    raise AssertionError(f"still alive after {how} {where}")


class FailsWhenPickled:
    """Pickling it fails (in whoever pickles it). Callable, so it can be submitted as the function."""

    def __init__(self, how: str):
        self.how = how

    def __call__(self, *args):
        return args

    def __reduce__(self):
        fail_now(self.how, "while being pickled")


class FailsWhenUnpickled:
    """Pickles fine; unpickling it calls fail_now (in whoever unpickles it). Callable too."""

    def __init__(self, how: str):
        self.how = how

    def __call__(self, *args):
        return args

    def __reduce__(self):
        return fail_now, (self.how, "while being unpickled")


class ErrorFailsWhenPickled(Exception):
    """An exception raised by a task that cannot be pickled to travel back."""

    def __init__(self, how: str):
        super().__init__(f"task failed ({how} when pickled)")
        self.how = how

    def __reduce__(self):
        fail_now(self.how, "while the exception is pickled")


class ErrorFailsWhenUnpickled(Exception):
    """An exception raised by a task that pickles fine but fails when the client unpickles it."""

    def __init__(self, how: str):
        super().__init__(f"task failed ({how} when unpickled)")
        self.how = how

    def __reduce__(self):
        return fail_now, (self.how, "while the exception is unpickled")


# ================================================================================================ tasks


def square(x):
    return x * x


def identity(x):
    return x


def fail_while_running(how):
    fail_now(how, "while running")


def return_fails_when_pickled(how):
    return FailsWhenPickled(how)


def return_fails_when_unpickled(how):
    return FailsWhenUnpickled(how)


def raise_error_fails_when_pickled(how):
    raise ErrorFailsWhenPickled(how)


def raise_error_fails_when_unpickled(how):
    raise ErrorFailsWhenUnpickled(how)


def map_item(i, bad_at, phase, how):
    """For the map tests: item `bad_at` fails in `phase`, the others return i * 10."""
    if i != bad_at:
        return i * 10
    if phase == "running the task":
        fail_now(how, "while running")
    return FailsWhenPickled(how)  # phase "pickling the result"


# What to submit to make a task fail in each phase: (function, argument) given the way of failing.
SUBMIT = {
    "pickling the function": lambda how: (FailsWhenPickled(how), 1),
    "pickling the arguments": lambda how: (identity, FailsWhenPickled(how)),
    "unpickling the function": lambda how: (FailsWhenUnpickled(how), 1),
    "unpickling the arguments": lambda how: (identity, FailsWhenUnpickled(how)),
    "running the task": lambda how: (fail_while_running, how),
    "pickling the result": lambda how: (return_fails_when_pickled, how),
    "unpickling the result": lambda how: (return_fails_when_unpickled, how),
    "pickling the exception": lambda how: (raise_error_fails_when_pickled, how),
    "unpickling the exception": lambda how: (raise_error_fails_when_unpickled, how),
}
CLIENT_PHASES = ["pickling the function", "pickling the arguments", "unpickling the result",
                 "unpickling the exception"]
WORKER_PHASES = ["unpickling the function", "unpickling the arguments", "running the task",
                 "pickling the result", "pickling the exception"]


# ================================================================================================ helpers


@pytest.fixture(scope="module")
def _shared_local_ex():
    with ClusterExecutor(max_workers=2) as ex:
        yield ex


@pytest.fixture
def local_ex(_shared_local_ex):
    """One local-mode executor for the whole matrix: it must stay usable after every failure in turn (and
    it saves a start-up per case). Each test checks it works before handing it on."""
    still_usable(_shared_local_ex)
    return _shared_local_ex


def submit_failing(ex, phase: str, how: str, retries: int = 0):
    fn, arg = SUBMIT[phase](how)
    return ex.options(retries=retries).submit(fn, arg)


def still_usable(ex) -> None:
    assert ex.submit(square, 7).result(timeout=RESULT_TIMEOUT) == 49
    assert list(ex.map(square, range(8))) == [x * x for x in range(8)]


def assert_worker_lost(err: BaseException, phase: str, how: str, attempts: int = 1) -> None:
    """A task process died: WorkerLostError (a BrokenProcessPool) saying how, and in which phase."""
    assert isinstance(err, WorkerLostError), repr(err)
    assert isinstance(err, BrokenProcessPool)
    message = str(err)
    assert f"while {phase}" in message, message
    if how == "os._exit":
        assert f"exited with code {EXIT_CODE}" in message, message
        assert err.exitcode == EXIT_CODE and err.signal is None
    else:
        assert "killed by SIGSEGV" in message, message
        assert err.signal == "SIGSEGV"
    assert err.attempts == attempts
    assert err.pid and str(err.pid) in message


def assert_serialization_error(err: BaseException, phase: str, how: str) -> None:
    assert isinstance(err, SerializationError), repr(err)
    assert err.phase == phase
    message = str(err)
    assert phase in message, message
    if how == "raise":
        assert "DeliberateError" in message and "deliberate failure" in message, message
    else:
        assert "SystemExit" in message, message


def outcome(future) -> BaseException:
    """The exception the Future fails with; it must not succeed, and must not take long."""
    try:
        value = future.result(timeout=RESULT_TIMEOUT)
    except BaseException as e:  # noqa: BLE001 - SystemExit is an expected outcome
        if not future.done():
            raise AssertionError(f"no outcome within {RESULT_TIMEOUT} s: the caller would hang") from None
        return e
    raise AssertionError(f"the task should have failed, but returned {value!r}")


# ======================================================================================== 1. the worker's phases


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("phase", WORKER_PHASES)
def test_failure_in_a_worker_phase_names_that_phase_and_leaves_the_executor_usable(local_ex, phase, how):
    ex = local_ex
    before = ex.submit(square, 3)
    err = outcome(submit_failing(ex, phase, how))
    after = ex.submit(square, 4)

    if how in HARD:
        # The task process died; the agent read the phase it was in from memory shared with it.
        assert_worker_lost(err, phase, how)
    elif phase == "running the task":
        # The task's own exception travels back as itself, SystemExit included.
        if how == "raise":
            assert type(err) is DeliberateError and str(err) == "deliberate failure while running"
            assert isinstance(err.__cause__, RemoteTraceback)
            assert "fail_while_running" in str(err.__cause__)
        else:
            assert type(err) is SystemExit and err.code == EXIT_CODE
    elif phase == "pickling the exception":
        # The task raised, but its exception cannot be pickled: its description travels instead.
        assert isinstance(err, RemoteError), repr(err)
        assert err.type_name.endswith("ErrorFailsWhenPickled")
        assert err.remote_message == f"task failed ({how} when pickled)"
        assert "could not be pickled" in str(err)
        assert "SystemExit" in str(err) if how == "sys.exit" else "DeliberateError" in str(err)
        assert "raise_error_fails_when_pickled" in err.traceback
    else:
        assert_serialization_error(err, phase, how)
        assert "pid" in str(err) and "on host" in str(err)  # says where it happened
        assert isinstance(err.__cause__, RemoteTraceback)  # with the worker's traceback

    assert before.result(timeout=RESULT_TIMEOUT) == 9
    assert after.result(timeout=RESULT_TIMEOUT) == 16
    still_usable(ex)


# ======================================================================================== 2. the client's phases


@pytest.mark.parametrize("how", SOFT)
@pytest.mark.parametrize("phase", CLIENT_PHASES)
def test_failure_in_a_client_phase_names_that_phase_and_leaves_the_executor_usable(local_ex, phase, how):
    ex = local_ex
    t0 = time.monotonic()
    err = outcome(submit_failing(ex, phase, how))
    assert time.monotonic() - t0 < RESULT_TIMEOUT
    if phase == "unpickling the exception":
        # The task raised; its exception could not be rebuilt here, so its description is raised.
        assert isinstance(err, RemoteError), repr(err)
        assert err.type_name.endswith("ErrorFailsWhenUnpickled")
        assert err.remote_message == f"task failed ({how} when unpickled)"
        assert "could not be unpickled" in str(err) and "unpickling the exception" in str(err)
        assert "raise_error_fails_when_unpickled" in err.traceback
    else:
        assert_serialization_error(err, phase, how)
    still_usable(ex)


@pytest.mark.parametrize("how", SOFT)
def test_pickling_failures_in_map_fail_at_that_item_after_the_items_before_it(local_ex, how):
    ex = local_ex
    got = []
    with pytest.raises(SerializationError) as info:
        for value in ex.map(identity, [0, 1, FailsWhenPickled(how), 3]):
            got.append(value)
    assert got == [0, 1]
    assert_serialization_error(info.value, "pickling the arguments", how)
    with pytest.raises(SerializationError) as info:
        list(ex.map(FailsWhenPickled(how), range(3)))
    assert_serialization_error(info.value, "pickling the function", how)
    still_usable(ex)


# ======================================================================================== 3. map, chunked or not


@pytest.mark.parametrize("chunksize", [1, 3])
@pytest.mark.parametrize("phase, how", [
    ("running the task", "raise"),
    ("running the task", "os._exit"),
    ("pickling the result", "sys.exit"),
    ("pickling the result", "segfault"),
])
def test_failure_in_a_map_item_is_raised_at_that_item_after_the_items_before_it(local_ex, phase, how, chunksize):
    ex = local_ex
    n, bad_at = 9, 7
    got = []
    with pytest.raises(BaseException) as info:  # noqa: PT011 - checked below, per phase
        for value in ex.options(retries=0).map(map_item, range(n), [bad_at] * n, [phase] * n, [how] * n,
                                               chunksize=chunksize, timeout=RESULT_TIMEOUT):
            got.append(value)
    err = info.value
    if how in HARD:
        assert_worker_lost(err, phase, how)
    elif phase == "running the task":
        assert type(err) is DeliberateError
    else:
        assert_serialization_error(err, phase, how)
    if chunksize == 1 or how == "raise":
        # One task per item, or a chunk whose item raised: everything before the bad item arrives.
        assert got == [i * 10 for i in range(bad_at)]
    else:
        # The whole chunk holding the bad item failed: everything before that chunk arrives.
        first_of_chunk = bad_at - bad_at % chunksize
        assert got == [i * 10 for i in range(first_of_chunk)]
    still_usable(ex)


# ======================================================================================== 4. hard crashes of the client


CRASH_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    import test_phases as T
    from clusterexec import ClusterExecutor

    ex = {executor}
    assert ex.submit(T.square, 3).result(timeout=T.RESULT_TIMEOUT) == 9
    if ex._local is not None:
        import psutil
        local = psutil.Process(ex._local.process.pid)
        print("local cluster pids", local.pid, *[p.pid for p in local.children(recursive=True)], flush=True)
    print("ready", flush=True)
    fn, arg = T.SUBMIT[{phase!r}]({how!r})
    future = ex.options(retries=0).submit(fn, arg)
    try:
        future.result(timeout=T.RESULT_TIMEOUT)
    except BaseException as e:
        print("survived with", type(e).__name__, e, flush=True)
    else:
        print("survived", flush=True)
""")


def run_crashing_client(phase: str, how: str, executor: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    script = CRASH_SCRIPT.format(tests=str(HERE), executor=executor, phase=phase, how=how)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    lines = proc.stdout.splitlines()
    assert "ready" in lines, f"the client did not get going: {proc.stdout!r} {proc.stderr!r}"
    return proc, lines


def assert_died(proc: subprocess.CompletedProcess, how: str) -> None:
    expected = EXIT_CODE if how == "os._exit" else -signal.SIGSEGV
    assert proc.returncode == expected, (proc.returncode, proc.stdout, proc.stderr)
    assert "survived" not in proc.stdout


@pytest.mark.parametrize("how", HARD)
@pytest.mark.parametrize("phase", CLIENT_PHASES)
def test_hard_crash_while_the_client_pickles_or_unpickles_kills_the_client_and_nothing_else(phase, how):
    """os._exit or a segfault inside the caller's own pickling/unpickling ends the caller's process: no
    library can raise an exception from a process that no longer exists (any executor that pickles in the
    caller's process, ProcessPoolExecutor and loky included, dies the same way). What clusterexec can
    promise is that it leaves nothing behind: the private cluster of a local-mode executor notices its
    parent is gone and exits, and its task processes with it."""
    proc, lines = run_crashing_client(phase, how, "ClusterExecutor(max_workers=2)")
    assert_died(proc, how)
    pids = [int(pid) for pid in next(line for line in lines if line.startswith("local cluster pids")).split()[3:]]
    assert len(pids) == 3  # the local master-and-agent process and its two task processes
    deadline = time.monotonic() + 10
    while left := [pid for pid in pids if not is_gone(pid)]:
        assert time.monotonic() < deadline, f"processes {left} of the local cluster outlived its crashed client"
        time.sleep(0.05)


# ======================================================================================== 5. against a real cluster


@pytest.mark.parametrize("how", HARD)
@pytest.mark.parametrize("phase", ["unpickling the function", "pickling the result"])
def test_hard_crash_on_a_cluster_node_is_retried_then_named_with_its_phase(cluster, phase, how):
    """With the default retry budget (2) the crash repeats on three fresh processes; the error says so,
    and the node replaces each dead process."""
    agent = psutil.Process(cluster.workers[0].pid)
    with cluster.executor() as ex:
        fn, arg = SUBMIT[phase](how)
        ok = [ex.submit(square, i) for i in range(4)]
        err = outcome(ex.submit(fn, arg))
        assert_worker_lost(err, phase, how, attempts=3)
        assert "on each of 3 attempts" in str(err)
        assert err.host and err.host in str(err)
        assert [f.result(timeout=RESULT_TIMEOUT) for f in ok] == [0, 1, 4, 9]
        still_usable(ex)
        deadline = time.monotonic() + 10
        while len([p for p in agent.children() if p.status() != psutil.STATUS_ZOMBIE]) != 2:
            assert time.monotonic() < deadline, "the node did not get back to 2 task processes"
            time.sleep(0.05)


@pytest.mark.parametrize("phase, how", [
    ("unpickling the arguments", "raise"),
    ("unpickling the arguments", "sys.exit"),
    ("running the task", "sys.exit"),
    ("unpickling the result", "sys.exit"),
])
def test_soft_failure_on_a_cluster_is_not_retried_and_names_its_phase(cluster, phase, how):
    """An exception (SystemExit included) is an answer, not a lost worker: it is never retried."""
    with cluster.executor() as ex:
        err = outcome(ex.submit(*SUBMIT[phase](how)))
        if phase == "running the task":
            assert type(err) is SystemExit and err.code == EXIT_CODE
        else:
            assert_serialization_error(err, phase, how)
        still_usable(ex)


@pytest.mark.parametrize("how", HARD)
def test_client_crashing_while_unpickling_a_result_leaves_the_cluster_serving_others(cluster, how):
    executor = f"ClusterExecutor({cluster.address!r}, authkey={cluster.key!r})"
    proc, _ = run_crashing_client("unpickling the result", how, executor)
    assert_died(proc, how)
    with cluster.executor() as ex:
        still_usable(ex)
        deadline = time.monotonic() + 10
        while len(ex.cluster_info()["clients"]) != 1:
            assert time.monotonic() < deadline, "the master still lists the crashed client"
            time.sleep(0.05)

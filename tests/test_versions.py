"""Version checks: a worker node whose Python cannot run a client's pickles never gets its tasks.

The odd worker is real: the same clusterexec and cloudpickle run by another installed Python (3.11, 3.12
or 3.13, whichever is not running the tests). Skipped, with the reason, where no other one is installed.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import cloudpickle
import pytest
from conftest import Cluster, _env, wait_until

from clusterexec import ClusterUnavailable, ClusterWarning, IncompatibleWorkers
from clusterexec.master import compat_key

pytestmark = pytest.mark.timeout(90)

REPO = Path(__file__).resolve().parent.parent


def _other_python() -> tuple[str, str] | None:
    mine = f"{sys.version_info.major}.{sys.version_info.minor}"
    for minor in ("3.12", "3.13", "3.11"):
        if minor == mine:
            continue
        candidates = [shutil.which(f"python{minor}")]
        root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
        candidates += sorted(glob.glob(f"{root}/versions/{minor}.*/bin/python{minor}"))
        for path in filter(None, candidates):
            try:
                out = subprocess.run([path, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True,
                                     text=True, timeout=20)
            except (OSError, subprocess.TimeoutExpired):
                continue
            if out.returncode == 0:
                return path, minor
    return None


OTHER = _other_python()
needs_other = pytest.mark.skipif(OTHER is None, reason="needs a second Python (3.11, 3.12 or 3.13) to run an "
                                                       "incompatible worker; none found on PATH or in pyenv")


def start_other_worker(c: Cluster) -> subprocess.Popen:
    """A real worker node on another Python minor version (same clusterexec and cloudpickle source)."""
    python, _ = OTHER
    env = _env()
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(Path(cloudpickle.__file__).parent.parent),
                                         env.get("PYTHONPATH", "")])
    env["PYTHONNOUSERSITE"] = "1"
    before = len(c.info()["workers"])
    log = open(c.log_dir / "odd-worker.log", "ab")
    proc = subprocess.Popen([python, "-m", "clusterexec.worker", c.address, "--nprocs", "1",
                             "--authkey-file", str(c.key_file)], stdout=log, stderr=subprocess.STDOUT, env=env)
    c.workers.append(proc)
    c.wait_for(lambda info: len(info["workers"]) > before, what="the other-Python worker to join")
    return proc


def which_python(_: int = 0) -> str:
    import platform

    return platform.python_version()


def test_patch_levels_may_differ_minor_versions_may_not():
    assert compat_key({"python": "3.11.7", "cloudpickle": "3.1.2"}) == compat_key(
        {"python": "3.11.9", "cloudpickle": "3.1.0"})
    assert compat_key({"python": "3.11.7", "cloudpickle": "3.1.2"}) != compat_key(
        {"python": "3.12.1", "cloudpickle": "3.1.2"})
    assert compat_key({"python": "3.11.7", "cloudpickle": "3.1.2"}) != compat_key(
        {"python": "3.11.7", "cloudpickle": "3.0.0"})


@needs_other
def test_only_incompatible_workers_warn_then_fail_instead_of_hanging(empty_cluster):
    c = empty_cluster
    start_other_worker(c)
    with pytest.warns(ClusterWarning) as caught:
        with c.executor(compatible_wait=2) as ex:
            future = ex.submit(which_python)
            started = time.monotonic()
            with pytest.raises(IncompatibleWorkers) as info:
                future.result(timeout=30)
            assert time.monotonic() - started < 10
    text = str(caught[0].message)
    assert f"Python {sys.version.split()[0]}" in text and f"Python {OTHER[1]}" in text, text
    message = str(info.value)
    assert f"Python {OTHER[1]}" in message and "2 s" in message, message


@needs_other
def test_a_mixed_cluster_runs_each_task_on_a_matching_python(empty_cluster):
    c = empty_cluster
    start_other_worker(c)
    c.start_worker(1)
    with pytest.warns(ClusterWarning):
        with c.executor(compatible_wait=2) as ex:
            seen = set(ex.map(which_python, range(40)))
    assert seen == {sys.version.split()[0]}
    info = c.info()
    odd = [w for w in info["workers"] if w["python"].startswith(OTHER[1])]
    assert odd and odd[0]["done"] == 0


@needs_other
def test_a_matching_worker_that_joins_in_time_takes_the_tasks(empty_cluster):
    c = empty_cluster
    start_other_worker(c)
    with pytest.warns(ClusterWarning):
        with c.executor(compatible_wait=60) as ex:
            future = ex.submit(which_python)
            time.sleep(0.5)
            assert not future.done()
            c.start_worker(1)
            assert future.result(timeout=30) == sys.version.split()[0]


def _nodes(ex) -> int:
    try:
        return len(ex.cluster_info()["workers"])
    except ClusterUnavailable:  # (not back yet)
        return 0


@needs_other
def test_the_version_warning_is_shown_once_though_master_and_nodes_reconnect(empty_cluster):
    c = empty_cluster
    start_other_worker(c)
    c.start_worker(1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # (what a program runs with; pytest.warns would show every one)
        with c.executor(reconnect_window=30) as ex:
            assert sorted(ex.map(abs, range(-10, 0))) == list(range(1, 11))
            # The master restarts on its port; the client and the odd node (the same process) come back, and
            # the master says again what it said before.
            c.master.send_signal(signal.SIGTERM)
            c.master.wait(10)
            c.start_master(c.port)
            # (Asked on the executor's own connection: another client would be told too.)
            wait_until(lambda: _nodes(ex) == 2, 30, what="both nodes to come back")
            assert sorted(ex.map(abs, range(-10, 0))) == list(range(1, 11))
            ex.cluster_info()  # (whatever the master said before its answer has been heard)
    said = [str(w.message) for w in caught if issubclass(w.category, ClusterWarning)]
    assert len(said) == 1, said

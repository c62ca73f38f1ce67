import signal

import psutil
import pytest
from conftest import is_gone

from clusterexec import ClusterExecutor


def test_map_through_master_and_worker_started_by_hand(cluster):
    with cluster.executor() as ex:
        assert sum(ex.map(lambda x: x * x, range(1000))) == sum(x * x for x in range(1000))
        info = ex.cluster_info()
    assert len(info["workers"]) == 1
    assert info["workers"][0]["nprocs"] == 2


def test_local_mode_round_trip():
    with ClusterExecutor(max_workers=2) as ex:
        assert ex.submit(pow, 2, 10).result(timeout=10) == 1024


@pytest.mark.timeout(60)
def test_a_master_started_with_workers_is_also_a_worker_node(empty_cluster):
    """minimalcluster's master-as-worker: `python -m clusterexec.master --workers N`, nothing else."""
    c = empty_cluster
    c.stop()
    c.start_master(0, "--workers", "2")
    master = psutil.Process(c.master.pid)
    with c.executor() as ex:
        pids = set(ex.map(_pid, range(40)))
        info = ex.cluster_info()
    assert [(w["pid"], w["nprocs"]) for w in info["workers"]] == [(c.master.pid, 2)]
    children = {p.pid for p in master.children()}
    assert pids and pids <= children  # the tasks ran in the master's own task processes
    c.master.send_signal(signal.SIGTERM)
    assert c.master.wait(10) == 0
    assert all(is_gone(pid) for pid in children)


def _pid(_):
    import os

    return os.getpid()

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

"""The master's scheduling state, driven directly: no sockets, no processes."""

from clusterexec.protocol import Blob, Task
from clusterexec.scheduler import Scheduler

FUNCTION = Blob("f" * 64, b"a pickled function")


def tasks(*ids, **opts):
    return [Task(i, [FUNCTION], [], opts or None) for i in ids]


def assigned(sched, node_id):
    node = sched.nodes[node_id]
    out = [(ts.client.id, ts.task.id) for ts in node.out_tasks]
    node.out_tasks = []
    return out


def deliveries(sched, client_id):
    client = sched.clients[client_id]
    out = client.out_results
    client.out_results = []
    return [(tid, status) for tid, status, _, _ in out]


def test_clients_are_served_round_robin_not_first_come_first_served():
    s = Scheduler(prefetch=0)
    s.add_client(1)
    s.add_client(2)
    s.submit(1, tasks(*range(1000)))
    s.add_node(10, nprocs=1)
    s.schedule()
    assert assigned(s, 10) == [(1, 0)]
    s.submit(2, tasks(0))
    # Finish the running task; the next slot goes to client 2, not to client 1's 999 others.
    (gid,) = list(s.nodes[10].assigned)
    s.result(10, gid, "ok", [], None)
    s.schedule()
    assert assigned(s, 10) == [(2, 0)]


def test_a_node_gets_its_processes_plus_prefetch_and_no_more():
    s = Scheduler()
    s.add_client(1)
    s.submit(1, tasks(*range(100)))
    s.add_node(10, nprocs=3)
    s.schedule()
    assert len(assigned(s, 10)) == 6


def test_a_node_joining_later_gets_queued_work_at_once():
    s = Scheduler(prefetch=0)
    s.add_client(1)
    s.add_node(10, nprocs=1)
    s.submit(1, tasks(*range(10)))
    s.schedule()
    assigned(s, 10)
    s.add_node(11, nprocs=2)
    s.schedule()
    assert [t for _, t in assigned(s, 11)] == [1, 2]


def test_a_lost_task_is_retried_first_then_fails_after_its_budget():
    s = Scheduler(prefetch=0)
    s.add_client(1)
    s.add_node(10, nprocs=1)
    s.submit(1, tasks(7, 8))
    for attempt in range(3):
        s.schedule()
        assert assigned(s, 10) == [(1, 7)], f"attempt {attempt}: the retried task goes first"
        (gid,) = list(s.nodes[10].assigned)
        s.started(10, [gid])
        s.result(10, gid, "lost", [], {"pid": 99, "signal": "SIGKILL"})
    (item,) = s.clients[1].out_results
    assert item[:2] == (7, "lost") and item[3]["attempts"] == 3 and item[3]["signal"] == "SIGKILL"
    s.schedule()
    assert assigned(s, 10) == [(1, 8)]


def test_retry_budget_is_per_task():
    s = Scheduler(prefetch=0)
    s.add_client(1)
    s.add_node(10, nprocs=1)
    s.submit(1, tasks(1, retries=0))
    s.schedule()
    (gid,) = list(s.nodes[10].assigned)
    s.started(10, [gid])
    s.result(10, gid, "lost", [], {"exitcode": 3})
    (item,) = s.clients[1].out_results
    assert item[1] == "lost" and item[3]["attempts"] == 1 and item[3]["exitcode"] == 3


def test_node_loss_requeues_unstarted_tasks_without_counting_an_attempt_and_keeps_order():
    s = Scheduler(prefetch=1)
    s.add_client(1)
    s.add_node(10, nprocs=1)
    s.submit(1, tasks(1, 2, 3))
    s.schedule()
    assert [t for _, t in assigned(s, 10)] == [1, 2]
    s.remove_node(10)
    s.add_node(11, nprocs=2)
    s.schedule()
    assert [t for _, t in assigned(s, 11)] == [1, 2, 3]
    assert all(ts.attempts == 0 for ts in s.nodes[11].assigned.values())


def test_a_duplicate_result_is_delivered_once():
    s = Scheduler()
    s.add_client(1)
    s.add_node(10, nprocs=1)
    s.submit(1, tasks(1))
    s.schedule()
    (gid,) = list(s.nodes[10].assigned)
    s.result(10, gid, "ok", [], None)
    s.result(10, gid, "ok", [], None)
    assert deliveries(s, 1) == [(1, "ok")]


def test_cancel_of_a_queued_task_is_immediate_and_it_is_never_assigned():
    s = Scheduler(prefetch=0)
    s.add_client(1)
    s.add_node(10, nprocs=1)
    s.submit(1, tasks(1, 2, 3))
    s.schedule()
    assigned(s, 10)
    s.cancel(1, req=5, task_ids=[2])
    assert s.clients[1].out_cancel_replies == [{"req": 5, "cancelled": [2], "refused": []}]
    (gid,) = list(s.nodes[10].assigned)
    s.result(10, gid, "ok", [], None)
    s.schedule()
    assert [t for _, t in assigned(s, 10)] == [3]


def test_cancel_of_a_started_task_is_refused():
    s = Scheduler(prefetch=0)
    s.add_client(1)
    s.add_node(10, nprocs=1)
    s.submit(1, tasks(1))
    s.schedule()
    (gid,) = list(s.nodes[10].assigned)
    s.started(10, [gid])
    s.cancel(1, req=1, task_ids=[1])
    assert s.clients[1].out_cancel_replies == [{"req": 1, "cancelled": [], "refused": [1]}]


def test_cancel_of_a_task_queued_again_after_its_process_died_is_refused():
    # It ran once: cancelling it now would say True for a task that ran.
    s = Scheduler(prefetch=0)
    s.add_client(1)
    s.add_node(10, nprocs=1)
    s.submit(1, tasks(1, 2))
    s.schedule()
    (gid,) = list(s.nodes[10].assigned)
    s.started(10, [gid])
    s.result(10, gid, "lost", [], {"exitcode": 9})
    assert s.task(gid) is not None and s.task(gid).node is None  # queued to run again
    s.cancel(1, req=1, task_ids=[1, 2])
    assert s.clients[1].out_cancel_replies == [{"req": 1, "cancelled": [2], "refused": [1]}]


def test_cancel_of_a_task_whose_node_died_before_confirming_its_start_is_refused():
    s = Scheduler(prefetch=0)
    s.add_client(1)
    s.add_node(10, nprocs=1)
    s.submit(1, tasks(1))
    s.schedule()
    s.remove_node(10)  # it may have been running: nodes report starts a moment late
    s.cancel(1, req=1, task_ids=[1])
    assert s.clients[1].out_cancel_replies == [{"req": 1, "cancelled": [], "refused": [1]}]


def test_cancel_of_a_task_the_client_already_ran_once_is_refused():
    s = Scheduler(prefetch=0)
    s.add_client(1)
    s.submit(1, tasks(1, tried=1))  # (a local client's borrowed process died running it)
    s.cancel(1, req=1, task_ids=[1])
    assert s.clients[1].out_cancel_replies == [{"req": 1, "cancelled": [], "refused": [1]}]


def test_a_task_with_a_malformed_option_fails_alone_and_is_never_assigned():
    s = Scheduler(prefetch=0)
    s.add_client(1)
    s.add_node(10, nprocs=2)
    s.submit(1, tasks(1) + tasks(2, retries="x") + tasks(3, timeout=float("nan")) + tasks(4))
    assert [(tid, status) for tid, status in deliveries(s, 1)] == [(2, "error"), (3, "error")]
    s.schedule()
    assert [t for _, t in assigned(s, 10)] == [1, 4]


def test_every_task_option_the_client_writes_is_accepted():
    s = Scheduler(prefetch=0)
    s.add_client(1)
    s.submit(1, [Task(1, [FUNCTION, FUNCTION], [b"a", b"b"], {"retries": 0, "timeout": 1.5, "tried": 1, "confirm": 1,
                                                              "mtpc": 3, "init": 1, "out": 0, "chunk": 2, "shm": [1],
                                                              "byval": ["mymod"]})])
    assert deliveries(s, 1) == []
    assert len(s.clients[1].queue) == 1


def test_cancel_of_a_prefetched_task_asks_the_node_and_answers_when_it_replies():
    s = Scheduler(prefetch=1)
    s.add_client(1)
    s.add_node(10, nprocs=1)
    s.submit(1, tasks(1, 2))
    s.schedule()
    gids = {ts.task.id: ts.gid for ts in s.nodes[10].assigned.values()}
    s.started(10, [gids[1]])
    s.cancel(1, req=9, task_ids=[2])
    assert s.clients[1].out_cancel_replies == []
    ((key, asked),) = s.nodes[10].out_cancel
    assert asked == [gids[2]]
    s.cancel_reply(10, key, cancelled=[gids[2]], refused=[])
    assert s.clients[1].out_cancel_replies == [{"req": 9, "cancelled": [2], "refused": []}]
    assert gids[2] not in s.nodes[10].assigned


def test_a_cancel_waiting_on_a_node_that_dies_is_refused_and_the_task_runs_again():
    # The node may have started the task a moment before it went, without saying so yet: the cancel
    # cannot be known to have worked, so it is refused (False), and the task goes back to the queue.
    s = Scheduler(prefetch=1)
    s.add_client(1)
    s.add_node(10, nprocs=1)
    s.submit(1, tasks(1, 2))
    s.schedule()
    s.cancel(1, req=3, task_ids=[2])
    s.remove_node(10)
    assert s.clients[1].out_cancel_replies == [{"req": 3, "cancelled": [], "refused": [2]}]
    s.add_node(11, nprocs=4)
    s.schedule()
    assert [t for _, t in assigned(s, 11)] == [1, 2]


def test_a_leaving_client_has_its_queue_dropped_and_its_running_tasks_stopped():
    s = Scheduler(prefetch=0)
    s.add_client(1)
    s.add_client(2)
    s.add_node(10, nprocs=1)
    s.submit(1, tasks(*range(5)))
    s.schedule()
    assigned(s, 10)
    s.submit(2, tasks(0))
    (gid,) = list(s.nodes[10].assigned)
    s.remove_client(1)
    assert s.nodes[10].out_drop == [gid]
    s.schedule()
    assert assigned(s, 10) == [(2, 0)]
    s.result(10, gid, "ok", [], None)  # a late result of a gone client is ignored
    assert 1 not in s.clients


def test_a_task_that_kills_its_node_before_confirming_its_start_still_runs_out_of_retries():
    s = Scheduler(prefetch=0)
    s.add_client(1)
    s.submit(1, tasks(1))
    for node_id in (10, 11, 12):
        s.add_node(node_id, nprocs=1)
        s.schedule()
        (ts,) = s.nodes[node_id].out_tasks
        s.nodes[node_id].out_tasks = []
        if node_id > 10:
            assert ts.task.opts == {"confirm": 1}, "after an unconfirmed loss the node must confirm at once"
            s.started(node_id, [ts.gid])
        s.remove_node(node_id)  # the node dies; the first time before it reported the start
    (item,) = s.clients[1].out_results
    assert item[1] == "lost" and item[3]["node_lost"] and item[3]["attempts"] == 3


def test_a_task_that_was_only_queued_on_a_dying_node_is_not_charged_for_it():
    s = Scheduler(prefetch=0)
    s.add_client(1)
    s.submit(1, tasks(1))
    s.add_node(10, nprocs=1)
    s.schedule()
    s.remove_node(10)
    s.add_node(11, nprocs=1)
    s.schedule()
    (ts,) = s.nodes[11].assigned.values()
    s.started(11, [ts.gid])
    s.result(11, ts.gid, "ok", [], None)
    assert s.clients[1].out_results[0][1] == "ok"


def test_a_node_asks_for_more_ahead_and_gives_back_the_surplus_in_order():
    s = Scheduler()
    s.add_client(1)
    s.add_node(10, nprocs=2)
    s.submit(1, tasks(*range(100)))
    s.schedule()
    assert len(assigned(s, 10)) == 4  # its processes plus the default prefetch
    s.set_prefetch(10, 40)
    s.schedule()
    assert len(assigned(s, 10)) == 38  # now 2 + 40 in all
    gids = {ts.task.id: ts.gid for ts in s.nodes[10].assigned.values()}
    s.set_prefetch(10, 0, back=[gids[t] for t in range(4, 42)])  # the tasks turned slow
    assert len(s.nodes[10].assigned) == 4
    s.add_node(11, nprocs=2)
    s.schedule()
    assert [t for _, t in assigned(s, 11)] == [4, 5, 6, 7]  # the ones given back come first, in order
    assert deliveries(s, 1) == []


def test_a_cancel_or_kill_crossing_a_give_back_is_done_by_the_master():
    s = Scheduler()
    s.add_client(1)
    s.add_node(10, nprocs=1)
    s.submit(1, tasks(1, 2, 3))
    s.set_prefetch(10, 10)
    s.schedule()
    gids = {ts.task.id: ts.gid for ts in s.nodes[10].assigned.values()}
    s.cancel(1, req=5, task_ids=[2])
    s.kill(1, [3])
    s.set_prefetch(10, 0, back=[gids[2], gids[3]])  # sent before the node saw the cancel and the kill
    s.cancel_reply(10, s.nodes[10].out_cancel[0][0], cancelled=[], refused=[gids[2]])
    assert s.clients[1].out_cancel_replies == [{"req": 5, "cancelled": [2], "refused": []}]
    assert deliveries(s, 1) == [(3, "error")]
    s.add_node(11, nprocs=4)
    s.schedule()
    assert assigned(s, 11) == []  # neither runs again


def test_a_kill_in_flight_to_a_node_that_dies_still_kills_the_task():
    # The user killed two tasks (one running, one queued on the node); the node died before it acted on
    # either. Neither may run again elsewhere: both end with TaskKilled, the running one as started.
    s = Scheduler()
    s.add_client(1)
    s.add_node(10, nprocs=1)
    s.submit(1, tasks(1, 2, 3))
    s.schedule()
    gids = {ts.task.id: ts.gid for ts in s.nodes[10].assigned.values()}
    s.started(10, [gids[1]])
    s.kill(1, [1, 2])
    s.remove_node(10)
    out = {tid: info for tid, _, _, info in s.clients[1].out_results}
    assert out == {1: {"kind": "killed", "started": True}, 2: {"kind": "killed", "started": False}}
    s.add_node(11, nprocs=4)
    s.schedule()
    assert assigned(s, 11) == [(1, 3)]  # only the task nobody killed runs again

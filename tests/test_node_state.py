"""A worker node's state, driven directly: no processes, no sockets, no event loop, no clock (`now` is given)."""

import pytest

from clusterexec.node_state import PIPELINE_MAX, PIPELINE_WORK, SLOW_AFTER, NodeState, Process
from clusterexec.protocol import Blob, Task

QUICK = Blob("q" * 64, b"a quick function")
SLOW = Blob("s" * 64, b"a slow function")
UNKNOWN = Blob("u" * 64, b"a function never seen")


def task(i, fn=QUICK, **opts):
    return Task(i, [fn], [], opts or None)


def node_with(nprocs, **kw):
    node = NodeState(nprocs, host="n1", **kw)
    procs = [node.add(Process(100 + i)) for i in range(nprocs)]
    for proc in procs:
        node.attached(proc)
    return node, procs


def runs(dispatch):
    return {proc.pid: [t.id for t in tasks] for proc, tasks in dispatch.runs.items()}


def held(proc):
    return [t.id for t in proc.tasks]


def finish(node, proc, now, status="ok", bufs=()):
    """The process sends the result of the task it runs."""
    return node.result(proc, proc.tasks[0].id, status, list(bufs), None, now)


def warm(node, procs, fn=QUICK, took=0.0005, first_id=-1000):
    """Each process runs one task of `fn` that takes `took` seconds: both become known as that quick."""
    node.tasks_arrived([task(first_id - i, fn) for i in range(len(procs))])
    node.dispatch(0.0)
    for proc in procs:
        finish(node, proc, took)
    node.discard_outbox()


def sent(node, now=1.0):
    """The messages a flush sends to the master, by type."""
    out = {}
    for header, buffers in node.flush(now):
        out.setdefault(header["t"], []).append((header, buffers))
    return out


def result_ids(node):
    """The results due to the master (taken from the outbox)."""
    out = [(gid, status) for gid, status, _, _ in node.results]
    node.results = []
    return out


# ---------------------------------------------------------------------------------------------- dispatch


def test_each_idle_process_gets_one_task_in_the_order_they_arrived():
    node, (a, b) = node_with(2)
    node.tasks_arrived([task(1), task(2), task(3)])
    assert runs(node.dispatch(0.0)) == {100: [1], 101: [2]}
    assert [t.id for t in node.queue] == [3]


def test_a_process_gets_no_task_before_its_connection_is_up():
    node = NodeState(1)
    proc = node.add(Process(100))
    node.tasks_arrived([task(1)])
    assert runs(node.dispatch(0.0)) == {}
    node.attached(proc)
    assert runs(node.dispatch(0.0)) == {100: [1]}


def test_an_unknown_functions_tasks_wait_in_the_queue_rather_than_behind_a_running_task():
    node, (a,) = node_with(1)
    warm(node, [a])
    node.tasks_arrived([task(1, UNKNOWN), task(2, UNKNOWN)])
    assert runs(node.dispatch(1.0)) == {100: [1]}
    assert [t.id for t in node.queue] == [2]


def test_a_quick_functions_tasks_are_pipelined_round_robin_behind_the_running_ones():
    node, (a, b) = node_with(2)
    warm(node, [a, b], took=0.0005)  # 10 of its tasks fit in PIPELINE_WORK
    node.tasks_arrived([task(i) for i in range(1, 7)])
    assert runs(node.dispatch(1.0)) == {100: [1, 3, 5], 101: [2, 4, 6]}


def test_a_process_holds_about_PIPELINE_WORK_seconds_of_quick_tasks():
    node, (a,) = node_with(1)
    warm(node, [a], took=PIPELINE_WORK / 4)
    node.tasks_arrived([task(i) for i in range(1, 11)])
    assert held(a) == [] and len(runs(node.dispatch(1.0))[100]) == 4


def test_a_process_never_holds_more_than_PIPELINE_MAX_tasks():
    node, (a,) = node_with(1)
    warm(node, [a], took=1e-7)
    node.tasks_arrived([task(i) for i in range(1, 200)])
    node.dispatch(1.0)
    assert len(held(a)) == PIPELINE_MAX


def test_a_slow_functions_tasks_wait_for_an_idle_process():
    node, (a,) = node_with(1)
    warm(node, [a], fn=SLOW, took=PIPELINE_WORK * 2)
    node.tasks_arrived([task(1, SLOW), task(2, SLOW)])
    assert runs(node.dispatch(1.0)) == {100: [1]}
    finish(node, a, 1.1)
    assert runs(node.dispatch(1.1)) == {100: [2]}


def test_nothing_more_is_pipelined_behind_a_task_that_has_run_longer_than_a_quick_one_should():
    node, (a,) = node_with(1)
    warm(node, [a], took=0.0005)
    node.tasks_arrived([task(1)])
    node.dispatch(1.0)
    node.tasks_arrived([task(2)])
    assert runs(node.dispatch(1.0 + 2 * PIPELINE_WORK)) == {}
    assert [t.id for t in node.queue] == [2]


@pytest.mark.parametrize("option", [{"timeout": 5.0}, {"mtpc": 100}, {"confirm": True}])
def test_a_task_with_a_time_limit_max_tasks_per_child_or_a_start_to_confirm_never_waits_behind_another(option):
    node, (a,) = node_with(1)
    warm(node, [a])
    node.tasks_arrived([task(1), task(2, **option)])
    assert runs(node.dispatch(1.0)) == {100: [1]}
    assert [t.id for t in node.queue] == [2]


@pytest.mark.parametrize("option", [{"timeout": 5.0}, {"mtpc": 100}, {"confirm": True}])
def test_nothing_waits_behind_a_task_with_a_time_limit_max_tasks_per_child_or_a_start_to_confirm(option):
    node, (a,) = node_with(1)
    warm(node, [a])
    node.tasks_arrived([task(1, **option), task(2)])
    assert runs(node.dispatch(1.0)) == {100: [1]}
    assert [t.id for t in node.queue] == [2]


def test_a_task_with_a_time_limit_asks_for_a_deadline_on_its_process():
    node, (a,) = node_with(1)
    node.tasks_arrived([task(1, timeout=2.5)])
    assert node.dispatch(0.0).deadlines == [(a, 1, 2.5)]


def test_a_task_to_confirm_is_reported_started_before_it_is_sent():
    node, (a, b) = node_with(2)
    node.tasks_arrived([task(1), task(2, confirm=True)])
    todo = node.dispatch(0.0)
    assert todo.reports == [{"t": "started", "ids": [1, 2]}]
    assert runs(todo) == {100: [1], 101: [2]}
    assert node.take_started() is None  # reported already


def test_a_process_that_reached_max_tasks_per_child_gets_no_more_tasks():
    node, (a,) = node_with(1)
    node.tasks_arrived([task(1, mtpc=2), task(2, mtpc=2), task(3, mtpc=2)])
    node.dispatch(0.0)
    finish(node, a, 0.1)
    assert runs(node.dispatch(0.1)) == {100: [2]}
    finish(node, a, 0.2)
    assert a.retiring
    assert runs(node.dispatch(0.2)) == {}


def test_a_lent_process_gets_no_task_until_it_is_taken_back():
    node, (a,) = node_with(1)
    assert list(node.lendable()) == [a]
    node.lend(a)
    node.tasks_arrived([task(1)])
    assert runs(node.dispatch(0.0)) == {}
    node.take_back(a)
    assert runs(node.dispatch(0.0)) == {100: [1]}


def test_only_idle_processes_may_be_lent_and_none_while_leaving():
    node, (a, b) = node_with(2)
    node.tasks_arrived([task(1)])
    node.dispatch(0.0)
    assert list(node.lendable()) == [b]
    node.leave()
    assert list(node.lendable()) == []


def test_a_process_that_hung_up_gets_no_task():
    node, (a,) = node_with(1)
    node.hung_up(a)
    node.tasks_arrived([task(1)])
    assert runs(node.dispatch(0.0)) == {}


# ---------------------------------------------------------------------------------------------- results


def test_a_result_goes_to_the_master_with_its_buffers():
    node, (a,) = node_with(1)
    node.tasks_arrived([task(7)])
    node.dispatch(0.0)
    assert node.result(a, 7, "ok", [b"value"], None, 0.1) is True
    (header, buffers), = sent(node)["results"]
    assert header["items"] == [[7, "ok", 1, None]] and buffers == [b"value"]


def test_the_results_of_one_flush_travel_in_one_message():
    node, (a, b) = node_with(2)
    node.tasks_arrived([task(1), task(2)])
    node.dispatch(0.0)
    finish(node, a, 0.1)
    finish(node, b, 0.1)
    assert len(sent(node)["results"]) == 1
    assert sent(node).get("results") is None  # nothing twice


def test_results_larger_than_the_master_takes_in_one_frame_are_split():
    node, (a, b) = node_with(2)
    node.max_frame = 10
    node.tasks_arrived([task(1), task(2)])
    node.dispatch(0.0)
    finish(node, a, 0.1, bufs=[b"x" * 6])
    finish(node, b, 0.1, bufs=[b"y" * 6])
    assert [h["items"][0][0] for h, _ in sent(node)["results"]] == [1, 2]


def test_a_result_larger_than_a_frame_fails_that_task_alone():
    node, (a,) = node_with(1)
    node.max_frame = 1 << 20
    node.tasks_arrived([task(1)])
    node.dispatch(0.0)
    assert node.result(a, 1, "ok", [bytes(2 << 20)], None, 0.1) is False  # the caller frees the buffers
    (header, buffers), = sent(node)["results"]
    (gid, status, nbufs, info), = header["items"]
    assert (gid, status, nbufs, buffers) == (1, "error", 0, [])
    assert info["kind"] == "serialization" and "more than the master accepts" in info["message"]


def test_a_result_for_a_task_the_process_does_not_run_is_discarded():
    node, (a,) = node_with(1)
    node.tasks_arrived([task(1)])
    node.dispatch(0.0)
    assert node.result(a, 99, "ok", [b"?"], None, 0.1) is False
    assert held(a) == [1] and result_ids(node) == []


def test_a_flush_with_no_master_to_send_to_forgets_the_outbox():
    node, (a,) = node_with(1)
    node.tasks_arrived([task(1)])
    node.dispatch(0.0)
    finish(node, a, 0.1)
    node.discard_outbox()
    assert result_ids(node) == [] and node.take_started() is None


# ---------------------------------------------------------------------------------------------- started


def test_the_started_report_names_every_task_given_since_the_last_in_one_message():
    node, (a, b) = node_with(2)
    node.tasks_arrived([task(1), task(2)])
    node.dispatch(0.0)
    assert node.take_started() == {"t": "started", "ids": [1, 2]}
    assert node.take_started() is None


def test_a_task_that_finished_before_the_started_report_is_not_named_in_it():
    node, (a, b) = node_with(2)
    node.tasks_arrived([task(1), task(2)])
    node.dispatch(0.0)
    finish(node, a, 0.001)
    assert node.take_started() == {"t": "started", "ids": [2]}


def test_no_started_report_when_every_task_given_has_finished():
    node, (a,) = node_with(1)
    node.tasks_arrived([task(1)])
    node.dispatch(0.0)
    finish(node, a, 0.001)
    assert node.take_started() is None


# ---------------------------------------------------------------------------------------------- deaths


def died(node, proc, running=None, **how):
    return node.process_died(proc, running, {"pid": proc.pid, "host": "n1", **(how or {"signal": "SIGKILL"})})


def test_a_process_that_dies_running_a_task_reports_it_lost_and_is_replaced():
    node, (a,) = node_with(1)
    node.tasks_arrived([task(1)])
    node.dispatch(0.0)
    death = died(node, a, running=1, exitcode=3)
    assert death.culprit == 1 and death.lost and death.replace
    assert result_ids(node) == [(1, "lost")]
    assert a.pid not in node.procs


def test_tasks_waiting_behind_the_one_a_process_died_of_run_again_first_without_an_attempt():
    node, (a,) = node_with(1)
    warm(node, [a])
    node.tasks_arrived([task(1), task(2), task(3), task(4)])
    node.dispatch(1.0)
    assert held(a) == [1, 2, 3, 4]
    node.tasks_arrived([task(5)])
    died(node, a, running=1)
    assert result_ids(node) == [(1, "lost")]  # only the one it ran counts as an attempt
    assert [t.id for t in node.queue] == [2, 3, 4, 5]


def test_the_task_a_process_says_it_ran_is_the_one_it_died_of_not_the_first_it_held():
    node, (a,) = node_with(1)
    warm(node, [a])
    node.tasks_arrived([task(1), task(2), task(3)])
    node.dispatch(1.0)
    died(node, a, running=2)  # 1 had finished: its result, held back in the process, died with it
    assert result_ids(node) == [(2, "lost")]
    assert [t.id for t in node.queue] == [1, 3]


def test_a_process_that_dies_without_saying_what_it_ran_is_charged_with_its_first_task():
    node, (a,) = node_with(1)
    warm(node, [a])
    node.tasks_arrived([task(1), task(2)])
    node.dispatch(1.0)
    died(node, a, running=None)
    assert result_ids(node) == [(1, "lost")]


def test_a_process_that_dies_idle_reports_nothing_and_is_replaced():
    node, (a,) = node_with(1)
    death = died(node, a)
    assert death.culprit is None and not death.lost and death.replace
    assert result_ids(node) == []


def test_a_process_killed_for_a_time_limit_reports_a_timeout_for_that_task_only():
    node, (a,) = node_with(1)
    node.tasks_arrived([task(1, timeout=2.0), task(2)])
    node.dispatch(0.0)
    assert node.deadline_passed(a, 1, 2.0) is True and a.killed
    death = died(node, a, running=1)
    assert death.culprit == 1 and not death.lost
    (header, _), = sent(node)["results"]
    (gid, status, _, info), = header["items"]
    assert (gid, status, info["kind"], info["timeout"], info["signal"]) == (1, "error", "timeout", 2.0, "SIGKILL")
    assert [t.id for t in node.queue] == [2]


def test_a_deadline_for_a_task_that_already_finished_kills_nothing():
    node, (a,) = node_with(1)
    node.tasks_arrived([task(1, timeout=2.0), task(2, timeout=2.0)])
    node.dispatch(0.0)
    finish(node, a, 0.5)
    node.dispatch(0.5)  # 2 runs now, in the same process
    assert node.deadline_passed(a, 1, 2.0) is False and not a.killed


def test_while_leaving_the_innocent_tasks_of_a_dead_process_go_back_to_the_master():
    node, (a,) = node_with(1)
    warm(node, [a])
    node.tasks_arrived([task(1), task(2), task(3)])
    node.dispatch(1.0)
    node.leave()
    death = died(node, a, running=1)
    assert death.back == [2, 3] and list(node.queue) == []


def test_while_stopping_a_dead_process_is_neither_replaced_nor_are_its_tasks_queued_again():
    node, (a,) = node_with(1)
    warm(node, [a])
    node.tasks_arrived([task(1), task(2)])
    node.dispatch(1.0)
    node.closing = True
    death = died(node, a, running=1)
    assert not death.replace and death.back == [] and list(node.queue) == []


# ---------------------------------------------------------------------------------------------- cancel, kill, drop


def test_a_task_cancelled_while_queued_never_reaches_a_process():
    node, (a,) = node_with(1)
    node.tasks_arrived([task(1), task(2)])
    node.dispatch(0.0)
    reply = node.cancel(key=5, gids=[2])
    assert reply == {"t": "cancel_reply", "key": 5, "cancelled": [2], "refused": []}
    finish(node, a, 0.1)
    assert runs(node.dispatch(0.1)) == {}


def test_a_task_already_given_to_a_process_cannot_be_cancelled():
    node, (a,) = node_with(1)
    node.tasks_arrived([task(1)])
    node.dispatch(0.0)
    assert node.cancel(key=6, gids=[1, 9]) == {"t": "cancel_reply", "key": 6, "cancelled": [], "refused": [1, 9]}
    assert held(a) == [1]


def test_killing_a_queued_task_fails_it_at_once_as_never_started():
    node, (a,) = node_with(1)
    node.tasks_arrived([task(1), task(2)])
    node.dispatch(0.0)
    assert node.kill_tasks([2]) == []
    (header, _), = sent(node)["results"]
    assert header["items"] == [[2, "error", 0, {"kind": "killed", "started": False}]]
    assert list(node.queue) == []


def test_killing_a_task_waiting_in_a_process_fails_it_without_killing_the_process():
    node, (a,) = node_with(1)
    warm(node, [a])
    node.tasks_arrived([task(1), task(2)])
    node.dispatch(1.0)
    assert node.kill_tasks([2]) == [] and not a.killed
    assert result_ids(node) == [(2, "error")]
    finish(node, a, 1.001)
    assert node.result(a, 2, "ok", [b"late"], None, 1.002) is False  # it ran anyway: nobody wants it
    assert result_ids(node) == [(1, "ok")]


def test_killing_a_running_task_kills_its_process_and_its_death_reports_it_killed_after_it_started():
    node, (a,) = node_with(1)
    warm(node, [a])
    node.tasks_arrived([task(1), task(2)])
    node.dispatch(1.0)
    assert node.kill_tasks([1]) == [a] and a.killed
    died(node, a, running=1)
    (header, _), = sent(node)["results"]
    (gid, status, _, info), = header["items"]
    assert (gid, status, info["kind"], info["started"]) == (1, "error", "killed", True)
    assert [t.id for t in node.queue] == [2]  # innocent: runs again


def test_dropping_a_running_task_kills_its_process_and_nothing_is_reported_for_it():
    node, (a,) = node_with(1)
    node.tasks_arrived([task(1)])
    node.dispatch(0.0)
    assert node.drop([1]) == [a]
    died(node, a, running=1)
    assert result_ids(node) == []


def test_dropping_a_queued_task_forgets_it():
    node, (a,) = node_with(1)
    node.tasks_arrived([task(1), task(2), task(3)])
    node.dispatch(0.0)
    assert node.drop([2]) == []
    assert [t.id for t in node.queue] == [3]


def test_a_dropped_task_waiting_in_a_process_has_its_process_killed_when_it_comes_up():
    node, (a,) = node_with(1)
    warm(node, [a])
    node.tasks_arrived([task(1), task(2)])
    node.dispatch(1.0)
    assert node.drop([2]) == [] and not a.killed
    assert node.unwanted_head(a) is False
    finish(node, a, 1.001)
    assert node.unwanted_head(a) is True and a.killed
    died(node, a, running=2)
    assert result_ids(node) == [(1, "ok")]


# ---------------------------------------------------------------------------------------------- prefetch


def test_a_node_of_quick_processes_asks_for_twice_its_pipelines_ahead():
    node, (a, b) = node_with(2)
    warm(node, [a, b], took=0.0005)  # each process: 10 tasks deep
    assert sent(node, now=1.0)["prefetch"] == [({"t": "prefetch", "n": 40}, [])]


def test_the_prefetch_ask_is_not_repeated_for_a_small_change():
    node, (a,) = node_with(1)
    warm(node, [a], took=0.0005)
    assert node.ask_prefetch(1.0) == {"t": "prefetch", "n": 20}
    assert node.ask_prefetch(1.0) is None
    node.tasks_arrived([task(1)])
    node.dispatch(1.0)
    finish(node, a, 1.0008)  # a little slower: 7 deep, 14 wanted, within half of 20
    assert node.ask_prefetch(1.0008) is None


def test_a_node_whose_tasks_turned_slow_goes_back_to_the_default_and_gives_back_its_surplus():
    node, (a,) = node_with(1)
    warm(node, [a], took=0.0005)
    assert node.ask_prefetch(1.0)["n"] == 20
    node.tasks_arrived([task(i) for i in range(1, 6)])
    node.dispatch(1.0)
    assert held(a) == [1, 2, 3, 4, 5]
    node.tasks_arrived([task(i) for i in range(6, 10)])
    # Task 1 has run SLOW_AFTER: the 4 waiting behind it count as stuck, and the queue beyond nprocs goes back.
    assert node.ask_prefetch(1.0 + 2 * SLOW_AFTER) == {"t": "prefetch", "n": 4, "back": [7, 8, 9]}
    assert [t.id for t in node.queue] == [6]


def test_a_node_of_slow_processes_asks_for_nothing_ahead():
    node, (a,) = node_with(1)
    warm(node, [a], fn=SLOW, took=1.0)
    assert node.ask_prefetch(2.0) is None and node.prefetch_asked == 0


# ---------------------------------------------------------------------------------------------- leaving


def test_leaving_hands_back_the_queue_and_hands_back_new_tasks_at_once():
    node, (a,) = node_with(1)
    node.tasks_arrived([task(1), task(2), task(3)])
    node.dispatch(0.0)
    assert node.leave() == [2, 3]
    assert node.tasks_arrived([task(4)]) == [4]
    assert list(node.queue) == [] and runs(node.dispatch(0.0)) == {}


def test_running_tasks_finish_while_leaving_and_their_results_still_go_out():
    node, (a,) = node_with(1)
    node.tasks_arrived([task(1)])
    node.dispatch(0.0)
    node.leave()
    assert not node.idle()
    finish(node, a, 0.5)
    assert node.idle() and result_ids(node) == [(1, "ok")]


def test_when_the_grace_is_over_running_tasks_go_back_and_their_end_is_not_reported():
    node, (a, b) = node_with(2)
    node.tasks_arrived([task(1), task(2)])
    node.dispatch(0.0)
    node.leave()
    assert node.hand_back_running() == [1, 2]
    assert node.result(a, 1, "ok", [b"late"], None, 1.0) is False
    died(node, b, running=2)
    assert result_ids(node) == []


# ---------------------------------------------------------------------------------------------- output


def test_a_tasks_output_travels_ahead_of_its_result():
    node, (a,) = node_with(1)
    node.tasks_arrived([task(1)])
    node.dispatch(0.0)
    assert node.printed(a, 1, [1], [b"hello\n"], 0, backlogged=False) is True
    finish(node, a, 0.1)
    assert [h["t"] for h, _ in node.flush(1.0)][:2] == ["output", "results"]


def test_output_while_the_link_to_the_master_is_backed_up_is_dropped_and_the_loss_reported():
    node, (a,) = node_with(1)
    node.tasks_arrived([task(1)])
    node.dispatch(0.0)
    assert node.printed(a, 1, [1], [b"x" * 100], 0, backlogged=True) is False
    finish(node, a, 0.1)
    (header, buffers), = sent(node)["output"]
    assert header["items"] == [[1, 100, 2, 100]] and buffers == [b""]


def test_output_of_a_task_nobody_wants_any_more_is_dropped():
    node, (a,) = node_with(1)
    node.tasks_arrived([task(1)])
    node.dispatch(0.0)
    node.drop([1])
    assert node.printed(a, 1, [1], [b"hello\n"], 0, backlogged=False) is False
    assert "output" not in sent(node)


# ---------------------------------------------------------------------------------------------- the master lost


def test_losing_the_master_forgets_its_tasks_and_kills_the_processes_running_them():
    node, (a, b) = node_with(2)
    warm(node, [a, b], took=0.0005)
    node.ask_prefetch(1.0)
    node.tasks_arrived([task(1)])
    node.dispatch(1.0)
    node.tasks_arrived([task(2)])
    assert node.forget_session() == [a]
    assert list(node.queue) == [] and node.prefetch_asked == 0
    died(node, a, running=1)
    assert result_ids(node) == []


# ---------------------------------------------------------------------------------------------- shape


def test_the_node_core_does_no_io_of_its_own():
    """No sockets, processes, signals, clock or event loop in node_state.py: the agent does all of that."""
    import ast
    import pathlib

    import clusterexec.node_state as module

    tree = ast.parse(pathlib.Path(module.__file__).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module and node.level == 0}
    assert not imported & {"socket", "asyncio", "subprocess", "signal", "select", "time", "threading", "mmap"}
    used_of_os = {node.attr for node in ast.walk(tree)
                  if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "os"}
    assert used_of_os <= {"cpu_count"}  # (default_nprocs; process_cpu_count is looked up by name)

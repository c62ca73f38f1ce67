"""The master's state (sans-I/O): queues, fairness, assignment, cancellation and retries.

    clients ──submit──▶ per-client FIFO ─┐
                                          ├─ round-robin over clients ─▶ node with a free slot ─▶ node.out_tasks
    clients ──submit──▶ per-client FIFO ─┘
    node ──started/result/lost──▶ Scheduler ──▶ client.out_started / client.out_results
    client ──cancel──▶ queued: removed now; on a node but not started: asked of the node; started: refused

The scheduler owns no socket. Methods take events; what must be sent piles up in the `out_*` lists of
`ClientState` and `NodeState`, and `dirty` names the peers that have something to send, so the shell can
flush each peer in one write after a whole batch of events.

Execution is at-least-once: a task whose process or node died is queued again at the front of its client's
queue (unless it had not started), up to its retry budget; then its client gets a "lost" result.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from .protocol import Task, task_error

DEFAULT_RETRIES = 2
MAX_PREFETCH = 4096  # tasks a node may ask for ahead of time (quick ones; see `set_prefetch`)


@dataclass(slots=True, eq=False)
class TaskState:
    gid: int
    client: ClientState
    task: Task  # task.id is the client's id for it
    attempts: int = 0
    node: NodeState | None = None
    started: bool = False
    cancelled: bool = False
    cancel_key: int | None = None  # a cancel request waits on this task's node
    suspect: bool = False  # its node died before confirming whether it had started it
    kill_requested: bool = False  # a kill was sent to its node
    done: bool = False

    @property
    def retries(self) -> int:
        opts = self.task.opts  # (checked as it entered the master: see protocol.TASK_OPTIONS)
        if opts and "retries" in opts:
            return opts["retries"]
        return DEFAULT_RETRIES


@dataclass(eq=False)
class ClientState:
    id: int
    info: dict[str, Any] = field(default_factory=dict)
    queue: deque[TaskState] = field(default_factory=deque)
    tasks: dict[int, TaskState] = field(default_factory=dict)  # client task id → state
    out_started: list[int] = field(default_factory=list)
    out_results: list[tuple[int, str, list[Any], Any]] = field(default_factory=list)
    out_cancel_replies: list[dict[str, Any]] = field(default_factory=list)
    tasks_done: int = 0
    compat: str = ""  # Python and cloudpickle versions: it only gets nodes with the same
    # Tasks whose results were sent again when the client resumed its session on a new connection: it
    # resubmits everything it still waits for, and these are done already (see Master._resume).
    resent: set[int] = field(default_factory=set)


@dataclass(eq=False)
class NodeState:
    id: int
    nprocs: int
    capacity: int
    info: dict[str, Any] = field(default_factory=dict)
    assigned: dict[int, TaskState] = field(default_factory=dict)
    out_tasks: list[TaskState] = field(default_factory=list)
    out_cancel: list[tuple[int, list[int]]] = field(default_factory=list)
    out_drop: list[int] = field(default_factory=list)
    out_kill: list[int] = field(default_factory=list)
    tasks_done: int = 0  # results it sent: returned, raised, or ended by clusterexec (killed, time limit, ...)
    tasks_raised: int = 0  # of those, tasks whose function raised an exception
    tasks_lost: int = 0  # tasks whose process died under them (each attempt counts)
    compat: str = ""  # Python and cloudpickle versions: it only runs tasks of clients with the same

    @property
    def free(self) -> int:
        return self.capacity - len(self.assigned)


@dataclass(eq=False)
class _CancelRequest:
    client: ClientState
    req: int
    cancelled: list[int] = field(default_factory=list)
    refused: list[int] = field(default_factory=list)
    waiting: set[int] = field(default_factory=set)  # node ids yet to answer


class Scheduler:
    def __init__(self, prefetch: int | None = None):
        """`prefetch`: tasks a node may hold beyond one per process (default: as many as it has processes)."""
        self.prefetch = prefetch
        self.clients: dict[int, ClientState] = {}
        self.nodes: dict[int, NodeState] = {}
        self.dirty_clients: set[ClientState] = set()
        self.dirty_nodes: set[NodeState] = set()
        # Clients with queued tasks, served round-robin; one ring per version group (see `compat`).
        self._rings: dict[str, deque[ClientState]] = {}
        # Nodes that may have a free slot, per version group, oldest first: `schedule` visits only these, so
        # its cost follows the tasks it hands out, not the number of nodes connected.
        self._free: dict[str, OrderedDict[NodeState, None]] = {}
        self._gids = itertools.count(1)
        self._by_gid: dict[int, TaskState] = {}
        self._cancels: dict[int, _CancelRequest] = {}
        self._cancel_ids = itertools.count(1)

    # ------------------------------------------------------------------------------------------ peers

    def add_client(self, client_id: int, info: dict[str, Any] | None = None, compat: str = "") -> ClientState:
        client = ClientState(client_id, info or {}, compat=compat)
        self.clients[client_id] = client
        return client

    def remove_client(self, client_id: int) -> None:
        """A client left: forget its queued tasks and have nodes drop its assigned ones."""
        client = self.clients.pop(client_id, None)
        if client is None:
            return
        self.dirty_clients.discard(client)
        for ts in client.tasks.values():
            ts.cancelled = True
            self._by_gid.pop(ts.gid, None)
            node = ts.node
            if node is not None:
                node.assigned.pop(ts.gid, None)
                node.out_drop.append(ts.gid)
                self.dirty_nodes.add(node)
                self._has_room(node)
        client.tasks.clear()
        client.queue.clear()
        self._leave_ring(client)
        for key, request in list(self._cancels.items()):
            if request.client is client:
                del self._cancels[key]

    def add_node(self, node_id: int, nprocs: int, info: dict[str, Any] | None = None, compat: str = ""
                 ) -> NodeState:
        prefetch = nprocs if self.prefetch is None else self.prefetch
        node = NodeState(node_id, nprocs, max(1, nprocs + prefetch), info or {}, compat=compat)
        self.nodes[node_id] = node
        self._has_room(node)
        return node

    def set_prefetch(self, node_id: int, n: int, back: list[int] = ()) -> None:
        """A node running quick tasks asks for `n` of them ahead of time (0: back to the default), to keep its
        task processes' pipelines full; not granted when the master was given a fixed prefetch, nor while the
        node is leaving. Tasks have turned slow: it gives `back` those it holds beyond its default, which go
        to the front of their queues (no attempt counted) for any node to take."""
        node = self.nodes.get(node_id)
        if node is None:
            return
        self._take_back(node, back)
        if node.capacity != 0 and self.prefetch is None:
            node.capacity = max(1, node.nprocs + max(node.nprocs, min(n, MAX_PREFETCH)))
        self._has_room(node)

    def _has_room(self, node: NodeState) -> None:
        """A slot of `node` may have come free: let `schedule` look at it."""
        if node.free > 0 and self.nodes.get(node.id) is node:
            free = self._free.get(node.compat)
            if free is None:
                free = self._free[node.compat] = OrderedDict()
            free[node] = None

    def remove_node(self, node_id: int, reason: dict[str, Any] | None = None) -> None:
        """A node left or died: its unstarted tasks go back to the queue, its started ones count an attempt.
        A task the client killed stays killed, though the node died before it could act on the kill."""
        node = self.nodes.pop(node_id, None)
        if node is None:
            return
        self.dirty_nodes.discard(node)
        self._free.get(node.compat, {}).pop(node, None)
        waiting = [k for k, r in self._cancels.items() if node_id in r.waiting]
        for ts in node.assigned.values():
            # The node never answered a cancel for this task: it may have started it a moment before it went
            # (starts are reported late), so the cancel is refused and the task treated as any other of the node's.
            request = self._cancels.get(ts.cancel_key) if ts.cancel_key is not None else None
            ts.cancel_key = None
            if request is not None:
                request.refused.append(ts.task.id)
        for key in waiting:
            request = self._cancels[key]
            request.waiting.discard(node_id)
            self._maybe_answer(request, key)
        lost = {"host": node.info.get("host"), "pid": node.info.get("pid"), "node_lost": True}
        if reason:
            lost.update(reason)
        # Requeue in reverse so that the front of each queue keeps the original order.
        for ts in reversed(list(node.assigned.values())):
            ts.node = None
            if ts.kill_requested:
                self._killed(ts, ts.started)
            elif ts.started:
                self._attempt_failed(ts, lost)
            else:
                # It may have been running without our knowing yet (nodes report starts a moment late).
                # Next time its node confirms the start at once, so a task that kills whole nodes
                # cannot escape its retry budget.
                ts.task.opts = dict(ts.task.opts or {}, confirm=1)
                ts.suspect = True
                self._requeue_front(ts)
        node.assigned.clear()

    def node_leaving(self, node_id: int, gids: list[int]) -> list[TaskState]:
        """A node is shutting down: it takes no new tasks, and the ones it hands back go to the front of
        their queues without counting as a failed attempt. Returns those tasks."""
        node = self.nodes.get(node_id)
        if node is None:
            return []
        node.capacity = 0
        return self._take_back(node, gids)

    def _take_back(self, node: NodeState, gids: list[int]) -> list[TaskState]:
        """Tasks a node hands back unstarted go to the front of their queues, in order. A cancel or a kill
        asked of the node meanwhile crossed them on the way: it is done here instead."""
        back = [ts for ts in (node.assigned.pop(gid, None) for gid in gids) if ts is not None]
        for ts in reversed(back):
            ts.node = None
            if self._cancel_unanswered(ts):
                continue  # (forgotten: the node's "refused" for it counts for nothing)
            if ts.kill_requested:
                self._killed(ts, False)
            else:
                self._requeue_front(ts)
        return back

    # ------------------------------------------------------------------------------------------ tasks

    def submit(self, client_id: int, tasks: list[Task]) -> None:
        client = self.clients[client_id]
        was_empty = not client.queue
        for task in tasks:
            if task.id in client.tasks or task.id in client.resent:
                continue  # a resubmission of a task we still hold, or whose result is on its way: keep that
            ts = TaskState(next(self._gids), client, task)
            error = task_error(task)
            if error is not None:  # it fails alone: nothing reads its options, no other task is touched
                self._finish(ts, "error", [], {"kind": "refused", "message": error})
                continue
            if task.opts and "tried" in task.opts:
                ts.attempts = task.opts["tried"]  # a local client ran it on a process of its own first
            client.tasks[task.id] = ts
            self._by_gid[ts.gid] = ts
            client.queue.append(ts)
        if was_empty and client.queue:
            # A client with nothing queued gets the very next turn: it has not had one in this round.
            self._ring_of(client).appendleft(client)

    def _requeue_front(self, ts: TaskState) -> None:
        client = ts.client
        ts.started = False
        if not client.queue:
            self._ring_of(client).appendleft(client)
        client.queue.appendleft(ts)

    def _ring_of(self, client: ClientState) -> deque[ClientState]:
        ring = self._rings.get(client.compat)
        if ring is None:
            ring = self._rings[client.compat] = deque()
        return ring

    def _leave_ring(self, client: ClientState) -> None:
        """It has nothing queued any more: take it out of its ring."""
        ring = self._rings.get(client.compat)
        if ring is not None and client in ring:
            ring.remove(client)

    def _attempt_failed(self, ts: TaskState, info: dict[str, Any]) -> None:
        # A suspect that now fails again after a confirmed start probably killed that earlier node too.
        ts.attempts += 2 if ts.suspect else 1
        ts.suspect = False
        if ts.attempts > ts.retries:
            info = dict(info, attempts=ts.attempts)
            self._finish(ts, "lost", [], info)
        else:
            self._requeue_front(ts)

    def _finish(self, ts: TaskState, status: str, bufs: list[Any], info: Any) -> None:
        ts.done = True
        client = ts.client
        self._by_gid.pop(ts.gid, None)
        client.tasks.pop(ts.task.id, None)
        client.tasks_done += 1
        client.out_results.append((ts.task.id, status, bufs, info))
        self.dirty_clients.add(client)

    def schedule(self) -> None:
        """Hand queued tasks to nodes with free slots, one task per client in turn, each client's tasks only
        to nodes whose Python and cloudpickle can run its pickles."""
        for compat, ring in self._rings.items():
            nodes = self._free.get(compat)
            while ring and nodes:
                node = next(iter(nodes))
                self._fill(node, ring)
                if node.free <= 0:
                    del nodes[node]

    def _fill(self, node: NodeState, ring: deque[ClientState]) -> None:
        free = node.free
        while free > 0 and ring:
            client = ring[0]
            ts = self._pop_queued(client)
            if ts is None:
                ring.popleft()
                continue
            ring.rotate(-1)
            if not client.queue:
                ring.remove(client)
            ts.node = node
            node.assigned[ts.gid] = ts
            node.out_tasks.append(ts)
            free -= 1
        if node.out_tasks:
            self.dirty_nodes.add(node)

    @staticmethod
    def _pop_queued(client: ClientState) -> TaskState | None:
        queue = client.queue
        while queue:
            ts = queue.popleft()
            if not ts.cancelled:
                return ts
        return None

    def started(self, node_id: int, gids: list[int]) -> None:
        node = self.nodes.get(node_id)
        if node is None:
            return
        for gid in gids:
            ts = node.assigned.get(gid)
            if ts is not None and not ts.started:
                ts.started = True
                ts.client.out_started.append(ts.task.id)
                self.dirty_clients.add(ts.client)

    def result(self, node_id: int, gid: int, status: str, bufs: list[Any], info: Any) -> None:
        """A node reports a task's outcome: "ok", "raise", "error", or "lost" (its process died)."""
        node = self.nodes.get(node_id)
        if node is None:
            return
        ts = node.assigned.pop(gid, None)
        if ts is None:
            return  # dropped, cancelled, or a duplicate: delivery stays exactly-once
        ts.node = None
        self._has_room(node)
        if status == "lost":
            node.tasks_lost += 1
            self._attempt_failed(ts, dict(info or {}, host=node.info.get("host")))
        else:
            node.tasks_done += 1
            if status == "raise":
                node.tasks_raised += 1
            self._finish(ts, status, bufs, info)

    # ------------------------------------------------------------------------------------------ cancel

    def kill(self, client_id: int, task_ids: list[int]) -> None:
        """Stop tasks whether or not they started: a running one has its process killed (and replaced)."""
        client = self.clients[client_id]
        for tid in task_ids:
            ts = client.tasks.get(tid)
            if ts is None:
                continue
            if ts.node is None:
                ts.cancelled = True  # lazily skipped in the queue
                self._killed(ts, False)
            else:
                ts.kill_requested = True
                ts.node.out_kill.append(ts.gid)
                self.dirty_nodes.add(ts.node)

    def cancel(self, client_id: int, req: int, task_ids: list[int]) -> None:
        """Cancel what has never started; the answer goes to the client once every node involved replied.

        A task waiting to run again after its process or node died has run (or may have, if its node died before
        saying): it is refused, as a running one is. Cancelling succeeds only for a task that provably never ran."""
        client = self.clients[client_id]
        request = _CancelRequest(client, req)
        per_node: dict[NodeState, list[int]] = {}
        for tid in task_ids:
            ts = client.tasks.get(tid)
            if ts is None or ts.started or ts.attempts or ts.suspect:
                request.refused.append(tid)
            elif ts.node is None:
                ts.cancelled = True  # lazily skipped in the queue
                self._forget(ts)
                request.cancelled.append(tid)
            else:
                per_node.setdefault(ts.node, []).append(ts.gid)
        key = next(self._cancel_ids)
        for gids in per_node.values():
            for gid in gids:
                self._by_gid[gid].cancel_key = key
        for node, gids in per_node.items():
            node.out_cancel.append((key, gids))
            request.waiting.add(node.id)
            self.dirty_nodes.add(node)
        self._cancels[key] = request
        self._maybe_answer(request, key)

    def cancel_reply(self, node_id: int, key: int, cancelled: list[int], refused: list[int]) -> None:
        request = self._cancels.get(key)
        node = self.nodes.get(node_id)
        if request is None or node is None:
            return
        for gid in cancelled:
            ts = node.assigned.pop(gid, None)
            if ts is not None:
                self._has_room(node)
                ts.node = None
                ts.cancelled = True
                self._forget(ts)
                request.cancelled.append(ts.task.id)
        for gid in refused:
            ts = self._by_gid.get(gid)
            if ts is not None:
                ts.cancel_key = None
                request.refused.append(ts.task.id)
        request.waiting.discard(node_id)
        self._maybe_answer(request, key)

    def _killed(self, ts: TaskState, started: bool) -> None:
        """End a task the client killed: its Future fails with TaskKilled."""
        self._finish(ts, "error", [], {"kind": "killed", "started": started})

    def _cancel_unanswered(self, ts: TaskState) -> bool:
        """The client asked to cancel this task and its node has not answered, and now never will about it
        (the node is gone, or handed it back unstarted): it is cancelled here. Returns whether it was."""
        if ts.cancel_key is None or ts.cancel_key not in self._cancels:
            return False
        ts.cancelled = True
        self._forget(ts)
        self._cancels[ts.cancel_key].cancelled.append(ts.task.id)
        return True

    def _forget(self, ts: TaskState) -> None:
        self._by_gid.pop(ts.gid, None)
        ts.client.tasks.pop(ts.task.id, None)

    def _maybe_answer(self, request: _CancelRequest, key: int) -> None:
        if request.waiting:
            return
        self._cancels.pop(key, None)
        if request.client.id in self.clients:
            request.client.out_cancel_replies.append(
                {"req": request.req, "cancelled": request.cancelled, "refused": request.refused})
            self.dirty_clients.add(request.client)

    # ------------------------------------------------------------------------------------------ status

    def task(self, gid: int) -> TaskState | None:
        return self._by_gid.get(gid)

    def fail_queued(self, client_id: int, info: dict[str, Any]) -> int:
        """Fail every task of this client still waiting in the queue (no node can run it); returns how many."""
        client = self.clients.get(client_id)
        if client is None:
            return 0
        failed = 0
        while client.queue:
            ts = self._pop_queued(client)
            if ts is None:
                break
            self._finish(ts, "error", [], dict(info))
            failed += 1
        self._leave_ring(client)
        return failed

    def load(self) -> dict[int, tuple[int, int, int]]:
        """Per client id: (queued at the master, queued at nodes, running), counted as the status shows them.

        A node runs as many tasks as it has processes, the first it was handed; the others it holds are
        queued there, handed over ahead of time. The clients' counts add up to the cluster's. The cost follows
        the tasks on nodes (bounded by their capacity), not the length of the queues."""
        on_nodes: dict[int, list[int]] = {}
        for node in self.nodes.values():
            for i, ts in enumerate(node.assigned.values()):
                counts = on_nodes.setdefault(ts.client.id, [0, 0])
                counts[0 if i >= node.nprocs else 1] += 1
        load = {}
        for client in self.clients.values():
            queued_there, running = on_nodes.get(client.id, (0, 0))
            load[client.id] = (len(client.tasks) - queued_there - running, queued_there, running)
        return load

    def total_procs(self) -> int:
        return sum(n.nprocs for n in self.nodes.values())

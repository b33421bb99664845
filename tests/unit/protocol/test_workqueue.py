"""The work queue's dispatcher and result sink in virtual time: balancing by in-flight work,
leases, redelivery after lease expiry or worker loss, completion exactly once, and a property
test that drives workers that die, stall, come back and finish stale tasks."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshpost.errors import InvalidLease, InvalidPrefetch
from meshpost.protocol.workqueue import (
    DEFAULT_MAX_INFLIGHT,
    MAX_PREFETCH,
    OWN_SINK,
    Action,
    CompletionRefused,
    DispatchTask,
    RedeliveryReason,
    ResultAccepted,
    ResultDuplicate,
    ResultSink,
    TaskAbandoned,
    TaskCompleted,
    TaskRecord,
    TaskRedelivered,
    TaskState,
    WorkerStatus,
    WorkQueueDispatcher,
    check_lease,
    check_prefetch,
    honoured_prefetch,
    lease_ok,
    prefetch_ok,
)

LEASE_S = 10.0


def dispatcher(**options: object) -> WorkQueueDispatcher:
    return WorkQueueDispatcher("upper", lease_s=LEASE_S, **options)  # type: ignore[arg-type]


def dispatched(actions: list[Action]) -> list[tuple[str, str, int]]:
    return [(a.task_id, a.worker, a.attempt) for a in actions if isinstance(a, DispatchTask)]


def test_tasks_wait_until_a_worker_is_up_then_go_with_what_the_worker_needs() -> None:
    d = dispatcher()
    d.submit("t1", "hola", "C", now=0.0)
    assert d.actions() == [] and d.waiting() == ["t1"]
    d.worker_up("W1", now=1.0)
    assert d.actions() == [DispatchTask("t1", "upper", "W1", "hola", "C", 1, LEASE_S)]
    assert d.state_of("t1") is TaskState.ASSIGNED
    assert d.next_timer() == 1.0 + LEASE_S


def test_each_task_goes_to_the_worker_with_the_least_unfinished_work() -> None:
    d = dispatcher()
    d.worker_up("W1", 0.0)
    d.worker_up("W2", 0.0)
    for i in range(4):
        d.submit(f"t{i}", "x", "C", 0.0)
    assert [w for _, w, _ in dispatched(d.actions())] == ["W1", "W2", "W1", "W2"]
    # W2 finishes both of its tasks: the next two go to W2, not blindly round-robin.
    assert d.completed("t1", 1.0, by="W2") and d.completed("t3", 1.0, by="W2")
    d.actions()
    d.submit("t4", "x", "C", 2.0)
    d.submit("t5", "x", "C", 2.0)
    assert [w for _, w, _ in dispatched(d.actions())] == ["W2", "W2"]
    assert d.inflight() == {"W1": 2, "W2": 2}


def test_a_worker_never_holds_more_than_max_inflight() -> None:
    d = dispatcher(max_inflight=2)
    d.worker_up("W1", 0.0)
    for i in range(5):
        d.submit(f"t{i}", "x", "C", 0.0)
    assert len(dispatched(d.actions())) == 2
    assert d.waiting() == ["t2", "t3", "t4"]
    d.completed("t0", 1.0, by="W1")
    assert [t for t, _, _ in dispatched(d.actions())] == ["t2"]


def test_an_expired_lease_sends_the_task_to_another_worker_first_in_line() -> None:
    d = dispatcher(max_inflight=1)
    d.worker_up("W1", 0.0)
    d.submit("t1", "x", "C", 0.0)
    d.submit("t2", "x", "C", 0.0)
    d.actions()
    d.on_timer(LEASE_S - 0.001)
    assert d.actions() == []
    d.worker_up("W2", LEASE_S - 0.001)
    assert dispatched(d.actions()) == [("t2", "W2", 1)]
    d.on_timer(LEASE_S)
    actions = d.actions()
    assert actions[0] == TaskRedelivered("t1", "W1", RedeliveryReason.LEASE_EXPIRED, 1)
    # W2 is busy, so t1 waits for it, first in line: W1 failed it and may be stalled.
    assert d.waiting() == ["t1"]
    d.submit("t3", "x", "C", LEASE_S)
    assert d.waiting() == ["t1", "t3"] and d.inflight() == {"W1": 0, "W2": 1}
    d.completed("t2", LEASE_S + 1, by="W2")
    assert dispatched(d.actions()) == [("t1", "W2", 2)]
    d.worker_lost("W2", LEASE_S + 2)  # only the suspect W1 is left: it gets one task to try
    assert dispatched(d.actions()) == [("t1", "W1", 3)]
    assert d.waiting() == ["t3"]


def test_a_suspect_worker_gets_one_task_at_a_time_until_it_completes_one() -> None:
    d = dispatcher(max_inflight=4)
    d.worker_up("W1", 0.0)
    d.submit("t0", "x", "C", 0.0)
    d.actions()
    d.on_timer(LEASE_S)  # W1 stalls: its lease expires; it is the only worker, so it retries
    assert dispatched(d.actions()) == [("t0", "W1", 2)]
    for i in range(1, 4):
        d.submit(f"t{i}", "x", "C", LEASE_S)
    assert d.actions() == [] and d.inflight() == {"W1": 1}
    d.completed("t0", LEASE_S + 1, by="W1")  # it was only slow: full capacity again
    assert len(dispatched(d.actions())) == 3


def test_a_lost_worker_gives_back_all_its_tasks_oldest_first() -> None:
    d = dispatcher()
    d.worker_up("W1", 0.0)
    for i in range(3):
        d.submit(f"t{i}", "x", "C", 0.0)
    d.actions()
    d.worker_lost("W1", 1.0)
    assert [(a.task_id, a.reason) for a in d.actions() if isinstance(a, TaskRedelivered)] == [
        ("t2", RedeliveryReason.WORKER_LOST), ("t1", RedeliveryReason.WORKER_LOST),
        ("t0", RedeliveryReason.WORKER_LOST)]
    assert d.waiting() == ["t0", "t1", "t2"] and d.inflight() == {"W1": 0}
    assert d.next_timer() is None
    d.worker_up("W2", 2.0)
    assert dispatched(d.actions()) == [("t0", "W2", 2), ("t1", "W2", 2), ("t2", "W2", 2)]


def test_a_worker_that_leaves_the_queue_gives_back_its_tasks_and_gets_no_more() -> None:
    d = dispatcher()
    d.worker_up("W1", 0.0)
    d.worker_up("W2", 0.0)
    d.submit("t0", "x", "C", 0.0)
    d.actions()
    d.worker_left("W1", 1.0)
    assert dispatched(d.actions()) == [("t0", "W2", 2)]
    assert "W1" not in d.inflight()


def test_a_task_completes_once_however_often_and_by_whomever_its_completion_comes() -> None:
    d = dispatcher(max_inflight=1)
    d.worker_up("W1", 0.0)
    d.worker_up("W2", 0.0)
    d.submit("t1", "x", "C", 0.0)
    d.on_timer(LEASE_S)
    assert dispatched(d.actions()) == [("t1", "W1", 1), ("t1", "W2", 2)]
    assert d.inflight() == {"W1": 0, "W2": 1}
    # W1 was only slow: its result is real and counts; W2's later one is a duplicate.
    assert d.completed("t1", LEASE_S + 1, by="W1") is True
    assert d.completed("t1", LEASE_S + 2, by="W2") is False
    assert d.completed("t1", LEASE_S + 3) is False
    completions = [a for a in d.actions() if isinstance(a, TaskCompleted)]
    assert completions == [TaskCompleted("t1", "W1", 2)]
    assert d.inflight() == {"W1": 0, "W2": 0} and d.state_of("t1") is None and len(d) == 0
    assert d.next_timer() is None


def test_a_completion_while_queued_again_takes_the_task_out_of_the_line() -> None:
    d = dispatcher()
    d.worker_up("W1", 0.0)
    d.submit("t1", "x", "C", 0.0)
    d.worker_lost("W1", 1.0)
    assert d.waiting() == ["t1"]
    assert d.completed("t1", 2.0)  # its result reached the sink after all
    assert d.waiting() == []


def test_the_lease_runs_from_the_workers_receipt_not_from_the_send() -> None:
    d = dispatcher()
    d.worker_up("W1", 0.0)
    d.submit("t1", "x", "C", 0.0)
    d.delivered("t1", "W1", 4.0)
    assert d.next_timer() == 4.0 + LEASE_S
    d.on_timer(LEASE_S)
    assert [a for a in d.actions() if isinstance(a, TaskRedelivered)] == []
    d.delivered("t1", "W2", 5.0)  # a receipt from someone else moves nothing
    assert d.next_timer() == 4.0 + LEASE_S


def test_after_max_attempts_a_task_is_abandoned_and_not_sent_again() -> None:
    d = dispatcher(max_attempts=2)
    d.worker_up("W1", 0.0)
    d.submit("t1", "x", "C", 0.0)
    d.on_timer(LEASE_S)
    d.on_timer(2 * LEASE_S)
    actions = d.actions()
    assert dispatched(actions) == [("t1", "W1", 1), ("t1", "W1", 2)]
    assert actions[-1] == TaskAbandoned("t1", 2)
    assert len(d) == 0 and not d.completed("t1", 30.0)


def test_a_rejected_task_is_abandoned_and_its_worker_gets_the_next_one() -> None:
    d = dispatcher(max_inflight=1)
    d.worker_up("W1", 0.0)
    d.submit("t1", "x" * 10, "C", 0.0)
    d.submit("t2", "y", "C", 0.0)
    d.actions()
    d.rejected("t1", "W2", 1.0)  # not the assignee: nothing
    assert d.state_of("t1") is TaskState.ASSIGNED
    d.rejected("t1", "W1", 1.0)
    actions = d.actions()
    assert actions[0] == TaskAbandoned("t1", 1)
    assert dispatched(actions) == [("t2", "W1", 1)] and d.state_of("t1") is None


def test_restore_keeps_assignments_under_a_fresh_lease_and_waits_for_workers() -> None:
    records = [
        TaskRecord("t0", "a", "C", TaskState.ASSIGNED, 1, "W1"),
        TaskRecord("t1", "b", "C", TaskState.QUEUED, 2, "W1"),
    ]
    d = WorkQueueDispatcher.restore("upper", records, 100.0, lease_s=LEASE_S)
    assert d.inflight() == {"W1": 1} and d.waiting() == ["t1"]
    assert d.next_timer() == 100.0 + LEASE_S
    assert d.actions() == []  # W1 is not live until it says so
    d.worker_up("W2", 101.0)
    assert dispatched(d.actions()) == [("t1", "W2", 3)]
    d.on_timer(100.0 + LEASE_S)  # W1 never came back
    assert dispatched(d.actions()) == [("t0", "W2", 2)]
    assert [(r.task_id, r.state, r.worker) for r in d.snapshot()] == [
        ("t0", TaskState.ASSIGNED, "W2"), ("t1", TaskState.ASSIGNED, "W2")]


def test_a_restored_task_not_yet_receipted_is_leased_from_its_receipt() -> None:
    """After a restart, a task message still in the outbox reaches its worker later: its
    lease runs from that receipt, as for a fresh dispatch, not from the restart. A receipted
    one keeps its lease from the restart; a seq that is no restored task's changes nothing."""
    records = [
        TaskRecord("t0", "a", "C", TaskState.ASSIGNED, 1, "W1", seq=7),
        TaskRecord("t1", "b", "C", TaskState.ASSIGNED, 1, "W1", delivered=True),
    ]
    d = WorkQueueDispatcher.restore("upper", records, 100.0, lease_s=LEASE_S)
    d.worker_up("W1", 100.0)
    assert d.leased() == 1
    assert not d.receipted("W1", [3], 104.0) and not d.receipted("W2", [7], 104.0)
    assert d.receipted("W1", [6, 7], 108.0)  # the outbox reached W1 eight seconds late
    assert d.leased() == 2
    d.on_timer(100.0 + LEASE_S)
    assert [(a.task_id, a.reason) for a in d.actions() if isinstance(a, TaskRedelivered)] == [
        ("t1", RedeliveryReason.LEASE_EXPIRED)]
    assert d.state_of("t0") is TaskState.ASSIGNED and d.next_timer() == 108.0 + LEASE_S
    assert not d.receipted("W1", [7], 109.0)  # a receipt counts once
    d.on_timer(108.0 + LEASE_S)
    assert [a.task_id for a in d.actions() if isinstance(a, TaskRedelivered)] == ["t0"]


def test_a_restored_tasks_receipt_after_it_moved_on_starts_no_lease() -> None:
    """The worker was lost before its old task message's receipt came: the task went to
    another worker, and that late receipt does not lease the new attempt."""
    records = [TaskRecord("t0", "a", "C", TaskState.ASSIGNED, 1, "W1", seq=7)]
    d = WorkQueueDispatcher.restore("upper", records, 100.0, lease_s=LEASE_S)
    d.worker_up("W1", 100.0)
    d.worker_up("W2", 100.0)
    d.worker_lost("W1", 101.0)
    assert dispatched(d.actions()) == [("t0", "W2", 2)]
    d.worker_up("W1", 102.0)
    assert not d.receipted("W1", [7], 103.0)
    assert d.leased() == 0


def test_a_restored_task_its_worker_rejects_is_abandoned_as_a_fresh_one_is() -> None:
    """After a restart, a task message still in the outbox that the worker's node then
    rejects is abandoned at once, by the rule a fresh dispatch's rejection follows (before,
    its lease ran out and it was sent again to a worker that would refuse it too)."""
    records = [
        TaskRecord("t0", "a" * 10, "C", TaskState.ASSIGNED, 1, "W1", seq=7),
        TaskRecord("t1", "b", "C", TaskState.QUEUED, 0),
    ]
    d = WorkQueueDispatcher.restore("upper", records, 100.0, lease_s=LEASE_S, max_inflight=1)
    d.worker_up("W1", 100.0)
    assert dispatched(d.actions()) == []  # W1's one slot holds t0
    assert not d.refused("W1", [3], 101.0) and not d.refused("W2", [7], 101.0)
    assert d.refused("W1", [6, 7], 102.0)
    actions = d.actions()
    assert actions[0] == TaskAbandoned("t0", 1)  # what `rejected` reports for a fresh one
    assert dispatched(actions) == [("t1", "W1", 1)]  # its slot is free again
    assert d.state_of("t0") is None and d.inflight() == {"W1": 1}
    assert not d.refused("W1", [7], 103.0)  # a rejection counts once
    assert not d.receipted("W1", [7], 103.0)
    d.on_timer(100.0 + LEASE_S)  # the old lease is gone: nothing is sent again
    assert [a for a in d.actions() if isinstance(a, TaskRedelivered)] == []


def test_a_restored_tasks_rejection_after_it_moved_on_abandons_nothing() -> None:
    """The old task message's rejection comes after the task went to another worker: the
    new attempt stands (as `rejected` ignores an older attempt's message)."""
    records = [TaskRecord("t0", "a", "C", TaskState.ASSIGNED, 1, "W1", seq=7)]
    d = WorkQueueDispatcher.restore("upper", records, 100.0, lease_s=LEASE_S)
    d.worker_up("W1", 100.0)
    d.worker_up("W2", 100.0)
    d.worker_lost("W1", 101.0)
    assert dispatched(d.actions()) == [("t0", "W2", 2)]
    assert not d.refused("W1", [7], 102.0)
    assert d.state_of("t0") is TaskState.ASSIGNED and d.actions() == []


def test_misuse_raises() -> None:
    with pytest.raises(ValueError, match="lease_s"):
        WorkQueueDispatcher("q", lease_s=0)
    with pytest.raises(ValueError, match="max_inflight"):
        WorkQueueDispatcher("q", lease_s=1, max_inflight=0)
    d = dispatcher()
    d.submit("t", "x", "C", 0.0)
    with pytest.raises(ValueError, match="already submitted"):
        d.submit("t", "x", "C", 0.0)
    with pytest.raises(ValueError, match="no worker"):
        WorkQueueDispatcher.restore("q", [TaskRecord("t", "x", "C", TaskState.ASSIGNED)], 0.0,
                                    lease_s=1)


def test_repr_says_what_the_queue_holds() -> None:
    d = dispatcher(max_inflight=1)
    d.worker_up("W1", 0.0)
    d.submit("t0", "x", "C", 0.0)
    d.submit("t1", "x", "C", 0.0)
    assert repr(d) == "<WorkQueueDispatcher 'upper' workers=1/1 waiting=1 assigned=1>"


# -- the sink -----------------------------------------------------------------------------


def test_the_sink_keeps_the_first_result_per_task_and_names_later_ones_duplicates() -> None:
    sink = ResultSink()
    assert sink.offer("t1", "m1", "W1") == ResultAccepted("t1", "m1", "W1")
    assert sink.offer("t1", "m2", "W2") == ResultDuplicate("t1", "m2", "W2", "m1")
    # The accepted message offered again (replayed after a crash) is still the result.
    assert sink.offer("t1", "m1", "W1") == ResultAccepted("t1", "m1", "W1")
    assert sink.result_of("t1") == "m1" and sink.result_of("t2") is None and len(sink) == 1


def test_the_sink_remembers_results_across_a_restart() -> None:
    sink = ResultSink(known=[("t1", "m1", "W1")])
    assert isinstance(sink.offer("t1", "m9", "W2"), ResultDuplicate)


# -- property: exactly once under arbitrary deaths, stalls and lease expiries --------------

WORKERS = ("W0", "W1", "W2", "W3")
worker = st.sampled_from(WORKERS)
#: Prefetches a worker may announce (None: none stated, the dispatcher's max_inflight).
prefetch = st.sampled_from([None, 1, 2, 5])
operation = st.one_of(
    st.tuples(st.just("submit")),
    st.tuples(st.just("up"), worker),
    st.tuples(st.just("up"), worker, prefetch),
    st.tuples(st.just("lost"), worker),
    st.tuples(st.just("left"), worker),
    st.tuples(st.just("deliver"), worker, st.integers(0, 50)),
    st.tuples(st.just("finish"), worker, st.integers(0, 50)),
    st.tuples(st.just("ack-again"), st.integers(0, 50)),
    st.tuples(st.just("reject"), worker, st.integers(0, 50)),
    st.tuples(st.just("tick"), st.floats(0.1, 2.5 * LEASE_S)),
)


@dataclasses.dataclass
class Mesh:
    """A ventilator, workers that hold the task messages they were sent (a dead or stalled
    one keeps them and may finish them later) and a sink; the node's role played by hand."""

    d: WorkQueueDispatcher
    now: float = 0.0
    submitted: int = 0
    live: set[str] = dataclasses.field(default_factory=set)
    held: dict[str, list[tuple[str, int]]] = dataclasses.field(
        default_factory=lambda: {w: [] for w in WORKERS})
    sink: ResultSink = dataclasses.field(default_factory=ResultSink)
    completed: list[str] = dataclasses.field(default_factory=list)
    abandoned: list[str] = dataclasses.field(default_factory=list)
    acks: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    #: The prefetch each worker announced last (None: none, the default).
    prefetches: dict[str, int | None] = dataclasses.field(default_factory=dict)

    def perform(self) -> None:
        given: set[str] = set()
        for action in self.d.actions():
            if isinstance(action, DispatchTask):
                assert action.worker in self.live, f"{action} went to a worker not up"
                self.held[action.worker].append((action.task_id, action.attempt))
                given.add(action.worker)
            elif isinstance(action, TaskCompleted):
                self.completed.append(action.task_id)
            elif isinstance(action, TaskAbandoned):
                self.abandoned.append(action.task_id)
        status = {w.name: w for w in self.d.workers()}
        for name, count in self.d.inflight().items():
            # A worker is given tasks only up to its own prefetch (one while suspect). One
            # that announces a smaller prefetch keeps what it holds and gets nothing new
            # until it is below it.
            room = honoured_prefetch(self.prefetches.get(name), self.d.max_inflight)
            assert status[name].prefetch == room
            if name in given:
                assert count <= (1 if status[name].suspect else room), (name, count, room)
            if name not in self.live:
                assert count == 0, f"{name} is down but holds {count} tasks"

    def finish(self, name: str, index: int) -> None:
        held = self.held[name]
        if not held:
            return
        task_id, attempt = held.pop(index % len(held))
        outcome = self.sink.offer(task_id, f"{task_id}#{attempt}@{name}", name)
        if isinstance(outcome, ResultAccepted):
            # The worker acknowledges once the sink receipted its result.
            self.d.completed(task_id, self.now, by=name)
            self.acks.append((task_id, name))

    def step(self, op: tuple[object, ...]) -> None:
        match op:
            case ("submit",):
                self.d.submit(f"t{self.submitted}", "x", "C", self.now)
                self.submitted += 1
            case ("up", str(name)):
                self.live.add(name)
                self.prefetches[name] = None
                self.d.worker_up(name, self.now)
            case ("up", str(name), announced):
                self.live.add(name)
                self.prefetches[name] = announced  # type: ignore[assignment]
                self.d.worker_up(name, self.now, announced)  # type: ignore[arg-type]
            case ("lost", str(name)):
                self.live.discard(name)
                self.d.worker_lost(name, self.now)
            case ("left", str(name)):
                self.live.discard(name)
                self.d.worker_left(name, self.now)
            case ("deliver", str(name), int(index)):
                if self.held[name]:
                    task_id, _ = self.held[name][index % len(self.held[name])]
                    self.d.delivered(task_id, name, self.now)
            case ("finish", str(name), int(index)):
                self.finish(name, index)
            case ("reject", str(name), int(index)):
                # The worker's node refuses a task message it holds (it never stores it).
                if self.held[name]:
                    task_id, _ = self.held[name].pop(index % len(self.held[name]))
                    self.d.rejected(task_id, name, self.now)
            case ("ack-again", int(index)):
                if self.acks:
                    task_id, name = self.acks[index % len(self.acks)]
                    assert not self.d.completed(task_id, self.now, by=name)
            case ("tick", float(seconds)):
                self.now += seconds
                self.d.on_timer(self.now)
        self.perform()


@settings(max_examples=300, deadline=None)
@given(st.lists(operation, max_size=80), st.integers(1, 3))
def test_every_task_completes_exactly_once_and_has_one_result_at_the_sink(
    ops: list[tuple[object, ...]], max_inflight: int
) -> None:
    mesh = Mesh(WorkQueueDispatcher("upper", lease_s=LEASE_S, max_inflight=max_inflight))
    for op in ops:
        mesh.step(op)
        finished = mesh.completed + mesh.abandoned
        assert len(finished) == len(set(finished))
    # Heal: the workers that are down stay down for good (what they hold is lost), one
    # worker comes up, every worker that is up finishes what it holds, and time passes,
    # until nothing is unfinished. (Down workers that finished stale tasks late were
    # exercised above, by "finish" of a worker that is down.)
    for name in WORKERS:
        if name not in mesh.live:
            mesh.held[name].clear()
    mesh.step(("up", "W0"))
    for _ in range(10 * (mesh.submitted + 1)):
        if len(mesh.d) == 0:
            break
        for name in sorted(mesh.live):
            while mesh.held[name]:
                mesh.step(("finish", name, 0))
        mesh.step(("tick", LEASE_S))
    assert len(mesh.d) == 0 and mesh.d.next_timer() is None
    # Each task finished exactly once: completed, or abandoned because a worker rejected it
    # (and then only if no result of it reached the sink first).
    assert sorted(mesh.completed + mesh.abandoned) == sorted(
        f"t{i}" for i in range(mesh.submitted))
    # Every completed task has its one result at the sink; the sink holds no other results
    # than those and the late ones of abandoned tasks.
    assert all(mesh.sink.result_of(t) for t in mesh.completed)
    late = sum(1 for t in mesh.abandoned if mesh.sink.result_of(t))
    assert len(mesh.sink) == len(mesh.completed) + late
    assert sum(mesh.d.inflight().values()) == 0


@pytest.mark.parametrize("lease_s", [float("nan"), float("inf"), -1.0, 0, 86_400.5, True])
def test_a_lease_out_of_range_is_refused_by_the_one_rule(lease_s: float) -> None:
    """Audit: the dispatcher took a `nan` lease (`nan <= 0` is false) and never expired it."""
    assert not lease_ok(lease_s)
    with pytest.raises(InvalidLease, match="not a lease"):
        check_lease(lease_s)
    with pytest.raises(ValueError, match="lease_s"):
        WorkQueueDispatcher("q", lease_s=lease_s)


def test_a_lease_in_range_passes_as_seconds() -> None:
    assert check_lease(1) == 1.0 and check_lease(86_400.0) == 86_400.0
    assert check_lease(0.001) == 0.001


def test_a_completion_by_a_peer_no_attempt_went_to_finishes_nothing() -> None:
    """A task id is no proof its sender had the task: a peer that names a queued task, or
    one given to another worker, finishes nothing and is reported (`CompletionRefused`);
    every worker an attempt went to still does, after a restart too."""
    d = dispatcher()
    d.submit("t1", "x", "C", 0.0)
    d.submit("t2", "y", "C", 0.0)
    assert d.completed("t1", 1.0, by="M") is False
    d.worker_up("W1", 1.0)
    d.actions()
    assert d.completed("t2", 1.0, by="M") is False
    assert d.actions() == [CompletionRefused("t2", "M")]
    assert d.state_of("t1") is TaskState.ASSIGNED and d.state_of("t2") is TaskState.ASSIGNED
    assert [r.given for r in d.snapshot()] == [("W1",), ("W1",)]
    d.worker_up("W2", 1.0)
    d.on_timer(1.0 + LEASE_S)  # W1's leases expire: both go to W2
    restored = WorkQueueDispatcher.restore("upper", d.snapshot(), 20.0, lease_s=LEASE_S)
    assert [r.given for r in restored.snapshot()] == [("W1", "W2"), ("W1", "W2")]
    assert restored.completed("t1", 21.0, by="W1") is True  # the earlier assignee counts
    assert restored.completed("t2", 21.0, by="M") is False
    assert restored.completed("t2", 21.0) is True  # the node's own word (its sink)


def test_a_done_finishes_only_a_task_whose_sink_is_another_node() -> None:
    """A `done` says the result is at the sink; when the sink is the ventilator itself only
    the result finishes the task (the node calls `completed` with `by` and no `ack`)."""
    d = WorkQueueDispatcher("upper", lease_s=LEASE_S, ventilator="V")
    d.worker_up("W1", 0.0)
    d.submit("t1", "x", "V", 0.0)
    d.submit("t2", "y", "S", 0.0)
    d.actions()
    assert d.completed("t1", 1.0, by="W1", ack=True) is False
    assert d.actions() == [CompletionRefused("t1", "W1", OWN_SINK)]
    assert d.completed("t2", 1.0, by="W1", ack=True) is True
    assert d.completed("t1", 1.0, by="W1") is True  # its result, at V


def test_a_worker_that_left_with_tasks_in_hand_comes_back_suspect() -> None:
    """A `serve` record right after a `stop` (nothing finished) gets one task, not a full
    window: each such pair cost the ventilator `max_inflight` task messages before."""
    d = dispatcher(max_inflight=4)
    for i in range(6):
        d.submit(f"t{i}", "x", "C", 0.0)
    d.worker_up("M", 0.0)
    assert len(dispatched(d.actions())) == 4
    for round_ in range(3):
        d.worker_left("M", 1.0 + round_)
        d.worker_up("M", 1.5 + round_)
        assert len(dispatched(d.actions())) == 1, round_
    assert d.workers()[0].suspect and d.inflight() == {"M": 1}
    task_id = next(r.task_id for r in d.snapshot() if r.state is TaskState.ASSIGNED)
    assert d.completed(task_id, 5.0, by="M")  # it finished one: full room again
    assert len(dispatched(d.actions())) == 4
    d.worker_left("W", 6.0)  # a worker never seen, with nothing in hand: nothing to do
    assert d.actions() == []


def test_a_task_a_worker_refused_goes_to_another_and_is_abandoned_only_when_all_refused() -> None:
    """A worker's node that rejects a task message (a refusal: a peer's word) never gets
    that task again; the task goes to another worker, or waits for a known one that is
    down, and is abandoned only once every known worker has refused it. Before, the first
    refusal abandoned it: a worker rejecting whatever it was sent dropped every task."""
    d = dispatcher()
    d.worker_known("W")  # serves the queue, link down for now
    d.worker_up("M", 0.0)
    d.submit("t1", "x", "C", 0.0)
    d.submit("t2", "y", "C", 0.0)
    assert dispatched(d.actions()) == [("t1", "M", 1), ("t2", "M", 1)]
    d.rejected("t1", "M", 1.0)
    assert d.waiting() == ["t1"] and d.actions()[0].reason is RedeliveryReason.WORKER_REFUSED
    d.submit("t3", "z", "C", 1.0)  # t1 waits for W; t3 behind it still goes to M
    assert dispatched(d.actions()) == [("t3", "M", 1)] and d.waiting() == ["t1"]
    d.worker_up("W", 2.0)
    assert dispatched(d.actions()) == [("t1", "W", 2)]
    d.rejected("t1", "W", 3.0)  # every known worker refused it: nobody will take it
    assert d.actions() == [TaskAbandoned("t1", 2)] and d.state_of("t1") is None


# -- each worker's prefetch ---------------------------------------------------------------------


def test_each_worker_gets_at_most_the_prefetch_it_announced() -> None:
    """W1 announced 1, W2 64, W3 nothing (an older version: the default, 16): 100 tasks
    fill them in that measure, the rest wait, and W1 gets its next only once it finished
    its one."""
    d = dispatcher()
    d.worker_up("W1", 0.0, 1)
    d.worker_up("W2", 0.0, 64)
    d.worker_up("W3", 0.0)
    for i in range(100):
        d.submit(f"t{i}", "x", "C", 0.0)
    d.actions()
    assert d.inflight() == {"W1": 1, "W2": 64, "W3": DEFAULT_MAX_INFLIGHT}
    assert len(d.waiting()) == 100 - 1 - 64 - DEFAULT_MAX_INFLIGHT
    assert [(w.name, w.prefetch) for w in d.workers()] == [
        ("W1", 1), ("W2", 64), ("W3", DEFAULT_MAX_INFLIGHT)]
    [w1_task] = [r.task_id for r in d.snapshot() if r.worker == "W1"]
    assert d.completed(w1_task, 1.0, by="W1")
    assert [w for _t, w, _a in dispatched(d.actions())] == ["W1"]
    assert d.inflight()["W1"] == 1


def test_a_prefetch_above_the_cap_is_honoured_as_the_cap() -> None:
    d = dispatcher()
    d.worker_up("M", 0.0, 10**12)
    for i in range(MAX_PREFETCH + 10):
        d.submit(f"t{i}", "x", "C", 0.0)
    assert len(dispatched(d.actions())) == MAX_PREFETCH
    assert d.workers() == [WorkerStatus("M", True, False, MAX_PREFETCH, MAX_PREFETCH)]
    assert honoured_prefetch(MAX_PREFETCH + 1) == MAX_PREFETCH == honoured_prefetch(2**63 - 1)
    assert honoured_prefetch(None) == DEFAULT_MAX_INFLIGHT and honoured_prefetch(None, 3) == 3
    # Only a store row edited by hand holds one below 1: the default, not a failed start.
    assert honoured_prefetch(0) == DEFAULT_MAX_INFLIGHT and honoured_prefetch(-7, 3) == 3


def test_a_suspect_worker_gets_one_task_whatever_prefetch_it_announced() -> None:
    d = dispatcher()
    d.worker_up("W1", 0.0, 64)
    d.submit("t0", "x", "C", 0.0)
    d.actions()
    d.on_timer(LEASE_S)  # its lease expires: suspect, and the only worker
    for i in range(1, 10):
        d.submit(f"t{i}", "x", "C", LEASE_S)
    d.actions()
    assert d.workers()[0].suspect and d.inflight() == {"W1": 1}
    d.worker_up("W1", LEASE_S + 1, 128)  # a new record changes its room, not its suspicion
    assert dispatched(d.actions()) == [] and d.inflight() == {"W1": 1}
    [held] = [r.task_id for r in d.snapshot() if r.worker == "W1"]
    assert d.completed(held, LEASE_S + 2, by="W1")  # it finished one: its full room again
    assert len(dispatched(d.actions())) == 9 and d.inflight() == {"W1": 9}


def test_a_new_record_changes_a_live_workers_room_both_ways() -> None:
    """A worker that serves again with a smaller prefetch keeps what it holds and gets
    nothing new until it is below it; a larger one takes more at once."""
    d = dispatcher()
    d.worker_up("W1", 0.0, 8)
    for i in range(20):
        d.submit(f"t{i}", "x", "C", 0.0)
    assert len(dispatched(d.actions())) == 8
    d.worker_up("W1", 1.0, 2)
    held = [r.task_id for r in d.snapshot() if r.worker == "W1"]
    for task_id in held[:6]:
        assert d.completed(task_id, 2.0, by="W1")
    assert dispatched(d.actions()) == [] and d.inflight() == {"W1": 2}
    assert d.completed(held[6], 3.0, by="W1")
    assert len(dispatched(d.actions())) == 1 and d.inflight() == {"W1": 2}
    d.worker_up("W1", 4.0, 12)
    assert len(dispatched(d.actions())) == 10 and d.inflight() == {"W1": 12}


def test_a_restored_dispatcher_gives_known_workers_their_announced_prefetch() -> None:
    """After a restart the node hands `worker_known` each worker's stored prefetch: the
    worker holding its one task (prefetch 1) gets no more when it is up again."""
    d = dispatcher()
    d.worker_up("W1", 0.0, 1)
    for i in range(5):
        d.submit(f"t{i}", "x", "C", 0.0)
    d.actions()
    restored = WorkQueueDispatcher.restore("upper", d.snapshot(), 50.0, lease_s=LEASE_S)
    restored.worker_known("W1", 1)
    restored.worker_up("W1", 51.0, 1)
    assert dispatched(restored.actions()) == [] and restored.inflight() == {"W1": 1}
    assert restored.workers() == [WorkerStatus("W1", True, False, 1, 1)]


@pytest.mark.parametrize("value", [0, -1, MAX_PREFETCH + 1, 10**12, 1.5, "8", True, None])
def test_a_prefetch_a_worker_sets_for_itself_is_a_whole_number_up_to_the_cap(
    value: object,
) -> None:
    assert not prefetch_ok(value)
    with pytest.raises(InvalidPrefetch, match="not a prefetch"):
        check_prefetch(value)  # type: ignore[arg-type]


def test_a_prefetch_below_1_restored_from_the_store_counts_as_none_stated() -> None:
    """The wire refuses 0 and below at decode (`header.Prefetch`), so only a `members` row
    edited by hand brings one back at start: the worker gets the default room, and the
    ventilator starts (it raised before, and a node that cannot start serves nothing)."""
    d = dispatcher()
    d.worker_up("W1", 0.0, 0)
    d.worker_known("W2", -3)
    assert [w.prefetch for w in d.workers()] == [DEFAULT_MAX_INFLIGHT] * 2
    assert check_prefetch(1) == 1 and check_prefetch(MAX_PREFETCH) == MAX_PREFETCH

"""The pattern tables (store/patterns.py): what a pattern message means for `tasks`,
`task_results` and `members` is written in that message's own transaction, new tasks go
through a batch, and a ventilator's and a broadcaster's state is read back after a restart."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from meshpost.errors import StoreError
from meshpost.protocol import Envelope, ReceiptFrame
from meshpost.protocol.groups import BroadcastStatus, MemberRecord
from meshpost.protocol.header import Kind, PatternHeader
from meshpost.protocol.workqueue import TaskRecord, TaskState
from meshpost.store import Delivery, NewTask, QueueCounts, Rejection, Store, WriteBatch
from meshpost.store.patterns import OwedDone

T0 = 1_700_000_000_000_000_000


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store.open(tmp_path / "V", name="V", sync="normal")
    yield s
    s.close()


def task_message(msg_id: str, seq: int, worker: str, task_id: str, attempt: int,
                 lease_ms: int = 5000) -> Envelope:
    return Envelope(msg_id, seq, "V", worker, "body", T0, T0 + seq,
                    PatternHeader(Kind.TASK, task_id, "work", "S", lease_ms, attempt))


def tasks(store: Store) -> list[tuple[str, str, int, str | None, str | None]]:
    return [tuple(r) for r in store.execute_raw(
        "SELECT task_id, state, attempts, worker, finished_by FROM tasks ORDER BY task_id")]


def test_a_task_message_and_its_assignment_commit_together(store: Store) -> None:
    store.apply(WriteBatch(tasks=[NewTask("t1", "work", "body", "S", T0),
                                  NewTask("t2", "work", "body", "S", T0)]), T0)
    assert tasks(store) == [("t1", "queued", 0, None, None), ("t2", "queued", 0, None, None)]
    # The task message's own commit marks its task assigned: no separate write that a crash
    # could keep without the message (or lose with it stored).
    store.apply(WriteBatch(outgoing=[task_message("m1", 1, "W1", "t1", 1)]), T0 + 1)
    assert tasks(store)[0] == ("t1", "assigned", 1, "W1", None)
    # A transaction that fails after the message's row leaves neither (the same id twice).
    with pytest.raises(StoreError, match="UNIQUE"):
        store.apply(WriteBatch(outgoing=[task_message("m2", 1, "W2", "t1", 2),
                                         task_message("m2", 2, "W1", "t2", 1)]), T0 + 2)
    assert tasks(store) == [("t1", "assigned", 1, "W1", None), ("t2", "queued", 0, None, None)]
    assert store.execute_raw("SELECT COUNT(*) FROM messages WHERE id = 'm2'") == [(0,)]
    # A redelivery moves it on; an older attempt's message never moves it back.
    store.apply(WriteBatch(outgoing=[task_message("m3", 1, "W2", "t1", 2)]), T0 + 3)
    store.apply(WriteBatch(outgoing=[task_message("m4", 2, "W1", "t1", 1)]), T0 + 4)
    assert tasks(store)[0] == ("t1", "assigned", 2, "W2", None)


def test_a_done_or_a_result_at_its_own_sink_finishes_the_task_in_its_transaction(
    store: Store,
) -> None:
    store.apply(WriteBatch(tasks=[NewTask("t1", "work", "a", "S", T0),
                                  NewTask("t2", "work", "b", "V", T0)],
                           outgoing=[task_message("m1", 1, "W1", "t1", 1),
                                     task_message("m2", 2, "W1", "t2", 1)]), T0)
    done = Envelope("d1", 1, "W1", "V", "done", T0, T0, PatternHeader(Kind.DONE, "t1", "work"))
    result = Envelope("m2.t", 2, "W1", "V", "B", T0, T0, PatternHeader(Kind.RESULT, "t2", "work"))
    store.apply(WriteBatch(incoming=[[done, result]]), T0 + 1)
    assert tasks(store) == [("t1", "done", 1, "W1", "W1"), ("t2", "done", 1, "W1", "W1")]
    assert store.task_results() == [("t2", "m2.t", "W1")]
    # A `done` for a task from another queue's name changes nothing.
    store.apply(WriteBatch(tasks=[NewTask("t3", "work", "c", "S", T0)]), T0 + 2)
    other = Envelope("d2", 3, "W1", "V", "done", T0, T0, PatternHeader(Kind.DONE, "t3", "other"))
    store.apply(WriteBatch(incoming=[[other]]), T0 + 3)
    assert tasks(store)[2] == ("t3", "queued", 0, None, None)


def test_a_done_or_a_result_from_a_peer_never_given_the_task_finishes_nothing(
    store: Store,
) -> None:
    """A task id a peer names is no proof it had the task: at the ventilator only a worker
    some attempt went to finishes it (or has its result kept, as its own sink); the messages
    themselves are stored as any. A sink that is not the ventilator cannot tell (it never
    saw the task) and keeps the first result, as before."""
    store.apply(WriteBatch(tasks=[NewTask("t1", "work", "a", "V", T0),
                                  NewTask("t2", "work", "b", "V", T0)],
                           outgoing=[task_message("m1", 1, "W1", "t1", 1)]), T0)
    forged = [Envelope("d1", 1, "M", "V", "done", T0, T0, PatternHeader(Kind.DONE, "t1", "work")),
              Envelope("r1", 2, "M", "V", "X", T0, T0, PatternHeader(Kind.RESULT, "t1", "work")),
              Envelope("d2", 3, "M", "V", "done", T0, T0, PatternHeader(Kind.DONE, "t2", "work"))]
    (result,) = store.apply(WriteBatch(incoming=[forged]), T0 + 1)
    assert result.committed == [1, 2, 3]
    assert tasks(store) == [("t1", "assigned", 1, "W1", None), ("t2", "queued", 0, None, None)]
    assert store.task_results() == []
    # W1's result naming another queue is not the task's result (nor does it finish it).
    astray = Envelope("r0", 9, "W1", "V", "Z", T0, T0, PatternHeader(Kind.RESULT, "t1", "other"))
    store.apply(WriteBatch(incoming=[[astray]]), T0 + 1)
    assert store.task_results() == []
    # Redelivered to W2: W1, the earlier assignee, still finishes it (its result is real).
    store.apply(WriteBatch(outgoing=[task_message("m2", 1, "W2", "t1", 2)]), T0 + 2)
    late = Envelope("m1.t", 1, "W1", "V", "A", T0, T0, PatternHeader(Kind.RESULT, "t1", "work"))
    store.apply(WriteBatch(incoming=[[late]]), T0 + 3)
    assert tasks(store)[0] == ("t1", "done", 2, "W2", "W1")
    assert store.task_results() == [("t1", "m1.t", "W1")]
    # A `done` for a task whose sink is this node finishes nothing, from its worker too: the
    # result itself finishes it (a `done` vouches for a result at another node).
    ack = Envelope("d3", 2, "W1", "V", "done", T0, T0, PatternHeader(Kind.DONE, "t2", "work"))
    store.apply(WriteBatch(outgoing=[task_message("m3", 2, "W1", "t2", 1)]), T0 + 3)
    store.apply(WriteBatch(incoming=[[ack]]), T0 + 3)
    assert tasks(store)[1] == ("t2", "assigned", 1, "W1", None)
    # A task this node does not have (it is only the sink): the first result is kept.
    other = Envelope("r2", 4, "M", "V", "Y", T0, T0, PatternHeader(Kind.RESULT, "t9", "work"))
    store.apply(WriteBatch(incoming=[[other]]), T0 + 4)
    assert ("t9", "r2", "M") in store.task_results()


def test_a_retransmitted_result_beside_a_new_one_is_still_a_duplicate(store: Store) -> None:
    """The sink's `task_results` row is a change of the same statement group: a batch of one
    retransmitted result and one new result made two changes for two messages, and was
    taken for two new messages (the retransmission acted on again)."""
    first = Envelope("r1", 1, "W1", "V", "A", T0, T0, PatternHeader(Kind.RESULT, "t1", "work"))
    second = Envelope("r2", 2, "W1", "V", "B", T0, T0, PatternHeader(Kind.RESULT, "t2", "work"))
    (result,) = store.apply(WriteBatch(incoming=[[first]]), T0)
    assert (result.committed, result.duplicates) == ([1], [])
    (result,) = store.apply(WriteBatch(incoming=[[first, second]]), T0 + 1)
    assert (result.committed, result.duplicates) == ([1, 2], [1])


def test_membership_records_are_kept_in_their_message_transaction_by_rank(store: Store) -> None:
    def member(msg_id: str, seq: int, body: str, version: int, *, sender: str = "B",
               kind: Kind = Kind.MEMBER) -> Envelope:
        return Envelope(msg_id, seq, sender, "V" if sender != "V" else "B", body, T0,
                        T0 + version, PatternHeader(kind, queue="team", version=version))

    store.apply(WriteBatch(incoming=[[member("j1", 1, "join", 7)]]), T0)
    assert store.member_records() == [MemberRecord("team", "B", True, 7, T0 + 7)]
    # A late leave of a lower version changes nothing; a newer one wins.
    store.apply(WriteBatch(incoming=[[member("l1", 2, "leave", 5)]]), T0)
    assert store.member_records() == [MemberRecord("team", "B", True, 7, T0 + 7)]
    store.apply(WriteBatch(incoming=[[member("l2", 3, "leave", 9)]]), T0)
    assert store.member_records() == [MemberRecord("team", "B", False, 9, T0 + 9)]
    # Our own record, with the copies that tell every peer; a worker's `serve` record.
    store.apply(WriteBatch(outgoing=[member("o1", 1, "join", 11, sender="V")]), T0)
    store.apply(WriteBatch(incoming=[[member("s1", 4, "serve", 3, kind=Kind.SERVE)]]), T0)
    assert store.member_records() == [MemberRecord("team", "B", False, 9, T0 + 9),
                                      MemberRecord("team", "V", True, 11, T0 + 11)]
    assert store.members("queue") == [("team", "B", True, 3, None)]


def test_a_serve_record_keeps_its_prefetch_with_it_by_rank(store: Store) -> None:
    """The winning `serve` record's prefetch is kept (as announced: a ventilator caps it
    when it uses it), in the record's own transaction; a stale record does not change it,
    and a record that states none (an older worker) leaves none."""
    def serve(msg_id: str, seq: int, version: int, prefetch: int | None,
              body: str = "serve") -> Envelope:
        return Envelope(msg_id, seq, "W1", "V", body, T0, T0 + version,
                        PatternHeader(Kind.SERVE, queue="work", version=version,
                                      prefetch=prefetch))

    store.apply(WriteBatch(incoming=[[serve("s1", 1, 5, 64)]]), T0)
    assert store.members("queue") == [("work", "W1", True, 5, 64)]
    store.apply(WriteBatch(incoming=[[serve("s0", 2, 4, 2)]]), T0)  # older: ignored
    assert store.members("queue") == [("work", "W1", True, 5, 64)]
    store.apply(WriteBatch(incoming=[[serve("s2", 3, 6, 10**12)]]), T0)
    assert store.members("queue") == [("work", "W1", True, 6, 10**12)]
    store.apply(WriteBatch(incoming=[[serve("s3", 4, 7, None)]]), T0)
    assert store.members("queue") == [("work", "W1", True, 7, None)]


def test_unfinished_tasks_come_back_with_their_lease_and_delivery(store: Store) -> None:
    store.apply(WriteBatch(tasks=[NewTask(f"t{i}", "work", f"b{i}", "S", T0 + i)
                                  for i in range(1, 5)],
                           outgoing=[task_message("m1", 1, "W1", "t1", 1, lease_ms=7000),
                                     task_message("m2", 2, "W1", "t2", 1, lease_ms=7000),
                                     task_message("m3", 1, "W2", "t3", 1, lease_ms=7000)]), T0)
    # W1 receipted both its task messages; t2 is done; t3's went out, no receipt yet.
    store.apply(WriteBatch(deliveries=[Delivery("W1", [1, 2], ReceiptFrame(
        [(1, 2)], 0, T0, T0, T0, T0, "full"), T0)]), T0 + 1)
    done = Envelope("d1", 1, "W1", "V", "done", T0, T0, PatternHeader(Kind.DONE, "t2", "work"))
    store.apply(WriteBatch(incoming=[[done]]), T0 + 2)
    assert store.unfinished_tasks() == {"work": (7.0, [
        TaskRecord("t1", "b1", "S", TaskState.ASSIGNED, 1, "W1", True, given=("W1",)),
        # Not receipted: its seq on W2's link, whose receipt starts its lease after a restart.
        TaskRecord("t3", "b3", "S", TaskState.ASSIGNED, 1, "W2", False, seq=1, given=("W2",)),
        TaskRecord("t4", "b4", "S", TaskState.QUEUED, 0, None, False),
    ])}
    store.apply(WriteBatch(outgoing=[task_message("m4", 2, "W2", "t1", 2)]), T0 + 3)
    assert store.queue_counts() == {"work": QueueCounts(done=1, redelivered=1)}


def test_a_broadcast_status_is_rebuilt_from_its_copies_and_receipts(store: Store) -> None:
    header = PatternHeader(Kind.GROUP, "L1", "team")
    store.apply(WriteBatch(outgoing=[Envelope("c1", 1, "V", "B", "hi", T0, T0, header),
                                     Envelope("c2", 1, "V", "C", "hi", T0, T0, header),
                                     Envelope("c3", 1, "V", "D", "hi", T0, T0, header)]), T0)
    store.apply(WriteBatch(deliveries=[Delivery("B", [1], ReceiptFrame(
        [(1, 1)], 0, T0, T0, T0, T0, "full"), T0)],
        rejections=[Rejection("D", [1], "invalid: no")]), T0 + 1)
    [stored] = store.unsettled_broadcasts()
    assert stored.status == BroadcastStatus("L1", "team", 3, ("B",), ("C",),
                                            (("D", "invalid: no"),))
    assert stored.pending == (("C", 1),)
    store.apply(WriteBatch(deliveries=[Delivery("C", [1], ReceiptFrame(
        [(1, 1)], 0, T0, T0, T0, T0, "full"), T0)]), T0 + 2)
    assert store.unsettled_broadcasts() == []
    [settled] = store.broadcasts("L1")
    assert settled.status.settled and settled.status.delivered == ("B", "C")
    assert store.broadcasts("nope") == []


def test_owed_dones_are_the_results_with_no_done_to_their_ventilator(tmp_path: Path) -> None:
    """A worker's view (W): tasks from V (sink S) and from S (its own sink). A `done` is owed
    for each task whose result went to a sink that is not its ventilator and for which no
    `done` is stored; `delivered` says whether the sink receipted (or rejected) the result."""
    w = Store.open(tmp_path / "W", name="W", sync="normal")
    try:
        def task_in(msg_id: str, seq: int, ventilator: str, task_id: str, sink: str) -> Envelope:
            return Envelope(msg_id, seq, ventilator, "W", "body", T0, T0 + seq,
                            PatternHeader(Kind.TASK, task_id, "work", sink, 5000, 1))

        def out(msg_id: str, seq: int, to: str, kind: Kind, task_id: str) -> Envelope:
            return Envelope(msg_id, seq, "W", to, "x", T0, T0 + seq,
                            PatternHeader(kind, task_id, "work"))

        w.apply(WriteBatch(incoming=[[task_in(f"m{i}", i, "V", f"t{i}", "S")
                                      for i in range(1, 6)],
                                     [task_in("n1", 1, "S", "u1", "S")]]), T0)
        # t1: result receipted, done stored. t2: receipted, no done. t3: not receipted yet.
        # t4: rejected by the sink. t5: not run yet. u1: V is not involved, S is its own sink.
        w.apply(WriteBatch(outgoing=[out(f"m{i}.t", i, "S", Kind.RESULT, f"t{i}")
                                     for i in range(1, 5)]
                           + [out("n1.t", 5, "S", Kind.RESULT, "u1"),
                              out("d1", 1, "V", Kind.DONE, "t1")]), T0 + 1)
        w.apply(WriteBatch(deliveries=[Delivery("S", [1, 2, 5], ReceiptFrame(
            [(1, 2), (5, 5)], 0, T0, T0, T0, T0, "full"), T0)],
            rejections=[Rejection("S", [4], "too-large: no")]), T0 + 2)
        assert w.owed_dones() == [OwedDone("t2", "work", "V", "S", 2, True),
                                  OwedDone("t3", "work", "V", "S", 3, False)]
        # A `done` to V stored for t2 (what the start sends) pays it; t3's receipt comes.
        w.apply(WriteBatch(outgoing=[out("d2", 2, "V", Kind.DONE, "t2")],
                           deliveries=[Delivery("S", [3], ReceiptFrame(
                               [(3, 3)], 0, T0, T0, T0, T0, "full"), T0)]), T0 + 3)
        assert w.owed_dones() == [OwedDone("t3", "work", "V", "S", 3, True)]
    finally:
        w.close()

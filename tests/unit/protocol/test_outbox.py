"""Outbox on its own: the window, the disk backlog, cutting batches, settling and what the
peer's answers prove about the flights. (Through a link, in virtual time: test_dialer*.py.)"""

from __future__ import annotations

from collections.abc import Iterable

from hypothesis import given
from hypothesis import strategies as st

from meshpost.protocol.frames import (
    MAX_BATCH_BODY_BYTES,
    MAX_BATCH_MESSAGES,
    Batch,
    Envelope,
    Frame,
)
from meshpost.protocol.outbox import HELD_MESSAGE_OVERHEAD, Outbox, held_size

T0_WALL = 1_700_000_000_000_000_000


def msg(seq: int, body: str = "hello") -> Envelope:
    return Envelope(f"id-alice-{seq}", seq, "alice", "bob", body, T0_WALL + seq, seq)


def msgs(seqs: Iterable[int], body: str = "hello") -> list[Envelope]:
    return [msg(s, body) for s in seqs]


def caught_up(window: int = 8, window_bytes: int = 1 << 20) -> Outbox:
    """An outbox whose disk was read (short) and holds nothing: offers are held at once."""
    outbox = Outbox(window=window, window_bytes=window_bytes)
    assert outbox.disk_request() == (0, window)
    outbox.refill([])
    assert not outbox.disk_backlog
    return outbox


def launched(outbox: Outbox, seqs: Iterable[int], now: float, wall_ns: int) -> list[Batch]:
    """Enqueue `seqs` and put them in flight; the Batches that left."""
    outbox.enqueue(msgs(seqs))
    frames: list[Frame] = []
    outbox.launch(now, wall_ns, frames)
    return [f for f in frames if isinstance(f, Batch)]


# -- the window and the disk ----------------------------------------------------------------


def test_a_new_outbox_reads_the_disk_before_it_holds_an_offer() -> None:
    outbox = Outbox(window=8, window_bytes=1 << 20)
    outbox.offer(msgs([1, 2]))  # older messages of an earlier run may be on disk
    assert outbox.unacknowledged == 0
    assert outbox.disk_backlog
    assert outbox.disk_request() == (0, 8)
    outbox.refill(msgs([1, 2]))  # short read: the disk has nothing else
    assert list(outbox.queue) == msgs([1, 2])
    assert not outbox.disk_backlog
    outbox.offer(msgs([3]))
    assert [m.seq for m in outbox.queue] == [1, 2, 3]


def test_a_full_window_leaves_offers_on_disk_until_a_quarter_is_free() -> None:
    outbox = caught_up(window=4)
    outbox.offer(msgs([1, 2, 3, 4, 5, 6]))
    assert outbox.unacknowledged == 4
    assert outbox.capacity == 0
    assert outbox.disk_backlog
    assert outbox.disk_request() is None  # no room worth a read
    launched(outbox, [], 1.0, T0_WALL)
    assert outbox.settle([(1, 1)]) == [1]
    assert outbox.disk_request() == (4, 1)
    outbox.refill(msgs([5]))  # a full read (limit 1): the disk may hold more
    assert outbox.disk_backlog
    assert outbox.highest_enqueued_seq == 5


@given(st.integers(1, 4), st.integers(1, 3), st.lists(st.integers(1, 6), max_size=6),
       st.integers(1, 700), st.booleans())
def test_offering_one_message_does_what_offered_and_enqueue_do(
    window: int, budget_messages: int, seqs: list[int], body_len: int, read_disk: bool,
) -> None:
    """`offer` of one message (a single send) has a path of its own: it holds, skips or
    leaves on disk exactly what the general path (`offered`, then `enqueue`) does."""
    fast = Outbox(window=window, window_bytes=budget_messages * (HELD_MESSAGE_OVERHEAD + 300))
    general = Outbox(window=window, window_bytes=fast.window_bytes)
    for outbox in (fast, general):
        if read_disk:
            assert outbox.disk_request() is not None
            outbox.refill([])
    for seq in seqs:
        message = msg(seq, "x" * body_len)
        fast.offer([message])
        if general.offered([message]):
            general.enqueue([message])
        assert (list(fast.queue), fast.held_bytes, fast.highest_enqueued_seq,
                fast.disk_backlog) == (list(general.queue), general.held_bytes,
                                       general.highest_enqueued_seq, general.disk_backlog)
        if fast.queue and seq % 2:  # now and then, something goes in flight
            for outbox in (fast, general):
                outbox.launch(0.0, T0_WALL, [])


_OPS = st.lists(st.one_of(
    st.tuples(st.just("offer"), st.lists(st.integers(1, 12), min_size=1, max_size=3)),
    st.tuples(st.just("read"), st.lists(st.integers(1, 12), max_size=4)),
    st.tuples(st.just("launch"), st.just([])),
    st.tuples(st.just("settle"), st.lists(st.integers(1, 12), min_size=1, max_size=1)),
), max_size=25)


@given(st.integers(1, 4), st.integers(1, 3), _OPS)
def test_disk_backlog_is_its_rule_after_anything(
    window: int, budget_messages: int, ops: list[tuple[str, list[int]]],
) -> None:
    """`disk_backlog` is a plain attribute the outbox sets where its fields change: after
    any offers (one message or more), reads from disk, launches and receipts it says what
    its rule does."""
    outbox = Outbox(window=window, window_bytes=budget_messages * (HELD_MESSAGE_OVERHEAD + 5))
    for op, seqs in ops:
        if op == "offer":
            outbox.offer(msgs(sorted(set(seqs))))
        elif op == "read":
            if outbox.disk_request() is not None:
                outbox.refill(msgs(sorted(set(seqs))))
        elif op == "launch":
            outbox.launch(0.0, T0_WALL, [])
        else:
            outbox.settle([(seqs[0], seqs[0])])
        assert outbox.disk_backlog == (outbox._disk_unread or outbox._highest_offered_seq
                                       > outbox.highest_enqueued_seq)


def test_enqueue_skips_what_is_held_and_says_how_much_is() -> None:
    outbox = caught_up(window=4)
    assert outbox.enqueue(msgs([1, 2])) == 2
    assert outbox.enqueue(msgs([1, 2, 3, 4, 5, 6])) == 4  # 1-2 held already, 3-4 fit
    assert [m.seq for m in outbox.queue] == [1, 2, 3, 4]


def test_the_byte_budget_admits_by_body_size_and_one_message_always() -> None:
    per = 100 + HELD_MESSAGE_OVERHEAD
    outbox = caught_up(window=100, window_bytes=2 * per + 10)
    assert outbox.admit(msgs([1, 2, 3], body="x" * 100)) == 2
    huge = caught_up(window=100, window_bytes=10)
    assert huge.admit(msgs([1, 2], body="x" * 100)) == 1  # an empty outbox takes one
    huge.enqueue(msgs([1], body="x" * 100))
    assert huge.admit(msgs([2], body="x")) == 0
    assert huge.held_bytes == held_size(msgs([1], body="x" * 100)) == per


# -- sending ------------------------------------------------------------------------------


def test_launch_cuts_frames_at_the_message_limit_with_one_tx_time() -> None:
    outbox = caught_up(window=3 * MAX_BATCH_MESSAGES)
    sent = launched(outbox, range(1, MAX_BATCH_MESSAGES + 3), 2.0, T0_WALL + 7)
    assert [len(b.messages) for b in sent] == [MAX_BATCH_MESSAGES, 2]
    assert {b.tx_at_ns for b in sent} == {T0_WALL + 7}
    assert not outbox.queue
    assert sorted(outbox.inflight) == list(range(1, MAX_BATCH_MESSAGES + 3))
    assert [(f[0], f[1], len(f[2])) for f in outbox.flights] == [
        (2.0, T0_WALL + 7, MAX_BATCH_MESSAGES), (2.0, T0_WALL + 7, 2)]


def test_launch_cuts_frames_at_the_body_limit_and_a_big_body_goes_alone() -> None:
    outbox = caught_up(window=10, window_bytes=1 << 24)
    half = "x" * (MAX_BATCH_BODY_BYTES // 2)
    outbox.enqueue([msg(1, half), msg(2, half), msg(3, "y"), msg(4, "z" * MAX_BATCH_BODY_BYTES),
                    msg(5, "w")])
    frames: list[Frame] = []
    outbox.launch(1.0, T0_WALL, frames)
    assert [[m.seq for m in b.messages] for b in frames if isinstance(b, Batch)] == [
        [1, 2], [3], [4], [5]]


def test_a_resend_is_counted_remembered_and_sent_as_new_flights() -> None:
    outbox = caught_up()
    launched(outbox, [1, 2], 1.0, T0_WALL)
    frames: list[Frame] = []
    outbox.resend(msgs([2]), 2.0, T0_WALL + 5, frames)
    assert [[m.seq for m in f.messages] for f in frames if isinstance(f, Batch)] == [[2]]
    assert outbox.retransmissions == 1
    assert outbox.resent == {2}
    assert outbox.first_resend_tx_ns == T0_WALL + 5
    assert [f[1] for f in outbox.flights] == [T0_WALL, T0_WALL + 5]
    frames = []
    outbox.resend_all(3.0, T0_WALL + 9, frames)  # the peer lost our session
    assert [f[1] for f in outbox.flights] == [T0_WALL + 9]
    assert outbox.retransmissions == 3
    assert outbox.first_resend_tx_ns == T0_WALL + 5  # the first resend of this stall


# -- what the peer answered ---------------------------------------------------------------


class CountingDict(dict[int, Envelope]):
    """The in-flight dict, counting the lookups `settle` makes."""

    lookups = 0

    def pop(self, key: int, *default: object) -> object:  # type: ignore[override]
        self.lookups += 1
        return super().pop(key, *default)


def test_a_receipt_of_many_ranges_over_seqs_never_sent_costs_what_is_in_flight() -> None:
    """A hostile listener's receipt: each range as wide as the window in flight, none of it
    sent. Walking each range cost ranges x window lookups (13 s of the node's loop for one
    3 MB frame); now it costs the in-flight seqs, each looked up once."""
    outbox = caught_up(window=100)
    outbox.inflight = CountingDict()
    launched(outbox, range(1, 101), 1.0, T0_WALL)
    ranges = [(1_000 + i % 50, 1_000 + i % 50 + 99) for i in range(10_000)]
    assert outbox.settle([*ranges, (7, 8)]) == [7, 8]
    assert outbox.inflight.lookups <= 3 * 100, outbox.inflight.lookups
    assert len(outbox.inflight) == 98
    assert outbox.held_bytes == held_size(msgs([s for s in range(1, 101) if s not in (7, 8)]))


def test_settle_by_lookup_merges_overlapping_and_adjacent_ranges() -> None:
    outbox = caught_up(window=16)
    launched(outbox, range(1, 17), 1.0, T0_WALL)
    wide = [(5, 3), (14, 100), (2, 4), (3, 6), (10, 10), (7, 7), *[(50, 90)] * 20]
    assert outbox.settle(wide) == [2, 3, 4, 5, 6, 7, 10, 14, 15, 16]
    assert sorted(outbox.inflight) == [1, 8, 9, 11, 12, 13]


def test_settle_takes_what_is_in_flight_in_order_and_frees_the_window() -> None:
    outbox = caught_up()
    launched(outbox, [1, 2, 3, 4], 1.0, T0_WALL)
    before = outbox.held_bytes
    assert outbox.settle([(3, 4), (9, 2), (1, 1), (3, 3)]) == [1, 3, 4]
    assert sorted(outbox.inflight) == [2]
    assert outbox.held_bytes == before - held_size(msgs([1, 3, 4]))
    assert outbox.settle([(0, 10**18)]) == [2]  # a wide range walks what is held
    assert outbox.held_bytes == 0
    outbox.drop_settled_flights()
    assert not outbox.flights


def test_a_receipt_of_one_seq_settles_it_alone_and_frees_its_bytes() -> None:
    outbox = caught_up()
    launched(outbox, [1, 2], 1.0, T0_WALL)
    before = outbox.held_bytes
    assert outbox.settle([(2, 2)]) == [2]
    assert sorted(outbox.inflight) == [1]
    assert outbox.held_bytes == before - held_size(msgs([2]))
    assert outbox.settle([(2, 2)]) == []  # settled already
    assert outbox.settle([(7, 7)]) == []  # never sent
    assert outbox.held_bytes == before - held_size(msgs([2]))
    assert outbox.settle([(1, 1)]) == [1]
    assert outbox.held_bytes == 0


def test_reject_settles_the_listed_seqs_in_flight() -> None:
    outbox = caught_up()
    launched(outbox, [1, 2, 3], 1.0, T0_WALL)
    assert outbox.reject([3, 7, 1]) == [3, 1]
    assert sorted(outbox.inflight) == [2]
    assert outbox.held_bytes == held_size(msgs([2]))


def test_forget_resent_counts_settled_resends_and_ends_the_stall() -> None:
    outbox = caught_up()
    launched(outbox, [1, 2, 3], 1.0, T0_WALL)
    outbox.resend(msgs([2, 3]), 2.0, T0_WALL + 5, [])
    assert outbox.forget_resent(outbox.settle([(1, 1)])) == 0
    assert outbox.forget_resent(outbox.settle([(2, 2)])) == 1
    assert outbox.first_resend_tx_ns == T0_WALL + 5  # 3 still resent
    assert outbox.forget_resent(outbox.settle([(3, 3)])) == 1
    assert outbox.first_resend_tx_ns is None


def test_settled_flights_are_forgotten_oldest_first() -> None:
    outbox = caught_up()
    launched(outbox, [1, 2, 3], 1.0, T0_WALL)
    launched(outbox, [4], 2.0, T0_WALL + 1)
    outbox.settle([(4, 4)])
    outbox.drop_settled_flights()
    assert len(outbox.flights) == 2  # the older flight still holds 1-3
    outbox.settle([(2, 2)])
    outbox.drop_settled_flights()
    assert len(outbox.flights) == 2  # 1 and 3: its ends
    outbox.settle([(1, 1), (3, 3)])
    outbox.drop_settled_flights()
    assert not outbox.flights


def test_all_settled_forgets_every_flight_and_what_was_known() -> None:
    outbox = caught_up()
    launched(outbox, [1], 1.0, T0_WALL)
    outbox.batch_dropped(T0_WALL)
    outbox.resend(msgs([1]), 2.0, T0_WALL + 1, [])
    outbox.settle([(1, 1)])
    outbox.all_settled()
    assert not outbox.flights
    assert not outbox.resent
    assert not outbox.dropped_tx
    assert outbox.first_resend_tx_ns is None


# -- what is due ----------------------------------------------------------------------------


def three_flights() -> Outbox:
    """Flights at 1.0, 2.0 and 3.0 s (tx T0_WALL + 1, 2, 3): seqs 1, 2, 3."""
    outbox = caught_up()
    for seq in (1, 2, 3):
        launched(outbox, [seq], float(seq), T0_WALL + seq)
    return outbox


def test_overdue_keeps_what_the_peer_holds_and_restore_puts_it_back_in_order() -> None:
    outbox = three_flights()
    outbox.answered(T0_WALL + 1)  # the peer echoed flight 1: it holds it
    outbox.answered(T0_WALL)  # an older echo changes nothing
    due, kept = outbox.overdue(cutoff=2.0, stale_before=0.0, progress=0.0)
    assert [f[1] for f in due] == [T0_WALL + 2]
    assert [f[1] for f in kept] == [T0_WALL + 1]
    assert [f[1] for f in outbox.flights] == [T0_WALL + 3]  # not overdue yet
    assert [m.seq for m in outbox.unsettled(due)] == [2]
    outbox.restore(kept)
    assert [f[1] for f in outbox.flights] == [T0_WALL + 1, T0_WALL + 3]


def test_a_held_flight_is_due_once_stale_or_dropped() -> None:
    outbox = three_flights()
    outbox.answered(T0_WALL + 3)
    due, kept = outbox.overdue(cutoff=3.0, stale_before=1.5, progress=1.0)
    assert [f[1] for f in due] == [T0_WALL + 1]  # no progress since it left: stale
    outbox.restore(kept)
    outbox.batch_dropped(T0_WALL + 2)
    due, kept = outbox.overdue(cutoff=3.0, stale_before=0.0, progress=0.0)
    assert [f[1] for f in due] == [T0_WALL + 2]
    assert outbox.any_dropped(due)
    assert not outbox.any_dropped(kept)


def test_a_pong_with_nothing_pending_marks_the_unsettled_flights_before_it_dropped() -> None:
    outbox = three_flights()
    outbox.settle([(1, 1)])
    outbox.resend(msgs([2]), 4.0, T0_WALL + 4, [])
    outbox.unanswered_before(T0_WALL + 3)  # strictly before: flight 3 left with the Ping
    assert outbox.dropped_tx == {T0_WALL + 2}  # flight 1 is settled; 2 lacks, resent or not
    outbox.unanswered_before(T0_WALL + 5)
    assert outbox.dropped_tx == {T0_WALL + 2, T0_WALL + 3, T0_WALL + 4}


def test_the_pings_monotonic_time_orders_flights_when_the_wall_clock_went_back() -> None:
    outbox = three_flights()
    # The Ping left at 2.5 s, its wall tx before every flight's (the clock was set back).
    outbox.unanswered_before(T0_WALL - 10**9, sent_before=2.5)
    assert outbox.dropped_tx == {T0_WALL + 1, T0_WALL + 2}
    assert [m.seq for m in outbox.take_before(T0_WALL - 10**9, sent_before=2.5)] == [1, 2]
    assert [f[1] for f in outbox.flights] == [T0_WALL + 3]


def test_take_before_returns_each_lacking_message_once_in_seq_order() -> None:
    outbox = three_flights()
    outbox.resend(msgs([1]), 4.0, T0_WALL + 4, [])  # 1 is in two flights now
    assert [m.seq for m in outbox.take_before(T0_WALL + 5)] == [1, 2, 3]
    assert not outbox.flights
    assert sorted(outbox.inflight) == [1, 2, 3]  # still in flight: the caller resends them


def test_the_deadline_is_the_first_unproven_flights_rto_or_rto_max_for_held_ones() -> None:
    outbox = caught_up()
    assert outbox.deadline(0.0, 0.0, 0.5, 5.0) is None
    for seq in (1, 2):
        launched(outbox, [seq], float(seq), T0_WALL + seq)
    assert outbox.deadline(2.0, 0.0, 0.5, 5.0) == 1.5
    assert outbox.deadline(2.5, 0.0, 0.5, 5.0, probing=True) == 3.0  # an RTO from now
    outbox.answered(T0_WALL + 1)
    assert outbox.deadline(2.5, 0.0, 0.5, 5.0) == 2.5  # flight 2 is the first unproven
    outbox.answered(T0_WALL + 2)
    assert outbox.deadline(2.5, 1.2, 0.5, 5.0) == 6.2  # rto_max after progress
    outbox.batch_dropped(T0_WALL + 1)
    assert outbox.deadline(2.5, 1.2, 0.5, 5.0) == 1.5


def test_repr_says_what_is_held() -> None:
    outbox = caught_up()
    launched(outbox, [1, 2], 1.0, T0_WALL)
    outbox.enqueue(msgs([3]))
    assert repr(outbox) == (
        f"Outbox(queued=1, inflight=2, flights=1, held_bytes={held_size(msgs([1, 2, 3]))})")

"""The retransmission timeout against a slow peer, in virtual time: what seeds it before any
receipt (the handshake, Pongs), what a Pong's `pending` count proves, and spurious resends
found by the receipt's echo (RFC 3522) with their backoff undone (RFC 4015)."""

from __future__ import annotations

import pytest
from tests.unit.protocol.test_dialer import (
    PING_INTERVAL,
    RTO_INITIAL,
    RTO_MAX,
    Wire,
    batched_seqs,
    batches,
    msgs,
)

from meshpost.protocol import (
    Frame,
    Hello,
    MessagesArrived,
    MessagesDelivered,
    Ping,
    Pong,
    ReceiptFrame,
)
from meshpost.protocol.dialer import RETRIED_HANDSHAKE_RTO_S


def send_one(wire: Wire, seq: int) -> MessagesArrived:
    """Send message `seq`; bob reads it but has not stored it yet (a slow commit)."""
    wire.dialer.enqueue(msgs([seq]))
    frames = wire.poll()
    assert batched_seqs(frames) == [seq]
    wire.to_listener(batches(frames), commit=False)
    arrived = wire.listener_events[-1]
    assert isinstance(arrived, MessagesArrived)
    return arrived


def run_timers(wire: Wire, until: float, *, answer_pings: bool = True) -> list[Frame]:
    """Poll at every deadline up to `until`; bob answers each Ping at once if asked."""
    sent: list[Frame] = []
    while wire.dialer.next_timer() <= until:
        wire.advance_to(max(wire.dialer.next_timer(), wire.now))
        frames = wire.poll()
        sent += frames
        if answer_pings:
            wire.to_dialer(wire.to_listener([f for f in frames if isinstance(f, Ping)]))
    wire.advance_to(until)
    return sent


# -- the handshake seeds the timeout ------------------------------------------------------------


def test_the_handshake_round_trip_seeds_the_timeout_before_any_receipt() -> None:
    wire = Wire(peer_timeout_s=1_000.0)
    [hello] = wire.poll()
    wire.advance(1.0)  # bob takes a second to welcome us: he is busy
    wire.to_dialer(wire.to_listener([hello]))
    assert wire.dialer.path_srtt_s == pytest.approx(1.0)
    assert wire.dialer.srtt_s is None  # no receipt yet
    assert wire.dialer.rto == pytest.approx(1.0 + 4 * 0.5)  # SRTT + 4 RTTVAR, not 0.5 s
    send_one(wire, 1)
    sent_at = wire.now
    # Nothing is answered: the first timeout (a probe Ping) comes after 3 s, not 0.5 s, and
    # the resend once the doubled timeout (capped) has passed, not after 1.5 s.
    while not batches(wire.poll()):
        wire.advance_to(wire.dialer.next_timer())
    assert wire.now - sent_at == pytest.approx(RTO_MAX)
    assert wire.dialer.retransmissions == 1


def test_a_handshake_that_needed_hello_again_starts_at_three_seconds() -> None:
    wire = Wire(peer_timeout_s=1_000.0)
    wire.poll()  # the first Hello is lost
    wire.advance(PING_INTERVAL)
    [hello] = wire.poll()
    wire.advance(0.2)
    wire.to_dialer(wire.to_listener([hello]))
    # Which Hello the Welcome answers is unknown: no sample, a conservative timeout instead.
    assert wire.dialer.path_srtt_s is None
    assert wire.dialer.rto == RETRIED_HANDSHAKE_RTO_S
    # The first round trip measured ends it (the owed Ping's Pong, 1 ms).
    pings = [f for f in wire.poll() if isinstance(f, Ping)]
    wire.advance(0.001)
    wire.to_dialer(wire.to_listener(pings))
    assert wire.dialer.path_srtt_s == pytest.approx(0.001)
    assert wire.dialer.base_rto == RTO_INITIAL


def test_pongs_are_round_trip_samples_of_the_path() -> None:
    wire = Wire(peer_timeout_s=1_000.0)
    wire.connect()
    for _ in range(3):
        wire.advance(PING_INTERVAL)
        pings = [f for f in wire.poll() if isinstance(f, Ping)]
        assert pings
        replies = wire.to_listener(pings)
        wire.advance(1.2)
        wire.to_dialer(replies)
    srtt = wire.dialer.path_srtt_s
    assert srtt is not None
    assert 0.3 < srtt < 1.2  # the handshake's 0 s, then three Pongs of 1.2 s, smoothed
    assert wire.dialer.srtt_s is None  # receipts have their own estimate
    assert wire.dialer.base_rto > 1.2  # a receipt cannot be faster than a Pong


# -- what a Pong's pending count proves ----------------------------------------------------------


def test_the_listener_counts_batches_taken_and_not_yet_stored_in_its_pongs() -> None:
    wire = Wire()
    wire.connect()
    arrived = send_one(wire, 1)
    [pong] = wire.to_listener([Ping(sent_at_ns=wire.wall)])
    assert isinstance(pong, Pong)
    assert pong.pending == 1
    wire.commit(arrived)
    [pong] = wire.to_listener([Ping(sent_at_ns=wire.wall)])
    assert isinstance(pong, Pong)
    assert pong.pending == 0


def test_a_peer_still_storing_our_batch_is_not_sent_it_again_however_long_it_takes() -> None:
    """bob answers every Ping at once but his store takes 30 s: his Pongs say the batch is
    still pending, so it is held for all that time (it used to go again after
    retransmit_max_s), and delivered once when he is done."""
    wire = Wire(peer_timeout_s=1_000.0)
    wire.connect()
    arrived = send_one(wire, 1)
    sent = run_timers(wire, 30.0)
    assert batches(sent) == []
    assert wire.dialer.retransmissions == 0
    wire.to_dialer(wire.commit(arrived))
    assert wire.of_type(MessagesDelivered)[0].seqs == [1]


def test_a_receipt_lost_after_the_peer_stored_the_batch_is_recovered_at_the_next_pong() -> None:
    """bob stored the batch and sent its receipt, which was lost (his socket was full). The
    first timeout's probe is answered: nothing of ours is pending, so the batch goes again at
    the next timeout rather than after retransmit_max_s, and bob receipts the duplicate."""
    wire = Wire(peer_timeout_s=1_000.0)
    wire.connect()
    arrived = send_one(wire, 1)
    wire.commit(arrived)  # stored; the receipt is lost
    frames: list[Frame] = []
    while not batches(frames):
        wire.advance_to(wire.dialer.next_timer())
        frames = wire.poll()
        if not batches(frames):
            frames = wire.to_dialer(wire.to_listener([f for f in frames
                                                      if isinstance(f, Ping)]))
    assert batched_seqs(frames) == [1]
    assert wire.now == pytest.approx(2 * RTO_INITIAL)  # its timeout, doubled by the probe
    wire.to_dialer(wire.to_listener(batches(frames)))
    assert wire.of_type(MessagesDelivered)[0].seqs == [1]
    assert len(wire.store) == 1


def test_a_pong_from_a_peer_that_does_not_count_changes_nothing() -> None:
    """An older peer's Pong has no `pending` (-1): a held batch goes again after
    retransmit_max_s without progress, as before."""
    wire = Wire(peer_timeout_s=1_000.0)
    wire.connect()
    send_one(wire, 1)
    frames: list[Frame] = []
    while not batches(frames):
        wire.advance_to(wire.dialer.next_timer())
        frames = wire.poll()
        for ping in (f for f in frames if isinstance(f, Ping)):
            wire.to_dialer([Pong(ping.sent_at_ns, wire.wall, wire.wall)])
    assert wire.now == pytest.approx(RTO_MAX)


def test_a_held_batch_neither_delays_a_later_batchs_timeout_nor_goes_with_it() -> None:
    """A batch the peer holds waits retransmit_max_s from its own send (the link was quiet
    for 100 s before: no progress to count from); a later batch nobody answered times out
    after its own RTO all the same, and only it is resent."""
    wire = Wire(peer_timeout_s=1_000.0)
    wire.connect()
    wire.advance(100.0)
    send_one(wire, 1)
    wire.advance(0.1)
    # An older peer (no pending count) answers a Ping sent after batch 1: bob holds it.
    wire.to_dialer([Pong(wire.wall, wire.wall, wire.wall)])
    wire.advance(0.1)
    send_one(wire, 2)  # nothing answers for this one: probed, then resent
    sent = run_timers(wire, wire.now + RTO_MAX - 1.0, answer_pings=False)
    assert set(batched_seqs(sent)) == {2}  # (twice: with backoff)


# -- spurious retransmissions (RFC 3522, RFC 4015) ---------------------------------------------


def resend_after_a_lost_probe(wire: Wire) -> list[Frame]:
    """Time out twice with nothing answered: the probe Ping, then the resend."""
    while not (frames := batches(wire.poll())):
        wire.advance_to(wire.dialer.next_timer())
    return frames


def quick_round_trips(wire: Wire, seqs: range, delay_s: float) -> None:
    for seq in seqs:
        wire.dialer.enqueue(msgs([seq]))
        replies = wire.to_listener(batches(wire.poll()))
        wire.advance(delay_s)
        wire.to_dialer(replies)


def test_a_receipt_echoing_the_first_transmission_shows_the_resend_was_spurious() -> None:
    wire = Wire(peer_timeout_s=1_000.0)
    wire.connect()
    quick_round_trips(wire, range(1, 6), 0.01)
    assert wire.dialer.rto == RTO_INITIAL
    wire.dialer.enqueue(msgs([6]))
    [first] = batches(wire.poll())
    replies = wire.to_listener([first])  # stored; the receipt is slow to come back
    resend_after_a_lost_probe(wire)
    assert wire.dialer.retransmissions == 1
    assert wire.dialer.rto == 4 * RTO_INITIAL  # backed off twice
    wire.advance(0.1)
    receipt = next(r for r in replies if isinstance(r, ReceiptFrame))
    assert receipt.echo_tx_at_ns == first.tx_at_ns
    wire.to_dialer([receipt])
    assert wire.dialer.spurious_retransmissions == 1
    # Its round trip (1.6 s) is a sample: it answers the first transmission. The backoff is
    # undone: the timeout is what the estimate says, never below that round trip.
    srtt = wire.dialer.srtt_s
    assert srtt is not None
    assert srtt > 0.01
    assert wire.dialer.rto == pytest.approx(max(wire.dialer.base_rto, 1.6))
    assert wire.dialer.rto < 4 * RTO_INITIAL


def test_a_receipt_of_the_resend_itself_is_no_spurious_one_and_keeps_karns_rule() -> None:
    wire = Wire(peer_timeout_s=1_000.0)
    wire.connect()
    wire.dialer.enqueue(msgs([1]))
    wire.poll()  # lost
    resent = resend_after_a_lost_probe(wire)
    backed_off = wire.dialer.rto
    wire.to_dialer(wire.to_listener(resent))
    assert wire.of_type(MessagesDelivered)[0].seqs == [1]
    assert wire.dialer.spurious_retransmissions == 0
    assert wire.dialer.srtt_s is None
    assert wire.dialer.rto == backed_off


def test_hello_retries_are_counted_for_the_handshake_sample_only_until_welcomed() -> None:
    wire = Wire(peer_timeout_s=1_000.0)
    hellos = [f for f in wire.poll() if isinstance(f, Hello)]
    wire.to_dialer(wire.to_listener(hellos))
    assert wire.dialer.path_srtt_s == 0.0  # one Hello, answered at once
    assert wire.dialer.rto == RTO_INITIAL

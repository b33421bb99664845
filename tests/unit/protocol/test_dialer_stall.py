"""A dialer whose own process was stopped or starved of CPU, in virtual time: a silence
deadline it polls long after it passed is its own stall, not the peer's silence, since what the
peer sent meanwhile may still wait unread. Once per silence it pings and waits a ping interval
instead of declaring the peer lost (which redials and resends the whole window)."""

from __future__ import annotations

import pytest
from tests.unit.protocol.test_dialer import (
    PEER_TIMEOUT,
    PING_INTERVAL,
    Wire,
    batches,
    drive_silently,
    msgs,
    state,
)

from meshpost.protocol import (
    Hello,
    LinkState,
    MessagesDelivered,
    PeerLost,
    Ping,
)
from meshpost.protocol.dialer import STALL_GRACE


def stalled_with_a_receipt_unread(stall_s: float) -> tuple[Wire, list]:
    """alice sends seqs 1-3, bob stores them and receipts at once; then alice's process is
    stopped for `stall_s` before it reads the receipt or runs its timers. Returns the wire
    and bob's unread answers."""
    wire = Wire()
    wire.connect()
    wire.dialer.enqueue(msgs([1, 2, 3]))
    answers = wire.to_listener(batches(wire.poll()))
    assert wire.dialer.next_timer() < wire.now + PEER_TIMEOUT
    wire.advance(stall_s)  # alice's timers fire only now, before her socket is read
    return wire, answers


def test_a_silence_deadline_polled_late_is_this_nodes_stall_and_the_peer_is_pinged() -> None:
    wire, unread = stalled_with_a_receipt_unread(PEER_TIMEOUT + 2.0)
    frames = wire.poll()
    assert not wire.of_type(PeerLost)  # the old code: lost, redialled, the window resent
    assert state(wire) is LinkState.READY
    assert [type(f) for f in frames] == [Ping]  # no Hello, no resend
    assert wire.dialer.stalls_excused == 1
    wire.to_dialer(unread)  # the receipt that waited in the socket
    assert wire.of_type(MessagesDelivered)[0].seqs == [1, 2, 3]
    assert wire.dialer.retransmissions == 0
    assert state(wire) is LinkState.READY


def test_a_peer_silent_after_the_excused_stall_is_lost_one_ping_interval_later() -> None:
    wire, _unread = stalled_with_a_receipt_unread(PEER_TIMEOUT + 2.0)
    woke = wire.now
    wire.poll()
    sent = drive_silently(wire, until=woke + PING_INTERVAL)  # bob's answers never come
    [lost] = wire.of_type(PeerLost)
    assert wire.now == pytest.approx(woke + PING_INTERVAL)
    assert state(wire) is LinkState.LOST
    assert isinstance(sent[-1][-1], Hello)
    assert lost.silent_for_s == pytest.approx(PEER_TIMEOUT)  # as counted after the excuse


def test_only_one_stall_is_excused_per_silence() -> None:
    wire, _unread = stalled_with_a_receipt_unread(PEER_TIMEOUT + 2.0)
    wire.poll()
    wire.advance(PING_INTERVAL + 3.0)  # stalled again past the new deadline: no excuse twice
    wire.poll()
    assert len(wire.of_type(PeerLost)) == 1
    assert wire.dialer.stalls_excused == 1


def test_a_frame_heard_after_an_excused_stall_allows_the_next_one() -> None:
    wire, unread = stalled_with_a_receipt_unread(PEER_TIMEOUT + 2.0)
    wire.poll()
    wire.to_dialer(unread)
    wire.dialer.enqueue(msgs([4]))
    wire.poll()  # seq 4 goes (and is lost on the wire)
    wire.advance(PEER_TIMEOUT + 2.0)  # stopped again
    assert [type(f) for f in wire.poll()] == [Ping]
    assert not wire.of_type(PeerLost)
    assert wire.dialer.stalls_excused == 2


def test_a_deadline_polled_a_little_late_is_still_the_peers_silence() -> None:
    wire = Wire()
    wire.connect()
    wire.dialer.enqueue(msgs([1]))
    drive_silently(wire, until=PEER_TIMEOUT - 0.1)
    late = 0.9 * STALL_GRACE * PING_INTERVAL
    wire.advance_to(wire.dialer.next_timer() + late)
    wire.poll()
    assert len(wire.of_type(PeerLost)) == 1
    assert wire.dialer.stalls_excused == 0


def test_a_retransmission_deadline_polled_late_probes_again_instead_of_resending() -> None:
    """The probe of a stall went, then this node stopped before reading its Pong: the next
    timeout, polled long after it passed, would resend the whole window (the old code); the
    answers waiting unread settle it instead."""
    wire = Wire(peer_timeout_s=1_000.0)  # the silence timer stays out of it
    wire.connect()
    wire.dialer.enqueue(msgs([1, 2, 3]))
    wire.to_listener(batches(wire.poll()), commit=False)  # bob is storing them (slow commit)
    arrived = wire.listener_events[-1]
    wire.advance_to(wire.dialer.next_timer())
    probe = wire.poll()
    assert [type(f) for f in probe] == [Ping]  # the first timeout of the stall probes
    unread = wire.to_listener(probe)  # bob's Pong (pending 1)
    wire.advance_to(wire.dialer.next_timer() + 3.0)  # alice stopped past the next timeout
    assert [type(f) for f in wire.poll()] == [Ping]  # no resend of the window
    assert wire.dialer.retransmissions == 0
    assert wire.dialer.stalls_excused == 1
    unread += wire.commit(arrived)  # the receipt, also waiting in alice's socket
    wire.to_dialer(unread)
    assert wire.of_type(MessagesDelivered)[0].seqs == [1, 2, 3]
    assert wire.dialer.retransmissions == 0


def test_a_silent_peer_still_gets_its_resend_at_the_timeout_after_an_excused_one() -> None:
    wire = Wire(peer_timeout_s=1_000.0)
    wire.connect()
    wire.dialer.enqueue(msgs([1, 2, 3]))
    wire.poll()  # lost on the wire
    wire.advance_to(wire.dialer.next_timer())
    assert [type(f) for f in wire.poll()] == [Ping]  # the probe: lost too
    wire.advance_to(wire.dialer.next_timer() + 3.0)  # a stall: excused, probed again
    assert [type(f) for f in wire.poll()] == [Ping]
    resent: list[int] = []
    while not resent:  # nothing heard since: the next timeout resends, on time
        wire.advance_to(wire.dialer.next_timer())
        resent = [m.seq for b in batches(wire.poll()) for m in b.messages]
    assert resent == [1, 2, 3]
    assert wire.dialer.retransmissions == 3


def test_a_deadline_made_due_at_once_by_a_pong_is_no_stall_and_the_batch_goes() -> None:
    """A Pong saying `pending` 0 makes an unreceipted batch due at once (its deadline is in
    the past): the node was running, so the poll right after resends it, and the Pong does
    not buy another Ping (no input from a peer may cost another message)."""
    wire = Wire(peer_timeout_s=1_000.0)
    wire.connect()
    wire.dialer.enqueue(msgs([1]))
    replies = wire.to_listener(batches(wire.poll()))
    assert replies  # bob stored it; the receipt is lost on the wire
    wire.advance_to(wire.dialer.next_timer())
    probe = wire.poll()
    assert [type(f) for f in probe] == [Ping]
    wire.advance(1.0)  # the Pong comes late, after the deadline it moves
    wire.to_dialer(wire.to_listener(probe))  # pending 0: the batch is due at once
    wire.advance(0.001)
    frames = wire.poll()
    assert [m.seq for b in batches(frames) for m in b.messages] == [1]
    assert not [f for f in frames if isinstance(f, Ping)]
    assert wire.dialer.stalls_excused == 0

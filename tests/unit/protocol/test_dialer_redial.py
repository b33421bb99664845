"""When the node replaces a lost link's connection (issue 20 item 5, docs/reliability.md bug
10): not at the loss, which a peer merely stopped or starved also causes, and a new connection
would discard every frame still queued for it on the old one, but only when the link is still
lost a peer timeout later with its connection silent all that while (`RedialWanted`): its
Hellos went unanswered, as a dead or half-open connection leaves them."""

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
    Frame,
    Hello,
    LinkState,
    MessagesArrived,
    PeerConnected,
    PeerLost,
    Ping,
    ReceiptFrame,
    RedialWanted,
    Welcome,
)


def lost(wire: Wire) -> tuple[float, list[Frame]]:
    """Drive alice's timers with bob silent until she finds him lost: when, and every frame
    she sent meanwhile."""
    sent = drive_silently(wire, until=wire.now + PEER_TIMEOUT + 0.01)
    assert state(wire) is LinkState.LOST
    assert len(wire.of_type(PeerLost)) == 1
    return wire.now, [f for frames in sent for f in frames]


def redial_polls(wire: Wire, until: float) -> list[Frame]:
    """Poll at every timer with bob silent, up to `until` or the poll that asked for a redial:
    that poll's frames (none if no poll asked)."""
    while (deadline := wire.dialer.next_timer()) <= until:
        wire.advance_to(max(deadline, wire.now))
        frames = wire.poll()
        assert wire.dialer.next_timer() > wire.now, "polling at next_timer() made no progress"
        if wire.of_type(RedialWanted):
            return frames
    return []


def test_a_link_lost_with_its_connection_silent_asks_for_a_redial_a_peer_timeout_later() -> None:
    """bob is gone without a word (a half-open connection): the loss itself asks for nothing
    (the old node redialled right then); a peer timeout later the link asks, once, and says
    Hello in the same poll, the new connection's first frame."""
    wire = Wire()
    wire.connect()
    lost_at, _ = lost(wire)
    assert wire.of_type(RedialWanted) == []
    frames = redial_polls(wire, until=lost_at + 10 * PEER_TIMEOUT)
    [redial] = wire.of_type(RedialWanted)
    assert wire.now == pytest.approx(lost_at + PEER_TIMEOUT)
    assert redial.peer == "bob"
    assert redial.silent_for_s == pytest.approx(2 * PEER_TIMEOUT)
    assert [type(f) for f in frames] == [Hello]
    # Once per loss: more silence asks for nothing more; Hellos go at their pace.
    later = drive_silently(wire, until=wire.now + 10 * PEER_TIMEOUT)
    assert len(wire.of_type(RedialWanted)) == 1
    assert later and all(isinstance(f, Hello) for frames in later for f in frames)


def test_a_stopped_peer_that_welcomes_within_the_peer_timeout_keeps_its_connection() -> None:
    """bob was only stopped: once he runs he reads what waits on the connection (the batches,
    then the Hellos sent after the loss) and welcomes alice. No redial is asked for, then or
    at the deadline the loss had set."""
    wire = Wire()
    wire.connect()
    wire.dialer.enqueue(msgs([1, 2, 3]))
    unread = wire.poll()  # bob is stopped: it all waits on the connection
    assert batches(unread)
    lost_at, during = lost(wire)
    unread += during
    drive_silently(wire, until=lost_at + PEER_TIMEOUT / 2)
    wire.exchange(unread)  # bob runs
    assert state(wire) is LinkState.READY
    assert sorted(m.seq for m in wire.store.values()) == [1, 2, 3]
    # Silent again, but not yet for a peer timeout past the old loss's redial deadline.
    drive_silently(wire, until=lost_at + 1.4 * PEER_TIMEOUT)
    assert state(wire) is LinkState.READY
    assert wire.of_type(RedialWanted) == []


def test_frames_heard_while_lost_put_the_redial_back() -> None:
    """bob works through the old connection's backlog while lost (his receipts come; the
    Hello waits behind the batches): the connection is read, so the redial waits a peer
    timeout from his last frame, not from the loss."""
    wire = Wire()
    wire.connect()
    wire.dialer.enqueue(msgs([1, 2, 3]))
    unread = wire.poll()
    lost_at, _ = lost(wire)
    wire.advance_to(lost_at + 0.8 * PEER_TIMEOUT)
    answers = wire.to_listener(unread)  # the batches only: the Hellos are still unread
    assert any(isinstance(f, ReceiptFrame) for f in answers)
    assert not any(isinstance(f, Welcome) for f in answers)
    wire.to_dialer(answers)
    assert state(wire) is LinkState.LOST
    heard_at = wire.now
    redial_polls(wire, until=lost_at + 10 * PEER_TIMEOUT)
    assert len(wire.of_type(RedialWanted)) == 1
    assert wire.now == pytest.approx(heard_at + PEER_TIMEOUT)


def test_each_loss_asks_for_its_own_redial() -> None:
    wire = Wire()
    wire.connect()
    lost(wire)
    frames = redial_polls(wire, until=wire.now + 10 * PEER_TIMEOUT)
    wire.exchange(frames)  # the new connection's Hello is welcomed
    assert state(wire) is LinkState.READY
    assert wire.of_type(PeerConnected)
    wire.events.clear()
    lost_at, _ = lost(wire)
    redial_polls(wire, until=lost_at + 10 * PEER_TIMEOUT)
    assert len(wire.of_type(RedialWanted)) == 1
    assert wire.now == pytest.approx(lost_at + PEER_TIMEOUT)
    assert PING_INTERVAL < PEER_TIMEOUT  # (Hellos went unanswered meanwhile)


def test_a_lost_probe_after_a_loss_is_answered_by_the_next_pong_and_nothing_stays_stuck() -> None:
    """bob took the batches (his commit slow: a Pong says they are pending), went silent and
    came back; his receipts were lost (sent on a connection gone) and the probe the Welcome
    sends was dropped (a DEALER at its high-water mark drops a Ping as any frame). A Pong to a
    later Ping says what the probe would have: nothing pending, so what is unreceipted goes
    again. Before, only the probe's own Pong could: the link stayed ready, Pings answered,
    with 6 of 10 messages unreceipted for good (the full suite's fault 04 once stuck so)."""
    wire = Wire()
    wire.connect()
    wire.dialer.enqueue(msgs(range(1, 11)))
    wire.to_listener(wire.poll(), commit=False)  # bob took them; his commit is slow
    wire.advance(PING_INTERVAL)
    wire.to_dialer(wire.to_listener(wire.poll(), commit=False))  # Pong: pending
    _, during = lost(wire)
    for arrived in [e for e in wire.listener_events if isinstance(e, MessagesArrived)]:
        wire.commit(arrived)  # bob commits; his receipts are lost
    hello = [f for f in during if isinstance(f, Hello)]
    probe = wire.to_dialer(wire.to_listener(hello))
    assert [type(f) for f in probe] == [Ping]  # dropped
    for _ in range(100):
        deadline = wire.dialer.next_timer()
        if deadline > wire.now + 10 * PEER_TIMEOUT:
            break
        wire.advance_to(max(deadline, wire.now))
        wire.exchange(wire.poll())
    assert wire.dialer.unacknowledged == 0
    assert sorted(m.seq for m in wire.store.values()) == list(range(1, 11))


def stopped_after_the_loss(wire: Wire, lost_at: float) -> float:
    """alice's process is stopped right after the loss, past the redial deadline: her next
    poll comes two peer timeouts after it. Returns when she wakes."""
    wire.advance_to(lost_at + 3 * PEER_TIMEOUT)
    return wire.now


def test_a_redial_deadline_polled_late_is_this_nodes_stall_and_the_connection_is_kept() -> None:
    """alice was stopped while her link was lost, and bob's Welcome to her Hello waits unread
    in her socket: the redial deadline passed while she was not running, not while her
    connection was silent. Her late poll is excused as her own stall (as a late silence or
    retransmission deadline is): no redial, which would discard the Welcome and everything
    queued behind it, but a Hello and a ping interval to hear bob. The old code redialled at
    once."""
    wire = Wire()
    wire.connect()
    lost_at, during = lost(wire)
    unread = wire.to_listener([f for f in during if isinstance(f, Hello)])
    assert any(isinstance(f, Welcome) for f in unread)
    stopped_after_the_loss(wire, lost_at)
    frames = wire.poll()
    assert wire.of_type(RedialWanted) == []
    assert [type(f) for f in frames] == [Hello]
    assert wire.dialer.stalls_excused == 1
    wire.to_dialer(unread)  # read once she runs: the connection was alive all along
    assert state(wire) is LinkState.READY
    drive_silently(wire, until=wire.now + PEER_TIMEOUT / 2)
    assert wire.of_type(RedialWanted) == []


def test_a_lost_link_still_silent_after_its_excused_stall_is_redialled_a_ping_interval_on() -> None:
    """Nothing waited: once she runs, alice's connection stays silent a ping interval more
    and is redialled then, once; its silence counts from the last frame heard."""
    wire = Wire()
    wire.connect()
    lost_at, _ = lost(wire)
    woke = stopped_after_the_loss(wire, lost_at)
    wire.poll()
    frames = redial_polls(wire, until=woke + 10 * PEER_TIMEOUT)
    [redial] = wire.of_type(RedialWanted)
    assert wire.now == pytest.approx(woke + PING_INTERVAL)
    assert [type(f) for f in frames] == [Hello]
    assert wire.dialer.last_heard is not None
    assert redial.silent_for_s == pytest.approx(wire.now - wire.dialer.last_heard)
    assert wire.dialer.stalls_excused == 1


def test_a_redial_deadline_is_excused_once_per_loss() -> None:
    """Stopped again before the excused deadline's ping interval is up, with still nothing
    heard: the second late poll redials (a peer gone for real costs at most one excuse)."""
    wire = Wire()
    wire.connect()
    lost_at, _ = lost(wire)
    woke = stopped_after_the_loss(wire, lost_at)
    wire.poll()
    wire.advance_to(woke + 3 * PEER_TIMEOUT)
    frames = wire.poll()
    assert len(wire.of_type(RedialWanted)) == 1
    assert [type(f) for f in frames] == [Hello]
    assert wire.dialer.stalls_excused == 1

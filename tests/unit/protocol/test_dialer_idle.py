"""Lazy links and idle close, in virtual time: a link with nothing to send has no connection,
sends nothing and arms no timer; pings only while something is pending or was just active."""

from __future__ import annotations

import math

from tests.unit.protocol.test_dialer import (
    PEER_TIMEOUT,
    PING_INTERVAL,
    Wire,
    batched_seqs,
    drive_silently,
    msgs,
    state,
)

from meshpost.protocol import (
    Batch,
    Close,
    Frame,
    Hello,
    LinkState,
    PeerConnected,
    PeerLeft,
    PeerLost,
    Ping,
    SessionState,
    Welcome,
)

IDLE_S = 60.0


def drive(wire: Wire, until: float) -> list[Frame]:
    """Poll at every timer the dialer asks for, on a perfect network (bob answers all);
    returns every frame the dialer sent."""
    sent: list[Frame] = []
    for _ in range(1_000):
        deadline = wire.dialer.next_timer()
        if deadline > until:
            return sent
        wire.advance_to(max(deadline, wire.now))
        frames = wire.poll()
        sent += frames
        wire.exchange(frames)
        assert wire.dialer.next_timer() > wire.now, "polling at next_timer() made no progress"
    raise AssertionError("timers never reached the horizon")


def no_disk_backlog(wire: Wire) -> None:
    """The store holds nothing for the peer (the node's first read comes back empty)."""
    request = wire.dialer.disk_request()
    assert request is not None
    wire.dialer.refill([])
    assert not wire.dialer.disk_backlog


def ready_and_quiet(wire: Wire) -> None:
    """Connected, one message sent and receipted, nothing left to send."""
    no_disk_backlog(wire)
    if state(wire) is LinkState.IDLE:
        wire.dialer.open(wire.now)
    wire.connect()
    wire.dialer.enqueue(msgs([1]))
    wire.exchange(wire.poll())
    assert wire.dialer.unacknowledged == 0
    wire.events.clear()


def test_a_lazy_link_has_no_connection_sends_nothing_and_arms_no_timer() -> None:
    wire = Wire(lazy=True, link_idle_s=IDLE_S)
    assert state(wire) is LinkState.IDLE
    assert not wire.dialer.needs_connection
    no_disk_backlog(wire)
    for _ in range(3):
        assert wire.poll() == []
        assert wire.dialer.next_timer() == math.inf
        wire.advance(1000.0)
    assert wire.events == []


def test_the_first_message_opens_a_lazy_link_with_a_hello_then_sends_it() -> None:
    wire = Wire(lazy=True, link_idle_s=IDLE_S)
    no_disk_backlog(wire)
    wire.dialer.enqueue(msgs([1, 2]))
    wire.dialer.pump(wire.now, wire.wall)
    assert state(wire) is LinkState.CONNECTING
    assert wire.dialer.needs_connection
    assert wire.dialer.next_timer() == wire.now  # the node polls at once: the Hello
    frames = wire.poll()
    assert [type(f) for f in frames] == [Hello]
    wire.exchange(frames)
    assert state(wire) is LinkState.READY
    assert sorted(m.seq for m in wire.store.values()) == [1, 2]
    assert wire.of_type(PeerConnected) == [PeerConnected("bob", "node-b")]


def test_messages_left_on_disk_by_an_earlier_run_open_a_lazy_link() -> None:
    wire = Wire(lazy=True, link_idle_s=IDLE_S)
    assert wire.dialer.wants_disk  # read once at start, connection or not
    assert wire.dialer.disk_request() == (0, 4096)
    wire.dialer.refill(msgs([1, 2, 3]))
    wire.dialer.pump(wire.now, wire.wall)
    assert state(wire) is LinkState.CONNECTING
    wire.exchange(wire.poll())
    assert sorted(m.seq for m in wire.store.values()) == [1, 2, 3]


def test_a_link_idles_out_after_link_idle_s_with_a_close_the_listener_forgets_silently() -> None:
    wire = Wire(link_idle_s=IDLE_S)
    ready_and_quiet(wire)
    last_activity = wire.now
    sent = drive(wire, until=last_activity + IDLE_S - 0.001)
    assert state(wire) is LinkState.READY
    assert Close() not in sent
    assert wire.dialer.next_timer() == last_activity + IDLE_S
    wire.advance_to(last_activity + IDLE_S)
    frames = wire.poll()
    assert frames == [Close()]
    assert state(wire) is LinkState.IDLE
    assert not wire.dialer.needs_connection  # the node closes the socket after the Close
    assert wire.dialer.next_timer() == math.inf
    assert wire.listener.session_state("alice") is SessionState.OPEN
    assert wire.to_listener(frames) == []  # no answer
    assert wire.listener.session_state("alice") is SessionState.NEW
    assert wire.listener.events() == []
    assert not any(isinstance(e, PeerLeft) for e in wire.listener_events)  # not gone, idle
    assert wire.of_type(PeerLost) == []


def test_a_closed_link_reopens_with_a_new_hello_on_the_next_message_and_loses_nothing() -> None:
    wire = Wire(link_idle_s=IDLE_S)
    ready_and_quiet(wire)
    wire.advance(IDLE_S)
    wire.to_listener(wire.poll())  # Close
    assert state(wire) is LinkState.IDLE
    wire.advance(500.0)
    assert wire.poll() == []
    wire.dialer.enqueue(msgs([2, 3]))
    wire.dialer.pump(wire.now, wire.wall)
    hello = wire.poll()
    assert [type(f) for f in hello] == [Hello]
    wire.exchange(hello)
    assert state(wire) is LinkState.READY
    assert sorted(m.seq for m in wire.store.values()) == [1, 2, 3]
    assert wire.dialer.unacknowledged == 0


def test_a_link_with_messages_in_flight_never_idles_out() -> None:
    wire = Wire(link_idle_s=5.0)
    no_disk_backlog(wire)
    wire.connect()
    wire.dialer.enqueue(msgs([1]))
    wire.poll()  # lost on the way
    sent = [f for frames in drive_silently(wire, until=100.0) for f in frames]
    assert Close() not in sent
    assert state(wire) is not LinkState.IDLE
    assert wire.dialer.unacknowledged == 1


def test_a_peer_that_never_answers_is_given_up_after_the_idle_period_if_nothing_waits() -> None:
    wire = Wire(lazy=True, link_idle_s=IDLE_S)
    no_disk_backlog(wire)
    wire.dialer.open(wire.now)
    sent = [f for frames in drive_silently(wire, until=2 * IDLE_S) for f in frames]
    assert {type(f) for f in sent} == {Hello}  # retried, never a Close (never welcomed)
    assert len(sent) == IDLE_S / PING_INTERVAL
    assert state(wire) is LinkState.IDLE
    assert wire.dialer.next_timer() == math.inf


def test_a_quiet_ready_link_pings_only_in_the_recent_window_then_sends_nothing() -> None:
    wire = Wire()  # never idles out: quiet costs nothing all the same
    ready_and_quiet(wire)
    active_at = wire.now
    sent = drive(wire, until=active_at + 1000.0)
    pings = [f for f in sent if isinstance(f, Ping)]
    assert 1 <= len(pings) <= PEER_TIMEOUT / PING_INTERVAL  # only within the recent window
    assert wire.dialer.next_timer() == math.inf
    assert state(wire) is LinkState.READY  # not lost: nobody expected an answer
    assert wire.of_type(PeerLost) == []
    wire.advance(1000.0)
    assert wire.poll() == []


def test_a_peer_that_dies_just_after_its_last_receipt_is_still_found_lost() -> None:
    wire = Wire()
    ready_and_quiet(wire)
    receipted_at = wire.now
    drive_silently(wire, until=receipted_at + PEER_TIMEOUT)
    [lost] = wire.of_type(PeerLost)
    assert lost.silent_for_s == PEER_TIMEOUT  # as soon as for a busy link
    assert state(wire) is LinkState.LOST


def test_after_a_quiet_spell_silence_counts_from_the_next_send_not_from_long_ago() -> None:
    wire = Wire()
    ready_and_quiet(wire)
    drive(wire, until=wire.now + 1000.0)  # quiet: last heard long ago
    wire.advance(1000.0)
    wire.dialer.enqueue(msgs([2]))
    sent_at = wire.now
    assert batched_seqs(wire.poll()) == [2]  # lost on the way
    assert wire.of_type(PeerLost) == []  # not lost at once for the old silence
    drive_silently(wire, until=sent_at + PEER_TIMEOUT - 0.001)
    assert state(wire) is LinkState.READY
    drive_silently(wire, until=sent_at + PEER_TIMEOUT)
    [lost] = wire.of_type(PeerLost)
    assert lost.silent_for_s == PEER_TIMEOUT


def test_a_busy_link_pings_while_it_waits_for_receipts() -> None:
    wire = Wire()
    ready_and_quiet(wire)
    drive(wire, until=wire.now + 100.0)
    wire.advance(100.0)
    wire.dialer.enqueue(msgs([2]))
    wire.poll()  # the batch is lost; bob answers pings, not that batch
    sent: list[Frame] = []
    for _ in range(8):
        wire.advance_to(wire.dialer.next_timer())
        frames = wire.poll()
        sent += frames
        wire.exchange([f for f in frames if not isinstance(f, Batch)])
    assert any(isinstance(f, Ping) for f in sent)
    assert state(wire) is LinkState.READY


def test_a_watched_link_keeps_pinging_and_stays_open_with_nothing_to_send() -> None:
    wire = Wire(link_idle_s=IDLE_S)
    ready_and_quiet(wire)
    wire.dialer.watched = True
    sent = drive(wire, until=wire.now + 3 * IDLE_S)
    assert len([f for f in sent if isinstance(f, Ping)]) >= 2 * IDLE_S / PING_INTERVAL
    assert state(wire) is LinkState.READY
    wire.dialer.watched = False
    sent = drive(wire, until=wire.now + 2 * IDLE_S)
    assert Close() in sent
    assert state(wire) is LinkState.IDLE


def test_an_idle_link_ignores_frames_as_stale() -> None:
    wire = Wire(lazy=True, link_idle_s=IDLE_S)
    welcome = Welcome(1, "node-b", "bob", 0, 0, "full")
    assert wire.to_dialer([welcome]) == []
    assert state(wire) is LinkState.IDLE
    assert wire.dialer.last_heard is None
    wire.dialer.peer_left(wire.now, "shutting down")  # nothing to stop
    assert state(wire) is LinkState.IDLE
    assert wire.events == []


def test_a_close_on_a_connection_without_a_session_changes_nothing() -> None:
    wire = Wire()
    assert wire.to_listener([Close()]) == []
    assert wire.listener.session_state("alice") is SessionState.NEW
    assert wire.listener.events() == []


def test_a_link_needs_a_connection_in_every_state_but_idle() -> None:
    """`Links._perform` reads `state is not IDLE` instead of `needs_connection` (a property
    call after every frame in or out): the two must stay the same."""
    wire = Wire(link_idle_s=IDLE_S, lazy=True)
    for each in LinkState:
        wire.dialer.state = each
        assert wire.dialer.needs_connection is (each is not LinkState.IDLE)

"""`DialerLink.probe`, in virtual time: a sign of life asked of the peer now, whatever the
link's state (what `meshpost peers --probe` does for a quiet or idle link)."""

from __future__ import annotations

import pytest
from tests.unit.protocol.test_dialer import PING_INTERVAL, Wire, msgs, state
from tests.unit.protocol.test_dialer_idle import IDLE_S, no_disk_backlog

from meshpost.protocol import Hello, LinkState, Ping


def test_probing_an_idle_link_dials_and_the_welcome_answers_with_its_round_trip() -> None:
    wire = Wire(lazy=True, link_idle_s=IDLE_S)
    no_disk_backlog(wire)
    assert state(wire) is LinkState.IDLE
    assert wire.poll() == []
    wire.advance(10.0)
    asked_at = wire.now
    wire.dialer.probe(asked_at)
    assert wire.dialer.next_timer() == asked_at
    [hello] = wire.poll()
    assert isinstance(hello, Hello)
    wire.advance(0.25)
    wire.to_dialer(wire.to_listener([hello]))
    assert state(wire) is LinkState.READY
    answered_at = wire.dialer.last_answer_at
    assert answered_at is not None
    assert answered_at >= asked_at
    assert wire.dialer.last_answer_rtt_s == pytest.approx(0.25)


def test_probing_a_ready_link_pings_at_once_however_recently_it_heard_the_peer() -> None:
    wire = Wire()
    wire.connect()
    wire.dialer.enqueue(msgs([1]))
    wire.exchange(wire.poll())  # heard just now: no Ping would be due for a ping interval
    wire.advance(PING_INTERVAL / 10)
    asked_at = wire.now
    wire.dialer.probe(asked_at)
    frames = wire.poll()
    assert [type(f) for f in frames] == [Ping]
    wire.advance(0.002)
    wire.to_dialer(wire.to_listener(frames))
    assert wire.dialer.last_answer_at == wire.now
    assert wire.dialer.last_answer_rtt_s == pytest.approx(0.002)


def test_a_dead_peer_answers_no_probe() -> None:
    wire = Wire(lazy=True, link_idle_s=IDLE_S)
    no_disk_backlog(wire)
    asked_at = wire.now
    wire.dialer.probe(asked_at)
    assert isinstance(wire.poll()[0], Hello)  # nobody answers
    wire.advance(PING_INTERVAL)
    assert [type(f) for f in wire.poll()] == [Hello]
    assert wire.dialer.last_answer_at is None
    assert state(wire) is LinkState.CONNECTING


def test_probing_a_link_saying_hello_says_it_now() -> None:
    wire = Wire()
    wire.poll()  # the first Hello, unanswered
    wire.advance(PING_INTERVAL / 4)
    assert wire.poll() == []
    wire.dialer.probe(wire.now)
    assert [type(f) for f in wire.poll()] == [Hello]

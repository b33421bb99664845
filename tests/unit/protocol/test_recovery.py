"""The loss recovery of one link on its own (protocol/recovery.py): its timer, redial and
stall rules as the link drives them. The behaviour through the link, in virtual time, is in
test_dialer_rto.py, test_dialer_probe.py, test_dialer_stall.py, test_dialer_starved.py and
test_dialer_redial.py."""

from __future__ import annotations

import math

import pytest

from meshpost.protocol import LossRecovery, Ping, RedialWanted
from meshpost.protocol.dialer import DialerLink
from meshpost.protocol.recovery import STALL_GRACE

RTO = 0.5
PING_INTERVAL = 1.0
PEER_TIMEOUT = 3.0


def recovery() -> tuple[DialerLink, LossRecovery]:
    link = DialerLink(local_name="alice", local_node_id="node-a", peer="bob", window=64,
                      window_bytes=1 << 20, retransmit_initial_s=RTO, retransmit_max_s=5.0,
                      ping_interval_s=PING_INTERVAL, peer_timeout_s=PEER_TIMEOUT)
    return link, link._recovery


def test_a_loss_stops_the_timer_and_sets_the_redial_a_peer_timeout_on() -> None:
    link, rec = recovery()
    rec.rto_deadline = 1.0 + RTO
    rec.lost(2.0)
    assert rec.rto_deadline is None
    assert rec.redial_at(True) == 2.0 + PEER_TIMEOUT
    assert rec.redial_at(False) == math.inf  # no longer lost: never
    due = 2.0 + PEER_TIMEOUT
    assert not rec.redial(due, False, due)
    assert not rec.redial(due - 0.01, True, due - 0.01)
    assert rec.redial(due, True, due)  # polled on time (`seen`: this node ran meanwhile)
    [wanted] = link.events()
    assert wanted == RedialWanted("bob", PEER_TIMEOUT)
    assert not rec.redial(10.0, True, 10.0)  # once per loss
    assert rec.redial_at(True) == math.inf


def test_a_frame_heard_while_lost_puts_the_redial_back_and_one_after_cancels_it() -> None:
    _, rec = recovery()
    assert not rec.wants_heard  # nothing a frame would change: the link need not tell
    rec.lost(2.0)
    assert rec.wants_heard
    rec.heard(3.0, True)
    assert rec.redial_at(True) == 3.0 + PEER_TIMEOUT
    assert rec.wants_heard
    rec.heard(4.0, False)  # welcomed
    assert rec.redial_at(True) == math.inf
    assert not rec.wants_heard


def test_a_late_silence_deadline_is_excused_once_with_a_ping_first() -> None:
    link, rec = recovery()
    late = 5.0 + 2 * STALL_GRACE * PING_INTERVAL
    assert not rec.excuse_own_stall(5.0 + STALL_GRACE * PING_INTERVAL, 5.0, 1)  # in time
    assert rec.excuse_own_stall(late, 5.0, 7)
    assert rec.stalls_excused == 1
    assert link.frames_to_send() == [Ping(sent_at_ns=7)]
    assert not rec.excuse_own_stall(late + 10, 5.0, 8)  # once, until a frame is heard
    assert rec.wants_heard
    rec.heard(late + 11, False)
    assert not rec.wants_heard
    assert rec.excuse_own_stall(late + 20, 5.0, 9)
    assert rec.stalls_excused == 2


def test_a_redial_deadline_polled_late_is_excused_once_per_loss() -> None:
    link, rec = recovery()
    rec.lost(2.0)
    due = 2.0 + PEER_TIMEOUT
    late = due + 2 * STALL_GRACE * PING_INTERVAL
    assert not rec.redial(late, True, 2.0)  # nothing ran since the loss: this node's stall
    assert rec.stalls_excused == 1
    assert rec.redial_at(True) == late + PING_INTERVAL
    assert not rec.redial(late + PING_INTERVAL - 0.01, True, late)
    rec.lost(20.0)  # a new loss may be excused again
    assert not rec.redial(40.0, True, 20.0)
    assert rec.stalls_excused == 2
    assert rec.redial(40.0 + PING_INTERVAL, True, 40.0)  # on time: redialled
    assert [type(e) for e in link.events()] == [RedialWanted]


@pytest.mark.parametrize("hellos", [0, 1, 2])
def test_a_welcome_answering_a_lone_hello_is_a_path_sample(hellos: int) -> None:
    _, rec = recovery()
    assert not rec.welcomed(True, False, hellos, 0.25, 1.0, 1)  # nothing in flight: no probe
    assert rec.answers == (1 if hellos == 1 else 0)
    assert rec.path_srtt_s == (0.25 if hellos == 1 else None)
    assert rec.rto_deadline is None

"""A session evicted past MAX_SESSIONS_PER_PEER while its batches are still being stored: their
answers still reach the session that superseded it, and its Pongs count them, so nothing it
took is left unreceipted for good (docs/protocol.md 10 and 11)."""

from __future__ import annotations

from tests.unit.protocol.test_dialer import PEER_TIMEOUT, Wire, msgs
from tests.unit.protocol.test_listener import (
    WALL,
    connected,
    connected_with_token,
    pong,
    resumed,
    send,
    stored,
    taken_on,
)

from meshpost.protocol import (
    Batch,
    Frame,
    Hello,
    LinkState,
    MessagesArrived,
    MessagesDelivered,
    Ping,
    ReceiptFrame,
    RedialWanted,
    Refuse,
    RefuseCode,
    encode,
)
from meshpost.protocol.listener import MAX_SESSIONS_PER_PEER, Listener


def redial(listener: Listener, token: bytes, *connections: str) -> bytes:
    """alice says Hello again (same name, same node id) on each new connection in turn,
    each carrying the resume token of the Welcome before; returns the last Welcome's."""
    for connection in connections:
        token = resumed(listener, connection, token)
    listener.events()
    return token


def evicted_with_a_batch() -> tuple[Listener, MessagesArrived, str, bytes]:
    """alice's connection "alice" took batch 1, then alice redialled until that session was
    the least recently active one past MAX_SESSIONS_PER_PEER: evicted, its batch not stored.
    Also returns the newest connection and its session's resume token."""
    listener, token = connected_with_token()
    [arrived] = taken_on(listener, "alice", 1)
    connections = [f"c{i}" for i in range(2, MAX_SESSIONS_PER_PEER + 2)]
    token = redial(listener, token, *connections)
    assert listener.session_peer("alice") is None  # evicted: its connection is NEW again
    return listener, arrived, connections[-1], token


def receipt_for(listener: Listener, arrived: MessagesArrived) -> ReceiptFrame:
    [receipt] = stored(listener, arrived, committed=[m.seq for m in arrived.messages],
                       conflicts=[], stored_at_ns=1, replied_at_ns=2, hlc=3)
    assert isinstance(receipt, ReceiptFrame)  # on the evicted connection, as before
    return receipt


def test_an_evicted_sessions_pending_batch_counts_in_its_successors_pongs() -> None:
    """Before: 0, the evicted session forgotten, though its batch was still being stored."""
    listener, _arrived, newest, _token = evicted_with_a_batch()
    assert pong(send(listener, Ping(WALL), identity=newest)).pending == 1


def test_an_evicted_sessions_receipt_is_forwarded_to_its_successor() -> None:
    """Before: the receipt went only to the evicted (closed) connection, and the sender
    learnt of it only by resending, if at all."""
    listener, arrived, newest, _token = evicted_with_a_batch()
    receipt = receipt_for(listener, arrived)
    frames = send(listener, Ping(WALL), identity=newest)
    assert frames[:-1] == [receipt]  # ahead of the Pong
    assert pong(frames).pending == 0
    # Answered: the evicted session is gone for good, and nothing is forwarded twice.
    assert send(listener, Ping(WALL), identity=newest)[:-1] == []
    assert "alice" not in repr(listener)


def test_a_later_redial_takes_over_what_an_evicted_session_still_waits_for() -> None:
    listener, arrived, _newest, token = evicted_with_a_batch()
    redial(listener, token, "c-last")  # superseding the sessions kept and the evicted one
    assert pong(send(listener, Ping(WALL), identity="c-last")).pending == 1
    receipt = receipt_for(listener, arrived)
    assert send(listener, Ping(WALL), identity="c-last")[:-1] == [receipt]


def test_an_evicted_connection_that_says_hello_again_keeps_its_pending_batch() -> None:
    listener, arrived, _newest, _token = evicted_with_a_batch()
    [refused] = send(listener, Batch(WALL, []), identity="alice")  # a session is needed
    assert isinstance(refused, Refuse)
    assert refused.code == RefuseCode.HELLO_REQUIRED
    redial(listener, b"", "alice")  # the same node again on that connection
    assert pong(send(listener, Ping(WALL), identity="alice")).pending == 1
    receipt_for(listener, arrived)
    assert pong(send(listener, Ping(WALL), identity="alice")).pending == 0


def test_an_evicted_session_of_another_node_id_is_answered_on_its_own_connection_only() -> None:
    listener = connected()
    [arrived] = taken_on(listener, "alice", 1)
    later = WALL + 5 + 40_000_000_000  # alice silent long enough for another node id
    for i in range(MAX_SESSIONS_PER_PEER):
        other = Hello(1, "node-other", "alice", WALL, 1)
        send(listener, other, identity=f"o{i}", wall_ns=later)
    listener.events()
    assert listener.session_peer("alice") is None
    receipt_for(listener, arrived)  # to the connection it came on, as before
    frames = send(listener, Ping(WALL), identity=f"o{MAX_SESSIONS_PER_PEER - 1}", wall_ns=later)
    assert [type(f).__name__ for f in frames] == ["Pong"]
    assert pong(frames).pending == 0


# -- end to end, in virtual time: alice's DialerLink redials bob's Listener -------------------


class Redials:
    """alice's link to bob over connections k0, k1, ...: a new one at each `RedialWanted`, as
    the node's `transport.redial` makes one. bob reads every frame; while `deaf`, his answers
    are lost (his ROUTER dropping them), and answers to an old connection always are."""

    def __init__(self) -> None:
        self.wire = Wire()
        self.connection = "k0"
        self.redials = 0
        self.deaf = False
        self.held: list[MessagesArrived] = []  # taken by bob, being stored (not yet)
        self.storing = True

    def to_bob(self, frames: list[Frame]) -> None:
        wire = self.wire
        for frame in frames:
            wire.listener.receive(self.connection, encode(frame), wire.bob_wall, 0)
            for event in wire.listener.events():
                if isinstance(event, MessagesArrived):
                    self.held.append(event)
        if not self.storing:
            for arrived in self.held:
                committed = [m.seq for m in arrived.messages
                             if wire.store.setdefault(m.id, m) == m]
                wire.listener.stored(arrived, committed=committed, conflicts=[],
                                     stored_at_ns=wire.bob_wall, replied_at_ns=wire.bob_wall,
                                     hlc=0)
            self.held = []
        answers = [f for to, f in wire.listener.frames_to_send()
                   if to == self.connection and not self.deaf]
        if answers:
            self.to_bob(wire.to_dialer(answers))

    def run(self, until: float, redials: int | None = None) -> None:
        """Poll alice's link at every timer until `until` (or until she redialled `redials`
        times), each poll's frames sent to bob. A redial's new connection is heard at once
        (its Welcome and probe answered), then bob is deaf again, so she is lost again."""
        wire = self.wire
        while (deadline := wire.dialer.next_timer()) <= until and self.redials != redials:
            wire.advance_to(max(deadline, wire.now))
            frames = wire.poll()
            if wire.of_type(RedialWanted)[self.redials:]:
                self.redials += 1
                self.connection = f"k{self.redials}"
                deaf, self.deaf = self.deaf, False
                self.to_bob(frames)
                self.deaf = deaf
                assert wire.dialer.state is LinkState.READY
            else:
                self.to_bob(frames)


def test_a_receipt_to_an_evicted_session_reaches_the_dialer_without_a_resend() -> None:
    """bob takes alice's batch on k0 and stores it slowly; meanwhile his answers are lost
    (but to each new connection's first frames) long enough for alice to redial four times
    (k0 evicted at k4's Hello). His store then commits the batch: the receipt goes to k0,
    closed. Once his answers get through again, alice has the receipt, forwarded on k4, and
    resends nothing. (Before, k4's Pong said nothing was pending, and alice resent the
    batch, which bob stored again as duplicates; the forwarded receipt never came.)"""
    link = Redials()
    link.to_bob(link.wire.poll())  # Hello on k0, welcomed
    assert link.wire.dialer.state is LinkState.READY
    link.wire.dialer.enqueue(msgs([1, 2, 3]))
    link.deaf = True
    link.to_bob(link.wire.poll())
    assert [m.seq for a in link.held for m in a.messages] == [1, 2, 3]
    link.run(until=link.wire.now + 40 * PEER_TIMEOUT, redials=MAX_SESSIONS_PER_PEER)
    assert link.redials == MAX_SESSIONS_PER_PEER
    assert link.wire.listener.session_peer("k0") is None  # evicted
    # (Alice resent the batch's messages at her timeouts while bob was deaf the first time,
    # on k0 too: all of it waits in bob's store queue.)
    resent = link.wire.dialer.retransmissions
    link.storing = False  # bob's store commits the batch: its receipts are for k0
    link.to_bob([])
    assert sorted(m.seq for m in link.wire.store.values()) == [1, 2, 3]
    link.deaf = False
    link.run(until=link.wire.now + 20 * PEER_TIMEOUT)
    delivered = sorted(s for d in link.wire.of_type(MessagesDelivered) for s in d.seqs)
    assert delivered == [1, 2, 3]
    assert link.wire.dialer.retransmissions == resent  # nothing more
    assert link.wire.dialer.state is LinkState.READY

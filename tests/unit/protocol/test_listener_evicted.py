"""A session evicted past MAX_SESSIONS_PER_PEER while its batches are still being stored: their
answers still reach the session that superseded it, and its Pongs count them, so nothing it
took is left unreceipted for good (docs/protocol.md 10 and 11)."""

from __future__ import annotations

from tests.unit.protocol.test_listener import (
    WALL,
    connected,
    hello,
    pong,
    send,
    stored,
    taken_on,
)

from meshpost.protocol import (
    Batch,
    Hello,
    MessagesArrived,
    Ping,
    ReceiptFrame,
    Refuse,
    RefuseCode,
)
from meshpost.protocol.listener import MAX_SESSIONS_PER_PEER, Listener


def redial(listener: Listener, *connections: str) -> None:
    """alice says Hello again (same name, same node id) on each new connection in turn."""
    for connection in connections:
        send(listener, hello(), identity=connection)
    listener.events()


def evicted_with_a_batch() -> tuple[Listener, MessagesArrived, str]:
    """alice's connection "alice" took batch 1, then alice redialled until that session was
    the least recently active one past MAX_SESSIONS_PER_PEER: evicted, its batch not stored."""
    listener = connected()
    [arrived] = taken_on(listener, "alice", 1)
    connections = [f"c{i}" for i in range(2, MAX_SESSIONS_PER_PEER + 2)]
    redial(listener, *connections)
    assert listener.session_peer("alice") is None  # evicted: its connection is NEW again
    return listener, arrived, connections[-1]


def receipt_for(listener: Listener, arrived: MessagesArrived) -> ReceiptFrame:
    [receipt] = stored(listener, arrived, committed=[m.seq for m in arrived.messages],
                       conflicts=[], stored_at_ns=1, replied_at_ns=2, hlc=3)
    assert isinstance(receipt, ReceiptFrame)  # on the evicted connection, as before
    return receipt


def test_an_evicted_sessions_pending_batch_counts_in_its_successors_pongs() -> None:
    """Before: 0, the evicted session forgotten, though its batch was still being stored."""
    listener, _arrived, newest = evicted_with_a_batch()
    assert pong(send(listener, Ping(WALL), identity=newest)).pending == 1


def test_an_evicted_sessions_receipt_is_forwarded_to_its_successor() -> None:
    """Before: the receipt went only to the evicted (closed) connection, and the sender
    learnt of it only by resending, if at all."""
    listener, arrived, newest = evicted_with_a_batch()
    receipt = receipt_for(listener, arrived)
    frames = send(listener, Ping(WALL), identity=newest)
    assert frames[:-1] == [receipt]  # ahead of the Pong
    assert pong(frames).pending == 0
    # Answered: the evicted session is gone for good, and nothing is forwarded twice.
    assert send(listener, Ping(WALL), identity=newest)[:-1] == []
    assert "alice" not in repr(listener)


def test_a_later_redial_takes_over_what_an_evicted_session_still_waits_for() -> None:
    listener, arrived, _newest = evicted_with_a_batch()
    redial(listener, "c-last")  # superseding the sessions kept and the evicted one
    assert pong(send(listener, Ping(WALL), identity="c-last")).pending == 1
    receipt = receipt_for(listener, arrived)
    assert send(listener, Ping(WALL), identity="c-last")[:-1] == [receipt]


def test_an_evicted_connection_that_says_hello_again_keeps_its_pending_batch() -> None:
    listener, arrived, _newest = evicted_with_a_batch()
    [refused] = send(listener, Batch(WALL, []), identity="alice")  # a session is needed
    assert isinstance(refused, Refuse)
    assert refused.code == RefuseCode.HELLO_REQUIRED
    redial(listener, "alice")  # the same node again on that connection
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

"""A redial continues a session only with its resume token (docs/protocol.md 10 and 11).

Without keys, a name and a node id are claims anyone can copy (every Hello shows a node id).
Before resume tokens, a stranger's Hello as alice (alice's node id, its own connection) was
superseded by alice's next redial: the receipts bob sent the stranger were forwarded to
alice's new connection, where they settled alice's own messages under the same seqs, which
bob never stored (loss reported as delivery), and the stranger's pending batches counted in
alice's Pongs. Now only a Hello carrying the token of a session's Welcome (sent on that
session's connection alone) takes over what that session is owed."""

from __future__ import annotations

from tests.unit.protocol.test_dialer import msgs
from tests.unit.protocol.test_dialer_starved import RedialWire, found_lost
from tests.unit.protocol.test_listener import (
    WALL,
    connected_with_token,
    hello,
    pong,
    resumed,
    send,
    stored,
    taken_on,
)

from meshpost.protocol import (
    PROTOCOL_VERSION,
    Batch,
    Envelope,
    Frame,
    Hello,
    LinkState,
    MessagesArrived,
    MessagesDelivered,
    Ping,
    Pong,
    ReceiptFrame,
    Welcome,
    encode,
)


def forged(seq: int) -> Envelope:
    """The stranger's own message under alice's name, at a seq alice has in flight."""
    return Envelope(f"forged-{seq}", seq, "alice", "bob", "not alice's", WALL, seq)


def stranger_says(wire: RedialWire, frame: Frame) -> list[Frame]:
    """The stranger's frame on its own connection "x" to bob: bob's answers on "x"."""
    wire.listener.receive("x", encode(frame), wire.bob_wall, 0)
    return [f for to, f in wire.listener.frames_to_send() if to == "x"]


def arrived_on(wire: RedialWire, connection: str) -> list[MessagesArrived]:
    return [e for e in wire.listener.events()
            if isinstance(e, MessagesArrived) and e.connection == connection]


def delivered(wire: RedialWire) -> list[int]:
    return sorted(s for d in wire.of_type(MessagesDelivered) for s in d.seqs)


def test_a_strangers_receipt_never_settles_a_redialled_peers_messages() -> None:
    """alice (a real DialerLink) sends 1-3, lost on the way; a stranger said Hello as alice,
    alice's node id, on connection x. alice finds bob lost and redials (k: conn-2). The
    stranger sends its own messages at seqs 1-3, bob stores and receipts them on x. Before:
    that receipt was forwarded to conn-2 and alice marked her 1-3 delivered, though bob never
    stored them. Now: nothing reaches alice from x; her 1-3 stay in flight until her own
    copies are stored, then each is stored and delivered."""
    wire = RedialWire()
    wire.connect()
    [welcome] = stranger_says(wire, Hello(PROTOCOL_VERSION, "node-a", "alice", WALL, 0))
    assert isinstance(welcome, Welcome)  # a name rule lets it in: same node id, no key
    wire.listener.events()
    wire.dialer.enqueue(msgs([1, 2, 3]))
    wire.poll()  # alice's batch: lost on the way, bob never reads it
    during = found_lost(wire)
    wire.redial()
    hello = [f for f in during if isinstance(f, Hello)][-1]
    assert hello.resume  # the token of her last Welcome
    probe = wire.to_dialer(wire.to_listener([hello]))
    assert wire.dialer.state is LinkState.READY
    assert [type(f) for f in probe] == [Ping]

    # The stranger's batch at alice's in-flight seqs, stored and receipted on x.
    assert stranger_says(wire, Batch(WALL, [forged(s) for s in (1, 2, 3)])) == []
    [forged_batch] = arrived_on(wire, "x")
    wire.store.update((m.id, m) for m in forged_batch.messages)
    wire.listener.stored(forged_batch, committed=[1, 2, 3], conflicts=[],
                         stored_at_ns=wire.bob_wall, replied_at_ns=wire.bob_wall, hlc=0)
    [receipt] = [f for to, f in wire.listener.frames_to_send() if to == "x"]
    assert isinstance(receipt, ReceiptFrame)

    # alice's probe on conn-2: bob's answer carries nothing of x's (before: x's receipt,
    # forwarded ahead of the Pong).
    answers = wire.to_listener(probe)
    after = wire.to_dialer(answers)
    assert delivered(wire) == []  # before: [1, 2, 3], none of them in bob's store
    assert wire.dialer.unacknowledged == 3
    assert [type(f) for f in answers] == [Pong]
    # The rest runs on a perfect wire: her own copies go again, are stored and settle.
    wire.exchange(after)
    assert wire.dialer.unacknowledged == 0
    assert delivered(wire) == [1, 2, 3]
    # bob holds the stranger's three and alice's own three, hers with her bodies.
    assert sorted(wire.store) == [*(f"forged-{s}" for s in (1, 2, 3)),
                                  *(f"id-alice-{s}" for s in (1, 2, 3))]
    assert all(wire.store[f"id-alice-{s}"].body == "hello" for s in (1, 2, 3))


def test_a_pong_never_counts_a_strangers_pending_batches() -> None:
    """Before: alice's redialled session superseded the stranger's (same name and node id),
    and her Pong said 1 pending, so she waited for a receipt that was never hers."""
    listener, token = connected_with_token()  # alice on connection "alice"
    send(listener, hello(), identity="x")  # the stranger: alice's name and node id, no token
    taken_on(listener, "x", 1)
    resumed(listener, "c2", token)  # alice redials with her token
    assert pong(send(listener, Ping(WALL), identity="c2")).pending == 0


def test_a_hello_without_the_token_gets_nothing_of_the_other_sessions() -> None:
    """A Hello of alice's name and node id with no token, or a wrong one, is welcomed (the
    name rules let it in) but takes over nothing: alice's own session keeps its answers."""
    for token in (b"", b"\x00" * 8, b"guessed!"):
        listener, real = connected_with_token()
        [first] = taken_on(listener, "alice", 1)
        [welcome] = send(listener, hello(resume=token), identity="x")
        assert isinstance(welcome, Welcome)
        assert welcome.resume not in (b"", real)  # a token of its own
        assert pong(send(listener, Ping(WALL), identity="x")).pending == 0
        [receipt] = stored(listener, first, committed=[1], conflicts=[], stored_at_ns=1,
                           replied_at_ns=2, hlc=3)  # on alice's connection
        assert isinstance(receipt, ReceiptFrame)
        assert [type(f) for f in send(listener, Ping(WALL), identity="x")] == [Pong]


def test_a_redial_with_an_older_token_still_continues_its_chain() -> None:
    """alice redialled on c2 (her token from "alice") but c2's Welcome was lost: her next
    redial, on c3, carries the same older token. It continues both "alice" and c2 (c2 proved
    that token too): their answers and pending batches are c3's."""
    listener, token = connected_with_token()
    [first] = taken_on(listener, "alice", 1)
    resumed(listener, "c2", token)  # this Welcome never reached alice
    [second] = taken_on(listener, "c2", 2)
    resumed(listener, "c3", token)
    assert pong(send(listener, Ping(WALL), identity="c3")).pending == 2
    stored(listener, first, committed=[1], conflicts=[], stored_at_ns=1, replied_at_ns=2, hlc=3)
    stored(listener, second, committed=[2], conflicts=[], stored_at_ns=1, replied_at_ns=2, hlc=3)
    frames = send(listener, Ping(WALL), identity="c3")
    assert [r.ranges for r in frames if isinstance(r, ReceiptFrame)] == [[(1, 1)], [(2, 2)]]
    assert pong(frames).pending == 0

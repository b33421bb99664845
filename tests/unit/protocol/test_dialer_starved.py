"""A *receiver* starved of CPU (stopped most of the time), in virtual time: it reads and
answers nothing for longer than the peer timeout, so the dialer finds it lost and redials it
(a new connection: a new session at the listener), again and again. Nothing it was sent is
lost on the way, it is only unread or not yet stored: the dialer must not send the window again
into its silence, nor after each Welcome (a retransmission storm, issue 20 item 5), and the
listener's answers sent on the connection the dialer closed must reach the new one."""

from __future__ import annotations

from collections.abc import Iterable

from tests.unit.protocol.test_dialer import (
    PEER_TIMEOUT,
    PING_INTERVAL,
    Wire,
    batched_seqs,
    batches,
    drive_silently,
    msgs,
    state,
)

from meshpost.protocol import (
    Batch,
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
from meshpost.protocol.dialer import LOSS_WINDOW

#: Messages in flight when the receiver stops: many batches' worth, far over the loss window.
IN_FLIGHT = 40


class RedialWire(Wire):
    """A Wire whose dialer talks to bob on a connection of its own, which the node replaces
    (a new routing id at bob's ROUTER) each time the link finds bob lost, as `Links` does
    with `transport.redial`. bob's answers for a connection alice closed are lost."""

    def __init__(self) -> None:
        super().__init__()
        self.connection = "conn-1"
        self.redials = 0

    def redial(self) -> None:
        self.redials += 1
        self.connection = f"conn-{self.redials + 1}"

    def to_listener(self, frames: Iterable[Frame], *, commit: bool = True) -> list[Frame]:
        replies: list[Frame] = []
        for frame in frames:
            self.listener.receive(self.connection, encode(frame), self.bob_wall, 0)
            replies += self.answers_on(self.connection)
            for event in self.listener.events():
                self.listener_events.append(event)
                if commit and isinstance(event, MessagesArrived):
                    replies += self.commit(event)
        return replies

    def answers_on(self, connection: str) -> list[Frame]:
        """bob's queued answers; those for another connection are lost (it was closed)."""
        return [frame for to, frame in self.listener.frames_to_send() if to == connection]

    def commit(self, arrived: MessagesArrived) -> list[Frame]:
        committed = []
        for m in arrived.messages:
            self.store.setdefault(m.id, m)
            committed.append(m.seq)
        self.listener.stored(arrived, committed=committed, conflicts=[],
                             stored_at_ns=self.bob_wall, replied_at_ns=self.bob_wall, hlc=0)
        return self.answers_on(self.connection)


def sent_batches(wire: RedialWire, count: int) -> list[Batch]:
    """alice sends `count` messages, one batch of one message each poll."""
    out: list[Batch] = []
    for seq in range(1, count + 1):
        wire.dialer.enqueue(msgs([seq]))
        out += batches(wire.poll())
    return out


def found_lost(wire: RedialWire) -> list[Frame]:
    """Run alice's timers with bob silent until she finds him lost. Returns every frame she
    sent meanwhile (all of it unread by bob); the node redials next (`wire.redial()`)."""
    sent = drive_silently(wire, until=wire.now + PEER_TIMEOUT + 0.01)
    assert state(wire) is LinkState.LOST
    return [f for frames in sent for f in frames]


def lost_and_redialled(wire: RedialWire) -> list[Frame]:
    """`found_lost`, then the redial."""
    during = found_lost(wire)
    wire.redial()
    return during


def test_a_silent_receiver_is_probed_then_sent_only_the_loss_window_not_the_window() -> None:
    """bob holds 40 unread batches and answers nothing: alice's timeouts probe, then resend
    at most LOSS_WINDOW messages each (the old code resent all 40 at every timeout after the
    probe: 80 copies before bob was even found lost)."""
    wire = RedialWire()
    wire.connect()
    sent_batches(wire, IN_FLIGHT)  # read by nobody: bob is stopped
    during = lost_and_redialled(wire)
    resends = [m.seq for f in during if isinstance(f, Batch) for m in f.messages]
    assert any(isinstance(f, Ping) for f in during)
    assert len(resends) <= 2 * LOSS_WINDOW
    assert resends == sorted(resends)[: len(resends)]
    assert set(resends) <= set(range(1, LOSS_WINDOW + 1))  # the oldest first
    assert wire.dialer.retransmissions == len(resends)


def test_after_a_loss_the_welcome_probes_and_bob_storing_the_old_batches_gets_no_copies() -> None:
    """bob took the batches (on the connection alice has since closed) and is storing them
    when her new connection's Hello and probe come: the Pong counts the old session's
    pending batches, so nothing is resent; the receipts he sends to the closed connection
    are forwarded to the new one with his next answer, and settle everything."""
    wire = RedialWire()
    wire.connect()
    sent = sent_batches(wire, IN_FLIGHT)
    wire.to_listener(sent, commit=False)  # bob took them all; his commit is slow
    arrived = [e for e in wire.listener_events if isinstance(e, MessagesArrived)]
    assert len(arrived) == IN_FLIGHT
    during = lost_and_redialled(wire)
    hello = [f for f in during if isinstance(f, Hello)][-1]
    before = wire.dialer.retransmissions
    welcome = wire.to_listener([hello])
    assert [type(f) for f in welcome] == [Welcome]
    probe = wire.to_dialer(welcome)
    assert [type(f) for f in probe] == [Ping]  # asks; the old code resent all 40 here
    [pong] = wire.to_listener(probe)
    assert isinstance(pong, Pong)
    assert pong.pending == IN_FLIGHT  # the old connection's batches, still being stored
    assert batches(wire.to_dialer([pong])) == []
    for a in arrived:  # bob commits; his receipts go to the closed connection
        assert wire.commit(a) == []
    # The next frame on the new connection (a probe of alice's timer) brings them.
    frames: list[Frame] = []
    while not any(isinstance(f, Ping) for f in frames):
        wire.advance_to(wire.dialer.next_timer())
        frames = wire.poll()
    answers = wire.to_listener([f for f in frames if isinstance(f, Ping)])
    assert [type(f) for f in answers] == [ReceiptFrame] * IN_FLIGHT + [Pong]
    wire.to_dialer(answers)
    delivered = sorted(s for e in wire.of_type(MessagesDelivered) for s in e.seqs)
    assert delivered == list(range(1, IN_FLIGHT + 1))
    assert wire.dialer.unacknowledged == 0
    assert wire.dialer.retransmissions == before
    assert len(wire.store) == IN_FLIGHT


def test_after_a_loss_what_never_reached_bob_goes_once_when_his_pong_says_nothing_pends() -> None:
    """The batches were lost with alice's closed connection (they never left her socket):
    the probe's Pong says bob has nothing of hers pending, a second probe sent at once says
    so again (had a frame still waited on the old connection, bob would have read it in
    between), and everything unreceipted from before it goes again at once, once."""
    wire = RedialWire()
    wire.connect()
    sent_batches(wire, IN_FLIGHT)  # dropped with the old connection
    during = lost_and_redialled(wire)
    hello = [f for f in during if isinstance(f, Hello)][-1]
    before = wire.dialer.retransmissions
    probe = wire.to_dialer(wire.to_listener([hello]))
    confirm = wire.to_dialer(wire.to_listener(probe))
    assert [type(f) for f in confirm] == [Ping]
    resent = wire.to_dialer(wire.to_listener(confirm))
    assert sorted(batched_seqs(resent)) == list(range(1, IN_FLIGHT + 1))
    assert wire.dialer.retransmissions - before == IN_FLIGHT
    wire.to_dialer(wire.to_listener(resent))
    assert wire.dialer.unacknowledged == 0
    assert len(wire.store) == IN_FLIGHT


def test_frames_still_unread_on_the_old_connection_are_not_sent_again() -> None:
    """bob reads the new connection's probe before what still waits on the old one (his
    socket reads its connections in turn) and has nothing pending yet: the second probe,
    sent at once, is read after one of the old batches, so it is pending then and nothing
    is resent; the old batches' receipts come forwarded."""
    wire = RedialWire()
    wire.connect()
    unread = sent_batches(wire, IN_FLIGHT)  # in bob's socket on the old connection
    during = found_lost(wire)
    old = wire.connection
    wire.redial()
    hello = [f for f in during if isinstance(f, Hello)][-1]
    before = wire.dialer.retransmissions
    probe = wire.to_dialer(wire.to_listener([hello]))
    [pong] = wire.to_listener(probe)
    assert isinstance(pong, Pong) and pong.pending == 0
    confirm = wire.to_dialer([pong])
    assert [type(f) for f in confirm] == [Ping]  # not the window
    new, wire.connection = wire.connection, old
    wire.to_listener(unread[:1], commit=False)  # his turn on the old connection
    [taken] = [e for e in wire.listener_events if isinstance(e, MessagesArrived)]
    wire.connection = new
    [pong] = wire.to_listener(confirm)
    assert isinstance(pong, Pong) and pong.pending == 1
    assert batches(wire.to_dialer([pong])) == []
    wire.connection = old
    wire.commit(taken)
    wire.to_listener(unread[1:])  # the rest, stored at once; answered on the old connection
    wire.connection = new
    while wire.dialer.unacknowledged:  # alice's timer probes; the forwarded receipts come
        wire.advance_to(max(wire.dialer.next_timer(), wire.now))
        wire.exchange(wire.poll())
    assert wire.dialer.retransmissions == before
    assert len(wire.store) == IN_FLIGHT


def test_a_welcome_repeated_after_a_loss_resends_nothing_through_its_own_ping() -> None:
    """bob answers alice's retried Hellos with several Welcomes; a repeated Welcome owes a
    Ping of its own, whose Pong says nothing is pending before bob read the old connection.
    Only the loss's probes decide what bob lacks: that Pong marks nothing lost (it did, and
    the window went again at the next timeout)."""
    wire = RedialWire()
    wire.connect()
    sent_batches(wire, IN_FLIGHT)  # unread on the old connection
    during = lost_and_redialled(wire)
    during += [f for frames in drive_silently(wire, until=wire.now + 2 * PING_INTERVAL + 0.01)
               for f in frames]  # Hello retried on the new connection
    hellos = [f for f in during if isinstance(f, Hello)]
    assert len(hellos) >= 2
    before = wire.dialer.retransmissions
    probe = wire.to_dialer(wire.to_listener(hellos))
    wire.advance(0.01)
    pings = probe + wire.poll()
    assert [type(f) for f in pings] == [Ping, Ping]  # the probe, the repeated Welcome's Ping
    answers = wire.to_listener(pings)
    assert [p.pending for p in answers if isinstance(p, Pong)] == [0, 0]
    wire.advance(0.01)
    confirm = wire.to_dialer(answers)  # the probe's Pong asks again; the other decides nothing
    assert batches(confirm) == []
    for _ in range(3):  # bob reads nothing more meanwhile
        wire.advance_to(max(wire.dialer.next_timer(), wire.now))
        wire.poll()
    assert wire.dialer.retransmissions - before <= 2 * LOSS_WINDOW


def test_a_receiver_starved_across_several_losses_is_sent_no_window_twice() -> None:
    """Three silences past the peer timeout, each ending in a redial; between them bob reads
    what was sent (in order, then the new connection's Hello) and stores a little of it.
    Everything is delivered once, and the retransmissions stay within the loss window of
    each silence (the old code sent the window again at its timeouts and every Welcome)."""
    wire = RedialWire()
    wire.connect()
    unread: list[Frame] = list(sent_batches(wire, IN_FLIGHT))
    storing: list[MessagesArrived] = []
    for _ in range(3):
        during = found_lost(wire)
        unread += [f for f in during if isinstance(f, Batch)]
        # bob runs briefly: he reads what waits on the connection alice closes now (the
        # frames it carried before), and stores some of it.
        wire.to_listener(unread, commit=False)
        wire.redial()
        unread = []
        storing += [e for e in wire.listener_events if isinstance(e, MessagesArrived)
                    and e not in storing]
        for arrived in storing[:5]:
            wire.commit(arrived)  # answered on the closed connection: forwarded
        storing = storing[5:]
        hello = [f for f in during if isinstance(f, Hello)][-1]
        probe = wire.to_dialer(wire.to_listener([hello]))
        wire.to_dialer(wire.to_listener([f for f in probe if isinstance(f, Ping)]))
    for arrived in storing:  # bob catches up
        wire.commit(arrived)
    # The network heals: every frame crosses; alice's timers run until she is done.
    for _ in range(200):
        if wire.dialer.unacknowledged == 0:
            break
        wire.advance_to(max(wire.dialer.next_timer(), wire.now))
        wire.exchange(wire.poll())
    assert wire.dialer.unacknowledged == 0
    assert sorted(m.seq for m in wire.store.values()) == list(range(1, IN_FLIGHT + 1))
    assert wire.dialer.retransmissions <= 3 * 2 * LOSS_WINDOW

"""A stateful model of one link: alice's DialerLink, bob's Listener, their stores as dicts and a
hostile channel that loses, duplicates and reorders frames, with crashes and clock jumps.

Alice's node does what `Node` does and no more: it `offer`s each commit to the link, reads from
disk what `disk_request` asks for (the read can take a while: commits and offers happen while it
is under way) and hands the rows to `refill`. After every step: nothing is reported delivered
that bob has not stored; bob stores each id once; bob receipts only what he committed; the
window bounds what alice holds; whatever is committed and not held says it waits on disk. After
healing the network, everything is delivered.
"""

from __future__ import annotations

import collections

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from meshpost.clock import FakeClock, HybridLogicalClock
from meshpost.protocol import (
    HELD_MESSAGE_OVERHEAD,
    DialerLink,
    Envelope,
    Frame,
    Listener,
    MessagesArrived,
    MessagesDelivered,
    MessagesRejected,
    ReceiptFrame,
    ViolationDetected,
    encode,
    held_size,
)

WINDOW = 8
#: About five small messages' worth (each counts its body plus HELD_MESSAGE_OVERHEAD), so the
#: byte budget, not only the message count, limits what the link takes.
WINDOW_BYTES = 5 * HELD_MESSAGE_OVERHEAD + 20
MAX_MESSAGE_BYTES = 1024
MINUTE_NS = 60 * 1_000_000_000

bodies = st.text(st.characters(codec="utf-8"), min_size=1, max_size=8)
# Large enough that reordering and duplication reach deep into the channel; taken modulo.
positions = st.integers(0, 10_000)


class LinkModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.alice_clock = FakeClock()
        self.bob_clock = FakeClock(skew_ns=123_456_789)
        self.alice_hlc = HybridLogicalClock(self.alice_clock)
        self.bob_hlc = HybridLogicalClock(self.bob_clock)
        # alice's store: outgoing rows by seq, their state, and delivery writes not yet committed
        self.outbox: dict[int, Envelope] = {}
        self.delivered: set[int] = set()
        self.alice_uncommitted: list[list[int]] = []
        # bob's store: incoming rows by id, how often each was inserted, arrivals not committed
        self.inbox: dict[str, Envelope] = {}
        self.inserts: collections.Counter[str] = collections.Counter()
        self.bob_uncommitted: list[MessagesArrived] = []
        self.receipted: set[int] = set()
        # the network
        self.to_bob: list[bytes] = []
        self.to_alice: list[bytes] = []
        #: alice's read from disk under way: the rows it found.
        self.read: list[Envelope] | None = None
        self.dialer = self.new_dialer()
        self.listener = self.new_listener()

    # -- the two nodes ------------------------------------------------------------------------

    def new_dialer(self) -> DialerLink:
        return DialerLink(
            local_name="alice", local_node_id="node-a", peer="bob", window=WINDOW,
            window_bytes=WINDOW_BYTES, retransmit_initial_s=0.5, retransmit_max_s=5.0,
            ping_interval_s=1.0, peer_timeout_s=4.0,
        )

    def new_listener(self) -> Listener:
        return Listener(
            local_name="bob", local_node_id="node-b", known_peers={"alice"},
            max_message_bytes=MAX_MESSAGE_BYTES, sync="full",
        )

    def feed(self) -> None:
        """What alice's node does after a frame, a timer or a commit: start the read the
        link asks for (unless one is under way), then put what it holds in flight."""
        if self.read is None:
            request = self.dialer.disk_request()
            if request is not None:
                after_seq, limit = request
                # The store's answer as of now (a read sees the commits made before it).
                self.read = [self.outbox[s] for s in sorted(self.outbox)
                             if s not in self.delivered and s > after_seq][:limit]
        self.dialer.pump(self.alice_clock.monotonic(), self.alice_clock.wall_ns())

    def read_completes(self) -> None:
        assert self.read is not None
        rows, self.read = self.read, None
        self.dialer.refill(rows)
        self.feed()
        self.perform()

    def perform(self) -> None:
        """Put the dialer's frames on the wire and act on its events."""
        for event in self.dialer.events():
            if isinstance(event, MessagesDelivered):
                for seq in event.seqs:
                    assert self.outbox[seq].id in self.inbox, f"seq {seq} reported delivered"
                    assert self.inbox[self.outbox[seq].id] == self.outbox[seq]
                self.alice_uncommitted.append(event.seqs)
            assert not isinstance(event, MessagesRejected), event
        self.to_bob.extend(encode(f) for f in self.dialer.frames_to_send())

    def poll(self) -> None:
        self.feed()
        self.dialer.poll(
            self.alice_clock.monotonic(), self.alice_clock.wall_ns(), self.alice_hlc.now()
        )
        self.perform()

    def bob_receives(self, data: bytes) -> None:
        self.listener.receive("alice", data, self.bob_clock.wall_ns(), self.bob_hlc.last)
        self.send_to_alice(self.listener_answers())
        for event in self.listener.events():
            assert not isinstance(event, ViolationDetected), event
            if isinstance(event, MessagesArrived):
                self.bob_hlc.observe(max(m.hlc for m in event.messages))
                self.bob_uncommitted.append(event)

    def listener_answers(self) -> list[Frame]:
        queued = self.listener.frames_to_send()
        assert {to for to, _ in queued} <= {"alice"}
        return [frame for _, frame in queued]

    def send_to_alice(self, frames: list[Frame]) -> None:
        self.to_alice.extend(encode(f) for f in frames)

    def alice_receives(self, data: bytes) -> None:
        self.dialer.receive(
            data, self.alice_clock.monotonic(), self.alice_clock.wall_ns(), self.alice_hlc.last
        )
        self.perform()
        self.feed()
        self.perform()

    def bob_commits_one(self) -> None:
        arrived = self.bob_uncommitted.pop(0)
        committed: list[int] = []
        conflicts: list[int] = []
        for m in arrived.messages:
            if m.id not in self.inbox:
                self.inbox[m.id] = m
                self.inserts[m.id] += 1
            (committed if self.inbox[m.id] == m else conflicts).append(m.seq)
        self.listener.stored(
            arrived, committed=committed, conflicts=conflicts,
            stored_at_ns=self.bob_clock.wall_ns(), replied_at_ns=self.bob_clock.wall_ns(),
            hlc=self.bob_hlc.now(),
        )
        frames = self.listener_answers()
        stored_seqs = {m.seq for m in self.inbox.values()}
        for frame in frames:
            if isinstance(frame, ReceiptFrame):
                for lo, hi in frame.ranges:
                    seqs = set(range(lo, hi + 1))
                    assert seqs <= stored_seqs, f"receipt for uncommitted {seqs - stored_seqs}"
                    self.receipted |= seqs
        assert not conflicts
        self.send_to_alice(frames)

    def alice_commits_one(self) -> None:
        self.delivered.update(self.alice_uncommitted.pop(0))
        self.feed()
        self.perform()

    def channel(self, towards_bob: bool) -> list[bytes]:
        """The channel in the direction asked for, or the other one if that is empty."""
        if not self.to_alice or (towards_bob and self.to_bob):
            return self.to_bob
        return self.to_alice

    def settle(self, *, alice_commits: bool) -> None:
        """Deliver every frame in order and commit what arrives, until the wire is quiet."""
        while self.to_bob or self.to_alice or self.bob_uncommitted or self.read is not None or (
            alice_commits and self.alice_uncommitted
        ):
            if self.read is not None:
                self.read_completes()
            elif self.to_bob:
                self.bob_receives(self.to_bob.pop(0))
            elif self.bob_uncommitted:
                self.bob_commits_one()
            elif self.to_alice:
                self.alice_receives(self.to_alice.pop(0))
            else:
                self.alice_commits_one()

    def advance(self, seconds: float) -> None:
        self.alice_clock.advance(seconds)
        self.bob_clock.advance(seconds)

    # -- rules --------------------------------------------------------------------------------

    @initialize()
    def start(self) -> None:
        self.poll()

    @rule(texts=st.lists(bodies, min_size=1, max_size=5))
    def alice_sends(self, texts: list[str]) -> None:
        committed: list[Envelope] = []
        for body in texts:
            seq = len(self.outbox) + 1
            self.outbox[seq] = Envelope(
                f"alice-{seq}", seq, "alice", "bob", body, self.alice_clock.wall_ns(),
                self.alice_hlc.now(),
            )
            committed.append(self.outbox[seq])
        self.dialer.offer(committed)
        self.poll()

    @precondition(lambda self: self.read is not None)
    @rule()
    def alices_read_from_disk_completes(self) -> None:
        self.read_completes()

    @rule(seconds=st.sampled_from([0.01, 0.3, 0.5, 1.0, 2.5, 4.0, 6.0]))
    def time_passes(self, seconds: float) -> None:
        self.advance(seconds)
        self.poll()

    @rule(
        who=st.sampled_from(["alice", "bob"]),
        jump_ns=st.integers(-10 * MINUTE_NS, 10 * MINUTE_NS),
    )
    def a_wall_clock_jumps(self, who: str, jump_ns: int) -> None:
        clock = self.alice_clock if who == "alice" else self.bob_clock
        clock.wall += jump_ns

    @precondition(lambda self: self.to_bob)
    @rule(i=positions)
    def a_frame_reaches_bob(self, i: int) -> None:
        self.bob_receives(self.to_bob.pop(i % len(self.to_bob)))

    @precondition(lambda self: self.to_alice)
    @rule(i=positions)
    def a_frame_reaches_alice(self, i: int) -> None:
        self.alice_receives(self.to_alice.pop(i % len(self.to_alice)))

    @precondition(lambda self: self.to_bob or self.to_alice)
    @rule(i=positions, towards_bob=st.booleans())
    def a_frame_is_lost(self, i: int, towards_bob: bool) -> None:
        channel = self.channel(towards_bob)
        channel.pop(i % len(channel))

    @precondition(lambda self: self.to_bob or self.to_alice)
    @rule(i=positions, j=positions, towards_bob=st.booleans())
    def a_frame_is_duplicated(self, i: int, j: int, towards_bob: bool) -> None:
        channel = self.channel(towards_bob)
        channel.insert(j % (len(channel) + 1), channel[i % len(channel)])

    @rule(alice_commits=st.booleans())
    def the_network_is_good_for_a_moment(self, alice_commits: bool) -> None:
        self.settle(alice_commits=alice_commits)

    @precondition(lambda self: self.bob_uncommitted)
    @rule()
    def bob_commits(self) -> None:
        self.bob_commits_one()

    @precondition(lambda self: self.alice_uncommitted)
    @rule()
    def alice_commits(self) -> None:
        self.alice_commits_one()

    @rule()
    def alice_crashes_and_restarts(self) -> None:
        self.alice_uncommitted.clear()  # delivery writes not yet committed are lost
        self.read = None
        self.dialer = self.new_dialer()
        self.alice_hlc = HybridLogicalClock(self.alice_clock)
        self.poll()

    @rule()
    def bob_crashes_and_restarts(self) -> None:
        self.bob_uncommitted.clear()  # arrivals not yet committed are lost, never receipted
        self.listener = self.new_listener()
        self.bob_hlc = HybridLogicalClock(self.bob_clock)

    # -- invariants ---------------------------------------------------------------------------

    @invariant()
    def delivered_messages_are_in_bobs_store(self) -> None:
        for seq in self.delivered:
            assert self.inbox.get(self.outbox[seq].id) == self.outbox[seq]

    @invariant()
    def bob_stores_each_message_once(self) -> None:
        assert all(n == 1 for n in self.inserts.values())

    @invariant()
    def bob_stores_only_what_alice_sent(self) -> None:
        sent = {m.id: m for m in self.outbox.values()}
        assert all(sent.get(i) == m for i, m in self.inbox.items())

    @invariant()
    def the_window_bounds_what_alice_holds(self) -> None:
        held = [*self.dialer._queue, *self.dialer._inflight.values()]
        assert self.dialer.held_bytes == held_size(held)
        assert len(held) <= WINDOW
        # Over the byte budget only by the one message an empty link always admits.
        assert self.dialer.held_bytes <= WINDOW_BYTES or len(held) == 1

    @invariant()
    def what_alice_does_not_hold_waits_on_disk(self) -> None:
        # A committed, undelivered message above everything the link ever held is announced
        # as disk backlog, or nothing would ever read it.
        if any(s > self.dialer.highest_enqueued_seq
               for s in self.outbox if s not in self.delivered):
            assert self.dialer.disk_backlog

    @invariant()
    def receipts_cover_only_committed_rows(self) -> None:
        assert self.receipted <= {m.seq for m in self.inbox.values()}

    def teardown(self) -> None:
        """Heal the network (FIFO, lossless, prompt) and run until everything is delivered."""
        for _ in range(200):
            if len(self.delivered) == len(self.outbox) and not self.alice_uncommitted:
                break
            self.settle(alice_commits=True)
            now = self.alice_clock.monotonic()
            self.advance(min(max(self.dialer.next_timer() - now, 0.001), 1.0))
            self.poll()
        undelivered = sorted(set(self.outbox) - self.delivered)
        assert not undelivered, f"never delivered: {undelivered}; {self.dialer!r}"
        assert set(self.inbox) == {m.id for m in self.outbox.values()}


LinkModel.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_a_lossy_duplicating_reordering_link_with_crashes_delivers_everything_exactly_once = (
    LinkModel.TestCase
)

"""DialerLink in virtual time, wired in memory to a real Listener and a dict as its store."""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterable
from typing import TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshpost.errors import MalformedFrame
from meshpost.protocol import (
    PROTOCOL_VERSION,
    Batch,
    DialerLink,
    Envelope,
    Event,
    Frame,
    Hello,
    LinkRefused,
    LinkState,
    Listener,
    MessagesArrived,
    MessagesDelivered,
    MessagesRejected,
    PeerConnected,
    PeerLeft,
    PeerLost,
    Ping,
    Pong,
    ReceiptFrame,
    Refuse,
    RefuseCode,
    Reject,
    RejectCode,
    SessionState,
    ViolationDetected,
    Welcome,
    encode,
    max_frame_bytes,
)
from meshpost.protocol.dialer import (
    HELD_MESSAGE_OVERHEAD,
    MAX_BATCH_BODY_BYTES,
    MAX_BATCH_MESSAGES,
    REFUSED_RETRY_S,
    held_size,
)
from meshpost.protocol.frames import MAX_ID_LENGTH

T0_WALL = 1_700_000_000_000_000_000
RTO_INITIAL = 0.5
RTO_MAX = 5.0
PING_INTERVAL = 1.0
PEER_TIMEOUT = 4.0

E = TypeVar("E")


def msg(
    seq: int, body: str = "hello", *, sender: str = "alice", recipient: str = "bob"
) -> Envelope:
    return Envelope(f"id-{sender}-{seq}", seq, sender, recipient, body, T0_WALL + seq, seq)


def msgs(seqs: Iterable[int], body: str = "hello") -> list[Envelope]:
    return [msg(s, body) for s in seqs]


def batches(frames: Iterable[Frame]) -> list[Batch]:
    return [f for f in frames if isinstance(f, Batch)]


def batched_seqs(frames: Iterable[Frame]) -> list[int]:
    return [m.seq for b in batches(frames) for m in b.messages]


def state(wire: Wire) -> LinkState:
    """The link state, read afresh (each call may have changed it)."""
    return wire.dialer.state


def receipt(ranges: list[tuple[int, int]], sync: str = "full") -> ReceiptFrame:
    return ReceiptFrame(ranges, T0_WALL, T0_WALL, T0_WALL, T0_WALL, 0, sync)


class Wire:
    """alice's DialerLink to bob, bob's Listener and bob's store, in one virtual time line.

    Frames cross the wire encoded and decoded, as they would over a socket. Nothing happens
    unless a test says so: frames are handed over explicitly, time moves only by `advance`.
    """

    def __init__(
        self,
        *,
        window: int = 4096,
        window_bytes: int = 16 * 1024 * 1024,
        peer_timeout_s: float = PEER_TIMEOUT,
        max_message_bytes: int = 64 * 1024,
        bob_skew_ns: int = 0,
        link_idle_s: float = 0.0,
        lazy: bool = False,
    ) -> None:
        self.now = 0.0
        self.wall = T0_WALL
        self.bob_skew_ns = bob_skew_ns
        self.dialer = DialerLink(
            local_name="alice", local_node_id="node-a", peer="bob", window=window,
            window_bytes=window_bytes, retransmit_initial_s=RTO_INITIAL, retransmit_max_s=RTO_MAX,
            ping_interval_s=PING_INTERVAL, peer_timeout_s=peer_timeout_s,
            link_idle_s=link_idle_s, lazy=lazy,
        )
        self.max_message_bytes = max_message_bytes
        self.listener = self.new_listener()
        self.store: dict[str, Envelope] = {}
        self.events: list[Event] = []
        self.listener_events: list[Event] = []

    def new_listener(self) -> Listener:
        return Listener(
            local_name="bob", local_node_id="node-b", known_peers={"alice", "carol"},
            max_message_bytes=self.max_message_bytes, sync="full",
        )

    @property
    def bob_wall(self) -> int:
        return self.wall + self.bob_skew_ns

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.wall += round(seconds * 1e9)

    def advance_to(self, now: float) -> None:
        assert now >= self.now
        self.wall += round((now - self.now) * 1e9)
        self.now = now

    def take(self) -> list[Frame]:
        """Frames the dialer wants to send; its events accumulate in `self.events`."""
        self.events.extend(self.dialer.events())
        return self.dialer.frames_to_send()

    def poll(self) -> list[Frame]:
        self.dialer.poll(self.now, self.wall, 0)
        return self.take()

    def to_listener(self, frames: Iterable[Frame], *, commit: bool = True) -> list[Frame]:
        replies: list[Frame] = []
        for frame in frames:
            self.listener.receive("alice", encode(frame), self.bob_wall, 0)
            replies += self.listener_answers()
            for event in self.listener.events():
                self.listener_events.append(event)
                if commit and isinstance(event, MessagesArrived):
                    replies += self.commit(event)
        return replies

    def commit(self, arrived: MessagesArrived) -> list[Frame]:
        committed: list[int] = []
        conflicts: list[int] = []
        for m in arrived.messages:
            stored = self.store.setdefault(m.id, m)
            (committed if stored == m else conflicts).append(m.seq)
        self.listener.stored(
            arrived, committed=committed, conflicts=conflicts, stored_at_ns=self.bob_wall,
            replied_at_ns=self.bob_wall, hlc=0,
        )
        return self.listener_answers()

    def listener_answers(self) -> list[Frame]:
        queued = self.listener.frames_to_send()
        assert {to for to, _ in queued} <= {"alice"}
        return [frame for _, frame in queued]

    def to_dialer(self, frames: Iterable[Frame]) -> list[Frame]:
        for frame in frames:
            self.dialer.receive(encode(frame), self.now, self.wall, 0)
        return self.take()

    def exchange(self, frames: list[Frame]) -> None:
        """Deliver frames both ways until the wire falls quiet (a perfect network)."""
        for _ in range(100):
            if not frames:
                return
            frames = self.to_dialer(self.to_listener(frames))
        raise AssertionError("the wire never fell quiet")

    def connect(self) -> None:
        self.exchange(self.poll())
        assert self.dialer.state is LinkState.READY
        self.events.clear()

    def of_type(self, kind: type[E]) -> list[E]:
        return [e for e in self.events if isinstance(e, kind)]


# -- handshake --------------------------------------------------------------------------------


def test_a_new_link_says_hello_first() -> None:
    wire = Wire()
    assert state(wire) is LinkState.CONNECTING
    assert not wire.dialer.reachable
    [hello] = wire.poll()
    assert isinstance(hello, Hello)
    assert (hello.name, hello.node_id, hello.sent_at_ns) == ("alice", "node-a", T0_WALL)


def test_output_takes_the_frames_and_the_events_at_once() -> None:
    wire = Wire()
    wire.dialer.poll(wire.now, wire.wall, 0)
    frames, events = wire.dialer.output()
    assert [type(f) for f in frames] == [Hello] and events == []
    assert wire.dialer.output() == ([], [])  # taken: nothing twice
    for frame in wire.to_listener(frames):
        wire.dialer.receive(encode(frame), wire.now, wire.wall, 0)
    frames, events = wire.dialer.output()
    assert [type(e) for e in events] == [PeerConnected]
    assert wire.dialer.frames_to_send() == [] and wire.dialer.events() == []


def test_the_handshake_makes_the_link_ready_and_reports_the_peer() -> None:
    wire = Wire()
    [welcome] = wire.to_listener(wire.poll())
    assert isinstance(welcome, Welcome)
    assert (welcome.name, welcome.node_id, welcome.sync) == ("bob", "node-b", "full")
    assert wire.listener.session_state("alice") is SessionState.OPEN
    wire.to_dialer([welcome])
    assert state(wire) is LinkState.READY
    assert wire.dialer.reachable
    assert wire.dialer.peer_node_id == "node-b"
    assert wire.events == [PeerConnected("bob", "node-b")]


def test_hello_is_retried_every_ping_interval_until_welcomed() -> None:
    wire = Wire()
    assert isinstance(wire.poll()[0], Hello)
    assert wire.dialer.next_timer() == PING_INTERVAL
    wire.advance(PING_INTERVAL / 2)
    assert wire.poll() == []
    wire.advance(PING_INTERVAL / 2)
    assert [type(f) for f in wire.poll()] == [Hello]


def test_a_duplicate_welcome_does_not_report_the_peer_twice() -> None:
    wire = Wire()
    [welcome] = wire.to_listener(wire.poll())
    wire.to_dialer([welcome, welcome])
    assert wire.of_type(PeerConnected) == [PeerConnected("bob", "node-b")]


def test_welcomes_answering_retried_hellos_resend_what_is_in_flight_only_once() -> None:
    wire = Wire()
    wire.connect()
    wire.dialer.enqueue(msgs([1, 2]))
    wire.poll()  # lost
    drive_silently(wire, until=PEER_TIMEOUT + 3 * PING_INTERVAL)  # peer lost, hellos retried
    hellos = [Hello(PROTOCOL_VERSION, "node-a", "alice", T0_WALL, 0)] * 3
    welcomes = wire.to_listener(hellos)
    assert len(welcomes) >= 3
    resent = wire.to_dialer(welcomes)
    # After a loss the first Welcome asks rather than resends: one probe for all of them,
    # whose Pong says bob holds none of it, and a second that confirms it; then it goes, once.
    assert [type(f) for f in resent] == [Ping]
    confirm = wire.to_dialer(wire.to_listener(resent))
    assert [type(f) for f in confirm] == [Ping]
    resent = wire.to_dialer(wire.to_listener(confirm))
    assert batched_seqs(resent) == [1, 2]


# -- sending ----------------------------------------------------------------------------------


def test_a_new_link_reads_its_disk_backlog_until_a_read_comes_back_short() -> None:
    wire = Wire(window=4)
    assert wire.dialer.disk_backlog  # an earlier run may have left messages on disk
    assert wire.dialer.disk_request() == (0, 4)
    wire.dialer.refill(msgs([1, 2, 3, 4]))  # a full read: there may be more
    assert wire.dialer.disk_backlog
    assert wire.dialer.disk_request() is None  # no room to read into
    wire.dialer.offer(msgs([7]))  # committed now, but older ones wait on disk: not taken
    assert wire.dialer.unacknowledged == 4
    wire.connect()
    wire.exchange(wire.poll())  # 1-4 delivered
    assert wire.dialer.disk_request() == (4, 4)
    wire.dialer.refill(msgs([5, 6, 7]))  # short, and it reached what was offered
    assert not wire.dialer.disk_backlog
    assert wire.dialer.disk_request() is None
    wire.dialer.offer(msgs([8]))  # from now on offers are held at once
    assert wire.dialer.highest_enqueued_seq == 8
    wire.exchange(wire.poll())
    assert sorted(m.seq for m in wire.store.values()) == list(range(1, 9))


def test_offers_beyond_the_window_wait_on_disk_and_come_back_in_order() -> None:
    wire = Wire(window=4)
    assert wire.dialer.disk_request() == (0, 4)
    wire.dialer.refill([])  # nothing on disk at start
    wire.connect()
    wire.dialer.offer(msgs([1, 2, 3]))
    wire.dialer.offer(msgs([4, 5, 6]))  # 4 fits; 5 and 6 stay on disk
    assert wire.dialer.highest_enqueued_seq == 4
    assert wire.dialer.disk_backlog
    wire.dialer.offer(msgs([7]))  # after a gap nothing is held out of order
    assert wire.dialer.highest_enqueued_seq == 4
    assert not wire.dialer.wants_disk  # no room yet: nothing to wake a reader for
    wire.exchange(wire.poll())
    assert wire.dialer.wants_disk
    assert wire.dialer.disk_request() == (4, 4)
    wire.dialer.refill(msgs([5, 6, 7]))
    assert not wire.dialer.disk_backlog
    wire.exchange(wire.poll())
    assert sorted(m.seq for m in wire.store.values()) == list(range(1, 8))


def test_a_commit_offered_while_a_read_is_under_way_is_read_next_time() -> None:
    wire = Wire(window=8)
    assert wire.dialer.disk_request() == (0, 8)
    wire.dialer.offer(msgs([3]))  # committed after the read looked: it found only 1 and 2
    wire.dialer.refill(msgs([1, 2]))
    assert wire.dialer.disk_backlog  # a short read, but 3 was offered after it
    assert wire.dialer.disk_request() == (2, 6)
    wire.dialer.refill(msgs([3]))
    assert not wire.dialer.disk_backlog


def test_enqueue_holds_only_what_the_window_admits() -> None:
    one = 100 + HELD_MESSAGE_OVERHEAD
    wire = Wire(window=5, window_bytes=3 * one)
    assert wire.dialer.enqueue(msgs(range(1, 11), "m" * 100)) == 3  # bytes bound first
    assert wire.dialer.enqueue(msgs(range(1, 11), "m" * 100)) == 3  # 1-3 already held
    assert wire.dialer.unacknowledged == 3
    assert wire.dialer.held_bytes == 3 * one
    assert Wire(window=2).dialer.enqueue(msgs(range(1, 11))) == 2  # count bound




def test_messages_flow_only_after_welcome() -> None:
    wire = Wire()
    wire.dialer.enqueue(msgs(range(1, 4)))
    hello_only = wire.poll()
    assert [type(f) for f in hello_only] == [Hello]
    wire.advance(3 * PING_INTERVAL)
    assert batches(wire.poll()) == []
    sent = wire.to_dialer(wire.to_listener(hello_only))
    assert batched_seqs(sent) == [1, 2, 3]


def test_pump_sends_enqueued_messages_at_once_but_only_when_ready() -> None:
    wire = Wire()
    wire.dialer.enqueue(msgs([1]))
    wire.dialer.pump(wire.now, wire.wall)
    assert wire.take() == []
    wire.connect()  # the Welcome already pumped seq 1
    wire.dialer.enqueue(msgs([2, 3]))
    wire.dialer.pump(wire.now, wire.wall)
    assert batched_seqs(wire.take()) == [2, 3]
    wire.dialer.pump(wire.now, wire.wall)
    assert wire.take() == []


def test_enqueue_ignores_messages_it_already_holds() -> None:
    wire = Wire()
    wire.dialer.enqueue(msgs([1, 2, 3]))
    wire.dialer.enqueue(msgs([2, 3, 4]))
    assert wire.dialer.unacknowledged == 4
    assert wire.dialer.highest_enqueued_seq == 4
    assert wire.dialer.capacity == 4096 - 4


def test_enqueue_counts_each_held_message_once_in_the_window_bytes() -> None:
    wire = Wire()
    wire.dialer.enqueue(msgs([1, 2, 3], "abc"))
    wire.dialer.enqueue(msgs([2, 3, 4], "abc"))
    assert wire.dialer.held_bytes == 4 * (3 + HELD_MESSAGE_OVERHEAD)
    assert held_size(msgs([1, 2], "abcd")) == 2 * (4 + HELD_MESSAGE_OVERHEAD)


def test_admit_stops_at_the_window_bytes_then_reopens_as_receipts_settle() -> None:
    one = 100 + HELD_MESSAGE_OVERHEAD
    wire = Wire(window_bytes=3 * one + one // 2)
    wire.connect()
    backlog = msgs(range(1, 11), "m" * 100)
    taken = wire.dialer.admit(backlog)
    assert taken == 3  # the message count (4096) would allow all ten
    wire.dialer.enqueue(backlog[:taken])
    assert wire.dialer.held_bytes == 3 * one
    assert wire.dialer.admit(backlog[3:]) == 0
    assert not wire.dialer.wants_refill()
    sent = wire.poll()
    assert batched_seqs(sent) == [1, 2, 3]
    wire.to_dialer([receipt([(1, 2)])])
    assert wire.dialer.held_bytes == one
    assert wire.dialer.admit(backlog[3:]) == 2
    assert wire.dialer.wants_refill()


def test_an_empty_link_admits_one_message_larger_than_the_window_bytes() -> None:
    wire = Wire(window_bytes=1000, max_message_bytes=64 * 1024)
    wire.connect()
    big = [msg(1, "b" * 5000), msg(2, "small")]
    assert wire.dialer.admit(big) == 1
    wire.dialer.enqueue(big[:1])
    assert wire.dialer.held_bytes > wire.dialer.window_bytes
    assert wire.dialer.admit(big[1:]) == 0  # nothing more until it is settled
    wire.exchange(wire.poll())
    assert [m.seq for m in wire.store.values()] == [1]
    assert wire.dialer.held_bytes == 0
    assert wire.dialer.admit(big[1:]) == 1


def test_admit_also_respects_the_message_count() -> None:
    wire = Wire(window=4)
    wire.dialer.enqueue(msgs([1, 2, 3]))
    assert wire.dialer.admit(msgs([4, 5, 6])) == 1


def test_rejected_and_wide_range_settled_messages_leave_the_window_bytes() -> None:
    wire = Wire()
    wire.connect()
    wire.dialer.enqueue(msgs(range(1, 6), "xy"))
    wire.poll()
    wire.to_dialer([Reject([2, 3], RejectCode.INVALID, "test")])
    assert wire.dialer.held_bytes == 3 * (2 + HELD_MESSAGE_OVERHEAD)
    # A range far wider than what is in flight is walked over the in-flight seqs instead.
    wire.to_dialer([receipt([(1, 1_000_000)])])
    assert wire.dialer.held_bytes == 0
    assert wire.dialer.unacknowledged == 0


def test_large_backlogs_go_out_in_batches_of_at_most_max_batch_messages() -> None:
    n = 2 * MAX_BATCH_MESSAGES + 7
    wire = Wire(window=n)  # the window takes them all (enqueue holds no more than it allows)
    wire.connect()
    wire.dialer.enqueue(msgs(range(1, n + 1), "x"))
    sent = batches(wire.poll())
    assert [len(b.messages) for b in sent] == [MAX_BATCH_MESSAGES, MAX_BATCH_MESSAGES, 7]
    assert batched_seqs(sent) == list(range(1, n + 1))
    assert all(b.tx_at_ns == wire.wall for b in sent)


def test_batches_respect_the_body_byte_budget() -> None:
    wire = Wire(max_message_bytes=128 * 1024)
    wire.connect()
    big = "b" * (MAX_BATCH_BODY_BYTES // 2 - 10)
    huge = "h" * (MAX_BATCH_BODY_BYTES + 1)
    wire.dialer.enqueue([msg(1, big), msg(2, big), msg(3, big), msg(4, huge), msg(5, "small")])
    sent = batches(wire.poll())
    assert [[m.seq for m in b.messages] for b in sent] == [[1, 2], [3], [4], [5]]


def _cut_one_by_one(lengths: list[int]) -> list[int]:
    """The batching rule, message by message: a batch takes the next message while it has
    fewer than MAX_BATCH_MESSAGES and the bodies stay within MAX_BATCH_BODY_BYTES; a body
    larger than that goes alone. Returns the batch sizes."""
    sizes: list[int] = []
    count = size = 0
    for length in lengths:
        if count and (count >= MAX_BATCH_MESSAGES or size + length > MAX_BATCH_BODY_BYTES):
            sizes.append(count)
            count = size = 0
        count += 1
        size += length
    return [*sizes, count] if count else sizes


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.integers(1, 200), st.integers(1, MAX_BATCH_BODY_BYTES + 10)),
                max_size=5000).map(lambda ls: ls if not ls or len(ls) % 3 else
                                   ls + [1] * MAX_BATCH_MESSAGES))
def test_batches_are_cut_as_the_rule_says_message_by_message(lengths: list[int]) -> None:
    """The cut by slices and sums gives the batches the one-message-at-a-time rule gives."""
    n = len(lengths)
    wire = Wire(max_message_bytes=MAX_BATCH_BODY_BYTES + 10, window=max(1, n),
                window_bytes=1 << 40)
    wire.connect()
    wire.dialer.enqueue([msg(s, "x" * length) for s, length in enumerate(lengths, 1)])
    sent = batches(wire.poll())
    assert [len(b.messages) for b in sent] == _cut_one_by_one(lengths)
    assert batched_seqs(sent) == list(range(1, n + 1))


@pytest.mark.parametrize("max_message_bytes", [16, 100, 1_000, 64 * 1024])
@pytest.mark.parametrize("char", ["a", "é", "€", "\U0001d11e"])  # 1 to 4 bytes in UTF-8
def test_every_batch_the_dialer_builds_fits_the_frame_limit(
    max_message_bytes: int, char: str
) -> None:
    # The largest batches there are: bodies as long as the message limit and the batch's
    # body budget allow, ids of MAX_ID_LENGTH characters as wide as the bodies', and one
    # message of the largest size alone.
    width = len(char.encode())
    chars = max(1, min(max_message_bytes // width, MAX_BATCH_BODY_BYTES // MAX_BATCH_MESSAGES))
    wide_id = char * (MAX_ID_LENGTH - 5)
    n = 2 * MAX_BATCH_MESSAGES + 5
    messages = [Envelope(f"{s:05d}{wide_id}", s, "alice", "bob", char * chars, T0_WALL + s, s)
                for s in range(1, n + 1)]
    messages.append(msg(n + 1, char * (max_message_bytes // width)))
    wire = Wire(max_message_bytes=max_message_bytes, window=n + 1)
    wire.connect()
    wire.dialer.enqueue(messages)
    sent = batches(wire.poll())
    assert max(len(b.messages) for b in sent) == MAX_BATCH_MESSAGES
    for batch in sent:
        assert len(encode(batch)) <= max_frame_bytes(max_message_bytes)
    wire.exchange(sent)  # the listener decodes every one of them and refuses none
    assert len(wire.store) == n + 1
    assert not [e for e in wire.listener_events if isinstance(e, ViolationDetected)]


def test_a_receipt_settles_the_messages_and_reports_them_delivered() -> None:
    wire = Wire()
    wire.connect()
    wire.dialer.enqueue(msgs(range(1, 6)))
    wire.exchange(wire.poll())
    assert sorted(m.seq for m in wire.store.values()) == [1, 2, 3, 4, 5]
    [delivered] = wire.of_type(MessagesDelivered)
    assert delivered.peer == "bob"
    assert delivered.seqs == [1, 2, 3, 4, 5]
    assert delivered.receipt.ranges == [(1, 5)]
    assert delivered.arrived_at_ns == wire.wall
    assert wire.dialer.unacknowledged == 0
    assert wire.dialer.capacity == wire.dialer.window


def test_nothing_is_retransmitted_once_receipted() -> None:
    wire = Wire()
    wire.connect()
    wire.dialer.enqueue(msgs([1]))
    wire.exchange(wire.poll())
    for _ in range(20):
        if wire.dialer.next_timer() == math.inf:  # quiet: no more timers at all
            break
        wire.advance_to(wire.dialer.next_timer())
        frames = wire.poll()
        assert batches(frames) == []
        wire.exchange(frames)  # pings and pongs keep the link alive
    assert wire.dialer.retransmissions == 0


def test_a_receipt_feeds_the_clock_offset_estimate() -> None:
    wire = Wire(bob_skew_ns=250_000_000)
    wire.connect()
    wire.dialer.enqueue(msgs([1]))
    wire.exchange(wire.poll())
    assert wire.dialer.offset.offset_ns == 250_000_000
    assert wire.dialer.offset.rtt_ns == 0


def test_pongs_feed_the_clock_offset_estimate() -> None:
    wire = Wire(bob_skew_ns=-40_000_000)
    wire.connect()
    [ping] = wire.poll()
    assert isinstance(ping, Ping)
    [pong] = wire.to_listener([ping])
    assert isinstance(pong, Pong)
    assert pong.echo_sent_at_ns == ping.sent_at_ns
    wire.advance(0.002)
    wire.to_dialer([pong])
    assert wire.dialer.offset.offset_ns == -40_000_000 - 1_000_000
    assert wire.dialer.offset.rtt_ns == 2_000_000
    assert wire.dialer.last_heard == wire.now
    assert wire.dialer.last_heard_wall_ns == wire.wall


# -- retransmission -----------------------------------------------------------------------------


def test_unreceipted_messages_are_retransmitted_with_exponential_backoff_up_to_the_max() -> None:
    wire = Wire(peer_timeout_s=1_000.0)
    wire.connect()
    wire.dialer.enqueue(msgs([1, 2]))
    sent_at: list[float] = []
    frames = wire.poll()
    while wire.now < 30:
        if batches(frames):
            assert batched_seqs(frames) == [1, 2]
            sent_at.append(wire.now)
        # every frame is lost (the peer is not timed out: peer_timeout_s is far away)
        wire.advance_to(wire.dialer.next_timer())
        frames = wire.poll()
    gaps = [b - a for a, b in itertools.pairwise(sent_at)]
    # The first timeout (0.5 s) sends a Ping, not the batch: the first resend comes when the
    # doubled timeout runs out too (0.5 + 1.0), then the RTO doubles up to the max.
    assert gaps == pytest.approx([1.5, 2.0, 4.0, 5.0, 5.0, 5.0, 5.0])
    assert wire.dialer.retransmissions == 2 * (len(sent_at) - 1)


def test_a_batch_settled_at_both_ends_but_not_between_is_still_resent_in_part() -> None:
    """A flight is forgotten only when every message of it is settled: its two ends settled
    say nothing of the middle, which is resent when its timeout passes."""
    wire = Wire(peer_timeout_s=1_000.0)
    wire.connect()
    wire.dialer.enqueue(msgs(range(1, 6)))
    assert batched_seqs(wire.poll()) == [1, 2, 3, 4, 5]  # lost, then a receipt for the ends
    wire.to_dialer([receipt([(1, 1), (5, 5)])])
    resent: list[int] = []
    while not resent and wire.now < 60:
        wire.advance_to(wire.dialer.next_timer())
        resent = batched_seqs(wire.poll())  # every frame is lost
    assert resent == [2, 3, 4]
    wire.to_dialer([receipt([(2, 4)])])
    assert wire.dialer.unacknowledged == 0
    assert wire.dialer.next_timer() == math.inf or not batches(wire.poll())


def test_a_busy_peer_that_answers_pings_holds_its_batches_and_gets_no_resend() -> None:
    """bob read the batch (his Pong to a later Ping proves it: frames arrive in order) but
    takes long to commit: the timeout's probe Ping is answered, nothing is resent until
    `retransmit_max_s` passes without a receipt, and bob is never lost."""
    wire = Wire()
    wire.connect()
    wire.dialer.enqueue(msgs([1, 2]))
    frames = wire.poll()
    wire.to_listener(batches(frames), commit=False)  # read, not yet stored (a slow commit)
    [arrived] = wire.listener_events
    sent: list[Frame] = []
    while wire.now < RTO_MAX - 0.01:
        wire.to_dialer(wire.to_listener([f for f in frames if isinstance(f, Ping)]))
        wire.advance_to(min(wire.dialer.next_timer(), RTO_MAX - 0.01))
        frames = wire.poll()
        sent.extend(frames)
    assert batches(sent) == []
    assert any(isinstance(f, Ping) for f in sent)
    assert wire.dialer.retransmissions == 0
    assert wire.of_type(PeerLost) == []
    wire.to_dialer(wire.commit(arrived))
    assert wire.of_type(MessagesDelivered)[0].seqs == [1, 2]
    # Past retransmit_max_s without any receipt even a batch bob holds is resent (a safety net).
    wire.dialer.enqueue(msgs([3]))
    wire.to_listener(batches(wire.poll()))
    for _ in range(20):
        wire.advance_to(wire.dialer.next_timer())
        frames = wire.poll()
        if batches(frames):
            break
        wire.to_dialer(wire.to_listener([f for f in frames if isinstance(f, Ping)]))
    assert batched_seqs(frames) == [3]


def test_a_receipt_of_a_first_transmission_resets_the_backoff_one_of_a_resent_batch_not() -> None:
    wire = Wire(peer_timeout_s=1_000.0)
    wire.connect()
    wire.dialer.enqueue(msgs([1]))
    wire.poll()
    while wire.dialer.retransmissions < 4:  # lose the batch four times: the RTO grows to 5 s
        wire.advance_to(wire.dialer.next_timer())
        wire.poll()
    assert wire.dialer.rto == RTO_MAX
    wire.dialer.enqueue(msgs([2]))
    assert batched_seqs(wire.poll()) == [2]
    wire.to_dialer([receipt([(1, 1)])])
    assert wire.of_type(MessagesDelivered)[0].seqs == [1]
    assert wire.dialer.rto == RTO_MAX  # Karn's rule: seq 1 was resent, so no reset
    wire.dialer.enqueue(msgs([3]))
    assert batched_seqs(wire.poll()) == [3]
    wire.to_dialer([receipt([(3, 3)])])
    assert wire.of_type(MessagesDelivered)[1].seqs == [3]
    assert wire.dialer.rto == RTO_INITIAL
    frames: list[Frame] = []
    start = wire.now
    # seq 2 is still in flight; its next timeout comes after the initial RTO again (a probe
    # Ping first, then the resend when the doubled timeout runs out too).
    wire.advance_to(wire.dialer.next_timer())
    assert wire.now - start == pytest.approx(RTO_INITIAL)
    assert [type(f) for f in wire.poll()] == [Ping]
    while not batches(frames := wire.poll()):
        wire.advance_to(wire.dialer.next_timer())
    assert batched_seqs(frames) == [2]
    assert wire.now - start == pytest.approx(3 * RTO_INITIAL)


def test_retransmitted_duplicates_are_stored_once_and_receipted_again() -> None:
    wire = Wire()
    wire.connect()
    wire.dialer.enqueue(msgs([1, 2]))
    first = wire.poll()
    receipts_lost = wire.to_listener(first)  # stored, but the receipt never arrives
    assert [type(f) for f in receipts_lost] == [Pong, ReceiptFrame]
    wire.advance(RTO_INITIAL)
    assert [type(f) for f in wire.poll()] == [Ping]  # the timeout's probe: lost too
    while not (resent := batches(wire.poll())):
        wire.advance_to(wire.dialer.next_timer())
    assert batched_seqs(resent) == [1, 2]
    replies = wire.to_listener(resent)
    assert [r.ranges for r in replies if isinstance(r, ReceiptFrame)] == [[(1, 2)]]
    wire.to_dialer(replies)
    assert len(wire.store) == 2
    assert wire.of_type(MessagesDelivered)[0].seqs == [1, 2]


# -- liveness ---------------------------------------------------------------------------------


def drive_silently(wire: Wire, until: float) -> list[list[Frame]]:
    """Poll at every timer the dialer asks for; bob answers nothing."""
    sent: list[list[Frame]] = []
    for _ in range(1_000):
        deadline = wire.dialer.next_timer()
        if deadline > until:
            return sent
        wire.advance_to(max(deadline, wire.now))
        sent.append(wire.poll())
        assert wire.dialer.next_timer() > wire.now, "polling at next_timer() made no progress"
    raise AssertionError("timers never reached the horizon")


def test_the_peer_is_lost_after_peer_timeout_of_silence_and_hello_is_sent_again() -> None:
    wire = Wire()
    wire.connect()
    connected_at = wire.now
    sent = drive_silently(wire, until=connected_at + PEER_TIMEOUT)
    [lost] = wire.of_type(PeerLost)
    assert lost.peer == "bob"
    assert lost.silent_for_s == pytest.approx(PEER_TIMEOUT)
    assert wire.now == pytest.approx(connected_at + PEER_TIMEOUT)
    assert state(wire) is LinkState.LOST
    assert not wire.dialer.reachable
    assert isinstance(sent[-1][-1], Hello)


def test_polling_at_next_timer_always_makes_progress() -> None:
    wire = Wire()
    wire.connect()
    wire.dialer.enqueue(msgs([1, 2, 3]))
    drive_silently(wire, until=60.0)
    assert len(wire.of_type(PeerLost)) == 1


def test_a_lost_peer_that_comes_back_gets_everything_in_flight() -> None:
    wire = Wire()
    wire.connect()
    wire.dialer.enqueue(msgs([1, 2, 3]))
    wire.poll()  # lost on the wire
    sent = drive_silently(wire, until=PEER_TIMEOUT)
    assert wire.of_type(PeerLost)
    wire.exchange([f for f in sent[-1] if isinstance(f, Hello)])
    assert state(wire) is LinkState.READY
    assert wire.of_type(PeerConnected) == [PeerConnected("bob", "node-b")]
    assert sorted(m.seq for m in wire.store.values()) == [1, 2, 3]
    assert wire.of_type(MessagesDelivered)[0].seqs == [1, 2, 3]


def test_no_retransmission_while_the_peer_is_lost() -> None:
    wire = Wire()
    wire.connect()
    wire.dialer.enqueue(msgs([1]))
    wire.poll()
    sent = drive_silently(wire, until=PEER_TIMEOUT)
    after_loss = sent[sent.index(next(s for s in sent if any(isinstance(f, Hello) for f in s))):]
    later = drive_silently(wire, until=PEER_TIMEOUT + 20)
    assert batches(f for s in after_loss[1:] + later for f in s) == []
    assert all(isinstance(f, Hello) for s in later for f in s)


# -- refusals ---------------------------------------------------------------------------------


def test_a_restarted_listener_demands_hello_and_then_gets_everything_resent() -> None:
    wire = Wire()
    wire.connect()
    wire.listener = wire.new_listener()  # bob restarted: no sessions
    wire.dialer.enqueue(msgs([1, 2]))
    frames = wire.poll()
    replies = wire.to_listener(frames)
    assert Refuse(RefuseCode.HELLO_REQUIRED, "send Hello first") in replies
    assert wire.store == {}
    again = wire.to_dialer(replies)
    assert state(wire) is LinkState.CONNECTING
    assert [type(f) for f in again] == [Hello]
    wire.exchange(again)
    assert state(wire) is LinkState.READY
    assert sorted(m.seq for m in wire.store.values()) == [1, 2]
    assert wire.of_type(MessagesDelivered)[0].seqs == [1, 2]
    assert wire.of_type(LinkRefused) == []


def test_a_version_refusal_stops_the_link_and_retries_only_rarely() -> None:
    wire = Wire()
    wire.dialer.enqueue(msgs([1]))
    wire.poll()
    wire.listener.receive(
        "alice", encode(Hello(99, "node-a", "alice", T0_WALL, 0)), T0_WALL, 0
    )
    refusal = wire.listener_answers()
    assert [type(f) for f in refusal] == [Refuse]
    assert isinstance(refusal[0], Refuse)
    assert refusal[0].code == RefuseCode.VERSION
    wire.to_dialer(refusal)
    assert state(wire) is LinkState.REFUSED
    assert not wire.dialer.reachable
    [refused] = wire.of_type(LinkRefused)
    assert refused.code == RefuseCode.VERSION
    assert wire.dialer.refusal is not None
    assert "version" in wire.dialer.refusal
    assert wire.dialer.next_timer() == pytest.approx(wire.now + REFUSED_RETRY_S)
    wire.advance(REFUSED_RETRY_S - 0.1)
    assert wire.poll() == []
    wire.advance(0.1)
    assert [type(f) for f in wire.poll()] == [Hello]
    assert wire.dialer.next_timer() == pytest.approx(wire.now + REFUSED_RETRY_S)


def test_a_refused_link_ignores_stale_receipts_and_pongs() -> None:
    wire = Wire()
    wire.connect()
    wire.dialer.enqueue(msgs([1]))
    wire.poll()
    wire.to_dialer([Refuse(RefuseCode.UNKNOWN_PEER, "who are you")])
    heard = wire.dialer.last_heard
    wire.advance(1)
    wire.to_dialer([receipt([(1, 1)]), Pong(0, 0, 0)])
    assert wire.of_type(MessagesDelivered) == []
    assert wire.dialer.unacknowledged == 1
    assert wire.dialer.last_heard == heard


def test_a_welcome_after_a_refusal_restores_the_link() -> None:
    wire = Wire()
    wire.dialer.enqueue(msgs([1]))
    wire.poll()
    wire.to_dialer([Refuse(RefuseCode.IDENTITY, "no")])
    assert state(wire) is LinkState.REFUSED
    wire.advance(REFUSED_RETRY_S)
    wire.exchange(wire.poll())
    assert state(wire) is LinkState.READY
    assert wire.dialer.refusal is None
    assert [m.seq for m in wire.store.values()] == [1]


def test_a_welcome_from_another_node_than_the_peer_is_a_refusal_not_a_session() -> None:
    """The endpoint configured for bob is carol's: her Welcome opens no session with bob
    (nothing is sent to her as bob, no PeerConnected: node/claims.py would take it as bob's
    node id), the link says why and asks again as rarely as after any refusal; once bob
    himself answers there, the link is his."""
    wire = Wire()
    wire.dialer.enqueue(msgs([1]))
    assert [type(f) for f in wire.poll()] == [Hello]
    assert wire.to_dialer([Welcome(PROTOCOL_VERSION, "node-c", "carol", T0_WALL, 0,
                                   "full")]) == []
    assert state(wire) is LinkState.REFUSED
    assert not wire.dialer.reachable
    assert wire.dialer.peer_node_id is None
    assert wire.of_type(PeerConnected) == []
    [refused] = wire.of_type(LinkRefused)
    assert refused.code == RefuseCode.IDENTITY
    assert "'carol'" in refused.detail and "node-c" in refused.detail
    assert wire.dialer.refusal is not None and "'bob'" in wire.dialer.refusal
    assert wire.dialer.next_timer() == pytest.approx(wire.now + REFUSED_RETRY_S)
    wire.advance(REFUSED_RETRY_S)
    wire.exchange(wire.poll())
    assert state(wire) is LinkState.READY
    assert wire.dialer.peer_node_id == "node-b"
    assert [m.seq for m in wire.store.values()] == [1]


# -- receipts the dialer did not ask for ----------------------------------------------------


def test_receipts_only_settle_seqs_that_are_in_flight() -> None:
    wire = Wire()
    wire.connect()
    wire.dialer.enqueue(msgs([3, 4, 5]))
    wire.poll()
    wire.to_dialer([receipt([(1, 4), (9, 12)])])
    [delivered] = wire.of_type(MessagesDelivered)
    assert delivered.seqs == [3, 4]
    assert wire.dialer.unacknowledged == 1


def test_a_receipt_for_nothing_in_flight_reports_nothing() -> None:
    wire = Wire()
    wire.connect()
    wire.dialer.enqueue(msgs([1]))
    wire.poll()
    wire.to_dialer([receipt([(2, 100), (5, 3), (-10, 0)])])
    assert wire.of_type(MessagesDelivered) == []
    wire.to_dialer([receipt([(1, 1)]), receipt([(1, 1)])])
    assert len(wire.of_type(MessagesDelivered)) == 1


def test_hostile_huge_receipt_ranges_are_handled_fast() -> None:
    wire = Wire()
    wire.connect()
    wire.dialer.enqueue(msgs(range(1, 1001)))
    wire.poll()
    # The widest ranges a receipt can carry (wider ones do not decode: see below).
    hostile = receipt(
        [(-(2**63), 2**63 - 1)] * 2_000 + [(0, 2**63 - 1)] * 2_000 + [(2**63 - 1, 0)] * 2_000
    )
    started = time.perf_counter()
    wire.to_dialer([hostile])
    elapsed = time.perf_counter() - started
    assert elapsed < 1.0
    [delivered] = wire.of_type(MessagesDelivered)
    assert delivered.seqs == list(range(1, 1001))


@pytest.mark.parametrize("field", ["ranges", "echo_tx_at_ns", "received_at_ns",
                                   "stored_at_ns", "replied_at_ns", "hlc"])
@pytest.mark.parametrize("value", [2**64 - 1, 2**63])
def test_a_receipt_with_a_value_out_of_64_bit_range_is_rejected_whole_and_reported(
    field: str, value: int
) -> None:
    wire = Wire()
    wire.connect()
    wire.dialer.enqueue(msgs([1, 2]))
    wire.poll()
    fields = {"ranges": [(1, 2)], "echo_tx_at_ns": T0_WALL, "received_at_ns": T0_WALL,
              "stored_at_ns": T0_WALL, "replied_at_ns": T0_WALL, "hlc": 0, "sync": "full"}
    fields[field] = [(1, value)] if field == "ranges" else value
    wire.to_dialer([ReceiptFrame(**fields)])  # type: ignore[arg-type]
    assert wire.of_type(MessagesDelivered) == []
    assert wire.dialer.unacknowledged == 2  # still in flight: resent, never lost
    [violation] = wire.of_type(ViolationDetected)
    assert violation.who == "bob"
    assert isinstance(violation.error, MalformedFrame)
    assert wire.dialer.state is LinkState.READY  # one bad frame ends nothing


def test_bytes_that_do_not_decode_and_frames_not_for_a_dialer_are_reported() -> None:
    wire = Wire()
    wire.connect()
    wire.dialer.receive(b"\xc1", wire.now, wire.wall, 0)
    wire.dialer.receive(encode(Ping(1)), wire.now, wire.wall, 0)
    wire.take()
    assert [type(v.error) for v in wire.of_type(ViolationDetected)] == [MalformedFrame] * 2
    assert wire.dialer.state is LinkState.READY


def test_a_reject_settles_the_seqs_and_reports_them() -> None:
    wire = Wire()
    wire.connect()
    wire.dialer.enqueue(msgs([1, 2, 3]))
    wire.poll()
    wire.to_dialer([Reject([2, 3, 77], RejectCode.CONFLICT, "taken")])
    assert wire.of_type(MessagesRejected) == [
        MessagesRejected("bob", [2, 3], RejectCode.CONFLICT, "taken")
    ]
    assert wire.dialer.unacknowledged == 1
    wire.to_dialer([Reject([2, 3], RejectCode.CONFLICT, "taken")])
    assert len(wire.of_type(MessagesRejected)) == 1


def test_messages_the_listener_refuses_come_back_as_rejections() -> None:
    wire = Wire(max_message_bytes=16)
    wire.connect()
    wire.dialer.enqueue([msg(1, "fine"), msg(2, "x" * 17), msg(3, "")])
    wire.exchange(wire.poll())
    rejected = {e.code: e.seqs for e in wire.of_type(MessagesRejected)}
    assert rejected == {RejectCode.TOO_LARGE: [2], RejectCode.INVALID: [3]}
    assert wire.of_type(MessagesDelivered)[0].seqs == [1]
    assert wire.dialer.unacknowledged == 0


def test_the_repr_names_both_ends() -> None:
    assert "alice->bob" in repr(Wire().dialer)


# -- adaptive retransmission timeout ----------------------------------------------------------


def round_trip(wire: Wire, seq: int, delay_s: float) -> None:
    """Send message `seq`; its receipt comes back `delay_s` later (nothing is polled meanwhile)."""
    wire.dialer.enqueue(msgs([seq]))
    replies = wire.to_listener(batches(wire.poll()))
    wire.advance(delay_s)
    wire.to_dialer(replies)
    assert wire.of_type(MessagesDelivered)[-1].seqs == [seq]


def test_slow_receipts_stretch_the_retransmission_timeout() -> None:
    wire = Wire(peer_timeout_s=1_000.0)
    wire.connect()
    for seq in range(1, 9):
        round_trip(wire, seq, 2.0)  # the peer takes 2 s to commit and answer
    assert wire.dialer.srtt_s == pytest.approx(2.0)
    assert wire.dialer.base_rto > 2.0
    # The next message is not resent while its receipt is merely as slow as usual.
    wire.dialer.enqueue(msgs([9]))
    assert batched_seqs(wire.poll()) == [9]
    wire.advance(2.0)
    assert batches(wire.poll()) == []
    assert wire.dialer.retransmissions == 0


def test_fast_receipts_keep_the_configured_initial_timeout() -> None:
    wire = Wire(peer_timeout_s=1_000.0)
    wire.connect()
    for seq in range(1, 6):
        round_trip(wire, seq, 0.001)
    assert wire.dialer.srtt_s == pytest.approx(0.001)
    assert wire.dialer.base_rto == RTO_INITIAL


def test_timeouts_never_exceed_the_max_and_absurd_samples_are_ignored() -> None:
    wire = Wire(peer_timeout_s=1_000.0)
    wire.connect()
    round_trip(wire, 1, RTO_MAX + 1)  # a stall, not a path: ignored
    assert wire.dialer.srtt_s is None
    wire.dialer.enqueue(msgs([2]))
    wire.poll()
    wire.to_dialer([
        ReceiptFrame([(2, 2)], wire.wall + 10**9, T0_WALL, T0_WALL, T0_WALL, 0, "full")
    ])
    assert wire.dialer.srtt_s is None  # an echo from the future (clock stepped back): ignored
    for seq in range(3, 6):
        round_trip(wire, seq, RTO_MAX * 0.9)
    assert wire.dialer.base_rto == RTO_MAX


# -- a peer that says goodbye -----------------------------------------------------------------


def test_a_peer_that_left_is_gone_at_once_and_gets_its_messages_when_back() -> None:
    wire = Wire(peer_timeout_s=1_000.0)
    wire.connect()
    wire.dialer.enqueue(msgs([1, 2]))
    wire.poll()  # in flight, never receipted
    wire.dialer.peer_left(wire.now, "shutting down")
    assert wire.take() == []
    assert wire.of_type(PeerLeft) == [PeerLeft("bob", "shutting down")]
    assert not wire.dialer.reachable
    assert state(wire) is LinkState.LEFT
    # Nothing is resent to a peer that left; Hello goes out at the usual pace, not at once.
    wire.advance(PING_INTERVAL / 2)
    assert wire.poll() == []
    wire.advance(PING_INTERVAL / 2)
    frames = wire.poll()
    assert [type(f) for f in frames] == [Hello]
    # It is back: the Welcome brings everything in flight again.
    wire.listener = wire.new_listener()
    resent = wire.to_dialer(wire.to_listener(frames))
    assert state(wire) is LinkState.READY
    assert batched_seqs(resent) == [1, 2]
    assert len(wire.of_type(PeerConnected)) == 1
    wire.dialer.peer_left(wire.now, "again")
    wire.dialer.peer_left(wire.now, "and again")  # already gone: reported once
    wire.take()
    assert len(wire.of_type(PeerLeft)) == 2


def test_byes_said_again_while_the_peer_counts_gone_do_not_put_its_hello_off() -> None:
    """Found by the adversarial audit: each Bye (anyone may say one under the peer's name and
    node id) pushed the Hello back a ping interval, so Byes coming faster than that kept the
    link from ever saying Hello, and nothing reached the live peer while they came."""
    wire = Wire(peer_timeout_s=1_000.0)
    wire.connect()
    wire.dialer.peer_left(wire.now, "shutting down")
    hello_at = wire.dialer.next_timer()
    for _ in range(10):  # a Bye every tenth of the interval, past the Hello's time
        wire.advance(PING_INTERVAL / 10)
        wire.dialer.peer_left(wire.now, "not really")
        assert wire.dialer.next_timer() <= hello_at
    wire.advance_to(hello_at)
    frames = wire.poll()
    assert [type(f) for f in frames] == [Hello]
    wire.to_dialer(wire.to_listener(frames))
    assert state(wire) is LinkState.READY


def test_a_steady_round_trip_of_x_gives_a_timeout_near_x() -> None:
    wire = Wire(peer_timeout_s=1_000.0)
    wire.connect()
    x = 1.5
    for seq in range(1, 41):
        round_trip(wire, seq, x)
    assert wire.dialer.srtt_s == pytest.approx(x)
    assert x < wire.dialer.rto < x * 1.05  # SRTT + max(G, 4 * RTTVAR), the variance decayed
    assert wire.dialer.rto != RTO_INITIAL


def test_a_receipt_of_a_resent_batch_is_no_rtt_sample() -> None:
    wire = Wire(peer_timeout_s=1_000.0)
    wire.connect()
    wire.dialer.enqueue(msgs([1]))
    wire.poll()  # lost
    wire.advance_to(wire.dialer.next_timer())
    assert [type(f) for f in wire.poll()] == [Ping]  # the timeout's probe: lost too
    while not (sent := batches(wire.poll())):
        wire.advance_to(wire.dialer.next_timer())
    [resent] = sent
    assert wire.dialer.retransmissions == 1
    replies = wire.to_listener([resent])
    wire.advance(0.3)
    wire.to_dialer(replies)  # echoes the resend's tx time: unambiguous, but Karn's rule holds
    assert wire.of_type(MessagesDelivered)[0].seqs == [1]
    assert wire.dialer.srtt_s is None
    round_trip(wire, 2, 0.3)  # a first transmission is a sample again
    assert wire.dialer.srtt_s == pytest.approx(0.3)


def test_only_the_batches_whose_timeout_passed_are_resent() -> None:
    wire = Wire(peer_timeout_s=1_000.0)
    wire.connect()
    wire.dialer.enqueue(msgs([1, 2]))
    assert batched_seqs(wire.poll()) == [1, 2]
    wire.advance_to(wire.dialer.next_timer())
    assert [type(f) for f in wire.poll()] == [Ping]  # the first timeout probes (lost)
    wire.advance(0.7)
    wire.dialer.enqueue(msgs([3]))
    assert batched_seqs(wire.poll()) == [3]
    wire.advance_to(wire.dialer.next_timer())
    assert wire.now == pytest.approx(RTO_INITIAL + 2 * RTO_INITIAL)
    assert batched_seqs(wire.poll()) == [1, 2]  # seq 3 has been out for 0.3 s only
    assert wire.dialer.retransmissions == 2


def test_a_slow_but_steady_receiver_is_neither_timed_out_nor_pinged_nor_lost() -> None:
    """bob takes 3 s to receipt each batch (longer than the initial RTO and near the peer
    timeout) but a receipt comes every 0.25 s: after the first samples nothing is resent,
    no Ping is needed and bob is never lost."""
    delay, gap = 3.0, 0.25
    wire = Wire(peer_timeout_s=4.0)
    wire.connect()
    for seq in range(1, 4):
        round_trip(wire, seq, delay)  # learn the round trip (each one stays under the timeout)
    wire.take()
    before = wire.dialer.retransmissions
    due: list[tuple[float, list[Frame]]] = []  # (when bob's answer reaches alice, the answer)
    sent: list[Frame] = []  # once receipts flow (the pipe is full)
    start, seq = wire.now, 4
    while wire.now < 60:
        wire.dialer.enqueue(msgs([seq]))
        seq += 1
        frames = wire.poll()
        if wire.now > start + delay:
            sent.extend(frames)
        due.append((wire.now + delay, wire.to_listener(frames)))
        wire.advance(gap)
        while due and due[0][0] <= wire.now:
            wire.to_dialer(due.pop(0)[1])
    assert wire.dialer.retransmissions == before
    assert not any(isinstance(f, Ping) for f in sent)
    assert wire.of_type(PeerLost) == []
    assert wire.dialer.reachable


def test_a_batch_the_node_could_not_queue_is_resent_at_its_first_timeout() -> None:
    """A later Pong proves the frames that were queued arrived, not one the socket refused."""
    wire = Wire()
    wire.connect()
    wire.dialer.enqueue(msgs([1]))
    [batch] = batches(wire.poll())
    wire.dialer.batch_dropped(batch)
    wire.advance(0.25)
    wire.dialer.receive(encode(Pong(wire.wall, wire.bob_wall, wire.bob_wall)), wire.now,
                        wire.wall, 0)  # answers a Ping sent after the batch
    while not (resent := batches(wire.poll())):
        wire.advance_to(wire.dialer.next_timer())
    assert batched_seqs(resent) == [1]
    assert wire.now == pytest.approx(RTO_INITIAL)

"""The dialer's side of one link (this node -> one peer): handshake, windowed transmission,
retransmission with backoff, receipts, liveness and clock samples.

Rule: pure state. Inputs are frames, committed messages and the current time (`now` is a
monotonic reading in seconds, `wall_ns` the wall clock); outputs are `frames_to_send()`,
`events()` and `next_timer()`. It never waits, sleeps, logs or touches a socket.
"""

from __future__ import annotations

import bisect
import collections
import enum
import itertools
import operator
from collections.abc import Sequence

from meshpost.clock import OffsetEstimator
from meshpost.protocol.events import (
    Event,
    LinkRefused,
    MessagesDelivered,
    MessagesRejected,
    PeerConnected,
    PeerLeft,
    PeerLost,
)
from meshpost.protocol.frames import (
    MAX_BATCH_BODY_BYTES,
    MAX_BATCH_MESSAGES,
    PROTOCOL_VERSION,
    Batch,
    Envelope,
    Frame,
    Hello,
    Ping,
    Pong,
    Receipt,
    Refuse,
    RefuseCode,
    Reject,
    UncheckedBatch,
    Welcome,
)

#: After a refusal for a reason only an operator can fix, ask again this rarely.
REFUSED_RETRY_S = 10.0
#: Smoothing of round-trip samples for the retransmission timeout (RFC 6298's alpha, beta, K).
RTT_ALPHA = 0.125
RTT_BETA = 0.25
RTT_K = 4.0
#: What a held message costs besides its body (the Envelope, its id, the dict slot): the
#: window's byte count is body characters plus this, an estimate of memory, not of the wire.
HELD_MESSAGE_OVERHEAD = 256

_SEQ = operator.attrgetter("seq")
_BODY = operator.attrgetter("body")


def held_size(messages: Sequence[Envelope]) -> int:
    """The window bytes `messages` take (summed in C, no per-message Python)."""
    return sum(map(len, map(_BODY, messages))) + len(messages) * HELD_MESSAGE_OVERHEAD


class LinkState(enum.Enum):
    CONNECTING = "connecting"  # Hello sent, no Welcome yet
    READY = "ready"  # handshake done; data flows
    REFUSED = "refused"  # the peer refused us; retry rarely


#: Which frames the dialer accepts in which state; anything else is ignored as stale.
_ACCEPTS: dict[LinkState, frozenset[type]] = {
    LinkState.CONNECTING: frozenset({Welcome, Refuse, Receipt, Reject, Pong}),
    LinkState.READY: frozenset({Welcome, Refuse, Receipt, Reject, Pong}),
    LinkState.REFUSED: frozenset({Welcome, Refuse}),
}


class DialerLink:
    """Protocol state for messages this node sends to one peer."""

    def __init__(
        self,
        *,
        local_name: str,
        local_node_id: str,
        peer: str,
        window: int,
        window_bytes: int,
        retransmit_initial_s: float,
        retransmit_max_s: float,
        ping_interval_s: float,
        peer_timeout_s: float,
    ) -> None:
        self.local_name = local_name
        self.local_node_id = local_node_id
        self.peer = peer
        self.window = window
        self.window_bytes = window_bytes
        self._rto_initial = retransmit_initial_s
        self._rto_max = retransmit_max_s
        self._ping_interval = ping_interval_s
        self._peer_timeout = peer_timeout_s

        self.state = LinkState.CONNECTING
        self.reachable = False
        self.peer_node_id: str | None = None
        self.offset = OffsetEstimator()
        self.last_heard: float | None = None
        self.last_heard_wall_ns: int | None = None
        self.refusal: str | None = None
        #: Highest seq ever handed to `enqueue`; the node loads disk backlog above it.
        self.highest_enqueued_seq = 0
        #: True while committed messages for this peer wait on disk, not in memory.
        self.disk_backlog = True
        self.retransmissions = 0

        self._queue: collections.deque[Envelope] = collections.deque()
        self._inflight: dict[int, Envelope] = {}
        #: `held_size` of everything in `_queue` and `_inflight`.
        self._held_bytes = 0
        self._rto = retransmit_initial_s
        #: Smoothed round trip (batch sent -> its receipt back, which includes the peer's
        #: commit) and its mean deviation, from receipts; None until the first sample.
        self.srtt_s: float | None = None
        self._rttvar_s = 0.0
        self._rto_deadline: float | None = None
        self._next_hello_at = 0.0
        self._next_ping_at = 0.0
        self._frames: list[Frame] = []
        self._events: list[Event] = []

    # -- inputs ---------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        """How many more committed messages this link can hold in memory right now."""
        return self.window - len(self._queue) - len(self._inflight)

    @property
    def held_bytes(self) -> int:
        """Memory the held messages take, as `held_size` estimates it."""
        return self._held_bytes

    @property
    def unacknowledged(self) -> int:
        return len(self._queue) + len(self._inflight)

    def wants_refill(self) -> bool:
        """A quarter of the window is free in messages and in bytes: worth a read from disk
        (fewer, larger reads than refilling one receipt at a time)."""
        return (
            self.capacity >= max(1, self.window // 4)
            and self.window_bytes - self._held_bytes >= self.window_bytes // 4
        )

    def admit(self, messages: Sequence[Envelope]) -> int:
        """How many of `messages`, from the first, fit in the window now (both its message
        count and its bytes). An empty link admits one message whatever its size, so a body
        larger than `window_bytes` still goes."""
        count = min(len(messages), self.capacity)
        if count <= 0:
            return 0
        room = self.window_bytes - self._held_bytes
        if count < len(messages):
            messages = messages[:count]
        if held_size(messages) > room:
            sizes = itertools.accumulate(
                map(operator.add, map(len, map(_BODY, messages)),
                    itertools.repeat(HELD_MESSAGE_OVERHEAD))
            )
            count = bisect.bisect_right(list(sizes), room)
        if count == 0 and not self._queue and not self._inflight:
            count = 1
        return count

    def enqueue(self, messages: Sequence[Envelope]) -> None:
        """Hand over messages already committed to the local store, in seq order. Those at or
        below `highest_enqueued_seq` are already held (or delivered) and are skipped."""
        start = bisect.bisect_right(messages, self.highest_enqueued_seq, key=_SEQ)
        if start:
            messages = messages[start:]
        if not messages:
            return
        self._queue.extend(messages)
        self._held_bytes += held_size(messages)
        self.highest_enqueued_seq = messages[-1].seq

    def pump(self, now: float, wall_ns: int) -> None:
        """Put what `enqueue` queued in flight now (if the handshake is done), not at the
        next timer tick: call it after `enqueue`, then collect `frames_to_send()`."""
        self._pump(now, wall_ns)

    def retry_soon(self, now: float) -> None:
        """The peer was heard again out of band (a discovery beacon): a refused link asks
        again at the next `poll` rather than after `REFUSED_RETRY_S`."""
        if self.state is LinkState.REFUSED:
            self._next_hello_at = min(self._next_hello_at, now)

    def poll(self, now: float, wall_ns: int, hlc: int) -> None:
        """Run timers: handshake retries, pings, liveness, retransmission, transmission."""
        if self.state is not LinkState.READY:
            if now >= self._next_hello_at:
                self._send_hello(now, wall_ns, hlc)
        else:
            if now >= self._next_ping_at:
                self._frames.append(Ping(sent_at_ns=wall_ns))
                self._next_ping_at = now + self._ping_interval
        if (
            self.reachable
            and self.last_heard is not None
            # Same expression as in next_timer(): polling at that time must make progress.
            and now >= self.last_heard + self._peer_timeout
        ):
            self.reachable = False
            self.state = LinkState.CONNECTING
            self._next_hello_at = now
            self._rto_deadline = None
            self._events.append(PeerLost(self.peer, now - self.last_heard))
            self._send_hello(now, wall_ns, hlc)
        if (
            self.state is LinkState.READY
            and self._rto_deadline is not None
            and now >= self._rto_deadline
            and self._inflight
        ):
            self.retransmissions += len(self._inflight)
            self._emit_batches(list(self._inflight.values()), wall_ns)
            self._rto = min(self._rto * 2, self._rto_max)
            self._rto_deadline = now + self._rto
        self._pump(now, wall_ns)

    def peer_left(self, now: float, reason: str) -> None:
        """The peer said it is shutting down (its Bye reached our listener): count it as gone
        now, send nothing until it welcomes us again, and say Hello at the usual pace."""
        if self.state is LinkState.REFUSED:
            return
        was_reachable = self.reachable
        self.reachable = False
        self.state = LinkState.CONNECTING
        self._rto_deadline = None
        self._next_hello_at = now + self._ping_interval
        if was_reachable:
            self._events.append(PeerLeft(self.peer, reason))

    def receive(self, frame: Frame | UncheckedBatch, now: float, wall_ns: int, hlc: int) -> None:
        """Take one frame the peer sent on this link (as `decode` gives it: a batch, checked
        or not, is not for a dialer and is ignored like every other frame it does not take)."""
        if type(frame) not in _ACCEPTS[self.state]:
            return
        self.last_heard = now
        self.last_heard_wall_ns = wall_ns
        match frame:
            case Welcome():
                self._on_welcome(frame, now, wall_ns)
            case Refuse(code=code, detail=detail):
                self._on_refuse(code, detail, now, wall_ns, hlc)
            case Receipt():
                self._on_receipt(frame, now, wall_ns)
            case Reject(seqs=seqs, code=code, detail=detail):
                gone = {s: m for s in seqs if (m := self._inflight.pop(s, None)) is not None}
                self._held_bytes -= held_size(list(gone.values()))
                settled = list(gone)
                if settled:
                    self._events.append(MessagesRejected(self.peer, settled, code, detail))
            case Pong(echo_sent_at_ns=t1, received_at_ns=t2, replied_at_ns=t3):
                self.offset.add(t1, t2, t3, wall_ns)
            case _:  # pragma: no cover - _ACCEPTS filters the rest
                pass
        self._pump(now, wall_ns)

    # -- outputs --------------------------------------------------------------------------

    def frames_to_send(self) -> list[Frame]:
        frames, self._frames = self._frames, []
        return frames

    def events(self) -> list[Event]:
        events, self._events = self._events, []
        return events

    def next_timer(self) -> float:
        """Monotonic time at which `poll` next has work to do."""
        if self.state is not LinkState.READY:
            deadline = self._next_hello_at
        else:
            deadline = self._next_ping_at
            if self._rto_deadline is not None and self._inflight:
                deadline = min(deadline, self._rto_deadline)
        if self.reachable and self.last_heard is not None:
            deadline = min(deadline, self.last_heard + self._peer_timeout)
        return deadline

    # -- internals ------------------------------------------------------------------------

    def _send_hello(self, now: float, wall_ns: int, hlc: int) -> None:
        self._frames.append(
            Hello(
                version=PROTOCOL_VERSION,
                node_id=self.local_node_id,
                name=self.local_name,
                sent_at_ns=wall_ns,
                hlc=hlc,
            )
        )
        retry = REFUSED_RETRY_S if self.state is LinkState.REFUSED else self._ping_interval
        self._next_hello_at = now + retry

    def _on_welcome(self, frame: Welcome, now: float, wall_ns: int) -> None:
        was_ready = self.state is LinkState.READY and self.reachable
        self.state = LinkState.READY
        self.reachable = True
        self.refusal = None
        self.peer_node_id = frame.node_id
        self._next_ping_at = now
        if not was_ready:
            self._events.append(PeerConnected(self.peer, frame.node_id))
        if self._inflight and not was_ready:
            # Whatever was in flight may have died with the old connection: resend now. (A
            # Welcome while ready answers a duplicate Hello; resending again would only
            # multiply traffic.)
            self.retransmissions += len(self._inflight)
            self._emit_batches(list(self._inflight.values()), wall_ns)
        self._rto = self.base_rto
        self._rto_deadline = now + self._rto if self._inflight else None

    @property
    def base_rto(self) -> float:
        """The retransmission timeout before backoff: `retransmit_initial_s`, or more when
        receipts take longer (a busy peer committing big batches is slow, not gone), as
        SRTT + 4 * RTTVAR (RFC 6298), never above `retransmit_max_s`."""
        if self.srtt_s is None:
            return self._rto_initial
        adaptive = self.srtt_s + RTT_K * self._rttvar_s
        return min(self._rto_max, max(self._rto_initial, adaptive))

    def _add_rtt_sample(self, sample_s: float) -> None:
        # A receipt echoes the tx time of the very transmission it answers, so a sample is
        # unambiguous even for a retransmitted batch (like TCP timestamps; no Karn's rule).
        # Beyond the longest timeout it says more about a stall than about the path.
        if not 0.0 <= sample_s <= self._rto_max:
            return
        if self.srtt_s is None:
            self.srtt_s, self._rttvar_s = sample_s, sample_s / 2
        else:
            self._rttvar_s += RTT_BETA * (abs(self.srtt_s - sample_s) - self._rttvar_s)
            self.srtt_s += RTT_ALPHA * (sample_s - self.srtt_s)

    def _on_refuse(self, code: str, detail: str, now: float, wall_ns: int, hlc: int) -> None:
        if code == RefuseCode.HELLO_REQUIRED:
            # The peer restarted or lost our session: handshake again, then resend. Every
            # frame sent meanwhile is refused too; one Hello (and its retry timer) answers all.
            if self.state is not LinkState.CONNECTING:
                self.state = LinkState.CONNECTING
                self._send_hello(now, wall_ns, hlc)
            return
        self.state = LinkState.REFUSED
        self.reachable = False
        self.refusal = f"{code}: {detail}"
        self._next_hello_at = now + REFUSED_RETRY_S
        self._events.append(LinkRefused(self.peer, code, detail))

    def _on_receipt(self, receipt: Receipt, now: float, wall_ns: int) -> None:
        settled: list[int] = []
        inflight = self._inflight
        for lo, hi in receipt.ranges:
            if hi < lo:
                continue
            if hi - lo + 1 <= len(inflight):
                before = len(inflight)
                popped = list(map(inflight.pop, range(lo, hi + 1), itertools.repeat(None)))
                if before - len(inflight) == hi - lo + 1:
                    settled.extend(range(lo, hi + 1))  # all of them were in flight
                else:
                    settled.extend(s for s, m in zip(range(lo, hi + 1), popped, strict=True)
                                   if m is not None)
                self._held_bytes -= held_size(list(filter(None, popped)))
            else:
                # A wide range (or a hostile one): walk what we have instead of the range.
                hits = [s for s in inflight if lo <= s <= hi]
                self._held_bytes -= held_size([inflight.pop(s) for s in hits])
                settled.extend(hits)
        self.offset.add(receipt.echo_tx_at_ns, receipt.received_at_ns, receipt.replied_at_ns,
                        wall_ns)
        if settled:
            settled.sort()
            self._events.append(MessagesDelivered(self.peer, settled, receipt, wall_ns))
            self._add_rtt_sample((wall_ns - receipt.echo_tx_at_ns) / 1e9)
            self._rto = self.base_rto
            self._rto_deadline = now + self._rto if inflight else None

    def _pump(self, now: float, wall_ns: int) -> None:
        """Move queued messages into flight while the handshake is done and the window allows."""
        if self.state is not LinkState.READY or not self._queue:
            return
        fresh: list[Envelope] = []
        queue, inflight = self._queue, self._inflight
        while queue:
            message = queue.popleft()
            inflight[message.seq] = message
            fresh.append(message)
        if self._rto_deadline is None:
            self._rto_deadline = now + self._rto
        self._emit_batches(fresh, wall_ns)

    def _emit_batches(self, messages: list[Envelope], wall_ns: int) -> None:
        batch: list[Envelope] = []
        size = 0
        for message in messages:
            body_len = len(message.body)
            full = len(batch) >= MAX_BATCH_MESSAGES or size + body_len > MAX_BATCH_BODY_BYTES
            if batch and full:
                self._frames.append(Batch(tx_at_ns=wall_ns, messages=batch))
                batch, size = [], 0
            batch.append(message)
            size += body_len
        if batch:
            self._frames.append(Batch(tx_at_ns=wall_ns, messages=batch))

    def __repr__(self) -> str:
        return (
            f"DialerLink({self.local_name}->{self.peer}, {self.state.value}, "
            f"reachable={self.reachable}, queued={len(self._queue)}, "
            f"inflight={len(self._inflight)})"
        )

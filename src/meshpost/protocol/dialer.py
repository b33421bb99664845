"""The dialer's side of one link (this node -> one peer): its state machine (handshake,
Welcome, Refuse, Bye), receipts, liveness and clock samples, and whether the link is worth a
connection at all (lazy opening, idle close).

Rule: pure state. Inputs are the peer's bytes, committed messages (`offer`), rows read from
disk (`refill`) and the current time (`now` is a monotonic reading in seconds, `wall_ns` the
wall clock); outputs are `frames_to_send()`, `events()`, `disk_request()` and `next_timer()`.
It never waits, sleeps, logs or touches a socket. What the link holds and sends (the window,
what waits on disk, batches and their flights) is its `Outbox` (protocol/outbox.py); when it
resends, probes or redials after a loss is its `LossRecovery` (protocol/recovery.py); the link
takes the peer's frames, runs the handshake and liveness, and tells both what happened.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence

from meshpost.clock import OffsetEstimator
from meshpost.errors import MalformedFrame, ProtocolError
from meshpost.protocol.codec import decode
from meshpost.protocol.events import (
    Event,
    LinkRefused,
    MessagesDelivered,
    MessagesRejected,
    PeerConnected,
    PeerLeft,
    PeerLost,
    ViolationDetected,
)
from meshpost.protocol.frames import (
    MAX_BATCH_BODY_BYTES,
    MAX_BATCH_MESSAGES,
    PROTOCOL_VERSION,
    Batch,
    Close,
    Envelope,
    Frame,
    Hello,
    Pong,
    ReceiptFrame,
    Refuse,
    RefuseCode,
    Reject,
    Welcome,
    max_frame_bytes,
)
from meshpost.protocol.outbox import HELD_MESSAGE_OVERHEAD, Outbox, held_size
from meshpost.protocol.recovery import (
    LOSS_WINDOW,
    RETRIED_HANDSHAKE_RTO_S,
    STALL_GRACE,
    LossRecovery,
)

# The batch limits, the window's measure and the recovery's constants are importable from
# here, as before the outbox and the loss recovery became modules of their own.
__all__ = ["HELD_MESSAGE_OVERHEAD", "LOSS_WINDOW", "MAX_BATCH_BODY_BYTES", "MAX_BATCH_MESSAGES",
           "REFUSED_RETRY_S", "RETRIED_HANDSHAKE_RTO_S", "STALL_GRACE", "TRANSITIONS",
           "DialerLink", "LinkInput", "LinkState", "held_size"]

#: After a refusal for a reason only an operator can fix, ask again this rarely.
REFUSED_RETRY_S = 10.0


class LinkState(enum.Enum):
    IDLE = "idle"  # no connection: nothing to send yet, or nothing for link_idle_s (closed)
    CONNECTING = "connecting"  # Hello sent, no Welcome yet
    READY = "ready"  # handshake done; data flows; the only state counted reachable
    LOST = "lost"  # was ready, then silent for peer_timeout_s; Hello sent again
    LEFT = "left"  # the peer said Bye; Hello at the usual pace until it is back
    REFUSED = "refused"  # the peer refused us; retry rarely

    # Identity hashing: every frame a link takes looks up (state, input) in `TRANSITIONS`,
    # and `Enum.__hash__` is a Python call per member hashed (two a receipt). Members are
    # singletons compared by identity, so the object's own hash is as good and is C.
    __hash__ = object.__hash__


class LinkInput(enum.Enum):
    """What can happen to a link: a frame from the peer, or a fact the node or a timer reports."""

    WELCOME = "Welcome"
    HELLO_REQUIRED = "Refuse(hello-required)"
    REFUSE = "Refuse(other code)"
    RECEIPT = "ReceiptFrame"
    REJECT = "Reject"
    PONG = "Pong"
    SILENCE = "peer_timeout_s of silence"
    BYE = "peer said Bye"
    OPEN = "a message to send, or a connect request"
    IDLE_TIMEOUT = "link_idle_s with nothing to send"

    __hash__ = object.__hash__  # as LinkState's: C, not a Python call per lookup


_S, _I = LinkState, LinkInput
#: (state, input) -> next state. A pair that is not here is not taken in that state: a frame is
#: ignored as stale (a receipt reaching a refused link), a fact changes nothing. An `IDLE` link
#: has no connection, so every frame reaching it is stale.
TRANSITIONS: dict[tuple[LinkState, LinkInput], LinkState] = {
    (_S.IDLE, _I.OPEN): _S.CONNECTING,
    (_S.CONNECTING, _I.IDLE_TIMEOUT): _S.IDLE,
    (_S.READY, _I.IDLE_TIMEOUT): _S.IDLE,
    (_S.LOST, _I.IDLE_TIMEOUT): _S.IDLE,
    (_S.LEFT, _I.IDLE_TIMEOUT): _S.IDLE,
    (_S.REFUSED, _I.IDLE_TIMEOUT): _S.IDLE,
    (_S.CONNECTING, _I.WELCOME): _S.READY,
    (_S.CONNECTING, _I.HELLO_REQUIRED): _S.CONNECTING,
    (_S.CONNECTING, _I.REFUSE): _S.REFUSED,
    (_S.CONNECTING, _I.RECEIPT): _S.CONNECTING,
    (_S.CONNECTING, _I.REJECT): _S.CONNECTING,
    (_S.CONNECTING, _I.PONG): _S.CONNECTING,
    (_S.CONNECTING, _I.BYE): _S.LEFT,
    (_S.READY, _I.WELCOME): _S.READY,
    (_S.READY, _I.HELLO_REQUIRED): _S.CONNECTING,
    (_S.READY, _I.REFUSE): _S.REFUSED,
    (_S.READY, _I.RECEIPT): _S.READY,
    (_S.READY, _I.REJECT): _S.READY,
    (_S.READY, _I.PONG): _S.READY,
    (_S.READY, _I.SILENCE): _S.LOST,
    (_S.READY, _I.BYE): _S.LEFT,
    (_S.LOST, _I.WELCOME): _S.READY,
    (_S.LOST, _I.HELLO_REQUIRED): _S.LOST,
    (_S.LOST, _I.REFUSE): _S.REFUSED,
    (_S.LOST, _I.RECEIPT): _S.LOST,
    (_S.LOST, _I.REJECT): _S.LOST,
    (_S.LOST, _I.PONG): _S.LOST,
    (_S.LOST, _I.BYE): _S.LEFT,
    (_S.LEFT, _I.WELCOME): _S.READY,
    (_S.LEFT, _I.HELLO_REQUIRED): _S.LEFT,
    (_S.LEFT, _I.REFUSE): _S.REFUSED,
    (_S.LEFT, _I.RECEIPT): _S.LEFT,
    (_S.LEFT, _I.REJECT): _S.LEFT,
    (_S.LEFT, _I.PONG): _S.LEFT,
    (_S.LEFT, _I.BYE): _S.LEFT,
    (_S.REFUSED, _I.WELCOME): _S.READY,
    (_S.REFUSED, _I.HELLO_REQUIRED): _S.CONNECTING,
    (_S.REFUSED, _I.REFUSE): _S.REFUSED,
}
del _S, _I

#: States a Welcome can end in which the peer never stored what was in flight: it refused our
#: frames for want of a Hello (CONNECTING), said Bye (LEFT), or refused the link (REFUSED).
_SESSION_GONE = frozenset({LinkState.CONNECTING, LinkState.LEFT, LinkState.REFUSED})

# The states that the per-frame paths (`needs_connection`, `next_timer`, `pump`: seven
# tests a single send) compare against, bound once: in Python 3.11 each `LinkState.X` is a
# lookup through `EnumType.__getattr__`'s slow path, ~1,000 instructions (callgrind).
_IDLE, _READY = LinkState.IDLE, LinkState.READY

#: The input each frame a dialer takes is (Refuse is split by its code).
_FRAME_INPUTS: dict[type, LinkInput] = {
    Welcome: LinkInput.WELCOME,
    Refuse: LinkInput.REFUSE,
    ReceiptFrame: LinkInput.RECEIPT,
    Reject: LinkInput.REJECT,
    Pong: LinkInput.PONG,
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
        max_frame_bytes: int = max_frame_bytes(0),
        link_idle_s: float = 0.0,
        lazy: bool = False,
        recent_s: float | None = None,
        now: float = 0.0,
    ) -> None:
        """`max_frame_bytes`: the largest frame taken from the peer (its answers are small;
        the default is the batch limit, which no answer comes near). `link_idle_s`: close the
        link (`IDLE`) after this long with nothing to send (0: never). `lazy`: start `IDLE`,
        opening on the first message or `open()`, rather than dialing at once. `recent_s`: how
        long after its last activity a link with nothing pending still pings and watches for
        silence (None: `peer_timeout_s`; `math.inf`: for as long as it is open, as a small
        mesh wants, to show a crashed peer as lost). `now`: the monotonic time the link is made
        (its idle period counts from there)."""
        self.local_name = local_name
        self.local_node_id = local_node_id
        self.peer = peer
        #: What the link holds and sends; its containers are never rebound, so the link
        #: keeps them at hand (`_queue`, `_inflight`) for its timers.
        self._outbox = outbox = Outbox(window=window, window_bytes=window_bytes)
        self._queue = outbox.queue
        self._inflight = outbox.inflight
        self._ping_interval = ping_interval_s
        self._peer_timeout = peer_timeout_s
        self.max_frame_bytes = max_frame_bytes
        self.link_idle_s = link_idle_s
        self.recent_s = peer_timeout_s if recent_s is None else recent_s
        #: Something above the link waits on this peer (a task leased to it): keep watching
        #: its liveness (pings) and keep the link open even with nothing to send.
        self.watched = False

        self.state = LinkState.IDLE if lazy else LinkState.CONNECTING
        self.peer_node_id: str | None = None
        self.offset = OffsetEstimator()
        self.last_heard: float | None = None
        self.last_heard_wall_ns: int | None = None
        self.refusal: str | None = None
        #: The resume token of the last Welcome on this link: the next Hello (a redial, a
        #: retry) carries it, the peer's proof that we continue that session (protocol.md 10).
        self._resume_token = b""
        #: When the last Hello went, and how many went since the last Welcome (a Welcome
        #: answering one of several is no sample: which one it answers is unknown).
        self._hello_sent_at = 0.0
        self._hellos_unanswered = 0
        #: How many frames the peer sent that this link took: what a probe compares before
        #: and after (with `answers`).
        self.frames_heard = 0
        self._next_hello_at = 0.0
        self._next_ping_at = 0.0
        #: When the link last had something to do (opened, sent a batch, settled a message):
        #: the recent window and the idle period count from here.
        self._active_at = now
        #: Silence is measured from here when later than `last_heard`: the link started
        #: expecting answers again after a quiet spell in which nobody asked the peer anything.
        self._silence_from = now
        self._ping_owed = False
        #: The last `now` a poll or a frame brought: this node was running then.
        self._seen_at = now
        self._frames: list[Frame] = []
        self._events: list[Event] = []
        #: Loss detection and recovery: the retransmission timer, probes, round-trip samples,
        #: this node's stalls excused, the redial of a lost link.
        self._recovery = LossRecovery(
            self, retransmit_initial_s=retransmit_initial_s,
            retransmit_max_s=retransmit_max_s, ping_interval_s=ping_interval_s,
            peer_timeout_s=peer_timeout_s, now=now)

    # -- inputs ---------------------------------------------------------------------------

    @property
    def reachable(self) -> bool:
        """The handshake is done and the peer is neither silent, gone nor refusing us."""
        return self.state is LinkState.READY

    @property
    def window(self) -> int:
        """Messages this link holds at most in memory (queued plus in flight)."""
        return self._outbox.window

    @property
    def window_bytes(self) -> int:
        """Memory those messages may take, as `held_size` counts it."""
        return self._outbox.window_bytes

    @property
    def capacity(self) -> int:
        """How many more committed messages this link can hold in memory right now."""
        return self._outbox.capacity

    @property
    def held_bytes(self) -> int:
        """Memory the held messages take, as `held_size` estimates it."""
        return self._outbox.held_bytes

    @property
    def unacknowledged(self) -> int:
        return len(self._queue) + len(self._inflight)

    @property
    def highest_enqueued_seq(self) -> int:
        """Highest seq ever held (queued, in flight or settled); disk is read above it."""
        return self._outbox.highest_enqueued_seq

    @property
    def retransmissions(self) -> int:
        """Messages sent again so far (each resend counts each of its messages)."""
        return self._outbox.retransmissions

    @property
    def rto(self) -> float:
        """The retransmission timeout in force now (`base_rto`, or more after backoff)."""
        return self._recovery.rto

    @property
    def base_rto(self) -> float:
        """The retransmission timeout before backoff (`LossRecovery.base_rto`)."""
        return self._recovery.base_rto

    @property
    def srtt_s(self) -> float | None:
        """The smoothed round trip of this link's receipts; None before the first sample."""
        return self._recovery.srtt_s

    @property
    def path_srtt_s(self) -> float | None:
        """The smoothed round trip of the peer's immediate answers (Welcome, Pong)."""
        return self._recovery.path_srtt_s

    @property
    def spurious_retransmissions(self) -> int:
        """Messages resent although their first transmission was receipted after all."""
        return self._recovery.spurious_retransmissions

    @property
    def stalls_excused(self) -> int:
        """How many stalls of this node were excused so far (a sign it is starved of CPU)."""
        return self._recovery.stalls_excused

    @property
    def last_answer_rtt_s(self) -> float | None:
        """The round trip of the peer's latest immediate answer (Welcome to a lone Hello,
        Pong); None before the first."""
        return self._recovery.last_answer_rtt_s

    @property
    def last_answer_at(self) -> float | None:
        """When that answer arrived (monotonic)."""
        return self._recovery.last_answer_at

    @property
    def answers(self) -> int:
        """How many immediate answers came so far (what a probe compares)."""
        return self._recovery.answers

    @property
    def needs_connection(self) -> bool:
        """The link wants a socket to its peer (every state but `IDLE`): open one before
        sending its frames, and close it after sending them once this turns False."""
        return self.state is not _IDLE

    @property
    def has_work(self) -> bool:
        """Messages wait to go or to be receipted (in memory or on disk), or something above
        the link watches the peer: the link must not idle out, and its liveness is watched."""
        return bool(self._queue or self._inflight) or self.disk_backlog or self.watched

    def _watch_until(self) -> float:
        """Until when pings and the silence timer run: for good while answers are expected
        (something queued or in flight, or the peer watched), else to the end of the recent
        window after the last activity."""
        if self._queue or self._inflight or self.watched:
            return math.inf
        return self._active_at + self.recent_s

    def recently_active(self, now: float) -> bool:
        """The link did something within the recent window (`recent_s`): its liveness is
        still watched, so that a peer that dies just after its last receipt is found lost
        as soon as before."""
        return now <= self._active_at + self.recent_s

    def open(self, now: float) -> None:
        """Dial now if the link is `IDLE` (an explicit connect: a probe, a ping request): the
        Hello goes at the next `poll`. Idle again after `link_idle_s` with nothing to send."""
        self._open(now)

    def probe(self, now: float) -> None:
        """Ask the peer for a sign of life at the next `poll`: an `IDLE` link dials (a Welcome
        answers), a `READY` one pings however recently it heard the peer (a Pong answers),
        any other sends its Hello now. The peer answered once `answers` grows (the round trip
        in `last_answer_rtt_s`), or at least was heard once `frames_heard` grows; a dead peer
        answers nothing, and its link shows the state it reaches meanwhile."""
        if self.state is LinkState.IDLE:
            self._open(now)
        elif self.state is LinkState.READY:
            self._ping_owed = True
            self._next_ping_at = min(self._next_ping_at, now)
        else:
            self._next_hello_at = min(self._next_hello_at, now)

    @property
    def disk_backlog(self) -> bool:
        """Committed messages for this peer wait on disk, not in memory: `offer` keeps
        nothing until `refill` has caught up (so that messages leave in seq order)."""
        return self._outbox.disk_backlog

    @property
    def wants_disk(self) -> bool:
        """`disk_request()` would ask for rows now: wake whatever reads them."""
        # (Never without a backlog: that plain attribute first, as the node asks this after
        # every frame in or out, and the outbox's answer is a property call more.)
        outbox = self._outbox
        return outbox.disk_backlog and outbox.wants_disk

    def wants_refill(self) -> bool:
        """A quarter of the window is free in messages and in bytes: worth a read from disk
        (fewer, larger reads than refilling one receipt at a time)."""
        return self._outbox.wants_refill()

    def offer(self, messages: Sequence[Envelope]) -> None:
        """`messages` (for this peer, in seq order) are committed to the local store: hold
        what the window takes; the rest stay on disk for `disk_request`. Frames leave on the
        next `pump` or `poll`, so several offers can go out in the same batch frames."""
        self._outbox.offer(messages)

    def disk_request(self) -> tuple[int, int] | None:
        """What to read from the store for this link now, as (after_seq, limit): up to
        `limit` pending messages above `after_seq`, in seq order; hand them to `refill`.
        None: nothing waits on disk, or the window has too little room to be worth a read."""
        return self._outbox.disk_request()

    def refill(self, rows: Sequence[Envelope]) -> None:
        """The rows a `disk_request` read: hold what the window takes. A short read taken
        whole means the disk has nothing older than what `offer` announces from now on."""
        self._outbox.refilled(rows, self.enqueue(rows))

    def admit(self, messages: Sequence[Envelope]) -> int:
        """How many of `messages`, from the first, fit in the window now (both its message
        count and its bytes). An empty link admits one message whatever its size, so a body
        larger than `window_bytes` still goes."""
        return self._outbox.admit(messages)

    def enqueue(self, messages: Sequence[Envelope]) -> int:
        """Hold messages already committed to the local store, in seq order, as far as the
        window allows (`admit`); those at or below `highest_enqueued_seq` are already held
        (or delivered) and are skipped. Returns how many of `messages`, from the first, are
        now held or were already: the rest must come again later (`offer` and `refill` do
        that through the disk)."""
        return self._outbox.enqueue(messages)


    def batch_dropped(self, batch: Batch) -> None:
        """The node could not queue `batch` (the socket was full or gone): a later answer
        from the peer does not prove it arrived, so its first timeout resends it."""
        self._outbox.batch_dropped(batch.tx_at_ns)

    def retry_soon(self, now: float) -> None:
        """The peer was heard again out of band (a discovery beacon): a refused link asks
        again at the next `poll` rather than after `REFUSED_RETRY_S`."""
        if self.state is LinkState.REFUSED:
            self._next_hello_at = min(self._next_hello_at, now)

    def poll(self, now: float, wall_ns: int, hlc: int) -> None:
        """Run timers: handshake retries, pings, liveness, retransmission, transmission,
        and the idle close."""
        # A deadline is missed by this node only if it passed while nothing reached the link:
        # one made due at once (`_arm` after a Pong) or passed while frames came is not.
        seen, self._seen_at = self._seen_at, now
        recovery = self._recovery
        if self.state is LinkState.IDLE:
            self.pump(now, wall_ns)  # a message queued while idle opens the link
            if self.state is LinkState.IDLE:
                return
        if self._idle_due(now):
            self._close_idle()
            return
        self._resume(now)
        watch_until = self._watch_until()
        if self.state is not LinkState.READY:
            # A redial's Hello is the new connection's first frame.
            if (recovery.redial(now, self.state is LinkState.LOST, seen)
                    or now >= self._next_hello_at):
                self._send_hello(now, wall_ns, hlc)
        elif now >= self._next_ping_at and (self._next_ping_at <= watch_until
                                            or self._ping_owed):
            # Any frame from the peer proves it alive: ping only a link quiet for a ping
            # interval, and put the Ping before anything else this poll sends. A link with
            # nothing to do and no recent activity pings no more (its silence costs nothing).
            # (The first Ping after a Welcome goes anyway: its Pong is the first clock sample.)
            heard = self._heard_at()
            if heard is None or self._ping_owed or now >= heard + self._ping_interval:
                self._ping_owed = False
                recovery.ping(wall_ns, now)
                self._next_ping_at = now + self._ping_interval
            else:
                self._next_ping_at = heard + self._ping_interval
        heard = self._heard_at()
        if (
            self.state is LinkState.READY
            and heard is not None
            # Same expressions as in next_timer(): polling at that time must make progress.
            and heard + self._peer_timeout <= watch_until
            and now >= heard + self._peer_timeout
            and not recovery.excuse_own_stall(now, max(heard + self._peer_timeout, seen),
                                              wall_ns)
        ):
            self._move(LinkInput.SILENCE)
            recovery.lost(now)
            self._next_hello_at = now
            self._events.append(PeerLost(self.peer, now - heard))
            self._send_hello(now, wall_ns, hlc)
        deadline = recovery.rto_deadline
        if self.state is LinkState.READY and deadline is not None and now >= deadline:
            recovery.timed_out(now, seen, wall_ns)
        self.pump(now, wall_ns)

    def _heard_at(self) -> float | None:
        """Since when silence counts: the last frame heard, or the end of a quiet spell."""
        heard = self.last_heard
        return heard if heard is None or heard >= self._silence_from else self._silence_from

    def _resume(self, now: float) -> None:
        """Messages to send after a quiet spell in which nobody asked the peer anything: its
        silence counts from now, not from the last frame heard long ago."""
        # (`recently_active`, inline: this runs at every pump.)
        if self._queue and not self._inflight and not self.watched \
                and now > self._active_at + self.recent_s:
            self._silence_from = self._active_at = now

    def _idle_due(self, now: float) -> bool:
        return (self.link_idle_s > 0 and not self.has_work
                and now >= self._active_at + self.link_idle_s)

    def _close_idle(self) -> None:
        """Nothing to send for `link_idle_s`: tell a listener that welcomed us to forget the
        session (`Close`), then go `IDLE`; the node closes the socket after these frames."""
        was_ready = self.state is LinkState.READY
        self._move(LinkInput.IDLE_TIMEOUT)
        if was_ready:
            self._frames.append(Close())
        self._recovery.rto_deadline = None
        self._outbox.flights.clear()
        self._ping_owed = False

    def _open(self, now: float) -> None:
        if self._move(LinkInput.OPEN):
            self._active_at = self._silence_from = now
            self._next_hello_at = now

    def peer_left(self, now: float, reason: str) -> None:
        """The peer said it is shutting down (its Bye reached our listener: `PeerLeft`): count
        it as gone now, send nothing until it welcomes us again, and say Hello at the usual
        pace. Reported (`PeerLeft` from this link) only if it was reachable. Said again while
        the link counts the peer gone, it changes nothing: the Hello stays due a ping interval
        after the first (a Bye's name and node id are no proof, and each Bye pushing the
        Hello back let Byes faster than the ping interval keep the link down for good)."""
        if self.state is LinkState.LEFT:
            return
        was_reachable = self.reachable
        if not self._move(LinkInput.BYE):
            return
        self._recovery.rto_deadline = None
        self._next_hello_at = now + self._ping_interval
        if was_reachable:
            self._events.append(PeerLeft(self.peer, reason))

    def receive(self, data: bytes, now: float, wall_ns: int, hlc: int) -> None:
        """Take one frame's bytes the peer sent on this link. Bytes that do not decode, and
        frames not for a dialer, are reported (`ViolationDetected`) and change nothing; a
        frame the link's state does not take (`TRANSITIONS`) is ignored as stale (every
        frame, while `IDLE`: it has no connection)."""
        try:
            frame = decode(data, max_bytes=self.max_frame_bytes)
        except ProtocolError as exc:
            self._events.append(ViolationDetected(self.peer, exc))
            return
        kind = _FRAME_INPUTS.get(type(frame))
        if kind is None:
            self._events.append(ViolationDetected(self.peer, MalformedFrame(
                f"{type(frame).__name__} is not for a dialer")))
            return
        if isinstance(frame, Refuse) and frame.code == RefuseCode.HELLO_REQUIRED:
            kind = LinkInput.HELLO_REQUIRED
        elif isinstance(frame, Welcome) and frame.name != self.peer:
            # The endpoint configured for `peer` is another node (a misconfiguration, on
            # either side): no session with `peer`, and never its answer about who `peer` is
            # (docs/protocol.md 6.2.1 takes a Welcome on our own link as that answer). Taken
            # as a refusal, retried as rarely, so that the operator sees why.
            kind = LinkInput.REFUSE
            frame = Refuse(code=RefuseCode.IDENTITY, detail=(
                f"the endpoint configured for {self.peer!r} is node {frame.name!r} "
                f"(node id {frame.node_id}), not {self.peer!r}"))
        before = self.state
        if not self._move(kind):
            return
        self.last_heard = now
        self.last_heard_wall_ns = wall_ns
        self.frames_heard += 1
        self._seen_at = now
        if self._recovery.wants_heard:
            self._recovery.heard(now, self.state is LinkState.LOST)
        match frame:  # (receipts first: they are nearly every frame a dialer takes)
            case ReceiptFrame(echo_tx_at_ns=echo):
                outbox = self._outbox
                settled = outbox.settle(frame.ranges)
                self.offset.add(echo, frame.received_at_ns, frame.replied_at_ns, wall_ns)
                if echo > outbox.answered_tx_ns and echo <= wall_ns:
                    outbox.answered_tx_ns = echo
                if settled:
                    self._active_at = now
                    self._events.append(MessagesDelivered(self.peer, settled, frame, wall_ns))
                    self._recovery.receipted(settled, echo, now, wall_ns)
            case Welcome():
                self._on_welcome(frame, before, now, wall_ns)
            case Refuse(code=code, detail=detail):
                self._on_refuse(code, detail, before, now, wall_ns, hlc)
            case Reject(seqs=seqs, code=code, detail=detail):
                settled = self._outbox.reject(seqs)
                if settled:
                    self._events.append(MessagesRejected(self.peer, settled, code, detail))
            case Pong(echo_sent_at_ns=t1, received_at_ns=t2, replied_at_ns=t3, pending=pending):
                self.offset.add(t1, t2, t3, wall_ns)
                self._recovery.pong(t1, pending, now, wall_ns)
            case _:  # pragma: no cover - _FRAME_INPUTS filters the rest
                pass
        if self._queue:  # (`pump` moves nothing without)
            self.pump(now, wall_ns)

    def _move(self, kind: LinkInput) -> bool:
        """Take `kind` in the current state (`TRANSITIONS`); False if this state does not."""
        after = TRANSITIONS.get((self.state, kind))
        if after is None:
            return False
        self.state = after
        return True

    # -- outputs --------------------------------------------------------------------------

    def frames_to_send(self) -> list[Frame]:
        frames, self._frames = self._frames, []
        return frames

    def events(self) -> list[Event]:
        events, self._events = self._events, []
        return events

    def output(self) -> tuple[list[Frame], list[Event]]:
        """`frames_to_send()` and `events()` in one call: what the node takes after every
        input (twice a single send), where a call each cost more than the taking."""
        frames, events = self._frames, self._events
        self._frames, self._events = [], []
        return frames, events

    def next_timer(self) -> float:
        """Monotonic time at which `poll` next has work to do: `math.inf` when it has none
        (an `IDLE` link with nothing queued, or a quiet one that never idles out)."""
        state = self.state
        if state is _IDLE:
            return self._next_hello_at if self._queue else math.inf
        # `has_work`, `_watch_until` and `_heard_at` are inline here, sharing their first
        # test: the node asks this after every frame in or out (twice a single send).
        expecting = bool(self._queue or self._inflight) or self.watched
        idle_at = (self._active_at + self.link_idle_s
                   if self.link_idle_s > 0 and not (expecting or self._outbox.disk_backlog)
                   else math.inf)
        if state is not _READY:
            redial_at = self._recovery.redial_at(state is LinkState.LOST)
            return min(self._next_hello_at, idle_at, redial_at)
        # Pings and the silence timer run only while watching: while answers are expected, or
        # until the recent window ends (then nothing is due until the idle close).
        watch_until = math.inf if expecting else self._active_at + self.recent_s
        deadline = self._next_ping_at
        if not (deadline <= watch_until or self._ping_owed):
            deadline = math.inf
        # (Comparisons, not `min()`: a call of the builtin costs ~1,000 instructions, and
        # this is on every frame's path.)
        rto_deadline = self._recovery.rto_deadline
        if rto_deadline is not None and self._inflight and rto_deadline < deadline:
            deadline = rto_deadline
        heard = self.last_heard
        if heard is not None and heard < self._silence_from:
            heard = self._silence_from
        if heard is not None:
            silent_at = heard + self._peer_timeout
            if silent_at <= watch_until and silent_at < deadline:
                deadline = silent_at
        return idle_at if idle_at < deadline else deadline

    # -- internals ------------------------------------------------------------------------

    def _send_hello(self, now: float, wall_ns: int, hlc: int) -> None:
        self._hello_sent_at = now
        self._hellos_unanswered += 1
        self._frames.append(
            Hello(
                version=PROTOCOL_VERSION,
                node_id=self.local_node_id,
                name=self.local_name,
                sent_at_ns=wall_ns,
                hlc=hlc,
                resume=self._resume_token,
            )
        )
        retry = REFUSED_RETRY_S if self.state is LinkState.REFUSED else self._ping_interval
        self._next_hello_at = now + retry

    def _on_welcome(self, frame: Welcome, before: LinkState, now: float, wall_ns: int) -> None:
        was_ready = before is LinkState.READY
        hellos, self._hellos_unanswered = self._hellos_unanswered, 0
        self.refusal = None
        self.peer_node_id = frame.node_id
        self._resume_token = frame.resume
        self._active_at = now  # a link just usable is active: watched for the recent window
        self._next_ping_at = now
        self._ping_owed = True
        if not was_ready:
            self._events.append(PeerConnected(self.peer, frame.node_id))
        if self._inflight and before in _SESSION_GONE:
            # The peer refused our frames (it lost our session) or left: what was in flight
            # never reached its store. Resend it now, as new flights.
            self._outbox.resend_all(now, wall_ns, self._frames)
        if not was_ready:
            # A new session: what the old one proved arrived may have died with the peer.
            self._outbox.answered_tx_ns = 0
        if self._recovery.welcomed(not was_ready, before is LinkState.LOST, hellos,
                                   now - self._hello_sent_at, now, wall_ns):
            # After a loss the recovery's probe is this session's first Ping.
            self._ping_owed = False
            self._next_ping_at = now + self._ping_interval

    def _on_refuse(
        self, code: str, detail: str, before: LinkState, now: float, wall_ns: int, hlc: int
    ) -> None:
        if code == RefuseCode.HELLO_REQUIRED:
            # The peer restarted or lost our session: handshake again, then resend. Every
            # frame sent meanwhile is refused too; one Hello (and its retry timer) answers all.
            if before in (LinkState.READY, LinkState.REFUSED):
                self._send_hello(now, wall_ns, hlc)
            return
        self.refusal = f"{code}: {detail}"
        # The Refuse answered the Hellos sent: a Welcome the peer sends later (once it has
        # checked our claim to our name: docs/protocol.md 6.2) is no round-trip sample.
        self._hellos_unanswered = 0
        self._next_hello_at = now + REFUSED_RETRY_S
        self._events.append(LinkRefused(self.peer, code, detail))

    def pump(self, now: float, wall_ns: int) -> None:
        """Put what `enqueue` queued in flight now (if the handshake is done and the window
        allows), not at the next timer tick: call it after `enqueue` (or `offer`), then
        collect `frames_to_send()`. The link pumps itself after every poll and frame."""
        if self.state is not _READY or not self._queue:
            if self._queue and self.state is _IDLE:
                self._open(now)  # the Hello goes at the next poll (the node wakes for it)
            return
        self._resume(now)
        self._active_at = now
        # A running timer may be a held batch's long one (`_arm`): fresh batches still time
        # out after an RTO.
        recovery = self._recovery
        deadline = recovery.rto_deadline
        if deadline is None or deadline > now + recovery.rto:
            recovery.rto_deadline = now + recovery.rto
        self._outbox.launch(now, wall_ns, self._frames)

    def __repr__(self) -> str:
        return (
            f"DialerLink({self.local_name}->{self.peer}, {self.state.value}, "
            f"reachable={self.reachable}, queued={len(self._queue)}, "
            f"inflight={len(self._inflight)})"
        )

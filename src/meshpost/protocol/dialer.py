"""The dialer's side of one link (this node -> one peer): handshake, windowed transmission,
retransmission with backoff, receipts, liveness and clock samples, and whether the link is
worth a connection at all (lazy opening, idle close).

Rule: pure state. Inputs are the peer's bytes, committed messages (`offer`), rows read from
disk (`refill`) and the current time (`now` is a monotonic reading in seconds, `wall_ns` the
wall clock); outputs are `frames_to_send()`, `events()`, `disk_request()` and `next_timer()`.
It never waits, sleeps, logs or touches a socket. What the link holds and sends (the window,
what waits on disk, batches and their flights) is its `Outbox` (protocol/outbox.py); the link
decides when: the handshake, timers, retransmission and liveness.
"""

from __future__ import annotations

import collections
import enum
import math
import operator
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
    RedialWanted,
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
    Ping,
    Pong,
    ReceiptFrame,
    Refuse,
    RefuseCode,
    Reject,
    Welcome,
    max_frame_bytes,
)
from meshpost.protocol.outbox import HELD_MESSAGE_OVERHEAD, Outbox, held_size
from meshpost.protocol.rto import RtoEstimator

# The batch limits and the window's measure are importable from here, as before the outbox
# became its own module.
__all__ = ["HELD_MESSAGE_OVERHEAD", "LOSS_WINDOW", "MAX_BATCH_BODY_BYTES", "MAX_BATCH_MESSAGES",
           "REFUSED_RETRY_S", "RETRIED_HANDSHAKE_RTO_S", "STALL_GRACE", "TRANSITIONS",
           "DialerLink", "LinkInput", "LinkState", "held_size"]

#: After a refusal for a reason only an operator can fix, ask again this rarely.
REFUSED_RETRY_S = 10.0
#: The least timeout of a link whose handshake needed Hello again, until its first round-trip
#: sample (RFC 6298 5.7: a retransmitted SYN leaves a 3 s RTO for the data): a peer that took
#: longer than a ping interval to welcome us is slow now, and no sample says how slow.
RETRIED_HANDSHAKE_RTO_S = 3.0
#: A silence deadline polled more than this many ping intervals late was missed by this node
#: (stopped or starved of CPU), not by the peer: what the peer sent may wait unread.
STALL_GRACE = 0.5
#: At a timeout after an unanswered probe, the most messages resent (the oldest unsettled):
#: as TCP resends one segment at a timeout, not its flight (RFC 5681's loss window). A
#: silent peer is usually not reading rather than losing frames (a stream loses none while
#: its connection lives): the whole window resent into its silence waits unread beside the
#: first copies, and is read twice over. A peer that answers says what it lacks instead.
LOSS_WINDOW = 4


class LinkState(enum.Enum):
    IDLE = "idle"  # no connection: nothing to send yet, or nothing for link_idle_s (closed)
    CONNECTING = "connecting"  # Hello sent, no Welcome yet
    READY = "ready"  # handshake done; data flows; the only state counted reachable
    LOST = "lost"  # was ready, then silent for peer_timeout_s; Hello sent again
    LEFT = "left"  # the peer said Bye; Hello at the usual pace until it is back
    REFUSED = "refused"  # the peer refused us; retry rarely


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
        self._rto_max = retransmit_max_s
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
        self._rto = retransmit_initial_s
        #: Smoothed round trip (batch sent -> its receipt back, which includes the peer's
        #: commit) and its mean deviation, from receipts; None until the first sample.
        self._rtt = RtoEstimator(retransmit_initial_s, retransmit_max_s)
        #: The same for the frames the peer answers at once (Hello -> Welcome, Ping -> Pong):
        #: the least a receipt can take, known before the first batch goes (the handshake).
        self._path_rtt = RtoEstimator(retransmit_initial_s, retransmit_max_s)
        #: When the last Hello went, and how many went since the last Welcome (a Welcome
        #: answering one of several is no sample: which one it answers is unknown).
        self._hello_sent_at = 0.0
        self._hellos_unanswered = 0
        #: The last handshake needed Hello more than once (see RETRIED_HANDSHAKE_RTO_S).
        self._handshake_retried = False
        #: Messages resent although their first transmission was receipted after all.
        self.spurious_retransmissions = 0
        #: The latest round trip of an immediate answer (Welcome to a lone Hello, Pong), when
        #: it arrived (monotonic), and how many came so far; and how many frames the peer sent
        #: that this link took: what a probe compares before and after.
        self.last_answer_rtt_s: float | None = None
        self.last_answer_at: float | None = None
        self.answers = 0
        self.frames_heard = 0
        self._rto_deadline: float | None = None
        #: When a receipt last settled something (the timer restarts from there).
        self._progress_at = now
        #: The tx time of the probe Ping of the current stall (a timeout's Ping instead of a
        #: resend; None: none since a receipt last settled something), and when it went.
        self._probe_tx_ns: int | None = None
        self._probe_at = now
        #: A Pong echoing that probe came (every batch sent before it reached the peer).
        self._probe_answered = False
        #: The latest Pings sent, as (wall tx, monotonic time): a Pong's echo names the
        #: batches sent before its Ping by the monotonic clock, which never jumps.
        self._pings: collections.deque[tuple[int, float]] = collections.deque(maxlen=8)
        #: The probe sent on a Welcome after a loss: its Pong says what the peer lacks. And
        #: whether its answer "nothing pending" is yet to be confirmed (`_after_loss_probe`).
        self._loss_probe_tx_ns: int | None = None
        self._loss_unconfirmed = False
        #: The peer's Pongs say how many of our batches it is still storing (`pending` is
        #: not -1): a batch it holds is then never resent for want of a receipt, only probed.
        self._pending_known = False
        self._next_hello_at = 0.0
        self._next_ping_at = 0.0
        #: When the link last had something to do (opened, sent a batch, settled a message):
        #: the recent window and the idle period count from here.
        self._active_at = now
        #: Silence is measured from here when later than `last_heard`: the link started
        #: expecting answers again after a quiet spell in which nobody asked the peer anything.
        self._silence_from = now
        self._ping_owed = False
        #: A late silence deadline was excused as this node's own stall (`_excuse_own_stall`)
        #: and no frame came since: the next one is the peer's silence.
        self._stall_excused = False
        #: The same for the retransmission deadline (a probe instead of a resend).
        self._rto_stall_excused = False
        self._excused_at: float | None = None
        #: The last `now` a poll or a frame brought: this node was running then.
        self._seen_at = now
        #: How many stalls of this node were excused so far (a sign it is starved of CPU).
        self.stalls_excused = 0
        #: While `LOST`: since when the connection is silent (the loss, or the last frame
        #: heard since); `peer_timeout_s` later the node is asked to redial (`RedialWanted`).
        #: None once asked, and until the next loss.
        self._redial_from: float | None = None
        self._frames: list[Frame] = []
        self._events: list[Event] = []

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
    def needs_connection(self) -> bool:
        """The link wants a socket to its peer (every state but `IDLE`): open one before
        sending its frames, and close it after sending them once this turns False."""
        return self.state is not LinkState.IDLE

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
        return self._outbox.wants_disk

    def wants_refill(self) -> bool:
        """A quarter of the window is free in messages and in bytes: worth a read from disk
        (fewer, larger reads than refilling one receipt at a time)."""
        return self._outbox.wants_refill()

    def offer(self, messages: Sequence[Envelope]) -> None:
        """`messages` (for this peer, in seq order) are committed to the local store: hold
        what the window takes; the rest stay on disk for `disk_request`. Frames leave on the
        next `pump` or `poll`, so several offers can go out in the same batch frames."""
        if self._outbox.offered(messages):
            self.enqueue(messages)

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

    def pump(self, now: float, wall_ns: int) -> None:
        """Put what `enqueue` queued in flight now (if the handshake is done), not at the
        next timer tick: call it after `enqueue`, then collect `frames_to_send()`."""
        self._pump(now, wall_ns)

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
        if self.state is LinkState.IDLE:
            self._pump(now, wall_ns)  # a message queued while idle opens the link
            if self.state is LinkState.IDLE:
                return
        if self._idle_due(now):
            self._close_idle()
            return
        self._resume(now)
        watch_until = self._watch_until()
        if self.state is not LinkState.READY:
            redial_from = self._redial_from
            redial = self._redial_due(now)
            if redial:
                # The Hello that goes with it is the new connection's first frame.
                heard = self.last_heard
                assert redial_from is not None
                self._events.append(RedialWanted(
                    self.peer, now - (redial_from if heard is None else heard)))
                self._redial_from = None
            if redial or now >= self._next_hello_at:
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
                self._ping(wall_ns, now)
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
            and not self._excuse_own_stall(now, max(heard + self._peer_timeout, seen),
                                           wall_ns)
        ):
            self._move(LinkInput.SILENCE)
            self._redial_from = now
            self._next_hello_at = now
            self._rto_deadline = None
            self._events.append(PeerLost(self.peer, now - heard))
            self._send_hello(now, wall_ns, hlc)
        if (
            self.state is LinkState.READY
            and self._rto_deadline is not None
            and now >= self._rto_deadline
        ):
            if (not self._rto_stall_excused
                    and now - max(self._rto_deadline, seen)
                    > STALL_GRACE * self._ping_interval):
                # Polled long after the deadline: this node's stall, and the receipts that
                # settle the window may wait unread. Probe and time out an RTO from now,
                # rather than resend the window (once until the peer is heard again).
                self._rto_stall_excused = True
                if self._excused_at != now:  # one stall, however many deadlines it missed
                    self.stalls_excused += 1
                self._excused_at = now
                self._probe(wall_ns, now)
                self._rto_deadline = now + self._rto
            else:
                self._retransmit_due(now, wall_ns)
        self._pump(now, wall_ns)

    def _redial_due(self, now: float) -> bool:
        """The link is still lost `peer_timeout_s` after its loss, and its connection has been
        silent all that while (nothing heard since the loss, or since the last frame heard
        while lost): its Hellos went unanswered. A connection whose peer is gone without a
        reset (half-open) or is no longer its peer's is then replaced; the node redials it
        (`RedialWanted`). A peer merely stopped or starved answers within that time once it
        runs (its Hello waits behind the frames queued before it, which the old connection
        keeps: a new one would discard them, and they would go again)."""
        return (self.state is LinkState.LOST and self._redial_from is not None
                and now >= self._redial_from + self._peer_timeout)

    def _excuse_own_stall(self, now: float, silent_at: float, wall_ns: int) -> bool:
        """This poll comes long after the silence deadline it asked for (`silent_at`): this
        node was not running then (stopped, starved of CPU), and what the peer sent meanwhile
        may wait unread in its socket. Once per silence, count that as no silence of the
        peer's: ping it now and give it a ping interval from now. True if excused."""
        if self._stall_excused or now - silent_at <= STALL_GRACE * self._ping_interval:
            return False
        self._stall_excused = True
        self.stalls_excused += 1
        self._excused_at = now
        self._silence_from = now + self._ping_interval - self._peer_timeout
        self._ping_first(wall_ns, now)
        self._next_ping_at = now + self._ping_interval
        return True

    def _ping(self, wall_ns: int, now: float) -> int:
        """A Ping ahead of everything this poll sends; its tx time."""
        self._frames.insert(0, Ping(sent_at_ns=wall_ns))
        self._pings.append((wall_ns, now))
        return wall_ns

    def _ping_first(self, wall_ns: int, now: float) -> int:
        """`_ping`, unless this poll's frames start with one already (one per poll is
        enough): the tx time of the Ping that goes first."""
        frames = self._frames
        first = frames[0] if frames else None
        if isinstance(first, Ping):
            return first.sent_at_ns
        return self._ping(wall_ns, now)

    def _probe(self, wall_ns: int, now: float) -> int:
        """Ask the peer what it holds: a Ping first, as the probe of this stall."""
        tx_ns = self._ping_first(wall_ns, now)
        self._probe_tx_ns, self._probe_at, self._probe_answered = tx_ns, now, False
        return tx_ns

    def _heard_at(self) -> float | None:
        """Since when silence counts: the last frame heard, or the end of a quiet spell."""
        heard = self.last_heard
        return heard if heard is None or heard >= self._silence_from else self._silence_from

    def _resume(self, now: float) -> None:
        """Messages to send after a quiet spell in which nobody asked the peer anything: its
        silence counts from now, not from the last frame heard long ago."""
        if self._queue and not self._inflight and not self.watched \
                and not self.recently_active(now):
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
        self._rto_deadline = None
        self._outbox.flights.clear()
        self._ping_owed = False

    def _open(self, now: float) -> None:
        if self._move(LinkInput.OPEN):
            self._active_at = self._silence_from = now
            self._next_hello_at = now

    def peer_left(self, now: float, reason: str) -> None:
        """The peer said it is shutting down (its Bye reached our listener: `PeerLeft`): count
        it as gone now, send nothing until it welcomes us again, and say Hello at the usual
        pace. Reported (`PeerLeft` from this link) only if it was reachable."""
        was_reachable = self.reachable
        if not self._move(LinkInput.BYE):
            return
        self._rto_deadline = None
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
        before = self.state
        if not self._move(kind):
            return
        self.last_heard = now
        self.last_heard_wall_ns = wall_ns
        self.frames_heard += 1
        self._seen_at = now
        if self._redial_from is not None:  # the connection is read: not redialled yet
            self._redial_from = now if self.state is LinkState.LOST else None
        self._stall_excused = self._rto_stall_excused = False
        match frame:
            case Welcome():
                self._on_welcome(frame, before, now, wall_ns)
            case Refuse(code=code, detail=detail):
                self._on_refuse(code, detail, before, now, wall_ns, hlc)
            case ReceiptFrame():
                self._on_receipt(frame, now, wall_ns)
            case Reject(seqs=seqs, code=code, detail=detail):
                settled = self._outbox.reject(seqs)
                if settled:
                    self._events.append(MessagesRejected(self.peer, settled, code, detail))
            case Pong(echo_sent_at_ns=t1, received_at_ns=t2, replied_at_ns=t3, pending=pending):
                self.offset.add(t1, t2, t3, wall_ns)
                self._answered((wall_ns - t1) / 1e9, now)
                if t1 <= wall_ns:
                    if self._answers_probe(t1, self._loss_probe_tx_ns):
                        self._loss_probe_tx_ns = None
                        self._after_loss_probe(t1, pending, now, wall_ns)
                    else:  # (while a loss is being asked about, only its probes decide)
                        self._on_pong(t1, pending, now, final=self._loss_probe_tx_ns is None)
            case _:  # pragma: no cover - _FRAME_INPUTS filters the rest
                pass
        self._pump(now, wall_ns)

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

    def next_timer(self) -> float:
        """Monotonic time at which `poll` next has work to do: `math.inf` when it has none
        (an `IDLE` link with nothing queued, or a quiet one that never idles out)."""
        state = self.state
        if state is LinkState.IDLE:
            return self._next_hello_at if self._queue else math.inf
        busy = self.has_work
        idle_at = (self._active_at + self.link_idle_s
                   if self.link_idle_s > 0 and not busy else math.inf)
        if state is not LinkState.READY:
            redial_at = (self._redial_from + self._peer_timeout
                         if self._redial_from is not None and state is LinkState.LOST
                         else math.inf)
            return min(self._next_hello_at, idle_at, redial_at)
        # Pings and the silence timer run only while watching: while answers are expected, or
        # until the recent window ends (then nothing is due until the idle close).
        watch_until = self._watch_until()
        deadline = self._next_ping_at
        if not (deadline <= watch_until or self._ping_owed):
            deadline = math.inf
        if self._rto_deadline is not None and self._inflight:
            deadline = min(deadline, self._rto_deadline)
        heard = self._heard_at()
        if heard is not None and heard + self._peer_timeout <= watch_until:
            deadline = min(deadline, heard + self._peer_timeout)
        return min(deadline, idle_at)

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
            )
        )
        retry = REFUSED_RETRY_S if self.state is LinkState.REFUSED else self._ping_interval
        self._next_hello_at = now + retry

    def _on_welcome(self, frame: Welcome, before: LinkState, now: float, wall_ns: int) -> None:
        was_ready = before is LinkState.READY
        if self._hellos_unanswered == 1:
            self._answered(now - self._hello_sent_at, now)
        elif self._hellos_unanswered > 1:
            self._handshake_retried = True
        self._hellos_unanswered = 0
        self.refusal = None
        self.peer_node_id = frame.node_id
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
            self._probe_tx_ns, self._probe_answered = None, False
        self._rto = self.base_rto
        self._rto_deadline = now + self._rto if self._inflight else None
        if self._inflight and before is LinkState.LOST:
            # After mere silence the peer may hold all of it: still unread in its socket,
            # or being stored, its answers sent on the connection this node closed when it
            # redialled (the peer forwards them to this new session). Ask rather than resend
            # the window: a probe now, whose Pong says what is still pending (`_on_pong`).
            self._loss_probe_tx_ns = self._probe(wall_ns, now)
            self._ping_owed = False
            self._next_ping_at = now + self._ping_interval
            self._loss_unconfirmed = True

    @property
    def base_rto(self) -> float:
        """The retransmission timeout before backoff: `retransmit_initial_s`, or more when
        receipts take longer (a busy peer committing big batches is slow, not gone), as
        SRTT + max(G, 4 * RTTVAR) (RFC 6298), never above `retransmit_max_s`. Never below
        what the same formula gives for the peer's immediate answers (Welcome, Pong): a
        receipt is not faster than those, and the handshake is measured before the first
        batch leaves, when receipts have given no sample yet."""
        base = max(self._rtt.base_s, self._path_rtt.base_s)
        if self._handshake_retried:
            if self._rtt.srtt_s is None and self._path_rtt.srtt_s is None:
                return max(base, min(RETRIED_HANDSHAKE_RTO_S, self._rto_max))
            self._handshake_retried = False
        return base

    @property
    def path_srtt_s(self) -> float | None:
        """The smoothed round trip of the peer's immediate answers (Welcome, Pong)."""
        return self._path_rtt.srtt_s

    @property
    def srtt_s(self) -> float | None:
        """The smoothed round trip of this link's receipts; None before the first sample."""
        return self._rtt.srtt_s

    @property
    def rto(self) -> float:
        """The retransmission timeout in force now (`base_rto`, or more after backoff)."""
        return self._rto

    def _retransmit_due(self, now: float, wall_ns: int) -> None:
        """The timer ran out (no receipt settled anything for an RTO). What goes again is
        what the peer's answers show it lacks; a timeout itself only asks:

        - a batch sent an RTO ago or earlier and still unreceipted, not known to have reached
          the peer (it answered no later frame: `answered_tx_ns`), is *probed*: a Ping goes
          instead, and its Pong says whether the batches arrived (frames arrive in order)
          and whether the peer is still storing them (`pending`). Only if that probe is
          unanswered at the next timeout does the oldest of them go again, and of it at most
          `LOSS_WINDOW` messages: a silent peer is usually not reading, not losing frames;
        - a batch known not to have reached the peer's store (this node failed to queue it,
          or a Pong said nothing is pending while it was unreceipted) goes again whole;
        - a batch the peer is known to hold is only waiting for its commit: after
          `retransmit_max_s` without progress it is probed if the peer's Pongs say what is
          pending (their answer decides), resent only if they do not (an older peer).

        Every probe and resend backs the timeout off."""
        outbox = self._outbox
        if not outbox.inflight:
            outbox.flights.clear()
            self._rto_deadline = None
            return
        # A held batch goes stale after retransmit_max_s without progress since it was sent
        # (as `_arm` times it), or since the last probe for a peer whose Pong will say.
        stale_from = (max(self._progress_at, self._probe_at) if self._pending_known
                      else self._progress_at)
        due, kept = outbox.overdue(now - self._rto, now - self._rto_max, stale_from)
        answered, dropped = outbox.answered_tx_ns, outbox.dropped_tx
        # Due: batches known lost (dropped), held ones gone stale, and the rest, not known to
        # have arrived (unproven).
        held = [f for f in due if f[1] <= answered and f[1] not in dropped]
        unproven = [f for f in due if f[1] > answered and f[1] not in dropped]
        lost = len(held) + len(unproven) < len(due)
        # A peer whose Pongs say what is pending is asked about a held batch, never sent it
        # again for want of a receipt.
        ask_held = self._pending_known and bool(held)
        asked = self._probe_tx_ns is not None
        answered_probe = asked and self._probe_answered
        resend: list[Envelope] = []
        probing = cut = False
        if lost:
            resend = outbox.unsettled(due)
        elif (unproven or ask_held) and (not asked or (
                answered_probe and all(f[0] > self._probe_at for f in unproven))):
            # Nothing asked yet in this stall, or the last probe was answered and what is
            # due left after it: ask (again).
            probing = True
            self._probe(wall_ns, now)
            kept.extend(due)
            self._rto = min(self._rto * 2, self._rto_max)
        elif unproven and not answered_probe:
            # Nothing answered the probe: of the unproven batches only the oldest goes
            # again, and of it the loss window.
            first = unproven[0]
            kept.extend(unproven[1:])
            unsettled = outbox.unsettled([first])
            resend = unsettled[:LOSS_WINDOW]
            if len(unsettled) > LOSS_WINDOW:
                kept.append((first[0], first[1], unsettled[LOSS_WINDOW:]))
            cut = True
        else:
            # The probe was answered, yet these look unproven (the wall clock went back):
            # as before probes, they go again.
            resend = outbox.unsettled(unproven)
        if held and not (probing or lost):  # (lost: everything due went again)
            if self._pending_known:
                kept.extend(held)
            else:  # an older peer: a held batch goes again after retransmit_max_s
                resend = sorted({m.seq: m for m in resend + outbox.unsettled(held)}.values(),
                                key=operator.attrgetter("seq"))
        kept.sort(key=operator.itemgetter(0))
        outbox.restore(kept)
        if resend:
            outbox.resend(resend, now, wall_ns, self._frames)
            self._rto = min(self._rto * 2, self._rto_max)
        self._arm(now, probing=probing or cut)
        if self._rto_deadline is not None and self._rto_deadline <= now:
            # Held batches this timeout left to a probe (or to the silence timer): an RTO on.
            self._rto_deadline = now + self._rto

    def _arm(self, now: float, *, probing: bool = False) -> None:
        """The retransmission timer: the first unproven flight's RTO, or the peer's
        `retransmit_max_s` of no progress for flights it is known to hold (since the last
        probe too, for a peer whose Pongs say what is pending). `probing`: a probe Ping just
        left, or the loss window went; unproven flights wait a whole (backed-off) RTO."""
        stale_from = (max(self._progress_at, self._probe_at) if self._pending_known
                      else self._progress_at)
        self._rto_deadline = self._outbox.deadline(now, stale_from, self._rto, self._rto_max,
                                                   probing=probing)

    def _answered(self, rtt_s: float, now: float) -> None:
        """The peer answered a Hello or a Ping after `rtt_s`: a path sample."""
        self._path_rtt.add_sample(rtt_s)
        self.last_answer_rtt_s, self.last_answer_at = rtt_s, now
        self.answers += 1

    def _on_pong(self, echo_ns: int, pending: int, now: float, *, final: bool = True) -> None:
        """A Pong answered our Ping sent at `echo_ns`: every batch sent before it reached the
        peer (frames arrive in order). `pending` > 0: the peer is still storing some of them,
        which is progress (a busy store, not a lost receipt: nothing is resent for want of
        it). 0: it has answered all of them (its answers came before this Pong), so one still
        unreceipted lost its receipt or could not be stored: it goes again at its timeout,
        without a probe, as a batch the node failed to queue would (a resend that fares no
        better is timed with backoff, as any). `final` False: 0 is not taken as final yet."""
        outbox = self._outbox
        outbox.answered(echo_ns)
        self._pending_known = pending >= 0
        if self._answers_probe(echo_ns, self._probe_tx_ns):
            self._probe_answered = True
        if not outbox.inflight:
            return
        if pending > 0:
            self._progress_at = max(self._progress_at, now)
        elif pending == 0 and final:
            outbox.unanswered_before(echo_ns, self._ping_sent_at(echo_ns))
        if self._rto_deadline is not None:
            self._arm(now)

    def _answers_probe(self, echo_ns: int, probe_tx_ns: int | None) -> bool:
        """A Pong echoing `echo_ns` answers the probe sent at `probe_tx_ns`: it echoes it, or
        a Ping sent after it (by the monotonic clock). Frames arrive in order, so the probe's
        own Pong would have come first: the probe or its Pong was lost (a Ping dropped at the
        high-water mark), and this later one says the same, of every batch sent before it.
        Without it a lost probe was never answered, and batches whose receipts were lost
        were never resent."""
        if probe_tx_ns is None:
            return False
        if echo_ns == probe_tx_ns:
            return True
        echoed, probed = self._ping_sent_at(echo_ns), self._ping_sent_at(probe_tx_ns)
        return echoed is not None and probed is not None and echoed > probed

    def _ping_sent_at(self, echo_ns: int) -> float | None:
        """The monotonic time the Ping a Pong echoes went, if it is one of the latest."""
        for tx_ns, sent in self._pings:
            if tx_ns == echo_ns:
                return sent
        return None

    def _after_loss_probe(self, echo_ns: int, pending: int, now: float, wall_ns: int) -> None:
        """The Pong to the probe of a Welcome after a loss: the peer's answers before it (its
        own and those forwarded from the closed connection) are in. Still pending: it is
        storing some, and the timer probes again (`_retransmit_due`). Nothing pending: what is
        still unreceipted from before the probe never reached its store, and goes now, once
        a second probe, sent at once, says so too: the old connection's frames may still wait
        unread at the peer, and its socket reads its connections in turn, so the second probe
        is read after one frame of each (then pending, if there was one). A peer that does not
        say (-1) gets what was in flight, as after any loss before."""
        if pending == 0 and self._inflight and self._loss_unconfirmed:
            self._loss_unconfirmed = False
            self._on_pong(echo_ns, pending, now, final=False)
            self._loss_probe_tx_ns = self._probe(wall_ns, now)
            return
        self._on_pong(echo_ns, pending, now)
        if not self._inflight or pending > 0:
            return
        lacking = self._outbox.take_before(echo_ns, self._ping_sent_at(echo_ns))
        if lacking:
            self._outbox.resend(lacking, now, wall_ns, self._frames)
            self._arm(now)

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
        self._next_hello_at = now + REFUSED_RETRY_S
        self._events.append(LinkRefused(self.peer, code, detail))

    def _on_receipt(self, receipt: ReceiptFrame, now: float, wall_ns: int) -> None:
        outbox = self._outbox
        settled = outbox.settle(receipt.ranges)
        self.offset.add(receipt.echo_tx_at_ns, receipt.received_at_ns, receipt.replied_at_ns,
                        wall_ns)
        echo = receipt.echo_tx_at_ns
        if echo > outbox.answered_tx_ns and echo <= wall_ns:
            outbox.answered_tx_ns = echo
        if settled:
            self._progress_at = self._active_at = now
            self._probe_tx_ns, self._probe_answered = None, False
            self._events.append(MessagesDelivered(self.peer, settled, receipt, wall_ns))
            sample_s = (wall_ns - echo) / 1e9
            first = outbox.first_resend_tx_ns
            resent = outbox.forget_resent(settled)
            if resent:
                if first is not None and echo < first:
                    # The receipt echoes a transmission older than the first resend: the
                    # original arrived, the resend was spurious (RFC 3522). Its round trip is
                    # unambiguous: a sample; the backoff is undone (RFC 4015), but the RTO
                    # stays at least the delay just seen, lest the next batch time out too.
                    self.spurious_retransmissions += resent
                    self._rtt.add_sample(sample_s)
                    self._rto = max(self.base_rto, min(self._rto_max, sample_s))
                # Else Karn's rule: a receipt of a resend is no RTT sample, and the
                # backed-off timeout stays until a first transmission is receipted.
            else:
                self._rtt.add_sample(sample_s)
                self._rto = self.base_rto
            # Progress restarts the timer (RFC 6298 5.3): a slow peer that keeps receipting
            # is not timed out batch by batch.
            if self._inflight:
                self._rto_deadline = now + self._rto
                outbox.drop_settled_flights()
            else:
                self._rto_deadline = None
                outbox.all_settled()

    def _pump(self, now: float, wall_ns: int) -> None:
        """Move queued messages into flight while the handshake is done and the window allows."""
        if self.state is not LinkState.READY or not self._queue:
            if self._queue and self.state is LinkState.IDLE:
                self._open(now)  # the Hello goes at the next poll (the node wakes for it)
            return
        self._resume(now)
        self._active_at = now
        # A running timer may be a held batch's long one (`_arm`): fresh batches still time
        # out after an RTO.
        deadline = self._rto_deadline
        if deadline is None or deadline > now + self._rto:
            self._rto_deadline = now + self._rto
        self._outbox.launch(now, wall_ns, self._frames)

    def __repr__(self) -> str:
        return (
            f"DialerLink({self.local_name}->{self.peer}, {self.state.value}, "
            f"reachable={self.reachable}, queued={len(self._queue)}, "
            f"inflight={len(self._inflight)})"
        )

"""One link's loss detection and recovery: the retransmission timer and its backoff, the probes
that ask the peer what it holds, round-trip samples (protocol/rto.py), what goes again after a
timeout or a loss, this node's own stalls excused, and when a lost link is redialled.

Rule: pure state, as the `DialerLink` that composes it: no asyncio, zmq, sqlite3 or time; the
link hands in `now` and `wall_ns`. *When* something is resent or probed is decided here; *what*
goes and how it is cut into frames is the `Outbox`'s; the handshake, liveness and the link's
state are the link's, which says what happened (a Welcome, a receipt, a Pong, a loss).
"""

from __future__ import annotations

import collections
import math
import operator
from typing import TYPE_CHECKING

from meshpost.protocol.events import RedialWanted
from meshpost.protocol.frames import Envelope, Ping
from meshpost.protocol.rto import RtoEstimator

if TYPE_CHECKING:
    from meshpost.protocol.dialer import DialerLink

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


class LossRecovery:
    """When one link resends, probes and redials, from what its peer's answers say."""

    def __init__(
        self,
        link: DialerLink,
        *,
        retransmit_initial_s: float,
        retransmit_max_s: float,
        ping_interval_s: float,
        peer_timeout_s: float,
        now: float,
    ) -> None:
        """`link`: the link that composes this (its frames, events and liveness); its outbox
        and the outbox's containers are never rebound, so they are kept at hand."""
        self._link = link
        self._outbox = outbox = link._outbox
        self._inflight = outbox.inflight
        self._rto_max = retransmit_max_s
        self._ping_interval = ping_interval_s
        self._peer_timeout = peer_timeout_s
        #: The retransmission timeout in force now (`base_rto`, or more after backoff).
        self.rto = retransmit_initial_s
        #: Smoothed round trip (batch sent -> its receipt back, which includes the peer's
        #: commit) and its mean deviation, from receipts; None until the first sample.
        self._rtt = RtoEstimator(retransmit_initial_s, retransmit_max_s)
        #: The same for the frames the peer answers at once (Hello -> Welcome, Ping -> Pong):
        #: the least a receipt can take, known before the first batch goes (the handshake).
        self._path_rtt = RtoEstimator(retransmit_initial_s, retransmit_max_s)
        #: The last handshake needed Hello more than once (see RETRIED_HANDSHAKE_RTO_S).
        self._handshake_retried = False
        #: Messages resent although their first transmission was receipted after all.
        self.spurious_retransmissions = 0
        #: The latest round trip of an immediate answer (Welcome to a lone Hello, Pong), when
        #: it arrived (monotonic), and how many came so far.
        self.last_answer_rtt_s: float | None = None
        self.last_answer_at: float | None = None
        self.answers = 0
        #: When the retransmission timer runs out (None: not running).
        self.rto_deadline: float | None = None
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
        #: A late silence deadline was excused as this node's own stall (`excuse_own_stall`)
        #: and no frame came since: the next one is the peer's silence.
        self._stall_excused = False
        #: The same for the retransmission deadline (a probe instead of a resend).
        self._rto_stall_excused = False
        #: The same for the redial deadline (once per loss: a ping interval more).
        self._redial_stall_excused = False
        self._excused_at: float | None = None
        #: How many stalls of this node were excused so far (a sign it is starved of CPU).
        self.stalls_excused = 0
        #: While `LOST`: since when the connection is silent (the loss, or the last frame
        #: heard since); `peer_timeout_s` later the node is asked to redial (`RedialWanted`).
        #: None once asked, and until the next loss.
        self._redial_from: float | None = None
        #: A frame from the peer would change something here (a stall excused, a redial
        #: timed): the link tells `heard` only then, not at every frame.
        self.wants_heard = False

    # -- what the link reports --------------------------------------------------------------

    def heard(self, now: float, lost: bool) -> None:
        """A frame from the peer was taken (`lost`: the link is still `LOST` after it): this
        node runs, and the connection is read. Needed only while `wants_heard`."""
        if self._redial_from is not None:  # the connection is read: not redialled yet
            self._redial_from = now if lost else None
        self._stall_excused = self._rto_stall_excused = self._redial_stall_excused = False
        self.wants_heard = self._redial_from is not None

    def lost(self, now: float) -> None:
        """The link went `LOST` now: no timeout until it is welcomed again, and a redial a
        silent `peer_timeout_s` from now (`redial`)."""
        self._redial_from = now
        self.rto_deadline = None
        self._redial_stall_excused = False
        self.wants_heard = True

    def welcomed(self, new_session: bool, after_loss: bool, hellos: int, hello_rtt_s: float,
                 now: float, wall_ns: int) -> bool:
        """A Welcome answered `hellos` Hellos, the last sent `hello_rtt_s` ago (a path sample
        if it answers a lone one). `new_session`: the link was not `READY`; `after_loss`: it
        was `LOST`. The timeout starts again from `base_rto`. True if a probe went (the link's
        first Ping after this Welcome)."""
        if hellos == 1:
            self._answered(hello_rtt_s, now)
        elif hellos > 1:
            self._handshake_retried = True
        if new_session:
            # A new session: what the old one proved arrived may have died with the peer.
            self._probe_tx_ns, self._probe_answered = None, False
        self.rto = self.base_rto
        self.rto_deadline = now + self.rto if self._inflight else None
        if self._inflight and after_loss:
            # After mere silence the peer may hold all of it: still unread in its socket,
            # or being stored, its answers sent on the connection this node closed when it
            # redialled (the peer forwards them to this new session). Ask rather than resend
            # the window: a probe now, whose Pong says what is still pending (`_on_pong`).
            self._loss_probe_tx_ns = self._probe(wall_ns, now)
            self._loss_unconfirmed = True
            return True
        return False

    def receipted(self, settled: list[int], echo: int, now: float, wall_ns: int) -> None:
        """A receipt settled `settled` (not empty), echoing the batch tx time `echo`: progress,
        and a round-trip sample unless what it settles was resent (Karn's rule)."""
        outbox = self._outbox
        self._progress_at = now
        self._probe_tx_ns, self._probe_answered = None, False
        sample_s = (wall_ns - echo) / 1e9
        first = outbox.first_resend_tx_ns
        resent = outbox.forget_resent(settled) if outbox.resent else 0
        if resent:
            if first is not None and echo < first:
                # The receipt echoes a transmission older than the first resend: the
                # original arrived, the resend was spurious (RFC 3522). Its round trip is
                # unambiguous: a sample; the backoff is undone (RFC 4015), but the RTO
                # stays at least the delay just seen, lest the next batch time out too.
                self.spurious_retransmissions += resent
                self._rtt.add_sample(sample_s)
                self.rto = max(self.base_rto, min(self._rto_max, sample_s))
            # Else Karn's rule: a receipt of a resend is no RTT sample, and the
            # backed-off timeout stays until a first transmission is receipted.
        else:
            self._rtt.add_sample(sample_s)
            self.rto = self.base_rto
        # Progress restarts the timer (RFC 6298 5.3): a slow peer that keeps receipting
        # is not timed out batch by batch.
        if self._inflight:
            self.rto_deadline = now + self.rto
            outbox.drop_settled_flights()
        else:
            self.rto_deadline = None
            outbox.all_settled()

    def pong(self, t1: int, pending: int, now: float, wall_ns: int) -> None:
        """A Pong echoing our Ping's tx time `t1`, saying `pending` (-1: the peer does not
        say): a path sample, and what the peer holds of what we sent before that Ping."""
        self._answered((wall_ns - t1) / 1e9, now)
        if t1 <= wall_ns:
            if self._answers_probe(t1, self._loss_probe_tx_ns):
                self._loss_probe_tx_ns = None
                self._after_loss_probe(t1, pending, now, wall_ns)
            else:  # (while a loss is being asked about, only its probes decide)
                self._on_pong(t1, pending, now, final=self._loss_probe_tx_ns is None)

    def timed_out(self, now: float, seen: float, wall_ns: int) -> None:
        """The retransmission deadline has passed (`seen`: the last `now` a poll or a frame
        brought before this poll)."""
        assert self.rto_deadline is not None
        if (not self._rto_stall_excused
                and now - max(self.rto_deadline, seen)
                > STALL_GRACE * self._ping_interval):
            # Polled long after the deadline: this node's stall, and the receipts that
            # settle the window may wait unread. Probe and time out an RTO from now,
            # rather than resend the window (once until the peer is heard again).
            self._rto_stall_excused = self.wants_heard = True
            if self._excused_at != now:  # one stall, however many deadlines it missed
                self.stalls_excused += 1
            self._excused_at = now
            self._probe(wall_ns, now)
            self.rto_deadline = now + self.rto
        else:
            self._retransmit_due(now, wall_ns)

    def redial(self, now: float, lost: bool, seen: float) -> bool:
        """True if the node should redial now (`_redial_due`, and not this node's own stall:
        `_excuse_late_redial`; `seen`: the last `now` a poll or a frame brought before this
        poll): `RedialWanted` is reported, and the Hello that goes with it is the new
        connection's first frame."""
        redial_from = self._redial_from
        redial = self._redial_due(now, lost) and not self._excuse_late_redial(now, seen)
        if redial:
            link = self._link
            heard = link.last_heard
            assert redial_from is not None
            link._events.append(RedialWanted(
                link.peer, now - (redial_from if heard is None else heard)))
            self._redial_from = None
        return redial

    def redial_at(self, lost: bool) -> float:
        """When `redial` is next due (`math.inf`: not while the link is not `LOST`)."""
        return (self._redial_from + self._peer_timeout
                if self._redial_from is not None and lost else math.inf)

    # -- the rules --------------------------------------------------------------------------

    @property
    def base_rto(self) -> float:
        """The retransmission timeout before backoff: `retransmit_initial_s`, or more when
        receipts take longer (a busy peer committing big batches is slow, not gone), as
        SRTT + max(G, 4 * RTTVAR) (RFC 6298), never above `retransmit_max_s`. Never below
        what the same formula gives for the peer's immediate answers (Welcome, Pong): a
        receipt is not faster than those, and the handshake is measured before the first
        batch leaves, when receipts have given no sample yet."""
        base, path = self._rtt.base_s, self._path_rtt.base_s
        if path > base:  # (not `max()`: asked at every receipt, and the builtin's call costs)
            base = path
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

    def _redial_due(self, now: float, lost: bool) -> bool:
        """The link is still lost `peer_timeout_s` after its loss, and its connection has been
        silent all that while (nothing heard since the loss, or since the last frame heard
        while lost): its Hellos went unanswered. A connection whose peer is gone without a
        reset (half-open) or is no longer its peer's is then replaced; the node redials it
        (`RedialWanted`). A peer merely stopped or starved answers within that time once it
        runs (its Hello waits behind the frames queued before it, which the old connection
        keeps: a new one would discard them, and they would go again)."""
        return (lost and self._redial_from is not None
                and now >= self._redial_from + self._peer_timeout)

    def _excuse_late_redial(self, now: float, seen: float) -> bool:
        """The redial deadline is due, and this poll comes long after both it and the link's
        last poll or frame (`seen`): this node was not running when it passed (stopped,
        starved of CPU), so the connection's silence is not known: the peer's answers to the
        Hellos may wait unread in its socket, and a new connection would discard them. Once
        per loss (until a frame is heard), as a late silence deadline is, give the connection
        a ping interval from now (a Hello goes with this poll: the one due long ago). True if
        excused."""
        assert self._redial_from is not None
        due_at = self._redial_from + self._peer_timeout
        if (self._redial_stall_excused
                or now - max(due_at, seen) <= STALL_GRACE * self._ping_interval):
            return False
        self._redial_stall_excused = self.wants_heard = True
        if self._excused_at != now:  # one stall, however many deadlines it missed
            self.stalls_excused += 1
        self._excused_at = now
        self._redial_from = now + self._ping_interval - self._peer_timeout
        return True

    def excuse_own_stall(self, now: float, silent_at: float, wall_ns: int) -> bool:
        """This poll comes long after the silence deadline it asked for (`silent_at`): this
        node was not running then (stopped, starved of CPU), and what the peer sent meanwhile
        may wait unread in its socket. Once per silence, count that as no silence of the
        peer's: ping it now and give it a ping interval from now. True if excused."""
        if self._stall_excused or now - silent_at <= STALL_GRACE * self._ping_interval:
            return False
        self._stall_excused = self.wants_heard = True
        self.stalls_excused += 1
        self._excused_at = now
        link = self._link
        link._silence_from = now + self._ping_interval - self._peer_timeout
        self._ping_first(wall_ns, now)
        link._next_ping_at = now + self._ping_interval
        return True

    def ping(self, wall_ns: int, now: float) -> int:
        """A Ping ahead of everything this poll sends; its tx time."""
        self._link._frames.insert(0, Ping(sent_at_ns=wall_ns))
        self._pings.append((wall_ns, now))
        return wall_ns

    def _ping_first(self, wall_ns: int, now: float) -> int:
        """`ping`, unless this poll's frames start with one already (one per poll is
        enough): the tx time of the Ping that goes first."""
        frames = self._link._frames
        first = frames[0] if frames else None
        if isinstance(first, Ping):
            return first.sent_at_ns
        return self.ping(wall_ns, now)

    def _probe(self, wall_ns: int, now: float) -> int:
        """Ask the peer what it holds: a Ping first, as the probe of this stall."""
        tx_ns = self._ping_first(wall_ns, now)
        self._probe_tx_ns, self._probe_at, self._probe_answered = tx_ns, now, False
        return tx_ns

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
            self.rto_deadline = None
            return
        # A held batch goes stale after retransmit_max_s without progress since it was sent
        # (as `_arm` times it), or since the last probe for a peer whose Pong will say.
        stale_from = (max(self._progress_at, self._probe_at) if self._pending_known
                      else self._progress_at)
        due, kept = outbox.overdue(now - self.rto, now - self._rto_max, stale_from)
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
            self.rto = min(self.rto * 2, self._rto_max)
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
            outbox.resend(resend, now, wall_ns, self._link._frames)
            self.rto = min(self.rto * 2, self._rto_max)
        self._arm(now, probing=probing or cut)
        if self.rto_deadline is not None and self.rto_deadline <= now:
            # Held batches this timeout left to a probe (or to the silence timer): an RTO on.
            self.rto_deadline = now + self.rto

    def _arm(self, now: float, *, probing: bool = False) -> None:
        """The retransmission timer: the first unproven flight's RTO, or the peer's
        `retransmit_max_s` of no progress for flights it is known to hold (since the last
        probe too, for a peer whose Pongs say what is pending). `probing`: a probe Ping just
        left, or the loss window went; unproven flights wait a whole (backed-off) RTO."""
        stale_from = (max(self._progress_at, self._probe_at) if self._pending_known
                      else self._progress_at)
        self.rto_deadline = self._outbox.deadline(now, stale_from, self.rto, self._rto_max,
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
        if self.rto_deadline is not None:
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
            self._outbox.resend(lacking, now, wall_ns, self._link._frames)
            self._arm(now)

    def __repr__(self) -> str:
        return (f"LossRecovery(rto={self.rto:.3f}, deadline={self.rto_deadline}, "
                f"stalls_excused={self.stalls_excused})")

"""One link's outbox: the committed messages a dialer holds for its peer (queued, then in
flight), the window that bounds them, what still waits on disk, the batches they went out in
(flights) and what the peer's answers proved about those batches.

Rule: pure state, as the `DialerLink` that composes it: no asyncio, zmq, sqlite3 or time; the
caller hands in `now` and `wall_ns`. The window rules (how many messages and bytes are held,
when the store is read) live here and nowhere else; *when* to send, resend or probe is the
link's (its timers), *what* goes and how it is cut into frames is the outbox's.
"""

from __future__ import annotations

import bisect
import collections
import itertools
import operator
from collections.abc import Iterable, Sequence

from meshpost.protocol.frames import (
    MAX_BATCH_BODY_BYTES,
    MAX_BATCH_MESSAGES,
    Batch,
    Envelope,
    Frame,
)

#: What a held message costs besides its body (the Envelope, its id, the dict slot): the
#: window's byte count is body characters plus this, an estimate of memory, not of the wire.
HELD_MESSAGE_OVERHEAD = 256

_SEQ = operator.attrgetter("seq")
_BODY = operator.attrgetter("body")

#: How much wider than the in-flight count a receipt's ranges may add up to and still be
#: walked seq by seq (the fast path of an honest receipt); wider, each in-flight seq is
#: looked up among the ranges instead, so a receipt costs what is in flight, not its widths.
SETTLE_WALK_FACTOR = 2

#: One batch that went out: (monotonic send time, its wall-clock tx time as the Batch says,
#: its messages). Every flight has a list of its own.
Flight = tuple[float, int, list[Envelope]]


def held_size(messages: Sequence[Envelope]) -> int:
    """The window bytes `messages` take (summed in C, no per-message Python)."""
    if len(messages) == 1:  # a single send: no comprehension to set up
        return len(messages[0].body) + HELD_MESSAGE_OVERHEAD
    # A comprehension, not map(len, map(attrgetter)): attrgetter on a msgspec struct is a
    # generic getattr, ~1.5x the instructions (callgrind); this runs twice per message.
    return sum([len(m.body) for m in messages]) + len(messages) * HELD_MESSAGE_OVERHEAD


class Outbox:
    """What one link holds for its peer: `queue` (committed, not sent yet), `inflight` (sent,
    unsettled; by seq), `flights` (the batches they went in, oldest first) and how the window
    is used (`held_bytes`, `capacity`); which committed messages wait on disk
    (`disk_request`/`refill`); and what the peer proved it holds (`answered_tx_ns`).

    `queue`, `inflight`, `flights`, `resent` and `dropped_tx` are never rebound (only
    mutated), so the link may keep references to them."""

    def __init__(self, *, window: int, window_bytes: int) -> None:
        """`window`: messages held at most (queued plus in flight); `window_bytes`: the
        memory they may take, as `held_size` counts it."""
        self.window = window
        self.window_bytes = window_bytes
        #: Highest seq ever held (queued, in flight or settled); disk is read above it.
        self.highest_enqueued_seq = 0
        #: Highest seq `offer` was told is committed.
        self._highest_offered_seq = 0
        #: Until a read from disk comes back short, the store may hold messages of an earlier
        #: run that no `offer` announced.
        self._disk_unread = True
        #: Committed messages for this peer wait on disk, not in memory: `offer` keeps
        #: nothing until `refill` has caught up (so that messages leave in seq order). Always
        #: `_disk_unread or _highest_offered_seq > highest_enqueued_seq`, set where those
        #: change (`_note_backlog`): a plain attribute, as the node and the link ask after
        #: every frame in or out, where a property (two deep from the link) was a call each.
        self.disk_backlog = True
        #: The `limit` of the last `disk_request`, to tell a short read from a full one.
        self._read_limit = 0
        #: Messages sent again (each resend counts each of its messages).
        self.retransmissions = 0

        self.queue: collections.deque[Envelope] = collections.deque()
        self.inflight: dict[int, Envelope] = {}
        #: `held_size` of everything in `queue` and `inflight`.
        self.held_bytes = 0
        #: What went out when, oldest first (see `Flight`). Settled flights are dropped lazily.
        self.flights: collections.deque[Flight] = collections.deque()
        #: The latest of our tx times the peer has echoed (a receipt's or a Pong's): frames
        #: on a link arrive in order, so every batch sent at or before it reached the peer.
        self.answered_tx_ns = 0
        #: tx times of batches this node failed to queue (`batch_dropped`), or that the peer
        #: answered without a receipt (`unanswered_before`): never proven to be stored.
        self.dropped_tx: set[int] = set()
        #: Seqs sent more than once and not yet receipted: their receipts are no RTT sample
        #: (Karn's rule). Empty on the fast path.
        self.resent: set[int] = set()
        #: Wall tx time of the first resend since the last progress (a receipt echoing an
        #: earlier tx answers the original: the resend was spurious, RFC 3522's test).
        self.first_resend_tx_ns: int | None = None

    # -- the window and the disk ----------------------------------------------------------

    @property
    def capacity(self) -> int:
        """How many more committed messages this link can hold in memory right now."""
        return self.window - len(self.queue) - len(self.inflight)

    @property
    def unacknowledged(self) -> int:
        """Messages held: queued or in flight."""
        return len(self.queue) + len(self.inflight)

    def _note_backlog(self) -> None:
        """Set `disk_backlog` after its fields changed."""
        self.disk_backlog = (self._disk_unread
                             or self._highest_offered_seq > self.highest_enqueued_seq)

    @property
    def wants_disk(self) -> bool:
        """`disk_request()` would ask for rows now: wake whatever reads them."""
        return self.disk_backlog and self.wants_refill()

    def wants_refill(self) -> bool:
        """A quarter of the window is free in messages and in bytes: worth a read from disk
        (fewer, larger reads than refilling one receipt at a time)."""
        return (
            self.capacity >= max(1, self.window // 4)
            and self.window_bytes - self.held_bytes >= self.window_bytes // 4
        )

    def offer(self, messages: Sequence[Envelope]) -> None:
        """`messages` (for this peer, in seq order) are committed to the local store: hold
        what the window takes; the rest stay on disk for `disk_request`."""
        if len(messages) == 1:
            # A single send: `offered`, `enqueue`, `_admit` and `held_size` inline (four
            # calls, and a bisect, for one message).
            message = messages[0]
            seq = message.seq
            backlog = self.disk_backlog
            if seq > self._highest_offered_seq:
                self._highest_offered_seq = seq
                if not backlog and seq > self.highest_enqueued_seq:
                    self.disk_backlog = True  # until it is held, below
            if backlog or seq <= self.highest_enqueued_seq:
                return  # on disk behind older ones (`refill` reads it), or held already
            size = len(message.body) + HELD_MESSAGE_OVERHEAD
            queue, inflight = self.queue, self.inflight
            if (len(queue) + len(inflight) < self.window
                    and (size <= self.window_bytes - self.held_bytes
                         or not (queue or inflight))):
                queue.append(message)
                self.held_bytes += size
                self.highest_enqueued_seq = seq
                # Held: the highest offered (no backlog before it, and it is the newest).
                self.disk_backlog = False
            return
        if self.offered(messages):
            self.enqueue(messages)

    def offered(self, messages: Sequence[Envelope]) -> bool:
        """`offer` without the `enqueue`: note that `messages` are committed; True if
        nothing older waits on disk, so the caller holds them now (`enqueue`)."""
        if not messages:
            return False
        backlog = self.disk_backlog
        self._highest_offered_seq = max(self._highest_offered_seq, messages[-1].seq)
        self._note_backlog()
        return not backlog

    def disk_request(self) -> tuple[int, int] | None:
        """What to read from the store for this link now, as (after_seq, limit): up to
        `limit` pending messages above `after_seq`, in seq order; hand them to `refill`.
        None: nothing waits on disk, or the window has too little room to be worth a read."""
        if not self.wants_disk:
            return None
        self._read_limit = self.capacity
        return self.highest_enqueued_seq, self._read_limit

    def refill(self, rows: Sequence[Envelope]) -> None:
        """The rows a `disk_request` read: hold what the window takes. A short read taken
        whole means the disk has nothing older than what `offer` announces from now on."""
        self.refilled(rows, self.enqueue(rows))

    def refilled(self, rows: Sequence[Envelope], taken: int) -> None:
        """`refill` after the caller's `enqueue(rows)`, which took `taken` of them."""
        if taken == len(rows) < self._read_limit:
            self._disk_unread = False
            self._note_backlog()

    def admit(self, messages: Sequence[Envelope]) -> int:
        """How many of `messages`, from the first, fit in the window now (both its message
        count and its bytes). An empty link admits one message whatever its size, so a body
        larger than `window_bytes` still goes."""
        return self._admit(messages)[0]

    def _admit(self, messages: Sequence[Envelope]) -> tuple[int, int]:
        """`admit`, with the held bytes of the admitted messages."""
        # (`capacity`, inline: once per offer.)
        count = min(len(messages), self.window - len(self.queue) - len(self.inflight))
        if count <= 0:
            return 0, 0
        room = self.window_bytes - self.held_bytes
        if count < len(messages):
            messages = messages[:count]
        size = held_size(messages)
        if size <= room:
            return count, size
        sizes = list(itertools.accumulate(
            map(operator.add, map(len, map(_BODY, messages)),
                itertools.repeat(HELD_MESSAGE_OVERHEAD))
        ))
        count = bisect.bisect_right(sizes, room)
        if count == 0 and not self.queue and not self.inflight:
            count = 1
        return count, sizes[count - 1] if count else 0

    def enqueue(self, messages: Sequence[Envelope]) -> int:
        """Hold messages already committed to the local store, in seq order, as far as the
        window allows (`admit`); those at or below `highest_enqueued_seq` are already held
        (or delivered) and are skipped. Returns how many of `messages`, from the first, are
        now held or were already: the rest must come again later (`offer` and `refill` do
        that through the disk)."""
        start = bisect.bisect_right(messages, self.highest_enqueued_seq, key=_SEQ)
        fresh = messages[start:] if start else messages
        if not fresh:
            return len(messages)
        count, size = self._admit(fresh)
        if count < len(fresh):
            fresh = fresh[:count]
        if count:
            self.queue.extend(fresh)
            self.held_bytes += size
            self.highest_enqueued_seq = fresh[-1].seq
            self._note_backlog()
        return start + count

    # -- sending --------------------------------------------------------------------------

    def launch(self, now: float, wall_ns: int, frames: list[Frame]) -> None:
        """Move everything queued into flight, as Batches appended to `frames`."""
        queue, inflight = self.queue, self.inflight
        if len(queue) == 1:  # a single send: no comprehension to set up
            message = queue.popleft()
            inflight[message.seq] = message
            fresh = [message]
        else:
            fresh = list(queue)
            queue.clear()
            # A comprehension, not a popleft/append loop: the pump is per message on a
            # saturated link (callgrind: figures in the commit that made it so).
            inflight.update({m.seq: m for m in fresh})
        self.emit(fresh, wall_ns, now, frames)

    def resend(self, messages: list[Envelope], now: float, wall_ns: int,
               frames: list[Frame]) -> None:
        """Send `messages` (in flight, unsettled) again, as new flights."""
        if self.first_resend_tx_ns is None:
            self.first_resend_tx_ns = wall_ns
        self.retransmissions += len(messages)
        self.resent.update(m.seq for m in messages)
        self.emit(messages, wall_ns, now, frames)

    def resend_all(self, now: float, wall_ns: int, frames: list[Frame]) -> None:
        """The peer never stored what is in flight (it lost our session or left): forget its
        flights and send it all again."""
        self.flights.clear()
        self.resend(list(self.inflight.values()), now, wall_ns, frames)

    def emit(self, messages: list[Envelope], wall_ns: int, now: float,
             frames: list[Frame]) -> None:
        """Frames of consecutive `messages`, each as full as MAX_BATCH_MESSAGES messages and
        MAX_BATCH_BODY_BYTES characters of bodies allow (a larger body goes alone), appended
        to `frames` and remembered as flights. Cut with slices and sums in C: one Python step
        per message (its body's length), not ten."""
        if len(messages) == 1:  # a single send (any size goes alone if it must)
            batch = [messages[0]]  # its own list, as every flight's
            frames.append(Batch(tx_at_ns=wall_ns, messages=batch))
            self.flights.append((now, wall_ns, batch))
            return
        lengths = [len(m.body) for m in messages]
        start, count = 0, len(messages)
        while start < count:
            end = min(count, start + MAX_BATCH_MESSAGES)
            if sum(lengths[start:end]) > MAX_BATCH_BODY_BYTES:
                fit = bisect.bisect_right(list(itertools.accumulate(lengths[start:end])),
                                          MAX_BATCH_BODY_BYTES)
                end = start + max(1, fit)
            batch = messages[start:end]
            frames.append(Batch(tx_at_ns=wall_ns, messages=batch))
            self.flights.append((now, wall_ns, batch))
            start = end

    # -- what the peer answered -----------------------------------------------------------

    def settle(self, ranges: Sequence[tuple[int, int]]) -> list[int]:
        """A receipt's `ranges` (inclusive): settle what is in flight there; return those
        seqs in order (others were settled before, or never sent).

        The work is bounded by what is in flight and the receipt's length, whatever the
        ranges say: walking them seq by seq only while their widths add up to at most
        `SETTLE_WALK_FACTOR` times the in-flight count (an honest receipt: one range per
        run of a batch), else one pass over the in-flight seqs, each looked up among the
        ranges. (A hostile peer's 3 MB receipt of 450,000 ranges, each as wide as a window
        of 400 in flight but over seqs never sent, took 13 s of the node's loop.)"""
        inflight = self.inflight
        if not inflight:
            return []
        if len(ranges) == 1 and ranges[0][0] == ranges[0][1]:
            # One message (a single send's receipt): no walk to set up.
            seq = ranges[0][0]
            message = inflight.pop(seq, None)
            if message is None:
                return []
            self.held_bytes -= len(message.body) + HELD_MESSAGE_OVERHEAD  # its `held_size`
            return [seq]
        budget, width = SETTLE_WALK_FACTOR * len(inflight), 0
        for lo, hi in ranges:
            if hi >= lo:
                width += hi - lo + 1
                if width > budget:
                    return self._settle_by_lookup(ranges)
        settled: list[int] = []
        for lo, hi in ranges:
            if hi < lo:
                continue
            before = len(inflight)
            popped = list(map(inflight.pop, range(lo, hi + 1), itertools.repeat(None)))
            if before - len(inflight) == hi - lo + 1:
                settled.extend(range(lo, hi + 1))  # all of them were in flight
            else:
                settled.extend(s for s, m in zip(range(lo, hi + 1), popped, strict=True)
                               if m is not None)
            self.held_bytes -= held_size(list(filter(None, popped)))
        if settled:
            settled.sort()
        return settled

    def _settle_by_lookup(self, ranges: Sequence[tuple[int, int]]) -> list[int]:
        """`settle` for ranges too wide (or too many) to walk: each in-flight seq is looked
        up among the ranges, sorted and merged first (O(R log R + F log R))."""
        merged: list[tuple[int, int]] = []
        for lo, hi in sorted(r for r in ranges if r[1] >= r[0]):
            if merged and lo <= merged[-1][1] + 1:
                if hi > merged[-1][1]:
                    merged[-1] = (merged[-1][0], hi)
            else:
                merged.append((lo, hi))
        starts = [lo for lo, _hi in merged]
        hits = []
        for seq in self.inflight:
            i = bisect.bisect_right(starts, seq) - 1
            if i >= 0 and seq <= merged[i][1]:
                hits.append(seq)
        inflight = self.inflight
        self.held_bytes -= held_size([inflight.pop(s) for s in hits])
        hits.sort()
        return hits

    def reject(self, seqs: Iterable[int]) -> list[int]:
        """A Reject's `seqs`: settle those in flight (never sent again); return them."""
        gone = {s: m for s in seqs if (m := self.inflight.pop(s, None)) is not None}
        self.held_bytes -= held_size(list(gone.values()))
        return list(gone)

    def batch_dropped(self, tx_ns: int) -> None:
        """This node could not queue the batch sent at `tx_ns`: a later answer from the peer
        does not prove it arrived."""
        self.dropped_tx.add(tx_ns)

    def answered(self, echo_ns: int) -> None:
        """The peer echoed our tx time `echo_ns`: every batch sent at or before it arrived."""
        if echo_ns > self.answered_tx_ns:
            self.answered_tx_ns = echo_ns

    def forget_resent(self, settled: list[int]) -> int:
        """`settled` (just receipted) need no more resending: how many of them had been
        resent (their receipts are no plain round-trip sample)."""
        resent = self.resent
        if not resent or resent.isdisjoint(settled):
            return 0
        count = len(resent.intersection(settled))
        resent.difference_update(settled)
        if not resent:
            self.first_resend_tx_ns = None
        return count

    def all_settled(self) -> None:
        """Nothing is in flight any more: forget every flight and what was known of them."""
        self.flights.clear()
        self.resent.clear()
        self.dropped_tx.clear()
        self.first_resend_tx_ns = None

    def unanswered_before(self, echo_ns: int, sent_before: float | None = None) -> None:
        """The peer answered every batch it took before our Ping of tx time `echo_ns` (a
        Pong saying `pending` = 0): those still unsettled lost their receipt or could not be
        stored, and count as dropped (resent at their timeout, without a probe). Strictly
        before: a probe Ping goes ahead of the batches of its own poll. `sent_before`: the
        Ping's monotonic send time, which orders flights even if the wall clock jumped."""
        inflight, dropped = self.inflight, self.dropped_tx
        for flight in self._sent_before(echo_ns, sent_before):
            if any(m.seq in inflight for m in flight[2]):
                dropped.add(flight[1])

    def _sent_before(self, echo_ns: int, sent_before: float | None) -> list[Flight]:
        """The oldest flights, up to the first sent at or after a Ping (by its monotonic
        time if known, else by its wall tx time `echo_ns`)."""
        taken: list[Flight] = []
        for flight in self.flights:
            if flight[0] >= sent_before if sent_before is not None else flight[1] >= echo_ns:
                break
            taken.append(flight)
        return taken

    def take_before(self, echo_ns: int, sent_before: float | None = None) -> list[Envelope]:
        """The peer has none of the batches sent before our Ping of tx time `echo_ns`
        pending and answered all it had (a Pong saying `pending` 0): forget those flights,
        and return their messages still in flight (never stored there), to be sent again.
        `sent_before` as for `unanswered_before`."""
        inflight, flights = self.inflight, self.flights
        lacking: list[Envelope] = []
        for _ in self._sent_before(echo_ns, sent_before):
            lacking.extend(m for m in flights.popleft()[2] if m.seq in inflight)
        # A message may be in two flights (a part resent alone): once, in seq order.
        return sorted({m.seq: m for m in lacking}.values(), key=_SEQ)

    def drop_settled_flights(self) -> None:
        """Forget the oldest flights once all their messages are settled, so that `flights`
        stays about as long as the window. A flight still in flight usually shows it at its
        ends (two lookups); a settled one costs one comprehension and a C set test."""
        flights, inflight = self.flights, self.inflight
        while flights:
            batch = flights[0][2]
            if batch and (batch[0].seq in inflight or batch[-1].seq in inflight
                          or (len(batch) > 2
                              and not inflight.keys().isdisjoint([m.seq for m in batch]))):
                return
            flights.popleft()

    # -- what is due ----------------------------------------------------------------------

    def overdue(self, cutoff: float, stale_before: float,
                progress: float) -> tuple[list[Flight], list[Flight]]:
        """Take out the flights sent at or before `cutoff`, as (due, kept). Kept: the peer
        is known to hold them (sent at or before `answered_tx_ns`, not dropped) and they are
        not stale; due: the rest. A held flight is stale once `stale_before` is at or after
        both its send time and the last `progress`. Put `kept` back with `restore`."""
        flights = self.flights
        answered, dropped = self.answered_tx_ns, self.dropped_tx
        due: list[Flight] = []
        kept: list[Flight] = []
        while flights and flights[0][0] <= cutoff:
            flight = flights.popleft()
            stale = stale_before >= max(progress, flight[0])
            if flight[1] <= answered and not stale and flight[1] not in dropped:
                kept.append(flight)
            else:
                due.append(flight)
        return due, kept

    def any_dropped(self, flights: list[Flight]) -> bool:
        """One of `flights` is known not to have reached the peer's store."""
        dropped = self.dropped_tx
        return any(flight[1] in dropped for flight in flights)

    def restore(self, flights: list[Flight]) -> None:
        """Put flights taken out by `overdue` back (in send order), and forget settled ones."""
        self.flights.extendleft(reversed(flights))
        self.drop_settled_flights()

    def unsettled(self, flights: list[Flight]) -> list[Envelope]:
        """The messages of `flights` still in flight, in order."""
        inflight = self.inflight
        return [m for flight in flights for m in flight[2] if m.seq in inflight]

    def deadline(self, now: float, progress: float, rto: float, rto_max: float, *,
                 probing: bool = False) -> float | None:
        """When the retransmission timer should fire (None: nothing went out): the first
        unproven flight's `rto` after it left, or `rto_max` without progress (since
        `progress` or since the oldest flight left) for flights the peer is known to hold.
        `probing`: a probe Ping just left; unproven flights wait a whole `rto` from `now`."""
        flights = self.flights
        if not flights:
            return None
        answered, dropped = self.answered_tx_ns, self.dropped_tx
        deadline = max(progress, flights[0][0]) + rto_max
        for sent, tx_ns, _batch in flights:
            if tx_ns > answered or tx_ns in dropped:
                unproven = max(sent, now) if probing else sent
                deadline = min(deadline, unproven + rto)
                break
        return deadline

    def __repr__(self) -> str:
        return (f"Outbox(queued={len(self.queue)}, inflight={len(self.inflight)}, "
                f"flights={len(self.flights)}, held_bytes={self.held_bytes})")

"""Time: the wall clock, the hybrid logical clock, and per-peer offset/RTT estimates.

Rule: time is injected. Everything here takes a `Clock` (or explicit timestamps), so tests run
in virtual time; only `SystemClock` reads the real clocks.
"""

from __future__ import annotations

import collections
import dataclasses
import operator
import time
from typing import Protocol

#: HLC timestamps pack milliseconds of physical time above a 16-bit logical counter into one
#: 64-bit integer, so they sort and compare as plain integers (SQLite INTEGER, msgpack uint).
HLC_LOGICAL_BITS = 16
HLC_LOGICAL_MASK = (1 << HLC_LOGICAL_BITS) - 1
#: A remote HLC further ahead of our wall clock than this is not trusted to drag our clock
#: forward (a peer with a wildly wrong clock must not poison everyone's timestamps).
HLC_MAX_FORWARD_DRIFT_MS = 60_000
#: Beyond that bound (our own time line ahead of the wall clock, after the wall clock stepped
#: back) a remote stamp may still order after ours logically, but only while the merged counter
#: stays below this: a remote must not be able to roll our millisecond forward.
HLC_COUNTER_LIMIT_BEYOND_BOUND = HLC_LOGICAL_MASK // 2


class Clock(Protocol):
    """Source of time: wall clock (ns since the epoch, UTC) and a monotonic clock (s)."""

    def wall_ns(self) -> int: ...

    def monotonic(self) -> float: ...


class SystemClock:
    """The machine's clocks."""

    # The C functions themselves, not methods wrapping them: a node reads its clock several
    # times per message, and a Python call around each costs more than the reading.
    wall_ns = staticmethod(time.time_ns)
    monotonic = staticmethod(time.monotonic)

    def __repr__(self) -> str:
        return "SystemClock()"


@dataclasses.dataclass
class FakeClock:
    """A clock tests move by hand; `skew_ns` models a wall clock that is wrong by that much."""

    wall: int = 1_700_000_000_000_000_000
    mono: float = 1000.0
    skew_ns: int = 0

    def wall_ns(self) -> int:
        return self.wall + self.skew_ns

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        self.wall += int(seconds * 1e9)
        self.mono += seconds


def hlc_pack(physical_ms: int, logical: int) -> int:
    return (physical_ms << HLC_LOGICAL_BITS) | logical


def hlc_unpack(hlc: int) -> tuple[int, int]:
    """Split an HLC timestamp into (physical milliseconds, logical counter)."""
    return hlc >> HLC_LOGICAL_BITS, hlc & HLC_LOGICAL_MASK


class HybridLogicalClock:
    """Kulkarni et al.'s hybrid logical clock.

    `now()` stamps a local or send event; `observe(remote)` merges a received timestamp. The
    result never goes backwards, exceeds every timestamp observed, and stays close to the
    physical clock.
    """

    __slots__ = ("_clock", "last", "rejected")

    def __init__(self, clock: Clock, last: int = 0) -> None:
        self._clock = clock
        #: The latest stamp issued or merged: a plain attribute (the node reads it at every
        #: frame it receives, for the rare answer that carries it; a property was a call).
        self.last = last
        #: Remote stamps not merged because they would move us past wall + the forward bound.
        self.rejected = 0

    @classmethod
    def restored(
        cls, clock: Clock, last: int, issued_at_ns: int = 0
    ) -> tuple[HybridLogicalClock, int | None]:
        """A clock resuming after `last`, the highest stamp a store holds (issued when our
        wall clock read `issued_at_ns`), unless `last` is beyond the forward bound of both
        the wall clock now and the wall clock then: a ratcheted or corrupt store. Then it
        resumes from the wall clock, and the refused stamp is returned for the caller to log.
        (A stamp within the bound of its own send time is honoured even if the wall clock
        has since gone back: the time line stays monotonic across restarts.)"""
        wall_ns = max(clock.wall_ns(), issued_at_ns)
        bound_ms = wall_ns // 1_000_000 + HLC_MAX_FORWARD_DRIFT_MS
        if hlc_unpack(last)[0] > bound_ms:
            return cls(clock), last
        return cls(clock, last=last), None

    def now(self) -> int:
        # Unpacking and packing inline: one stamp per message sent, and per receipt.
        pt = self._clock.wall_ns() // 1_000_000
        last = self.last
        l_ms = last >> HLC_LOGICAL_BITS
        # The next stamp on our own time line is `last + 1`: an exhausted counter carries
        # into the millisecond, which borrows the next one.
        self.last = pt << HLC_LOGICAL_BITS if pt > l_ms else last + 1
        return self.last

    def advance(self, own: int) -> None:
        """Move past `own`, a stamp this clock handed out itself (no bound applies)."""
        if own > self.last:
            self.last = own

    def observe(self, remote: int) -> int:
        """Merge a timestamp received from a peer; return the new local timestamp.

        The forward bound is checked against the wall clock on every call, never against our
        own last stamp: a remote beyond wall + bound is not merged (counted in `rejected`), so
        a peer echoing our own stamps back cannot ratchet us forward one overflow at a time.
        """
        # Unpacking, the max of three and the bump are inline, with comparisons for `max()`:
        # one observe per batch received (every single send), 9,100 -> 5,500 instructions
        # (callgrind). tests/unit/test_clock.py holds it to the code of those calls
        # (`_ReferenceHLC`).
        pt = self._clock.wall_ns() // 1_000_000
        r_ms, r_c = remote >> HLC_LOGICAL_BITS, remote & HLC_LOGICAL_MASK
        last = self.last
        l_ms, l_c = last >> HLC_LOGICAL_BITS, last & HLC_LOGICAL_MASK
        if r_ms > pt + HLC_MAX_FORWARD_DRIFT_MS and not (
            # Our own time line is that far ahead too (the wall clock stepped back): merging
            # a stamp no later than our millisecond only orders after it, if the counter
            # stays well away from rolling the millisecond over.
            r_ms <= l_ms and (r_ms < l_ms or max(l_c, r_c) < HLC_COUNTER_LIMIT_BEYOND_BOUND)
        ):
            # Ignore the remote clock; still stamp this event on our own time line.
            self.rejected += 1
            return self.now()
        top = pt if pt > l_ms else l_ms
        if r_ms > top:
            top = r_ms
        if top == l_ms:
            counter = l_c if top != r_ms or l_c >= r_c else r_c
        elif top == r_ms:
            counter = r_c
        else:
            self.last = top << HLC_LOGICAL_BITS
            return self.last
        # The counter's next value; an exhausted one carries into the millisecond.
        self.last = (top << HLC_LOGICAL_BITS) + counter + 1
        return self.last

    def __repr__(self) -> str:
        ms, c = hlc_unpack(self.last)
        return f"HybridLogicalClock(last={ms}ms+{c})"


@dataclasses.dataclass(frozen=True, slots=True)
class OffsetSample:
    """One NTP-style exchange: offset of the peer's clock from ours and the round-trip delay."""

    offset_ns: int
    delay_ns: int


def ntp_sample(t1: int, t2: int, t3: int, t4: int) -> OffsetSample:
    """NTP's formula: t1 we sent, t2 peer received, t3 peer replied, t4 we received.

    offset = ((t2 - t1) + (t3 - t4)) / 2 is how far the peer's clock is ahead of ours;
    delay = (t4 - t1) - (t3 - t2) is the time spent on the network, both ways.
    """
    return OffsetSample(offset_ns=((t2 - t1) + (t3 - t4)) // 2, delay_ns=(t4 - t1) - (t3 - t2))


_DELAY = operator.itemgetter(0)


class OffsetEstimator:
    """Per-peer clock offset and round-trip estimate with a minimum-delay filter.

    Of the last `window` samples the one with the smallest delay wins: queueing only ever adds
    delay, and asymmetric queueing is what corrupts the offset, so the fastest exchange is the
    most trustworthy (NTP's clock filter does the same).
    """

    #: Eight samples as in NTP's clock filter.
    DEFAULT_WINDOW = 8

    __slots__ = ("_samples",)

    def __init__(self, window: int = DEFAULT_WINDOW) -> None:
        #: (delay_ns, offset_ns) of each sample: a tuple, not an `OffsetSample`, because a
        #: sample is taken per receipt and a frozen dataclass costs a call per field to build;
        #: `best()` builds the one asked for.
        self._samples: collections.deque[tuple[int, int]] = collections.deque(maxlen=window)

    def add(self, t1: int, t2: int, t3: int, t4: int) -> None:
        # `ntp_sample`'s formula, inline (this runs per receipt).
        delay = (t4 - t1) - (t3 - t2)
        if delay < 0:
            # Impossible unless a clock jumped mid-exchange; such a sample is noise.
            return
        self._samples.append((delay, ((t2 - t1) + (t3 - t4)) // 2))

    def best(self) -> OffsetSample | None:
        if not self._samples:
            return None
        delay, offset = min(self._samples, key=_DELAY)  # the first of the fastest
        return OffsetSample(offset_ns=offset, delay_ns=delay)

    @property
    def offset_ns(self) -> int | None:
        b = self.best()
        return None if b is None else b.offset_ns

    @property
    def rtt_ns(self) -> int | None:
        b = self.best()
        return None if b is None else b.delay_ns

    def __repr__(self) -> str:
        return f"OffsetEstimator(offset_ns={self.offset_ns}, rtt_ns={self.rtt_ns})"

"""Per-peer rate limits: how often a peer may make this node do something costly for it
(a token bucket per peer: `burst` at once, then `rate_per_s` on average).

Rule: pure state, like the links: `check(peer, now)` with `now` (monotonic seconds) handed
in decides and returns a typed decision; it never waits, sleeps or logs. Memory stays bounded
by the peers checked recently: a bucket full again is forgotten (a new one starts full).
"""

from __future__ import annotations

import collections
import dataclasses

#: Warnings a peer's bad input may cost the node's log (an undecodable frame, a Hello claiming
#: a name in session): this many at once, then one a second; past that each is only counted.
#: Each used to be a WARNING line, about 170 bytes for a 5-byte frame: a flood of them filled
#: the disk with the log at the speed of the peer's link.
INPUT_WARNINGS_BURST = 20
INPUT_WARNINGS_PER_S = 1.0


@dataclasses.dataclass(frozen=True, slots=True)
class Allowed:
    """Go ahead: one token of `peer`'s bucket was taken."""

    peer: str


@dataclasses.dataclass(frozen=True, slots=True)
class Refused:
    """Over the limit: refuse, and say when a token is back (`retry_after_s`).
    `burst_started`: the first refusal since `peer` was last allowed (log this one only:
    a flood must not flood the log)."""

    peer: str
    retry_after_s: float
    burst_started: bool


@dataclasses.dataclass(slots=True)
class _Bucket:
    tokens: float
    updated_at: float
    refusing: bool = False


class RateLimiter:
    """One token bucket per peer: a peer may do `burst` things at once, then one every
    `1 / rate_per_s` seconds. A peer's excess costs it its own refusals, nobody else's."""

    def __init__(self, *, rate_per_s: float, burst: int) -> None:
        if not rate_per_s > 0:
            raise ValueError(f"rate_per_s must be positive, got {rate_per_s}")
        if burst < 1:
            raise ValueError(f"burst must be at least 1, got {burst}")
        self.rate_per_s = rate_per_s
        self.burst = burst
        #: Least recently checked first: full buckets are forgotten from the front.
        self._buckets: collections.OrderedDict[str, _Bucket] = collections.OrderedDict()

    def check(self, peer: str, now: float) -> Allowed | Refused:
        """Whether `peer` may go ahead now; takes a token if so."""
        self._forget_full(now)
        bucket = self._buckets.pop(peer, None)
        if bucket is None:
            bucket = _Bucket(float(self.burst), now)
        else:
            # A clock that went back gives nothing (and takes nothing).
            bucket.tokens = min(float(self.burst), bucket.tokens
                                + max(0.0, now - bucket.updated_at) * self.rate_per_s)
            bucket.updated_at = max(bucket.updated_at, now)
        self._buckets[peer] = bucket
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            bucket.refusing = False
            return Allowed(peer)
        started = not bucket.refusing
        bucket.refusing = True
        return Refused(peer, (1.0 - bucket.tokens) / self.rate_per_s, started)

    def _forget_full(self, now: float) -> None:
        buckets = self._buckets
        while buckets:
            peer, oldest = next(iter(buckets.items()))
            if oldest.tokens + (now - oldest.updated_at) * self.rate_per_s < self.burst:
                # Stop at the first not full (amortized O(1) a check): a bucket is full at
                # most burst / rate_per_s after its last check, so what stays is the peers
                # checked within about that long.
                return
            del buckets[peer]

    def __len__(self) -> int:
        """Peers with a bucket not full (those forgotten would start full)."""
        return len(self._buckets)

    def __repr__(self) -> str:
        return (f"<RateLimiter {self.rate_per_s:g}/s burst={self.burst} "
                f"peers={len(self._buckets)}>")

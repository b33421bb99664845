"""The per-peer rate limit (protocol/ratelimit.py) in virtual time: a burst at once, then the
rate; one peer's excess refuses that peer only; one `burst_started` per burst; a bucket full
again is forgotten; a clock that goes back gives nothing."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshpost.protocol.ratelimit import Allowed, RateLimiter, Refused


def test_a_burst_at_once_then_one_per_interval() -> None:
    limit = RateLimiter(rate_per_s=0.5, burst=3)
    assert [limit.check("B", 100.0) for _ in range(3)] == [Allowed("B")] * 3
    assert limit.check("B", 100.0) == Refused("B", 2.0, burst_started=True)
    assert limit.check("B", 101.0) == Refused("B", 1.0, burst_started=False)
    assert limit.check("B", 102.0) == Allowed("B")  # a token came back after 2 s
    assert limit.check("B", 102.5) == Refused("B", 1.5, burst_started=True)  # a new burst


def test_one_peers_flood_refuses_that_peer_only() -> None:
    limit = RateLimiter(rate_per_s=1.0, burst=2)
    refused = [limit.check("flooder", 10.0) for _ in range(1000)]
    assert sum(isinstance(d, Allowed) for d in refused) == 2
    assert sum(isinstance(d, Refused) and d.burst_started for d in refused) == 1
    assert limit.check("C", 10.0) == Allowed("C")
    assert limit.check("C", 10.0) == Allowed("C")


def test_a_full_bucket_is_forgotten_and_a_new_one_starts_full() -> None:
    limit = RateLimiter(rate_per_s=1.0, burst=2)
    limit.check("A", 0.0)
    limit.check("B", 0.5)
    assert len(limit) == 2
    limit.check("C", 1.0)  # A is full again at 1.0: forgotten; B is not (until 1.5)
    assert len(limit) == 2
    limit.check("C", 60.0)  # B forgotten; C is full too but was just checked again
    assert len(limit) == 1
    assert [limit.check("A", 60.0) for _ in range(2)] == [Allowed("A")] * 2


def test_a_clock_that_goes_back_gives_no_tokens() -> None:
    limit = RateLimiter(rate_per_s=1.0, burst=1)
    assert limit.check("B", 50.0) == Allowed("B")
    assert isinstance(limit.check("B", 10.0), Refused)
    assert isinstance(limit.check("B", 50.5), Refused)
    assert limit.check("B", 51.0) == Allowed("B")


def test_misuse_raises() -> None:
    with pytest.raises(ValueError, match="rate_per_s"):
        RateLimiter(rate_per_s=0.0, burst=1)
    with pytest.raises(ValueError, match="burst"):
        RateLimiter(rate_per_s=1.0, burst=0)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["A", "B", "C"]),
                          st.floats(min_value=0.0, max_value=5.0)), max_size=200))
def test_no_peer_ever_gets_more_than_its_burst_plus_the_rate(
    steps: list[tuple[str, float]],
) -> None:
    """Over any run, each peer is allowed at most burst + rate x elapsed time."""
    rate, burst = 0.5, 3
    limit = RateLimiter(rate_per_s=rate, burst=burst)
    now = 0.0
    allowed: dict[str, int] = {}
    for peer, gap in steps:
        now += gap
        if isinstance(limit.check(peer, now), Allowed):
            allowed[peer] = allowed.get(peer, 0) + 1
    for count in allowed.values():
        assert count <= burst + rate * now + 1e-9

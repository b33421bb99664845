"""RtoEstimator: RFC 6298 arithmetic on round-trip samples."""

from __future__ import annotations

import pytest

from meshpost.protocol.rto import RTT_G_S, RtoEstimator


def test_before_any_sample_the_timeout_is_the_initial_one() -> None:
    rto = RtoEstimator(0.5, 5.0)
    assert rto.srtt_s is None and rto.base_s == 0.5


def test_the_first_sample_sets_srtt_and_half_of_it_as_variance() -> None:
    rto = RtoEstimator(0.1, 5.0)
    rto.add_sample(1.0)
    assert (rto.srtt_s, rto.rttvar_s) == (1.0, 0.5)
    assert rto.base_s == pytest.approx(1.0 + 4 * 0.5)


def test_later_samples_are_smoothed_with_alpha_and_beta() -> None:
    rto = RtoEstimator(0.1, 10.0)
    rto.add_sample(1.0)
    rto.add_sample(2.0)
    assert rto.rttvar_s == pytest.approx(0.5 + 0.25 * (1.0 - 0.5))
    assert rto.srtt_s == pytest.approx(1.0 + 0.125 * 1.0)


def test_a_steady_path_keeps_the_granularity_margin_within_the_bounds() -> None:
    rto = RtoEstimator(0.0, 5.0)
    for _ in range(200):
        rto.add_sample(0.2)
    assert rto.base_s == pytest.approx(0.2 + RTT_G_S, abs=1e-6)
    slow = RtoEstimator(0.5, 3.0)
    slow.add_sample(2.9)
    assert slow.base_s == 3.0  # never above max_s
    fast = RtoEstimator(0.5, 3.0)
    fast.add_sample(0.001)
    assert fast.base_s == 0.5  # never below initial_s


def test_samples_beyond_the_longest_timeout_or_negative_are_ignored() -> None:
    rto = RtoEstimator(0.5, 5.0)
    rto.add_sample(6.0)
    rto.add_sample(-0.1)
    assert rto.srtt_s is None

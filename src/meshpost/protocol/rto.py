"""The retransmission timeout of one link, from the round trips of its receipts (RFC 6298).

Rule: arithmetic on the samples the dialer hands in, nothing else: no clock, no frames, no
backoff (that is the dialer's, per stall). Samples are Karn-clean: the dialer only measures
receipts of batches sent once.
"""

from __future__ import annotations

#: Smoothing of round-trip samples (RFC 6298's alpha, beta, K).
RTT_ALPHA = 0.125
RTT_BETA = 0.25
RTT_K = 4.0
#: RFC 6298's clock granularity G: the least variance term, so that a perfectly steady round
#: trip still leaves a margin over SRTT.
RTT_G_S = 0.001


class RtoEstimator:
    """Smoothed RTT and its variance; `base_s` is the timeout they give, within bounds."""

    __slots__ = ("base_s", "initial_s", "max_s", "rttvar_s", "srtt_s")

    def __init__(self, initial_s: float, max_s: float) -> None:
        self.initial_s = initial_s
        self.max_s = max_s
        self.srtt_s: float | None = None
        self.rttvar_s = 0.0
        #: `initial_s` until a sample, then SRTT + max(G, K * RTTVAR), never below
        #: `initial_s` nor above `max_s`. Worked out once per sample, not when asked: the
        #: dialer asks at every receipt, for this estimator and its path's.
        self.base_s = initial_s

    def add_sample(self, sample_s: float) -> None:
        """Fold in one round trip, in seconds."""
        # Beyond the longest timeout a sample says more about a stall than about the path.
        if not 0.0 <= sample_s <= self.max_s:
            return
        # (Comparisons, not `min()`/`max()`/`abs()`: a call of those builtins costs ~1,000
        # instructions, and a sample comes with every receipt.)
        srtt = self.srtt_s
        if srtt is None:
            srtt, self.rttvar_s = sample_s, sample_s / 2
        else:
            error = srtt - sample_s if srtt > sample_s else sample_s - srtt
            self.rttvar_s += RTT_BETA * (error - self.rttvar_s)
            srtt += RTT_ALPHA * (sample_s - srtt)
        self.srtt_s = srtt
        variance = RTT_K * self.rttvar_s
        adaptive = srtt + (variance if variance > RTT_G_S else RTT_G_S)
        base = adaptive if adaptive > self.initial_s else self.initial_s
        self.base_s = base if base < self.max_s else self.max_s

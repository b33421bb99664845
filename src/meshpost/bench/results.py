"""A scenario's result and the statistics of its samples.

Rule: plain data and arithmetic, no I/O: what every scenario returns and the report reads.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Sequence
from typing import Any


@dataclasses.dataclass
class ScenarioResult:
    name: str
    status: str = "ok"  # ok | failed | skipped
    figures: dict[str, Any] = dataclasses.field(default_factory=dict)
    note: str = ""
    verify: str = ""
    #: Latency samples in µs per label, for the CDF plot (not written to JSON in full).
    samples: dict[str, list[float]] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": self.status, "figures": self.figures}
        if self.note:
            out["note"] = self.note
        if self.verify:
            out["verify"] = self.verify
        if self.samples:
            out["latency_cdf_us"] = {k: cdf_points(v) for k, v in self.samples.items()}
        return out


def percentiles(samples: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99/p99.9 (nearest rank), mean and max of `samples`."""
    if not samples:
        return {}
    s = sorted(samples)

    def rank(p: float) -> float:
        return s[min(len(s) - 1, max(0, math.ceil(p / 100 * len(s)) - 1))]

    return {
        "p50": rank(50), "p90": rank(90), "p99": rank(99), "p99.9": rank(99.9),
        "mean": statistics.fmean(s), "max": s[-1],
    }


def cdf_points(samples: Sequence[float], points: int = 200) -> list[float]:
    """`points` evenly spaced quantiles of `samples` (enough to redraw a CDF)."""
    if not samples:
        return []
    s = sorted(samples)
    return [round(s[min(len(s) - 1, int(i * len(s) / points))], 1) for i in range(points)] + [
        round(s[-1], 1)
    ]


def rounded(figures: dict[str, float]) -> dict[str, float]:
    """`figures` to 0.1 (µs figures are not meaningful below that)."""
    return {k: round(v, 1) for k, v in figures.items()}

"""Where one send's time goes: probes on both nodes of a pair, a timeline per send.

`meshpost bench send-timeline` runs node A in the benchmark process and node B in a helper
process, both with probes installed: each probe stamps `time.perf_counter_ns()` (Linux's
CLOCK_MONOTONIC, one clock for every process of the machine) as a named step begins or ends.
A then sends one message at a time and waits for its receipt, as `pair-latency` does. Cutting
the merged stamps at each `send<` gives one timeline per send; the sends whose steps came in
the usual order are summarised step by step, and every step falls in one of four kinds:

- `commit`: a `Store.apply` (the sender's row, the receiver's row, the delivery record);
- `zmq send`: handing one frame to ZeroMQ (queueing it, and waking ZeroMQ's I/O thread);
- `between processes`: from the moment one node has queued its frame to the other node's next
  stamp (the kernel, ZeroMQ's I/O threads, the wake-up of the other process); what the first
  node does meanwhile is off the critical path and not counted;
- `meshpost code`: everything else, i.e. meshpost's own Python and the event loop between
  probes.

The node and its store writer call the probe (`meshpost.probes.Probe`) at each step; this
module's `MarkRecorder` stamps each call into a list. Each stamp adds a method call and a list
append to the step; the timeline's total is the median of the sends in the usual order, so read
it beside pair-latency, not in place of it.
"""

from __future__ import annotations

import collections
import dataclasses
import statistics
import time
from collections.abc import Iterable, Sequence
from typing import Any

import meshpost.probes as probes

#: A stamp: (step label, perf_counter_ns); labels end in "<" (begins) or ">" (ends).
Mark = tuple[str, int]

SEND_BEGINS = "send<"
SEND_ENDS = "send>"
#: The labels of the two steps whose time is a kind of its own.
COMMIT = probes.COMMIT[0][:-1]
ZMQ_SEND = probes.SEND[0][:-1]
KINDS = (COMMIT, ZMQ_SEND, "between processes", "meshpost code")


class MarkRecorder:
    """A probe for `Node(probe=...)`: stamps every trace point into `marks` with
    `time.perf_counter_ns()` (CLOCK_MONOTONIC, one clock for every process of the machine)."""

    __slots__ = ("_clock", "marks")

    def __init__(self, marks: list[Mark]) -> None:
        self.marks = marks
        self._clock = time.perf_counter_ns

    def mark(self, label: str) -> None:
        self.marks.append((label, self._clock()))


@dataclasses.dataclass(frozen=True)
class Step:
    """One transition of the usual timeline: from stamp `start` to stamp `stop`."""

    start: str
    stop: str
    kind: str
    p50_us: float
    mean_us: float


@dataclasses.dataclass(frozen=True)
class Timeline:
    """The summary of many sends' timelines."""

    sends: int
    #: Sends whose stamps came in the usual order (only these are summarised).
    usual: int
    steps: list[Step]
    #: Median of each send's total, and of each send's time in each kind.
    total_p50_us: float
    kinds_p50_us: dict[str, float]

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _side(label: str) -> str:
    return label.split(":", 1)[0]


def _kind(start: str, stop: str) -> str:
    """The kind of the time between two consecutive stamps of one node."""
    step_start, step_stop = start.split(":", 1)[1], stop.split(":", 1)[1]
    for label in (COMMIT, ZMQ_SEND):
        if (step_start, step_stop) == (f"{label}<", f"{label}>"):
            return label
    return "meshpost code"


def critical_path(order: Sequence[str]) -> list[tuple[int, int, str]]:
    """The steps (from index, to index, kind) that one send waits for, in a timeline's order.

    Once a node has queued its frame (its last `zmq send>` before the other node's next
    stamp), what it does next runs beside the frame's journey and is left out: the step from
    that `zmq send>` to the other node's next stamp is `between processes`. Without such a
    send (stamps of the two nodes interleaved otherwise) the plain next stamp is taken.
    """
    path: list[tuple[int, int, str]] = []
    i = 0
    while i < len(order) - 1:
        end = i  # order[i..end] is one node's run of stamps; order[end + 1] the other node's
        while end + 1 < len(order) and _side(order[end + 1]) == _side(order[i]):
            end += 1
        handover = end
        if end + 1 < len(order):
            handover = next((k for k in range(end, i - 1, -1)
                             if order[k].endswith(f":{ZMQ_SEND}>")), end)
        path += [(k, k + 1, _kind(order[k], order[k + 1])) for k in range(i, handover)]
        if end + 1 < len(order):
            path.append((handover, end + 1, "between processes"))
        i = end + 1
    return path


def summarise(sender: Iterable[Mark], receiver: Iterable[Mark]) -> Timeline:
    """Merge the sender's marks (labelled A) and the receiver's (B) into one timeline per send
    (from each `send<` of A to its `send>`) and summarise the critical path of those that
    follow the most common order. A send's kinds add up to its total."""
    merged = sorted([(f"A:{label}", t) for label, t in sender]
                    + [(f"B:{label}", t) for label, t in receiver], key=lambda m: m[1])
    sends: list[list[tuple[str, int]]] = []
    current: list[tuple[str, int]] | None = None
    for label, t in merged:
        if label == f"A:{SEND_BEGINS}":
            current = [(label, t)]
            sends.append(current)
        elif current is not None:
            current.append((label, t))
            if label == f"A:{SEND_ENDS}":
                current = None  # stamps until the next send belong to no send
    complete = [s for s in sends if s[-1][0] == f"A:{SEND_ENDS}"]
    if not complete:
        raise ValueError("no complete send in the marks")
    orders = collections.Counter(tuple(label for label, _t in s) for s in complete)
    usual_order, _count = orders.most_common(1)[0]
    usual = [s for s in complete if tuple(label for label, _t in s) == usual_order]
    steps: list[Step] = []
    per_send_kind: dict[str, list[float]] = {kind: [0.0] * len(usual) for kind in KINDS}
    for a, b, kind in critical_path(usual_order):
        durations = [(s[b][1] - s[a][1]) / 1000 for s in usual]
        for n, d in enumerate(durations):
            per_send_kind[kind][n] += d
        steps.append(Step(usual_order[a], usual_order[b], kind,
                          round(statistics.median(durations), 1),
                          round(statistics.fmean(durations), 1)))
    totals = [(s[-1][1] - s[0][1]) / 1000 for s in usual]
    return Timeline(
        sends=len(complete), usual=len(usual), steps=steps,
        total_p50_us=round(statistics.median(totals), 1),
        kinds_p50_us={kind: round(statistics.median(v), 1) for kind, v in per_send_kind.items()},
    )


__all__ = ["KINDS", "Mark", "MarkRecorder", "Step", "Timeline", "critical_path", "summarise"]

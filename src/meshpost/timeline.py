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

Some stamps are events beside the steps, not steps (`EVENTS`: a WAL checkpoint, the writer's
catch-up copy, a batch sent to the writer thread, a garbage collection): they are left out of
each send's order and read as intervals. The tail (the slowest 1% and 0.1% of sends) is
summarised apart: which steps grew against the median send, and which events overlapped it,
against how often they overlap any send.
"""

from __future__ import annotations

import collections
import dataclasses
import gc
import math
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
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
#: Stamps of events beside a send's steps (an interval from "<" to ">", or a point "<").
EVENTS = frozenset([*probes.CHECKPOINT, *probes.CATCH_UP, probes.THREAD_COMMIT, *probes.GC])
#: The tails summarised: the slowest share of the sends.
TAIL_SHARES = (0.01, 0.001)
#: Steps listed per tail, those that grew the most.
TAIL_STEPS = 5


class MarkRecorder:
    """A probe for `Node(probe=...)`: stamps every trace point into `marks` with
    `time.perf_counter_ns()` (CLOCK_MONOTONIC, one clock for every process of the machine)."""

    __slots__ = ("_clock", "marks")

    def __init__(self, marks: list[Mark]) -> None:
        self.marks = marks
        self._clock = time.perf_counter_ns

    def mark(self, label: str) -> None:
        self.marks.append((label, self._clock()))

    def track_gc(self) -> Callable[[], None]:
        """Stamp every garbage collection of this process (`probes.GC`) until the function
        returned is called."""
        def collected(phase: str, _info: dict[str, int]) -> None:
            self.mark(probes.GC[0] if phase == "start" else probes.GC[1])

        gc.callbacks.append(collected)
        return lambda: gc.callbacks.remove(collected)


@dataclasses.dataclass(frozen=True)
class Step:
    """One transition of the usual timeline: from stamp `start` to stamp `stop`."""

    start: str
    stop: str
    kind: str
    p50_us: float
    mean_us: float


@dataclasses.dataclass(frozen=True)
class GrownStep:
    """A step of the usual order in the tail's sends against all sends in that order."""

    start: str
    stop: str
    kind: str
    p50_us: float
    tail_p50_us: float
    tail_mean_us: float


@dataclasses.dataclass(frozen=True)
class Tail:
    """The slowest `share` of the complete sends: what grew, what overlapped them."""

    share: float
    sends: int
    #: Their slowest and fastest total, and how many came in the usual order.
    max_us: float
    min_us: float
    usual: int
    #: The usual order's steps that grew the most (by the tail's mean over the step's p50).
    grown: list[GrownStep]
    #: Per event (e.g. "A:checkpoint"): the share of the tail's sends it overlapped, and of
    #: all complete sends.
    events: dict[str, tuple[float, float]]
    #: Stamps that the tail's unusual sends had more (+) or fewer (-) of than the usual order.
    unusual_stamps: dict[str, int]


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
    tails: list[Tail] = dataclasses.field(default_factory=list)

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


def _intervals(merged: Sequence[tuple[str, int]]) -> dict[str, list[tuple[int, int]]]:
    """Each event's intervals (a point for an event stamped only as it begins), by
    "side:name": "A:checkpoint<" ... "A:checkpoint>" is ("A:checkpoint", (start, stop))."""
    out: dict[str, list[tuple[int, int]]] = collections.defaultdict(list)
    open_at: dict[str, int] = {}
    for label, t in merged:
        name = label[:-1]
        if label.endswith("<"):
            if f"{label.split(':', 1)[1][:-1]}>" in EVENTS:
                open_at[name] = t
            else:
                out[name].append((t, t))
        elif name in open_at:
            out[name].append((open_at.pop(name), t))
    return out


def _overlapping(intervals: list[tuple[int, int]], begin: int, end: int) -> bool:
    return any(start <= end and stop >= begin for start, stop in intervals)


def summarise(sender: Iterable[Mark], receiver: Iterable[Mark]) -> Timeline:
    """Merge the sender's marks (labelled A) and the receiver's (B) into one timeline per send
    (from each `send<` of A to its `send>`) and summarise the critical path of those that
    follow the most common order, then the tails. A send's kinds add up to its total."""
    merged = sorted([(f"A:{label}", t) for label, t in sender]
                    + [(f"B:{label}", t) for label, t in receiver], key=lambda m: m[1])
    events = _intervals([m for m in merged if m[0].split(":", 1)[1] in EVENTS])
    sends: list[list[tuple[str, int]]] = []
    current: list[tuple[str, int]] | None = None
    for label, t in merged:
        if label.split(":", 1)[1] in EVENTS:
            continue
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
    path = critical_path(usual_order)
    for a, b, kind in path:
        durations = [(s[b][1] - s[a][1]) / 1000 for s in usual]
        for n, d in enumerate(durations):
            per_send_kind[kind][n] += d
        steps.append(Step(usual_order[a], usual_order[b], kind,
                          round(statistics.median(durations), 1),
                          round(statistics.fmean(durations), 1)))
    totals = [(s[-1][1] - s[0][1]) / 1000 for s in usual]
    everywhere = {name: round(sum(_overlapping(spans, s[0][1], s[-1][1]) for s in complete)
                              / len(complete), 4) for name, spans in events.items()}
    return Timeline(
        sends=len(complete), usual=len(usual), steps=steps,
        total_p50_us=round(statistics.median(totals), 1),
        kinds_p50_us={kind: round(statistics.median(v), 1) for kind, v in per_send_kind.items()},
        tails=[_tail(share, complete, usual_order, path, steps, events, everywhere)
               for share in TAIL_SHARES],
    )


def _tail(
    share: float, complete: list[list[tuple[str, int]]], usual_order: tuple[str, ...],
    path: list[tuple[int, int, str]], steps: list[Step],
    events: dict[str, list[tuple[int, int]]], everywhere: dict[str, float],
) -> Tail:
    """The slowest `share` of `complete` (at least one send) against all of them
    (`everywhere`: the share of all sends each event overlapped)."""
    by_total = sorted(complete, key=lambda s: s[-1][1] - s[0][1], reverse=True)
    tail = by_total[:max(1, math.ceil(share * len(complete)))]
    in_order = [s for s in tail if tuple(label for label, _t in s) == usual_order]
    grown: list[GrownStep] = []
    if in_order:
        for (a, b, kind), step in zip(path, steps, strict=True):
            durations = [(s[b][1] - s[a][1]) / 1000 for s in in_order]
            grown.append(GrownStep(step.start, step.stop, kind, step.p50_us,
                                   round(statistics.median(durations), 1),
                                   round(statistics.fmean(durations), 1)))
        grown.sort(key=lambda g: g.tail_mean_us - g.p50_us, reverse=True)
    overlaps: dict[str, tuple[float, float]] = {}
    for name, spans in sorted(events.items()):
        in_tail = sum(_overlapping(spans, s[0][1], s[-1][1]) for s in tail)
        overlaps[name] = (round(in_tail / len(tail), 3), everywhere[name])
    usual_count = collections.Counter(usual_order)
    unusual = collections.Counter[str]()
    for s in tail:
        if len(s) != len(usual_order) or tuple(label for label, _t in s) != usual_order:
            unusual.update(label for label, _t in s)
            unusual.subtract(usual_count)
    return Tail(
        share=share, sends=len(tail),
        max_us=round((tail[0][-1][1] - tail[0][0][1]) / 1000, 1),
        min_us=round((tail[-1][-1][1] - tail[-1][0][1]) / 1000, 1),
        usual=len(in_order), grown=grown[:TAIL_STEPS], events=overlaps,
        unusual_stamps={k: v for k, v in sorted(unusual.items()) if v},
    )


__all__ = ["EVENTS", "KINDS", "GrownStep", "Mark", "MarkRecorder", "Step", "Tail", "Timeline",
           "critical_path", "summarise"]

"""The send timeline: which steps a send waits for, and how stamps become a summary."""

from __future__ import annotations

import gc

import pytest

import meshpost.probes as probes
from meshpost.timeline import (
    KINDS,
    Mark,
    MarkRecorder,
    critical_path,
    summarise,
)

#: One send as the probes see it, with what each node does after queueing its frame.
ORDER = [
    "A:send<", "A:commit<", "A:commit>", "A:zmq send<", "A:zmq send>",
    "A:dealer readable<",                       # A's own drain: beside the frame's journey
    "B:router readable<", "B:commit<", "B:commit>",
    "B:zmq send<", "B:zmq send>", "B:zmq send<", "B:zmq send>",
    "B:writer submits<",                        # after B replied: beside the receipt's journey
    "A:dealer readable<", "A:commit<", "A:commit>", "A:send>",
]


def test_the_critical_path_skips_what_a_node_does_after_queueing_its_frame() -> None:
    path = [(ORDER[a], ORDER[b], kind) for a, b, kind in critical_path(ORDER)]
    assert path == [
        ("A:send<", "A:commit<", "meshpost code"),
        ("A:commit<", "A:commit>", "commit"),
        ("A:commit>", "A:zmq send<", "meshpost code"),
        ("A:zmq send<", "A:zmq send>", "zmq send"),
        ("A:zmq send>", "B:router readable<", "between processes"),
        ("B:router readable<", "B:commit<", "meshpost code"),
        ("B:commit<", "B:commit>", "commit"),
        ("B:commit>", "B:zmq send<", "meshpost code"),
        ("B:zmq send<", "B:zmq send>", "zmq send"),
        ("B:zmq send>", "B:zmq send<", "meshpost code"),
        ("B:zmq send<", "B:zmq send>", "zmq send"),
        ("B:zmq send>", "A:dealer readable<", "between processes"),
        ("A:dealer readable<", "A:commit<", "meshpost code"),
        ("A:commit<", "A:commit>", "commit"),
        ("A:commit>", "A:send>", "meshpost code"),
    ]


def test_interleaved_stamps_without_a_handover_are_taken_in_order() -> None:
    order = ["A:send<", "B:router readable<", "A:dealer readable<", "A:send>"]
    assert critical_path(order) == [(0, 1, "between processes"), (1, 2, "between processes"),
                                    (2, 3, "meshpost code")]


def test_a_read_stamped_before_the_sender_returns_from_send_counts_as_between_processes() -> None:
    """B's I/O thread and loop ran before A's `send` returned (the wake-up preempted A): the
    send's own time is on the path as `between processes`, and no step is `zmq send`."""
    order = ["A:send<", "A:commit<", "A:commit>", "A:zmq send<",
             "B:router readable<", "A:zmq send>", "B:commit<", "B:commit>", "A:send>"]
    path = [(order[a], order[b], kind) for a, b, kind in critical_path(order)]
    assert path[3] == ("A:zmq send<", "B:router readable<", "between processes")
    assert "zmq send" not in {kind for _a, _b, kind in path}


def _marks(order: list[str], start_ns: int, step_ns: int) -> tuple[list[Mark], list[Mark]]:
    sender: list[Mark] = []
    receiver: list[Mark] = []
    for i, label in enumerate(order):
        side, name = label.split(":", 1)
        (sender if side == "A" else receiver).append((name, start_ns + i * step_ns))
    return sender, receiver


def test_summarise_adds_each_sends_kinds_up_to_its_total() -> None:
    sender: list[Mark] = []
    receiver: list[Mark] = []
    for n in range(5):  # five sends in the usual order, 1 us between stamps, then 2 us ...
        a, b = _marks(ORDER, 1_000_000_000 * (n + 1), 1000 * (n + 1))
        sender += a
        receiver += b
    # ... one in another order, and stamps after the last send> (a node closing)
    odd = ["A:send<", "B:router readable<", "A:send>"]
    a, b = _marks(odd, 9_000_000_000, 1000)
    sender += [*a, ("commit<", 9_500_000_000), ("commit>", 9_500_001_000)]
    receiver += b
    timeline = summarise(sender, receiver)
    assert (timeline.sends, timeline.usual) == (6, 5)
    # Steps of the path: 15 of the 17 stamp-to-stamp gaps; the median send is the third.
    assert len(timeline.steps) == 15
    assert timeline.total_p50_us == pytest.approx(17 * 3.0)
    kinds = timeline.kinds_p50_us
    assert set(kinds) == set(KINDS)
    assert kinds["between processes"] == pytest.approx(2 * 2 * 3.0)  # each skips one stamp
    assert kinds["commit"] == pytest.approx(3 * 3.0)
    assert kinds["zmq send"] == pytest.approx(3 * 3.0)
    assert sum(kinds.values()) == pytest.approx(timeline.total_p50_us)
    # A step is one gap (3 us in the median send, and on average) or, between processes, two.
    assert {(s.p50_us, s.mean_us) for s in timeline.steps} == {(3.0, 3.0), (6.0, 6.0)}


def test_summarise_needs_a_complete_send() -> None:
    with pytest.raises(ValueError, match="no complete send"):
        summarise([("send<", 1)], [])


def test_the_recorder_stamps_each_trace_point_in_order() -> None:
    marks: list[Mark] = []
    recorder = MarkRecorder(marks)
    recorder.mark("work<")
    recorder.mark("work>")
    recorder.mark("fails<")
    assert [label for label, _t in marks] == ["work<", "work>", "fails<"]
    assert marks[0][1] <= marks[1][1] <= marks[2][1]


def test_every_trace_point_is_a_step_label_the_timeline_reads() -> None:
    labels = [value for name in probes.__all__ if name.isupper()
              for value in (lambda v: v if isinstance(v, tuple) else (v,))(getattr(probes, name))]
    assert labels
    assert all(label.endswith(("<", ">")) for label in labels)
    # The two kinds of their own are stamped at both ends.
    assert {f"{kind}<" for kind in KINDS[:2]} | {f"{kind}>" for kind in KINDS[:2]} <= set(labels)


def test_the_tail_names_the_step_that_grew_and_the_events_beside_it() -> None:
    """100 sends in the usual order, one of them slow in B's commit while a checkpoint of
    A's ran beside it: the slowest 1% is that send, its grown step is B's commit, and the
    event (stamped amid the send, but no step of it) overlapped it and no other send."""
    sender: list[Mark] = []
    receiver: list[Mark] = []
    slow = 42
    for n in range(100):
        start = 1_000_000_000 * (n + 1)
        a, b = _marks(ORDER, start, 1000)
        if n == slow:  # B's commit takes 5 ms instead of 1 us: every stamp after it moves
            at = ORDER.index("B:commit>")
            a = [(label, t + 5_000_000 if t >= start + at * 1000 else t) for label, t in a]
            b = [(label, t + 5_000_000 if t >= start + at * 1000 else t) for label, t in b]
            a += [("checkpoint<", start + 1500), ("checkpoint>", start + 3_000_000)]
        sender += a
        receiver += b
    receiver += [("gc<", 500_000_000), ("gc>", 500_001_000)]  # before any send
    timeline = summarise(sender, receiver)
    assert (timeline.sends, timeline.usual) == (100, 100)  # events are not steps
    one_percent, tenth = timeline.tails
    assert (one_percent.share, one_percent.sends, tenth.sends) == (0.01, 1, 1)
    assert one_percent.usual == 1
    assert one_percent.max_us == pytest.approx(17 + 5000)
    grown = one_percent.grown[0]
    assert (grown.start, grown.stop, grown.kind) == ("B:commit<", "B:commit>", "commit")
    assert (grown.p50_us, grown.tail_p50_us) == (1.0, pytest.approx(5001.0))
    assert one_percent.events == {"A:checkpoint": (1.0, 0.01), "B:gc": (0.0, 0.0)}
    assert one_percent.unusual_stamps == {}


def test_the_tail_counts_the_stamps_of_sends_in_another_order() -> None:
    sender: list[Mark] = []
    receiver: list[Mark] = []
    for n in range(9):
        a, b = _marks(ORDER, 1_000_000_000 * (n + 1), 1000)
        sender += a
        receiver += b
    # The slowest send went to the writer thread (an event) and drained its dealer twice.
    odd = [*ORDER[:-1], "A:dealer readable<", "A:send>"]
    a, b = _marks(odd, 20_000_000_000, 100_000)
    sender += [*a, ("writer thread<", 20_000_000_500)]
    receiver += b
    tail = summarise(sender, receiver).tails[0]
    assert (tail.sends, tail.usual, tail.grown) == (1, 0, [])
    assert tail.unusual_stamps == {"A:dealer readable<": 1}
    assert tail.events == {"A:writer thread": (1.0, 0.1)}


def test_the_recorder_stamps_garbage_collections_until_told_to_stop() -> None:
    marks: list[Mark] = []
    untrack = MarkRecorder(marks).track_gc()
    gc.collect()
    untrack()
    gc.collect()
    assert [label for label, _t in marks] == [probes.GC[0], probes.GC[1]]

"""The send timeline: which steps a send waits for, and how stamps become a summary."""

from __future__ import annotations

import pytest

from meshpost.timeline import (
    KINDS,
    PROBES,
    Mark,
    Probe,
    critical_path,
    install_probes,
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


class _Target:
    def work(self, x: int) -> int:
        return x * 2

    def fails(self) -> None:
        raise RuntimeError("boom")


def test_probes_stamp_calls_and_returns_and_come_off_again() -> None:
    marks: list[Mark] = []
    original = _Target.__dict__["work"]
    uninstall = install_probes(marks, [Probe(_Target, "work", "work"),
                                       Probe(_Target, "fails", "fails", end=False)])
    try:
        assert _Target().work(21) == 42
        with pytest.raises(RuntimeError):
            _Target().fails()
    finally:
        uninstall()
    assert [label for label, _t in marks] == ["work<", "work>", "fails<"]
    assert marks[0][1] <= marks[1][1] <= marks[2][1]
    assert _Target.__dict__["work"] is original
    _Target().work(1)
    assert len(marks) == 3


def test_every_probe_names_a_method_that_exists() -> None:
    marks: list[Mark] = []
    originals = {(p.owner, p.method): p.owner.__dict__[p.method] for p in PROBES}
    install_probes(marks)()
    assert all(p.owner.__dict__[p.method] is originals[(p.owner, p.method)] for p in PROBES)
    with pytest.raises(KeyError):  # and nothing stays wrapped
        install_probes(marks, [Probe(_Target, "work", "work"), Probe(_Target, "renamed", "x")])
    _Target().work(1)
    assert marks == []

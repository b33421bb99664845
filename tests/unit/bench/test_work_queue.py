"""The work-queue scenario's exactly-once check fails loudly on each kind of bad store (real
stores written as the nodes write them: ventilator V, workers W1 and W2, sink S)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from meshpost.bench.options import BenchError
from meshpost.bench.scenarios.work_queue import check_exactly_once
from meshpost.protocol import Envelope
from meshpost.protocol.header import Kind, PatternHeader, result_id
from meshpost.store import Store, WriteBatch


class Run:
    def __init__(self, root: Path) -> None:
        self.dirs = {n: root / n for n in ("V", "W1", "W2", "S")}
        self.s = {n: Store.open(d, name=n, sync="off") for n, d in self.dirs.items()}
        self.seqs: dict[tuple[str, str], itertools.count[int]] = {}
        self.expected: dict[str, str] = {}

    def message(self, sender: str, to: str, body: str, header: PatternHeader,
                message_id: str | None = None, *, store_at: bool = True) -> Envelope:
        seq = next(self.seqs.setdefault((sender, to), itertools.count(1)))
        e = Envelope(message_id or f"{sender}{to}{seq}", seq, sender, to, body, seq, seq, header)
        self.s[sender].apply(WriteBatch(outgoing=[e]), seq)
        if store_at:
            self.s[to].apply(WriteBatch(incoming=[[e]]), seq)
        return e

    def task(self, task_id: str, body: str, worker: str, *, result: str | None = None,
             attempt: int = 1, store_at_worker: bool = True) -> None:
        self.expected[task_id] = body
        task = self.message("V", worker, body,
                            PatternHeader(Kind.TASK, task_id, "work", "S", 1000, attempt),
                            store_at=store_at_worker)
        if result is not None:
            self.message(worker, "S", result, PatternHeader(Kind.RESULT, task_id, "work"),
                         result_id(task.id))

    def check(self) -> dict[str, object]:
        for store in self.s.values():
            store.close()
        figures, _last = check_exactly_once(self.dirs, self.expected)
        return figures


@pytest.fixture
def run(tmp_path: Path) -> Run:
    return Run(tmp_path)


def test_a_good_run_passes_and_counts_what_it_saw(run: Run) -> None:
    run.task("t1", "hola", "W1", result="HOLA")
    run.task("t2", "aloha", "W2", result="ALOHA")
    run.task("t3", "hello", "W1")  # redelivered to W2, which did it
    run.task("t3", "hello", "W2", result="HELLO", attempt=2)
    figures = run.check()
    assert figures["deliveries"] == 4 and figures["redelivered"] == 1
    assert figures["results_kept"] == 3 and figures["kept_by_worker"] == {"W1": 1, "W2": 2}


@pytest.mark.parametrize(("damage", "says"), [
    ("no result", "no result at S"),
    ("wrong result", "is not its upper-case"),
    ("never sent", "never sent by V"),
    ("not stored at the worker", "not stored at W1"),
    ("result from a worker without the task", "answers none of the"),
])
def test_each_broken_promise_fails_the_scenario(run: Run, damage: str, says: str) -> None:
    run.task("t1", "hola", "W1", result="HOLA")
    if damage == "no result":
        run.task("t2", "aloha", "W2")
    elif damage == "wrong result":
        run.task("t2", "aloha", "W2", result="ALOHa")
    elif damage == "never sent":
        run.expected["t2"] = "aloha"
    elif damage == "not stored at the worker":
        run.task("t2", "aloha", "W1", result="ALOHA", store_at_worker=False)
    else:
        run.expected["t2"] = "aloha"
        run.message("V", "W1", "aloha", PatternHeader(Kind.TASK, "t2", "work", "S", 1000, 1))
        run.message("W2", "S", "ALOHA", PatternHeader(Kind.RESULT, "t2", "work"), "made-up")
    with pytest.raises(BenchError, match=says):
        run.check()

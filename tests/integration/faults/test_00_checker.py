"""0. The checker itself: each kind of damage in hand-made stores is counted as what it is.

A battery that prints zeros proves something only if its counter can print anything else.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from meshpost.protocol import Envelope
from meshpost.store import Store, WriteBatch

from .checker import Counts, Ledger, evaluate, receipt_violations

pytestmark = [pytest.mark.faults]


@dataclass
class Pair:
    dirs: dict[str, Path]
    a: Store
    b: Store
    ledger: Ledger

    def send(self, n: int, *, receipted: bool = True, deliver: bool = True,
             store_at_b: bool = True) -> Envelope:
        e = Envelope(id=f"id{n:04d}", seq=n, sender="A", recipient="B", body=f"body {n}",
                     sent_at_ns=1_000 + n, hlc=2_000 + n)
        (attempt,) = self.ledger.attempt("A", ["B"], e.body)
        attempt.accept(e.id, e.seq, e.sent_at_ns)
        attempt.receipted = receipted
        self.a.apply(WriteBatch(outgoing=[e]), 5)
        if store_at_b:
            self.b.apply(WriteBatch(incoming=[[e]]), 6)
        if deliver:
            self.a.execute_raw("UPDATE messages SET state = 'delivered' WHERE id = ?", [e.id])
        return e

    def count(self) -> Counts:
        self.a.close()
        self.b.close()
        return evaluate("checker", self.ledger, self.dirs)


@pytest.fixture
def pair(tmp_path: Path) -> Pair:
    dirs = {"A": tmp_path / "A", "B": tmp_path / "B"}
    return Pair(dirs, Store.open(dirs["A"], name="A"), Store.open(dirs["B"], name="B"), Ledger())


def _only(counts: Counts, **expected: int) -> None:
    fields = ("lost", "missing", "duplicated", "phantom", "mismatched")
    got = {f: getattr(counts, f) for f in fields}
    assert got == {f: expected.get(f, 0) for f in fields}, counts.line()


def test_clean(pair: Pair) -> None:
    for n in range(1, 4):
        pair.send(n)
    counts = pair.count()
    _only(counts)
    assert (counts.attempted, counts.stored, counts.receipted) == (3, 3, 3)
    assert counts.verify == "ok"


def test_lost(pair: Pair) -> None:
    pair.send(1)
    pair.send(2, store_at_b=False)
    assert receipt_violations(pair.dirs) != []
    _only(pair.count(), lost=1)


def test_missing_and_recovered(pair: Pair) -> None:
    pair.send(1, receipted=False, deliver=False, store_at_b=False)
    pair.send(2, receipted=False, deliver=False)
    counts = pair.count()
    _only(counts, missing=1)
    assert counts.recovered == 1


def test_uncertain_counts_only_if_durable(pair: Pair) -> None:
    e = pair.send(1, receipted=False, deliver=False, store_at_b=False)
    pair.ledger.get("A", "B", e.body).unsure("no answer")
    (never_stored,) = pair.ledger.attempt("A", ["B"], "never stored anywhere")
    never_stored.unsure("no answer")
    counts = pair.count()
    _only(counts, missing=1)
    assert counts.uncertain == 2


def test_duplicated(pair: Pair) -> None:
    e = pair.send(1)
    twin = Envelope("other-id", 9, "A", "B", e.body, e.sent_at_ns, e.hlc)
    pair.b.apply(WriteBatch(incoming=[[twin]]), 7)
    counts = pair.count()
    assert counts.duplicated == 1 and counts.verify == "FAIL", counts.line()


def test_phantom(pair: Pair) -> None:
    pair.send(1)
    pair.b.apply(WriteBatch(incoming=[[Envelope("ghost", 7, "A", "B", "ghost", 1, 1)]]), 7)
    (refused,) = pair.ledger.attempt("A", ["B"], "refused but stored")
    refused.refuse("EmptyMessage")
    pair.a.apply(WriteBatch(outgoing=[Envelope("r", 8, "A", "B", "refused but stored", 1, 1)]),
                 7)
    _only(pair.count(), phantom=2)  # the ghost, and the refused send that got stored


def test_mismatched(pair: Pair) -> None:
    pair.send(1)
    e = pair.send(2)
    pair.b.execute_raw("UPDATE messages SET sent_at_ns = sent_at_ns + 1 WHERE id = ?", [e.id])
    e3 = pair.send(3)
    pair.b.execute_raw("UPDATE messages SET body = 'bodz 3' WHERE id = ?", [e3.id])
    _only(pair.count(), mismatched=2)


def test_order_breaks(pair: Pair) -> None:
    for n in (1, 3, 2, 4):
        pair.send(n)
    assert pair.count().order_breaks == {"A>B": 1}

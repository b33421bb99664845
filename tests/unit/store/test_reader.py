"""StoreReader (store/reader.py): history and counts on a read-only connection of its own,
and the node's reads (the outbox, numbering, clocks), which `Store` delegates to it."""

from __future__ import annotations

import ast
import re
import sqlite3
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.unit.store.support import (
    T,
    assert_counts_match_the_view,
    incoming,
    out,
    receipt,
    view_pending,
)

from meshpost.errors import DataDirIsAFile, NoStore, StoreError
from meshpost.store import Delivery, Rejection, Store, StoreReader, WriteBatch
from meshpost.store import reader as reader_module

# -- a reader of its own ----------------------------------------------------------------------


def test_a_reader_sees_committed_rows_while_the_store_is_open(store: Store) -> None:
    with StoreReader.for_data_dir(store.path.parent) as reader:
        assert reader.history() == []
        store.apply(WriteBatch(outgoing=[out(1)], incoming=[[incoming(1)]]), T)
        assert [m.id for m in reader.history()] == ["out-bob-1", "in-bob-1"]
        assert reader.node_name() == "alice"
        assert reader.counts() == {"out/pending": 1, "in/received": 1}
        assert reader.pending_count() == reader.pending_count("bob") == 1
        assert reader.pending_count("carol") == 0


def test_a_reader_cannot_write(store: Store) -> None:
    with StoreReader.for_data_dir(store.path.parent) as reader, pytest.raises(sqlite3.Error):
        reader._conn.execute("DELETE FROM messages")


def test_a_reader_of_a_missing_database_says_so(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="has this node ever run"):
        StoreReader.for_data_dir(tmp_path / "nobody")


def test_history_is_in_hlc_order_and_limit_keeps_the_most_recent(store: Store) -> None:
    store.apply(
        WriteBatch(
            outgoing=[out(1, hlc=30), out(2, hlc=10), out(1, "carol", hlc=20)],
            incoming=[[incoming(1)]],  # hlc 1001
        ),
        T,
    )
    with StoreReader(store.path) as reader:
        everything = reader.history()
        assert [m.hlc for m in everything] == [10, 20, 30, 1001]
        assert [m.hlc for m in reader.history(limit=2)] == [30, 1001]
        assert [m.hlc for m in reader.history(peer="bob")] == [10, 30, 1001]
        assert [m.hlc for m in reader.history(peer="bob", direction="out", limit=1)] == [30]
        assert [m.id for m in reader.history(direction="in")] == ["in-bob-1"]
        row = everything[0]
        assert (row.direction, row.peer, row.state, row.stored_at_ns) == ("out", "bob",
                                                                          "pending", T)


def test_history_breaks_hlc_ties_by_id(store: Store) -> None:
    store.apply(WriteBatch(outgoing=[out(s, hlc=5) for s in (3, 1, 2)]), T)
    with StoreReader(store.path) as reader:
        assert [m.id for m in reader.history()] == ["out-bob-1", "out-bob-2", "out-bob-3"]


# -- the node's reads, through the store --------------------------------------------------------


def test_load_pending_returns_undelivered_rows_in_seq_order(store: Store) -> None:
    store.apply(WriteBatch(outgoing=[out(s) for s in (5, 1, 4, 2, 3, 6)] + [out(1, "carol")]), T)
    store.apply(WriteBatch(deliveries=[Delivery("bob", [2], receipt(), 1)]), T)
    store.apply(WriteBatch(rejections=[Rejection("bob", [4], "no")]), T)
    assert [m.seq for m in store.load_pending("bob", 0, 100)] == [1, 3, 5, 6]
    assert [m.seq for m in store.load_pending("bob", 0, 2)] == [1, 3]
    assert [m.seq for m in store.load_pending("bob", 3, 100)] == [5, 6]
    assert store.load_pending("bob", 6, 100) == []
    assert store.load_pending("dave", 0, 100) == []
    assert store.load_pending("bob", 0, 100)[0] == out(1)


def test_last_seqs_and_pending_count_per_peer(store: Store) -> None:
    assert store.last_seqs() == {}
    store.apply(WriteBatch(outgoing=[out(s) for s in (1, 2, 9)] + [out(4, "carol")]), T)
    store.apply(WriteBatch(incoming=[[incoming(50)]]), T)
    store.apply(WriteBatch(deliveries=[Delivery("bob", [9], receipt(), 1)]), T)
    assert store.last_seqs() == {"bob": 9, "carol": 4}
    assert store.pending_count() == 3
    assert store.pending_count("bob") == 2
    assert store.pending_count("dave") == 0


def test_max_hlc_per_direction(store: Store) -> None:
    assert store.max_hlc("out") == store.max_hlc("in") == 0
    store.apply(WriteBatch(outgoing=[out(1, hlc=50), out(2, hlc=70)],
                           incoming=[[incoming(1), incoming(2)]]), T)  # in: hlc 1001, 1002
    assert store.max_hlc("out") == 70
    assert store.max_hlc("in") == 1002


def test_load_pending_skips_settled_runs_and_stops_at_a_pending_gap(store: Store) -> None:
    store.apply(WriteBatch(outgoing=[out(s) for s in range(1, 31)]), T)
    # 1-10 and 12-20 receipted, 11 rejected (a settled gap); 21 pending; 22-25 receipted.
    store.apply(WriteBatch(rejections=[Rejection("bob", [11], "no")]), T)
    store.apply(WriteBatch(deliveries=[
        Delivery("bob", list(range(1, 11)), receipt(), 1),
        Delivery("bob", list(range(12, 21)), receipt(), 1),
        Delivery("bob", list(range(22, 26)), receipt(), 1),
    ]), T)
    with StoreReader(store.path) as reader:
        assert reader._settled_through("bob", 0) == 20
    assert [m.seq for m in store.load_pending("bob", 0, 100)] == [21, *range(26, 31)]
    assert [m.seq for m in store.load_pending("bob", 21, 3)] == [26, 27, 28]
    assert store.pending_count("bob") == view_pending(store, "bob") == 6
    assert_counts_match_the_view(store)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.sampled_from(["pending", "delivered", "rejected"]), min_size=1, max_size=40),
    st.lists(st.booleans(), min_size=40, max_size=40),
)
def test_the_settled_run_is_every_seq_from_the_start_that_is_not_pending(
    fates: list[str], splits: list[bool]
) -> None:
    """Receipt ranges of any lengths (one per seq, as single sends make them, or longer),
    rejected gaps and another peer's ranges interleaved: the run `load_pending` skips takes
    in every range before the first pending seq and stops short of it."""
    with tempfile.TemporaryDirectory() as tmp:
        s = Store.open(Path(tmp), name="alice")
        try:
            n = len(fates)
            s.apply(WriteBatch(outgoing=[out(q) for q in range(1, n + 1)]
                               + [out(q, to="carol") for q in range(1, n + 1)]), T)
            ranges: list[list[int]] = []
            for q, fate in enumerate(fates, start=1):
                if fate != "delivered":
                    continue
                if ranges and ranges[-1][-1] == q - 1 and not splits[q - 1]:
                    ranges[-1].append(q)  # the same receipt as the seq before
                else:
                    ranges.append([q])
            rejected = [q for q, fate in enumerate(fates, start=1) if fate == "rejected"]
            if rejected:
                s.apply(WriteBatch(rejections=[Rejection("bob", rejected, "no")]), T)
            for seqs in ranges:
                s.apply(WriteBatch(deliveries=[Delivery("bob", seqs, receipt(), 1),
                                               Delivery("carol", seqs, receipt(), 1)]), T)
            # It skips every range below the first pending seq and never reaches that seq.
            first_pending = next((q for q, f in enumerate(fates, start=1) if f == "pending"),
                                 n + 1)
            skipped = max((r[-1] for r in ranges if r[-1] < first_pending), default=0)
            with StoreReader(s.path) as reader:
                assert skipped <= reader._settled_through("bob", 0) < first_pending
            pending = [q for q, fate in enumerate(fates, start=1) if fate == "pending"]
            assert [m.seq for m in s.load_pending("bob", 0, 100)] == pending
        finally:
            s.close()


def test_without_window_functions_settled_runs_are_walked_a_range_at_a_time(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite before 3.25 has no LEAD(): the same answer, one query per range."""
    monkeypatch.setattr(reader_module, "_LEAD", False)
    store.apply(WriteBatch(outgoing=[out(q) for q in range(1, 12)]), T)
    for q in range(1, 11):
        store.apply(WriteBatch(deliveries=[Delivery("bob", [q], receipt(), 1)]), T)
    with StoreReader(store.path) as reader:
        assert reader._settled_through("bob", 0) == 10
    assert [m.seq for m in store.load_pending("bob", 0, 100)] == [11]


def test_a_reader_of_its_own_checks_every_row_it_loads_and_reads_as_the_store_does(
    store: Store,
) -> None:
    """`load_pending` checks rows while any present at open are unverified: the store's own
    reader follows what its open verified (all of a small store), a reader of its own knows
    of no verification and checks them all; both read the same rows."""
    store.apply(WriteBatch(outgoing=[out(s) for s in range(1, 6)]), T)
    store.apply(WriteBatch(deliveries=[Delivery("bob", [2], receipt(), 1)]), T)
    assert not store.rows_left_to_verify
    with StoreReader(store.path) as reader:
        assert reader.rows_left_to_verify
        assert reader.load_pending("bob", 0, 10) == store.load_pending("bob", 0, 10)
        assert reader.last_seqs() == store.last_seqs() == {"bob": 5}
        assert reader.pending_count() == store.pending_count() == 4


def test_the_read_side_holds_no_write_statement() -> None:
    """reader.py's rule: nothing there writes (the SQL it runs is in its string literals)."""
    source = Path(reader_module.__file__).read_text(encoding="utf-8")
    literals = [n.value for n in ast.walk(ast.parse(source))
                if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    writes = re.compile(r"\b(INSERT|UPDATE|DELETE|REPLACE|BEGIN|COMMIT|CREATE|DROP|ALTER)\b")
    sql = [text for text in literals if re.search(r"\b(SELECT|PRAGMA)\b", text)]
    assert sql, "the check found no SQL at all"
    assert not [text for text in literals if writes.search(text)]


# -- what is not a store ----------------------------------------------------------------------


def test_an_empty_database_file_is_no_store_and_says_it_is_empty(tmp_path: Path) -> None:
    """Audit: a 0-byte meshpost.db gave "no such table: messages" (exit 6)."""
    (tmp_path / "meshpost.db").touch()
    with pytest.raises(NoStore, match=r"the file is empty: no meshpost node has written it"):
        StoreReader.for_data_dir(tmp_path)
    assert NoStore.exit_code == 4


def test_another_programs_database_is_no_store(tmp_path: Path) -> None:
    other = sqlite3.connect(tmp_path / "meshpost.db")
    other.execute("CREATE TABLE t (x)")
    other.commit()
    other.close()
    with pytest.raises(NoStore, match="without meshpost's tables"):
        StoreReader.for_data_dir(tmp_path)


def test_a_data_dir_that_is_a_file_says_so_to_readers_and_to_the_store(tmp_path: Path) -> None:
    """Audit: the store said "data directory X is not writable: File exists"."""
    a_file = tmp_path / "data"
    a_file.write_text("")
    for opening in (lambda: StoreReader.for_data_dir(a_file),
                    lambda: Store.open(a_file, name="alice")):
        with pytest.raises(DataDirIsAFile, match="is a file, not a folder; give --data a folder"):
            opening()
    assert a_file.read_text() == ""


def test_a_store_opens_on_an_empty_database_file_and_creates_its_tables(tmp_path: Path) -> None:
    """A writer given an empty file (as `_make_private` creates before SQLite) builds the
    schema: only readers call an empty file no store."""
    (tmp_path / "meshpost.db").touch()
    store = Store.open(tmp_path, name="alice")
    try:
        store.apply(WriteBatch(outgoing=[out(1)]), T)
    finally:
        store.close()
    with StoreReader.for_data_dir(tmp_path) as reader:
        assert [m.id for m in reader.history()] == ["out-bob-1"]

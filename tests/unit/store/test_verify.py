"""Bit rot in a big store: `Store.open` verifies only the newest rows and the rows the node
trusts at once; a `Verifier` finds a corrupt older row after start, and every read that would
serve or resend a row (outbox, retransmission, history) refuses a corrupt one."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshpost.clock import FakeClock
from meshpost.errors import StoreCorrupt
from meshpost.protocol import Envelope
from meshpost.store import (
    DB_FILENAME,
    GroupCommitWriter,
    IncomingResult,
    Store,
    StoreReader,
    WriteBatch,
)
from meshpost.store import sqlite as store_sqlite

T = 1_700_000_000_000_000_000
#: Rows each test store holds, and how many of them open may verify: far fewer.
ROWS = 60
BUDGET = 10


def out(seq: int, to: str = "bob") -> Envelope:
    return Envelope(f"out-{to}-{seq:04d}", seq, "alice", to, f"to {to} #{seq}", T + seq, seq)


def incoming(seq: int) -> Envelope:
    return Envelope(f"in-bob-{seq:04d}", seq, "bob", "alice", f"from bob #{seq}", T + seq,
                    10_000 + seq)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A store of `ROWS` rows, oldest first: 20 outgoing to bob (all pending), 40 incoming."""
    data_dir = tmp_path / "alice"
    store = Store.open(data_dir, name="alice")
    store.apply(WriteBatch(outgoing=[out(s) for s in range(1, 21)]), T)
    for first in range(1, 41, 10):
        store.apply(WriteBatch(incoming=[[incoming(s) for s in range(first, first + 10)]]), T)
    store.close()
    return data_dir


def rot(data_dir: Path, sql: str, *params: object) -> None:
    """What a flipped bit inside a record does: the page stays well-formed, a value changes
    and its checksum no longer matches."""
    conn = sqlite3.connect(data_dir / DB_FILENAME, isolation_level=None)
    try:
        assert conn.execute(sql, params).rowcount == 1
    finally:
        conn.close()


@pytest.fixture
def opened(data_dir: Path) -> Iterator[Store]:
    store = Store.open(data_dir, name="alice", verify_rows=BUDGET)
    yield store
    store.close()


def test_open_of_a_big_store_verifies_the_newest_rows_and_the_state_rows_not_all(
    opened: Store,
) -> None:
    # The newest BUDGET rows, plus bob's highest seq and the top HLC row of each direction.
    assert opened.rows_verified_at_open == BUDGET + 3
    assert opened.rows_verified_at_open < ROWS
    assert not opened.fully_verified_at_open
    assert opened.rows_left_to_verify


def test_a_small_store_is_verified_whole_at_open_and_leaves_nothing_for_later(
    data_dir: Path,
) -> None:
    store = Store.open(data_dir, name="alice", verify_rows=ROWS)
    try:
        assert store.rows_verified_at_open == ROWS
        assert store.fully_verified_at_open
        assert not store.rows_left_to_verify
        assert store.open_verifier() is None
    finally:
        store.close()


def test_the_verifier_checks_every_row_open_left_and_then_the_pages(opened: Store) -> None:
    verifier = opened.open_verifier()
    assert verifier is not None
    try:
        steps = 1
        while not verifier.step(rows=7):
            steps += 1
        # 50 rows left below the newest 10, 7 a step: 8 steps, then quick_check once.
        assert steps == 9
        assert verifier.rows_verified == ROWS - BUDGET
        assert verifier.done
        # Rows are verified once per open: reads stop checking once none is left.
        assert not opened.rows_left_to_verify
    finally:
        verifier.close()


def test_a_corrupt_old_row_passes_open_and_the_background_verifier_finds_it(
    data_dir: Path,
) -> None:
    rot(data_dir, "UPDATE messages SET body = 'from bob #7!' WHERE id = 'in-bob-0007'")
    store = Store.open(data_dir, name="alice", verify_rows=BUDGET)
    try:
        verifier = store.open_verifier()
        assert verifier is not None
        try:
            with pytest.raises(StoreCorrupt,
                               match=r"fail their content checksum \(ids in-bob-0007"):
                verifier.run()
        finally:
            verifier.close()
    finally:
        store.close()


def test_a_corrupt_row_among_the_newest_is_refused_at_open(data_dir: Path) -> None:
    rot(data_dir, "UPDATE messages SET body = 'from bob #39!' WHERE id = 'in-bob-0039'")
    with pytest.raises(StoreCorrupt, match="in-bob-0039"):
        Store.open(data_dir, name="alice", verify_rows=BUDGET)


def test_a_corrupt_highest_seq_row_is_refused_at_open_though_it_is_not_among_the_newest(
    data_dir: Path,
) -> None:
    # Numbering continues from bob's seq 20, an old row here: a rotted seq would repeat one.
    rot(data_dir, "UPDATE messages SET seq = 21 WHERE id = 'out-bob-0020'")
    with pytest.raises(StoreCorrupt, match=r"out-bob-002[01]"):
        Store.open(data_dir, name="alice", verify_rows=BUDGET)


def test_a_corrupt_pending_row_is_never_loaded_for_retransmission(data_dir: Path) -> None:
    rot(data_dir, "UPDATE messages SET body = 'to bob #3?' WHERE id = 'out-bob-0003'")
    store = Store.open(data_dir, name="alice", verify_rows=BUDGET)
    try:
        assert [m.seq for m in store.load_pending("bob", 0, 2)] == [1, 2]
        with pytest.raises(StoreCorrupt, match="out-bob-0003"):
            store.load_pending("bob", 0, 100)
        with pytest.raises(StoreCorrupt, match="out-bob-0003"):
            store.load_pending("bob", 2, 100)
    finally:
        store.close()


def test_a_retransmission_of_a_corrupt_stored_row_is_not_receipted_again(data_dir: Path) -> None:
    # The hlc is not among the columns a duplicate is compared on: only the checksum sees it.
    rot(data_dir, "UPDATE messages SET hlc = hlc + 1 WHERE id = 'in-bob-0005'")
    store = Store.open(data_dir, name="alice", verify_rows=BUDGET)
    try:
        with pytest.raises(StoreCorrupt, match="in-bob-0005"):
            store.apply(WriteBatch(incoming=[[incoming(5)]]), T + 1)
        # The batch rolled back: nothing was written.
        assert store.execute_raw("SELECT COUNT(*) FROM messages") == [(ROWS,)]
    finally:
        store.close()


def test_history_refuses_a_corrupt_row_and_an_unchecked_read_shows_it(data_dir: Path) -> None:
    rot(data_dir, "UPDATE messages SET body = 'from bob #2!' WHERE id = 'in-bob-0002'")
    with StoreReader.for_data_dir(data_dir) as reader:
        assert len(reader.history(limit=5)) == 5  # the newest rows are fine
        with pytest.raises(StoreCorrupt, match=r"in-bob-0002.*restore it from a copy"):
            reader.history()
        with pytest.raises(StoreCorrupt, match="in-bob-0002"):
            reader.history(peer="bob", direction="in")
        rows = reader.history(check=False)
    assert len(rows) == ROWS
    assert "from bob #2!" in {r.body for r in rows}


def test_the_default_budget_is_the_module_constant(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_sqlite, "OPEN_VERIFY_ROWS", 4)
    store = Store.open(data_dir, name="alice")
    try:
        assert store.rows_verified_at_open == 4 + 3
    finally:
        store.close()


def test_a_batch_that_fails_on_a_corrupt_row_breaks_the_writer_and_receipts_nothing(
    data_dir: Path,
) -> None:
    rot(data_dir, "UPDATE messages SET hlc = hlc + 1 WHERE id = 'in-bob-0005'")
    store = Store.open(data_dir, name="alice", verify_rows=BUDGET)
    reported: list[BaseException] = []
    receipted: list[IncomingResult] = []

    async def scenario() -> None:
        writer = GroupCommitWriter(store, FakeClock(), node="alice", on_failure=reported.append)
        task = asyncio.create_task(writer.run())
        try:
            writer.add_incoming([incoming(5)], lambda result, _at: receipted.append(result))
            while not reported:
                await asyncio.sleep(0.01)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            writer.close()

    asyncio.run(asyncio.wait_for(scenario(), 10))
    assert isinstance(reported[0], StoreCorrupt)
    assert "in-bob-0005" in str(reported[0])
    assert receipted == []

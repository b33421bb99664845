"""WalKeeper: when the WAL is checkpointed and when it starts over, as a running
`GroupCommitWriter` writes it (the writer counts the pages and calls the keeper)."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest
from tests.unit.store.test_writer import PATIENCE_S, out, rows, run, running_writer, until

from meshpost.store import GroupCommitWriter
from meshpost.store import checkpoints as checkpoints_module

# -- the WAL, written by a running writer ------------------------------------------------------


def test_wal_checkpoints_run_beside_commits_on_their_own_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(checkpoints_module, "INLINE_CHECKPOINT_PAGES", 20)
    threads: list[str] = []

    async def scenario() -> None:
        async with running_writer(tmp_path, sync="normal") as writer:
            real = writer.wal._checkpointer.checkpoint

            def checkpoint() -> int:
                threads.append(threading.current_thread().name)
                return real()

            monkeypatch.setattr(writer.wal._checkpointer, "checkpoint", checkpoint)
            for seq in range(1, 11):
                writer.add_outgoing([out(seq)], lambda _at: None)
                await writer.flush()
            assert len(rows(tmp_path)) == 10
            assert writer.inline_commits == 10  # no commit was sent to a thread for it
            await until(lambda: writer.checkpoints >= 1)

    run(scenario)
    assert threads
    assert all(name.startswith("meshpost-checkpoint-alice") for name in threads)
    wal = tmp_path / "meshpost.db-wal"
    assert not wal.exists() or wal.stat().st_size == 0  # closing checkpoints what is left


def test_commits_on_the_loop_checkpoint_at_their_own_threshold(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One send at a time (inline commits) starts a checkpoint every INLINE_CHECKPOINT_PAGES,
    not every CHECKPOINT_PAGES (the thread's): each checkpoint's WAL fsync slows the sends
    beside it, and on this path those are the latency tail."""
    monkeypatch.setattr(checkpoints_module, "CHECKPOINT_PAGES", 10)
    monkeypatch.setattr(checkpoints_module, "INLINE_CHECKPOINT_PAGES", 40)
    pages: list[int] = []

    async def scenario() -> None:
        async with running_writer(tmp_path, sync="normal") as writer:
            for seq in range(1, 11):
                writer.add_outgoing([out(seq)], lambda _at: None)
                await writer.flush()
                pages.append(writer.wal.pages)
            assert writer.inline_commits == 10
            await until(lambda: writer.checkpoints >= 1)
            assert writer.checkpoints == 1

    run(scenario)
    # Four pages a one-row outgoing commit: the first checkpoint starts (and the count
    # starts again) at the 10th commit (40 pages), not at the 3rd (CHECKPOINT_PAGES).
    assert pages == [4, 8, 12, 16, 20, 24, 28, 32, 36, 0]


def small_thresholds(monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint every 20 pages, a start-over every 80 (before the writer is made: the
    keeper counts towards them from the start)."""
    monkeypatch.setattr(checkpoints_module, "CHECKPOINT_PAGES", 20)
    monkeypatch.setattr(checkpoints_module, "WAL_RESTART_PAGES", 80)


def overlapped_checkpoints(monkeypatch: pytest.MonkeyPatch, writer: GroupCommitWriter) -> None:
    """Background checkpoints that copy nothing, as when every one of them runs beside a
    commit under a steady stream (the WAL then never starts over)."""
    monkeypatch.setattr(writer.wal, "_run_checkpoint", lambda: None)


async def _send_batches(writer: GroupCommitWriter, batches: int, first_seq: int = 1) -> int:
    seq = first_seq
    for _ in range(batches):
        writer.add_outgoing([out(s) for s in range(seq, seq + 300)], lambda _at: None)
        seq += 300
        await writer.flush()
    return seq


def test_a_steady_stream_keeps_the_wal_from_growing_without_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wal = tmp_path / "meshpost.db-wal"
    sizes: list[int] = []
    small_thresholds(monkeypatch)

    async def scenario() -> None:
        async with running_writer(tmp_path) as writer:
            overlapped_checkpoints(monkeypatch, writer)
            seq = 1
            for _ in range(12):
                seq = await _send_batches(writer, 5, seq)
                sizes.append(wal.stat().st_size)
            assert writer.wal_restarts >= 5
            assert writer.checkpoints == 0  # only the writer's own catch-ups copied pages
            # 60 batches of 300 rows: about 800 pages of 8 KiB appended in all; the WAL
            # starts over every ~80, so it never holds more than the pages since then.
            assert max(sizes) < 1_500_000, sizes
        assert len(rows(tmp_path)) == 18_000

    run(scenario)


def test_a_reader_on_old_pages_only_delays_the_wal_starting_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    small_thresholds(monkeypatch)

    async def scenario() -> None:
        async with running_writer(tmp_path) as writer:
            overlapped_checkpoints(monkeypatch, writer)
            seq = await _send_batches(writer, 2)
            reader = sqlite3.connect(tmp_path / "meshpost.db", isolation_level=None)
            try:
                reader.execute("BEGIN")
                held = reader.execute("SELECT COUNT(*) FROM messages").fetchone()[0]
                seq = await _send_batches(writer, 20, seq)
                assert writer.wal_restarts == 0  # the copy stops short of the reader's pages
                # The reader still sees its snapshot, whatever the writer did meanwhile.
                assert reader.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == held
                reader.execute("COMMIT")
            finally:
                reader.close()
            await _send_batches(writer, 20, seq)
            assert writer.wal_restarts >= 1
        assert len(rows(tmp_path)) == 42 * 300

    run(scenario)


def test_small_commits_on_the_loop_also_let_the_wal_start_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At sync=normal a stream of small batches commits on the loop, where the catch-up must
    not run: the batch after the threshold goes to the thread, which runs it."""
    wal = tmp_path / "meshpost.db-wal"
    sizes: list[int] = []
    small_thresholds(monkeypatch)

    async def scenario() -> None:
        async with running_writer(tmp_path, sync="normal") as writer:
            overlapped_checkpoints(monkeypatch, writer)
            for seq in range(1, 601):
                writer.add_outgoing([out(seq)], lambda _at: None)
                await writer.flush()
                sizes.append(wal.stat().st_size)
            assert writer.inline_commits > 500  # most commits stayed on the loop
            assert writer.wal_restarts >= 5
            # 600 one-row commits append about 2,400 pages; the WAL starts over every ~80.
            assert max(sizes) < 1_500_000, max(sizes)
        assert len(rows(tmp_path)) == 600

    run(scenario)


def test_one_row_commits_on_the_loop_start_the_wal_over_between_commits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One send at a time (inline commits): the WAL starts over early, after the checkpoint
    thread's copy, with a catch-up between two commits; no commit goes to the thread to wait
    for the whole copy and its fsyncs inside it (until 2026-12-06 the commit past the
    threshold did: the slowest 0.1% of single sends)."""
    monkeypatch.setattr(checkpoints_module, "CHECKPOINT_PAGES", 20)
    monkeypatch.setattr(checkpoints_module, "INLINE_CHECKPOINT_PAGES", 20)
    monkeypatch.setattr(checkpoints_module, "WAL_RESTART_PAGES", 80)
    monkeypatch.setattr(checkpoints_module, "WAL_RESTART_EARLY_PAGES", 60)
    wal = tmp_path / "meshpost.db-wal"
    sizes: list[int] = []

    async def scenario() -> None:
        async with running_writer(tmp_path, sync="normal") as writer:
            for seq in range(1, 301):
                writer.add_outgoing([out(seq)], lambda _at: None)
                await writer.flush()
                # The early start-over's copy runs on the checkpoint thread: let it finish
                # (under load it could take longer than the commits up to the threshold);
                # the catch-up then follows the next commit.
                await until(lambda: not writer.wal.restart_requested
                            or writer.wal.catch_up_after_commit)
                sizes.append(wal.stat().st_size)
            assert writer.inline_commits == 300  # not one commit waited for a catch-up
            assert writer.wal_restarts >= 3
            assert writer.idle_catch_ups == writer.wal_restarts
            # 300 one-row commits append about 1,200 pages; the WAL starts over every ~60.
            assert max(sizes) < 1_000_000, max(sizes)
        assert len(rows(tmp_path)) == 300

    run(scenario)


def test_the_wal_starts_over_when_due_even_if_a_background_checkpoint_is_still_queued(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A background checkpoint submitted but not yet run (under load its thread may wait a
    long while for a CPU) used to postpone the catch-up until it had run, so the WAL's size
    was up to thread scheduling. Now the first commit on the thread once due cancels it and
    catches up: every catch-up costs exactly one commit off the loop."""
    wal = tmp_path / "meshpost.db-wal"
    sizes: list[int] = []
    release = threading.Event()
    small_thresholds(monkeypatch)

    async def scenario() -> None:
        async with running_writer(tmp_path, sync="normal") as writer:
            overlapped_checkpoints(monkeypatch, writer)
            # The checkpoint thread stays busy: every background checkpoint waits in its queue.
            writer.wal._executor.submit(release.wait, PATIENCE_S)
            try:
                for seq in range(1, 101):
                    writer.add_outgoing([out(seq)], lambda _at: None)
                    await writer.flush()
                    sizes.append(wal.stat().st_size)
            finally:
                release.set()
            # 100 one-row commits of ~4 pages: due every ~80 pages, so about every 20th.
            assert writer.wal_restarts >= 4
            assert writer.inline_commits == 100 - writer.wal_restarts
            assert max(sizes) < 1_500_000, max(sizes)
        assert len(rows(tmp_path)) == 100

    run(scenario)

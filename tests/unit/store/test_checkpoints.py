"""WalKeeper: when the WAL is checkpointed and when it starts over.

Its decisions first, on a keeper alone (a store that only answers checkpoints); then the WAL
itself, written by a running `GroupCommitWriter`, which counts the pages and calls the keeper.
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from tests.unit.store.test_writer import PATIENCE_S, out, rows, run, running_writer, until

from meshpost.store import GroupCommitWriter
from meshpost.store import checkpoints as checkpoints_module
from meshpost.store.checkpoints import (
    CHECKPOINT_PAGES,
    INLINE_CHECKPOINT_PAGES,
    WAL_RESTART_EARLY_PAGES,
    WAL_RESTART_PAGES,
    WalKeeper,
    WalWork,
)


class _Checkpointer:
    def checkpoint(self) -> int:
        return 0

    def close(self) -> None:
        pass


class _Store:
    """What the keeper asks of a `Store`: checkpoints, each complete unless told otherwise."""

    def __init__(self) -> None:
        self.checkpointer = _Checkpointer()
        self.complete = True
        self.catch_ups = 0

    def open_checkpointer(self) -> _Checkpointer:
        return self.checkpointer

    def checkpoint(self) -> bool:
        self.catch_ups += 1
        return self.complete


@pytest.fixture
def keeper() -> Iterator[WalKeeper]:
    keeper = WalKeeper(_Store(), node="alice")  # type: ignore[arg-type]
    yield keeper
    keeper.close()


def settled(keeper: WalKeeper) -> None:
    """Wait for the background checkpoint, if one was started."""
    background = keeper._checkpoint
    if background is not None:
        background.result(timeout=PATIENCE_S)


# -- the keeper's decisions --------------------------------------------------------------------


def test_a_checkpoint_is_due_every_checkpoint_pages_on_the_thread_and_twice_that_on_the_loop(
    keeper: WalKeeper,
) -> None:
    assert (keeper.due_on_thread, keeper.due_inline) == (CHECKPOINT_PAGES,
                                                        INLINE_CHECKPOINT_PAGES)
    keeper.written = CHECKPOINT_PAGES - 1
    assert keeper.due(on_thread=True) is None
    keeper.written = CHECKPOINT_PAGES
    assert keeper.due(on_thread=True) is WalWork.CHECKPOINT
    assert keeper.due(on_thread=False) is None
    keeper.written = INLINE_CHECKPOINT_PAGES
    assert keeper.due(on_thread=False) is WalWork.CHECKPOINT
    keeper.committed_on_loop(None)
    settled(keeper)
    assert (keeper.pages, keeper.checkpoints) == (0, 1)
    # The next one counts from there.
    assert keeper.due_inline == 2 * INLINE_CHECKPOINT_PAGES
    assert keeper.due_on_thread == INLINE_CHECKPOINT_PAGES + CHECKPOINT_PAGES


def test_no_checkpoint_is_due_while_the_last_one_has_not_run(keeper: WalKeeper) -> None:
    release = threading.Event()
    keeper._executor.submit(release.wait, PATIENCE_S)  # the checkpoint thread is busy
    try:
        keeper.written = CHECKPOINT_PAGES
        keeper.committed_on_thread()  # queued behind the busy thread
        keeper.written += CHECKPOINT_PAGES
        assert keeper.pages == CHECKPOINT_PAGES
        assert keeper.due(on_thread=True) is None
        assert keeper.written >= keeper.due_on_thread  # so each commit asks again
    finally:
        release.set()
    settled(keeper)
    assert keeper.due(on_thread=True) is WalWork.CHECKPOINT


def test_the_wal_starts_over_on_the_thread_at_its_limit_and_early_on_the_loop(
    keeper: WalKeeper,
) -> None:
    assert keeper.restart_at == WAL_RESTART_PAGES
    keeper.written = WAL_RESTART_EARLY_PAGES
    assert keeper.due(on_thread=False) is WalWork.EARLY_START_OVER
    assert keeper.due(on_thread=True) is WalWork.CHECKPOINT  # the thread waits for the limit
    keeper.written = WAL_RESTART_PAGES
    assert keeper.due(on_thread=True) is WalWork.CATCH_UP
    keeper.committed_on_thread()
    assert (keeper.wal_restarts, keeper.since_restart, keeper.pages) == (1, 0, 0)
    assert keeper.restart_at == 2 * WAL_RESTART_PAGES
    assert keeper.due(on_thread=True) is None


def test_a_checkpoint_just_before_the_limit_does_not_put_off_the_catch_up(
    keeper: WalKeeper,
) -> None:
    keeper.written = WAL_RESTART_PAGES - 500
    keeper.restart_requested = True  # an early start-over under way
    keeper.committed_on_loop(None)
    settled(keeper)
    assert (keeper.pages, keeper.checkpoints) == (0, 1)
    assert keeper.due_on_thread == WAL_RESTART_PAGES  # not a checkpoint's worth later
    keeper.written = WAL_RESTART_PAGES
    assert keeper.due(on_thread=True) is WalWork.CATCH_UP


def test_an_early_start_over_is_asked_for_once(keeper: WalKeeper) -> None:
    keeper.written = WAL_RESTART_EARLY_PAGES
    keeper.restart_requested = True
    # Asked already: only a checkpoint can be due, at its own count.
    assert keeper.due(on_thread=False) is WalWork.CHECKPOINT
    keeper._checkpointed_at = keeper.written - 1
    assert keeper.due(on_thread=False) is None


def test_an_incomplete_catch_up_tries_again_a_checkpoints_worth_of_pages_later(
    keeper: WalKeeper,
) -> None:
    """A reader on old pages keeps the WAL from starting over: the next catch-up comes after
    CHECKPOINT_PAGES more pages, counted from the limit (not from the pages written past it)."""
    keeper._store.complete = False  # type: ignore[attr-defined]
    keeper.written = WAL_RESTART_PAGES + 500
    keeper.committed_on_thread()
    assert (keeper.wal_restarts, keeper.pages) == (0, 0)
    assert keeper.since_restart == WAL_RESTART_PAGES - CHECKPOINT_PAGES
    assert keeper.restart_at == keeper.written + CHECKPOINT_PAGES
    assert keeper.due_on_thread == keeper.written + CHECKPOINT_PAGES


def test_an_early_start_over_copies_in_the_background_then_catches_up_after_a_commit(
    keeper: WalKeeper,
) -> None:
    async def scenario() -> None:
        keeper.written = WAL_RESTART_EARLY_PAGES
        keeper.committed_on_loop(asyncio.get_running_loop())
        assert keeper.restart_requested
        assert keeper.pages == 0  # the background copy is the checkpoint due there
        await until(lambda: keeper.catch_up_after_commit)
        assert keeper.checkpoints == 1
        keeper.written += 4  # a commit meanwhile; the writer then asks
        assert keeper.catch_up_due(runnable=True)
        assert not keeper.catch_up_after_commit
        keeper.catch_up()  # on the writer thread, in the writer
        keeper.caught_up()
        assert (keeper.wal_restarts, keeper.idle_catch_ups) == (1, 1)
        assert not keeper.restart_requested
        assert keeper.due_inline == keeper.written + INLINE_CHECKPOINT_PAGES

    run(scenario)


def test_an_early_start_over_is_dropped_if_a_commit_caught_up_or_the_writer_cannot(
    keeper: WalKeeper,
) -> None:
    keeper.written = WAL_RESTART_EARLY_PAGES
    keeper.restart_requested = keeper.catch_up_after_commit = True
    assert not keeper.catch_up_due(runnable=False)  # stopped or broken
    assert not (keeper.restart_requested or keeper.catch_up_after_commit)
    keeper.restart_requested = keeper.catch_up_after_commit = True
    keeper.catch_up()  # a commit on the thread caught up meanwhile
    keeper.written += 4
    assert not keeper.catch_up_due(runnable=True)
    assert not keeper.restart_requested
    # Counted again from that catch-up (and asked again, once due).
    assert keeper.due_inline == WAL_RESTART_EARLY_PAGES + INLINE_CHECKPOINT_PAGES
    assert keeper._store.catch_ups == 1  # type: ignore[attr-defined]


class _Loop:
    """Keeps what the keeper hands the loop, to run when the test says."""

    def __init__(self) -> None:
        self.calls: list[Callable[[], None]] = []
        self.arrived = threading.Event()

    def call_soon_threadsafe(self, callback: Callable[[], None]) -> None:
        self.calls.append(callback)
        self.arrived.set()

    def run_calls(self) -> None:
        calls, self.calls = self.calls, []
        self.arrived.clear()
        for callback in calls:
            callback()


def test_the_due_counts_are_reached_exactly_when_work_is_due(keeper: WalKeeper) -> None:
    """The writer compares `written` with `due_*` instead of calling the keeper at every
    commit. Along a random stream of commits on the loop and on the thread, with early
    start-overs, catch-ups between commits (some incomplete) and dropped ones, as the writer
    drives them: a due count is reached whenever its kind of commit has work due, and
    otherwise only right after the thread moved the counts (a call that finds nothing)."""
    rng = random.Random(20261206)
    loop = _Loop()
    store: _Store = keeper._store  # type: ignore[assignment]
    reached_with_work = {True: 0, False: 0}
    stale = False  # the thread moved the counts since the loop last planned
    for _ in range(20_000):
        on_thread = rng.random() < 0.3
        store.complete = rng.random() < 0.8
        keeper.written += rng.choice([3, 4, 5, 8, 40, 300])
        settled(keeper)  # no checkpoint left running: only the counts decide
        reached = keeper.written >= (keeper.due_on_thread if on_thread else keeper.due_inline)
        work = keeper.due(on_thread=on_thread)
        assert reached == (work is not None) or (stale and not on_thread and reached), keeper
        reached_with_work[on_thread] += work is not None
        if on_thread:
            marks = (keeper.pages, keeper.since_restart)
            if reached:
                keeper.committed_on_thread()
            stale = stale or marks != (keeper.pages, keeper.since_restart)
            assert keeper.written < keeper.due_on_thread
            continue
        asked = keeper.restart_requested
        if reached:
            keeper.committed_on_loop(loop)  # type: ignore[arg-type]
            stale = False
        if keeper.restart_requested and not asked:
            assert loop.arrived.wait(PATIENCE_S)  # the background copy is done
        if rng.random() < 0.5:
            loop.run_calls()
        if keeper.catch_up_after_commit and rng.random() < 0.7:  # the writer, after a commit
            if keeper.catch_up_due(runnable=rng.random() < 0.9):
                keeper.catch_up()
                keeper.caught_up()
            stale = False
    assert reached_with_work[True] > 100
    assert reached_with_work[False] > 100
    assert keeper.wal_restarts > 10
    assert keeper.idle_catch_ups > 10


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

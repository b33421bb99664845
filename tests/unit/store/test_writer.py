"""GroupCommitWriter: batching into few transactions, callbacks after commit, retries."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

import meshpost.probes as probes
from meshpost.clock import FakeClock
from meshpost.errors import RowRefused, StoreError, StoreFull, StoreLocked
from meshpost.protocol import Envelope, ReceiptFrame
from meshpost.store import (
    Delivery,
    GroupCommitWriter,
    IncomingResult,
    Rejection,
    Store,
    StoreReader,
    WriteBatch,
)
from meshpost.store import writer as writer_module
from meshpost.timeline import MarkRecorder

T = 1_700_000_000_000_000_000
#: Upper bound for any wait in these tests; reaching it means a bug, not a slow machine.
PATIENCE_S = 10.0


def out(seq: int, to: str = "bob") -> Envelope:
    return Envelope(f"out-{to}-{seq}", seq, "alice", to, f"body {seq}", T, seq)


def incoming(seq: int, body: str = "yo") -> Envelope:
    return Envelope(f"in-{seq}", seq, "bob", "alice", body, T, seq)


def run(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), PATIENCE_S))


@contextlib.asynccontextmanager
async def running_writer(
    data_dir: Path, clock: FakeClock | None = None, sync: str = "full",
    marks: list[tuple[str, int]] | None = None,
) -> AsyncIterator[GroupCommitWriter]:
    """A writer running on a fresh store; with `marks`, its probe marks are recorded there."""
    store = Store.open(data_dir, name="alice", sync=sync)
    probe = MarkRecorder(marks) if marks is not None else None
    writer = GroupCommitWriter(store, clock or FakeClock(), node="alice", probe=probe)
    task = asyncio.create_task(writer.run())
    try:
        yield writer
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        writer.close()


@contextlib.contextmanager
def write_locked(path: Path) -> Iterator[None]:
    """Another connection holds the write lock for the body of the `with`."""
    blocker = sqlite3.connect(path, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        yield
        blocker.execute("COMMIT")
    finally:
        blocker.close()


async def until(condition: Callable[[], bool]) -> None:
    """Yield to the loop until `condition` holds (bounded by the scenario's timeout)."""
    while not condition():
        await asyncio.sleep(0.005)


def rows(data_dir: Path) -> dict[str, str]:
    with StoreReader.for_data_dir(data_dir) as reader:
        return {m.id: m.state for m in reader.history()}


def test_many_adds_commit_in_one_transaction(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_writer(tmp_path) as writer:
            stored_at: list[int] = []
            for seq in range(1, 1001):
                writer.add_outgoing([out(seq)], stored_at.append)
            await writer.flush()
            assert writer.commits == 1
            assert writer.rows_committed == 1000
            assert stored_at == [FakeClock().wall_ns()] * 1000
            assert len(rows(tmp_path)) == 1000

    run(scenario)


def test_adds_made_while_a_commit_runs_share_the_next_transaction(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_writer(tmp_path) as writer:
            done: list[int] = []
            writer.add_outgoing([out(1)], done.append)
            await asyncio.sleep(0)  # the writer takes the first batch
            for seq in range(2, 502):
                writer.add_outgoing([out(seq)], done.append)
            await writer.flush()
            assert len(done) == 501
            assert writer.commits <= 2

    run(scenario)


def test_callbacks_run_after_commit_with_their_own_results(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_writer(tmp_path) as writer:
            seen: list[tuple[str, object]] = []
            await writer.call(
                writer.store.apply,
                WriteBatch(incoming=[[incoming(9, "original")]]),
                T,
            )

            def visible(msg_id: str) -> bool:
                return msg_id in rows(tmp_path)

            def on_out(stored_at: int) -> None:
                assert visible("out-bob-1"), "callback ran before the commit"
                seen.append(("out", stored_at))

            def on_in(tag: str) -> Callable[[IncomingResult, int], None]:
                def done(result: IncomingResult, stored_at: int) -> None:
                    assert visible("in-1")
                    seen.append((tag, (result.committed, result.conflicts)))

                return done

            writer.add_outgoing([out(1)], on_out)
            writer.add_incoming([incoming(1), incoming(2)], on_in("first"))
            writer.add_incoming([incoming(9, "forged"), incoming(3)], on_in("second"))
            await writer.flush()
            assert seen == [
                ("out", T),
                ("first", ([1, 2], [])),
                ("second", ([3], [9])),
            ]

    run(scenario)


def test_deliveries_and_rejections_are_committed_before_their_callbacks(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_writer(tmp_path) as writer:
            writer.add_outgoing([out(s) for s in (1, 2, 3)], lambda _at: None)
            await writer.flush()
            states: list[dict[str, str]] = []
            receipt = ReceiptFrame([(1, 2)], 1, 2, 3, 4, 5, "full")
            writer.add_delivery(Delivery("bob", [1, 2], receipt, 6),
                                lambda: states.append(rows(tmp_path)))
            writer.add_rejection(Rejection("bob", [3], "conflict"),
                                 lambda: states.append(rows(tmp_path)))
            await writer.flush()
            expected = {"out-bob-1": "delivered", "out-bob-2": "delivered",
                        "out-bob-3": "rejected"}
            assert states == [expected, expected]

    run(scenario)


def test_a_failing_callback_does_not_stop_the_others(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        async with running_writer(tmp_path) as writer:
            done: list[int] = []

            def boom(_at: int) -> None:
                raise RuntimeError("callback bug")

            writer.add_outgoing([out(1)], boom)
            writer.add_outgoing([out(2)], done.append)
            await writer.flush()
            assert done == [T]
            writer.add_outgoing([out(3)], done.append)  # the writer still runs
            await writer.flush()
            assert len(done) == 2

    with caplog.at_level(logging.ERROR, logger="meshpost.store.writer"):
        run(scenario)
    assert "completion callback failed" in caplog.text


def test_a_transient_lock_is_retried_and_nothing_is_lost(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_writer(tmp_path) as writer:
            # Fail fast instead of waiting out the busy timeout on every attempt.
            await writer.call(writer.store.execute_raw, "PRAGMA busy_timeout = 0")
            done: list[int] = []
            with write_locked(writer.store.path):
                for seq in range(1, 101):
                    writer.add_outgoing([out(seq)], done.append)
                await until(lambda: writer.errors >= 2)
                assert done == []
                assert isinstance(writer.last_error, StoreLocked)
            await writer.flush()
            assert len(done) == 100
            assert len(rows(tmp_path)) == 100
            assert writer.commits == 1

    run(scenario)


@contextlib.contextmanager
def retries_at_once(
    writer: GroupCommitWriter, monkeypatch: pytest.MonkeyPatch
) -> Iterator[list[float]]:
    """The writer's retries run on the loop's next turn instead of after their delay; yields
    the delays asked for, in order (no test waits for a backoff)."""
    loop = asyncio.get_running_loop()
    delays: list[float] = []
    call_later = loop.call_later

    def instead(delay: float, callback: Callable[..., None], *args: Any) -> Any:
        if callback == writer._submit:
            delays.append(delay)
            return loop.call_soon(callback, *args)
        return call_later(delay, callback, *args)

    with monkeypatch.context() as patch:
        patch.setattr(loop, "call_later", instead)
        yield delays


def failing_first(
    writer: GroupCommitWriter, errors: list[Exception], clock: FakeClock
) -> None:
    """Each commit of `writer` raises the next of `errors` instead, until none is left; each
    failure takes a second of `clock`."""
    apply = writer._apply

    def flaky(batch: WriteBatch, **kwargs: Any) -> Any:
        if errors:
            clock.advance(1.0)
            raise errors.pop(0)
        return apply(batch, **kwargs)

    writer._apply = flaky  # type: ignore[method-assign]


def test_store_conditions_are_retried_ever_later_up_to_a_cap_and_start_over_after_a_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An I/O error used to be retried every 2 s for ever, logged at every attempt. Now each
    store condition is retried after RETRY_INITIAL_S, doubled after every failure up to
    RETRY_MAX_S; a commit ends the episode (logged once, with its count) and the next
    episode starts short again. Every attempt still counts in `errors` (`store_errors`)."""
    monkeypatch.setattr(writer_module, "RETRY_MAX_S", 1.0)
    io_error = StoreError(f"database {tmp_path}: disk I/O error")

    clock = FakeClock()

    async def scenario() -> None:
        async with running_writer(tmp_path, clock) as writer:
            with retries_at_once(writer, monkeypatch) as delays:
                failing_first(writer, [io_error] * 7, clock)
                done: list[int] = []
                writer.add_outgoing([out(1)], done.append)
                await writer.flush()
                assert len(done) == 1
                assert delays == [0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
                assert (writer.errors, writer.episode_errors, writer.retry_delay_s) == (7, 0, 0)
                # A new episode (a lock, then the disk full) starts from the shortest delay.
                delays.clear()
                path = str(writer.store.path)
                failing_first(writer, [StoreLocked(path), StoreLocked(path), StoreFull(path)],
                              clock)
                writer.add_outgoing([out(2)], done.append)
                await writer.flush()
                assert delays == [0.05, 0.1, 0.2]
                assert writer.errors == 10
                assert isinstance(writer.last_error, StoreFull)
            assert set(rows(tmp_path)) == {"out-bob-1", "out-bob-2"}

    with caplog.at_level(logging.DEBUG, logger="meshpost.store.writer"):
        run(scenario)
    said = [(r.levelname, r.getMessage()) for r in caplog.records if r.levelno >= logging.INFO]
    # Once per episode and once more when the error changes, never a traceback; each end.
    assert [level for level, _m in said] == ["ERROR", "WARNING", "WARNING", "WARNING",
                                             "WARNING"]
    assert "disk I/O error" in said[0][1] and "retrying in 0.05s" in said[0][1]
    assert "after 7 failed attempt(s) over 6.0s" in said[1][1]
    assert "locked" in said[2][1]
    assert "(3 in a row)" in said[3][1] and "full" in said[3][1]
    assert "after 3 failed attempt(s)" in said[4][1]
    assert not any(r.exc_info for r in caplog.records)


def test_flush_waits_for_everything_added_so_far(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_writer(tmp_path) as writer:
            await writer.flush()  # nothing pending: returns at once
            done: list[int] = []
            writer.add_outgoing([out(1)], done.append)
            await writer.flush()
            assert done == [T]
            assert "out-bob-1" in rows(tmp_path)

    run(scenario)


def test_a_full_batch_makes_producers_wait_for_room(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(writer_module, "MAX_PENDING_ROWS", 10)

    async def scenario() -> None:
        store = Store.open(tmp_path, name="alice")
        writer = GroupCommitWriter(store, FakeClock(), node="alice")
        try:
            await writer.wait_for_room()
            writer.add_outgoing([out(s) for s in range(1, 11)], lambda _at: None)
            waiting = asyncio.create_task(writer.wait_for_room())
            await asyncio.sleep(0)
            assert not waiting.done()  # no writer is running: the batch cannot drain
            task = asyncio.create_task(writer.run())
            await waiting
            await writer.flush()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        finally:
            writer.close()
        assert len(rows(tmp_path)) == 10

    run(scenario)


def test_has_room_says_whether_a_producer_would_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`has_room` is a plain attribute (read on every send): it follows the room's event
    however that is set or cleared."""
    monkeypatch.setattr(writer_module, "MAX_PENDING_ROWS", 10)

    async def scenario() -> None:
        store = Store.open(tmp_path, name="alice")
        writer = GroupCommitWriter(store, FakeClock(), node="alice")
        try:
            assert writer.has_room
            writer.add_outgoing([out(s) for s in range(1, 10)], lambda _at: None)
            assert writer.has_room  # 9 rows of 10
            writer.add_outgoing([out(10)], lambda _at: None)
            assert not writer.has_room
            waiting = asyncio.create_task(writer.wait_for_room())
            await asyncio.sleep(0)
            assert not waiting.done()
            task = asyncio.create_task(writer.run())
            await waiting
            assert writer.has_room
            await writer.flush()
            writer._room.clear()  # as a test of the node does, to fake a full batch
            assert not writer.has_room
            writer._room.set()
            assert writer.has_room
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        finally:
            writer.close()

    run(scenario)


def test_call_runs_on_the_writer_thread(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_writer(tmp_path) as writer:
            writer.add_outgoing([out(1), out(7, "carol")], lambda _at: None)
            await writer.flush()
            last: Awaitable[dict[str, int]] = writer.call(writer.store.last_seqs)
            assert await last == {"bob": 1, "carol": 7}
            assert "commits=1" in repr(writer)

    run(scenario)


def test_small_batches_commit_on_the_loop_at_sync_normal(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_writer(tmp_path, sync="normal") as writer:
            done: list[int] = []
            writer.add_outgoing([out(1)], done.append)
            await writer.flush()
            assert done == [T]
            assert writer.inline_commits == 1
            # Too many rows for the loop: the thread commits them.
            writer.add_outgoing([out(s) for s in range(2, 3 + writer_module.INLINE_MAX_ROWS)],
                                done.append)
            await writer.flush()
            assert writer.inline_commits == 1
            assert writer.commits == 2
            assert len(rows(tmp_path)) == 2 + writer_module.INLINE_MAX_ROWS

    run(scenario)


def test_a_message_added_after_a_queued_receipt_record_shares_its_submit(
    tmp_path: Path,
) -> None:
    """One-at-a-time sending: the receipt's record is queued (lazily), the woken sender adds
    its next message; one submit commits both, with no second one queued for the loop."""
    async def scenario() -> None:
        marks: list[tuple[str, int]] = []
        async with running_writer(tmp_path, sync="normal", marks=marks) as writer:
            await asyncio.sleep(0)
            writer.add_outgoing([out(1)], lambda _at: None)
            await writer.flush()
            marks.clear()
            receipt = ReceiptFrame([(1, 1)], T, T, T, T, T, "normal")
            writer.add_delivery(Delivery("bob", [1], receipt, T), lambda: None)
            writer.add_outgoing([out(2)], lambda _at: None)
            await writer.flush()
            for _ in range(3):
                await asyncio.sleep(0)  # any submit still queued would run meanwhile
            assert [label for label, _t in marks].count(probes.WRITER_SUBMITS) == 1
            assert writer.commits == 2

    run(scenario)


def test_adds_held_for_submit_now_queue_no_submit_of_their_own(tmp_path: Path) -> None:
    async def scenario() -> None:
        marks: list[tuple[str, int]] = []
        async with running_writer(tmp_path, sync="normal", marks=marks) as writer:
            await asyncio.sleep(0)
            done: list[int] = []
            writer.hold_submits()
            writer.add_incoming([incoming(1)], lambda _r, at: done.append(at))
            writer.add_incoming([incoming(2)], lambda _r, at: done.append(at))
            for _ in range(3):
                await asyncio.sleep(0)
            assert done == []  # held: nothing submitted behind the caller's back
            writer.submit_now()
            assert done == [T, T]  # one inline commit, at once
            for _ in range(3):
                await asyncio.sleep(0)
            assert [label for label, _t in marks].count(probes.WRITER_SUBMITS) == 1
            assert writer.commits == 1
            # Released: the next add submits by itself again.
            writer.add_incoming([incoming(3)], lambda _r, at: done.append(at))
            await writer.flush()
            assert len(done) == 3

    run(scenario)


def test_sync_full_always_commits_on_the_thread(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_writer(tmp_path, sync="full") as writer:
            for seq in (1, 2, 3):
                writer.add_outgoing([out(seq)], lambda _at: None)
                await writer.flush()
            assert writer.commits == 3
            assert writer.inline_commits == 0

    run(scenario)


def test_a_lock_never_makes_the_loop_wait_and_the_thread_retries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[bool, str]] = []

    async def scenario() -> None:
        async with running_writer(tmp_path, sync="normal") as writer:
            real_apply = writer.store.apply

            def apply(batch: WriteBatch, stored_at: int, *, wait_for_lock: bool = True) -> Any:
                calls.append((wait_for_lock, threading.current_thread().name))
                return real_apply(batch, stored_at, wait_for_lock=wait_for_lock)

            monkeypatch.setattr(writer.store, "apply", apply)
            monkeypatch.setattr(writer_module, "RETRY_INITIAL_S", 0.01)
            done: list[int] = []
            with write_locked(writer.store.path):
                writer.add_outgoing([out(1)], done.append)
                await until(lambda: writer.errors >= 1)
                assert done == []
                assert isinstance(writer.last_error, StoreLocked)
            await writer.flush()
            assert done == [T]
            writer.add_outgoing([out(2)], done.append)  # just after an error: thread only
            await writer.flush()
            assert len(rows(tmp_path)) == 2
        loop_thread = threading.main_thread().name
        # First try on the loop without waiting; every retry (and the next batch) on the
        # writer thread, where waiting for the lock is harmless.
        assert calls[0] == (False, loop_thread)
        assert all(wait and name != loop_thread for wait, name in calls[1:])
        assert len(calls) >= 3

    run(scenario)


def test_commits_return_to_the_loop_once_the_quiet_time_after_an_error_is_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(writer_module, "RETRY_INITIAL_S", 0.01)
    monkeypatch.setattr(writer_module, "INLINE_QUIET_AFTER_ERROR_S", 0.05)

    async def scenario() -> None:
        async with running_writer(tmp_path, sync="normal") as writer:
            with write_locked(writer.store.path):
                writer.add_outgoing([out(1)], lambda _at: None)
                await until(lambda: writer.errors >= 1)
            await writer.flush()
            assert writer.inline_commits == 0  # the failed try was on the loop; the retry not
            await asyncio.sleep(0.06)  # the loop's clock is now past the quiet time
            for seq in (2, 3):
                writer.add_outgoing([out(seq)], lambda _at: None)
                await writer.flush()
            assert writer.inline_commits == 2
            assert len(rows(tmp_path)) == 3

    run(scenario)


# -- a bad item fails alone; a broken store fails every waiter ------------------------------


def test_one_poisoned_delivery_fails_alone_and_every_other_item_commits(tmp_path: Path) -> None:
    """A receipt with an out-of-range stamp (2^64 - 1 overflows SQLite's INTEGER bind) among
    many other writes: only that delivery fails; the rest commit and hear so."""

    async def scenario() -> None:
        async with running_writer(tmp_path) as writer:
            writer.add_outgoing([out(s) for s in range(1, 11)], lambda _at: None)
            await writer.flush()
            done: list[str] = []
            failed: list[tuple[str, BaseException]] = []
            good = ReceiptFrame([(1, 5)], 1, 2, 3, 4, 5, "full")
            poisoned = ReceiptFrame([(6, 6)], 1, 2, 2**64 - 1, 4, 5, "full")
            for seq in range(11, 31):
                writer.add_outgoing([out(seq)], lambda _at, seq=seq: done.append(f"out {seq}"),
                                    lambda exc: failed.append(("out", exc)))
                if seq == 20:
                    writer.add_delivery(Delivery("bob", [6], poisoned, 6),
                                        lambda: done.append("poisoned"),
                                        lambda exc: failed.append(("poisoned", exc)))
            writer.add_delivery(Delivery("bob", [1, 2, 3, 4, 5], good, 6),
                                lambda: done.append("good delivery"))
            writer.add_incoming([incoming(1), incoming(2)],
                                lambda r, _at: done.append(f"in {r.committed}"))
            await writer.flush()
            assert [kind for kind, _exc in failed] == ["poisoned"]
            # Told as a refused row (kind, exit code, a message to act on), caused by it.
            assert isinstance(failed[0][1], RowRefused)
            assert isinstance(failed[0][1].__cause__, OverflowError)
            assert done == [*(f"out {s}" for s in range(11, 31)), "good delivery", "in [1, 2]"]
            states = rows(tmp_path)
            assert len(states) == 32
            assert [states[f"out-bob-{s}"] for s in range(1, 7)] == ["delivered"] * 5 + ["pending"]
            assert writer.items_failed == 1
            assert writer.failure is None
            # The writer goes on committing as before.
            later: list[int] = []
            writer.add_outgoing([out(31)], later.append)
            await writer.flush()
            assert later == [T]

    run(scenario)


def test_a_bad_message_in_a_peers_group_costs_only_itself(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_writer(tmp_path) as writer:
            results: list[IncomingResult] = []
            bad = Envelope("in-bad", 3, "bob", "alice", "x", T, 2**64 - 1)
            writer.add_incoming([incoming(1), incoming(2), bad, incoming(4)],
                                lambda r, _at: results.append(r))
            await writer.flush()
            assert [r.committed for r in results] == [[1, 2, 4]]
            assert set(rows(tmp_path)) == {"in-1", "in-2", "in-4"}

    run(scenario)


def test_a_store_that_fails_unexpectedly_fails_every_waiter_and_breaks_the_writer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 15 bug 1: a `RuntimeError` inside `Store.apply` used to drop the callbacks, so
    their waiters waited for ever. Now each hears the error, and so does `on_failure`."""

    async def scenario() -> None:
        broken: list[BaseException] = []
        store = Store.open(tmp_path, name="alice", sync="normal")
        writer = GroupCommitWriter(store, FakeClock(), node="alice", on_failure=broken.append)
        task = asyncio.create_task(writer.run())
        try:
            def boom(*_args: object, **_kwargs: object) -> None:
                raise RuntimeError("disk controller on fire")

            monkeypatch.setattr(Store, "apply", boom)
            loop = asyncio.get_running_loop()
            futures = [loop.create_future() for _ in range(3)]
            for seq, future in enumerate(futures, 1):
                writer.add_outgoing([out(seq)], future.set_result, future.set_exception)
            for future in futures:
                with pytest.raises(RuntimeError, match="on fire"):
                    await asyncio.wait_for(future, PATIENCE_S)
            assert [str(e) for e in broken] == ["disk controller on fire"]
            assert writer.failure is broken[0]
            # Later writes are refused at once, never left waiting.
            late = loop.create_future()
            writer.add_incoming([incoming(1)], lambda *_a: late.set_result(None),
                                late.set_exception)
            with pytest.raises(RuntimeError):
                await asyncio.wait_for(late, PATIENCE_S)
            await asyncio.wait_for(writer.flush(), PATIENCE_S)
        finally:
            monkeypatch.undo()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            writer.close()

    run(scenario)


# -- a write that can never succeed is refused alone, never retried --------------------------


class _Unencodable:
    """Not a value msgspec can encode: what a bug of ours might put in an envelope."""


@pytest.mark.parametrize(
    ("bad", "cause"),
    [
        # An HLC beyond 64 bits: SQLite cannot bind it.
        (Envelope("out-bob-2", 2, "alice", "bob", "x", T, 2**64), OverflowError),
        # A body that is not text: sqlite3 cannot bind a list (a plain StoreError until
        # 2026-12-06, so the batch was retried for ever).
        (Envelope("out-bob-2", 2, "alice", "bob", ["x"], T, 2), sqlite3.ProgrammingError),  # type: ignore[arg-type]
        # A bug of ours: the checksum's encoder raises before SQLite sees the row.
        (Envelope("out-bob-2", 2, "alice", "bob", _Unencodable(), T, 2), TypeError),  # type: ignore[arg-type]
    ],
    ids=["overflow", "unbindable", "bug"],
)
def test_our_own_message_that_fails_unexpectedly_is_refused_alone_and_the_writer_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, bad: Envelope, cause: type[Exception],
) -> None:
    """One of our own outgoing messages whose write raised anything but a store condition
    used to break the writer (every later send failed: the node stopped accepting work), or,
    for a value sqlite3 could not bind, to hold every write behind it for ever. Now it fails
    alone with a `RowRefused` caused by the exception (logged once, with where it was
    raised, and counted); the rest of its batch commits and the writer carries on."""

    async def scenario() -> None:
        async with running_writer(tmp_path) as writer:
            done: list[str] = []
            failed: list[BaseException] = []
            writer.add_outgoing([out(1)], lambda _at: done.append("out 1"))
            writer.add_outgoing([bad], lambda _at: done.append("bad"), failed.append)
            writer.add_outgoing([out(3)], lambda _at: done.append("out 3"))
            writer.add_incoming([incoming(1)], lambda r, _at: done.append(f"in {r.committed}"))
            await writer.flush()
            assert done == ["out 1", "out 3", "in [1]"]
            (refused,) = failed
            assert isinstance(refused, RowRefused)
            assert isinstance(refused.__cause__, cause)
            assert writer.failure is None
            assert (writer.items_failed, writer.errors) == (1, 0)
            assert set(rows(tmp_path)) == {"out-bob-1", "out-bob-3", "in-1"}
            later: list[int] = []
            writer.add_outgoing([out(4)], later.append)
            await writer.flush()
            assert later == [T]

    with caplog.at_level(logging.WARNING, logger="meshpost.store.writer"):
        run(scenario)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert "our message out-bob-2" in errors[0].getMessage()
    assert "refused by the store" in errors[0].getMessage()


def test_an_outgoing_id_stored_before_is_refused_alone_and_never_retried(tmp_path: Path) -> None:
    """Reliability bug 6, left open: an item failing on a constraint (here our own message
    reusing a stored id: UNIQUE (sender, id)) failed its whole batch, which the writer
    retried every 2 s for ever, so nothing after it was ever committed. Now it is refused
    alone with `RowRefused`, the rest commits at once, and the writer carries on."""

    async def scenario() -> None:
        async with running_writer(tmp_path) as writer:
            writer.add_outgoing([out(1)], lambda _at: None)
            await writer.flush()
            done: list[str] = []
            failed: list[BaseException] = []
            reused = Envelope("out-bob-1", 3, "alice", "bob", "same id again", T, 3)
            writer.add_outgoing([out(2)], lambda _at: done.append("out 2"))
            writer.add_outgoing([reused], lambda _at: done.append("reused"), failed.append)
            writer.add_outgoing([out(4)], lambda _at: done.append("out 4"))
            writer.add_incoming([incoming(1)], lambda r, _at: done.append(f"in {r.committed}"))
            await writer.flush()
            assert done == ["out 2", "out 4", "in [1]"]
            assert len(failed) == 1
            assert isinstance(failed[0], RowRefused)
            assert "UNIQUE constraint failed" in str(failed[0])
            assert writer.items_failed == 1
            assert writer.failure is None
            assert writer.errors == 0  # not a store condition: nothing was retried
            assert set(rows(tmp_path)) == {"out-bob-1", "out-bob-2", "out-bob-4", "in-1"}
            later: list[int] = []
            writer.add_outgoing([out(5)], later.append)
            await writer.flush()
            assert later == [T]

    run(scenario)


def test_a_peers_message_that_can_never_be_a_row_is_refused_alone_in_its_result(
    tmp_path: Path,
) -> None:
    """A message breaking a NOT NULL constraint (no body) inside a peer's group, and alone in
    a group of its own: each is listed in its group's `refused` with a `RowRefused` (the node
    rejects it to the peer), the others are committed, and nothing is retried."""

    async def scenario() -> None:
        async with running_writer(tmp_path, sync="normal") as writer:
            bodiless = Envelope("in-3", 3, "bob", "alice", None, T, 3)  # type: ignore[arg-type]
            alone = Envelope("in-5", 5, "bob", "alice", None, T, 5)  # type: ignore[arg-type]
            results: list[IncomingResult] = []
            writer.add_incoming([incoming(1), incoming(2), bodiless, incoming(4)],
                                lambda r, _at: results.append(r))
            writer.add_incoming([alone], lambda r, _at: results.append(r))
            writer.add_outgoing([out(1)], lambda _at: None)
            await writer.flush()
            assert [r.committed for r in results] == [[1, 2, 4], []]
            assert [[seq for seq, _e in r.refused] for r in results] == [[3], [5]]
            for r in results:
                (_seq, error), = r.refused
                assert isinstance(error, RowRefused)
                assert "NOT NULL constraint failed: messages.body" in str(error)
            assert set(rows(tmp_path)) == {"in-1", "in-2", "in-4", "out-bob-1"}
            assert writer.items_failed == 2
            assert writer.errors == 0
            # Alone, on the loop's inline path too: refused at once, not retried.
            single: list[IncomingResult] = []
            writer.add_incoming([alone], lambda r, _at: single.append(r))
            await writer.flush()
            assert [seq for seq, _e in single[0].refused] == [5]
            assert writer.errors == 0

    run(scenario)


def test_messages_committed_alone_before_a_lock_stay_new_when_their_group_is_retried(
    tmp_path: Path,
) -> None:
    """A refused message sends its group message by message; a lock in the middle of that
    retries the group whole later. The messages committed before the lock were new: they
    must not come back as retransmissions (the node acts only on new ones: it would never
    tell subscribers or run a task that arrived so)."""

    async def scenario() -> None:
        clock = FakeClock()
        async with running_writer(tmp_path, clock) as writer:
            bodiless = Envelope("in-2", 2, "bob", "alice", None, T, 2)  # type: ignore[arg-type]
            group = [incoming(1), bodiless, incoming(3), incoming(4)]
            apply = writer._apply
            locked: list[int] = []

            def lock_once_at_message_3(batch: WriteBatch, **kwargs: Any) -> Any:
                if batch.incoming == [[group[2]]] and not locked:
                    locked.append(3)
                    clock.advance(1.0)  # the retry commits later, as it would
                    raise StoreLocked(str(writer.store.path))
                return apply(batch, **kwargs)

            writer._apply = lock_once_at_message_3  # type: ignore[method-assign]
            results: list[IncomingResult] = []
            writer.add_incoming(group, lambda r, _at: results.append(r))
            await writer.flush()
            assert locked == [3]
            (result,) = results
            assert (sorted(result.committed), result.duplicates) == ([1, 3, 4], [])
            assert [seq for seq, _e in result.refused] == [2]
            assert set(rows(tmp_path)) == {"in-1", "in-3", "in-4"}

    run(scenario)

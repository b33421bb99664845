"""Group commit: one writer thread, one transaction per batch of operations.

Rule: the event loop never waits on SQLite: never for an fsync, a lock or a big batch.
Operations accumulate in a `WriteBatch` while the previous batch commits in the writer thread;
when it finishes, the whole accumulated batch is committed at once, so fsync cost is shared by
every message that arrived meanwhile. The one exception is bounded: at `synchronous=NORMAL` (no
fsync on commit) a batch of at most `INLINE_MAX_ROWS` rows is committed on the loop, without
waiting for locks, because the two thread hand-offs would cost more than the commit.

A batch that fails for a reason other than a store condition is applied again one item at a
time, so that one bad item fails alone and the rest commit: no input from a peer may cost
another message. An item that fails on its own while the store commits without it is refused
alone and never retried, whatever it raised (`RowRefused`: a constraint its row breaks, a value
SQLite cannot bind; or any other exception, such as an out-of-range integer or a bug of ours
that this item sets off, reported as a `RowRefused` caused by it): its `failed` callback is
told, a peer's message is listed in its group's `IncomingResult.refused` (the node rejects it
to its sender). A store condition (locked, full, read-only, I/O) is retried, whole, after a
delay that starts short and doubles up to `RETRY_MAX_S`, until it clears; it is logged once
per episode. If the store fails even with no item at all, or is corrupt, the writer is
broken: every pending and later item fails with the error, and `on_failure` tells the node.

Latency matters as much as batching: an idle writer submits a new batch at the end of the
current loop iteration (everything added in that iteration shares it), and the writer thread
hands the result back with one `call_soon_threadsafe`, straight into the completion
callbacks. No task, event or asyncio future sits between a commit and its callbacks: each of
those would cost another trip round the event loop per commit. A delivery record is awaited
by no one (its receipt was reported when it arrived), so it never makes `submit_now` commit
early: it waits for the end of the loop iteration, after the wake-ups already queued, and a
sender resuming there puts its next message into the same commit (whose submit then needs no
kick of its own). No submit is queued for nothing either: frames of a transport drain hold
their adds (`hold_submits`) for the drain's `submit_now`, and `on_committed` runs after each
commit's callbacks, so that what they started (the node's frames) leaves in the same turn.

When the WAL is checkpointed and starts over is the `WalKeeper`'s (`store/checkpoints.py`):
the writer adds each commit's pages to its count, calls it only once that reaches a page at
which something may be due, and runs its catch-up between two commits when it asks.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import sqlite3
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import meshpost.probes as probes
from meshpost.clock import Clock
from meshpost.errors import (
    DataDirNotWritable,
    RowRefused,
    StoreCorrupt,
    StoreError,
    StoreFull,
    StoreLocked,
)
from meshpost.protocol import Envelope
from meshpost.store.checkpoints import WalKeeper, name_os_thread
from meshpost.store.patterns import NewTask
from meshpost.store.sqlite import Delivery, IncomingResult, Rejection, Store, WriteBatch

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Operations allowed to wait for the next commit before producers are made to wait.
MAX_PENDING_ROWS = 8_192
#: Retry delays for store conditions (locked, full, read-only, I/O): the batch waits, the node
#: keeps running, nothing is acknowledged until it commits. The first retry comes soon, so a
#: lock held for a moment costs little; each failure doubles the delay up to the cap, so a disk
#: that stays full costs an attempt (a whole batch written and rolled back) every 10 s rather
#: than every 2 s, as it did until 2026-12-06, and a cleared condition is noticed within 10 s.
#: The first commit that succeeds starts the delays over.
RETRY_INITIAL_S = 0.05
RETRY_MAX_S = 10.0
#: At `synchronous=NORMAL` a commit does not fsync: for a batch this small, committing on the
#: event loop costs less than the two thread hand-offs it saves (measured: ~60 us commit vs
#: ~120 us of hand-offs on a 2-core machine), and it is what keeps single-message latency low.
INLINE_MAX_ROWS = 32
INLINE_SYNC_LEVELS = frozenset({"normal", "off"})
#: After a failed write, commit on the thread only (where waiting is harmless) for this long.
INLINE_QUIET_AFTER_ERROR_S = 5.0
_TRANSIENT = (StoreLocked, StoreFull, DataDirNotWritable)


class StoreRetry(NamedTuple):
    """The episode of store conditions under way (`GroupCommitWriter.retrying`)."""

    attempts: int  # failed since the last commit
    delay_s: float  # before the next attempt
    for_s: float  # since the episode's first failure (the clock's monotonic time)
    error: StoreError  # the last failure


def _store_condition(exc: BaseException) -> bool:
    """Whether `exc` is about the store (retry the batch whole once it clears) rather than
    about what one item writes (`RowRefused`, or any other exception: refuse it alone)."""
    return isinstance(exc, StoreError) and not isinstance(exc, RowRefused)


def _refusal(error: Exception, path: str) -> RowRefused:
    """What an item's callback is told when the item fails on its own: `error` itself if the
    store refused the row, else a `RowRefused` naming the exception (the error a user sees,
    with kind and exit code; the original is its `__cause__`)."""
    if isinstance(error, RowRefused):
        return error
    refusal = RowRefused(path, f"{type(error).__name__}: {error}")
    refusal.__cause__ = error
    return refusal

class _Room(asyncio.Event):
    """The pending batch's room for producers: keeps its writer's `has_room`, a plain
    attribute (a property was two Python calls on every send's path, both sides), equal to
    whether it is set, whoever sets or clears it."""

    def __init__(self, writer: GroupCommitWriter) -> None:
        super().__init__()
        self._writer = writer

    def clear(self) -> None:
        self._writer.has_room = False
        super().clear()

    def set(self) -> None:
        self._writer.has_room = True
        super().set()


class _Flagged(asyncio.Event):
    """An event that says, as a plain attribute, whether it was cleared since it was last
    set: the writer reads that at every commit, where `is_set()` or a `set()` of an event
    already set would be a Python call each (the writer's `_idle`)."""

    cleared = False

    def clear(self) -> None:
        self.cleared = True
        super().clear()

    def set(self) -> None:
        self.cleared = False
        super().set()


OutgoingDone = Callable[[int], None]
IncomingDone = Callable[[IncomingResult, int], None]
Done = Callable[[], None]
#: Told the error when an item cannot be committed (alone, or because the writer broke).
Failed = Callable[[BaseException], None]
#: The kinds of item a batch holds, in the order of `WriteBatch`'s fields.
_OUT, _IN, _DELIVERY, _REJECTION, _TASKS = range(5)
#: One item added to a batch: its kind, what it writes, and who is told how it went.
_Item = tuple[int, Any, Callable[..., None], Failed | None]
_Callbacks = list[_Item]
#: What a commit gives back: results for the incoming groups, and the commit timestamp.
_Applied = tuple[list[IncomingResult], int]
#: How one item applied alone went: its result (incoming) and commit time, or its error.
_ItemOutcome = tuple[IncomingResult | None, int] | BaseException
#: Outcomes of the items applied alone, in order, and why the writer broke (None: it did not).
_Isolated = tuple[list[_ItemOutcome], BaseException | None]


def _add_item(batch: WriteBatch, kind: int, payload: Any) -> None:
    """Put one queued item into `batch`, where its kind goes (a retry rebuilds batches)."""
    if kind == _OUT:
        batch.outgoing.extend(payload)
    elif kind == _IN:
        batch.incoming.append(payload)
    elif kind == _DELIVERY:
        batch.deliveries.append(payload)
    elif kind == _TASKS:
        batch.tasks.extend(payload)
    else:
        batch.rejections.append(payload)


class GroupCommitWriter:
    """Batches writes for one `Store` and commits them from a dedicated thread.

    Adds made before `run()` starts wait in the batch; `run()` (a task of the node) lets
    them commit and keeps the writer active until cancelled.
    """

    def __init__(
        self, store: Store, clock: Clock, *, node: str,
        on_failure: Callable[[BaseException], None] | None = None,
        probe: probes.Probe | None = None,
        on_committed: Callable[[], None] | None = None,
    ) -> None:
        """`on_failure` is called once, on the loop, if the writer breaks (see the module);
        `on_committed` after the callbacks of each commit (what they started can go out
        together, before the loop's next turn)."""
        self.store = store
        self._clock = clock
        self._node = node
        self._on_failure = on_failure
        self._on_committed = on_committed
        self._probe = probe
        #: Why the writer broke; from then on every item fails with it.
        self.failure: BaseException | None = None
        #: Items (and messages of a peer's group) refused alone while the rest of their
        #: batch committed: each logged once, never retried.
        self.items_failed = 0
        #: Seqs of a peer's group (by the group's id) that a message-by-message pass
        #: committed before a store condition sent the group back to be retried whole: new,
        #: though the retry finds them stored (`_apply_incoming_alone`).
        self._new_before_retry: dict[int, set[int]] = {}
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"meshpost-store-{node}",
            initializer=name_os_thread, initargs=("meshpost-store",),
        )
        self._batch = WriteBatch()
        self._callbacks: _Callbacks = []
        self._rows = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        #: A batch is being committed (or waits to be retried): the next one must wait.
        self._busy = False
        self._kick_scheduled = False
        #: A submit of only non-urgent adds (delivery records) is queued on the loop.
        self._lazy_scheduled = False
        #: Adds schedule no submit of their own until `submit_now()` (`hold_submits`).
        self._holding = False
        #: `call()` jobs on the thread: the connection is not shared while one runs.
        self._thread_jobs = 0
        self._inline = store.sync in INLINE_SYNC_LEVELS
        self._inline_after = 0.0
        #: The WAL's checkpoints and start-overs: each commit adds its pages to
        #: `wal.written`, and calls it only when that reaches its `due_*` (see `_apply`).
        self.wal = WalKeeper(store, node=node, probe=probe)
        self.inline_commits = 0
        #: Whether the pending batch has room for producers (`wait_for_room`); `_room` keeps
        #: it.
        self.has_room = True
        self._room = _Room(self)
        self._room.set()
        self._idle = _Flagged()
        self._idle.set()
        self.commits = 0
        self.rows_committed = 0
        #: Attempts that failed on a store condition (each retry counts), and the last one.
        self.errors = 0
        self.last_error: StoreError | None = None
        #: The current episode of store conditions (failed attempts since the last commit):
        #: how many, since when (the clock's monotonic time), the delay before the next
        #: retry (0.0: none pending), and the error last logged (another one is logged too).
        self.episode_errors = 0
        self._episode_started = 0.0
        self.retry_delay_s = 0.0
        self._episode_logged: str | None = None

    @property
    def checkpoints(self) -> int:
        """Background WAL checkpoints that ran (`WalKeeper.checkpoints`)."""
        return self.wal.checkpoints

    @property
    def wal_restarts(self) -> int:
        """Catch-ups on the writer's connection that copied the whole WAL."""
        return self.wal.wal_restarts

    @property
    def idle_catch_ups(self) -> int:
        """Catch-ups between two commits (early start-overs), not inside one."""
        return self.wal.idle_catch_ups

    @property
    def retrying(self) -> StoreRetry | None:
        """What the writer is retrying now (None: its last attempt committed), for status."""
        if not self.episode_errors or self.last_error is None:
            return None
        return StoreRetry(self.episode_errors, self.retry_delay_s,
                          self._clock.monotonic() - self._episode_started, self.last_error)

    # -- producers ------------------------------------------------------------------------

    async def wait_for_room(self) -> None:
        """Wait (back-pressure) until the pending batch has room."""
        await self._room.wait()

    def add_outgoing(
        self, messages: list[Envelope], done: OutgoingDone, failed: Failed | None = None
    ) -> None:
        """Commit our own `messages`; `done(stored_at_ns)` after, or `failed(error)`."""
        if self.failure is not None:
            self._fail_later(failed)
            return
        self._batch.outgoing.extend(messages)
        self._callbacks.append((_OUT, messages, done, failed))
        self._schedule(len(messages))

    def add_incoming(
        self, messages: list[Envelope], done: IncomingDone, failed: Failed | None = None
    ) -> None:
        """Commit a peer's `messages`; `done(result, stored_at_ns)` after, or `failed(error)`
        (the writer broke). A message the store refuses on its own is in `result.refused`,
        with why, and nowhere else: the rest of the group is committed."""
        if self.failure is not None:
            self._fail_later(failed)
            return
        self._batch.incoming.append(messages)
        self._callbacks.append((_IN, messages, done, failed))
        self._schedule(len(messages))

    def add_delivery(self, delivery: Delivery, done: Done, failed: Failed | None = None) -> None:
        if self.failure is not None:
            self._fail_later(failed)
            return
        self._batch.deliveries.append(delivery)
        self._callbacks.append((_DELIVERY, delivery, done, failed))
        self._schedule(len(delivery.seqs), urgent=False)

    def add_rejection(
        self, rejection: Rejection, done: Done, failed: Failed | None = None
    ) -> None:
        if self.failure is not None:
            self._fail_later(failed)
            return
        self._batch.rejections.append(rejection)
        self._callbacks.append((_REJECTION, rejection, done, failed))
        self._schedule(len(rejection.seqs))

    def add_tasks(self, tasks: list[NewTask], done: Done, failed: Failed | None = None) -> None:
        """Commit a ventilator's new `tasks` with the next batch (many submissions share a
        commit); `done()` after, or `failed(error)`."""
        if self.failure is not None:
            self._fail_later(failed)
            return
        self._batch.tasks.extend(tasks)
        self._callbacks.append((_TASKS, tasks, done, failed))
        self._schedule(len(tasks))

    def _fail_later(self, failed: Failed | None) -> None:
        """A broken writer refuses at once, but answers on the next loop turn as a commit
        would: callers never see their callback run inside the add."""
        if failed is not None and self.failure is not None:
            asyncio.get_running_loop().call_soon(failed, self.failure)

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` on the writer thread (it owns the connection)."""
        loop = asyncio.get_running_loop()
        self._thread_jobs += 1
        try:
            return await loop.run_in_executor(self._executor, fn, *args)
        finally:
            self._thread_jobs -= 1

    async def flush(self) -> None:
        """Wait until everything added so far is committed."""
        while self._callbacks or self._busy:
            self._idle.clear()
            self._schedule()
            await self._idle.wait()


    # -- committing -----------------------------------------------------------------------

    async def run(self) -> None:
        """Commit batches until cancelled."""
        self._loop = asyncio.get_running_loop()
        self._schedule()
        try:
            await asyncio.Event().wait()
        finally:
            self._loop = None

    def _schedule(self, rows: int = 0, *, urgent: bool = True) -> None:
        """Submit the pending batch at the end of this loop iteration, if the writer is idle:
        everything added until then shares one transaction. Only an `urgent` add (one that
        someone waits for) lets `submit_now` start it earlier. `rows`: what an add just put
        in the batch (counted here, not in a call of its own: three adds a single send)."""
        if rows:
            self._rows += rows
            if self._rows >= MAX_PENDING_ROWS and self.has_room:
                self._room.clear()
        if self._loop is None or self._busy or self._kick_scheduled or not self._callbacks:
            return
        if urgent:
            self._kick_scheduled = True
            # A lazy submit already queued runs no later than a new one would (typically: a
            # receipt's record, then the woken sender's next message): it serves as the kick,
            # and the loop needs no extra turn for a submit that would find nothing to do.
            if not self._lazy_scheduled and not self._holding:
                self._loop.call_soon(self._submit_pending)
        elif not self._lazy_scheduled:
            self._lazy_scheduled = True
            self._loop.call_soon(self._submit_pending, True)

    def hold_submits(self) -> None:
        """Until `submit_now()`, adds queue no submit of their own. For a caller that calls
        `submit_now()` before the loop's next turn, whatever happens: the node, from a frame
        of a transport drain to the drain's `on_drained` (a submit queued per received batch
        only cost the receiver a loop turn that found nothing left to commit)."""
        self._holding = True

    def submit_now(self) -> None:
        """Start committing the pending batch now rather than at the end of this loop
        iteration (for callers that know no more adds are coming in it); ends
        `hold_submits`."""
        self._holding = False
        if self._kick_scheduled:
            self._submit_pending()

    def _submit_pending(self, lazy: bool = False) -> None:
        """`lazy`: the submit `_schedule` queued for non-urgent adds (it is no longer)."""
        if lazy:
            self._lazy_scheduled = False
        if self._probe is not None:
            self._probe.mark(probes.WRITER_SUBMITS)
        self._kick_scheduled = False
        if self._loop is None or self._busy or not self._callbacks:
            return
        batch, callbacks, rows = self._batch, self._callbacks, self._rows
        self._batch, self._callbacks, self._rows = WriteBatch(), [], 0
        if not self.has_room:  # rarely: a set is a call, and this runs at every commit
            self._room.set()
        inline = (
            self._inline
            and rows <= INLINE_MAX_ROWS
            and self._thread_jobs == 0
            # A WAL due to start over goes to the thread, where the catch-up may wait.
            and self.wal.written < self.wal.restart_at
        )
        if inline and self._inline_after:
            # The clock is read only while a failed write's quiet time may still run.
            if self._loop.time() < self._inline_after:
                inline = False
            else:
                self._inline_after = 0.0
        if not inline:
            self._submit(batch, callbacks)
            return
        # The commit on the loop (inline here: a call less at every single send's commit).
        self._busy = True
        outcome: _Applied | Exception
        try:
            # Never wait for another process's lock here: that would stall the event loop.
            outcome = self._apply(batch, False)
            self.inline_commits += 1
        except Exception as exc:
            outcome = exc
        self._finished(batch, callbacks, outcome)

    def _submit(self, batch: WriteBatch, callbacks: _Callbacks) -> None:
        loop = self._loop
        if loop is None:  # stopped meanwhile: nothing was committed, nothing is acknowledged
            self._busy = False
            self._idle.set()
            return
        self._busy = True
        if self._probe is not None:
            self._probe.mark(probes.THREAD_COMMIT)

        def finished(future: concurrent.futures.Future[_Applied]) -> None:
            # Runs on the writer thread; the loop may already be closed when the node stops.
            exc = future.exception()
            outcome = future.result() if exc is None else exc
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._finished, batch, callbacks, outcome)

        self._executor.submit(self._apply, batch).add_done_callback(finished)

    def _finished(
        self,
        batch: WriteBatch,
        callbacks: _Callbacks,
        outcome: _Applied | BaseException,
    ) -> None:
        if isinstance(outcome, BaseException):
            if self._loop is not None and _store_condition(outcome):
                self._inline_after = self._loop.time() + INLINE_QUIET_AFTER_ERROR_S
            self._failed(batch, callbacks, outcome)
            return
        results, stored_at = outcome
        self._busy = False
        if self.episode_errors:
            self._recovered()
        # The next batch (added while this one committed) goes to the thread before the
        # callbacks run, so its commit overlaps with their work.
        if self._callbacks:
            self._schedule()
        index = 0
        for kind, _payload, done, _failed in callbacks:
            try:
                if kind == _OUT:
                    done(stored_at)
                elif kind == _IN:
                    if self._new_before_retry:
                        self._still_new(_payload, results[index])
                    done(results[index], stored_at)
                    index += 1
                else:
                    done()
            except Exception:
                log.exception("[%s] store completion callback failed", self._node)
        self._committed()
        self._restart_if_due()
        # `_idle` set only if cleared: a `set()` of an event already set is a Python call.
        if self._idle.cleared and not self._busy and not self._callbacks:
            self._idle.set()

    def _restart_if_due(self) -> None:
        """After a commit: the catch-up of an early start-over that waited for it."""
        if self.wal.catch_up_after_commit and not self._busy:
            self._catch_up_between_commits()

    def _committed(self) -> None:
        if self._on_committed is not None:
            try:
                self._on_committed()
            except Exception:
                log.exception("[%s] store commit callback failed", self._node)

    def _failed(self, batch: WriteBatch, callbacks: _Callbacks, exc: BaseException) -> None:
        if not _store_condition(exc):
            # Not a store condition: retrying would fail the same way forever. Either an item
            # cannot be written (refuse it alone) or the writer is broken: find out which.
            # A refused row is logged once, with its item (`_isolated`).
            log.log(logging.DEBUG if isinstance(exc, RowRefused) else logging.WARNING,
                    "[%s] store write failed (%r); applying its %d item(s) one by one",
                    self._node, exc, len(callbacks))
            self._isolate(callbacks)
            return
        assert isinstance(exc, StoreError)
        self.errors += 1
        self.last_error = exc
        if isinstance(exc, StoreCorrupt):
            # A row rotted on disk (a retransmission's stored copy failed its checksum):
            # retrying cannot fix it, and the node must stop as it would have at open.
            self._busy = False
            self.fail(exc, callbacks)
            return
        assert self._loop is not None
        delay = self._back_off(exc)
        # Still busy: later adds wait for this batch, so commit order stays add order.
        self._loop.call_later(delay, self._submit, batch, callbacks)

    def _back_off(self, exc: StoreError) -> float:
        """The delay before the next attempt after `exc` (`RETRY_INITIAL_S`, doubled after
        each failure of the episode up to `RETRY_MAX_S`). Logged once per episode, and again
        only if the error changes: a WARNING for a condition that clears by itself (locked,
        full, read-only), an ERROR for the others (I/O)."""
        if self.episode_errors == 0:
            self._episode_started = self._clock.monotonic()
            delay = RETRY_INITIAL_S
        else:
            delay = min(self.retry_delay_s * 2, RETRY_MAX_S)
        self.episode_errors += 1
        self.retry_delay_s = delay
        text = str(exc)
        if text == self._episode_logged:
            log.debug("[%s] store write failed again (%d in a row), retrying in %.2fs: %s",
                      self._node, self.episode_errors, delay, exc)
            return delay
        log.log(logging.WARNING if isinstance(exc, _TRANSIENT) else logging.ERROR,
                "[%s] store write failed%s, retrying in %.2fs, then less and less often (at "
                "most every %.0fs) until it commits; nothing waiting for it is acknowledged "
                "meanwhile: %s", self._node,
                "" if self._episode_logged is None else f" ({self.episode_errors} in a row)",
                delay, RETRY_MAX_S, exc)
        self._episode_logged = text
        return delay

    def _recovered(self) -> None:
        """A commit went through: the episode of store conditions is over (said once, with
        its count), and the next one starts from the shortest delay again."""
        log.warning("[%s] store writes work again, after %d failed attempt(s) over %.1fs",
                    self._node, self.episode_errors,
                    self._clock.monotonic() - self._episode_started)
        self.episode_errors = 0
        self.retry_delay_s = 0.0
        self._episode_logged = None

    # -- isolating a bad item --------------------------------------------------------------

    def _isolate(self, callbacks: _Callbacks) -> None:
        """Apply each item of a failed batch alone, on the thread, then report per item."""
        loop = self._loop
        if loop is None:  # stopped meanwhile: nothing was committed, nothing is acknowledged
            self._busy = False
            self._idle.set()
            return

        def finished(future: concurrent.futures.Future[_Isolated]) -> None:
            error = future.exception()
            outcome: _Isolated = future.result() if error is None else ([], error)
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._isolated, callbacks, outcome)

        self._executor.submit(self._apply_alone, callbacks).add_done_callback(finished)

    def _apply_alone(self, callbacks: _Callbacks) -> _Isolated:
        """Each item in its own transaction, in order. Returns one outcome per item applied
        (a result with its commit time, or the `RowRefused` it failed with) and, if the writer
        is broken, why: the store fails with no item at all. An item that fails otherwise is
        refused alone, whatever its kind and whatever it raised: the store just committed
        without it, and its own transaction was rolled back, so it left nothing behind. An
        outgoing one leaves its seq unused, which links tolerate as they do a rejected seq."""
        try:
            self.store.apply(WriteBatch(), self._clock.wall_ns())
        except Exception as broken:
            if _store_condition(broken):
                raise  # a store condition after all: the batch is retried whole
            return [], broken
        outcomes: list[_ItemOutcome] = []
        for kind, payload, _done, _failed in callbacks:
            try:
                if kind == _IN:
                    outcomes.append(self._apply_incoming_alone(payload))
                    continue
                batch = WriteBatch()
                _add_item(batch, kind, payload)
                _results, stored_at = self._apply(batch)
            except Exception as error:
                if _store_condition(error):
                    # A store condition (locked, full): the rest is retried as one batch.
                    return outcomes, error
                outcomes.append(_refusal(error, str(self.store.path)))
            else:
                outcomes.append((None, stored_at))
        return outcomes, None

    def _apply_incoming_alone(self, group: list[Envelope]) -> _ItemOutcome:
        """A peer's group; if it fails whole, message by message: a bad message costs only
        itself (in the result's `refused`, so it is rejected, not receipted). Raises a store
        condition (`StoreError` but `RowRefused`)."""
        path = str(self.store.path)
        try:
            results, stored_at = self._apply(WriteBatch(incoming=[group]))
            return results[0], stored_at
        except Exception as error:
            if _store_condition(error):
                raise
            if len(group) == 1:
                return (IncomingResult([], [], [], [(group[0].seq, _refusal(error, path))]),
                        self._clock.wall_ns())
        merged = IncomingResult([], [], [])
        stored_at = 0
        for message in group:
            try:
                (result,), stored_at = self._apply(WriteBatch(incoming=[[message]]))
            except Exception as error:
                if _store_condition(error):
                    # The group is retried whole: what this pass committed stays new.
                    self._new_before_retry.setdefault(id(group), set()).update(
                        set(merged.committed).difference(merged.duplicates))
                    raise
                merged.refused.append((message.seq, _refusal(error, path)))
                continue
            merged.committed += result.committed
            merged.conflicts += result.conflicts
            merged.duplicates += result.duplicates
        return merged, stored_at or self._clock.wall_ns()

    def _isolated(self, callbacks: _Callbacks, outcome: _Isolated) -> None:
        outcomes, broken = outcome
        if broken is not None and _store_condition(broken):
            # The store itself failed meanwhile (locked, full): retry the batch whole.
            assert isinstance(broken, StoreError)
            self._rebuild_and_retry(callbacks[len(outcomes):], broken, outcomes, callbacks)
            return
        self._busy = False
        if self.episode_errors and any(not isinstance(o, BaseException) for o in outcomes):
            self._recovered()
        for (kind, payload, done, failed), item in zip(callbacks, outcomes, strict=False):
            try:
                if isinstance(item, BaseException):
                    self._refused(kind, payload, item)
                    if failed is not None:
                        failed(item)
                elif kind == _OUT:
                    done(item[1])
                elif kind == _IN:
                    result = item[0]
                    assert result is not None
                    if self._new_before_retry:
                        self._still_new(payload, result)
                    if result.refused:
                        by_seq = {m.seq: m for m in payload}
                        for seq, error in result.refused:
                            self._refused(kind, [by_seq[seq]], error)
                    done(result, item[1])
                else:
                    done()
            except Exception:
                log.exception("[%s] store completion callback failed", self._node)
        self._committed()
        if broken is not None:
            self._break(broken, callbacks[len(outcomes):])
        self._schedule()
        self._restart_if_due()
        if not self._busy and not self._callbacks:
            self._idle.set()

    def _still_new(self, group: list[Envelope], result: IncomingResult) -> None:
        """Messages of `group` committed before its retry are new, not retransmissions."""
        new = self._new_before_retry.pop(id(group), None)
        if new:
            result.duplicates = [seq for seq in result.duplicates if seq not in new]

    def _refused(self, kind: int, payload: Any, error: BaseException) -> None:
        """Count and log, once, an item (or a peer's message) refused alone and dropped."""
        self.items_failed += 1
        if kind in (_OUT, _IN):
            what = ", ".join(f"{m.id} ({m.sender} -> {m.recipient}, seq {m.seq})"
                             for m in payload[:3]) + (" ..." if len(payload) > 3 else "")
            what = f"{'our message' if kind == _OUT else 'message'} {what}"
        else:
            what = type(payload).__name__.lower() if kind != _TASKS else f"{len(payload)} task(s)"
        # A peer's message is its sender's bad input (a warning, as other bad input is); one
        # of our own writes refused is a bug of ours, and where it was raised helps unless
        # SQLite itself refused the row.
        own = kind != _IN
        cause = error.__cause__
        log.log(logging.ERROR if own else logging.WARNING,
                "[%s] %s refused by the store and dropped, not retried (the rest of its batch "
                "is committed): %s", self._node, what, error,
                exc_info=cause if own and cause is not None
                and not isinstance(cause, sqlite3.Error) else None)

    def _rebuild_and_retry(
        self, rest: _Callbacks, error: StoreError, outcomes: list[_ItemOutcome],
        callbacks: _Callbacks,
    ) -> None:
        """Report the items already applied alone, then retry the rest as one batch."""
        self._isolated(callbacks[: len(outcomes)], (outcomes, None))
        batch = WriteBatch()
        for kind, payload, _done, _failed in rest:
            _add_item(batch, kind, payload)
        if batch:
            self._busy = True
            self._failed(batch, rest, error)

    def fail(self, error: BaseException, pending: _Callbacks | None = None) -> None:
        """Break the writer from outside (the store was found corrupt after start): as
        `_break`, then wake whoever waits for the writer to go idle."""
        if self.failure is not None:
            return
        self._break(error, pending or [])
        if not self._busy and not self._callbacks:
            self._idle.set()

    def _break(self, error: BaseException, pending: _Callbacks) -> None:
        """The writer cannot commit: fail every pending and later item with `error`."""
        self.failure = error
        self._new_before_retry.clear()
        log.error("[%s] store writer broken; failing every pending write", self._node,
                  exc_info=error)
        queued = self._callbacks
        self._batch, self._callbacks, self._rows = WriteBatch(), [], 0
        self._room.set()
        # The owner first, so that what the callbacks report can name its failed state.
        if self._on_failure is not None:
            try:
                self._on_failure(error)
            except Exception:
                log.exception("[%s] store failure callback failed", self._node)
        for _kind, _payload, _done, failed in [*pending, *queued]:
            if failed is not None:
                try:
                    failed(error)
                except Exception:
                    log.exception("[%s] store failure callback failed", self._node)

    def _apply(self, batch: WriteBatch, wait_for_lock: bool = True) -> _Applied:
        # The commit timestamp is taken before the commit: a receipt may only claim a time at
        # which the row was at most being committed, and is sent only after COMMIT returns.
        stored_at = self._clock.wall_ns()
        probe = self._probe
        if probe is None:
            results = self.store.apply(batch, stored_at, wait_for_lock=wait_for_lock)
        else:
            probe.mark(probes.COMMIT[0])
            try:
                results = self.store.apply(batch, stored_at, wait_for_lock=wait_for_lock)
            finally:
                probe.mark(probes.COMMIT[1])
        rows = len(batch.outgoing)
        incoming = batch.incoming
        if incoming:  # (one group, every single send's on the receiver: no sum over a map)
            rows += len(incoming[0]) if len(incoming) == 1 else sum(map(len, incoming))
        for d in batch.deliveries:
            rows += len(d.seqs)
        self.commits += 1
        self.rows_committed += rows
        # The WAL keeper is called only once a checkpoint or start-over may be due: one
        # comparison a commit, not a call.
        wal = self.wal
        written = wal.written + batch.wal_pages(self.store.page_size)
        wal.written = written
        if wait_for_lock:
            if written >= wal.due_on_thread:
                wal.committed_on_thread()
        elif written >= wal.due_inline:
            wal.committed_on_loop(self._loop)
        return results, stored_at

    # -- the WAL keeper's catch-up between two commits ---------------------------------------

    def _catch_up_between_commits(self) -> None:
        """The WAL keeper's catch-up (an early start-over's) on the writer thread, the writer
        busy meanwhile: adds wait in the batch, and commit when it is done (`_caught_up`), so
        that none lands between its copy and the next commit, which starts the WAL over."""
        loop = self._loop
        if not self.wal.catch_up_due(runnable=loop is not None and self.failure is None):
            return
        assert loop is not None
        self._busy = True

        def finished(future: concurrent.futures.Future[None]) -> None:
            if future.exception() is not None:  # `catch_up` handles store errors itself
                log.error("[%s] WAL catch-up failed", self._node,
                          exc_info=future.exception())
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._caught_up)

        self._executor.submit(self.wal.catch_up).add_done_callback(finished)

    def _caught_up(self) -> None:
        self.wal.caught_up()
        self._busy = False
        if self._callbacks:
            self._schedule()
        else:
            self._idle.set()

    def close(self) -> None:
        """Stop checkpointing, close the store on the writer thread, then stop the thread."""
        try:
            self.wal.close()
            self._executor.submit(self.store.close).result(timeout=10)
        finally:
            self._executor.shutdown(wait=True)

    def __repr__(self) -> str:
        return f"GroupCommitWriter({self._node}, commits={self.commits}, pending={self._rows})"

"""The WAL's size: when it is copied back into the database (checkpoints) and when it starts over.

Rule: checkpoints run beside the commits, on a thread and connection of their own; only the
start-over, without which the WAL grows without bound, has the writer copy it itself, between
two commits or inside one on its thread. The writer calls in only when its count of WAL pages
reaches a `due_*` number, so a commit with nothing due costs a comparison.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import enum
import logging
import threading

import meshpost.probes as probes
from meshpost.errors import StoreError
from meshpost.store.sqlite import Store

log = logging.getLogger(__name__)

#: Start a WAL checkpoint (on its own thread and connection) after about this many WAL pages,
#: as SQLite's own autocheckpoint would; estimated per commit (`WriteBatch.wal_pages`) because
#: sqlite3 does not expose the WAL hook. Each checkpoint costs two fsyncs, and slows the
#: commits beside it: counting too many pages per small commit (8, until 12-01) made them
#: 1.5-8 times as frequent as SQLite's own.
CHECKPOINT_PAGES = 1000
#: Under a steady stream the writer commits while every background checkpoint runs, so the
#: WAL is never copied back whole and never starts over: it grew past 500 MB on each side in a
#: 3,000,000-message pair-throughput run. Past this many pages since it last started over, the
#: writer copies what the background checkpoints left itself, between two commits (it waits
#: for a background checkpoint still running, then copies about CHECKPOINT_PAGES pages), and
#: its next commit starts the WAL over. 4,000 until 2026-12-06: 8,000 lets the loop's commits
#: below checkpoint half as often (the WAL peaks at ~56 MB instead of ~30 under a saturated
#: pair, whose rate and CPU a message did not change: three alternating pairs).
WAL_RESTART_PAGES = 8000
#: Commits on the loop (small batches at sync=normal: one send at a time) start a checkpoint
#: after this many pages instead: a checkpoint's first act is the WAL's fsync, whose
#: writeback takes a core for milliseconds beside the sends in flight, and the send whose
#: commit starts one is the slowest 1% of single sends (docs/benchmarks.md, "the tail").
#: Half as many checkpoints put it below the p99: `pair-latency` at sync=normal, p99 lower
#: in 9 of 10 alternating pairs against 1,000 / 4,000 (quiet: 785-1,324 against 1,622-2,268
#: µs; at load 2.5-3: 683-4,752 against 1,621-4,055).
INLINE_CHECKPOINT_PAGES = 2 * CHECKPOINT_PAGES
#: Commits on the loop start the WAL over earlier, at this many pages, and off the critical
#: path: the checkpoint thread copies the WAL (the checkpoint due at that point anyway), then,
#: right after the next commit, the writer copies what was committed meanwhile, with new
#: commits waiting (its two fsyncs), rather than the commit past WAL_RESTART_PAGES waiting for
#: a running checkpoint, the whole copy and its fsyncs (7-14 ms: the slowest 0.1% of single
#: sends, docs/benchmarks.md). If the checkpoint thread is slow to run it, the commit past
#: WAL_RESTART_PAGES still catches up.
WAL_RESTART_EARLY_PAGES = WAL_RESTART_PAGES - INLINE_CHECKPOINT_PAGES


def name_os_thread(name: str) -> None:
    """Give the calling thread an OS-level name (`top -H`, `/proc/PID/task/*/comm`, `perf`;
    `benchmarks/pair_cpu.py` reports CPU per thread by it): Python 3.11 leaves every thread
    named after the process. Linux only, best effort: a name is a diagnostic, never needed.
    The store's threads: the writer's `meshpost-store`, the checkpoints' `meshpost-ckpt`."""
    with (contextlib.suppress(OSError),
          open(f"/proc/self/task/{threading.get_native_id()}/comm", "w") as comm):
        comm.write(name[:15])


class WalWork(enum.Enum):
    """What a commit leaves due (`WalKeeper.due`)."""

    #: A checkpoint on the checkpoint thread, beside the commits.
    CHECKPOINT = "checkpoint"
    #: A commit on the loop: the checkpoint thread copies the WAL, then the writer catches up
    #: between two commits (`WAL_RESTART_EARLY_PAGES`).
    EARLY_START_OVER = "early start-over"
    #: A commit on the writer thread: it catches up now, inside the commit
    #: (`WAL_RESTART_PAGES`).
    CATCH_UP = "catch-up"


class WalKeeper:
    """Checkpoints and start-overs of one store's WAL, for its `GroupCommitWriter`.

    The writer adds each commit's estimated pages to `written` and calls `committed_on_loop`
    (a commit on the loop) or `committed_on_thread` (on the writer thread) when `written`
    reaches `due_inline` or `due_on_thread`; sends a commit to its thread, where a catch-up may
    wait, from `restart_at` on; and after each commit, when `catch_up_after_commit` is set,
    runs `catch_up` on its thread between two commits (`catch_up_due`, `caught_up`).

    The two `due_*` numbers are never later than the first count at which something is due
    (a call that finds nothing due only costs the call): they are computed from where the
    counts last started again, which only move forward, so one computed from older ones is
    only earlier. `due_inline` also depends on `restart_requested`, which only the loop
    changes, so only the loop computes it; `restart_at` only `catch_up` moves.
    """

    def __init__(self, store: Store, *, node: str, probe: probes.Probe | None = None) -> None:
        self._store = store
        self._node = node
        self._probe = probe
        #: WAL pages the writer's commits appended since the store opened (estimated).
        self.written = 0
        #: `written` when the count of pages for the next checkpoint, and for the WAL's next
        #: start-over, last started again.
        self._checkpointed_at = 0
        self._restarted_at = 0
        #: An early start-over is under way (`WAL_RESTART_EARLY_PAGES`): its background
        #: copy runs or is queued, or its catch-up waits for the commit in flight.
        self.restart_requested = False
        #: The early start-over's background copy is done: the writer catches up right after
        #: its next commit.
        self.catch_up_after_commit = False
        self.restart_at = WAL_RESTART_PAGES
        self.due_inline = 0
        self.due_on_thread = 0
        self._checkpointer = store.open_checkpointer()
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"meshpost-checkpoint-{node}",
            initializer=name_os_thread, initargs=("meshpost-ckpt",),
        )
        self._checkpoint: concurrent.futures.Future[None] | None = None
        #: Background checkpoints that ran.
        self.checkpoints = 0
        #: Catch-up checkpoints on the writer's connection that copied the whole WAL.
        self.wal_restarts = 0
        #: Catch-ups between two commits (early start-overs), not inside one.
        self.idle_catch_ups = 0
        self._plan(on_loop=True)

    @property
    def pages(self) -> int:
        """Pages since the last checkpoint started (or the last catch-up)."""
        return self.written - self._checkpointed_at

    @property
    def since_restart(self) -> int:
        """Pages since the WAL last started over (less what incomplete catch-ups copied)."""
        return self.written - self._restarted_at

    def _plan(self, *, on_loop: bool) -> None:
        """Where the counts last started again -> the `due_*` numbers (see the class)."""
        checkpointed, restarted = self._checkpointed_at, self._restarted_at
        self.due_on_thread = min(restarted + WAL_RESTART_PAGES, checkpointed + CHECKPOINT_PAGES)
        if on_loop:
            due = checkpointed + INLINE_CHECKPOINT_PAGES
            if not self.restart_requested:
                due = min(due, restarted + WAL_RESTART_EARLY_PAGES)
            self.due_inline = due

    # -- deciding, after a commit -----------------------------------------------------------

    def due(self, *, on_thread: bool) -> WalWork | None:
        """What is due after a commit on the writer thread (`on_thread`) or on the loop.

        Only on the thread does the writer catch up inside a commit: commits on the loop
        never wait for the lock, and the catch-up is a wait that must not stall the loop.
        A checkpoint is due only if the last one is done (asking is a lock)."""
        since_restart = self.written - self._restarted_at
        if on_thread:
            if since_restart >= WAL_RESTART_PAGES:
                return WalWork.CATCH_UP
        elif since_restart >= WAL_RESTART_EARLY_PAGES and not self.restart_requested:
            return WalWork.EARLY_START_OVER
        if self.written - self._checkpointed_at >= (
            CHECKPOINT_PAGES if on_thread else INLINE_CHECKPOINT_PAGES
        ) and (self._checkpoint is None or self._checkpoint.done()):
            return WalWork.CHECKPOINT
        return None

    def committed_on_loop(self, loop: asyncio.AbstractEventLoop | None) -> None:
        """A commit on `loop` brought `written` to `due_inline`: start what is due."""
        work = self.due(on_thread=False)
        if work is WalWork.EARLY_START_OVER:
            self._start_over_early(loop)
        elif work is WalWork.CHECKPOINT:
            self._start_checkpoint()
        self._plan(on_loop=True)

    def committed_on_thread(self) -> None:
        """A commit on the writer thread brought `written` to `due_on_thread`: do (the
        catch-up) or start (a checkpoint) what is due."""
        work = self.due(on_thread=True)
        if work is WalWork.CATCH_UP:
            self.catch_up()
        elif work is WalWork.CHECKPOINT:
            self._start_checkpoint()
        self._plan(on_loop=False)

    def _start_checkpoint(self) -> concurrent.futures.Future[None]:
        self._checkpointed_at = self.written
        self._checkpoint = self._executor.submit(self._run_checkpoint)
        return self._checkpoint

    # -- starting the WAL over early, off the critical path (on the loop) -------------------

    def _start_over_early(self, loop: asyncio.AbstractEventLoop | None) -> None:
        """Start the WAL over soon (`WAL_RESTART_EARLY_PAGES`): the checkpoint thread copies
        it first (after the background checkpoint already there, if one is), then
        `_restart_copied` has the writer catch up between two commits."""
        if loop is None:
            return
        self.restart_requested = True
        background = self._checkpoint
        if background is None or background.done():
            background = self._start_checkpoint()

        def copied(_future: concurrent.futures.Future[None]) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed: the node stopped
                loop.call_soon_threadsafe(self._restart_copied)

        background.add_done_callback(copied)

    def _restart_copied(self) -> None:
        """The background copy of an early start-over is done: catch up right after the next
        commit, once its callbacks ran (what it stored is on its way, and the catch-up runs
        beside that round trip rather than in front of it). New commits wait for the catch-up,
        so that none lands between its copy and the next commit, which starts the WAL over."""
        if not self.restart_requested:
            return
        if self.since_restart < WAL_RESTART_EARLY_PAGES:  # a commit caught up meanwhile
            self.restart_requested = False
            self._plan(on_loop=True)
            return
        self.catch_up_after_commit = True

    def catch_up_due(self, *, runnable: bool) -> bool:
        """Whether the writer, after the commit that `catch_up_after_commit` waited for, runs
        `catch_up` now, with its commits waiting: not if a commit caught up meanwhile; a
        start-over the writer cannot run (not `runnable`: stopped or broken) is dropped."""
        self.catch_up_after_commit = False
        if runnable and self.since_restart >= WAL_RESTART_EARLY_PAGES:
            return True
        self.restart_requested = False
        self._plan(on_loop=True)
        return False

    def caught_up(self) -> None:
        """The catch-up between two commits is over (on the loop): the early start-over too."""
        self.idle_catch_ups += 1
        self.restart_requested = False
        self._plan(on_loop=True)

    # -- copying -----------------------------------------------------------------------------

    def catch_up(self) -> None:
        """Copy the rest of the WAL on the writer's own connection, on the writer thread
        (`WAL_RESTART_PAGES`), or the last few commits after an early start-over's background
        copy, between two commits (`catch_up_due`).

        It runs at the first commit on the thread once due, whatever the background
        checkpoint is doing: one still queued is cancelled (the catch-up does its work), one
        running is waited for (two checkpoints at once would make this one copy nothing).
        Skipping the catch-up while the background one was busy left the WAL's size to thread
        scheduling: under load it kept growing for as long as that checkpoint took to run."""
        if self._probe is not None:
            self._probe.mark(probes.CATCH_UP[0])
        background = self._checkpoint
        if background is not None and not background.cancel():
            background.exception()  # waits; `_run_checkpoint` logs its own failures
        try:
            complete = self._store.checkpoint()
        except StoreError as exc:  # the commit stands; the next catch-up tries again
            log.warning("[%s] WAL checkpoint failed: %s", self._node, exc)
            complete = False
        if self._probe is not None:
            self._probe.mark(probes.CATCH_UP[1])
        written = self.written
        self._checkpointed_at = written
        if complete:
            self.wal_restarts += 1
            self._restarted_at = written
        else:  # a reader still reads pages the copy would overwrite: retry a checkpoint later
            self._restarted_at = written - (
                min(written - self._restarted_at, WAL_RESTART_PAGES) - CHECKPOINT_PAGES)
        self.restart_at = self._restarted_at + WAL_RESTART_PAGES
        self._plan(on_loop=False)

    def _run_checkpoint(self) -> None:
        if self._probe is not None:
            self._probe.mark(probes.CHECKPOINT[0])
        try:
            self._checkpointer.checkpoint()
            self.checkpoints += 1
        except StoreError as exc:  # the commits stand; the next checkpoint catches up
            log.warning("[%s] WAL checkpoint failed: %s", self._node, exc)
        finally:
            if self._probe is not None:
                self._probe.mark(probes.CHECKPOINT[1])

    def close(self) -> None:
        """Wait for the background checkpoint, if one runs, and close its connection."""
        self._executor.shutdown(wait=True)
        self._checkpointer.close()

    def __repr__(self) -> str:
        return (f"WalKeeper({self._node}, pages={self.pages}, "
                f"since_restart={self.since_restart}, checkpoints={self.checkpoints})")

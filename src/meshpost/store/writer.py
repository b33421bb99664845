"""Group commit: one writer thread, one transaction per batch of operations.

Rule: the event loop never blocks on SQLite. Operations accumulate in a `WriteBatch` while the
previous batch commits in the writer thread; when it finishes, the whole accumulated batch is
committed at once, so fsync cost is shared by every message that arrived meanwhile.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from meshpost.clock import Clock
from meshpost.errors import DataDirNotWritable, StoreError, StoreFull, StoreLocked
from meshpost.protocol import Envelope
from meshpost.store.sqlite import Delivery, IncomingResult, Rejection, Store, WriteBatch

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Operations allowed to wait for the next commit before producers are made to wait.
MAX_PENDING_ROWS = 8_192
#: Retry delays for transient store errors (locked, full, read-only): the batch waits, the
#: node keeps running, nothing is acknowledged until it commits.
RETRY_INITIAL_S = 0.05
RETRY_MAX_S = 2.0
_TRANSIENT = (StoreLocked, StoreFull, DataDirNotWritable)

OutgoingDone = Callable[[int], None]
IncomingDone = Callable[[IncomingResult, int], None]
Done = Callable[[], None]


class GroupCommitWriter:
    """Batches writes for one `Store` and commits them from a dedicated thread."""

    def __init__(self, store: Store, clock: Clock, *, node: str) -> None:
        self.store = store
        self._clock = clock
        self._node = node
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"meshpost-store-{node}"
        )
        self._batch = WriteBatch()
        self._callbacks: list[Callable[[list[IncomingResult], int], None]] = []
        self._rows = 0
        self._wakeup = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._idle = asyncio.Event()
        self._idle.set()
        self.commits = 0
        self.rows_committed = 0
        self.errors = 0
        self.last_error: StoreError | None = None

    # -- producers ------------------------------------------------------------------------

    async def wait_for_room(self) -> None:
        """Wait (back-pressure) until the pending batch has room."""
        await self._room.wait()

    def add_outgoing(self, messages: list[Envelope], done: OutgoingDone) -> None:
        self._batch.outgoing.extend(messages)
        self._callbacks.append(lambda _results, stored_at: done(stored_at))
        self._grow(len(messages))

    def add_incoming(self, messages: list[Envelope], done: IncomingDone) -> None:
        index = len(self._batch.incoming)
        self._batch.incoming.append(messages)
        self._callbacks.append(lambda results, stored_at: done(results[index], stored_at))
        self._grow(len(messages))

    def add_delivery(self, delivery: Delivery, done: Done) -> None:
        self._batch.deliveries.append(delivery)
        self._callbacks.append(lambda _results, _stored_at: done())
        self._grow(len(delivery.seqs))

    def add_rejection(self, rejection: Rejection, done: Done) -> None:
        self._batch.rejections.append(rejection)
        self._callbacks.append(lambda _results, _stored_at: done())
        self._grow(len(rejection.seqs))

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` on the writer thread (it owns the connection)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    async def flush(self) -> None:
        """Wait until everything added so far is committed."""
        while self._batch or not self._idle.is_set():
            self._wakeup.set()
            await asyncio.sleep(0.001)
            await self._idle.wait()

    def _grow(self, rows: int) -> None:
        self._rows += rows
        if self._rows >= MAX_PENDING_ROWS:
            self._room.clear()
        self._wakeup.set()

    # -- the writer loop ------------------------------------------------------------------

    async def run(self) -> None:
        """Commit batches until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            if not self._batch:
                continue
            batch, callbacks = self._batch, self._callbacks
            self._batch, self._callbacks, self._rows = WriteBatch(), [], 0
            self._room.set()
            self._idle.clear()
            try:
                results, stored_at = await self._commit(loop, batch)
            finally:
                self._idle.set()
            for callback in callbacks:
                try:
                    callback(results, stored_at)
                except Exception:
                    log.exception("[%s] store completion callback failed", self._node)

    async def _commit(
        self, loop: asyncio.AbstractEventLoop, batch: WriteBatch
    ) -> tuple[list[IncomingResult], int]:
        delay = RETRY_INITIAL_S
        while True:
            try:
                return await loop.run_in_executor(self._executor, self._apply, batch)
            except _TRANSIENT as exc:
                self.errors += 1
                self.last_error = exc
                log.warning("[%s] store write failed, retrying in %.2fs: %s", self._node, delay,
                            exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
            except StoreError as exc:
                self.errors += 1
                self.last_error = exc
                log.error("[%s] store write failed, retrying in %.2fs: %s", self._node,
                          RETRY_MAX_S, exc)
                await asyncio.sleep(RETRY_MAX_S)

    def _apply(self, batch: WriteBatch) -> tuple[list[IncomingResult], int]:
        # The commit timestamp is taken before the commit: a receipt may only claim a time at
        # which the row was at most being committed, and is sent only after COMMIT returns.
        stored_at = self._clock.wall_ns()
        results = self.store.apply(batch, stored_at)
        self.commits += 1
        self.rows_committed += (
            len(batch.outgoing)
            + sum(len(g) for g in batch.incoming)
            + sum(len(d.seqs) for d in batch.deliveries)
        )
        return results, stored_at

    def close(self) -> None:
        """Close the store on the writer thread, then stop the thread."""
        try:
            self._executor.submit(self.store.close).result(timeout=10)
        finally:
            self._executor.shutdown(wait=True)

    def __repr__(self) -> str:
        return f"GroupCommitWriter({self._node}, commits={self.commits}, pending={self._rows})"

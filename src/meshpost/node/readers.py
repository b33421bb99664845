"""A node's readers: what callers read of the messages the node stored, from the store itself.

Rule: every read here runs on a read-only connection (WAL lets it run beside the writer) in a
thread, never on the writer's: a reader, however slow, holds up no commit and costs no memory,
and a message is committed before it can be read. A commit of incoming messages (`Inbound`)
and the node's close wake the readers that wait (`wakeups`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from meshpost.node.records import Message
from meshpost.store import StoredMessage, StoreReader

if TYPE_CHECKING:
    from meshpost.node.core import Node

#: `messages()` reads at most this many rows per query: a reader's memory stays bounded.
MESSAGES_BATCH = 512
#: `messages()` looks at the store at least this often even when not woken.
MESSAGES_POLL_S = 1.0


class Readers:
    """A node's reads of its own store for its callers: `messages()` (every message from now
    on), `incoming_after` (a cursor's next page, what `meshpost tail` polls) and
    `pending_count`."""

    def __init__(self, node: Node) -> None:
        self._node = node
        #: One event per waiting reader (a `messages()` iterator, a waiting `incoming_after`),
        #: set after each commit of incoming messages and at close. Never rebound: the node
        #: keeps it at hand for `Inbound`, which tests it on every commit.
        self.wakeups: set[asyncio.Event] = set()
        #: The read-only store connection `incoming_after` shares (opened on first use).
        self._incoming_reader: StoreReader | None = None
        self._incoming_lock = asyncio.Lock()

    def messages(self, *, poll_s: float = MESSAGES_POLL_S) -> AsyncIterator[Message]:
        """`Node.messages`: every message stored from now on, read `MESSAGES_BATCH` rows at a
        time on a read-only connection of the iterator's own."""
        self._node._check_open()
        # Where "from now on" starts is read here, not at the first `anext`: a message that
        # arrives between this call and the first read is not missed. One indexed read of a
        # read-only WAL connection, which never waits for the writer.
        reader = StoreReader.for_data_dir(self._node.config.data_dir)
        try:
            cursor = reader.last_incoming_cursor()
        except BaseException:
            reader.close()
            raise
        return self._read_messages(reader, cursor, poll_s)

    async def _read_messages(
        self, reader: StoreReader, cursor: int, poll_s: float
    ) -> AsyncIterator[Message]:
        wakeup = asyncio.Event()
        self.wakeups.add(wakeup)
        try:
            while not self._node._closed:
                wakeup.clear()  # before the read: a commit during it wakes the wait below
                rows = await asyncio.to_thread(reader.incoming_after, cursor, MESSAGES_BATCH)
                if not rows:
                    # Also every `poll_s`, in case a wake-up went astray.
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(poll_s):
                            await wakeup.wait()
                    continue
                for row_cursor, row in rows:
                    cursor = row_cursor
                    yield Message(
                        id=row.id, sender=row.sender, recipient=row.recipient, body=row.body,
                        sent_at_ns=row.sent_at_ns, hlc=row.hlc, stored_at_ns=row.stored_at_ns,
                        kind=row.kind, ref=row.ref,
                    )
        finally:
            self.wakeups.discard(wakeup)
            reader.close()

    async def incoming_after(
        self, cursor: int | None, *, limit: int = MESSAGES_BATCH, wait_s: float = 0.0
    ) -> tuple[int, list[StoredMessage]]:
        """`Node.incoming_after`: a page of received messages after `cursor`, read on the one
        read-only connection the callers share (`meshpost tail` polls it)."""
        self._node._check_open()
        wakeup = asyncio.Event()
        self.wakeups.add(wakeup)
        try:
            async with self._incoming_lock:
                if self._incoming_reader is None:
                    self._incoming_reader = StoreReader.for_data_dir(self._node.config.data_dir)
                reader = self._incoming_reader
                if cursor is None:
                    return await asyncio.to_thread(reader.last_incoming_cursor), []
                rows = await asyncio.to_thread(reader.incoming_after, cursor, limit)
            if rows or wait_s <= 0 or self._node._closed:
                return (rows[-1][0] if rows else cursor), [row for _, row in rows]
            # The wake-up was registered before the read: a commit since then has set it.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait_s):
                    await wakeup.wait()
            if self._node._closed:
                return cursor, []
            async with self._incoming_lock:
                rows = await asyncio.to_thread(reader.incoming_after, cursor, limit)
            return (rows[-1][0] if rows else cursor), [row for _, row in rows]
        finally:
            self.wakeups.discard(wakeup)

    async def pending_count(self) -> int:
        """`Node.pending_count`: outgoing messages still waiting for a receipt, counted on a
        read-only connection of its own."""
        self._node._check_open()

        def count() -> int:
            with StoreReader.for_data_dir(self._node.config.data_dir) as reader:
                return reader.pending_count()

        return await asyncio.to_thread(count)

    async def close(self) -> None:
        """Close the connection `incoming_after` shares (the node's teardown)."""
        if self._incoming_reader is not None:
            async with self._incoming_lock:
                self._incoming_reader.close()
                self._incoming_reader = None

    def __repr__(self) -> str:
        return f"Readers({self._node.name!r}, waiting={len(self.wakeups)})"

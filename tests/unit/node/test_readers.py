"""The node's readers (node/readers.py): what callers read of the messages the node stored,
from the store itself. Every message reaches a slow `messages()` reader; `incoming_after` (what
`meshpost tail` polls) pages by cursor and a waiting poll wakes on a commit; a reader that waits
ends when the node closes, and a closed node refuses reads.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from tests.unit.node.support import PATIENCE_S, node_pair, run, until

from meshpost.errors import NodeClosed
from meshpost.node import Message


def test_messages_yields_every_received_message_to_a_slow_reader(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with node_pair(tmp_path) as (a, b, _net, _clock):
            stream = b.messages()
            first = asyncio.ensure_future(anext(stream))
            await asyncio.sleep(0.05)  # the reader starts before anything arrives
            count = 700  # more than one read of the store (MESSAGES_BATCH)
            sent = await a.post_many("B", [f"m{i}" for i in range(count)])
            assert sent == count
            got: list[Message] = [await asyncio.wait_for(first, PATIENCE_S)]
            while len(got) < count:
                got.append(await asyncio.wait_for(anext(stream), PATIENCE_S))
                if len(got) == 10:
                    await asyncio.sleep(0.1)  # a slow reader loses nothing
            assert [m.body for m in got] == [f"m{i}" for i in range(count)]
            assert {m.sender for m in got} == {"A"}
            await stream.aclose()

    run(scenario)


def test_incoming_after_pages_by_cursor_and_a_waiting_poll_wakes_on_a_commit(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        async with node_pair(tmp_path) as (a, b, _net, _clock):
            await a.post_many("B", ["before"])
            await until(lambda: a.stats.delivered == 1)
            start, rows = await b.incoming_after(None)
            assert rows == []  # the cursor of now: what came before is not shown
            # A poll that waits is woken by the commit of the next message, not by its timeout.
            poll = asyncio.ensure_future(b.incoming_after(start, wait_s=PATIENCE_S * 4))
            await asyncio.sleep(0.05)
            await a.post_many("B", [f"m{i}" for i in range(30)])
            cursor, rows = await asyncio.wait_for(poll, PATIENCE_S)
            got = [r.body for r in rows]
            while len(got) < 30:  # the rest, page by page, none skipped, none twice
                cursor, rows = await b.incoming_after(cursor, limit=7, wait_s=PATIENCE_S)
                assert len(rows) <= 7
                got += [r.body for r in rows]
            assert got == [f"m{i}" for i in range(30)]
            assert {(r.sender, r.direction) for r in rows} == {("A", "in")}
            assert await b.incoming_after(cursor) == (cursor, [])

    run(scenario)


def test_waiting_readers_end_when_the_node_closes_and_a_closed_node_refuses_reads(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        async with node_pair(tmp_path) as (_a, b, _net, _clock):
            stream = b.messages()
            waiting = asyncio.ensure_future(anext(stream))
            start, _ = await b.incoming_after(None)
            poll = asyncio.ensure_future(b.incoming_after(start, wait_s=PATIENCE_S * 4))
            await until(lambda: len(b._readers.wakeups) == 2)  # both wait for a commit
            assert repr(b._readers) == "Readers('B', waiting=2)"
            await asyncio.wait_for(b.close(), PATIENCE_S)
            # Woken by the close, not by the poll's own timeout (four times this wait).
            with pytest.raises(StopAsyncIteration):
                await asyncio.wait_for(waiting, PATIENCE_S)
            assert await asyncio.wait_for(poll, PATIENCE_S) == (start, [])
            assert not b._readers.wakeups
            with pytest.raises(NodeClosed):
                b.messages()
            with pytest.raises(NodeClosed):
                await b.incoming_after(start)
            with pytest.raises(NodeClosed):
                await b.pending_count()

    run(scenario)

"""Pattern headers through a pair of nodes (in-memory transport, real stores): a headed
message is stored once on each side with its header, retransmitted with it, and readers see
its kind and ref; a header the rules refuse never leaves the node."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from tests.unit.test_node import PATIENCE_S, connected, pair, run, until

from meshpost.clock import FakeClock
from meshpost.errors import InvalidMessage
from meshpost.node import Message, wait_receipt
from meshpost.protocol import Batch, decode
from meshpost.protocol.header import Kind, PatternHeader
from meshpost.store import StoreReader
from meshpost.transport import MemoryNetwork

REPLY = PatternHeader(Kind.REPLY, "0000000000000001-request")


def test_a_headed_message_round_trips_and_is_stored_once_on_each_side(tmp_path: Path) -> None:
    async def scenario() -> None:
        net, clock = MemoryNetwork(), FakeClock()
        a, b = pair(tmp_path, net, clock)
        async with a, b:
            await until(lambda: connected(a))
            stream = b.messages()
            first = asyncio.ensure_future(anext(stream))
            await asyncio.sleep(0.05)
            # Lost once, then retransmitted: the copy that arrives still carries its header.
            net.partition("A", "B")
            (handle,) = await a.post("B", "the answer", header=REPLY)
            await until(lambda: a.snapshot_stats().dropped_sends >= 1)
            net.heal("A", "B")
            clock.advance(a.config.retransmit_initial_s * 2)
            a.poll_timers()
            await wait_receipt(handle, PATIENCE_S)
            got: Message = await asyncio.wait_for(first, PATIENCE_S)
            assert (got.id, got.body, got.kind, got.ref) == (handle.id, "the answer", "reply",
                                                              REPLY.ref)
            await stream.aclose()
            sent = [decode(data, max_bytes=1 << 24) for frm, _to, data in net.log if frm == "A"]
            headers = [m.header for f in sent if isinstance(f, Batch) for m in f.messages]
            assert headers and set(headers) == {REPLY}
            await a.flush()
            await b.flush()
        for node, direction in ((a, "out"), (b, "in")):
            with StoreReader.for_data_dir(node.config.data_dir) as reader:
                rows = reader.history()
            assert [(r.id, r.direction, r.kind, r.ref) for r in rows] == [
                (handle.id, direction, "reply", REPLY.ref)]

    run(scenario)


def test_a_header_the_rules_refuse_is_not_posted(tmp_path: Path) -> None:
    async def scenario() -> None:
        net, clock = MemoryNetwork(), FakeClock()
        a, b = pair(tmp_path, net, clock)
        async with a, b:
            with pytest.raises(InvalidMessage, match="ref"):
                await a.post("B", "x", header=PatternHeader(Kind.REPLY))
            with StoreReader.for_data_dir(a.config.data_dir) as reader:
                assert reader.history() == []

    run(scenario)

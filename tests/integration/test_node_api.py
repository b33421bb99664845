"""The public Python API refuses bad input with a clear error and stores nothing for it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from meshpost import Node, NodeConfig, PeerConfig
from meshpost.errors import EmptyMessage, InvalidMessage, MessageTooLarge, UnknownPeer

pytestmark = pytest.mark.integration


def test_bad_bodies_and_unknown_peers_are_refused_and_nothing_is_stored(short_tmp: Path) -> None:
    config = NodeConfig(
        name="A", bind=(f"ipc://{short_tmp}/a.sock",),
        peers=(PeerConfig("B", f"ipc://{short_tmp}/b.sock"),), data_dir=short_tmp / "A",
        max_message_bytes=1000,
    )

    async def scenario() -> int:
        async with Node(config) as node:
            with pytest.raises(UnknownPeer, match="unknown peer 'Z'"):
                await node.post("Z", "hi")
            with pytest.raises(EmptyMessage):
                await node.post("B", "   ")
            with pytest.raises(MessageTooLarge, match="1001 bytes, over the 1000-byte limit"):
                await node.post("B", "é" * 500 + "x")
            with pytest.raises(InvalidMessage, match="lone surrogate"):
                await node.post_many("B", ["fine", "broken \ud800"])
            with pytest.raises(MessageTooLarge):
                await node.post_many("B", ["fine", "x" * 1001])
            await node.flush()
            return await node.pending_count()

    assert asyncio.run(asyncio.wait_for(scenario(), 30)) == 0

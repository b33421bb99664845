"""An endpoint configured for one peer that another node answers: the link says so, and the
message waits for the right configuration instead of being sent to (and rejected by) the
wrong node."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from meshpost import Node, NodeConfig, PeerConfig
from meshpost.verify import verify_stores

pytestmark = pytest.mark.integration


def test_a_peer_endpoint_answered_by_another_node_costs_no_message(short_tmp: Path) -> None:
    """B's configuration gives A's endpoint as C's. Before, C's Welcome made B's link to A
    ready and C rejected B's message to A (not for C): a misconfiguration cost the message
    for good. Now the link is refused, naming C, and the message stays pending; B restarted
    with A's real endpoint delivers it once, stored once on each side."""
    endpoints = {n: f"ipc://{short_tmp}/{n.lower()}.sock" for n in "ABC"}

    def config(name: str, peers: dict[str, str]) -> NodeConfig:
        return NodeConfig(name=name, bind=(endpoints[name],),
                          peers=tuple(PeerConfig(p, e) for p, e in peers.items()),
                          data_dir=short_tmp / name)

    wrong_b = config("B", {"A": endpoints["C"], "C": endpoints["C"]})
    right_b = config("B", {"A": endpoints["A"], "C": endpoints["C"]})

    async def refused_link(b: Node) -> str:
        for _ in range(200):
            [a] = [p for p in b.peers() if p.name == "A"]
            if a.refusal is not None:
                assert not a.connected
                return a.refusal
            await asyncio.sleep(0.05)
        raise AssertionError(f"B's link to A never refused: {b.peers()}")

    async def scenario() -> None:
        async with (Node(config("A", {"B": endpoints["B"]})) as a,
                    Node(config("C", {"B": endpoints["B"]})) as c):
            async with Node(wrong_b) as b:
                await b.post("A", "for A")
                refusal = await refused_link(b)
                assert "'C'" in refusal and "'A'" in refusal, refusal
                assert b.stats.rejected == 0
                assert await b.pending_count() == 1
                assert c.stats.received == 0
            async with Node(right_b) as b:
                assert await b.wait_delivered(1, 20)
            await a.flush()
            assert a.stats.received == 1

    asyncio.run(asyncio.wait_for(scenario(), 60))
    report = verify_stores({n: short_tmp / n for n in "ABC"})
    assert report.ok, report.summary()
    assert report.delivered == 1

"""`Node.probe_peers` on an in-memory network: an idle link to a live peer dials and reports it
live with a round trip; one to a peer that is gone reports it lost once the wait ends, where
the peers table alone would still say idle."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from tests.unit.node.support import config, frame_kinds, run, until

from meshpost.clock import FakeClock
from meshpost.errors import UnknownPeer
from meshpost.node import Node
from meshpost.transport import MemoryNetwork

IDLE_S = 30.0


def lazy_node(tmp_path: Path, net: MemoryNetwork, clock: FakeClock) -> Node:
    """A: dials nobody at start, idles after IDLE_S."""
    a_config = dataclasses.replace(config("A", "B", tmp_path), dial_at_start=0,
                                   link_idle_s=IDLE_S)
    return Node(a_config, clock=clock, transport=net.transport("A"))


def state_of(node: Node, peer: str) -> str:
    return next(p.state for p in node.peers() if p.name == peer)


def test_a_probe_opens_an_idle_link_and_reports_a_live_peer_with_its_round_trip(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        net, clock = MemoryNetwork(), FakeClock()
        a = lazy_node(tmp_path, net, clock)
        b = Node(config("B", "A", tmp_path), clock=clock, transport=net.transport("B"))
        async with a, b:
            assert state_of(a, "B") == "idle"
            [probe] = await a.probe_peers(wait_s=5.0)
            assert (probe.name, probe.result, probe.state) == ("B", "live", "ready")
            assert probe.rtt_ns is not None  # the handshake's (0 on a fake clock)
            assert probe.detail is None

    run(scenario)


def test_a_peer_gone_while_its_link_was_idle_is_reported_lost_not_idle(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        net, clock = MemoryNetwork(), FakeClock()
        a = lazy_node(tmp_path, net, clock)
        async with a:  # B never started: nothing answers at its endpoint
            assert state_of(a, "B") == "idle"
            [probe] = await a.probe_peers("B", wait_s=0.2)
            assert (probe.name, probe.result, probe.rtt_ns) == ("B", "lost", None)
            assert probe.state == "connecting"
            assert probe.detail == "no answer within 0.2s"

    run(scenario)


def test_probing_a_name_that_is_no_peer_is_refused(tmp_path: Path) -> None:
    async def scenario() -> None:
        net, clock = MemoryNetwork(), FakeClock()
        async with lazy_node(tmp_path, net, clock) as a:
            with pytest.raises(UnknownPeer):
                await a.probe_peers("Z", wait_s=0.1)

    run(scenario)


def test_a_ready_link_is_pinged_and_answers_however_recently_it_was_heard(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        net, clock = MemoryNetwork(), FakeClock()
        a = lazy_node(tmp_path, net, clock)
        b = Node(config("B", "A", tmp_path), clock=clock, transport=net.transport("B"))
        async with a, b:
            a.connect()
            await until(lambda: state_of(a, "B") == "ready")
            pings = frame_kinds(net, "A").count("Ping")
            [probe] = await a.probe_peers(wait_s=5.0)
            assert probe.result == "live"
            assert frame_kinds(net, "A").count("Ping") == pings + 1

    run(scenario)

"""The node's checks of keyless name claims (node/claims.py): every Welcome its own link takes
is who that peer is for its listener, a refused claim is asked of the peer's configured
endpoint over that link, and the answer (or its absence) goes back to the listener, whose late
Welcome reaches the connection it is for (docs/protocol.md 6.2.1)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from tests.unit.node.support import Pair, connected, node_pair, run, until

import meshpost.node.claims as claims
from meshpost.protocol import (
    PROTOCOL_VERSION,
    Frame,
    Hello,
    Ping,
    Pong,
    Refuse,
    RefuseCode,
    Welcome,
    decode,
    encode,
)
from meshpost.protocol.claims import CLAIM_CHECK_INTERVAL_NS
from meshpost.protocol.listener import LIVE_SESSION_NS

STRANGER_NODE_ID = "0123456789abcdef"


def say_hello(pair: Pair, connection: bytes, node_id: str) -> None:
    """A Hello as A from `node_id` reaches B's ROUTER on `connection` (a name and a node id
    anyone can say)."""
    hello = Hello(PROTOCOL_VERSION, node_id, "A", pair.clock.wall_ns(), 1)
    pair.b._inbound.on_frame(connection, encode(hello), None)


def answers_to(pair: Pair, connection: bytes) -> list[Frame]:
    """What B sent back on `connection`, in order."""
    return [decode(data, max_bytes=1 << 20) for frm, to, data in pair.net.log
            if frm == "B" and to == connection.decode()]


def frames(pair: Pair, frm: str, to: str, kind: type[Frame]) -> int:
    """How many frames of `kind` `frm` sent to `to` so far."""
    return sum(1 for f, t, data in pair.net.log
               if f == frm and t == to and isinstance(decode(data, max_bytes=1 << 20), kind))


def check_done(pair: Pair) -> bool:
    return not pair.b._events.claims._checking


def test_a_claim_is_asked_of_the_peers_endpoint_over_the_nodes_own_link(tmp_path: Path) -> None:
    """B's own link was welcomed by A at start: a Hello as A from another node id is refused,
    and (that answer being older than the interval) B asks A again over its link, once."""

    async def scenario() -> None:
        async with node_pair(tmp_path) as pair:
            await until(lambda: connected(pair.b))
            # B's first Ping answered: a check started while it is out takes its Pong rather
            # than send another (a fresh-clone run under load counted no new Ping: 1 > 1).
            await until(lambda: frames(pair, "A", "B", Pong) >= frames(pair, "B", "A", Ping))
            pair.clock.advance(CLAIM_CHECK_INTERVAL_NS / 1e9)
            pings_before = sum(1 for frm, to, data in pair.net.log if frm == "B" and to == "A"
                               and isinstance(decode(data, max_bytes=1 << 20), Ping))
            say_hello(pair, b"X", STRANGER_NODE_ID)
            [refused] = answers_to(pair, b"X")
            assert isinstance(refused, Refuse)
            assert refused.code == RefuseCode.IDENTITY
            assert "its configured endpoint answered so" in refused.detail
            assert pair.b.stats.name_checks == 1
            await until(lambda: check_done(pair))
            pings = sum(1 for frm, to, data in pair.net.log if frm == "B" and to == "A"
                        and isinstance(decode(data, max_bytes=1 << 20), Ping))
            assert pings > pings_before  # the check's Ping, on B's own link to A
            say_hello(pair, b"X", STRANGER_NODE_ID)  # A answered: still refused, not asked
            assert [type(f) for f in answers_to(pair, b"X")] == [Refuse, Refuse]
            assert pair.b.stats.name_checks == 1

    run(scenario)


def test_an_endpoint_that_does_not_answer_leaves_the_name_first_come_first_served(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(claims, "CLAIM_CHECK_TIMEOUT_S", 0.05)

    async def scenario() -> None:
        async with node_pair(tmp_path) as pair:
            await until(lambda: connected(pair.b))
            pair.net.partition("A", "B")
            pair.clock.advance(LIVE_SESSION_NS / 1e9 + 1)  # A's session at B: not live now
            say_hello(pair, b"X", STRANGER_NODE_ID)
            [refused] = answers_to(pair, b"X")
            assert isinstance(refused, Refuse)
            await until(lambda: check_done(pair))
            assert "could not check who A is" in caplog.text
            say_hello(pair, b"X", STRANGER_NODE_ID)
            assert [type(f) for f in answers_to(pair, b"X")] == [Refuse, Welcome]

    with caplog.at_level(logging.WARNING):
        run(scenario)


def test_the_claimant_the_endpoint_answers_as_is_welcomed_late_on_its_own_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A stranger holds A's name at B (B could not reach A's endpoint); a connection says
    Hello as A with A's node id: refused, B asks A's endpoint, now reachable, and A answers:
    B ends the stranger's session and welcomes that connection (no second Hello)."""
    monkeypatch.setattr(claims, "CLAIM_CHECK_TIMEOUT_S", 0.05)

    async def scenario() -> None:
        async with node_pair(tmp_path) as pair:
            await until(lambda: connected(pair.b))
            pair.net.partition("A", "B")
            pair.clock.advance(LIVE_SESSION_NS / 1e9 + 1)
            say_hello(pair, b"X", STRANGER_NODE_ID)
            await until(lambda: check_done(pair))
            say_hello(pair, b"X", STRANGER_NODE_ID)  # no answer: first come, first served
            assert [type(f) for f in answers_to(pair, b"X")] == [Refuse, Welcome]
            monkeypatch.setattr(claims, "CLAIM_CHECK_TIMEOUT_S", 5.0)
            pair.net.heal("A", "B")
            pair.clock.advance(CLAIM_CHECK_INTERVAL_NS / 1e9)
            say_hello(pair, b"Y", pair.a.node_id)
            [refused] = answers_to(pair, b"Y")
            assert isinstance(refused, Refuse)
            assert refused.code == RefuseCode.IDENTITY
            await until(lambda: len(answers_to(pair, b"Y")) == 2)
            assert isinstance(answers_to(pair, b"Y")[1], Welcome)
            assert pair.b._listener is not None
            assert pair.b._listener.session_peer(b"X".hex()) is None
            assert pair.b._listener.session_peer(b"Y".hex()) == "A"

    run(scenario)

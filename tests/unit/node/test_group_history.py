"""Group history on request (docs/protocol.md 19.6): a member that joined later asks each
member for its own messages to the group; each answers for itself only."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from tests.unit.node.support import PATIENCE_S, connected, run, until

from meshpost.clock import FakeClock
from meshpost.config import NodeConfig, PeerConfig
from meshpost.node import Message, Node
from meshpost.protocol.history import (
    HISTORY_REQUESTS_BURST,
    HISTORY_REQUESTS_PER_S,
    HistoryQuery,
    HistoryRefused,
    decode_reply,
    encode_query,
    history_header,
)
from meshpost.store import StoreReader
from meshpost.transport import MemoryNetwork

NAMES = ("A", "B", "C")


def trio_config(name: str, tmp_path: Path) -> NodeConfig:
    return NodeConfig(
        name=name, bind=(f"ipc://{tmp_path}/{name}.sock",),
        peers=tuple(PeerConfig(o, f"ipc://{tmp_path}/{o}.sock") for o in NAMES if o != name),
        data_dir=tmp_path / name, sync="normal", groups={"team": ("A", "B")},
    )


@contextlib.asynccontextmanager
async def trio(tmp_path: Path) -> AsyncIterator[tuple[Node, Node, Node]]:
    """A, B and C, all peers; `team` is A and B (configured on every node)."""
    net, clock = MemoryNetwork(), FakeClock()
    nodes = [Node(trio_config(n, tmp_path), clock=clock, transport=net.transport(n))
             for n in NAMES]
    async with contextlib.AsyncExitStack() as stack:
        for node in nodes:
            await stack.enter_async_context(node)
        await until(lambda: all(connected(n) for n in nodes))
        a, b, c = nodes
        yield a, b, c


def group_rows(node: Node, group: str) -> list[tuple[str, str]]:
    with StoreReader.for_data_dir(node.config.data_dir) as reader:
        return [(r.sender, r.body) for r in reader.history(group=group)]


def test_a_member_that_joined_later_fetches_each_members_own_messages(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with trio(tmp_path) as (a, b, c):
            await (await a.broadcast("team", "a1")).changed(PATIENCE_S)
            await (await b.broadcast("team", "b1")).changed(PATIENCE_S)
            await (await b.broadcast("team", "b2")).changed(PATIENCE_S)
            await (await a.broadcast("team", "a2")).changed(PATIENCE_S)
            await until(lambda: len(group_rows(a, "team")) == 4
                        and len(group_rows(b, "team")) == 4)

            # Not a member yet: each member answers, with nothing (no leak to non-members).
            before = await c.fetch_group_history("team", timeout_s=PATIENCE_S)
            assert (before.messages, sorted(before.answered), before.unanswered) == (
                (), ["A", "B"], {})

            assert await c.join("team")
            await until(lambda: "C" in a.members("team") and "C" in b.members("team"))
            fetched = await c.fetch_group_history("team", timeout_s=PATIENCE_S)
            assert sorted(fetched.answered) == ["A", "B"]
            assert fetched.unanswered == {}
            # Merged by HLC (the order they were sent in), each labelled with its sender.
            assert [(m.sender, m.body) for m in fetched.messages] == [
                ("A", "a1"), ("B", "b1"), ("B", "b2"), ("A", "a2")]
            assert all(m.group == "team" for m in fetched.messages)

            # Bounded: the newest N of each member.
            newest = await c.fetch_group_history("team", limit=1, timeout_s=PATIENCE_S)
            assert [(m.sender, m.body) for m in newest.messages] == [("B", "b2"), ("A", "a2")]
            # Older than a stamp.
            b2 = next(m for m in fetched.messages if m.body == "b2")
            older = await c.fetch_group_history("team", before_hlc=b2.hlc, timeout_s=PATIENCE_S)
            assert [(m.sender, m.body) for m in older.messages] == [("A", "a1"), ("B", "b1")]
            await c.flush()

        # C stored no group message as received: the fetched ones are in the reply rows,
        # and each member's reply holds its own messages only.
        assert group_rows(c, "team") == []
        with StoreReader.for_data_dir(c.config.data_dir) as reader:
            replies = [r for r in reader.history(direction="in") if r.kind == "reply"]
        assert {r.sender for r in replies} == {"A", "B"}
        for reply in replies:
            items = decode_reply(reply.body)
            assert all(i.body.startswith(reply.sender.lower()) for i in items)
        assert any(len(decode_reply(r.body)) == 2 for r in replies)

    run(scenario)


def test_a_member_that_is_down_is_reported_unanswered(tmp_path: Path) -> None:
    async def scenario() -> None:
        net, clock = MemoryNetwork(), FakeClock()
        configs = {n: dataclasses.replace(trio_config(n, tmp_path),
                                          groups={"team": ("A", "B", "C")}) for n in NAMES}
        a = Node(configs["A"], clock=clock, transport=net.transport("A"))
        c = Node(configs["C"], clock=clock, transport=net.transport("C"))
        async with a, c:
            await until(lambda: any(p.connected and p.name == "A" for p in c.peers()))
            await (await a.broadcast("team", "a1")).changed(PATIENCE_S)
            fetched = await c.fetch_group_history("team", timeout_s=0.5)
            assert fetched.answered == ("A",)
            assert [(m.sender, m.body) for m in fetched.messages] == [("A", "a1")]
            assert fetched.unanswered == {"B": "not-delivered"}

    run(scenario)


def test_history_requests_are_not_given_to_the_request_handler(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with trio(tmp_path) as (a, _b, c):
            seen: list[str] = []

            def handler(msg: Message) -> str:
                seen.append(msg.body)
                return "handler"

            a.on_request(handler)
            assert await c.join("team")
            await until(lambda: "C" in a.members("team"))
            fetched = await c.fetch_group_history("team", timeout_s=PATIENCE_S)
            assert "A" in fetched.answered
            assert seen == []
            reply = await c.request("A", "ping", timeout_s=PATIENCE_S)
            assert reply.body == "handler"

    run(scenario)


def test_a_history_request_stored_before_a_restart_is_answered_after_it(
        tmp_path: Path) -> None:
    """The member stored the request but went down before answering: back up, it answers
    (from the store, without any request handler), and the asker's request is linked."""
    async def scenario() -> None:
        net, clock = MemoryNetwork(), FakeClock()
        configs = {n: dataclasses.replace(trio_config(n, tmp_path),
                                          groups={"team": ("A", "C")}) for n in NAMES}
        a = Node(configs["A"], clock=clock, transport=net.transport("A"))
        async with a:
            # Stored at A once broadcast() returns; no receipt can come (C is down), so
            # waiting for the handle to change would only wait out PATIENCE_S.
            handle = await a.broadcast("team", "a1")
            assert handle.status.pending == ("C",)
            await a.flush()
        c = Node(configs["C"], clock=clock, transport=net.transport("C"))
        async with c:
            # A is down: the request waits in C's outbox.
            first = await c.fetch_group_history("team", timeout_s=0.2)
            assert first.unanswered == {"A": "not-delivered"}
            # A comes back and stores it, but goes down again before answering.
            a = Node(configs["A"], clock=clock, transport=net.transport("A"))
            a._requests._answer_history = _never  # type: ignore[method-assign,assignment]
            async with a:
                async with asyncio.timeout(PATIENCE_S):
                    while await c.pending_count():
                        clock.advance(0.5)  # C redials on its (fake) clock
                        await asyncio.sleep(0.01)
            assert replies_from(c, "A") == 0
            a = Node(configs["A"], clock=clock, transport=net.transport("A"))
            async with a:
                async with asyncio.timeout(PATIENCE_S):
                    while replies_from(c, "A") != 1:
                        clock.advance(0.5)
                        await asyncio.sleep(0.01)
            await c.flush()
        with StoreReader.for_data_dir(c.config.data_dir) as reader:
            [reply] = [r for r in reader.history(direction="in") if r.kind == "reply"]
        assert [i.body for i in decode_reply(reply.body)] == ["a1"]

    run(scenario)


async def _never(*_args: object) -> None:
    return None


def replies_from(node: Node, peer: str) -> int:
    with StoreReader.for_data_dir(node.config.data_dir) as reader:
        return sum(1 for r in reader.history(direction="in")
                   if r.kind == "reply" and r.sender == peer)


def test_a_peer_flooding_history_requests_is_refused_and_costs_no_other_peer(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """19.6.1: each history request costs a store query and a reply of up to the maximum
    message size. Past its burst, a peer's requests get a small refusal (counted, logged
    once per burst); each request is still stored and receipted once; another peer's
    request is answered as before; the flooder is answered again once it slows down."""
    caplog.set_level(logging.WARNING, logger="meshpost.node.requests")
    flood = HISTORY_REQUESTS_BURST + 5

    async def scenario() -> None:
        net, clock = MemoryNetwork(), FakeClock()
        configs = {n: dataclasses.replace(trio_config(n, tmp_path),
                                          groups={"team": ("A", "B", "C")}) for n in NAMES}
        nodes = [Node(configs[n], clock=clock, transport=net.transport(n)) for n in NAMES]
        async with contextlib.AsyncExitStack() as stack:
            for node in nodes:
                await stack.enter_async_context(node)
            await until(lambda: all(connected(n) for n in nodes))
            a, b, c = nodes
            await (await a.broadcast("team", "a1")).changed(PATIENCE_S)
            query = encode_query(HistoryQuery(limit=5))
            replies = await asyncio.gather(*(
                c._requests.request("A", query, timeout_s=PATIENCE_S,
                                    header=history_header("team")) for _ in range(flood)))
            answered, refused = [], []
            for reply in replies:
                try:
                    answered.append([i.body for i in decode_reply(reply.body)])
                except HistoryRefused as exc:
                    refused.append(exc.refusal)
            assert answered == [["a1"]] * HISTORY_REQUESTS_BURST
            assert len(refused) == 5 and all(r.refused == "rate-limited" for r in refused)
            assert all(0 < r.retry_after_ms <= 1000 / HISTORY_REQUESTS_PER_S for r in refused)
            assert a.stats.history_requests_refused == 5
            bursts = [r for r in caplog.records if "asks for group history faster" in r.message]
            assert len(bursts) == 1 and "C" in bursts[0].message
            # Another member's fetch is answered by A as if nothing happened; C's is refused.
            fetched = await b.fetch_group_history("team", timeout_s=PATIENCE_S)
            assert sorted(fetched.answered) == ["A", "C"]
            assert [m.body for m in fetched.messages] == ["a1"]
            still = await c.fetch_group_history("team", timeout_s=PATIENCE_S)
            assert still.answered == ("B",)
            assert still.unanswered["A"].startswith("refused: rate-limited, ask again in")
            # Slowed down: one request every 1 / rate seconds is answered.
            clock.advance(1 / HISTORY_REQUESTS_PER_S)
            again = await c.fetch_group_history("team", timeout_s=PATIENCE_S)
            assert sorted(again.answered) == ["A", "B"] and again.unanswered == {}
            for node in nodes:
                await node.flush()
        # Every request stored once on both ends, each with one reply (refusal or not).
        with StoreReader.for_data_dir(configs["A"].data_dir) as reader:
            rows = reader.history()
        requests = [r for r in rows if r.kind == "request" and r.sender == "C"]
        assert len(requests) == len({r.id for r in requests}) == flood + 2
        assert sorted(r.ref for r in rows if r.kind == "reply" and r.recipient == "C") == \
            sorted(r.id for r in requests)
        with StoreReader.for_data_dir(configs["C"].data_dir) as reader:
            sent = [r for r in reader.history(direction="out") if r.kind == "request"
                    and r.recipient == "A"]
        assert len(sent) == flood + 2 and all(r.state == "delivered" for r in sent)
        # C's refused fetch was the same burst: counted, not logged again.
        assert a.stats.history_requests_refused == 6
        assert len([r for r in caplog.records
                    if "asks for group history faster" in r.message]) == 1

    run(scenario)

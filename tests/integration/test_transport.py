"""ZmqTransport on loopback: frames reach the handlers from the loop's reader callbacks, in
order, across drain budgets, and back-pressure holds them until resumed."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from meshpost.transport import ZmqTransport
from meshpost.transport import zmq_transport as transport_module

pytestmark = pytest.mark.integration
PATIENCE_S = 10.0


async def until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(PATIENCE_S):
        while not condition():
            await asyncio.sleep(0.005)


def test_frames_arrive_in_order_and_replies_come_back() -> None:
    async def scenario() -> None:
        server = ZmqTransport(name="B", max_frame_bytes=1 << 16)
        client = ZmqTransport(name="A", max_frame_bytes=1 << 16)
        inbound: list[tuple[bytes, bytes]] = []
        replies: list[tuple[str, bytes]] = []
        drained: list[int] = []

        def on_inbound(identity: bytes, data: bytes, user_id: str | None) -> None:
            assert user_id is None  # not secure
            inbound.append((identity, data))
            server.reply(identity, b"re:" + data)

        try:
            (endpoint,) = server.bind(["tcp://127.0.0.1:*"])
            server.start(on_inbound, lambda _p, _d: None, lambda: drained.append(1))
            client.add_peer("B", endpoint)
            client.start(lambda _i, _d, _u: None, lambda peer, data: replies.append((peer, data)))
            count = 3 * transport_module.DRAIN_BUDGET + 5  # more than one drain's budget
            sent = 0
            while sent < count:  # the connection may take a moment: retry refused sends
                if client.send_to_peer("B", b"%d" % sent):
                    sent += 1
                else:
                    await asyncio.sleep(0.01)
            await until(lambda: len(replies) == count)
            assert [data for _id, data in inbound] == [b"%d" % i for i in range(count)]
            assert {identity for identity, _d in inbound} == {b"A"}
            assert replies == [("B", b"re:%d" % i) for i in range(count)]
            assert drained  # the drained hook ran after handling frames
        finally:
            client.close()
            server.close()

    asyncio.run(scenario())


def test_paused_inbound_holds_frames_until_resumed() -> None:
    async def scenario() -> None:
        server = ZmqTransport(name="B", max_frame_bytes=1 << 16)
        client = ZmqTransport(name="A", max_frame_bytes=1 << 16)
        inbound: list[bytes] = []
        try:
            (endpoint,) = server.bind(["tcp://127.0.0.1:*"])
            server.start(lambda _i, data, _u: inbound.append(data), lambda _p, _d: None)
            client.add_peer("B", endpoint)
            client.start(lambda _i, _d, _u: None, lambda _p, _d: None)
            while not client.send_to_peer("B", b"first"):
                await asyncio.sleep(0.01)
            await until(lambda: inbound == [b"first"])
            server.pause_inbound()
            for i in range(10):
                assert client.send_to_peer("B", b"%d" % i)
            await asyncio.sleep(0.3)  # time enough to arrive: they must not be handled
            assert inbound == [b"first"]
            server.resume_inbound()
            await until(lambda: len(inbound) == 11)
            assert inbound[1:] == [b"%d" % i for i in range(10)]
        finally:
            client.close()
            server.close()

    asyncio.run(scenario())


def test_a_send_to_a_missing_peer_is_refused_not_raised() -> None:
    async def scenario() -> None:
        server = ZmqTransport(name="B", max_frame_bytes=1 << 16)
        try:
            server.bind(["tcp://127.0.0.1:*"])
            server.start(lambda _i, _d, _u: None, lambda _p, _d: None)
            assert server.reply(b"nobody", b"x") is False  # ROUTER_MANDATORY: unreachable
            assert server.dropped_sends == 1
        finally:
            server.close()

    asyncio.run(scenario())

"""ZmqTransport on loopback: frames reach the handlers from the loop's reader callbacks, in
order, across drain budgets, and back-pressure holds them until resumed."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator

import pytest

from meshpost.transport import ZmqTransport
from meshpost.transport import zmq_transport as transport_module
from meshpost.transport.zmq_transport import InboundHandler, PeerFrameHandler

pytestmark = pytest.mark.integration
PATIENCE_S = 10.0


@contextlib.contextmanager
def linked(
    on_inbound: InboundHandler, on_reply: PeerFrameHandler,
    on_drained: Callable[[], None] | None = None, max_frame_bytes: int = 1 << 16,
) -> Iterator[tuple[ZmqTransport, ZmqTransport]]:
    """(server B, client A), started, A's DEALER connected to B's ROUTER; closed afterwards."""
    server = ZmqTransport(name="B", max_frame_bytes=max_frame_bytes)
    client = ZmqTransport(name="A", max_frame_bytes=max_frame_bytes)
    try:
        (endpoint,) = server.bind(["tcp://127.0.0.1:*"])
        server.start(on_inbound, lambda _p, _d: None, on_drained)
        client.add_peer("B", endpoint)
        client.start(lambda _i, _d, _u: None, on_reply)
        yield server, client
    finally:
        client.close()
        server.close()


async def send_when_connected(client: ZmqTransport, payload: bytes) -> None:
    while not client.send_to_peer("B", payload):  # the connection may take a moment
        await asyncio.sleep(0.01)


async def until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(PATIENCE_S):
        while not condition():
            await asyncio.sleep(0.005)


def test_frames_arrive_in_order_and_replies_come_back() -> None:
    async def scenario() -> None:
        inbound: list[tuple[bytes, bytes]] = []
        replies: list[tuple[str, bytes]] = []
        drained: list[int] = []
        servers: list[ZmqTransport] = []

        def on_inbound(identity: bytes, data: bytes, user_id: str | None) -> None:
            assert user_id is None  # not secure
            inbound.append((identity, data))
            servers[0].reply(identity, b"re:" + data)

        with linked(on_inbound, lambda peer, data: replies.append((peer, data)),
                    lambda: drained.append(1)) as (server, client):
            servers.append(server)
            count = 3 * transport_module.DRAIN_BUDGET + 5  # more than one drain's budget
            for i in range(count):
                await send_when_connected(client, b"%d" % i)
            await until(lambda: len(replies) == count)
            assert [data for _id, data in inbound] == [b"%d" % i for i in range(count)]
            # One connection, one routing id, and one our ROUTER chose (not the peer's name).
            assert len({identity for identity, _d in inbound}) == 1
            assert inbound[0][0] != b"A"
            assert replies == [("B", b"re:%d" % i) for i in range(count)]
            assert drained  # the drained hook ran after handling frames

    asyncio.run(scenario())


def test_paused_inbound_holds_frames_until_resumed() -> None:
    async def scenario() -> None:
        inbound: list[bytes] = []
        with linked(lambda _i, data, _u: inbound.append(data),
                    lambda _p, _d: None) as (server, client):
            await send_when_connected(client, b"first")
            await until(lambda: inbound == [b"first"])
            server.pause_inbound()
            for i in range(10):
                assert client.send_to_peer("B", b"%d" % i)
            await asyncio.sleep(0.3)  # time enough to arrive: they must not be handled
            assert inbound == [b"first"]
            server.resume_inbound()
            await until(lambda: len(inbound) == 11)
            assert inbound[1:] == [b"%d" % i for i in range(10)]

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


def test_a_handler_that_raises_does_not_stop_the_socket(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> list[bytes]:
        handled: list[bytes] = []

        def on_inbound(_identity: bytes, data: bytes, _user: str | None) -> None:
            handled.append(data)
            if data == b"boom":
                raise RuntimeError("handler bug")

        with linked(on_inbound, lambda _p, _d: None) as (_server, client):
            await send_when_connected(client, b"boom")
            for payload in (b"after-1", b"after-2"):
                assert client.send_to_peer("B", payload)
            await until(lambda: len(handled) == 3)
        return handled

    assert asyncio.run(scenario()) == [b"boom", b"after-1", b"after-2"]
    assert "handling a frame failed" in caplog.text


def test_a_multipart_message_is_dropped_whole_and_the_next_one_arrives(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> list[bytes]:
        import zmq

        inbound: list[bytes] = []
        with linked(lambda _i, data, _u: inbound.append(data),
                    lambda _p, _d: None) as (server, _client):
            ctx = zmq.Context()
            raw = ctx.socket(zmq.DEALER)
            try:
                raw.setsockopt(zmq.IDENTITY, b"raw")
                raw.connect(server.bound[0])
                raw.send_multipart([b"part-1", b"part-2", b"part-3"])
                raw.send_multipart([b"part-a", b"part-b"])
                raw.send(b"whole")
                await until(lambda: b"whole" in inbound)
            finally:
                raw.close(0)
                ctx.term()
        return inbound

    assert asyncio.run(scenario()) == [b"whole"]
    assert "dropped a 4-part message" in caplog.text  # identity + three parts
    assert "dropped a 3-part message" in caplog.text


def test_large_payloads_go_both_ways_intact() -> None:
    big = bytes(range(256)) * (transport_module._ZERO_COPY_BYTES // 256 + 3)  # zero-copy path

    async def scenario() -> tuple[list[bytes], list[bytes]]:
        inbound: list[bytes] = []
        replies: list[bytes] = []
        servers: list[ZmqTransport] = []

        def on_inbound(identity: bytes, data: bytes, _user: str | None) -> None:
            inbound.append(data)
            assert servers[0].reply(identity, data[::-1])

        with linked(on_inbound, lambda _p, data: replies.append(data),
                    max_frame_bytes=2 * len(big)) as (server, client):
            servers.append(server)
            await send_when_connected(client, big)
            await until(lambda: len(replies) == 1)
        return inbound, replies

    inbound, replies = asyncio.run(scenario())
    assert inbound == [big] and replies == [big[::-1]]


def test_redial_replaces_the_connection_and_replies_follow_it() -> None:
    """A silent link is redialled on a new DEALER: a new connection (a new routing id at the
    server), and the server's replies reach the client on it."""

    async def scenario() -> None:
        inbound: list[tuple[bytes, bytes]] = []
        replies: list[bytes] = []
        servers: list[ZmqTransport] = []

        def on_inbound(identity: bytes, data: bytes, _user: str | None) -> None:
            inbound.append((identity, data))
            servers[0].reply(identity, b"re:" + data)

        with linked(on_inbound, lambda _peer, data: replies.append(data)) as (server, client):
            servers.append(server)
            await send_when_connected(client, b"old")
            await until(lambda: replies == [b"re:old"])
            client.redial("B")
            assert client.redials == 1
            await send_when_connected(client, b"new")
            await until(lambda: replies == [b"re:old", b"re:new"])
            assert inbound[0][0] != inbound[-1][0]  # another connection

    asyncio.run(scenario())


def test_the_descriptor_limit_is_raised_and_handshakes_are_short() -> None:
    """Issue 16, item 5 (part): a flood of idle connections needs the hard limit's worth of
    descriptors, and each is dropped after 5 s instead of libzmq's 30."""
    import resource

    import zmq

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(64, hard // 2), hard))
    try:
        transport = ZmqTransport(name="B", max_frame_bytes=1 << 16)
        try:
            now_soft, now_hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            assert now_soft == transport.fd_limit
            assert now_soft == now_hard or now_hard == resource.RLIM_INFINITY
            assert transport._router.getsockopt(zmq.HANDSHAKE_IVL) == 5_000
        finally:
            transport.close()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_connections_beyond_the_cap_are_shut_down_and_established_ones_keep_working() -> None:
    """Issue 16, item 5: idle connections over `max_inbound_connections` are closed at once
    (counted), while a peer connected under the cap keeps exchanging frames."""
    import socket

    from meshpost.transport.inbound import default_inbound_cap

    async def scenario() -> None:
        inbound: list[bytes] = []
        server = ZmqTransport(name="B", max_frame_bytes=1 << 16, max_inbound_connections=2)
        client = ZmqTransport(name="A", max_frame_bytes=1 << 16)
        raw: list[socket.socket] = []
        try:
            assert server.inbound_cap == 2
            (endpoint,) = server.bind(["tcp://127.0.0.1:*"])
            server.start(lambda identity, data, _u: (inbound.append(data),
                                                     server.reply(identity, data)),
                         lambda _p, _d: None)
            replies: list[bytes] = []
            client.add_peer("B", endpoint)
            client.start(lambda _i, _d, _u: None, lambda _p, data: replies.append(data))
            await send_when_connected(client, b"before")
            await until(lambda: replies == [b"before"])
            port = int(endpoint.rsplit(":", 1)[1])
            for _ in range(5):
                raw.append(await asyncio.to_thread(socket.create_connection,
                                                   ("127.0.0.1", port), 5))

            for s in raw:
                s.setblocking(False)

            def closed_by_server() -> int:
                closed = 0
                for s in raw:
                    try:
                        while s.recv(4096):  # ZeroMQ's greeting may come first
                            pass
                    except BlockingIOError:
                        continue
                    except ConnectionResetError:
                        pass
                    closed += 1
                return closed

            # One raw connection fits under the cap beside A's; the other four are refused.
            await until(lambda: server.inbound_refused == 4)
            await until(lambda: closed_by_server() == 4)
            await send_when_connected(client, b"after")
            await until(lambda: replies == [b"before", b"after"])
            assert inbound == [b"before", b"after"]
        finally:
            for s in raw:
                s.close()
            client.close()
            server.close()

    asyncio.run(scenario())
    assert default_inbound_cap(256) == 96
    assert default_inbound_cap(64) == 8
    assert default_inbound_cap(1 << 20) == 4096

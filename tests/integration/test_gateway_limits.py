"""The gateway's limits, in process: idle clients, a flood of connections, UDP acks.

A node and its gateway run on this test's event loop; the clients are blocking sockets, as
seed 004's, run in threads so the loop keeps serving.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from meshpost import Node, NodeConfig
from meshpost.errors import EndpointInUse
from meshpost.gateway import Gateway, GatewayConfig
from meshpost.store import StoreReader

pytestmark = pytest.mark.integration

WAIT_S = 30.0


def exchange(port: int, text: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as s:
        s.send(text)
        return s.recv(1024)


def read_until_closed(s: socket.socket) -> bytes:
    got = b""
    while chunk := s.recv(1024):
        got += chunk
    return got


def stored_bodies(data_dir: Path) -> list[str]:
    with StoreReader.for_data_dir(data_dir) as reader:
        return [m.body for m in reader.history()]


def run(short_tmp: Path, gateway: GatewayConfig, scenario,  # type: ignore[no-untyped-def]
        max_message_bytes: int = 65536):
    config = NodeConfig(name="A", bind=(f"ipc://{short_tmp}/a.sock",), data_dir=short_tmp / "A",
                        max_message_bytes=max_message_bytes)

    async def main():  # type: ignore[no-untyped-def]
        async with Node(config) as node, Gateway(node, gateway) as gw:
            return await scenario(node, gw)

    return asyncio.run(asyncio.wait_for(main(), 60))


def test_an_idle_client_is_told_and_closed_and_one_that_paused_mid_text_is_answered(
    short_tmp: Path,
) -> None:
    async def scenario(node: Node, gw: Gateway) -> None:
        assert gw.tcp_address is not None
        port = gw.tcp_address[1]

        def idle() -> bytes:
            with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as s:
                return read_until_closed(s)

        assert await asyncio.to_thread(idle) == b"error: idle for 0.5s; closing\n"
        reply = await asyncio.to_thread(exchange, port, b"no newline")
        assert reply.startswith(b"received ")
        assert gw.stats.closed_idle == 1

    run(short_tmp, GatewayConfig(tcp=("127.0.0.1", 0), idle_timeout_s=0.5), scenario)
    assert stored_bodies(short_tmp / "A") == ["no newline"]


def test_a_flood_of_connections_past_the_limit_is_refused_and_served_clients_lose_nothing(
    short_tmp: Path,
) -> None:
    limit, flood = 4, 40

    async def scenario(node: Node, gw: Gateway) -> list[bytes]:
        assert gw.tcp_address is not None
        port = gw.tcp_address[1]
        # Hold `limit` connections open (each answered once), then flood.
        held = [socket.create_connection(("127.0.0.1", port), timeout=WAIT_S)
                for _ in range(limit)]
        try:
            for i, s in enumerate(held):
                s.send(f"held {i}".encode())
                assert (await asyncio.to_thread(s.recv, 1024)).startswith(b"received ")

            def refused() -> bytes:
                with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as s:
                    return read_until_closed(s)

            replies = await asyncio.gather(*(asyncio.to_thread(refused) for _ in range(flood)))
        finally:
            for s in held:
                s.close()
        assert gw.stats.refused_busy == flood
        return list(replies)

    replies = run(short_tmp, GatewayConfig(tcp=("127.0.0.1", 0), max_clients=limit), scenario)
    assert set(replies) == {b"error: 4 clients already; try later\n"}
    assert sorted(stored_bodies(short_tmp / "A")) == [f"held {i}" for i in range(limit)]


def test_udp_oversize_datagram_is_answered_with_an_error_and_not_stored(short_tmp: Path) -> None:
    async def scenario(node: Node, gw: Gateway) -> list[bytes]:
        assert gw.udp_address is not None

        def client() -> list[bytes]:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.settimeout(WAIT_S)
                out = []
                for data in (b"x" * 1001, b"ok\n", b"", b"/inbox"):
                    s.sendto(data, gw.udp_address)
                    if data:
                        out.append(s.recv(70_000))
                return out

        return await asyncio.to_thread(client)

    too_big, ok, inbox = run(short_tmp, GatewayConfig(udp=("127.0.0.1", 0)), scenario,
                             max_message_bytes=1000)
    assert too_big.startswith(b"error: message is 1001 bytes, over the 1000-byte limit")
    assert ok.startswith(b"received ")
    assert inbox.startswith(b"inbox: 1 message(s)\n") and inbox.endswith(b": ok\n")
    assert stored_bodies(short_tmp / "A") == ["ok"]


def test_a_taken_port_is_a_clear_endpoint_in_use_error(short_tmp: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        async def scenario(node: Node, gw: Gateway) -> None:  # pragma: no cover - never runs
            raise AssertionError("the gateway started on a taken port")

        with pytest.raises(EndpointInUse, match=f"tcp://127.0.0.1:{port}"):
            run(short_tmp, GatewayConfig(tcp=("127.0.0.1", port)), scenario)

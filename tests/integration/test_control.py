"""The control endpoint of in-process nodes: idle subscriptions expire, all subscriptions share
one memory bound and report what they lost, a full disk is answered (not waited for), and a node
that cannot write its endpoint file exits 6 without leaving half of one."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import logging
import os
from pathlib import Path
from typing import Any

import pytest

from meshpost import Node, NodeConfig, PeerConfig
from meshpost.cli import main
from meshpost.control import (
    ENDPOINT_FILE,
    AsyncControlClient,
    BroadcastStatusRequest,
    ControlServer,
    ErrorReply,
    EventsReply,
    EventsRequest,
    StatusReply,
    StatusRequest,
    SubmitRequest,
)
from meshpost.control import server as server_module
from meshpost.errors import StoreFull
from meshpost.store import StoreReader

pytestmark = pytest.mark.integration

SCENARIO_TIMEOUT_S = 60


def _configs(root: Path) -> dict[str, NodeConfig]:
    endpoints = {n: f"ipc://{root}/{n.lower()}.sock" for n in "AB"}
    return {
        name: NodeConfig(name=name, bind=(endpoints[name],),
                         peers=(PeerConfig(peer, endpoints[peer]),), data_dir=root / name)
        for name, peer in (("A", "B"), ("B", "A"))
    }


async def _until(predicate: object, what: str, timeout_s: float = 20) -> None:
    async def poll() -> None:
        while not predicate():  # type: ignore[operator]
            await asyncio.sleep(0.02)

    try:
        await asyncio.wait_for(poll(), timeout_s)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


def test_an_abandoned_subscription_expires_and_the_node_stops_publishing_to_it(
    short_tmp: Path,
) -> None:
    config = _configs(short_tmp)["A"]

    async def scenario() -> None:
        async with Node(config) as node, ControlServer(node, subscriber_idle_s=0.3) as server:
            async with AsyncControlClient(config.data_dir, name="A") as client:
                reply = await client.request(EventsRequest(0.0), timeout_s=10)
                assert isinstance(reply, EventsReply)
                assert server.subscriber_count == 1
                # The client goes away without saying so (as a killed `attach` does).
            await _until(lambda: server.subscriber_count == 0, "the idle subscriber to expire")
            assert server.expired == 1

    asyncio.run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT_S))


def test_the_subscriber_idle_expiry_is_the_node_setting_unless_given(short_tmp: Path) -> None:
    config = dataclasses.replace(_configs(short_tmp)["A"], subscriber_idle_s=0.3)

    async def scenario() -> None:
        async with Node(config) as node, ControlServer(node) as server:
            assert server.subscriber_idle_s == 0.3
            async with AsyncControlClient(config.data_dir, name="A") as client:
                await client.request(EventsRequest(0.0), timeout_s=10)
                assert server.subscriber_count == 1
            await _until(lambda: server.subscriber_count == 0, "the idle subscriber to expire")
            assert server.expired == 1

    asyncio.run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT_S))


def test_an_idle_control_server_does_not_wake_to_watch_the_store(short_tmp: Path) -> None:
    """A host keeps hundreds of control servers: one with no send waiting for the store and
    no subscriber must cost no timer wake-ups (the store watch polled 4 times a second)."""
    config = _configs(short_tmp)["A"]

    async def scenario() -> None:
        async with Node(config) as node:
            looks = 0
            stats = node.snapshot_stats

            def counted() -> Any:
                nonlocal looks
                looks += 1
                return stats()

            node.snapshot_stats = counted  # type: ignore[method-assign]
            async with ControlServer(node):
                await asyncio.sleep(4 * server_module.STORE_CHECK_S)
                assert looks == 1, "only the baseline, read when the watch started"

    asyncio.run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT_S))


def test_subscriptions_share_a_byte_bound_and_a_slow_one_is_told_what_it_lost(
    short_tmp: Path,
) -> None:
    configs = _configs(short_tmp)
    bound, count, size = 100_000, 400, 1000

    async def scenario() -> None:
        async with (
            Node(configs["A"]) as a, Node(configs["B"]) as b,
            ControlServer(b, subscribers_max_bytes=bound) as server,
        ):
            clients = [AsyncControlClient(configs["B"].data_dir, name="B") for _ in range(3)]
            try:
                for client in clients:  # subscribe, then never poll again (abandoned)
                    await client.request(EventsRequest(0.0), timeout_s=10)
                peak = 0

                def received_all() -> bool:
                    nonlocal peak
                    peak = max(peak, server.subscription_bytes)
                    return b.snapshot_stats().received >= count

                await a.post_many("B", [f"{i:05d}" + "x" * (size - 5) for i in range(count)])
                await _until(received_all, f"B to receive {count} messages", 60)
                assert server.subscription_bytes <= bound, server.subscription_bytes
                assert peak <= bound, peak
                # The slow subscriber reads what it has: the newest messages, and a count of
                # the events it lost (never a silent gap).
                seen: list[str] = []
                dropped = 0
                while True:
                    reply = await clients[0].request(EventsRequest(0.0), timeout_s=10)
                    assert isinstance(reply, EventsReply)
                    if not (reply.incoming or reply.peer_changes or reply.deliveries
                            or reply.dropped):
                        break
                    seen += [m.body[:5] for m in reply.incoming]
                    dropped += reply.dropped
                assert dropped > 0
                assert len(seen) + dropped >= count
                assert seen == sorted(seen) and seen[-1] == f"{count - 1:05d}"
                assert len(seen) * size <= bound
            finally:
                for client in clients:
                    await client.close()

    asyncio.run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT_S * 2))


def test_send_on_a_full_disk_says_storage_error_and_that_the_message_is_not_stored(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from meshpost.store.sqlite import Store

    config = _configs(short_tmp)["A"]
    real_apply = Store.apply
    full = True

    def apply(self: Store, *args: object, **kwargs: object) -> object:
        if full:
            raise StoreFull(str(config.data_dir / "meshpost.db"))
        return real_apply(self, *args, **kwargs)  # type: ignore[arg-type]

    async def scenario() -> int:
        nonlocal full
        async with Node(config) as node, ControlServer(node):
            monkeypatch.setattr(Store, "apply", apply)
            code = await asyncio.to_thread(
                main, ["send", "--node", "A", "--data", str(config.data_dir), "--to", "B",
                       "--timeout", "1", "hello on a full disk"])
            # Space comes back: the node's retry stores the message after all (as it said).
            full = False
            await _until(lambda: node.snapshot_stats().store_commits > 0, "the retry to commit")
            await node.flush()
            assert await node.pending_count() == 1
            return code

    code = asyncio.run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT_S))
    err = capsys.readouterr().err
    assert code == 6, err
    assert "storage error" in err and "NOT stored" in err
    assert "not running" not in err


def test_a_node_that_cannot_write_its_endpoint_file_exits_6_and_leaves_no_half_file(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def write_half_then_enospc(fd: int, data: bytes) -> None:
        os.write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(server_module, "_write_all", write_half_then_enospc)
    data_dir = short_tmp / "A"
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    try:
        code = main(["node", "A", "--bind", f"ipc://{short_tmp}/a.sock", "--data",
                     str(data_dir), "--headless", "--log-level", "error"])
    finally:  # `meshpost node` configures logging for the process: undo it for later tests
        root.setLevel(level)
        root.handlers[:] = handlers
    err = capsys.readouterr().err
    assert code == 6, err
    assert "is full" in err and "Traceback" not in err
    assert not (data_dir / ENDPOINT_FILE).exists()
    assert not [p.name for p in data_dir.iterdir() if ENDPOINT_FILE in p.name]


def test_status_reports_the_subscribers(short_tmp: Path) -> None:
    config = _configs(short_tmp)["A"]

    async def scenario() -> StatusReply:
        async with (
            Node(config) as node, ControlServer(node),
            AsyncControlClient(config.data_dir, name="A") as client,
        ):
            await client.request(EventsRequest(0.0), timeout_s=10)
            reply = await client.request(StatusRequest(), timeout_s=10)
            assert isinstance(reply, StatusReply)
            return reply

    status = asyncio.run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT_S)).status
    assert status["control"] == {"subscribers": 1, "subscription_bytes": 0, "expired": 0}


def test_a_pipelined_stream_wider_than_the_socket_queues_gets_every_reply_in_order(
    short_tmp: Path,
) -> None:
    """3,000 sends with 1,500 in flight (ZeroMQ queues hold 1,000): no reply is lost, and the
    messages are posted in the order they were sent (seq 1..3000)."""
    from meshpost.control import ControlClient, SendReply, SendRequest

    config = _configs(short_tmp)["A"]
    count = 3000

    def stream() -> list[int]:
        with ControlClient(config.data_dir, name="A") as client:
            seqs = []
            for _, reply in client.stream(
                (SendRequest("B", f"m{i}", 0.0) for i in range(count)),
                timeout_s=30, window=1500,
            ):
                assert isinstance(reply, SendReply), reply
                seqs += [r.seq for r in reply.sent]
            return seqs

    async def scenario() -> list[int]:
        async with Node(config) as node, ControlServer(node):
            return await asyncio.to_thread(stream)

    seqs = asyncio.run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT_S))
    assert seqs == list(range(1, count + 1))
    with StoreReader.for_data_dir(config.data_dir) as reader:
        assert [m.body for m in reader.history(direction="out")] == [f"m{i}" for i in range(count)]


@pytest.mark.parametrize("lease_s", [float("nan"), -3.0, 0.0, 86_401.0, float("inf")])
def test_a_task_lease_out_of_range_is_refused_as_a_usage_error(
    short_tmp: Path, lease_s: float,
) -> None:
    """Audit: a `nan` lease over the control socket was queued, its dispatch failed in a task
    nobody awaited ('Task exception was never retrieved') and the task stayed in flight."""
    config = _configs(short_tmp)["A"]

    async def scenario() -> None:
        async with Node(config) as node, ControlServer(node):
            async with AsyncControlClient(config.data_dir, name="A") as client:
                reply = await client.request(
                    SubmitRequest(queue="jobs", sink="A", bodies=["x"], lease_s=lease_s),
                    timeout_s=10)
                assert isinstance(reply, ErrorReply), reply
                assert (reply.kind, reply.exit_code) == ("invalid_lease", 2)
                assert "at most 86400 (a day)" in reply.message
            for status in await node.queue_status("jobs"):
                assert status.waiting == status.in_flight == 0, status

    asyncio.run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT_S))


def test_the_status_of_an_unknown_broadcast_is_a_plain_not_found(short_tmp: Path) -> None:
    """Audit: `broadcast status nonsense` said "bad control request: ..." (it read like a
    client of another version)."""
    config = _configs(short_tmp)["A"]

    async def scenario() -> None:
        async with Node(config) as node, ControlServer(node), \
                AsyncControlClient(config.data_dir, name="A") as client:
            reply = await client.request(BroadcastStatusRequest("nonsense"), timeout_s=10)
        assert isinstance(reply, ErrorReply), reply
        assert (reply.kind, reply.exit_code) == ("unknown_broadcast", 2)
        assert reply.message.startswith("node 'A' sent no broadcast 'nonsense': give the id")
        assert "bad control request" not in reply.message

    asyncio.run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT_S))

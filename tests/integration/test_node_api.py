"""The public Python API refuses bad input with a clear error and stores nothing for it."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

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


def test_a_receiver_whose_store_lags_pauses_reading_and_loses_nothing(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from meshpost.store import writer as writer_module
    from meshpost.verify import verify_stores

    # A tiny pending limit makes the receiver's store fall behind on every burst.
    monkeypatch.setattr(writer_module, "MAX_PENDING_ROWS", 16)
    endpoints = {n: f"ipc://{short_tmp}/{n.lower()}.sock" for n in "AB"}

    def config(name: str, peer: str) -> NodeConfig:
        return NodeConfig(name=name, bind=(endpoints[name],),
                          peers=(PeerConfig(peer, endpoints[peer]),),
                          data_dir=short_tmp / name)

    count = 3000
    pauses: list[bool] = []

    async def scenario() -> None:
        async with Node(config("A", "B")) as a, Node(config("B", "A")) as b:
            real_pause = b._transport.pause_inbound  # type: ignore[union-attr]

            def pause() -> None:
                pauses.append(True)
                real_pause()

            b._transport.pause_inbound = pause  # type: ignore[union-attr,method-assign]
            sent = 0
            while sent < count:
                sent += await a.post_many("B", [f"m{i}" for i in range(sent, sent + 500)])
            assert await a.wait_delivered(count, 60)
            await b.flush()
            assert b.stats.received == count

    asyncio.run(asyncio.wait_for(scenario(), 90))
    assert pauses, "the receiver never paused: the test did not exercise back-pressure"
    report = verify_stores({"A": short_tmp / "A", "B": short_tmp / "B"})
    assert report.ok, report.summary()
    assert report.delivered == count


def test_the_hlc_restarts_above_every_stored_stamp_even_if_the_wall_clock_went_back(
    short_tmp: Path,
) -> None:
    from meshpost.clock import FakeClock, hlc_unpack

    config = NodeConfig(
        name="A", bind=(f"ipc://{short_tmp}/a.sock",),
        peers=(PeerConfig("B", f"ipc://{short_tmp}/b.sock"),), data_dir=short_tmp / "A",
    )
    hour_ns = 3600 * 10**9

    async def post_once(clock: FakeClock) -> int:
        async with Node(config, clock=clock) as node:
            (handle,) = await node.post("B", "tick")
            return handle.hlc

    before = asyncio.run(asyncio.wait_for(post_once(FakeClock(skew_ns=hour_ns)), 30))
    # The wall clock is corrected an hour back while the node is down.
    after = asyncio.run(asyncio.wait_for(post_once(FakeClock()), 30))
    assert after > before
    assert hlc_unpack(after)[0] == hlc_unpack(before)[0]  # same millisecond, next counter


def test_a_node_that_shuts_down_cleanly_is_shown_gone_at_once(short_tmp: Path) -> None:
    from meshpost.node import PeerChange, PeerChanged

    endpoints = {n: f"ipc://{short_tmp}/{n.lower()}.sock" for n in "AB"}

    def config(name: str, peer: str) -> NodeConfig:
        # Silence alone would take a minute to notice: only the Bye can explain a quick change.
        return NodeConfig(name=name, bind=(endpoints[name],),
                          peers=(PeerConfig(peer, endpoints[peer]),),
                          data_dir=short_tmp / name, peer_timeout_s=60.0)

    async def scenario() -> list[PeerChanged]:
        async with Node(config("A", "B")) as a:
            events = a.subscribe()
            b = Node(config("B", "A"))
            await b.start()
            try:
                await a.send("B", "hello", timeout_s=20)
                while not all(p.connected for p in b.peers()):  # B's own link to A is up
                    await asyncio.sleep(0.01)
            finally:
                await b.close()
            seen: list[PeerChanged] = []
            async with asyncio.timeout(10):
                while not any(not e.connected for e in seen):
                    event = await events.get()
                    if isinstance(event, PeerChanged):
                        seen.append(event)
            assert [p.connected for p in a.peers()] == [False]
            return seen

    seen = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert seen[-1] == PeerChanged("B", False, PeerChange.LEFT, "shutting down")


def test_a_receipt_timeout_raises_and_the_message_is_still_delivered_later(
    short_tmp: Path,
) -> None:
    from meshpost.errors import ReceiptTimeout
    from meshpost.verify import verify_stores

    endpoints = {n: f"ipc://{short_tmp}/{n.lower()}.sock" for n in "AB"}

    def config(name: str, peer: str) -> NodeConfig:
        return NodeConfig(name=name, bind=(endpoints[name],),
                          peers=(PeerConfig(peer, endpoints[peer]),), data_dir=short_tmp / name)

    async def scenario() -> None:
        async with Node(config("A", "B")) as a:
            # B is not running: neither wait can end with a receipt.
            with pytest.raises(ReceiptTimeout, match="no receipt"):
                await a.send("B", "first", timeout_s=0.2)
            (handle,) = await a.post("B", "second")
            with pytest.raises(ReceiptTimeout):
                await a.wait_receipt(handle, 0.2)
            assert not handle.receipt.done()  # wait_receipt leaves the handle's future alone
            async with Node(config("B", "A")):
                receipt = await a.wait_receipt(handle, 20)
                assert (receipt.to, receipt.seq) == ("B", 2)
                assert await a.wait_delivered(2, 20)  # the timed-out send arrived too

    asyncio.run(asyncio.wait_for(scenario(), 60))
    report = verify_stores({"A": short_tmp / "A", "B": short_tmp / "B"})
    assert report.ok and report.delivered == 2, report.summary()


def test_the_window_bytes_bound_what_a_link_holds_and_the_backlog_still_drains(
    short_tmp: Path,
) -> None:
    from meshpost.protocol import HELD_MESSAGE_OVERHEAD
    from meshpost.verify import verify_stores

    endpoints = {n: f"ipc://{short_tmp}/{n.lower()}.sock" for n in "AB"}
    body_chars, count = 1000, 300
    budget = 8 * (body_chars + HELD_MESSAGE_OVERHEAD)  # eight messages, of 4096 by count

    def config(name: str, peer: str) -> NodeConfig:
        return NodeConfig(name=name, bind=(endpoints[name],),
                          peers=(PeerConfig(peer, endpoints[peer]),),
                          data_dir=short_tmp / name, window_bytes=budget)

    held: list[int] = []

    async def scenario() -> None:
        async with Node(config("A", "B")) as a:
            link = a._links["B"]
            real_enqueue = link.enqueue

            def enqueue(messages: list) -> None:  # type: ignore[type-arg]
                real_enqueue(messages)
                held.append(link.held_bytes)

            link.enqueue = enqueue  # type: ignore[method-assign]
            # B is not running: the first messages fill the window, the rest wait on disk.
            for start in range(0, count, 50):
                await a.post_many("B", [f"{i:04d}" + "x" * (body_chars - 4)
                                        for i in range(start, start + 50)])
            await a.flush()
            async with Node(config("B", "A")):
                assert await a.wait_delivered(count, 60)

    asyncio.run(asyncio.wait_for(scenario(), 90))
    assert len(held) > count // 8, "the backlog was not loaded in window-sized refills"
    assert max(held) <= budget
    report = verify_stores({"A": short_tmp / "A", "B": short_tmp / "B"})
    assert report.ok, report.summary()
    assert report.delivered == count


def test_receipt_futures_nobody_can_observe_are_not_kept_while_the_peer_is_away(
    short_tmp: Path,
) -> None:
    """A long outage must not grow memory per post(): a future whose caller dropped it is
    forgotten, while one held any way (the handle, the future alone, a callback alone, a
    task awaiting it) still gets its receipt."""
    import gc

    from meshpost.errors import ReceiptTimeout
    from meshpost.node import Receipt
    from meshpost.verify import verify_stores

    endpoints = {n: f"ipc://{short_tmp}/{n.lower()}.sock" for n in "AB"}
    dropped = 2000

    def config(name: str, peer: str) -> NodeConfig:
        return NodeConfig(name=name, bind=(endpoints[name],),
                          peers=(PeerConfig(peer, endpoints[peer]),),
                          data_dir=short_tmp / name, sync="normal")

    async def waiting(future: asyncio.Future[Receipt]) -> Receipt:
        return await future

    async def scenario() -> None:
        async with Node(config("A", "B")) as a:
            for i in range(dropped):
                await a.post("B", f"fire and forget {i}")  # the handle is dropped at once
            with pytest.raises(ReceiptTimeout):
                await a.send("B", "timed out", timeout_s=0.05)
            (kept,) = await a.post("B", "handle kept")
            (handle,) = await a.post("B", "future kept")
            future_only = handle.receipt
            called: list[int] = []
            (handle,) = await a.post("B", "callback only")
            handle.receipt.add_done_callback(lambda f: called.append(f.result().seq))
            (handle,) = await a.post("B", "awaited by a task")
            task = asyncio.create_task(waiting(handle.receipt))
            del handle
            gc.collect()
            await asyncio.sleep(0)  # the task starts waiting; the timed-out future is released
            # Only what someone can still observe is kept: nothing of the dropped 2,001.
            assert sorted(key[1] for key in a._receipts._waiters) == [
                dropped + 2, dropped + 3, dropped + 4, dropped + 5]
            assert sorted(key[1] for key in a._receipts._held) == [dropped + 4, dropped + 5]
            async with Node(config("B", "A")):
                for future in (kept.receipt, future_only, task):
                    await asyncio.wait_for(asyncio.shield(future), 60)
                assert [kept.receipt.result().seq, future_only.result().seq,
                        task.result().seq] == [dropped + 2, dropped + 3, dropped + 5]
                assert await a.wait_delivered(dropped + 5, 60)
                await asyncio.sleep(0)
                assert called == [dropped + 4]
            assert not a._receipts._waiters and not a._receipts._held

    asyncio.run(asyncio.wait_for(scenario(), 120))
    report = verify_stores({"A": short_tmp / "A", "B": short_tmp / "B"})
    assert report.ok, report.summary()
    assert report.delivered == dropped + 5


def test_posts_committed_together_leave_together_in_one_batch_frame(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from meshpost.node.links import Links
    from meshpost.protocol import Batch
    from meshpost.verify import verify_stores

    endpoints = {n: f"ipc://{short_tmp}/{n.lower()}.sock" for n in "AB"}
    batch_sizes: list[int] = []
    real_transmit = Links._transmit

    def transmit(self: Links, peer: str, frames: list[Any]) -> None:
        if self._node.name == "A":
            batch_sizes.extend(len(f.messages) for f in frames if isinstance(f, Batch))
        real_transmit(self, peer, frames)

    monkeypatch.setattr(Links, "_transmit", transmit)

    def config(name: str, peer: str) -> NodeConfig:
        return NodeConfig(name=name, bind=(endpoints[name],),
                          peers=(PeerConfig(peer, endpoints[peer]),), data_dir=short_tmp / name)

    count = 300

    async def scenario() -> None:
        async with Node(config("A", "B")) as a, Node(config("B", "A")):
            await a.send("B", "warm-up", timeout_s=20)
            batch_sizes.clear()
            # One loop iteration's posts share a commit, so they share its frames.
            handles = await asyncio.gather(*(a.post("B", f"m{i}") for i in range(count)))
            receipts = await asyncio.gather(*(h.receipt for (h,) in handles))
            assert {r.seq for r in receipts} == set(range(2, count + 2))

    asyncio.run(asyncio.wait_for(scenario(), 60))
    # Not a frame per post: the first frame after the commit holds every one of them.
    assert batch_sizes[0] == count, batch_sizes[:10]
    report = verify_stores({"A": short_tmp / "A", "B": short_tmp / "B"})
    assert report.ok, report.summary()
    assert report.delivered == count + 1

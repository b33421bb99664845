"""Node composed from fakes: an in-memory transport, a fake clock, a real store in tmp_path.

The sans-IO core is tested on its own (tests/unit/protocol); these tests check what `Node`
(node/core.py) adds on top of it: post -> stored -> frame out -> receipt in -> delivered,
the failed state after an unexpected store error, and the public API. The links and their
timers are in test_links.py, the patterns in test_patterns.py.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from tests.unit.node.support import PATIENCE_S, frame_kinds, node_pair, run, until

from meshpost.errors import NodeFailed, ReceiptTimeout, UnknownPeer
from meshpost.node import wait_receipt
from meshpost.store import Store, StoreReader
from meshpost.timeline import Mark, MarkRecorder


def test_a_post_is_stored_sent_receipted_and_recorded_as_delivered(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with node_pair(tmp_path) as (a, b, net, _clock):
            (handle,) = await a.post("B", "hello B")
            # Returned once durably stored at A, before any receipt.
            with StoreReader.for_data_dir(a.config.data_dir) as reader:
                assert [m.body for m in reader.history(direction="out")] == ["hello B"]
            receipt = await wait_receipt(handle, PATIENCE_S)
            assert (receipt.to, receipt.message_id, receipt.seq) == ("B", handle.id, 1)
            assert "Batch" in frame_kinds(net, "A") or "Envelope" in frame_kinds(net, "A")
            assert "ReceiptFrame" in frame_kinds(net, "B")
            await until(lambda: a.stats.delivered == 1)
            with StoreReader.for_data_dir(b.config.data_dir) as reader:
                assert [(m.sender, m.body) for m in reader.history(direction="in")] == [
                    ("A", "hello B")]
            await a.flush()
            with StoreReader.for_data_dir(a.config.data_dir) as reader:
                assert [m.state for m in reader.history(direction="out")] == ["delivered"]

    run(scenario)


def test_send_returns_when_the_receipt_arrives_and_the_record_follows(tmp_path: Path) -> None:
    """The receipt is reported as soon as it arrives; the sender's record of it is committed
    after `send()` has returned (with the next commit), not on the reply path."""
    async def scenario() -> None:
        async with node_pair(tmp_path) as (a, b, _net, _clock):
            receipt = await a.send("B", "first", timeout_s=PATIENCE_S)
            # Nothing ran on the loop since the receipt was reported: not recorded yet.
            assert a.stats.delivered == 0
            with StoreReader.for_data_dir(a.config.data_dir) as reader:
                assert [m.state for m in reader.history(direction="out")] == ["pending"]
            with StoreReader.for_data_dir(b.config.data_dir) as reader:
                assert [m.id for m in reader.history(direction="in")] == [receipt.message_id]
            await until(lambda: a.stats.delivered == 1)
            await a.flush()
            with StoreReader.for_data_dir(a.config.data_dir) as reader:
                (row,) = reader.history(direction="out")
                assert (row.state, row.receipt_stored_at_ns) == (
                    "delivered", receipt.delivered_at_ns)

    run(scenario)


def test_wait_delivered_follows_the_recorded_receipts(tmp_path: Path) -> None:
    """`wait_delivered` wakes at the records it waits for, returns at once if they are in,
    and times out otherwise (the event it follows is set only while someone waits)."""
    async def scenario() -> None:
        async with node_pair(tmp_path) as (a, _b, _net, _clock):
            await a.send("B", "one", timeout_s=PATIENCE_S)
            assert await a.wait_delivered(1, PATIENCE_S)
            assert await a.wait_delivered(1, PATIENCE_S)  # already in: no wait
            waiting = asyncio.create_task(a.wait_delivered(3, PATIENCE_S))
            for body in ("two", "three"):
                await a.send("B", body, timeout_s=PATIENCE_S)
            assert await waiting
            assert a.stats.delivered == 3
            assert not await a.wait_delivered(4, 0.05)  # nothing more comes

    run(scenario)


def test_send_timeouts_share_one_timer_and_expire_in_deadline_order(tmp_path: Path) -> None:
    async def scenario() -> None:
        # B never starts: no receipt can come.
        async with node_pair(tmp_path, connect=False, start_b=False) as (a, _b, _net, _clock):
            slow = [asyncio.ensure_future(a.send("B", f"slow {i}", timeout_s=PATIENCE_S))
                    for i in range(20)]
            fast = asyncio.ensure_future(a.send("B", "fast", timeout_s=0.05))
            with pytest.raises(ReceiptTimeout):
                await fast
            assert not any(task.done() for task in slow)
            assert a._receipts._send_timer is not None and len(a._receipts._send_deadlines) == 20
            for task in slow:
                task.cancel()
            await asyncio.gather(*slow, return_exceptions=True)
            assert not a._receipts._send_deadlines  # a cancelled send leaves nothing behind

    run(scenario)


def test_a_send_that_stops_waiting_leaves_no_receipt_future_behind(tmp_path: Path) -> None:
    """`send()` holds its receipt future itself (no weak reference): when it stops waiting
    without the receipt (a timeout, a cancellation) it tells the node to forget the future."""
    async def scenario() -> None:
        async with node_pair(tmp_path) as (a, _b, net, _clock):
            receipt = await a.send("B", "answered", timeout_s=PATIENCE_S)
            assert receipt.seq == 1 and not a._receipts._waiters
            net.partition("A", "B")  # no receipt can come from now on
            with pytest.raises(ReceiptTimeout):
                await a.send("B", "timed out", timeout_s=0.05)
            assert not a._receipts._waiters
            cancelled = asyncio.ensure_future(a.send("B", "cancelled"))
            await until(lambda: a.stats.sent == 3)
            assert len(a._receipts._waiters) == 1
            cancelled.cancel()
            await asyncio.gather(cancelled, return_exceptions=True)
            assert not a._receipts._waiters

    run(scenario)


def test_an_unexpected_store_error_fails_the_post_and_the_node(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 15 bug 1: `post()` hung for ever when `Store.apply` raised a non-StoreError."""

    async def scenario() -> None:
        async with node_pair(tmp_path) as (a, _b, net, _clock):

            def boom(*_args: object, **_kwargs: object) -> None:
                raise RuntimeError("bug in the store")

            net.partition("A", "B")  # so that this one's receipt cannot come
            (waiting,) = await a.post("B", "stored before the failure")
            monkeypatch.setattr(Store, "apply", boom)
            with pytest.raises(NodeFailed, match="bug in the store") as failed:
                await asyncio.wait_for(a.post("B", "doomed"), PATIENCE_S)
            assert isinstance(failed.value.__cause__, RuntimeError)
            assert a.failure is failed.value
            assert "failed" in repr(a)
            # A receipt still expected fails too, instead of waiting for its timeout.
            with pytest.raises(NodeFailed):
                await wait_receipt(waiting, PATIENCE_S)
            # New work is refused at once with the same error, as h11 does after an error.
            with pytest.raises(NodeFailed):
                await asyncio.wait_for(a.post("B", "again"), PATIENCE_S)
            with pytest.raises(NodeFailed):
                await asyncio.wait_for(a.post_many("B", ["x"]), PATIENCE_S)
            # A headless node's serve() returns by raising it (the CLI exits 6).
            with pytest.raises(NodeFailed):
                await asyncio.wait_for(a.serve(asyncio.Event()), PATIENCE_S)
            monkeypatch.undo()

    run(scenario)


def test_send_and_post_refuse_what_the_shared_rules_refuse(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with node_pair(tmp_path, connect=False) as (a, _b, _net, _clock):
            with pytest.raises(UnknownPeer):
                await a.send("all", "hi", timeout_s=1)
            with pytest.raises(UnknownPeer):
                await a.post("nobody", "hi")
            assert a.resolve("all") == ["B"]

    run(scenario)


def test_a_probe_sees_the_steps_of_a_send(tmp_path: Path) -> None:
    async def scenario() -> None:
        marks: list[Mark] = []
        async with node_pair(tmp_path, probe=MarkRecorder(marks)) as (a, _b, _net, _clock):
            # The Pong to the first Ping after the Welcome reads the dealer too: let it come
            # first (the timer loop sends that Ping at once now, not at its next 250 ms scan).
            await until(lambda: a.peers()[0].rtt_ns is not None)
            marks.clear()
            await a.send("B", "traced", timeout_s=PATIENCE_S)
        labels = [label for label, _t in marks]
        for step in ("writer submits<", "commit<", "commit>", "outgoing stored<",
                     "dealer readable<", "dialer.receive<", "delivery stored<"):
            assert step in labels, step
        assert labels.index("commit<") < labels.index("outgoing stored<") < labels.index(
            "dealer readable<") < labels.index("delivery stored<")

    run(scenario)

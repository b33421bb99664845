"""3. Crash at each protocol step (the `MESHPOST_DEBUG_CRASH_AT` hook: `os._exit(99)`), on the
side where that step runs; restart without the hook; everything is delivered exactly once.

Checked at the crash: no row is marked delivered at the sender that its receiver lacks (a
receipt never precedes the commit). Checked after the drain: resends were deduplicated
(one copy) and receipted again (no outbox row left pending).
"""

from __future__ import annotations

import asyncio

import pytest

from meshpost.node import CrashPoint

from .checker import Helper, Mesh, make_body, read_rows
from .conftest import MeshFactory

pytestmark = [pytest.mark.faults, pytest.mark.integration]

CRASH_EXIT = 99
BURST = 20


def _pending_at_sender_stored_at_receiver(mesh: Mesh) -> int:
    """Messages the receiver committed while the sender still waits for their receipt: each
    must be resent after the restart, deduplicated and receipted again."""
    pending = {r.id for r in read_rows(mesh.data_dir("A"), "WHERE state = 'pending'")}
    stored = {r.id for r in read_rows(mesh.data_dir("B"), "WHERE direction = 'in'")}
    return len(pending & stored)


async def _burst(mesh: Mesh, tag: str, count: int, receipt_timeout_s: float) -> None:
    await asyncio.gather(*(
        mesh.send("A", "B", make_body(mesh.rng, tag, i), receipt_timeout_s=receipt_timeout_s)
        for i in range(count)
    ))


@pytest.mark.parametrize("point", [CrashPoint.AFTER_SENDER_STORE, CrashPoint.AFTER_ACK_RECEIVE])
def test_sender_crash(mesh_factory: MeshFactory, point: CrashPoint) -> None:
    mesh = mesh_factory(["A", "B"], seed=3)

    async def scenario() -> None:
        await asyncio.to_thread(mesh.start_real, ["B"])
        await asyncio.to_thread(mesh.start_real, ["A"], crash_at=point)
        await _burst(mesh, "before", BURST, receipt_timeout_s=5.0)
        assert await asyncio.to_thread(mesh.wait_exit, "A") == CRASH_EXIT
        mesh.assert_no_receipt_without_commit(f"after the {point.value} crash")
        if point is CrashPoint.AFTER_ACK_RECEIVE:
            # B committed and receipted; A died before recording it: A must resend.
            mesh.extra["resent_duplicates"] = _pending_at_sender_stored_at_receiver(mesh)
            assert mesh.extra["resent_duplicates"] >= 1
        await asyncio.to_thread(mesh.start_real, ["A"])
        await _burst(mesh, "after", BURST, receipt_timeout_s=10.0)
        counts = await mesh.finish()
        assert counts.uncertain >= 1  # the requests the crash cut off
        assert counts.receipted >= BURST  # the second burst, after the restart

    mesh.run(scenario)


@pytest.mark.parametrize("point", [CrashPoint.AFTER_RECEIVER_COMMIT, CrashPoint.BEFORE_ACK_SEND])
def test_receiver_crash(mesh_factory: MeshFactory, point: CrashPoint) -> None:
    mesh = mesh_factory(["A", "B"], seed=3)

    async def scenario() -> None:
        await asyncio.to_thread(mesh.start_real, ["A"])
        await asyncio.to_thread(mesh.start_real, ["B"], crash_at=point)
        await _burst(mesh, "before", BURST, receipt_timeout_s=1.0)
        assert await asyncio.to_thread(mesh.wait_exit, "B") == CRASH_EXIT
        mesh.assert_no_receipt_without_commit(f"after the {point.value} crash")
        # B committed at least one batch and died before its receipt left.
        mesh.extra["resent_duplicates"] = _pending_at_sender_stored_at_receiver(mesh)
        assert mesh.extra["resent_duplicates"] >= 1
        await asyncio.to_thread(mesh.start_real, ["B"])
        await _burst(mesh, "after", BURST, receipt_timeout_s=10.0)
        counts = await mesh.finish()
        assert counts.accepted == 2 * BURST
        assert counts.recovered >= mesh.extra["resent_duplicates"]

    mesh.run(scenario)


def test_sender_crash_after_transmit_env_hook(mesh_factory: MeshFactory) -> None:
    """The env hook fires at a node's first transmit, which is always its Hello: fill the
    outbox while B is down, then start A with the hook so that it dies on its first frame."""
    mesh = mesh_factory(["A", "B"], seed=3)

    async def scenario() -> None:
        await asyncio.to_thread(mesh.start_real, ["A"])
        await _burst(mesh, "queued", BURST, receipt_timeout_s=0.1)
        assert await asyncio.to_thread(mesh.terminate, "A") == 0
        await asyncio.to_thread(mesh.start_real, ["B"])
        await asyncio.to_thread(mesh.start_real, ["A"], crash_at=CrashPoint.AFTER_TRANSMIT,
                                wait=False)
        assert await asyncio.to_thread(mesh.wait_exit, "A") == CRASH_EXIT
        mesh.assert_no_receipt_without_commit("after the after-transmit crash")
        await asyncio.to_thread(mesh.start_real, ["A"])
        counts = await mesh.finish()
        assert counts.accepted == counts.stored == BURST

    mesh.run(scenario)


def test_sender_crash_after_transmitting_a_batch(mesh_factory: MeshFactory) -> None:
    """AFTER_TRANSMIT armed once the link is up (in a helper process embedding the Node), so
    the frame transmitted just before the crash is the batch carrying the new message."""
    mesh = mesh_factory(["A", "B"], seed=3)

    async def scenario() -> None:
        await asyncio.to_thread(mesh.start_real, ["B"])
        helper = Helper(mesh, "A", ["crash", "--to", "B", "--count", "3", "--tag", "armed",
                                    "--point", CrashPoint.AFTER_TRANSMIT.value])
        assert await asyncio.to_thread(helper.wait) == CRASH_EXIT, helper.log_tail()
        events = helper.events()
        assert [e["ev"] for e in events] == ["ready", "armed", "attempt"], events
        helper.ingest_posts("B")
        mesh.assert_no_receipt_without_commit("after the after-transmit crash")
        await asyncio.to_thread(mesh.start_real, ["A"])
        await _burst(mesh, "after", 5, receipt_timeout_s=10.0)
        counts = await mesh.finish()
        assert counts.stored == counts.attempted == 6

    mesh.run(scenario)

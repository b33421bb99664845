"""16. Id pre-claim: a raw peer C, with its own valid name, sends B messages carrying the ids
A would use next (the form an id had before issue 16: A's last id's counter + 1, under every
millisecond of the next few seconds), then A sends to B (issue 16, item 3).

Before the fix ids were unique across B's whole store and predictable, so A's next message
was rejected as a conflict (exit 5) and B stored nothing of it. Checked now: B stores and
receipts A's message (ids are unique per sender, and random), and C's messages are stored as
C's, not judged.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import zmq

from meshpost.protocol import PROTOCOL_VERSION, Batch, Envelope, Hello, ReceiptFrame, decode, encode

from .conftest import MeshFactory

pytestmark = [pytest.mark.faults, pytest.mark.integration]

WINDOW_MS = 4_000
PER_BATCH = 500


def _preclaim(endpoint: str, last_id: str) -> int:
    """Store at B, as C, every id A's old factory could make next in the next WINDOW_MS."""
    counter = int(last_id[12:], 16) + 1
    now_ms = time.time_ns() // 1_000_000
    ids = [f"{ms:012x}{counter:016x}" for ms in range(now_ms, now_ms + WINDOW_MS)]
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTING_ID, b"C")  # what a meshpost before issue 16 required
    sock.connect(endpoint)
    try:
        sock.send(encode(Hello(version=PROTOCOL_VERSION, node_id="c-raw", name="C",
                               sent_at_ns=time.time_ns(), hlc=1)))
        assert sock.poll(10_000), "B did not answer C's Hello"
        sock.recv()
        stored = 0
        for start in range(0, len(ids), PER_BATCH):
            chunk = ids[start : start + PER_BATCH]
            sock.send(encode(Batch(tx_at_ns=time.time_ns(), messages=[
                Envelope(id=i, seq=start + n + 1, sender="C", recipient="B", body="claim",
                         sent_at_ns=time.time_ns(), hlc=1) for n, i in enumerate(chunk)])))
            while sock.poll(10_000):
                frame = decode(sock.recv(), max_bytes=1 << 24)
                if isinstance(frame, ReceiptFrame):
                    stored += sum(hi - lo + 1 for lo, hi in frame.ranges)
                    break
        return stored
    finally:
        sock.close(0)
        ctx.term()


def test_another_peer_cannot_preclaim_a_senders_ids(mesh_factory: MeshFactory) -> None:
    mesh = mesh_factory(["A", "B", "C"], real=["A", "B"], absent=["C"], seed=15)
    mesh.foreign_senders.add("C")

    async def scenario() -> None:
        await mesh.start()
        [first] = await mesh.send("A", "B", "before the claim")
        assert first.receipted and first.id is not None
        claimed = await asyncio.to_thread(_preclaim, mesh.endpoint("B"), first.id)
        mesh.extra["ids_claimed_by_C"] = claimed
        attempts = []
        for i in range(5):
            attempts += await mesh.send("A", "B", f"after the claim {i}")
        receipted = sum(a.receipted for a in attempts)
        rejected = sum(a.rejected for a in attempts)
        mesh.extra["A_receipted"] = f"{receipted}/{len(attempts)}"
        mesh.extra["A_rejected_wrongly"] = rejected
        counts = await mesh.finish()
        assert claimed == WINDOW_MS
        assert rejected == 0, [a.error for a in attempts]
        assert receipted == len(attempts)
        assert counts.accepted == counts.receipted == counts.stored == counts.attempted

    mesh.run(scenario)

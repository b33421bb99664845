"""8. kill -9 in the middle of group-commit batches, on both ends: `PRAGMA integrity_check`
passes and no batch is partly stored.

The sender is a helper process embedding a Node: each `post_many()` chunk of 3,000 messages of
400 bytes is one transaction (flushed before the next), so a chunk is either entirely in the
outbox or not at all. The receiver (a real node) is killed twice while it commits incoming
batches; every stored row must be whole.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from .checker import Helper, Mesh, integrity, read_rows, sleep_random
from .conftest import MeshFactory

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.timeout(300)]

CHUNKS = 20
#: The flood pauses before this chunk until B is back (see the test).
GATE_BEFORE = 2
CHUNK = 3000
SIZE = 400


def _check_sender_chunks(mesh: Mesh, accepted: set[int]) -> dict[int, int]:
    per_chunk: dict[int, int] = {}
    for r in read_rows(mesh.data_dir("A"), "WHERE direction = 'out'"):
        k = int(r.body.split("/")[1][1:])
        per_chunk[k] = per_chunk.get(k, 0) + 1
    partial = {k: n for k, n in per_chunk.items() if n != CHUNK}
    assert not partial, f"partly stored chunks (chunk: rows): {partial}"
    assert accepted <= set(per_chunk), "a chunk acknowledged as flushed is not in the outbox"
    return per_chunk


def _check_receiver_rows(mesh: Mesh) -> int:
    rows = read_rows(mesh.data_dir("B"), "WHERE direction = 'in'")
    broken = [r.id for r in rows if len(r.body) != SIZE or not r.body.startswith("mid/c")]
    assert not broken, f"partial rows at B: {broken[:5]}"
    return len(rows)


def _rows_at_b(mesh: Mesh) -> int:
    return len(read_rows(mesh.data_dir("B"), "WHERE direction = 'in'"))


async def _kill_b_while_receiving(mesh: Mesh, label: str, before: int | None = None) -> None:
    """kill -9 B once its inbox grows past `before` rows (it is committing incoming batches),
    check its file."""
    before = _rows_at_b(mesh) if before is None else before
    deadline = time.monotonic() + 60
    while _rows_at_b(mesh) <= before:
        assert time.monotonic() < deadline, "B is not receiving"
        await asyncio.sleep(0.01)
    await sleep_random(mesh.rng, 0.0, 0.05)
    assert await asyncio.to_thread(mesh.kill, "B") == -9
    assert integrity(mesh.db("B")) == ["ok"]
    mesh.extra[f"B_rows_at_{label}"] = _check_receiver_rows(mesh)
    mesh.assert_no_receipt_without_commit(f"after kill -9 of B ({label})")
    await asyncio.to_thread(mesh.start_real, ["B"])


def test_kill_mid_batch(mesh_factory: MeshFactory) -> None:
    mesh = mesh_factory(["A", "B"], seed=8, options={"peer_timeout_s": 4.0})

    async def scenario() -> None:
        await asyncio.to_thread(mesh.start_real, ["B"])
        gate = mesh.root / "A-flood-gate"
        helper = Helper(mesh, "A", ["flood", "--to", "B", "--chunks", str(CHUNKS),
                                    "--chunk-size", str(CHUNK), "--tag", "mid",
                                    "--size", str(SIZE), "--flush-each", "--wait-connected",
                                    "--gate", str(gate), "--gate-before", str(GATE_BEFORE)])
        await asyncio.to_thread(helper.wait_event, "chunk-accepted", 60, 1)
        await _kill_b_while_receiving(mesh, "kill1")
        # The flood waited for B's restart, so most of it is still ahead when A is killed.
        gate.touch()
        # The sender, between or inside its one-transaction-per-chunk commits. B is stopped
        # before the last chunk A commits, so A's outbox holds messages B has not received:
        # however fast the link (a window holds 16,384 messages), B has a backlog to take in
        # when A comes back.
        await asyncio.to_thread(helper.wait_event, "chunk-accepted", 60, 4)
        mesh.sigstop("B")
        await asyncio.to_thread(helper.wait_event, "chunk-accepted", 60, 5)
        await sleep_random(mesh.rng, 0.0, 0.1)
        assert await asyncio.to_thread(helper.kill) == -9
        events = helper.events()
        assert not any(e["ev"] == "done" for e in events), "the flood ended before the kill"
        assert integrity(mesh.db("A")) == ["ok"]
        accepted = {e["k"] for e in events if e["ev"] == "chunk-accepted"}
        per_chunk = _check_sender_chunks(mesh, accepted)
        mesh.extra["chunks_acked"] = len(accepted)
        mesh.extra["chunks_in_outbox"] = len(per_chunk)
        mesh.extra.update(helper.ingest_chunks("B", "mid", CHUNK, SIZE))
        mesh.assert_no_receipt_without_commit("after kill -9 of A")
        # A comes back as a real node on the same store; B dies again while A's backlog flows.
        before = _rows_at_b(mesh)
        mesh.sigcont("B")
        await asyncio.to_thread(mesh.start_real, ["A"])
        await _kill_b_while_receiving(mesh, "kill2", before)
        counts = await mesh.finish()
        assert integrity(mesh.db("A")) == ["ok"] and integrity(mesh.db("B")) == ["ok"]
        assert counts.accepted == len(accepted) * CHUNK

    mesh.run(scenario)

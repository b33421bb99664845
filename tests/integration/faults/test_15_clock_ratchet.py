"""15. HLC ratchet: a raw peer K echoes R's own stamps back with the counter at 0xFFFF, as far
ahead as the forward bound allows, then restarts R on a store holding a stamp far beyond it
(issue 16, item 4).

Before the fix every such echo rolled R's clock one millisecond further (B ended 209 s ahead,
an answer sorted before its question), and `Node.start` restored the highest stored stamp
unchecked. Checked now: R's stamps stay within wall + bound + 1 ms, R counts the rejected
stamps, and after a restart on a poisoned store R stamps from its wall clock again.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
import zmq

from meshpost.clock import HLC_LOGICAL_MASK, HLC_MAX_FORWARD_DRIFT_MS, hlc_pack, hlc_unpack
from meshpost.protocol import PROTOCOL_VERSION, Batch, Envelope, Hello, ReceiptFrame, decode, encode
from meshpost.store.sqlite import content_checksum

from .checker import read_rows
from .conftest import MeshFactory

pytestmark = [pytest.mark.faults, pytest.mark.integration]

ECHOES = 3000


def _bound_ms() -> int:
    return time.time_ns() // 1_000_000 + HLC_MAX_FORWARD_DRIFT_MS


def _ratchet(endpoint: str) -> dict[str, Any]:
    """K says Hello, then sends a burst of one-message batches stamped with the counter at
    0xFFFF, each a millisecond after the last: the clock R would have after merging the one
    before (a stamp equal to R's own, already at the bound). Returns the receipts and how far
    ahead of the wall clock the highest stamp R sent back was."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTING_ID, b"K")  # what a meshpost before issue 16 required
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.connect(endpoint)
    try:
        sock.send(encode(Hello(version=PROTOCOL_VERSION, node_id="k-raw", name="K",
                               sent_at_ns=time.time_ns(), hlc=1)))
        assert sock.poll(10_000), "R did not answer K's Hello"
        sock.recv()
        start_ms = _bound_ms()
        for seq in range(1, ECHOES + 1):
            stamp = hlc_pack(start_ms + seq - 1, HLC_LOGICAL_MASK)
            sock.send(encode(Batch(tx_at_ns=time.time_ns(), messages=[
                Envelope(id=f"k-{seq}", seq=seq, sender="K", recipient="R", body="tick",
                         sent_at_ns=time.time_ns(), hlc=stamp)])))
        # R's receipts: how far its stamp was ahead of its own wall clock when it replied.
        # (Receipts beyond R's high-water mark for K are dropped: K reads only now.)
        ahead_ms = receipts = 0
        while receipts < ECHOES and sock.poll(5_000):
            frame = decode(sock.recv(), max_bytes=1 << 20)
            if isinstance(frame, ReceiptFrame):
                receipts += sum(hi - lo + 1 for lo, hi in frame.ranges)
                ahead_ms = max(ahead_ms, hlc_unpack(frame.hlc)[0] - frame.replied_at_ns // 10**6)
        return {"receipts": receipts, "max_ahead_ms": ahead_ms}
    finally:
        sock.close(0)
        ctx.term()


def _set_last_out_hlc(db: Path, hlc: int, where: int | None = None) -> int:
    """Set the stamp of R's newest outgoing row (or of the row stamped `where`), with its
    checksum, so the store is not corrupt, only ahead. Returns the stamp it had."""
    conn = sqlite3.connect(db)
    try:
        with conn:
            conn.create_function("mp_checksum", 7, content_checksum, deterministic=True)
            query = ("SELECT rowid, hlc FROM messages WHERE hlc = ?" if where is not None else
                     "SELECT rowid, hlc FROM messages WHERE direction = 'out'"
                     " ORDER BY rowid DESC LIMIT 1")
            rowid, old = conn.execute(query, () if where is None else (where,)).fetchone()
            conn.execute("UPDATE messages SET hlc = ? WHERE rowid = ?", (hlc, rowid))
            conn.execute("UPDATE messages SET checksum = mp_checksum(id, sender, recipient,"
                         " seq, body, sent_at_ns, hlc) WHERE rowid = ?", (rowid,))
    finally:
        conn.close()
    return int(old)


def test_the_hlc_bound_holds_against_echoes_and_restarts(mesh_factory: MeshFactory) -> None:
    mesh = mesh_factory(["S", "R", "K"], real=["R"], absent=["K"], seed=14)
    mesh.foreign_senders.add("K")

    async def scenario() -> None:
        await mesh.start()
        await mesh.stream("S", "R", 10, tag="before", concurrency=10)
        result = await asyncio.to_thread(_ratchet, mesh.endpoint("R"))
        stats = (await mesh.status("R"))["stats"]
        mesh.extra["echo_receipts"] = f"{result['receipts']}/{ECHOES}"
        mesh.extra["max_ahead_s"] = round(result["max_ahead_ms"] / 1000, 3)
        mesh.extra["hlc_rejected"] = stats.get("hlc_rejected", 0)
        # R's own stamps stay within wall + bound (+1 ms for one counter overflow).
        await mesh.send("R", "S", "after the echoes")
        [row] = [r for r in read_rows(mesh.data_dir("S")) if r.body == "after the echoes"]
        ahead_after_ms = hlc_unpack(row.hlc)[0] - row.sent_at_ns // 1_000_000
        mesh.extra["R_ahead_after_s"] = round(ahead_after_ms / 1000, 3)

        # A store poisoned with a stamp 150 s beyond the bound: R restarts from its wall clock.
        mesh.expected_down.add("R")
        await asyncio.to_thread(mesh.terminate, "R")
        poisoned = hlc_pack(_bound_ms() + 150_000, 7)
        original = _set_last_out_hlc(mesh.db("R"), poisoned)
        await asyncio.to_thread(mesh.start_real, ["R"])
        await mesh.send("R", "S", "after the restart")
        await asyncio.to_thread(mesh.terminate, "R")
        _set_last_out_hlc(mesh.db("R"), original, where=poisoned)  # S's copy matches again
        await asyncio.to_thread(mesh.start_real, ["R"])
        mesh.expected_down.discard("R")
        [row] = [r for r in read_rows(mesh.data_dir("S")) if r.body == "after the restart"]
        restart_ahead_ms = hlc_unpack(row.hlc)[0] - row.sent_at_ns // 1_000_000
        mesh.extra["R_ahead_after_restart_s"] = round(restart_ahead_ms / 1000, 3)
        counts = await mesh.finish()
        stored_from_k = [r for r in read_rows(mesh.data_dir("R")) if r.sender == "K"]
        assert len(stored_from_k) == ECHOES  # rejected stamps lose no message
        assert result["receipts"] > 0
        assert result["max_ahead_ms"] <= HLC_MAX_FORWARD_DRIFT_MS + 1_000, result
        assert ahead_after_ms <= HLC_MAX_FORWARD_DRIFT_MS + 1_000
        assert mesh.extra["hlc_rejected"] > 0
        assert restart_ahead_ms < HLC_MAX_FORWARD_DRIFT_MS, "R restored a stamp beyond the bound"
        assert "beyond the wall clock" in mesh.log_text("R")
        assert counts.accepted == counts.receipted == counts.attempted

    mesh.run(scenario)

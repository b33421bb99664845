"""7. Flood a stopped receiver past every high-water mark (the link window of 4096 messages in
memory, the writer's 50,000 pending rows, ZeroMQ's send queue): every send is accepted into
the durable outbox or refused with a clear error, and the sender's memory stays bounded.

The sender is a helper process embedding a Node (so its RSS is its own), flooding through
`post_many()` in 6,000-message chunks without waiting for commits in between; B is stopped
(SIGSTOP) after the link is up. Then A runs as a real `meshpost node` on the same store,
B resumes, and everything drains.
"""

from __future__ import annotations

import asyncio

import pytest

from .checker import Helper
from .conftest import MeshFactory

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.timeout(300)]

CHUNKS = 10
CHUNK = 6000
SIZE = 60
#: Generous: 60,000 queued 60-byte messages need well under this; a leak of the whole flood
#: (envelopes, futures, frames kept per message) would not.
RSS_BOUND = 200 * 1024 * 1024


def test_flood_into_stopped_receiver(mesh_factory: MeshFactory) -> None:
    # The default peer timeout: the drain of 60,000 messages must not depend on a 1.5 s one.
    mesh = mesh_factory(["A", "B"], seed=7, options={"peer_timeout_s": 4.0})

    async def scenario() -> None:
        await asyncio.to_thread(mesh.start_real, ["B"])
        helper = Helper(mesh, "A", ["flood", "--to", "B", "--chunks", str(CHUNKS),
                                    "--chunk-size", str(CHUNK), "--tag", "flood",
                                    "--size", str(SIZE), "--invalid", "--wait-connected",
                                    "--delay", "0.5"])
        await asyncio.to_thread(helper.wait_event, "connected")
        mesh.sigstop("B")
        assert await asyncio.to_thread(helper.wait, 120) == 0, helper.log_tail()
        events = helper.events()
        start = next(e for e in events if e["ev"] == "start")
        done = next(e for e in events if e["ev"] == "done")
        refused = [e for e in events if e["ev"] == "refused"]
        assert not [e for e in events if e["ev"] == "accepted-invalid"]
        assert {e["why"] for e in refused} == {"empty", "blank", "too large"}
        for e in refused:
            assert e["error"].split(":")[0] in ("EmptyMessage", "MessageTooLarge"), e
            (a,) = mesh.ledger.attempt("A", ["B"], f"<invalid: {e['why']}>")
            a.refuse(e["error"])
        mesh.extra.update(helper.ingest_chunks("B", "flood", CHUNK, SIZE))
        growth = done["peak"] - start["rss"]
        mesh.extra["rss_start_mb"] = round(start["rss"] / 2**20, 1)
        mesh.extra["rss_peak_mb"] = round(done["peak"] / 2**20, 1)
        mesh.extra["pending_at_end"] = done["pending"]
        mesh.extra["dropped_sends"] = done["stats"]["dropped_sends"]
        assert growth < RSS_BOUND, f"sender RSS grew by {growth / 2**20:.0f} MiB"
        assert done["pending"] >= CHUNKS * CHUNK - 4096  # B stopped: at most a window got out
        mesh.assert_no_receipt_without_commit("after the flood")
        counts = await mesh.finish()  # starts A as a real node, resumes B, drains 60,000
        assert counts.accepted == CHUNKS * CHUNK
        assert counts.refused == 3

    mesh.run(scenario)

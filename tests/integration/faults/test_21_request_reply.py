"""21. Request/reply across kill -9 of the replier (seed 000's echo, issue 18): Q sends requests
to R (`--echo`) through its control endpoint (`meshpost request`), five at a time; R is killed
-9 twice mid-stream and restarted. The checker's reply rules judge the stores: every request R
stored has exactly one reply, under the derived id, stored on both ends, and every reply the
observer was shown is stored on both ends.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from .conftest import MeshFactory

pytestmark = [pytest.mark.faults, pytest.mark.integration]

REQUESTS = 80
KILLS = 2


def test_request_reply_across_kills_of_the_replier(mesh_factory: MeshFactory) -> None:
    mesh = mesh_factory(["Q", "R"], node_args={"R": ("--echo",)}, seed=21)
    mesh.ledger.repliers = {"R"}

    async def stream() -> None:
        for start in range(0, REQUESTS, 5):
            await asyncio.gather(*(mesh.request("Q", "R", f"ping {i}", timeout_s=3.0)
                                   for i in range(start, min(REQUESTS, start + 5))))

    async def scenario() -> None:
        await mesh.start()
        await mesh.wait_connected("Q")
        requests = mesh.spawn_task(stream())
        for kill in range(KILLS):
            deadline = time.monotonic() + 60
            while len(mesh.ledger.replies) < (kill + 1) * REQUESTS // (KILLS + 2):
                assert time.monotonic() < deadline, "replies stopped coming"
                await asyncio.sleep(0.02)
            assert await asyncio.to_thread(mesh.kill, "R") == -9
            mesh.assert_no_receipt_without_commit(f"after kill -9 {kill + 1} of R")
            await asyncio.sleep(0.3)
            await asyncio.to_thread(mesh.start_real, ["R"])
        await requests
        mesh.extra["kills"] = KILLS
        mesh.extra["answered_in_time"] = len(mesh.ledger.replies)
        counts = await mesh.finish()
        assert counts.attempted == REQUESTS
        # Every request stored at R has its one reply (the repliers rule), and so many were.
        assert counts.patterns["replies"] == counts.stored

    mesh.run(scenario)

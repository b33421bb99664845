"""2. kill -9 the receiver ten times at random moments during a stream; restart it each time."""

from __future__ import annotations

import asyncio

import pytest

from .checker import sleep_random
from .conftest import MeshFactory

pytestmark = [pytest.mark.faults, pytest.mark.integration]

KILLS = 10
MESSAGES = 2000


def test_kill_receiver_during_stream(mesh_factory: MeshFactory) -> None:
    # S is an in-process sender (fast, sees every receipt); R is the real process we kill.
    mesh = mesh_factory(["S", "R"], real=["R"], seed=2)

    async def scenario() -> None:
        await mesh.start()
        stream = mesh.spawn_task(
            mesh.stream("S", "R", MESSAGES, tag="S>R", concurrency=25, pause_s=0.02)
        )
        codes = []
        for _ in range(KILLS):
            await sleep_random(mesh.rng, 0.05, 0.6)
            codes.append(await asyncio.to_thread(mesh.kill, "R"))
            mesh.assert_no_receipt_without_commit("after kill -9 of R")
            await asyncio.to_thread(mesh.start_real, ["R"])
        await stream
        mesh.extra["kills"] = len(codes)
        assert codes == [-9] * KILLS
        counts = await mesh.finish()
        assert counts.accepted == MESSAGES

    mesh.run(scenario)

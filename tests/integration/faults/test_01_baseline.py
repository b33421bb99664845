"""1. Baseline: four real nodes, every pair in both directions plus a broadcast from each."""

from __future__ import annotations

import asyncio

import pytest

from .checker import make_body
from .conftest import MeshFactory

pytestmark = [pytest.mark.faults, pytest.mark.integration]

PER_PAIR = 5


def test_baseline_all_pairs_and_broadcast(mesh_factory: MeshFactory) -> None:
    mesh = mesh_factory(list("ABCD"))

    async def scenario() -> None:
        await mesh.start()
        sends = []
        for sender in mesh.names:
            for receiver in mesh.names:
                if receiver != sender:
                    sends += [mesh.send(sender, receiver,
                                        make_body(mesh.rng, f"{sender}>{receiver}", i))
                              for i in range(PER_PAIR)]
            sends.append(mesh.send(sender, "all", make_body(mesh.rng, f"{sender}>all", 0)))
        await asyncio.gather(*sends)
        counts = await mesh.finish()
        # Fault-free: every send acknowledged and receipted within its timeout.
        assert counts.attempted == 4 * 3 * (PER_PAIR + 1)
        assert counts.accepted == counts.receipted == counts.stored == counts.attempted
        assert sum(counts.order_breaks.values()) == 0

    mesh.run(scenario)

"""4. SIGSTOP a peer past the retransmission, peer and ZeroMQ heartbeat timeouts, then SIGCONT:
nothing lost; while the peer shows as gone the sender keeps its outbox."""

from __future__ import annotations

import asyncio
import time

import pytest

from .checker import FAST_OPTIONS, make_body
from .conftest import MeshFactory

pytestmark = [pytest.mark.faults, pytest.mark.integration]

#: Longer than peer_timeout_s (1.5), retransmit_max_s (1.0) and ZeroMQ's 3 s heartbeat timeout.
STOP_S = 4.0


def test_sigstop_receiver(mesh_factory: MeshFactory) -> None:
    mesh = mesh_factory(["S", "R"], real=["R"], seed=4)

    async def scenario() -> None:
        await mesh.start()
        sender = mesh.inproc["S"]
        stream = mesh.spawn_task(
            mesh.stream("S", "R", 1000, tag="S>R", concurrency=10, pause_s=0.08)
        )
        for round_ in range(2):
            await asyncio.sleep(0.4)
            mesh.sigstop("R")
            stopped_at = time.monotonic()
            await mesh.stream("S", "R", 20, tag=f"S>R-stopped{round_}")
            # R's own sends hang while it is stopped; they complete after SIGCONT.
            for i in range(3):
                mesh.spawn_task(mesh.send("R", "S", make_body(mesh.rng, f"R>S{round_}", i),
                                          receipt_timeout_s=20.0))
            gone_after = None
            while time.monotonic() - stopped_at < STOP_S:
                if gone_after is None and not any(p.connected for p in sender.peers()):
                    gone_after = time.monotonic() - stopped_at
                await asyncio.sleep(0.05)
            assert gone_after is not None, "S never noticed that R went silent"
            assert gone_after >= FAST_OPTIONS["peer_timeout_s"] * 0.9
            pending = await sender.pending_count()
            assert pending > 0, "outbox emptied while the receiver was stopped"
            mesh.extra[f"stop{round_}_gone_after_s"] = round(gone_after, 2)
            mesh.extra[f"stop{round_}_pending"] = pending
            mesh.assert_no_receipt_without_commit("while R is stopped")
            mesh.sigcont("R")
        await stream
        counts = await mesh.finish()
        unsure = {a.error for a in mesh.ledger.attempts.values() if a.outcome != "accepted"}
        # A control request to the stopped node may time out on the observer's side (its
        # outcome is then "uncertain"); the drain and the five zero counts decide loss.
        assert counts.refused == 0 and counts.attempted == 1046, unsure
        assert counts.accepted + counts.uncertain == counts.attempted, unsure
        assert counts.receipted >= counts.accepted

    mesh.run(scenario)

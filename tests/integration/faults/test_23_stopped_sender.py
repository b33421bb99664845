"""23. SIGSTOP the *sender* past the peer timeout while the receiver answers: on SIGCONT the
sender's silence timer fires before its socket is read, yet the receiver is not declared lost.

S (a real process) streams to R; three times S is stopped for the peer timeout plus 1.5 s
while R stores what S sent and receipts it. R's receipts wait in S's socket. A node that
found R lost on waking redialled it (a second session at R: `name_claims`) and resent its whole
window on the new connection; a starved process (valgrind, a loaded machine) did that again
and again. The dialer now excuses a silence deadline polled long after it passed, once per
silence (`DialerLink.stalls_excused`).
"""

from __future__ import annotations

import asyncio

import pytest

from .checker import FAST_OPTIONS
from .conftest import MeshFactory

pytestmark = [pytest.mark.faults, pytest.mark.integration]

MESSAGES = 300
STOPS = 3


def test_a_stopped_sender_does_not_find_its_live_receiver_lost(mesh_factory: MeshFactory) -> None:
    mesh = mesh_factory(["S", "R"], real=["S"], seed=23)
    stop_s = FAST_OPTIONS["peer_timeout_s"] + 1.5

    async def scenario() -> None:
        await mesh.start()
        await mesh.wait_connected("S")
        receiver = mesh.inproc["R"]
        stream = mesh.spawn_task(
            mesh.stream("S", "R", MESSAGES, tag="S>R", concurrency=10, pause_s=0.02,
                        receipt_timeout_s=30.0)
        )
        for _ in range(STOPS):
            await asyncio.sleep(0.5)  # S streams, R receipts
            mesh.sigstop("S")
            await asyncio.sleep(stop_s)  # R stores and receipts what was in flight meanwhile
            mesh.sigcont("S")
        await stream
        lost = mesh.log_text("S").count("lost R")
        mesh.extra["lost_R_at_S"] = lost
        mesh.extra["sessions_claimed_at_R"] = receiver.stats.name_claims
        counts = await mesh.finish()
        assert counts.accepted == counts.attempted == MESSAGES
        assert counts.receipted == counts.attempted
        assert lost == 0, "S found R lost after its own stop"
        assert receiver.stats.name_claims == 0, "S redialled R: a second session"

    mesh.run(scenario)

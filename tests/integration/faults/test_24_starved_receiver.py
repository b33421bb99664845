"""24. A *receiver* starved so hard that it sends nothing for longer than the peer timeout,
again and again, while its sender posts as fast as the link takes: no retransmission storm.

R (a real process) is stopped most of the time (SIGSTOP for the peer timeout plus 0.5 s, then
SIGCONT for 0.5 s, CYCLES times) while S (in-process) posts MESSAGES through `post_many`. S finds
R lost after every stop. Before, S resent its whole window at every retransmission timeout
after the first probe and again at every Welcome after a loss, while R still held the first
copies unread in its socket: 36,000-180,000 retransmissions for 12,000 messages (R stored
every copy's message once, but read them all). Now a timeout into silence probes, then resends
only the loss window of the oldest batch; a Welcome after a loss probes and R's Pong says what
it still lacks (counting the pending batches of the session the new one superseded, and
bringing the answers it sent on the closed connection).

What the protocol cannot save is what the node throws away: a redial (a new connection,
`transport.redial`) discards the frames still queued on the old one, and those must go again.
The node redials only a link still lost, its connection silent, a peer timeout after its loss
(`RedialWanted`), which R, answering its Hello within that time once it runs, never is.
`keep_connection` runs S with the redial disabled altogether (8 retransmissions, against
24,000 with the old protocol); `False` is the node as it is (8; 12,000-28,000 when it redialled
at every loss, discarding the window S had queued, once per redial).
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from .checker import FAST_OPTIONS, make_body
from .conftest import MeshFactory, until_true

pytestmark = [pytest.mark.faults, pytest.mark.integration]

MESSAGES = 12_000
CHUNK = 500
#: R's duty cycle: stopped for longer than the peer timeout, then running briefly. S finds R
#: lost 1.5 s into each stop and would redial 1.5 s later (3.0 s in) if it heard nothing by
#: then: R's running slot (2.0-2.5 s in) is its one chance to answer before that deadline. At
#: 0.1 s a loaded machine (load 6-7 on 2 cores) sometimes did not schedule R within the slot, S
#: rightly redialled a peer that never answered, and the redial's discarded queue went again
#: (2,548 retransmissions in one full-suite run): the case under test is a receiver that runs
#: and answers late, not one that never runs.
STOPPED_S = FAST_OPTIONS["peer_timeout_s"] + 0.5
RUNNING_S = 0.5
#: Three stops (six until 2026-12-06: 15 s a case): each one costs the old code thousands of
#: retransmissions, so three still fail it by far against the bound of 120. Measured with 3:
#: the old protocol (a7f955f~1) 24,000 retransmissions in [True], the node redialling at
#: every loss (493dbc4~1) 9,460 in [False]; today's code 8 and 12.
CYCLES = 3


@pytest.mark.parametrize("keep_connection", [True, False])
def test_a_starved_receiver_causes_no_retransmission_storm(
    mesh_factory: MeshFactory, keep_connection: bool, caplog: pytest.LogCaptureFixture
) -> None:
    mesh = mesh_factory(["S", "R"], real=["R"], seed=24)
    caplog.set_level(logging.WARNING, logger="meshpost")

    async def scenario() -> None:
        await mesh.start()
        sender = mesh.inproc["S"]
        if keep_connection:
            transport = sender._transport
            assert transport is not None
            transport.redial = lambda peer: None  # type: ignore[method-assign]
        await until_true("S connected to R", lambda: all(p.connected for p in sender.peers()),
                         30.0)

        async def post_all() -> None:
            for start in range(0, MESSAGES, CHUNK):
                bodies = [make_body(mesh.rng, "S>R", i) for i in range(start, start + CHUNK)]
                attempts = [mesh.ledger.attempt("S", ["R"], b)[0] for b in bodies]
                await sender.post_many("R", bodies)
                for a in attempts:
                    a.accept()
                await asyncio.sleep(0)

        posting = mesh.spawn_task(post_all())
        for _ in range(CYCLES):
            mesh.sigstop("R")
            await asyncio.sleep(STOPPED_S)
            mesh.sigcont("R")
            await asyncio.sleep(RUNNING_S)
        await posting
        await until_true("S's outbox drained", lambda: mesh.pending().get("S", 1) == 0, 60.0)
        received = (await mesh.status("R"))["stats"]
        stats = sender.snapshot_stats()
        mesh.extra["lost_R_at_S"] = sum("lost R" in r.getMessage() for r in caplog.records)
        mesh.extra["retransmissions"] = stats.retransmissions
        mesh.extra["duplicates_at_R"] = received["duplicates"]
        counts = await mesh.finish()
        assert counts.accepted == counts.attempted == MESSAGES
        assert mesh.extra["lost_R_at_S"] >= 1, "R was never silent past the peer timeout"
        assert stats.retransmissions < MESSAGES // 100, (
            f"{stats.retransmissions} retransmissions for {MESSAGES} messages")
        assert received["duplicates"] < MESSAGES // 100

    mesh.run(scenario)

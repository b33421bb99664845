"""14. Name borrowing: while A -> B flows, an intruder connects to B with routing id b"A" and
says Hello as A (issue 16, item 1).

Before the fix B's ROUTER had ROUTER_HANDOVER and keyed links by the routing id the peer
chose, so the intruder took A's connection over before meshpost saw a frame: A's receipts went
to the intruder and A -> B delivered nothing until long after the intruder left. Checked now:
every message A sends while the intruder is connected is stored and receipted, and B logs and
counts the second claim of A's name (`name_claims`).
"""

from __future__ import annotations

import asyncio
import time

import pytest
import zmq

from meshpost.protocol import PROTOCOL_VERSION, Hello, Ping, encode

from .conftest import MeshFactory

pytestmark = [pytest.mark.faults, pytest.mark.integration]

DURING = 40
#: A's sends must be receipted well within this (the protocol's peer timeout is far shorter).
RECEIPT_TIMEOUT_S = 10.0


def _intrude(endpoint: str) -> zmq.Socket[bytes]:
    """A raw DEALER named b"A" that says Hello as A and then never reads again."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTING_ID, b"A")
    sock.connect(endpoint)
    sock.send(encode(Hello(version=PROTOCOL_VERSION, node_id="intruder", name="A",
                           sent_at_ns=time.time_ns(), hlc=1)))
    sock.send(encode(Ping(sent_at_ns=time.time_ns())))
    return sock


def test_a_borrowed_name_does_not_take_the_peers_connection(mesh_factory: MeshFactory) -> None:
    mesh = mesh_factory(["A", "B"], transport="tcp", seed=13)

    async def scenario() -> None:
        await mesh.start()
        await mesh.stream("A", "B", 10, tag="before", concurrency=10)
        intruder = await asyncio.to_thread(_intrude, mesh.endpoint("B"))
        mesh.cleanups.append(lambda: intruder.close(0))
        # The intruder's Hello reaches B before A's next batches (B answers it).
        assert await asyncio.to_thread(intruder.poll, 10_000), "B never answered the intruder"
        first = len(mesh.ledger)
        await mesh.stream("A", "B", DURING, tag="during", concurrency=10,
                          receipt_timeout_s=RECEIPT_TIMEOUT_S)
        during = list(mesh.ledger.attempts.values())[first:]
        receipted = sum(a.receipted for a in during)
        status = await mesh.status("B")
        mesh.extra["receipted_while_borrowed"] = f"{receipted}/{DURING}"
        mesh.extra["name_claims_at_B"] = status["stats"].get("name_claims", 0)
        intruder.close(0)
        counts = await mesh.finish()
        assert receipted == DURING, f"only {receipted}/{DURING} receipted while A was borrowed"
        assert mesh.extra["name_claims_at_B"] >= 1
        assert "borrowing the name" in mesh.log_text("B")
        assert counts.accepted == counts.receipted == counts.stored == counts.attempted

    mesh.run(scenario)

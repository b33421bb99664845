"""A stranger claiming A's name *and* node id, against a real `meshpost node` B: its receipts
must never settle A's messages (docs/reliability.md, "Hostile peers and careless operators").

A (in-process) dials B through a fault proxy; the stranger is a raw pyzmq DEALER on B. The
proxy holds A's batch and drops it with A's old connection, so B never reads A's messages at
their first go; A redials. B is stopped while A's new Hellos and the stranger's own batch at
A's in-flight seqs wait in its socket, then resumed. Before resume tokens, A's new session
superseded the stranger's, the stranger's Receipt was forwarded to A, and A marked its
messages delivered though B never stored them ("receipted, not stored": 7 of 9 runs on the old
code; the others had B read and answer the stranger's batch before A's Hello, which B's ROUTER
decides). Now only a Hello with the token of a session's Welcome continues that session, so
the stranger's answers never reach A, whatever the order (5 of 5 runs).
"""

from __future__ import annotations

import random
import time

import pytest
import zmq

from meshpost.cluster import free_tcp_ports
from meshpost.protocol import PROTOCOL_VERSION, Batch, Envelope, Hello, Welcome, decode, encode
from tests.integration.faults.checker import make_body
from tests.integration.faults.proxy import FaultProxy

from .conftest import MeshFactory, until_true

pytestmark = [pytest.mark.faults, pytest.mark.integration]

SENDS = 3


def _port(endpoint: str) -> int:
    return int(endpoint.rsplit(":", 1)[1])


def test_a_strangers_receipts_never_settle_the_messages_of_the_peer_it_claims_to_be(
    mesh_factory: MeshFactory,
) -> None:
    (to_b,) = free_tcp_ports(1)
    mesh = mesh_factory(["A", "B"], real=["B"], transport="tcp", seed=32,
                        connect={"B": f"tcp://127.0.0.1:{to_b}"})

    async def scenario() -> None:
        proxy = FaultProxy(to_b, _port(mesh.endpoint("B")), random.Random(32))
        await proxy.start()
        mesh.healers.append(proxy.heal)
        ctx = zmq.Context()
        stranger = ctx.socket(zmq.DEALER)
        stranger.setsockopt(zmq.LINGER, 0)
        try:
            await mesh.start()
            await mesh.stream("A", "B", 10, tag="before", concurrency=10)
            node_id = mesh.inproc["A"].node_id
            stranger.connect(mesh.endpoint("B"))  # straight to B, not through the proxy
            stranger.send(encode(Hello(version=PROTOCOL_VERSION, node_id=node_id, name="A",
                                       sent_at_ns=time.time_ns(), hlc=1)))
            assert stranger.poll(10_000), "B never answered the stranger's Hello"
            assert isinstance(decode(stranger.recv(), max_bytes=1 << 20), Welcome)

            transport = mesh.inproc["A"]._transport
            redials = transport.redials
            proxy.set("blackhole")  # A's batch is held, then dropped with its connection
            first = len(mesh.ledger)
            for i in range(SENDS):
                await mesh.send("A", "B", make_body(mesh.rng, "during", i),
                                receipt_timeout_s=60.0)
            during = list(mesh.ledger.attempts.values())[first:]
            seqs = sorted(a.seq for a in during if a.seq is not None)
            assert len(seqs) == SENDS
            await until_true("A redialled B", lambda: transport.redials > redials, 30)
            proxy.set("reset")  # the held batch goes with A's old connection
            mesh.sigstop("B")
            sent = proxy.stats.bytes
            proxy.heal()
            # A's new connection reaches B's socket while B is stopped (its Hellos go once B
            # runs and answers the ZMTP greeting), as does the stranger's batch.
            await until_true("A's new connection reached B", lambda: proxy.stats.bytes > sent,
                             30)
            now = time.time_ns()
            stranger.send(encode(Batch(now, [
                Envelope(f"forged-{s}", s, "A", "B", "the stranger's own", now, 1)
                for s in seqs])))
            mesh.sigcont("B")
            await until_true("A's messages receipted",
                             lambda: all(a.receipted for a in during), 60)
            counts = await mesh.finish(assert_clean=False)
            # The checker: every message A counts delivered is stored at B, once. (The
            # stranger's three are stored too, as A's "phantoms": B cannot tell them apart
            # from A's without keys, and they took nothing from A.)
            assert (counts.lost, counts.missing, counts.duplicated) == (0, 0, 0), (
                counts.line() + "\n" + "\n".join(counts.problems))
            assert counts.stored == counts.attempted == counts.receipted
            assert counts.phantom == SENDS
            mesh.extra["receipted"] = f"{sum(a.receipted for a in during)}/{len(during)}"
        finally:
            stranger.close(0)
            ctx.term()
            await proxy.close()

    mesh.run(scenario)

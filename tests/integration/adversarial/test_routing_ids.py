"""A peer that names its connections after the routing ids a ROUTER would generate cannot
abort the node (transport/routing_ids.py).

libzmq 4.3.5 names a connection that brings no routing id `0x00` + a counter starting at the C
library's unseeded `rand()`: the same values in every process. A peer may choose its own
routing id, and the ROUTER never checks a generated one against those: a peer holding the
counter's next value made the next ordinary connection abort the whole node (libzmq's
assertion). The node now seeds `rand()` from the OS before each ROUTER it makes.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from typing import Any

import pytest
import zmq

from meshpost.protocol import Ping, Refuse, RefuseCode, decode, encode

from .conftest import MeshFactory

pytestmark = [pytest.mark.faults, pytest.mark.integration]

#: ROUTERs whose unseeded starts the squatter covers (a node process makes two or three: its
#: control socket's, its transport's, ...), and the generated ids after each start it holds.
STARTS, AHEAD = 8, 4
#: Ordinary connections after the squatters: the first would have hit a squatted id.
ORDINARY = 6
ANSWER_WAIT_MS = 10_000

#: What libzmq computes for each new ROUTER's first generated id (`generate_random`: two
#: `rand()` calls, the second's low bit on top), in a process that never seeded `rand()`.
_UNSEEDED = """
import ctypes
rand = ctypes.CDLL(None).rand
for _ in range({count}):
    low, high = rand(), rand()
    print((low | (high << 31)) & 0xFFFFFFFF)
"""


def unseeded_starts(count: int) -> list[int]:
    """The first generated routing id of each of a fresh process's first `count` ROUTERs, had
    nobody seeded the C library's `rand()`: any peer can compute these."""
    out = subprocess.run([sys.executable, "-c", _UNSEEDED.format(count=count)],
                         capture_output=True, text=True, check=True, timeout=30)
    return [int(line) for line in out.stdout.split()]


def _answer(sock: zmq.Socket[bytes]) -> Any:
    if not sock.poll(ANSWER_WAIT_MS):
        return None
    return decode(sock.recv(), max_bytes=1 << 20)


def test_unseeded_starts_are_libzmqs() -> None:
    """The harness's arithmetic is libzmq's: an unseeded process's first two ROUTERs name their
    first connections so (pyzmq's bundled libzmq, seen in every process before the fix)."""
    assert [f"{s:08x}" for s in unseeded_starts(2)] == ["6b8b4567", "e43c9869"]


def test_a_peer_squatting_the_routing_ids_libzmq_would_generate_cannot_abort_the_node(
    mesh_factory: MeshFactory,
) -> None:
    """The squatter opens STARTS x AHEAD connections, each named after a routing id an unseeded
    ROUTER would generate next, and has each taken (its Ping answered); then ORDINARY plain
    connections come. Before the fix the first of them aborted B (no answer, B's process
    gone); now each is answered and B stays up."""
    mesh = mesh_factory(["A", "B"], real=["B"], absent=["A"], seed=41)
    ids = [b"\x00" + ((start + k) & 0xFFFFFFFF).to_bytes(4, "big")
           for start in unseeded_starts(STARTS) for k in range(AHEAD)]

    async def scenario() -> None:
        await mesh.start()
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        mesh.cleanups.append(lambda: ctx.destroy(0))

        def connect(routing_id: bytes | None) -> zmq.Socket[bytes]:
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            if routing_id is not None:
                sock.setsockopt(zmq.ROUTING_ID, routing_id)
            sock.connect(mesh.endpoint("B"))
            sock.send(encode(Ping(sent_at_ns=time.time_ns())))
            return sock

        def answered(sockets: list[zmq.Socket[bytes]]) -> list[Any]:
            return [_answer(sock) for sock in sockets]

        squatters = [connect(rid) for rid in ids]
        taken = await asyncio.to_thread(answered, squatters)
        assert all(isinstance(a, Refuse) and a.code == RefuseCode.HELLO_REQUIRED
                   for a in taken), taken[:3]
        ordinary = [connect(None) for _ in range(ORDINARY)]
        answers = await asyncio.to_thread(answered, ordinary)
        mesh.extra.update(squatted=len(ids), answered=sum(a is not None for a in answers),
                          alive=mesh.alive("B"))
        assert mesh.alive("B"), "B's process ended (libzmq's routing-id assertion)"
        assert all(isinstance(a, Refuse) and a.code == RefuseCode.HELLO_REQUIRED
                   for a in answers), answers
        for sock in squatters + ordinary:
            sock.close(0)
        await mesh.finish()

    mesh.run(scenario)

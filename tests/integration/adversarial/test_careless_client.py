"""A careless (or hostile) local client of a real node's control endpoint: every request it
sends gets one clear answer at once, and the node keeps serving its peers.

The requests are raw msgpack maps, as a script of the user's own would send them (the CLI
checks its arguments before they reach the socket; the control protocol must not rely on it).
"""

from __future__ import annotations

import time
from typing import Any

import msgspec
import pytest
import zmq

from meshpost.control import ENDPOINT_FILE

from .conftest import MeshFactory

pytestmark = [pytest.mark.faults, pytest.mark.integration]

#: A node answers a bad request at once; a wait of NaN seconds used to go unanswered.
ANSWER_TIMEOUT_S = 5.0

BAD_REQUESTS: list[dict[str, Any]] = [
    {"type": "tail", "after": 0, "limit": 5, "wait_s": float("nan")},
    {"type": "tail", "after": 2**63, "limit": 5, "wait_s": 0.0},
    {"type": "request", "to": "B", "body": "are you there", "timeout_s": float("nan")},
    {"type": "send", "target": "B", "body": "when?", "timeout_s": float("nan")},
    {"type": "send", "target": "B", "body": "before I asked", "timeout_s": -1.0},
    {"type": "events", "wait_s": float("inf")},
    {"type": "group-history", "group": "g", "limit": 10, "before_hlc": 0,
     "wait_s": float("nan")},
    {"type": "broadcast-status", "logical_id": "x", "seen": 2**64 - 1, "wait_s": 1.0},
]


def _ask(endpoint: str, request: dict[str, Any]) -> Any:
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        sock.send(msgspec.msgpack.encode(request))
        if not sock.poll(int(ANSWER_TIMEOUT_S * 1000)):
            return None
        return msgspec.msgpack.decode(sock.recv())
    finally:
        sock.close(0)


def test_a_wait_that_is_no_number_of_seconds_is_a_bad_request_answered_at_once(
    mesh_factory: MeshFactory,
) -> None:
    mesh = mesh_factory(["A", "B"], seed=27)

    async def scenario() -> None:
        await mesh.start()
        await mesh.wait_connected("A")
        endpoint = (mesh.data_dir("A") / ENDPOINT_FILE).read_text(encoding="utf-8").split()[0]
        unanswered, answers = [], []
        for i, request in enumerate(BAD_REQUESTS, start=1):
            reply = _ask(endpoint, {**request, "id": i})
            if reply is None:
                unanswered.append(request)
            else:
                answers.append((request, reply))
        assert not unanswered, f"no answer within {ANSWER_TIMEOUT_S} s to {unanswered}"
        bad_request = ("error", "bad_request", 2)
        wrong = [(q, r) for q, r in answers
                 if (r.get("type"), r.get("kind"), r.get("exit_code")) != bad_request]
        assert not wrong, wrong
        # Each error carries its request's id: until 2026-12-06 it was 0, so a client that
        # matches replies by id (docs/protocol.md 14.2) dropped it and timed out.
        assert [r["id"] for _q, r in answers] == list(range(1, len(BAD_REQUESTS) + 1))
        # The node goes on serving: its peer's messages and its own sends.
        started = time.monotonic()
        await mesh.stream("A", "B", 10, tag="after", concurrency=5)
        await mesh.stream("B", "A", 10, tag="after", concurrency=5)
        mesh.extra["streams_s"] = round(time.monotonic() - started, 2)
        log = mesh.log_text("A")
        assert "Traceback" not in log and " ERROR " not in log, mesh.log_tail("A", 40)
        counts = await mesh.finish()
        assert counts.accepted == counts.receipted == counts.stored == counts.attempted == 20

    mesh.run(scenario)

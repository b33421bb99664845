"""17. A hostile listener answers with out-of-range receipts while 20 sends run at once.

A raw pyzmq ROUTER stands where A's peer B should be. It welcomes A and records every message
A sends (its "store": by id, so a retransmission is kept once), but answers each batch with a
receipt one of whose integers is 2**64 - 1 (`stored_at_ns`, `received_at_ns`, `hlc`, ...), in
turn; SQLite cannot bind such a value. Before decode-time range checks one such receipt made
A's group commit fail as a whole: sends in the same commit were never stored ("not running")
and delivered messages stayed pending. Checked: every hostile receipt is rejected at decode
and counted (`undecodable`); all 20 sends are accepted, each stored once at A and never marked
delivered by a hostile receipt; A stays up with no traceback or error in its log; once the
listener answers honestly, every message is delivered: 0 lost, each stored once on each side.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from typing import Any

import pytest
import zmq

from meshpost.protocol import (
    PROTOCOL_VERSION,
    Batch,
    Envelope,
    Hello,
    Ping,
    Pong,
    ReceiptFrame,
    Welcome,
    decode,
    encode,
    to_ranges,
)

from .checker import Counts, read_rows, report
from .conftest import MeshFactory

pytestmark = [pytest.mark.faults, pytest.mark.integration]

SENDS = 20
HOSTILE = 2**64 - 1
#: The receipt fields made hostile, one per batch in turn.
FIELDS = ("stored_at_ns", "received_at_ns", "hlc", "replied_at_ns", "echo_tx_at_ns", "ranges")
DRAIN_TIMEOUT_S = 60.0


class FakeListener:
    """B's place in the mesh: welcomes A, keeps what it sends, answers as told."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.hostile = True
        self.stored: dict[str, Envelope] = {}
        self.arrivals: Counter[str] = Counter()
        self.hostile_sent = 0
        self.honest_sent = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fake-B", daemon=True)

    def __enter__(self) -> FakeListener:
        self._thread.start()
        assert self._ready.wait(10), "fake listener did not bind"
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _receipt(self, batch: Batch) -> ReceiptFrame:
        now = time.time_ns()
        fields: dict[str, Any] = {
            "ranges": to_ranges([m.seq for m in batch.messages]), "echo_tx_at_ns": batch.tx_at_ns,
            "received_at_ns": now, "stored_at_ns": now, "replied_at_ns": now, "hlc": now,
            "sync": "full",
        }
        if self.hostile:
            field = FIELDS[self.hostile_sent % len(FIELDS)]
            fields[field] = [(batch.messages[0].seq, HOSTILE)] if field == "ranges" else HOSTILE
            self.hostile_sent += 1
        else:
            self.honest_sent += 1
        return ReceiptFrame(**fields)

    def _answer(self, frame: Any) -> Any:
        now = time.time_ns()
        match frame:
            case Hello():
                return Welcome(PROTOCOL_VERSION, "fake-b-node-id", "B", now, now, "full")
            case Ping(sent_at_ns=t1):
                return Pong(t1, now, now)
            case Batch(messages=messages):
                for m in messages:
                    self.arrivals[m.id] += 1
                    kept = self.stored.setdefault(m.id, m)
                    if kept != m:
                        self.errors.append(f"{m.id}: a different message under the same id")
                return self._receipt(frame)
            case _:
                return None

    def _run(self) -> None:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.bind(self.endpoint)
            self._ready.set()
            while not self._stop.is_set():
                if not sock.poll(50):
                    continue
                identity, data = sock.recv_multipart()
                try:
                    reply = self._answer(decode(data, max_bytes=1 << 24))
                except Exception as exc:  # a bug of this fake: reported by the test
                    self.errors.append(repr(exc))
                    continue
                if reply is not None:
                    sock.send_multipart([identity, encode(reply)])
        finally:
            sock.close(0)
            ctx.term()


def test_hostile_receipts_are_rejected_at_decode_and_cost_no_message(
    mesh_factory: MeshFactory,
) -> None:
    mesh = mesh_factory(["A", "B"], real=["A"], absent=["B"], seed=14)

    async def scenario() -> None:
        with FakeListener(mesh.endpoint("B")) as fake:
            await mesh.start()
            await mesh.wait_connected("A")
            await mesh.stream("A", "B", SENDS, tag="hostile", concurrency=SENDS, pause_s=0,
                              receipt_timeout_s=1.0)
            attempts = list(mesh.ledger.attempts.values())
            accepted = [a for a in attempts if a.outcome == "accepted"]
            assert len(accepted) == SENDS, [(a.outcome, a.error) for a in attempts]
            assert not any(a.receipted for a in attempts)
            assert fake.hostile_sent > 0
            outbox = [r for r in read_rows(mesh.data_dir("A")) if r.direction == "out"]
            assert sorted(r.id for r in outbox) == sorted(a.id for a in accepted if a.id)
            assert {r.state for r in outbox} == {"pending"}  # no hostile receipt settled one

            fake.hostile = False  # honest from now on: A's retransmissions get receipted
            deadline = time.monotonic() + DRAIN_TIMEOUT_S
            while mesh.pending().get("A", 0):
                assert time.monotonic() < deadline, mesh.diagnostics()
                await asyncio.sleep(0.1)
            stats = (await mesh.status("A"))["stats"]
            hostile_sent, honest_sent = fake.hostile_sent, fake.honest_sent
            assert not fake.errors, fake.errors

        assert mesh.alive("A"), mesh.log_tail("A")
        log = mesh.log_text("A")
        assert "Traceback" not in log, mesh.log_tail("A", 80)
        assert " ERROR " not in log and "CRITICAL" not in log, mesh.log_tail("A", 80)
        assert stats["undecodable"] == hostile_sent, (stats, hostile_sent)
        assert stats["store_errors"] == 0, stats

        outbox = [r for r in read_rows(mesh.data_dir("A")) if r.direction == "out"]
        ids_at_a = Counter(r.id for r in outbox)
        counts = Counts(mesh.test, attempted=len(attempts), accepted=len(accepted))
        for a in accepted:
            assert a.id is not None
            counts.stored += a.id in fake.stored and ids_at_a[a.id] == 1
            counts.lost += a.id not in fake.stored
            counts.duplicated += max(0, ids_at_a[a.id] - 1)
            counts.receipted += any(r.id == a.id and r.state == "delivered" for r in outbox)
        counts.phantom = len(set(fake.stored) - {a.id for a in accepted})
        counts.verify = "ok" if not (counts.lost or counts.duplicated or counts.phantom) else "FAIL"
        counts.extra.update({
            "hostile_receipts": hostile_sent, "rejected_at_decode": stats["undecodable"],
            "honest_receipts": honest_sent, "arrivals_at_B": sum(fake.arrivals.values()),
            "store_errors_A": stats["store_errors"],
        })
        report(counts)
        assert counts.stored == counts.receipted == SENDS, counts.line()
        assert counts.lost == counts.duplicated == counts.phantom == 0, counts.line()

    mesh.run(scenario)

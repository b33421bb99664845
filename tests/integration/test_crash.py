"""kill -9 and restart, on both sides of a stream: every message ends up stored exactly once on
both ends, and every one is delivered."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from meshpost.cluster import LocalCluster
from meshpost.config import MeshConfig
from meshpost.control import ControlClient, SendRequest
from meshpost.errors import ControlUnavailable
from meshpost.node import Node
from meshpost.verify import verify_stores
from tests.integration.conftest import store_counts, wait_until

pytestmark = pytest.mark.integration

FAST = {"ping_interval_s": 0.2, "peer_timeout_s": 1.0, "retransmit_initial_s": 0.2,
        "retransmit_max_s": 1.0}
STREAM = 2000


def test_receiver_killed_mid_stream_then_restarted_gets_every_message_once(
    short_tmp: Path,
) -> None:
    cluster = LocalCluster.create(short_tmp, 2, transport="ipc", options=FAST)
    sender_cfg = MeshConfig.load(cluster.config_path).node("A", data_dir=cluster.data_dir("A"))

    async def scenario() -> None:
        async with Node(sender_cfg) as a:
            cluster.start(["B"])
            for i in range(0, STREAM, 100):
                await a.post_many("B", [f"message {j}" for j in range(i, i + 100)])
                await asyncio.sleep(0.005)
                if i == 800:
                    # Wait until B has stored part of the stream, then kill it mid-flight.
                    await asyncio.wait_for(_until(lambda: a.stats.delivered >= 300), 30)
                    cluster.nodes["B"].kill()
            await a.flush()
            assert a.stats.delivered < STREAM, "the kill happened mid-stream"
            cluster.restart("B")
            assert await a.wait_delivered(STREAM, timeout_s=60), a.snapshot_stats()
            assert await a.pending_count() == 0

    try:
        asyncio.run(scenario())
    finally:
        cluster.stop()
    report = verify_stores({"A": cluster.data_dir("A"), "B": cluster.data_dir("B")})
    assert report.ok, report.problems
    assert (report.sent, report.delivered, report.received) == (STREAM, STREAM, STREAM)
    assert store_counts(cluster.data_dir("B")) == {"in/received": STREAM}


def test_at_sync_normal_messages_committed_on_the_loop_survive_a_receiver_kill(
    short_tmp: Path,
) -> None:
    """Single messages at sync=normal are committed on the event loop (both ends): kill -9 of
    the receiver mid-stream still loses nothing a receipt vouched for, and doubles nothing."""
    count = 600
    cluster = LocalCluster.create(short_tmp, 2, transport="ipc", options={**FAST, "sync": "normal"})
    sender_cfg = MeshConfig.load(cluster.config_path).node("A", data_dir=cluster.data_dir("A"))
    inline_commits = 0

    async def scenario() -> None:
        nonlocal inline_commits
        async with Node(sender_cfg) as a:
            cluster.start(["B"])
            for i in range(count):
                await a.post("B", f"single {i}")
                if i == 200:
                    await asyncio.wait_for(_until(lambda: a.stats.delivered >= 100), 30)
                    cluster.nodes["B"].kill()
            assert a.stats.delivered < count, "the kill happened mid-stream"
            cluster.restart("B")
            assert await a.wait_delivered(count, timeout_s=60), a.snapshot_stats()
            assert a._writer is not None
            inline_commits = a._writer.inline_commits

    try:
        asyncio.run(scenario())
    finally:
        cluster.stop()
    assert inline_commits > 0, "the sender never committed on the loop: the test missed its point"
    report = verify_stores({"A": cluster.data_dir("A"), "B": cluster.data_dir("B")})
    assert report.ok, report.problems
    assert (report.sent, report.delivered, report.received) == (count, count, count)


def test_sender_killed_with_messages_pending_delivers_them_after_restart(
    short_tmp: Path,
) -> None:
    cluster = LocalCluster.create(short_tmp, 2, transport="ipc", options=FAST)
    try:
        cluster.start(["A"])  # B is down: everything A accepts stays pending
        with ControlClient(cluster.data_dir("A"), name="A") as client:
            for i in range(200):
                reply = client.request(SendRequest("B", f"queued {i}", 0.0), timeout_s=10)
                assert reply.ok
                assert not reply.sent[0].delivered
        assert store_counts(cluster.data_dir("A")) == {"out/pending": 200}
        cluster.nodes["A"].kill()
        cluster.start(["B"])
        cluster.restart("A")
        wait_until(lambda: store_counts(cluster.data_dir("A")) == {"out/delivered": 200}, 60,
                   "A to deliver its backlog after restart")
    finally:
        cluster.stop()
    report = verify_stores({"A": cluster.data_dir("A"), "B": cluster.data_dir("B")})
    assert report.ok and report.delivered == report.received == 200, report.summary()


def test_sender_killed_right_after_storing_resends_on_restart(short_tmp: Path) -> None:
    """The CrashPoint hook kills A between commit and first transmit."""
    cluster = LocalCluster.create(short_tmp, 2, transport="ipc", options=FAST,
                                  env={"MESHPOST_DEBUG_CRASH_AT": "after-sender-store"})
    try:
        cluster.start()
        with (
            ControlClient(cluster.data_dir("A"), name="A") as client,
            pytest.raises(ControlUnavailable),
        ):
            client.request(SendRequest("B", "crash me", 5.0), timeout_s=5.0)
        wait_until(lambda: not cluster.nodes["A"].alive(), 20, "A to hit its crash point")
        assert cluster.nodes["A"].process is not None
        assert cluster.nodes["A"].process.returncode == 99
        assert store_counts(cluster.data_dir("A")) == {"out/pending": 1}
        cluster.env = None
        cluster.restart("A")
        wait_until(lambda: store_counts(cluster.data_dir("A")) == {"out/delivered": 1}, 30,
                   "the stored message to be delivered after restart")
    finally:
        cluster.stop()
    report = verify_stores({"A": cluster.data_dir("A"), "B": cluster.data_dir("B")})
    assert report.ok and report.received == 1, report.summary()


#: Node A embedded in a script: three sends, then the crash hook armed for the fourth, whose
#: receipt the script writes down as `send()` returns it (the node dies right after).
_REPORTED_THEN_CRASH = """
import asyncio, sys
from pathlib import Path
from meshpost.config import MeshConfig
from meshpost.node import CrashPoint, Node

async def main(config: str, data: str, out: str) -> None:
    cfg = MeshConfig.load(Path(config)).node("A", data_dir=Path(data))
    async with Node(cfg) as a:
        for i in range(3):
            await a.send("B", f"before {i}", timeout_s=30)
        a._crash_at = CrashPoint.AFTER_RECEIPT_REPORTED
        receipt = await a.send("B", "reported, not yet recorded", timeout_s=30)
        with open(out, "w", encoding="utf-8") as f:
            f.write(f"{receipt.message_id} {receipt.delivered_at_ns}")
        await asyncio.sleep(30)

asyncio.run(main(*sys.argv[1:]))
"""


def _receipt_times(data_dir: Path) -> dict[str, int | None]:
    with sqlite3.connect(f"file:{data_dir / 'meshpost.db'}?mode=ro", uri=True) as db:
        rows = db.execute(
            "SELECT id, receipt_stored_at_ns FROM message_rows WHERE direction = 'out'")
        return dict(rows.fetchall())


def test_sender_killed_after_a_receipt_is_reported_but_before_it_is_recorded(
    short_tmp: Path,
) -> None:
    """A receipt is reported (`send()` returns) as soon as it arrives; the sender records it
    in its next commit. Killed in between (AFTER_RECEIPT_REPORTED), the sender finds the
    message pending after restart and resends it; the receiver receipts the duplicate again
    from the row it already stored, so the record is restored and nothing is lost or stored
    twice."""
    cluster = LocalCluster.create(short_tmp, 2, transport="ipc", options=FAST)
    out = short_tmp / "reported.txt"
    try:
        cluster.start(["B"])
        script = subprocess.run(
            [sys.executable, "-c", _REPORTED_THEN_CRASH, str(cluster.config_path),
             str(cluster.data_dir("A")), str(out)],
            capture_output=True, text=True, timeout=60, check=False,
        )
        assert script.returncode == 99, script.stderr[-2000:]
        reported_id, reported_at = out.read_text(encoding="utf-8").split()
        # The crash window: B stored all four, A reported the fourth but never recorded it.
        assert store_counts(cluster.data_dir("B")) == {"in/received": 4}
        assert store_counts(cluster.data_dir("A")) == {"out/delivered": 3, "out/pending": 1}
        assert _receipt_times(cluster.data_dir("A"))[reported_id] is None
        cluster.start(["A"])
        wait_until(lambda: store_counts(cluster.data_dir("A")) == {"out/delivered": 4}, 30,
                   "A to resend the unrecorded message and record its receipt again")
    finally:
        cluster.stop()
    # The restored record is B's answer to the resent copy: B stored nothing new for it, and
    # answered after the commit the reported receipt named.
    restored = _receipt_times(cluster.data_dir("A"))[reported_id]
    assert restored is not None and restored >= int(reported_at)
    report = verify_stores({"A": cluster.data_dir("A"), "B": cluster.data_dir("B")})
    assert report.ok, report.problems
    assert (report.sent, report.delivered, report.received) == (4, 4, 4)
    assert store_counts(cluster.data_dir("B")) == {"in/received": 4}


async def _until(predicate: object) -> None:
    assert callable(predicate)
    while not predicate():
        await asyncio.sleep(0.01)



"""A 5-node full mesh of real processes: everyone sends to everyone and to all; then an exact
check that every message is stored once at the sender (delivered) and once at the receiver."""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

import pytest

from meshpost.cluster import LocalCluster
from meshpost.control import ControlClient, SendRequest, SendResult
from meshpost.store import StoreReader
from meshpost.verify import verify_stores

pytestmark = pytest.mark.integration


def send(cluster: LocalCluster, sender: str, target: str, body: str) -> list[SendResult]:
    with ControlClient(cluster.data_dir(sender), name=sender) as client:
        reply = client.request(SendRequest(target, body, 20.0), timeout_s=30.0)
    assert reply.ok, reply.error
    return reply.sent


@pytest.mark.parametrize("transport", ["tcp", "ipc"])
def test_five_node_mesh_stores_every_message_once_on_both_ends(
    short_tmp: Path, transport: str
) -> None:
    with LocalCluster.create(short_tmp, 5, transport=transport) as cluster:
        cluster.start()
        plan = [(s, r, f"{s} says hi to {r}") for s in cluster.names for r in cluster.names
                if s != r]
        plan += [(s, "all", f"{s} to everyone") for s in cluster.names]
        with concurrent.futures.ThreadPoolExecutor(5) as pool:
            replies = list(pool.map(lambda p: (p, send(cluster, *p)), plan))
        codes = cluster.stop()
    assert codes == dict.fromkeys(cluster.names, 0), "every node shuts down cleanly"

    sent: dict[str, tuple[str, str, str, int]] = {}
    for (sender, _target, body), results in replies:
        for r in results:
            assert r.delivered, f"{sender}->{r.to} not receipted: {r.error}"
            assert r.delivered_at_ns is not None
            assert r.received_at_ns is not None
            assert r.delivered_at_ns >= r.received_at_ns, "receipt time is after arrival"
            sent[r.id] = (sender, r.to, body, r.sent_at_ns)
    assert len(sent) == 5 * 4 * 2

    rows = {}
    for name in cluster.names:
        with StoreReader.for_data_dir(cluster.data_dir(name)) as reader:
            rows[name] = reader.history()
    for mid, (sender, receiver, body, sent_at) in sent.items():
        out = [m for m in rows[sender] if m.id == mid]
        inc = [m for m in rows[receiver] if m.id == mid]
        assert len(out) == 1
        assert out[0].direction == "out"
        assert out[0].state == "delivered"
        assert len(inc) == 1
        assert inc[0].direction == "in"
        assert (out[0].body, out[0].sent_at_ns) == (body, sent_at)
        assert (inc[0].body, inc[0].sent_at_ns, inc[0].hlc) == (body, sent_at, out[0].hlc)
        assert out[0].receipt_stored_at_ns is not None
    total = sum(len(r) for r in rows.values())
    assert total == 2 * len(sent), "no row beyond one copy per end"
    report = verify_stores({n: cluster.data_dir(n) for n in cluster.names})
    assert report.ok and report.pending == 0, report.summary()


def test_a_node_reports_its_cpu_time_finer_than_clock_ticks(short_tmp: Path) -> None:
    """The benchmark divides a node's CPU time by a few thousand messages, so 10 ms ticks
    (what psutil reads from /proc) would often read 0; the node's own reading does not."""
    with LocalCluster.create(short_tmp, 2) as cluster:
        cluster.start()
        b = cluster.process("B")
        before = b.cpu_seconds()
        for i in range(5):
            assert all(r.delivered for r in send(cluster, "A", "B", f"tick {i}"))
        after = b.cpu_seconds()
        cluster.stop()
    assert 0 < before < after, "receiving and storing five messages costs B some CPU"
    # A tick-counted reading moves in whole 10 ms steps (0 for five messages, most often).
    in_ticks = (after - before) * 100
    assert abs(in_ticks - round(in_ticks)) > 1e-6, f"{after - before} s is whole ticks"

"""Real node processes with a short `link_idle_s`: a link with nothing to send closes its
connection (the peers table shows it idle, not down), and the next message opens it again
with a new Hello; every message is stored once on both ends and receipted."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshpost.cluster import LocalCluster
from meshpost.control import ControlClient, SendRequest
from meshpost.control.messages import PeersRequest
from meshpost.store import StoreReader
from meshpost.verify import verify_stores
from tests.integration.conftest import wait_until

pytestmark = pytest.mark.integration

#: Short enough for a test, long enough that a send and its receipt never straddle it.
IDLE_S = 2.0


def send(cluster: LocalCluster, sender: str, to: str, body: str) -> None:
    with ControlClient(cluster.data_dir(sender), name=sender) as client:
        reply = client.request(SendRequest(to, body, 20.0), timeout_s=30.0)
    assert reply.ok, reply.error
    assert [r.delivered for r in reply.sent] == [True], reply.sent


def link_state(cluster: LocalCluster, node: str, peer: str) -> str:
    with ControlClient(cluster.data_dir(node), name=node) as client:
        reply = client.request(PeersRequest(), timeout_s=10.0)
    return next(p.state for p in reply.peers if p.name == peer)


@pytest.mark.parametrize("transport", ["tcp", "ipc"])
def test_an_idle_link_closes_and_reopens_on_the_next_message_with_nothing_lost(
    short_tmp: Path, transport: str
) -> None:
    with LocalCluster.create(short_tmp, 2, transport=transport,
                             options={"link_idle_s": IDLE_S}) as cluster:
        cluster.start()
        send(cluster, "A", "B", "before the idle close")
        wait_until(lambda: link_state(cluster, "A", "B") == "idle", 30.0, "A's link to B idle")
        log = cluster.process("A").log_tail(200)
        assert "link to B idle: connection closed" in log
        assert "lost B" not in log and "B left" not in log  # idle is not down
        send(cluster, "A", "B", "after the idle close")  # a new connection, a new Hello
        send(cluster, "B", "A", "and back")
        codes = cluster.stop()
    assert codes == dict.fromkeys(cluster.names, 0)
    with StoreReader.for_data_dir(cluster.data_dir("B")) as reader:
        assert sorted(m.body for m in reader.history(direction="in")) == [
            "after the idle close", "before the idle close"]
    report = verify_stores({n: cluster.data_dir(n) for n in cluster.names})
    assert report.ok and report.pending == 0, report.summary()

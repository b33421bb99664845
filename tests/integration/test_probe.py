"""`meshpost peers --probe` against real node processes: A's links have idled out (nothing to
send for `link_idle_s`), then C is killed -9. The peers table alone still says C is idle; the
probe dials every idle link and reports B live, with a round trip, and C lost."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from meshpost.cluster import LocalCluster
from meshpost.control import ControlClient
from meshpost.control.messages import PeersRequest
from tests.integration.conftest import wait_until

pytestmark = pytest.mark.integration

#: Short enough for a test; links idle out this long after their last activity.
IDLE_S = 1.0
#: The probe's wait: a live peer on this machine answers well within it, even under load
#: (its round trip is milliseconds); the killed one is reported lost once it passes, so each
#: test waits it out once (10 s until 2026-12-06).
WAIT_S = 5.0
CLI_TIMEOUT_S = 60


def states(cluster: LocalCluster, node: str) -> dict[str, str]:
    with ControlClient(cluster.data_dir(node), name=node) as client:
        reply = client.request(PeersRequest(), timeout_s=10.0)
    return {p.name: p.state for p in reply.peers}


def probe(cluster: LocalCluster, node: str, *peers: str) -> dict[str, dict[str, object]]:
    done = subprocess.run(
        [sys.executable, "-m", "meshpost", "peers", "--node", node, "--data",
         str(cluster.data_dir(node)), "--json", "--wait", str(WAIT_S), "--probe", *peers],
        capture_output=True, text=True, timeout=CLI_TIMEOUT_S, stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr
    return {p["name"]: p for p in json.loads(done.stdout)}


@pytest.mark.parametrize("transport", ["tcp", "ipc"])
def test_a_peer_killed_while_its_link_was_idle_shows_lost_after_a_probe_a_live_one_live(
    short_tmp: Path, transport: str
) -> None:
    with LocalCluster.create(short_tmp, 3, transport=transport,
                             options={"link_idle_s": IDLE_S}) as cluster:
        cluster.start()
        wait_until(lambda: states(cluster, "A") == {"B": "idle", "C": "idle"}, 30.0,
                   "A's links to B and C idle")
        cluster.process("C").kill()  # SIGKILL: no Bye, nothing A could notice
        assert states(cluster, "A") == {"B": "idle", "C": "idle"}  # what the table says
        found = probe(cluster, "A")
        assert found["B"]["result"] == "live", found
        assert isinstance(found["B"]["rtt_ns"], int)
        assert found["C"]["result"] == "lost", found
        assert found["C"]["rtt_ns"] is None
        assert found["C"]["detail"] == f"no answer within {WAIT_S:g}s"
        # A named peer alone.
        assert list(probe(cluster, "A", "B")) == ["B"]
        cluster.stop(["A", "B"])

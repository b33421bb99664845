"""`--exclusive PEER` (seed 000's PAIR): one node accepts exactly one peer. A third node of the
same mesh is refused with a reason it shows to its user, and the pair's node logs it."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshpost.cluster import LocalCluster, NodeProcess

from .conftest import wait_until

pytestmark = pytest.mark.integration

CLI_TIMEOUT_S = 60


def meshpost(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meshpost", *args], capture_output=True,
                          text=True, timeout=CLI_TIMEOUT_S, stdin=subprocess.DEVNULL)


@pytest.fixture
def trio(short_tmp: Path) -> Iterator[LocalCluster]:
    """A, B and C in one mesh file (each lists the other two); B is exclusive to A."""
    cluster = LocalCluster.create(short_tmp, 3, transport="ipc", names=["A", "B", "C"],
                                  options={"ping_interval_s": 0.2, "peer_timeout_s": 1.0})
    b = NodeProcess("B", cluster.config_path, cluster.data_dir("B"),
                    short_tmp / "logs" / "B.log", extra_args=["--exclusive", "A"])
    cluster.start(["A", "C"])
    cluster.nodes["B"] = b.start()
    try:
        b.wait_ready()
        yield cluster
    finally:
        cluster.stop()


def test_an_exclusive_pair_serves_its_peer_and_refuses_a_third_node(
    trio: LocalCluster,
) -> None:
    def data(name: str) -> str:
        return str(trio.data_dir(name))

    # The pair works both ways.
    for frm, to in (("A", "B"), ("B", "A")):
        done = meshpost("send", "--node", frm, "--data", data(frm), "--to", to, f"{frm} to {to}")
        assert done.returncode == 0, done.stderr
    # C is refused: no receipt, and its user is told why (the message stays queued).
    refused = meshpost("send", "--node", "C", "--data", data("C"), "--to", "B", "--timeout",
                       "3", "let me in")
    assert refused.returncode == 3, refused.stderr
    assert ("B: exclusive: 'B' is in an exclusive pair with 'A' and accepts no other peer"
            in refused.stderr), refused.stderr
    peers = json.loads(meshpost("peers", "--node", "C", "--data", data("C"), "--json").stdout)
    (b,) = [p for p in peers["peers"] if p["name"] == "B"]
    assert not b["connected"] and b["refusal"].startswith("exclusive:")
    # B says whom it refused, and knows no C to send to.
    log = trio.root / "logs" / "B.log"
    wait_until(lambda: "refused a connection from 'C' (exclusive)" in log.read_text(),
               20, "B's line about refusing C")
    to_c = meshpost("send", "--node", "B", "--data", data("B"), "--to", "C", "hi")
    assert to_c.returncode == 2 and "unknown peer 'C'" in to_c.stderr
    # C -> A is not B's business: the rest of the mesh is unaffected.
    done = meshpost("send", "--node", "C", "--data", data("C"), "--to", "A", "C to A")
    assert done.returncode == 0, done.stderr
    history = json.loads(meshpost("history", "--node", "B", "--data", data("B"),
                                  "--json").stdout)
    assert sorted((r["from"], r["to"]) for r in history) == [("A", "B"), ("B", "A")]


def test_a_request_to_a_peer_that_refuses_this_node_says_why(trio: LocalCluster) -> None:
    """`request` used to say only "not delivered ... stays queued" (as if B were down): it
    now adds B's reason, as `send` does."""
    refused = meshpost("request", "--node", "C", "--data", str(trio.data_dir("C")), "--to",
                       "B", "--timeout", "3", "hola")
    assert refused.returncode == 3, refused.stderr
    assert "no reply from 'B'" in refused.stderr
    assert "B refuses this node: the message is delivered only once B accepts it" in (
        refused.stderr)
    assert ("B: exclusive: 'B' is in an exclusive pair with 'A' and accepts no other peer"
            in refused.stderr), refused.stderr

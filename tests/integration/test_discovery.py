"""`--discover`: node processes on 127.0.0.1 with no peer list find each other by beacons.

Each node hears beacons on a UDP port of its own and sends its beacons to every node's port
(`--beacon-to`), so the test stays on loopback and needs no broadcast domain.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshpost.cluster import NodeProcess, free_tcp_ports
from meshpost.control import ControlClient, StatusRequest
from meshpost.discovery import Beacon, encode_beacon
from meshpost.errors import ControlUnavailable
from meshpost.node import PeerStatus
from meshpost.protocol import PROTOCOL_VERSION
from meshpost.store import StoreReader
from tests.integration.conftest import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

WAIT_S = 40.0


def free_udp_ports(count: int) -> list[int]:
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclasses.dataclass
class DiscoveringNode(NodeProcess):
    """A node started with flags only: --bind and --discover, no --peer, no --config."""

    bind: str = ""

    def command(self) -> list[str]:
        return [sys.executable, "-m", "meshpost", "node", self.name, "--bind", self.bind,
                "--data", str(self.data_dir), "--headless", *self.extra_args]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def peers(self) -> list[PeerStatus]:
        try:
            with ControlClient(self.data_dir, name=self.name) as client:
                return list(client.request(StatusRequest(), timeout_s=5).peers)
        except ControlUnavailable:
            return []


class LanOnLoopback:
    """Up to `slots` discovering nodes; every one's beacons go to every slot's port."""

    def __init__(self, root: Path, slots: int) -> None:
        self.root = root
        self.beacon_ports = free_udp_ports(slots)
        self.zmq_ports = free_tcp_ports(slots)
        self.nodes: list[DiscoveringNode] = []

    def node(self, name: str, data: str | None = None) -> DiscoveringNode:
        slot = len(self.nodes)
        targets = [a for p in self.beacon_ports for a in ("--beacon-to", f"127.0.0.1:{p}")]
        data = data or name
        node = DiscoveringNode(
            name, self.root / "unused.toml", self.root / data, self.root / f"{data}.log",
            extra_args=["--discover", str(self.beacon_ports[slot]), "--discover-host",
                        "127.0.0.1", "--beacon-interval", "0.2", *targets],
            bind=f"tcp://127.0.0.1:{self.zmq_ports[slot]}",
        )
        self.nodes.append(node)
        return node

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@pytest.fixture
def lan(short_tmp: Path) -> Iterator[LanOnLoopback]:
    net = LanOnLoopback(short_tmp, 4)
    try:
        yield net
    finally:
        net.stop()


def send(node: DiscoveringNode, to: str, body: str, timeout_s: float = 20.0) -> int:
    done = subprocess.run(
        [sys.executable, "-m", "meshpost", "send", "--node", node.name, "--data",
         str(node.data_dir), "--to", to, "--timeout", str(timeout_s), body],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
        env=dict(os.environ),
    )
    return done.returncode


def bodies(data_dir: Path, direction: str) -> list[str]:
    with StoreReader.for_data_dir(data_dir) as reader:
        return [m.body for m in reader.history(direction=direction)]


def connected(node: DiscoveringNode) -> set[str]:
    return {p.name for p in node.peers() if p.connected and p.found == "beacon"}


def test_three_nodes_with_no_peer_list_find_each_other_and_exchange_receipted_messages(
    lan: LanOnLoopback,
) -> None:
    a, b, c = (lan.node(n).start() for n in "ABC")
    for node in (a, b, c):
        node.wait_ready()
    for node, others in ((a, {"B", "C"}), (b, {"A", "C"}), (c, {"A", "B"})):
        wait_until(lambda n=node, o=others: connected(n) == o, WAIT_S,
                   f"{node.name} connected to {others} by beacon")
    assert send(a, "all", "hola a todos") == 0
    assert send(b, "C", "de B a C") == 0
    assert send(c, "A", "de C a A") == 0
    assert bodies(b.data_dir, "in") == ["hola a todos"]
    assert sorted(bodies(c.data_dir, "in")) == ["de B a C", "hola a todos"]
    assert bodies(a.data_dir, "in") == ["de C a A"]
    assert "B joined (beacon" in a.log()


@pytest.mark.parametrize(
    ("how", "gone"),
    [
        # SIGTERM: C closes cleanly and says Bye on its link to A, so A logs it as left.
        pytest.param("stop", "C left", id="bye"),
        # kill -9: no Bye at all; A's liveness (peer_timeout_s of silence) finds C lost.
        pytest.param("kill", "lost C", id="silence"),
    ],
)
def test_restarted_node_is_seen_leaving_and_rejoining_and_receives_what_was_queued(
    lan: LanOnLoopback, how: str, gone: str,
) -> None:
    a, c = lan.node("A").start(), lan.node("C").start()
    a.wait_ready()
    c.wait_ready()
    # Both links up: C's own link to A must be welcomed before C can say Bye on it (it
    # says it only to peers that welcomed it), and A's link to C is the one that notices.
    wait_until(lambda: connected(a) == {"C"} and connected(c) == {"A"}, WAIT_S,
               "A and C connected to each other")
    if how == "stop":
        c.stop()
    else:
        c.kill()
    wait_until(lambda: gone in a.log(), WAIT_S, f"A seeing C gone ({gone!r})")
    # A's discovery notices C's beacons stop too; only then can it hear them "again".
    wait_until(lambda: "no beacon from C" in a.log(), WAIT_S, "A hearing no beacon from C")
    assert send(a, "C", "kept for C", timeout_s=0.5) == 3  # queued, no receipt yet
    assert bodies(a.data_dir, "out") == ["kept for C"]
    c.process = None
    c.start().wait_ready()
    wait_until(lambda: bodies(c.data_dir, "in") == ["kept for C"], WAIT_S,
               "the queued message delivered to C after its restart")
    wait_until(lambda: a.log().count("connected to C") == 2, WAIT_S, "A reconnected to C")
    assert "C is heard again" in a.log()
    # C kept its identity: A accepted it again under the node id it first heard.
    ids = {line.rsplit("node ", 1)[1].rstrip(")") for line in a.log().splitlines()
           if "connected to C (node" in line}
    assert len(ids) == 1


def test_two_nodes_claiming_one_name_are_reported_on_both_sides_and_neither_takes_the_others(
    lan: LanOnLoopback,
) -> None:
    a = lan.node("A").start()
    b1 = lan.node("B", data="B1").start()
    a.wait_ready()
    b1.wait_ready()
    wait_until(lambda: connected(a) == {"B"}, WAIT_S, "A connected to the first B")
    b2 = lan.node("B", data="B2").start()
    b2.wait_ready()
    wait_until(lambda: "also calls itself 'B'" in b1.log(), WAIT_S, "the first B told")
    wait_until(lambda: "also calls itself 'B'" in b2.log(), WAIT_S, "the second B told")
    wait_until(lambda: "name clash: 'B' is node" in a.log(), WAIT_S, "A told")
    wait_until(lambda: "A refused us" in b2.log(), WAIT_S, "A refusing the second B")
    assert send(a, "B", "only for the first B") == 0
    assert bodies(b1.data_dir, "in") == ["only for the first B"]
    assert bodies(b2.data_dir, "in") == []
    assert send(b2, "A", "from the impostor", timeout_s=1) != 0
    assert bodies(a.data_dir, "in") == []


def test_garbage_and_other_meshes_on_the_beacon_port_are_ignored(lan: LanOnLoopback) -> None:
    a = lan.node("A").start()
    a.wait_ready()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for junk in (b"", b"hello", b"MPB\x09xx", b"MPB\x01\xff\xff", b"\x00" * 600):
            s.sendto(junk, ("127.0.0.1", lan.beacon_ports[0]))
    b = lan.node("B").start()
    b.wait_ready()
    wait_until(lambda: connected(a) == {"B"}, WAIT_S, "A still discovering after garbage")
    assert a.alive()


def test_under_secure_only_nodes_with_an_authorized_key_are_dialed(lan: LanOnLoopback) -> None:
    from meshpost import keys

    a, b, m = lan.node("A"), lan.node("B"), lan.node("M")
    for node in (a, b, m):
        node.extra_args = [*node.extra_args, "--secure"]
    publics = keys.generate_mesh_keys({"A": a.data_dir, "B": b.data_dir})
    # M trusts A and B, but neither of them has M's key.
    keys.generate(m.data_dir)
    keys.write_authorized(m.data_dir, publics)
    for node in (a, b, m):
        node.start()
    for node in (a, b, m):
        node.wait_ready()
    wait_until(lambda: connected(a) == {"B"} and connected(b) == {"A"}, WAIT_S,
               "A and B connected over CURVE by beacon")
    for node in (a, b):
        wait_until(lambda n=node: "ignoring M" in n.log(), WAIT_S,
                   f"{node.name} ignoring M's beacons")
    assert send(a, "B", "secreto") == 0
    assert {p.name for p in a.peers()} == {"B"}
    assert send(m, "A", "let me in", timeout_s=1) != 0
    assert bodies(a.data_dir, "in") == []


def test_under_secure_a_key_added_by_reload_is_found_by_beacon(lan: LanOnLoopback) -> None:
    """`keys reload` puts the keys in force for discovery too: M's beacons, ignored while A
    did not list M's key, make M a peer found by beacon once A has reloaded it (before,
    discovery kept the keys of A's start: A never found M, so never dialled it)."""
    from meshpost import keys

    a, m = lan.node("A"), lan.node("M")
    for node in (a, m):
        node.extra_args = [*node.extra_args, "--secure"]
    publics = keys.generate_mesh_keys({"A": a.data_dir})
    m_key = keys.generate(m.data_dir, name="M")
    keys.write_authorized(m.data_dir, {**publics, "M": m_key})
    for node in (a, m):
        node.start()
    for node in (a, m):
        node.wait_ready()
    wait_until(lambda: "ignoring M" in a.log(), WAIT_S, "A ignoring M's beacons")
    assert "M" not in connected(a)
    keys.write_authorized(a.data_dir, {"M": m_key})  # A's file listed no one
    done = subprocess.run(
        [sys.executable, "-m", "meshpost", "keys", "reload", "--node", "A", "--data",
         str(a.data_dir)], capture_output=True, text=True, timeout=60,
        stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "added: M"
    wait_until(lambda: "M" in connected(a), WAIT_S, "A found M by beacon after the reload")
    assert send(a, "M", "bienvenido") == 0
    assert bodies(m.data_dir, "in") == ["bienvenido"]


def test_a_node_restarted_at_another_port_is_followed_and_receives_what_was_queued(
    lan: LanOnLoopback,
) -> None:
    """C restarts on another port (same data dir, same node id). Before, A kept dialing the
    old one for good: the message queued for C never left. Now A follows C once nothing came
    from the old endpoint for `silence_s`."""
    a, c = lan.node("A").start(), lan.node("C").start()
    a.wait_ready()
    c.wait_ready()
    wait_until(lambda: connected(a) == {"C"} and connected(c) == {"A"}, WAIT_S,
               "A and C connected to each other")
    c.stop()
    wait_until(lambda: "no beacon from C" in a.log(), WAIT_S, "A hearing no beacon from C")
    assert send(a, "C", "kept for C", timeout_s=0.5) == 3  # queued, no receipt yet
    moved_to = f"tcp://127.0.0.1:{free_tcp_ports(1)[0]}"
    c.bind = moved_to
    c.process = None
    c.start().wait_ready()
    wait_until(lambda: bodies(c.data_dir, "in") == ["kept for C"], WAIT_S,
               "the queued message delivered to C at its new endpoint")
    assert f"C is heard at {moved_to} now" in a.log()
    assert send(a, "C", "and the next one") == 0


def test_beacons_naming_a_live_node_elsewhere_are_not_followed(lan: LanOnLoopback) -> None:
    """A stranger beacons C's name and node id (both in any beacon of C's) with an endpoint of
    its own, faster than C: A keeps dialing C where C is heard, says why once a period, and
    C receives what A sends."""
    a, c = lan.node("A").start(), lan.node("C").start()
    a.wait_ready()
    c.wait_ready()
    wait_until(lambda: connected(a) == {"C"}, WAIT_S, "A connected to C")
    node_id = next(line.rsplit("node ", 1)[1].rstrip(")") for line in a.log().splitlines()
                   if "connected to C (node" in line)
    elsewhere = f"tcp://127.0.0.1:{free_tcp_ports(1)[0]}"
    forged = encode_beacon(Beacon("meshpost", node_id, "C", elsewhere, PROTOCOL_VERSION, None))
    stop = threading.Event()

    def forge() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            while not stop.wait(0.05):
                s.sendto(forged, ("127.0.0.1", lan.beacon_ports[0]))

    forger = threading.Thread(target=forge, daemon=True)
    forger.start()
    try:
        wait_until(lambda: f"is at {elsewhere}, but C is heard at" in a.log(), WAIT_S,
                   "A reporting the claim")
        assert send(a, "C", "still for C") == 0
    finally:
        stop.set()
        forger.join(5)
    assert bodies(c.data_dir, "in") == ["still for C"]
    assert f"C is heard at {elsewhere} now" not in a.log()

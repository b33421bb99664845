"""Hostile peers against discovery: a stranger on the LAN sends beacons by hand (a plain UDP
socket on loopback) at real `meshpost node --discover` processes.

The two rules: no input from a peer may cost another message (a dial, a datagram, a copy of a
message, a log line per input), and a name or node id a peer chooses is never proof of who it
is. docs/reliability.md, "Hostile peers against discovery", tells what each test found.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zmq

from meshpost import keys
from meshpost.cluster import free_tcp_ports
from meshpost.control import ControlClient, StatusRequest
from meshpost.discovery import Beacon, encode_beacon, key_fingerprint
from meshpost.protocol import PROTOCOL_VERSION
from tests.integration import wire_peer
from tests.integration.conftest import wait_until
from tests.integration.test_discovery import (
    DiscoveringNode,
    LanOnLoopback,
    bodies,
    connected,
    send,
)
from tests.integration.test_discovery_netns import BEACON_PORT as NETNS_BEACON_PORT
from tests.integration.test_discovery_netns import SUBNET as NETNS_SUBNET
from tests.integration.test_discovery_netns import (
    NamespacedNode,
    namespaces,  # noqa: F401 (a fixture, taken by name below)
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

WAIT_S = 40.0
#: `discovery.DEFAULT_MAX_FOUND` and `DEFAULT_MAX_FOUND_PER_SOURCE` (literals: the tests also
#: run against code without them).
MAX_FOUND = 256
MAX_FOUND_PER_SOURCE = 64


@pytest.fixture
def lan(short_tmp: Path) -> Iterator[LanOnLoopback]:
    net = LanOnLoopback(short_tmp, 4)
    try:
        yield net
    finally:
        net.stop()


def forged(name: str, node_id: str, endpoint: str, *, key: str | None = None) -> bytes:
    return encode_beacon(Beacon("meshpost", node_id, name, endpoint, PROTOCOL_VERSION, key))


def status(node: DiscoveringNode) -> dict[str, Any]:
    """What `meshpost peers --json` prints of `node` (its control `status`), without a
    process a call: {"status": ..., "peers": [...]}."""
    with ControlClient(node.data_dir, name=node.name) as client:
        reply = client.request(StatusRequest(), timeout_s=10)
    return {"status": reply.status, "peers": [msgspec.structs.asdict(p) for p in reply.peers]}


def counters(node: DiscoveringNode) -> dict[str, int]:
    """The node's discovery counters, as control `status` (roles.discovery) shows them."""
    roles = status(node)["status"].get("roles") or {}
    assert "discovery" in roles, f"no discovery counters in {node.name}'s status: {roles}"
    found: dict[str, int] = roles["discovery"]
    return found


def names_read(node: DiscoveringNode) -> int:
    """How many beacons `node` read: its counter; on code without it (the test run against
    the code before the fix), the peers its beacons made."""
    shown = status(node)
    roles = shown["status"].get("roles") or {}
    if "discovery" in roles:
        return int(roles["discovery"]["beacons"])
    return len(shown["peers"])


def vm_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def dead_port() -> int:
    """A loopback TCP port nobody listens on (a dial there is refused at once)."""
    return free_tcp_ports(1)[0]


def test_a_flood_of_made_up_names_is_bounded_counted_and_paced(lan: LanOnLoopback) -> None:
    """10,000 beacons, each a new name and node id, while A and B exchange. Before: each name
    was a peer of A (a link, a dial for the first eight, a copy of every message to `all`),
    two log lines each (`joined`, then `no beacon from`), and nothing in A's status said so.
    Now at most MAX_FOUND_PER_SOURCE names are found from one address (MAX_FOUND in all),
    the rest counted (`directory_full`) and logged at a pace; B still receives what A
    sends."""
    a, b = lan.node("A").start(), lan.node("B").start()
    a.wait_ready()
    b.wait_ready()
    wait_until(lambda: connected(a) == {"B"} and connected(b) == {"A"}, WAIT_S,
               "A and B connected by beacon")
    assert a.process is not None
    pid = a.process.pid
    rss_before, cpu_before = vm_rss_kb(pid), cpu_s(pid)
    lines_before = len(a.log().splitlines())
    flood = 10_000
    endpoint = f"tcp://127.0.0.1:{dead_port()}"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for i in range(flood):
            s.sendto(forged(f"fake{i}", f"{i:016x}", endpoint), ("127.0.0.1",
                                                                  lan.beacon_ports[0]))
            if i % 200 == 199:
                # Paced so that the kernel's receive buffer keeps most of them.
                wait_until(lambda n=i: names_read(a) >= n * 0.5, WAIT_S, "A reading the flood")
    wait_until(lambda: names_read(a) > flood // 2, WAIT_S, "A reading the flood")
    rss_after, cpu_after = vm_rss_kb(pid), cpu_s(pid)
    peers = {p["name"] for p in status(a)["peers"]}
    new_lines = a.log().splitlines()[lines_before:]
    print(f"flood of {flood} names: A read {names_read(a)}, VmRSS {rss_before} -> "
          f"{rss_after} kB, CPU {cpu_after - cpu_before:.2f} s, {len(peers)} peers, "
          f"{len(new_lines)} log lines")
    assert len(peers) <= MAX_FOUND_PER_SOURCE  # B and the names, all from 127.0.0.1
    assert "B" in peers
    seen = counters(a)
    print(f"counters {seen}")
    assert seen["found"] <= MAX_FOUND_PER_SOURCE
    assert seen["directory_full"] > 0
    assert seen["found"] + seen["directory_full"] <= seen["beacons"]
    # A's log: a `joined` line per name found (bounded by the cap), the refusals paced.
    assert sum("joined" in line for line in new_lines) <= MAX_FOUND_PER_SOURCE
    refusals = [line for line in new_lines if "ignoring a beacon naming" in line]
    assert 0 < len(refusals) < 100, len(refusals)
    assert send(a, "B", "through the flood") == 0
    assert bodies(b.data_dir, "in") == ["through the flood"]
    assert a.alive()
    # `meshpost peers --json` and its table show the counters too.
    shown = subprocess.run(
        [sys.executable, "-m", "meshpost", "peers", "--node", "A", "--data", str(a.data_dir),
         "--json"], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        env=dict(os.environ))
    assert json.loads(shown.stdout)["status"]["roles"]["discovery"]["directory_full"] > 0
    table = subprocess.run(
        [sys.executable, "-m", "meshpost", "peers", "--node", "A", "--data", str(a.data_dir)],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        env=dict(os.environ))
    assert "discovery:" in table.stdout and "directory_full" in table.stdout, table.stdout


def test_a_host_flooding_made_up_names_leaves_room_for_nodes_at_other_addresses(
    lan: LanOnLoopback,
) -> None:
    """A stranger at 127.0.0.1 sends 2,000 beacons of made-up names (each at its own address:
    an endpoint must be the beacon's source). It fills its address's share of A's directory;
    B, which listens and beacons at 127.0.0.2, is still found and exchanges with A."""
    a = lan.node("A")
    b_udp, b_tcp = lan.beacon_ports[1], lan.zmq_ports[1]
    a.extra_args = [*a.extra_args, "--beacon-to", f"127.0.0.2:{b_udp}"]
    a.start().wait_ready()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for i in range(2000):
            s.sendto(forged(f"fake{i}", f"{i:016x}", "tcp://*:9"),
                     ("127.0.0.1", lan.beacon_ports[0]))
            if i % 200 == 199:
                wait_until(lambda n=i: counters(a)["beacons"] >= n * 0.5, WAIT_S,
                           "A reading the flood")
    wait_until(lambda: counters(a)["directory_full"] > 0, WAIT_S, "A's share for 127.0.0.1 full")
    b = DiscoveringNode(
        "B", lan.root / "unused.toml", lan.root / "B", lan.root / "B.log",
        extra_args=["--discover", str(b_udp), "--discover-host", "127.0.0.2",
                    "--beacon-interval", "0.2", "--beacon-to", f"127.0.0.1:{lan.beacon_ports[0]}"],
        bind=f"tcp://127.0.0.2:{b_tcp}")
    lan.nodes.append(b)
    b.start().wait_ready()
    # A has more links than it dials at start (`dial_at_start`): its link to B opens on its
    # first message; B's to A is up once each found the other.
    wait_until(lambda: "B" in {p["name"] for p in status(a)["peers"]}
               and connected(b) == {"A"}, WAIT_S, "A and B (at 127.0.0.2) finding each other")
    assert send(a, "B", "past the flood") == 0
    assert bodies(b.data_dir, "in") == ["past the flood"]
    seen = counters(a)
    assert seen["found"] == MAX_FOUND_PER_SOURCE + 1, seen


def test_a_beacon_cannot_send_a_node_to_dial_a_third_party(lan: LanOnLoopback) -> None:
    """A beacon from 127.0.0.1 naming an endpoint at 127.0.0.2 (a third party: another
    address than the beacon's own) or a host name. Before: A dialed it (a ZMTP greeting to
    any port of any host a datagram named; a DNS query for a name). Now refused, counted."""
    third_party = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    third_party.bind(("127.0.0.2", 0))
    third_party.listen(16)
    third_party.settimeout(0.05)
    port = third_party.getsockname()[1]
    a = lan.node("A").start()
    a.wait_ready()
    accepted: list[socket.socket] = []

    def dialed() -> bool:
        try:
            conn, _ = third_party.accept()
        except TimeoutError:
            return False
        accepted.append(conn)
        return True

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for i, endpoint in enumerate((f"tcp://127.0.0.2:{port}", f"tcp://localhost:{port}")):
                s.sendto(forged(f"victim{i}", f"{i:016x}", endpoint),
                         ("127.0.0.1", lan.beacon_ports[0]))

        def decided() -> bool:
            roles = status(a)["status"].get("roles") or {}
            return (dialed()
                    or roles.get("discovery", {}).get("endpoints_refused", 0) >= 2)

        wait_until(decided, WAIT_S, "A dialing the third party or refusing the beacons")
        assert accepted == [], "A dialed the endpoint a stranger's beacon named"
        assert counters(a)["endpoints_refused"] == 2
        assert {p["name"] for p in status(a)["peers"]} == set()
        assert "its host is not the beacon's source address 127.0.0.1" in a.log()
    finally:
        for conn in accepted:
            conn.close()
        third_party.close()


def test_a_beacon_is_never_answered_at_its_source(lan: LanOnLoopback) -> None:
    """A beacon's source address is anyone's to forge. Before, A answered each new name
    with a beacon of its own to the datagram's source: one spoofed datagram (here 50 bytes)
    sent A's beacon (59 bytes here; more with a longer name or a key) to any host and port the
    sender chose, one per name made up. Now the early beacon goes to A's own targets only,
    and at most one between two regular ones."""
    a, b = lan.node("A").start(), lan.node("B").start()
    a.wait_ready()
    b.wait_ready()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as victim:
        victim.bind(("127.0.0.1", 0))
        victim.setblocking(False)
        for i in range(20):
            victim.sendto(forged(f"n{i}", f"{i:016x}", f"tcp://127.0.0.1:{dead_port()}"),
                          ("127.0.0.1", lan.beacon_ports[0]))
        wait_until(lambda: len({p["name"] for p in status(a)["peers"]} - {"B"}) == 20,
                   WAIT_S, "A finding the 20 names")
        answers: list[bytes] = []
        while True:
            try:
                answers.append(victim.recv(2048))
            except BlockingIOError:
                break
    assert answers == [], f"A sent {len(answers)} datagrams to the beacons' source"
    # The early beacon reaches the nodes A beacons to: B still finds A.
    wait_until(lambda: connected(a) == {"B"} and connected(b) == {"A"}, WAIT_S,
               "A and B connected by beacon")


def test_control_characters_in_a_beacon_never_reach_the_log_or_peers(
    lan: LanOnLoopback,
) -> None:
    """Node ids and endpoints with terminal escapes, a bidi override, a newline forging a log
    line, under A's own name (a clash line prints the other node id and endpoint) and under
    new names. Before: the clash line carried them raw into A's log. Now such a beacon is
    garbage, counted, and logged (paced) without its fields."""
    a = lan.node("A").start()
    a.wait_ready()
    evil = ["\x1b[2J\x1b[31mPWNED", "b\u202e1", "x" * 300]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for node_id in evil:
            for name in ("A", "newname"):
                s.sendto(forged(name, node_id, "tcp://127.0.0.1:9"),
                         ("127.0.0.1", lan.beacon_ports[0]))
        s.sendto(forged("A", "ab12", "tcp://127.0.0.1:9\n2026-01-01 INFO forged"),
                 ("127.0.0.1", lan.beacon_ports[0]))

    def counted() -> bool:
        roles = status(a)["status"].get("roles") or {}
        return roles.get("discovery", {}).get("garbage", 0) >= 7 or "PWNED" in a.log()

    wait_until(counted, WAIT_S, "A counting the beacons")
    log = a.log()
    for bad in ("\x1b", "\u202e", "PWNED", "INFO forged", "x" * 300):
        assert bad not in log
    assert counters(a)["garbage"] == 7
    shown = json.dumps(status(a))
    assert "PWNED" not in shown and "newname" not in shown


def test_reserved_words_and_group_names_in_beacons_are_never_peers(
    lan: LanOnLoopback,
) -> None:
    """A has group `team` (with X). Before: a beacon naming `team` made a peer of it, which
    wins over the group: `send team` from A went to the stranger's endpoint as a direct
    message; `all` and `me` each cost a `cannot add discovered` warning. Now refused,
    counted (`names_refused`), and `team` stays A's group."""
    a = lan.node("A")
    a.extra_args = [*a.extra_args, "--peer", f"X=tcp://127.0.0.1:{dead_port()}",
                    "--group", "team=X"]
    a.start().wait_ready()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for i, name in enumerate(("team", "all", "ALL", "me")):
            s.sendto(forged(name, f"{i:016x}", f"tcp://127.0.0.1:{dead_port()}"),
                     ("127.0.0.1", lan.beacon_ports[0]))

    def decided() -> bool:
        shown = status(a)
        roles = shown["status"].get("roles") or {}
        return (roles.get("discovery", {}).get("names_refused", 0) >= 4
                or "team" in {p["name"] for p in shown["peers"]})

    wait_until(decided, WAIT_S, "A deciding on the beacons")
    shown = status(a)
    assert {p["name"] for p in shown["peers"]} == {"X"}
    assert shown["status"]["groups"] == {"team": ["X"]}
    assert counters(a)["names_refused"] == 4
    assert "cannot add discovered" not in a.log()


def test_a_beacon_naming_a_configured_peer_cannot_lock_it_out(lan: LanOnLoopback) -> None:
    """A (discovering) and B know each other by --peer. A stranger beacons B's name with a
    node id of its own. Before: A pinned that node id for B (`add_peer` of a known name did
    so before finding it known): B's own Hellos were refused as a name clash for as long as
    A ran, and B's messages to A never arrived. Now the beacon only counts as hearing B."""
    a, b = lan.node("A"), lan.node("B")
    a.extra_args = [*a.extra_args, "--peer", f"B={b.bind}"]
    b.extra_args = ["--peer", f"A={a.bind}"]  # B runs without discovery
    a.start().wait_ready()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(forged("B", "00000000deadbeef", f"tcp://127.0.0.1:{dead_port()}"),
                 ("127.0.0.1", lan.beacon_ports[0]))
        # Then a beacon of another name, from the same socket: once A shows it, A read both.
        s.sendto(forged("marker", "0000000000000001", f"tcp://127.0.0.1:{dead_port()}"),
                 ("127.0.0.1", lan.beacon_ports[0]))
    wait_until(lambda: "marker" in {p["name"] for p in status(a)["peers"]}, WAIT_S,
               "A reading the beacons")
    b.start().wait_ready()
    assert send(b, "A", "from the real B") == 0
    assert bodies(a.data_dir, "in") == ["from the real B"]
    assert send(a, "B", "to the real B") == 0
    assert bodies(b.data_dir, "in") == ["to the real B"]
    assert counters(a)["clashes"] == 0


@contextlib.contextmanager
def a_stranger_beaconing(lan: LanOnLoopback, name: str, node_id: str,
                         key: str) -> Iterator[tuple[str, list[list[bytes]]]]:
    """M: a CURVE listener of a key of its own on loopback, and a thread beaconing `name`,
    `node_id` and `key` (a fingerprint) at M's endpoint to the first slot's beacon port 20
    times a second, until the block ends. Yields M's endpoint and what reached M (a list
    the thread fills: it answers nothing)."""
    ctx = zmq.Context()
    m = ctx.socket(zmq.ROUTER)
    m.setsockopt(zmq.LINGER, 0)
    m.curve_server = True
    m.curve_publickey, m.curve_secretkey = zmq.curve_keypair()
    endpoint = f"tcp://127.0.0.1:{m.bind_to_random_port('tcp://127.0.0.1')}"
    beacon = forged(name, node_id, endpoint, key=key)
    stop = threading.Event()
    frames_at_m: list[list[bytes]] = []

    def forge() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            while True:
                s.sendto(beacon, ("127.0.0.1", lan.beacon_ports[0]))
                while m.poll(0):
                    frames_at_m.append(m.recv_multipart())
                if stop.wait(0.05):
                    return

    forger = threading.Thread(target=forge, daemon=True)
    forger.start()
    try:
        yield endpoint, frames_at_m
    finally:
        stop.set()
        forger.join(5)
        m.close()
        ctx.term()


def test_under_secure_a_stranger_beaconing_first_cannot_keep_a_node_out(
    lan: LanOnLoopback,
) -> None:
    """A and B run --secure and trust each other. Before B starts, M beacons B's name with
    B's key fingerprint (public: in every beacon of B's, or computed from B's public key)
    and a node id of its own, 20 times a second for the whole test, at M's endpoint, where
    a CURVE listener of M's own key answers. Before: A found "B" at M's endpoint, then took
    the real B's beacons as a name clash and refused B's Hellos (M's node id pinned) for as
    long as A ran. Now the key decides: a message A queues for B while only M's endpoint is
    known stays pending (M cannot finish the handshake), B is welcomed, and A's link leaves
    M's endpoint, which never answered the handshake, for B's: the message reaches B once."""
    a, b = lan.node("A"), lan.node("B")
    for node in (a, b):
        node.extra_args = [*node.extra_args, "--secure"]
    publics = keys.generate_mesh_keys({"A": a.data_dir, "B": b.data_dir})
    a.start().wait_ready()
    with a_stranger_beaconing(lan, "B", "0000000000000bad",
                              key_fingerprint(publics["B"])) as (_, frames_at_m):
        wait_until(lambda: "B" in {p["name"] for p in status(a)["peers"]}, WAIT_S,
                   "A finding M's B")
        assert send(a, "B", "queued for the real B", timeout_s=1) == 3  # not receipted
        b.start().wait_ready()
        assert send(b, "A", "from the real B") == 0
        wait_until(lambda: bodies(b.data_dir, "in") == ["queued for the real B"], WAIT_S,
                   "the queued message at the real B")
        assert send(a, "B", "to the real B") == 0
    assert frames_at_m == []  # nothing of A's reached M
    assert bodies(a.data_dir, "in") == ["from the real B"]
    assert bodies(b.data_dir, "in") == ["queued for the real B", "to the real B"]
    assert "name clash" not in a.log()


def test_under_secure_a_stranger_taking_a_silent_nodes_endpoint_gets_nothing(
    lan: LanOnLoopback,
) -> None:
    """A and B run --secure, found each other. B stops; M beacons B's name, B's node id and
    B's key fingerprint (all in B's beacons) at M's endpoint, where a CURVE listener of M's
    own key answers. Once B is silent for `silence_s`, A follows "B" there (B may have moved;
    without keys this is how a stranger takes what is queued for a silent node: docs/
    reliability.md, left open). The handshake at M fails, so a message A queues for B stays
    pending (nothing reaches M). B restarts at its own endpoint. Before: B's beacons were
    claims against M's endpoint, never followed while M beaconed: the message never reached
    B. Now A's link, which nothing answers at M's, follows B back; the message reaches B."""
    a, b = lan.node("A"), lan.node("B")
    for node in (a, b):
        node.extra_args = [*node.extra_args, "--secure"]
    publics = keys.generate_mesh_keys({"A": a.data_dir, "B": b.data_dir})
    a.start().wait_ready()
    b.start().wait_ready()
    wait_until(lambda: connected(a) == {"B"} and connected(b) == {"A"}, WAIT_S,
               "A and B connected over CURVE by beacon")
    b_id = next(line.rsplit("node ", 1)[1].rstrip(")") for line in a.log().splitlines()
                if "connected to B (node" in line)
    b.stop()
    with a_stranger_beaconing(lan, "B", b_id,
                              key_fingerprint(publics["B"])) as (m_endpoint, frames_at_m):
        wait_until(lambda: f"B is heard at {m_endpoint} now" in a.log(), WAIT_S,
                   "A following B's name to M's endpoint")
        assert send(a, "B", "queued while B is away", timeout_s=1) == 3  # not receipted
        b.process = None
        b.start().wait_ready()
        wait_until(lambda: bodies(b.data_dir, "in") == ["queued while B is away"], WAIT_S,
                   "the queued message at the real B")
    assert frames_at_m == []


def test_copies_of_a_nodes_beacon_cannot_make_a_node_say_hello_once_each(
    lan: LanOnLoopback,
) -> None:
    """C (a listener by hand, docs/protocol.md 6.3) refuses every Hello as `unknown-peer`, as
    a node does that has not heard our beacon yet. A stranger sends A copies of C's beacon,
    as fast as it can. Before: each copy made A's refused link ask again at once, a Hello to
    C per datagram (a third party's traffic at a stranger's rate). Now at most once per
    beacon interval (0.2 s here) for a name, however many copies come."""
    ctx = zmq.Context()
    c = ctx.socket(zmq.ROUTER)
    c.setsockopt(zmq.LINGER, 0)
    port = c.bind_to_random_port("tcp://127.0.0.1")
    hellos: list[float] = []
    stop = threading.Event()

    def refuse_all() -> None:
        while not stop.is_set():
            if not c.poll(50):
                continue
            identity, data = c.recv_multipart()
            if wire_peer.decode(data).tag == "hello":
                hellos.append(time.monotonic())
                c.send_multipart([identity, wire_peer.encode(
                    "refuse", "unknown-peer", "'A' is not a peer of 'C'")])

    listener = threading.Thread(target=refuse_all, daemon=True)
    listener.start()
    a = lan.node("A").start()
    try:
        a.wait_ready()
        beacon = forged("C", "00000000000000cc", f"tcp://127.0.0.1:{port}")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(beacon, ("127.0.0.1", lan.beacon_ports[0]))
            wait_until(lambda: any(p["name"] == "C" and p["state"] == "refused"
                                   for p in status(a)["peers"]), WAIT_S, "C refusing A")
            started, before = time.monotonic(), len(hellos)
            copies = 2000
            for i in range(copies):
                s.sendto(beacon, ("127.0.0.1", lan.beacon_ports[0]))
                if i % 100 == 99:
                    time.sleep(0.01)  # the kernel's buffer keeps them
            # A beacon of another name from the same socket: once A shows it, A read all.
            s.sendto(forged("marker", "0000000000000001", f"tcp://127.0.0.1:{dead_port()}"),
                     ("127.0.0.1", lan.beacon_ports[0]))
            wait_until(lambda: "marker" in {p["name"] for p in status(a)["peers"]}, WAIT_S,
                       "A reading the copies")
            elapsed = time.monotonic() - started
        during = len(hellos) - before
        print(f"{copies} copies of C's beacon in {elapsed:.2f} s: {during} Hellos to C")
        # One a beacon interval, plus the one due at the start and the regular retry.
        assert during <= elapsed / 0.2 + 3, (during, elapsed)
    finally:
        stop.set()
        listener.join(5)
        c.close()
        ctx.term()


def test_a_node_started_under_a_flood_of_bad_beacons_finds_its_peer_and_logs_at_a_pace(
    lan: LanOnLoopback,
) -> None:
    """A stranger sends every kind of bad beacon to A's port without pause, from before A
    starts: junk, beacons of another format, mesh or protocol, names and node ids of the
    wrong form, clashes with A's own name under a new node id each, `all`, endpoints at a
    third party. A starts, finds B, exchanges. Before: a clash line per made-up node id (an
    ERROR each) and a line per refused name, without bound. Now each kind is paced: 20
    lines, then one every 10 s saying how many were left out; all counted."""
    stop = threading.Event()
    sent = [0]

    def flood() -> None:
        target = ("127.0.0.1", lan.beacon_ports[0])
        kinds = [
            lambda i: b"junk",
            lambda i: b"MPB\x07" + bytes(20),
            lambda i: encode_beacon(Beacon("other", f"{i:016x}", "X", "tcp://127.0.0.1:9",
                                           PROTOCOL_VERSION, None)),
            lambda i: encode_beacon(Beacon("meshpost", f"{i:016x}", "X", "tcp://127.0.0.1:9",
                                           PROTOCOL_VERSION + 1, None)),
            lambda i: forged("A", f"{i:016x}", "tcp://127.0.0.1:9"),
            lambda i: forged("A", f"\x1b[{i}m", "tcp://127.0.0.1:9"),
            lambda i: forged("all", f"{i:016x}", "tcp://127.0.0.1:9"),
            lambda i: forged(f"x{i}", f"{i:016x}", f"tcp://127.0.0.2:{1 + i % 60000}"),
        ]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            i = 0
            while not stop.is_set():
                s.sendto(kinds[i % len(kinds)](i), target)
                i += 1
                if i % 200 == 0:
                    time.sleep(0.01)
            sent[0] = i

    flooder = threading.Thread(target=flood, daemon=True)
    flooder.start()
    started = time.monotonic()
    try:
        a, b = lan.node("A").start(), lan.node("B").start()
        a.wait_ready()
        b.wait_ready()
        wait_until(lambda: connected(a) == {"B"} and connected(b) == {"A"}, WAIT_S,
                   "A and B connected by beacon")
        assert send(a, "B", "under the flood") == 0
        wait_until(lambda: counters(a)["beacons"] > 5000, WAIT_S, "A reading the flood")
    finally:
        stop.set()
        flooder.join(5)
    elapsed = time.monotonic() - started
    seen = counters(a)
    lines = [line for line in a.log().splitlines()
             if "name clash" in line or "ignoring a beacon" in line
             or "ignored a datagram" in line]
    print(f"{sent[0]} bad datagrams sent; A's counters {seen}; {len(lines)} lines about them")
    assert bodies(b.data_dir, "in") == ["under the flood"]
    assert {p["name"] for p in status(a)["peers"]} == {"B"}
    # Three kinds of lines (clash, refused, garbage), each 20 at once, then one every 10 s.
    assert len(lines) <= 3 * (20 + elapsed / 10 + 1), (len(lines), elapsed)
    assert seen["clashes"] > 0 and seen["garbage"] > 0 and seen["names_refused"] > 0
    assert seen["endpoints_refused"] > 0 and seen["other_mesh"] > 0
    assert seen["other_version"] > 0
    assert seen["lines_not_logged"] > 0


def test_a_beacon_from_another_host_cannot_reach_a_nodes_local_services(
    namespaces: list[str],  # noqa: F811 (the fixture imported above)
    short_tmp: Path,
) -> None:
    """A runs in a network namespace of its own (10.213.77.1), with a service on its loopback
    (127.0.0.1:PORT, as a database or a cache listens) and one on a unix socket. From another
    namespace (another host of the LAN) a stranger beacons two names at those: `tcp://
    127.0.0.1:PORT`, `ipc://PATH`. Before: A dialed both, its own local services, for a
    datagram from elsewhere (a ZMTP greeting to each, and again at every reconnect). Now both
    refused: a tcp endpoint must be at the beacon's source, an ipc path only from loopback."""
    a_ns, stranger_ns = namespaces[0], namespaces[1]
    accepted = short_tmp / "accepted"
    service = subprocess.Popen(
        ["ip", "netns", "exec", a_ns, sys.executable, "-c",
         "import socket, sys\n"
         "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(16)\n"
         "print(s.getsockname()[1], flush=True)\n"
         "while True:\n"
         "    c, _ = s.accept()\n"
         f"    open({str(accepted)!r}, 'a').write('tcp\\n')\n"],
        stdout=subprocess.PIPE, text=True)
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix_path = short_tmp / "svc.sock"
    unix.bind(str(unix_path))
    unix.listen(16)
    unix.settimeout(0.05)
    a = NamespacedNode(
        "A", short_tmp / "unused.toml", short_tmp / "A", short_tmp / "A.log",
        extra_args=["--discover", str(NETNS_BEACON_PORT), "--beacon-interval", "0.2",
                    "--insecure"],
        bind="tcp://0.0.0.0:7000", netns=a_ns)
    try:
        assert service.stdout is not None
        port = int(service.stdout.readline())
        a.start().wait_ready()
        beacons = [forged("cache", "00000000000000c1", f"tcp://127.0.0.1:{port}"),
                   forged("docker", "00000000000000c2", f"ipc://{unix_path}")]
        send_from = ("import socket, sys\n"
                     "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                     "for h in sys.argv[1:]:\n"
                     f"    s.sendto(bytes.fromhex(h), ('{NETNS_SUBNET}.1', {NETNS_BEACON_PORT}))\n")
        done = subprocess.run(["ip", "netns", "exec", stranger_ns, sys.executable, "-c",
                               send_from, *(b.hex() for b in beacons)],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        unix_dialed: list[socket.socket] = []

        def decided() -> bool:
            with contextlib.suppress(TimeoutError):
                unix_dialed.append(unix.accept()[0])
            roles = status(a)["status"].get("roles") or {}
            return (accepted.exists() or bool(unix_dialed)
                    or roles.get("discovery", {}).get("endpoints_refused", 0) >= 2)

        wait_until(decided, WAIT_S, "A dialing its local services or refusing the beacons")
        for conn in unix_dialed:
            conn.close()
        assert not accepted.exists(), "A dialed its own loopback service for a remote beacon"
        assert unix_dialed == [], "A dialed a local unix socket for a remote beacon"
        assert {p["name"] for p in status(a)["peers"]} == set()
        assert "an ipc path in a beacon from another machine" in a.log()
    finally:
        with contextlib.suppress(Exception):
            a.stop()
        service.kill()
        service.wait(10)
        if service.stdout is not None:
            service.stdout.close()
        unix.close()

"""Discovery over a real broadcast domain: three nodes in three network namespaces joined by
a bridge, each with its own address, beacons to the default broadcast address.

Needs root and `ip netns`; the namespaces, veth pairs and bridge are created here and removed
afterwards, and the host has no address on the bridge, so no traffic leaves them. Elsewhere
the test skips with the reason.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import wait_until
from tests.integration.test_discovery import DiscoveringNode, bodies, connected, send

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

WAIT_S = 40.0
#: A private subnet that exists only on the test's bridge.
SUBNET = "10.213.77"
BEACON_PORT = 5671


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)


def _why_not() -> str | None:
    if sys.platform != "linux":
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2)"
    probe = f"mpprobe{os.getpid() % 100000}"
    made = _ip("netns", "add", probe)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    _ip("netns", "del", probe)
    return None


@dataclasses.dataclass
class NamespacedNode(DiscoveringNode):
    """A discovering node run inside network namespace `netns`."""

    netns: str = ""

    def command(self) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *super().command()]


@pytest.fixture
def namespaces() -> Iterator[list[str]]:
    reason = _why_not()
    if reason:
        pytest.skip(reason)
    tag = f"mp{os.getpid() % 100000}"
    bridge, names = f"{tag}br", [f"{tag}n{i}" for i in (1, 2, 3)]
    try:
        for step in (["link", "add", bridge, "type", "bridge"], ["link", "set", bridge, "up"]):
            assert _ip(*step).returncode == 0, step
        for i, ns in enumerate(names, start=1):
            host_end, ns_end = f"{tag}v{i}", f"{tag}p{i}"
            for step in (
                ["netns", "add", ns],
                ["link", "add", host_end, "type", "veth", "peer", "name", ns_end],
                ["link", "set", ns_end, "netns", ns],
                ["link", "set", host_end, "master", bridge, "up"],
                ["-n", ns, "addr", "add", f"{SUBNET}.{i}/24", "dev", ns_end],
                ["-n", ns, "link", "set", ns_end, "up"],
                ["-n", ns, "link", "set", "lo", "up"],
                # The limited broadcast (255.255.255.255) needs a route to leave by.
                ["-n", ns, "route", "add", "default", "dev", ns_end],
            ):
                done = _ip(*step)
                assert done.returncode == 0, f"ip {' '.join(step)}: {done.stderr}"
        yield names
    finally:
        for ns in names:
            _ip("netns", "del", ns)  # takes its veth pair with it
        _ip("link", "del", bridge)


def test_three_nodes_in_three_namespaces_find_each_other_by_broadcast(
    namespaces: list[str], short_tmp: Path,
) -> None:
    nodes = [
        NamespacedNode(
            name, short_tmp / "unused.toml", short_tmp / name, short_tmp / f"{name}.log",
            # Listening beyond loopback (in a namespace this test made) without CURVE: the
            # explicit opt-out since issue 16 item 7.
            extra_args=["--discover", str(BEACON_PORT), "--beacon-interval", "0.2",
                        "--insecure"],
            bind="tcp://0.0.0.0:7000", netns=ns,
        )
        for name, ns in zip("ABC", namespaces, strict=True)
    ]
    try:
        for node in nodes:
            node.start()
        for node in nodes:
            node.wait_ready()
        a, b, c = nodes
        for node, others in ((a, {"B", "C"}), (b, {"A", "C"}), (c, {"A", "B"})):
            wait_until(lambda n=node, o=others: connected(n) == o, WAIT_S,
                       f"{node.name} connected to {others} across namespaces")
        # Each dialed the others at their own addresses (the beacons' sources).
        assert {p.endpoint for p in a.peers()} == {f"tcp://{SUBNET}.2:7000",
                                                    f"tcp://{SUBNET}.3:7000"}
        assert send(a, "all", "por la LAN") == 0
        assert send(c, "B", "de C a B") == 0
        assert bodies(b.data_dir, "in") == ["por la LAN", "de C a B"]
        assert bodies(c.data_dir, "in") == ["por la LAN"]
    finally:
        for node in nodes:
            with contextlib.suppress(Exception):
                node.stop()

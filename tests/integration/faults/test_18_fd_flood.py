"""17. File-descriptor flood (issue 16, item 5): B runs with a hard RLIMIT_NOFILE of 256, the
test opens 300 idle TCP connections to B's port, and while they are open B's control endpoint
is used (`meshpost peers`, sends from B) and A -> B keeps flowing.

Before the fix the idle connections took every descriptor B had, and the next accept on the
control socket (libzmq's ipc listener asserts on EMFILE) aborted B with exit 134. Checked now:
B stays alive, caps its inbound connections (refusing and counting the ones over the cap), its
control commands answer, and the messages both ways are stored once and receipted.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import select
import socket
import subprocess
import sys
import time

import pytest

from meshpost.cluster import NodeProcess
from meshpost.control.messages import PeersRequest

from .conftest import MeshFactory

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.timeout(240)]

#: B's soft and hard descriptor limit: the node cannot raise it past this.
FD_LIMIT = 256
#: Idle connections opened against B: more than its whole descriptor limit.
IDLE = 300
#: Control requests made while the connections are open (peers, then sends B -> A).
CONTROL_ROUNDS = 5
#: Bound for each `meshpost peers` run and for closing the idle connections.
COMMAND_TIMEOUT_S = 30.0

_LIMITED = ("import os, resource, sys; n = int(sys.argv[1]); "
            "resource.setrlimit(resource.RLIMIT_NOFILE, (n, n)); "
            "os.execv(sys.argv[2], sys.argv[2:])")


class LimitedNode(NodeProcess):
    """A `meshpost node` started with RLIMIT_NOFILE lowered (soft and hard) to FD_LIMIT."""

    def command(self) -> list[str]:
        return [sys.executable, "-c", _LIMITED, str(FD_LIMIT), *super().command()]


class IdleConnections:
    """Plain TCP connections that never say a byte; counts the ones the node closes."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.socks: list[socket.socket] = []
        self.failed = 0
        self.closed = 0

    def open(self, count: int) -> None:
        for _ in range(count):
            try:
                s = socket.create_connection(("127.0.0.1", self.port), timeout=5)
            except OSError:
                self.failed += 1  # the backlog was full: refused before any descriptor
                continue
            s.setblocking(False)
            self.socks.append(s)

    def reap(self) -> None:
        """Forget the connections the node closed (EOF or reset)."""
        if not self.socks:
            return
        poller = select.poll()  # not select(): the test's own descriptors may pass 1024
        by_fd = {s.fileno(): s for s in self.socks}
        for fd in by_fd:
            poller.register(fd, select.POLLIN)
        for fd, _ in poller.poll(0):
            s = by_fd[fd]
            try:
                if s.recv(4096):
                    continue
            except BlockingIOError:
                continue
            except OSError:
                pass
            self.socks.remove(s)
            s.close()
            self.closed += 1

    def close(self) -> None:
        for s in self.socks:
            s.close()
        self.socks.clear()


def _peers_command(data_dir: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshpost", "peers", "--node", "B", "--data", data_dir],
        capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False)


def test_fd_flood_leaves_control_and_peers_working(mesh_factory: MeshFactory) -> None:
    mesh = mesh_factory(["A", "B"], transport="tcp", seed=17)
    port = int(mesh.endpoint("B").rsplit(":", 1)[1])

    async def scenario() -> None:
        b = LimitedNode("B", mesh.cluster.config_path, mesh.data_dir("B"),
                        mesh.root / "logs" / "B.log")
        mesh.cluster.nodes["B"] = b
        b.start()
        await asyncio.to_thread(mesh.start_real, ["A"])
        await asyncio.to_thread(b.wait_ready)
        assert mesh.ps("B").rlimit(resource.RLIMIT_NOFILE) == (FD_LIMIT, FD_LIMIT)
        await mesh.wait_connected("A")
        await mesh.stream("A", "B", 10, tag="before", concurrency=10)

        idle = IdleConnections(port)
        mesh.cleanups.append(idle.close)
        done = asyncio.Event()
        good = mesh.keep_streaming("A", "B", done, pause_s=0.05)
        await asyncio.to_thread(idle.open, IDLE)
        fds_peak = mesh.ps("B").num_fds()
        peers_ok = 0
        control_ok = 0
        for round_ in range(CONTROL_ROUNDS):
            result = await asyncio.to_thread(_peers_command, str(mesh.data_dir("B")))
            assert mesh.alive("B"), (f"B died at `meshpost peers` during the flood "
                                     f"(exit {b.process.poll() if b.process else None}):\n"
                                     f"{mesh.log_tail('B')}")
            peers_ok += result.returncode == 0 and "A" in result.stdout
            reply = await mesh.control("B", PeersRequest(), timeout_s=COMMAND_TIMEOUT_S)
            control_ok += reply.ok
            await mesh.send("B", "A", f"from B during the flood {round_}")
            fds_peak = max(fds_peak, mesh.ps("B").num_fds())
        done.set()
        await good
        idle.reap()
        status = await mesh.status("B")
        stats = status["stats"]
        deadline = time.monotonic() + COMMAND_TIMEOUT_S
        while idle.socks and time.monotonic() < deadline:
            idle.reap()
            await asyncio.sleep(0.2)
        mesh.extra.update({
            "fd_limit_B": FD_LIMIT,
            "idle_opened": IDLE - idle.failed,
            "idle_connect_failed": idle.failed,
            "idle_closed_by_B": idle.closed,
            "fds_peak_B": fds_peak,
            "inbound_refused_B": stats.get("inbound_refused", 0),
            "peers_ok": f"{peers_ok}/{CONTROL_ROUNDS}",
            "control_ok": f"{control_ok}/{CONTROL_ROUNDS}",
        })
        assert mesh.alive("B"), mesh.log_tail("B")
        with contextlib.suppress(Exception):
            idle.close()
        counts = await mesh.finish()
        assert peers_ok == control_ok == CONTROL_ROUNDS
        assert stats.get("inbound_refused", 0) > 0, "B counted no refused connection"
        assert counts.accepted == counts.receipted == counts.stored == counts.attempted

    mesh.run(scenario)

"""5. Link faults through a fault-injecting TCP proxy: every peer endpoint points at a proxy in
front of the real one; the proxies cycle through reset, black hole, latency with jitter, tiny
writes and a byte limit per connection, then heal."""

from __future__ import annotations

import asyncio
import random

import pytest

from meshpost.cluster import free_tcp_ports

from .checker import make_body
from .conftest import MeshFactory
from .proxy import FaultProxy

pytestmark = [pytest.mark.faults, pytest.mark.integration]

#: (mode, seconds). The black hole outlasts ZeroMQ's 3 s heartbeat timeout and the protocol's
#: 1.5 s peer timeout, so both ends give up on the connection and reconnect through it.
PHASES = [("pass", 0.8), ("reset", 0.8), ("pass", 0.5), ("blackhole", 4.0), ("latency", 2.0),
          ("tiny", 2.0), ("bytelimit", 2.5), ("reset", 0.5), ("pass", 0.5)]


def _port(endpoint: str) -> int:
    return int(endpoint.rsplit(":", 1)[1])


def test_link_faults_through_proxy(mesh_factory: MeshFactory) -> None:
    to_r, to_s = free_tcp_ports(2)
    mesh = mesh_factory(["S", "R"], real=["R"], transport="tcp", seed=5,
                        connect={"R": f"tcp://127.0.0.1:{to_r}", "S": f"tcp://127.0.0.1:{to_s}"})

    async def scenario() -> None:
        rng = random.Random(55)
        proxies = [FaultProxy(to_r, _port(mesh.endpoint("R")), rng),
                   FaultProxy(to_s, _port(mesh.endpoint("S")), rng)]
        for proxy in proxies:
            await proxy.start()
            mesh.healers.append(proxy.heal)
        try:
            await mesh.start()
            total_s = sum(s for _, s in PHASES)
            s_stream = mesh.spawn_task(
                mesh.stream("S", "R", int(total_s * 100), tag="S>R", concurrency=10, pause_s=0.1)
            )

            async def r_stream() -> None:
                for i in range(int(total_s / 0.3)):
                    mesh.spawn_task(mesh.send("R", "S", make_body(mesh.rng, "R>S", i),
                                              receipt_timeout_s=1.0))
                    await asyncio.sleep(0.3)

            r_task = mesh.spawn_task(r_stream())
            for mode, seconds in PHASES:
                for proxy in proxies:
                    proxy.set(mode)
                await asyncio.sleep(seconds)
                mesh.assert_no_receipt_without_commit(f"after {mode}")
            await s_stream
            await r_task
            for name, proxy in zip(("to_R", "to_S"), proxies, strict=True):
                mesh.extra[f"{name}_connections"] = proxy.stats.connections
                mesh.extra[f"{name}_resets"] = proxy.stats.resets
            counts = await mesh.finish()
            assert counts.accepted == counts.attempted
            assert proxies[0].stats.resets > 0 and proxies[0].stats.connections > 2
        finally:
            for proxy in proxies:
                await proxy.close()

    mesh.run(scenario)

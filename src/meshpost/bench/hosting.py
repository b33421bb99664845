"""The `host-driver` role: one helper process hosting a run of a mesh's nodes (`NodeHost`),
driving all of them at once for the mesh scenario with `--per-process`.

Rule: the same commands and the same counting as a one-node driver (`drive`): a message
counts once its sender recorded its receipt, a wait fails on lack of progress, and the
replies sum the hosted nodes' figures; CPU and RSS are the whole process's.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from meshpost.bench.drive import ProgressTicker, post_windowed, wait_connected
from meshpost.bench.support import body as make_body
from meshpost.bench.support import emit
from meshpost.config import MeshConfig
from meshpost.host import NodeHost, node_configs, select_nodes
from meshpost.node import Node


def rss_bytes() -> int:
    """This process's resident memory now (not its peak), from /proc."""
    with open("/proc/self/statm", encoding="ascii") as f:
        pages = int(f.read().split()[1])
    import resource

    return pages * resource.getpagesize()


class HostDriver:
    """The nodes of one host and the commands that drive them together."""

    def __init__(self, host: NodeHost, targets: dict[str, list[str]]) -> None:
        self.host = host
        #: Who each node sends to: its own `peers` list (the k it drew), else every peer.
        self.targets = targets
        self._done: dict[str, int] = {}
        self._tick = ProgressTicker()

    @property
    def nodes(self) -> list[Node]:
        return [h.node for h in self.host.nodes.values() if h.node is not None]

    def _progress(self, name: str) -> Callable[[int], None]:
        def tick(done: int) -> None:
            self._done[name] = done
            self._tick(sum(self._done.values()))
        return tick

    async def connect(self, cmd: dict[str, Any]) -> dict[str, Any]:
        timeout = float(cmd.get("timeout", 60))
        replies = await asyncio.gather(*(wait_connected(n, timeout) for n in self.nodes))
        errors = [r["error"] for r in replies if "error" in r]
        return {"error": f"{len(errors)} node(s) not connected: {errors[:3]}"} if errors \
            else {"connected": True}

    async def mesh(self, cmd: dict[str, Any]) -> dict[str, Any]:
        count, body = int(cmd["count"]), make_body(int(cmd["size"]))
        window, stall = int(cmd["window"]), float(cmd["stall"])

        async def one(node: Node) -> tuple[float, float]:
            rng = random.Random(f"{cmd['seed']}-{node.name}")
            peers = self.targets.get(node.name) or node.config.peer_names

            def plan(n: int) -> list[tuple[str, int]]:
                split: dict[str, int] = {}
                for peer in rng.choices(peers, k=n):
                    split[peer] = split.get(peer, 0) + 1
                return list(split.items())

            t0 = time.monotonic()
            await post_windowed(node, plan, count, body, window, stall,
                                self._progress(node.name))
            return t0, time.monotonic()

        nodes = self.nodes
        times = await asyncio.gather(*(one(n) for n in nodes))
        stats = [n.snapshot_stats() for n in nodes]
        return {"t0": min(t for t, _ in times), "t1": max(t for _, t in times),
                "sent": count * len(nodes),
                "retransmissions": sum(s.retransmissions for s in stats),
                "store_commits": sum(s.store_commits for s in stats)}

    async def cpu(self, _cmd: dict[str, Any]) -> dict[str, Any]:
        return {"cpu_s": time.process_time(), "rss": rss_bytes(),
                "serving": len(self.host.serving), "failures": self.host.failures}


async def host_driver(config: Path, spec: str) -> None:
    """Host the nodes `spec` of `config` and run the parent's commands until told to stop."""
    mesh = MeshConfig.load(config)
    names = select_nodes(mesh, spec)
    own = {e.name: list(e.peers) for e in mesh.nodes if e.peers is not None}
    loop = asyncio.get_running_loop()
    async with NodeHost(node_configs(mesh, names)) as host:
        if host.failures:
            failed = {h.name: h.error for h in host.nodes.values() if h.error}
            emit({"error": f"{host.failures} hosted node(s) did not start: "
                           f"{dict(list(failed.items())[:3])}"})
            return
        driver = HostDriver(host, {n: own[n] for n in names if n in own})
        ops: dict[str, Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]] = {
            "connect": driver.connect, "mesh": driver.mesh, "cpu": driver.cpu}
        emit({"ready": True, "nodes": len(names)})
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                break
            cmd = json.loads(line)
            if cmd.get("op") == "stop":
                break
            handler = ops.get(cmd.get("op", ""))
            try:
                emit(await handler(cmd) if handler is not None
                     else {"error": f"unknown op {cmd.get('op')!r}"})
            except Exception as exc:
                emit({"error": f"{type(exc).__name__}: {exc}"})
    emit({"stopped": True})

"""CPU an idle mesh costs (not part of `make test`): N full nodes in this one process, real
ZeroMQ sockets over ipc, real SQLite stores, every node every other's peer (a mesh config).

Phases, each measured as process CPU time (user + system, `psutil`) over `--seconds` of wall
time, with the number of DEALER sockets open (links that hold a connection):
1. `start`: after start (and after every link is connected, where links dial at start);
2. `after-traffic`: every node has sent one message to every other, each receipted; measured
   at once (links are open and recently active);
3. `idle`: after `link_idle_s` more (the links closed themselves, where they do).

    .venv/bin/python benchmarks/idle_cpu.py --nodes 50 --seconds 10 --link-idle-s 5
    PYTHONPATH=/path/to/other/src .venv/bin/python benchmarks/idle_cpu.py ...   # A/B

Prints one line per phase: `phase cpu_ms_per_s=.. pct_of_core=.. open_links=..`.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import tempfile
import time
from pathlib import Path

import psutil

from meshpost.config import NodeConfig, PeerConfig
from meshpost.node import Node, wait_receipt


def configs(root: Path, count: int, options: dict[str, object]) -> list[NodeConfig]:
    names = [f"n{i:04d}" for i in range(count)]
    endpoints = {n: f"ipc://{root}/{n}.sock" for n in names}
    known = {f.name for f in dataclasses.fields(NodeConfig)}
    extra = {k: v for k, v in options.items() if k in known}
    return [
        NodeConfig(name=n, bind=(endpoints[n],), data_dir=root / n, sync="normal",
                   peers=tuple(PeerConfig(p, endpoints[p]) for p in names if p != n), **extra)
        for n in names
    ]


def open_links(nodes: list[Node]) -> int:
    total = 0
    for node in nodes:
        transport = node._transport  # a measurement script may look inside
        total += len(getattr(transport, "_dealers", {}))
    return total


async def measure(label: str, nodes: list[Node], seconds: float) -> None:
    proc = psutil.Process()
    before, start = proc.cpu_times(), time.monotonic()
    await asyncio.sleep(seconds)
    after, elapsed = proc.cpu_times(), time.monotonic() - start
    cpu = (after.user - before.user) + (after.system - before.system)
    print(f"{label:14s} cpu_ms_per_s={1000 * cpu / elapsed:8.2f} "
          f"pct_of_core={100 * cpu / elapsed:6.2f} open_links={open_links(nodes)}", flush=True)


async def main(args: argparse.Namespace) -> None:
    options: dict[str, object] = {}
    if args.link_idle_s is not None:
        options["link_idle_s"] = args.link_idle_s
    with tempfile.TemporaryDirectory(prefix="meshpost-idle-") as tmp:
        nodes = [Node(c) for c in configs(Path(tmp), args.nodes, options)]
        for node in nodes:
            await node.start()
        try:
            if all(node.config.peers and len(node.config.peers) <= getattr(
                    node.config, "dial_at_start", 1 << 30) for node in nodes):
                for _ in range(1200):  # at most 120 s
                    if all(p.connected for n in nodes for p in n.peers()):
                        break
                    await asyncio.sleep(0.1)
            await asyncio.sleep(1.0)
            await measure("start", nodes, args.seconds)
            handles = []
            for node in nodes:
                for peer in node.config.peers:
                    handles += await node.post(peer.name, f"hello {peer.name}")
            for handle in handles:
                await wait_receipt(handle, 120.0)
            await measure("after-traffic", nodes, args.seconds)
            idle_s = float(getattr(nodes[0].config, "link_idle_s", 0.0))
            if idle_s:
                await asyncio.sleep(idle_s + 1.0)
                await measure("idle", nodes, args.seconds)
        finally:
            for node in nodes:
                await node.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--link-idle-s", type=float, default=None,
                        help="NodeConfig.link_idle_s (ignored by code without it)")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"),
                        help="event loop of the nodes' process (default: meshpost's own)")
    args = parser.parse_args()
    try:
        from meshpost import eventloop
    except ImportError:  # an older tree on PYTHONPATH (an A/B): asyncio, as it ran
        asyncio.run(main(args))
    else:
        loop = eventloop.choose(args.loop)
        print(f"event loop: {loop}")
        eventloop.run(main(args), loop)

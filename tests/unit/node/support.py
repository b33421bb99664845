"""What the Node unit tests share: a pair of nodes A and B on an in-memory network and one
fake clock, with real stores in tmp_path (`node_pair`), and bounded waits."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any, NamedTuple

from meshpost.clock import FakeClock
from meshpost.config import NodeConfig, PeerConfig
from meshpost.node import Node
from meshpost.protocol import decode
from meshpost.transport import MemoryNetwork

#: Upper bound for any wait in these tests; reaching it means a bug, not a slow machine.
PATIENCE_S = 10.0


def run(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), PATIENCE_S * 2))


def config(name: str, other: str, tmp_path: Path) -> NodeConfig:
    return NodeConfig(
        name=name, bind=(f"ipc://{tmp_path}/{name}.sock",),
        peers=(PeerConfig(other, f"ipc://{tmp_path}/{other}.sock"),),
        data_dir=tmp_path / name, sync="normal",
    )


async def until(condition: Callable[[], bool]) -> None:
    """Yield to the loop until `condition` holds (bounded by the caller's timeout)."""
    async with asyncio.timeout(PATIENCE_S):
        while not condition():
            await asyncio.sleep(0.002)


def connected(node: Node) -> bool:
    return all(p.connected for p in node.peers())


def frame_kinds(net: MemoryNetwork, sender: str) -> list[str]:
    return [type(decode(data, max_bytes=1 << 24)).__name__
            for frm, _to, data in net.log if frm == sender]


class Pair(NamedTuple):
    a: Node
    b: Node
    net: MemoryNetwork
    clock: FakeClock


@contextlib.asynccontextmanager
async def node_pair(
    tmp_path: Path, *, connect: bool = True, start_b: bool = True,
    groups: dict[str, tuple[str, ...]] | None = None, **a_parts: Any,
) -> AsyncIterator[Pair]:
    """Nodes A and B, peers of each other, started (B only with `start_b`) and, with
    `connect`, A connected to B; closed on exit. `groups` are A's configured groups;
    `a_parts` go to A's constructor (e.g. `probe=`)."""
    net, clock = MemoryNetwork(), FakeClock()
    a_config = config("A", "B", tmp_path)
    if groups is not None:
        a_config = dataclasses.replace(a_config, groups=groups)
    a = Node(a_config, clock=clock, transport=net.transport("A"), **a_parts)
    b = Node(config("B", "A", tmp_path), clock=clock, transport=net.transport("B"))
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(a)
        if start_b:
            await stack.enter_async_context(b)
        if connect:
            await until(lambda: connected(a))
        yield Pair(a, b, net, clock)

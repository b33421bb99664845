"""Driving a node for the bench: posting with a bounded window, waiting for connections, and
the node roles of helper processes (`driver`, `timeline-peer`).

Rule: a message counts once its receipt is recorded by the sender; a wait fails on lack of
progress (no receipt for a stall period), never on a total time that a slow machine exceeds.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from meshpost.bench.options import READY_TIMEOUT_S, STALL_S, BenchError
from meshpost.bench.support import body as make_body
from meshpost.bench.support import emit
from meshpost.config import MeshConfig
from meshpost.node import Node
from meshpost.protocol import MAX_BATCH_MESSAGES
from meshpost.timeline import Mark, MarkRecorder

#: `post_many` chunk: one full batch frame.
CHUNK = MAX_BATCH_MESSAGES


async def driver(config: Path, name: str, data_dir: Path) -> None:
    """A full node under this process's control: runs the parent's commands (`OPS`) in turn."""
    cfg = MeshConfig.load(config).node(name, data_dir=data_dir)
    loop = asyncio.get_running_loop()
    async with Node(cfg) as node:
        emit({"ready": True, "pid": os.getpid()})
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                break
            cmd = json.loads(line)
            op = cmd.get("op")
            if op == "stop":
                break
            handler = OPS.get(op)
            try:
                emit(await handler(node, cmd) if handler is not None
                     else {"error": f"unknown op {op!r}"})
            except Exception as exc:
                emit({"error": f"{type(exc).__name__}: {exc}"})
    emit({"stopped": True})


async def timeline_peer(config: Path, name: str, data_dir: Path, marks: list[Mark]) -> None:
    """A node with the timeline's probe, stamping into `marks` until told to stop."""
    cfg = MeshConfig.load(config).node(name, data_dir=data_dir)
    loop = asyncio.get_running_loop()
    recorder = MarkRecorder(marks)
    recorder.track_gc()
    async with Node(cfg, probe=recorder):
        emit({"ready": True, "pid": os.getpid()})
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line or json.loads(line).get("op") == "stop":
                break



async def wait_connected(node: Node, timeout_s: float) -> dict[str, Any]:
    node.connect()  # links are lazy: open them all now, so the phase starts connected
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(p.connected for p in node.peers()):
            return {"connected": True}
        await asyncio.sleep(0.05)
    missing = [p.name for p in node.peers() if not p.connected]
    return {"error": f"{node.name} not connected to {missing[:5]} after {timeout_s:.0f}s"}


class ProgressTicker:
    """Emits a progress line at most every 0.2 s."""

    def __init__(self) -> None:
        self._next = 0.0

    def __call__(self, done: int, *, force: bool = False) -> None:
        now = time.monotonic()
        if force or now >= self._next:
            self._next = now + 0.2
            emit({"progress": done})


async def post_windowed(
    node: Node, plan: Callable[[int], list[tuple[str, int]]], count: int, body: str,
    window: int, stall_s: float, tick: Callable[[int], None],
) -> None:
    """Post `count` messages, at most `window` unreceipted; `plan(n)` splits n over peers.

    Fails only when no receipt at all arrives for `stall_s` seconds.
    """
    base = node.stats.delivered

    async def until(target: int) -> None:
        last, since = node.stats.delivered, time.monotonic()
        while node.stats.delivered < target:
            await node.wait_delivered(target, 0.2)
            tick(node.stats.delivered - base)
            if node.stats.delivered != last:
                last, since = node.stats.delivered, time.monotonic()
            elif time.monotonic() - since > stall_s:
                raise BenchError(f"no receipt for {stall_s:.0f}s at {last - base} of {count}")

    posted = 0
    while posted < count:
        n = min(CHUNK, window // 2 or 1, count - posted)
        await until(base + posted + n - window)
        for peer, k in plan(n):
            await node.post_many(peer, [body] * k)
        posted += n
        tick(node.stats.delivered - base)
    await until(base + count)


async def drive_mesh(node: Node, cmd: dict[str, Any]) -> dict[str, Any]:
    rng = random.Random(f"{cmd['seed']}-{node.name}")
    peers = node.config.peer_names
    count, body = int(cmd["count"]), make_body(int(cmd["size"]))

    def plan(n: int) -> list[tuple[str, int]]:
        split: dict[str, int] = {}
        for peer in rng.choices(peers, k=n):
            split[peer] = split.get(peer, 0) + 1
        return list(split.items())

    t0 = time.monotonic()
    await post_windowed(node, plan, count, body, int(cmd["window"]), float(cmd["stall"]),
                         ProgressTicker())
    t1 = time.monotonic()
    stats = node.snapshot_stats()
    return {"t0": t0, "t1": t1, "sent": count, "retransmissions": stats.retransmissions,
            "store_commits": stats.store_commits}


async def drive_queue(node: Node, cmd: dict[str, Any]) -> dict[str, Any]:
    peer, count, body = str(cmd["peer"]), int(cmd["count"]), make_body(int(cmd["size"]))
    tick = ProgressTicker()
    t0 = time.monotonic()
    posted = 0
    while posted < count:
        n = min(1000, count - posted)
        await node.post_many(peer, [body] * n)
        posted += n
        tick(posted)
    await node.flush()
    tick(posted, force=True)
    return {"queued": posted, "seconds": time.monotonic() - t0,
            "pending": await node.pending_count()}


async def drive_drain(node: Node, count: int, timeout_s: float) -> dict[str, Any]:
    tick = ProgressTicker()
    deadline = time.monotonic() + timeout_s
    while node.stats.delivered < count:
        await node.wait_delivered(count, 0.2)
        tick(node.stats.delivered)
        if time.monotonic() > deadline:
            raise BenchError(f"drain stalled at {node.stats.delivered} of {count}")
    return {"t_done": time.monotonic(), "delivered": node.stats.delivered}



async def drive_saturated(node: Node, cmd: dict[str, Any]) -> dict[str, Any]:
    """Post `count` messages split evenly over every peer, as fast as the links take them.

    The only bound is the sum of the link windows (each link holds at most `NodeConfig.window`
    unreceipted; the node keeps the rest on disk until its link has room), so every link of the
    mesh is busy at once. Messages go out in round-robin pieces of one peer's share (at most a
    full batch), so that batches stay large and every peer gets the same count.
    """
    peers = node.config.peer_names
    count, body = int(cmd["count"]), make_body(int(cmd["size"]))
    left = {p: count // len(peers) + (1 if i < count % len(peers) else 0)
            for i, p in enumerate(peers)}
    piece = max(1, min(CHUNK, count // len(peers)))
    turn = 0

    def plan(n: int) -> list[tuple[str, int]]:
        nonlocal turn
        out: list[tuple[str, int]] = []
        while n > 0:
            peer = peers[turn % len(peers)]
            turn += 1
            k = min(n, left[peer], piece)
            if k:
                out.append((peer, k))
                left[peer] -= k
                n -= k
        return out

    t0 = time.monotonic()
    await post_windowed(node, plan, count, body, node.config.window * len(peers),
                        float(cmd["stall"]), ProgressTicker())
    t1 = time.monotonic()
    stats = node.snapshot_stats()
    return {"t0": t0, "t1": t1, "sent": count, "retransmissions": stats.retransmissions,
            "store_commits": stats.store_commits}


async def cpu_seconds(_node: Node, _cmd: dict[str, Any]) -> dict[str, Any]:
    """This process's CPU time (every thread, nanosecond resolution): read before and after a
    phase, it is what the phase cost, whatever else the machine did meanwhile."""
    return {"cpu_s": time.process_time()}


async def counters(node: Node, _cmd: dict[str, Any]) -> dict[str, Any]:
    """Counters to read once every driver is done: a node receives duplicates (what other
    nodes resent to it) after its own messages are all receipted."""
    stats = node.snapshot_stats()
    return {"duplicates": stats.duplicates, "retransmissions": stats.retransmissions,
            "spurious_retransmissions": stats.spurious_retransmissions}


async def _connect(node: Node, cmd: dict[str, Any]) -> dict[str, Any]:
    return await wait_connected(node, float(cmd.get("timeout", 60)))


async def _drain(node: Node, cmd: dict[str, Any]) -> dict[str, Any]:
    return await drive_drain(node, int(cmd["count"]), float(cmd["timeout"]))


#: The driver's commands: op -> handler(node, command) returning the reply.
OPS: dict[str, Callable[[Node, dict[str, Any]], Awaitable[dict[str, Any]]]] = {
    "connect": _connect,
    "mesh": drive_mesh,
    "saturate": drive_saturated,
    "queue": drive_queue,
    "drain": _drain,
    "cpu": cpu_seconds,
    "counters": counters,
}


async def wait_connected_or_fail(node: Node) -> None:
    reply = await wait_connected(node, READY_TIMEOUT_S)
    if "error" in reply:
        raise BenchError(reply["error"])


async def post_in_process(node: Node, peer: str, count: int, body: str, window: int,
                           on_progress: Callable[[int], None]) -> None:
    await post_windowed(node, lambda n: [(peer, n)], count, body, window, STALL_S, on_progress)


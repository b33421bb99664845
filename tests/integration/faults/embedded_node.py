"""A test helper process that embeds a `Node` and sends through its Python API.

Run as a script (`python embedded_node.py ...`); it is a real process, so the battery can
kill -9 it, measure its memory, or let a crash hook end it, without touching pytest. It writes
its observations as JSON lines (flushed one by one, so they survive a kill -9):

  {"ev": "ready", "pid": ...}
  {"ev": "attempt", "body": ...}                     before each post()
  {"ev": "accepted", "body", "id", "seq", "sent_at_ns"}  when post() returned (committed)
  {"ev": "receipt", "id": ...}
  {"ev": "chunk-attempt", "k": k}                    before post_many() of chunk k
  {"ev": "chunk-accepted", "k": k, "n": n, "rss": ...}   post_many() returned (+ flush)
  {"ev": "refused", "body": ..., "error": ...}
  {"ev": "done", ...}

Commands:
  crash  --to B --count N --tag T --point POINT   arm the crash hook once the link is up,
                                                  then post N messages one at a time
  flood  --to B --chunks K --chunk-size N --tag T --size BYTES [--flush-each] [--invalid]
         [--wait-connected --delay S]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import IO, Any

import psutil

from meshpost.config import MeshConfig
from meshpost.errors import MeshpostError
from meshpost.node import CrashPoint, Node


def flood_body(tag: str, k: int, i: int, size: int) -> str:
    """Body of message i of chunk k (the checker rebuilds the same bodies)."""
    head = f"{tag}/c{k:03d}/{i:05d}/"
    return head + "x" * max(0, size - len(head))


class Out:
    def __init__(self, path: Path) -> None:
        self._file: IO[str] = open(path, "a", encoding="utf-8")  # noqa: SIM115

    def __call__(self, **fields: Any) -> None:
        self._file.write(json.dumps(fields) + "\n")
        self._file.flush()


def rss() -> int:
    return int(psutil.Process().memory_info().rss)


async def wait_connected(node: Node, peer: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(p.name == peer and p.connected for p in node.peers()):
            return
        await asyncio.sleep(0.02)
    raise SystemExit(f"{peer} not connected after {timeout_s}s")


async def crash(node: Node, out: Out, args: argparse.Namespace) -> None:
    await wait_connected(node, args.to)
    # Armed only now: the first transmit after this point carries the batch posted below
    # (the helper's pings are slowed down so that none comes in between).
    node._crash_at = CrashPoint(args.point)
    out(ev="armed", point=args.point)
    for i in range(args.count):
        body = f"{args.tag}#{i:06d}"
        out(ev="attempt", body=body)
        (handle,) = await node.post(args.to, body)
        out(ev="accepted", body=body, id=handle.id, seq=handle.seq, sent_at_ns=handle.sent_at_ns)
    await asyncio.sleep(5)
    out(ev="done", note="the crash hook never fired")


async def flood(node: Node, out: Out, args: argparse.Namespace) -> None:
    if args.wait_connected:
        await wait_connected(node, args.to)
        out(ev="connected")
        await asyncio.sleep(args.delay)
    peak = rss()
    out(ev="start", rss=peak)
    if args.invalid:
        for body, why in (("", "empty"), ("   ", "blank"),
                          ("y" * (node.config.max_message_bytes + 1), "too large")):
            try:
                await node.post(args.to, body)
            except MeshpostError as exc:
                out(ev="refused", body=body[:20], why=why, error=f"{type(exc).__name__}: {exc}")
            else:
                out(ev="accepted-invalid", body=body[:20], why=why)
    for k in range(args.chunks):
        if args.gate and k == args.gate_before:
            # The test decides when the rest may go: its kill must land mid-flood however
            # fast this machine commits.
            out(ev="gate-waiting", k=k)
            while not await asyncio.to_thread(os.path.exists, args.gate):
                await asyncio.sleep(0.01)
        bodies = [flood_body(args.tag, k, i, args.size) for i in range(args.chunk_size)]
        out(ev="chunk-attempt", k=k)
        try:
            n = await node.post_many(args.to, bodies)
            if args.flush_each:
                await node.flush()
        except MeshpostError as exc:
            out(ev="chunk-refused", k=k, error=f"{type(exc).__name__}: {exc}")
            continue
        peak = max(peak, rss())
        out(ev="chunk-accepted", k=k, n=n, rss=rss(), durable=args.flush_each)
    await node.flush()
    peak = max(peak, rss())
    stats = node.snapshot_stats()
    out(ev="done", rss=rss(), peak=peak, pending=await node.pending_count(),
        stats=dataclasses.asdict(stats))


async def main(args: argparse.Namespace) -> None:
    cfg = MeshConfig.load(Path(args.config)).node(args.name, data_dir=Path(args.data))
    if args.command == "crash":
        cfg = dataclasses.replace(cfg, ping_interval_s=30.0, peer_timeout_s=120.0)
    out = Out(Path(args.out))
    async with Node(cfg) as node:
        out(ev="ready", pid=os.getpid())
        if args.command == "crash":
            await crash(node, out, args)
        else:
            await flood(node, out, args)


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("crash")
    c.add_argument("--to", required=True)
    c.add_argument("--count", type=int, default=5)
    c.add_argument("--tag", required=True)
    c.add_argument("--point", required=True, choices=[p.value for p in CrashPoint])
    f = sub.add_parser("flood")
    f.add_argument("--to", required=True)
    f.add_argument("--chunks", type=int, required=True)
    f.add_argument("--chunk-size", type=int, required=True)
    f.add_argument("--tag", required=True)
    f.add_argument("--size", type=int, default=60)
    f.add_argument("--flush-each", action="store_true")
    f.add_argument("--invalid", action="store_true")
    f.add_argument("--wait-connected", action="store_true")
    f.add_argument("--delay", type=float, default=0.0, help="seconds between connected and flood")
    f.add_argument("--gate", help="before chunk --gate-before, wait until this file exists")
    f.add_argument("--gate-before", type=int, default=0)
    return p.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse(sys.argv[1:])))

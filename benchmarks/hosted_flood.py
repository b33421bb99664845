"""What a flood on one hosted node costs the others of its process (not part of `make test`).

Three nodes A, B, C in one `NodeHost` (this process: one event loop, one ZeroMQ context, as
`meshpost host` runs them), over ipc with real SQLite stores. A sends to C one message at a
time, each waited for until receipted, first undisturbed, then while a helper process floods
B's endpoint with one kind of hostile input:

- `small`: 4 DEALERs sending 5-byte undecodable frames as fast as they can;
- `large`: 2 DEALERs sending undecodable frames of B's largest frame size (3 MiB);
- `batches`: a DEALER that says Hello as B's peer D (no --secure: a name proves nothing)
  and sends Batches of 32 messages of 64 KiB each (valid: B stores them all);
- `pings`: a DEALER sending meshpost Pings before any Hello, never reading the refusals;
- `connections`: connections opened and closed as fast as a DEALER can.

Each kind runs in a fresh host (a flood's backlog drains long after it stops). Prints per
kind: A->C messages receipted per second, latency p50 / p99 / max (ms), what B counted, and
this process's RSS (what the flood left queued: `batches` can take gigabytes in seconds, on
a shared machine run it alone). `--b-apart` runs B in a process of its own instead: what
hosting adds is the difference.

    .venv/bin/python benchmarks/hosted_flood.py --messages 300 --kinds small large
    .venv/bin/python benchmarks/hosted_flood.py --messages 300 --kinds small large --b-apart
    PYTHONPATH=/path/to/other/src .venv/bin/python benchmarks/hosted_flood.py ...   # A/B
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import psutil

from meshpost.config import NodeConfig, PeerConfig
from meshpost.host import NodeHost

ATTACKER = textwrap.dedent("""
    import sys, time, zmq
    from meshpost.protocol import PROTOCOL_VERSION, Batch, Envelope, Hello, Ping, encode
    from meshpost.protocol.frames import max_frame_bytes
    from meshpost.config import DEFAULT_MAX_MESSAGE_BYTES
    kind, endpoint = sys.argv[1], sys.argv[2]
    ctx = zmq.Context()
    def dealer():
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(endpoint)
        return s
    if kind == "small":
        socks = [dealer() for _ in range(4)]
        while True:
            for s in socks:
                for _ in range(100):
                    s.send(b"\\x00junk")
    elif kind == "large":
        payload = b"\\xff" * (max_frame_bytes(DEFAULT_MAX_MESSAGE_BYTES) - 64)
        socks = [dealer() for _ in range(2)]
        while True:
            for s in socks:
                s.send(payload, copy=False)
    elif kind == "batches":
        s = dealer()
        now = time.time_ns()
        s.send(encode(Hello(PROTOCOL_VERSION, "d00dd00dd00dd00d", "D", now, 1)))
        body, seq = "x" * 65536, 0
        while True:
            now = time.time_ns()
            envs = []
            for _ in range(32):
                seq += 1
                envs.append(Envelope(f"{now:x}{seq:08x}", seq, "D", "B", body, now, now))
            s.send(encode(Batch(now, envs)))
    elif kind == "pings":
        s = dealer()
        while True:
            s.send(encode(Ping(sent_at_ns=time.time_ns())))
    elif kind == "connections":
        while True:
            s = dealer()
            s.send(b"\\x00junk")
            s.close(0)
""")


def configs(root: Path) -> list[NodeConfig]:
    endpoints = {n: f"ipc://{root}/{n}.sock" for n in "ABCD"}
    peers = {"A": "BC", "B": "ACD", "C": "AB"}
    return [NodeConfig(name=n, bind=(endpoints[n],), data_dir=root / n, sync="normal",
                       peers=tuple(PeerConfig(p, endpoints[p]) for p in peers[n]))
            for n in "ABC"]


async def measure(host: NodeHost, count: int) -> list[float]:
    a = host.nodes["A"].node
    assert a is not None
    latencies = []
    for i in range(count):
        started = time.perf_counter()
        await a.send("C", f"probe {i}", timeout_s=120)
        latencies.append(time.perf_counter() - started)
    return latencies


def line(phase: str, latencies: list[float], wall_s: float, host: NodeHost) -> str:
    ms = sorted(x * 1000 for x in latencies)
    hosted = host.nodes.get("B")
    b = hosted.node if hosted is not None else None
    stats = b.snapshot_stats() if b is not None else None
    counted = (f"B: violations={stats.violations} undecodable={stats.undecodable} "
               f"received={stats.received} inbound_refused={stats.inbound_refused}"
               if stats is not None else "B: apart")
    rss = psutil.Process().memory_info().rss / 2**20
    return (f"{phase:12s} {len(ms) / wall_s:8.1f} msgs/s  p50 {statistics.median(ms):7.1f}  "
            f"p99 {ms[int(0.99 * (len(ms) - 1))]:7.1f}  max {ms[-1]:7.1f} ms  {counted}  "
            f"rss {rss:.0f} MB")


B_APART = textwrap.dedent("""
    import asyncio, logging, sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[2])
    from hosted_flood import configs
    from meshpost.host import NodeHost
    logging.basicConfig(level=logging.CRITICAL)
    async def main():
        b = [c for c in configs(Path(sys.argv[1])) if c.name == "B"]
        async with NodeHost(b):
            await asyncio.Event().wait()
    asyncio.run(main())
""")


def wait_for(path: Path, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear")
        time.sleep(0.05)


async def spawn(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-c", *args, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL)


async def end(process: asyncio.subprocess.Process | None) -> None:
    if process is not None:
        process.kill()
        await process.wait()


async def phase(kind: str, args: argparse.Namespace) -> str:
    """A fresh host (and stores) for each kind: a flood's backlog drains for long after."""
    with tempfile.TemporaryDirectory(prefix="mpflood-") as tmp:
        root = Path(tmp)
        nodes = [c for c in configs(root) if not (args.b_apart and c.name == "B")]
        apart = (await spawn(B_APART, str(root), str(Path(__file__).parent))
                 if args.b_apart else None)
        try:
            async with NodeHost(nodes) as host:
                await asyncio.to_thread(wait_for, root / "B.sock")
                await measure(host, 20)  # links up, stores warm
                attacker = None
                if kind != "none":
                    attacker = await spawn(ATTACKER, kind, f"ipc://{root}/B.sock")
                    await asyncio.sleep(args.warmup_s)
                try:
                    started = time.perf_counter()
                    latencies = await measure(host, args.messages)
                    wall = time.perf_counter() - started
                finally:
                    await end(attacker)
                return line(kind, latencies, wall, host)
        finally:
            await end(apart)


async def main(args: argparse.Namespace) -> None:
    print(f"B {'in a process of its own' if args.b_apart else 'hosted with A and C'}")
    for kind in ["none", *args.kinds]:
        print(await phase(kind, args), flush=True)


if __name__ == "__main__":
    logging.basicConfig(level=logging.CRITICAL)  # the flood's warnings: counted, not shown
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--warmup-s", type=float, default=1.0)
    parser.add_argument("--b-apart", action="store_true",
                        help="run B in a process of its own (what hosting adds, by difference)")
    parser.add_argument("--kinds", nargs="*", default=["small", "large", "batches", "pings",
                                                       "connections"])
    asyncio.run(main(parser.parse_args()))

"""Seed 001 on the mesh: a server binding tcp:// and ipc:// at once spreads texts over two
clients, one on each transport, and ends each client with the marker `x`.

    python examples/pipeline_tcp_ipc.py

S binds a loopback TCP port and an ipc:// socket; A reaches it over TCP, C over ipc. S hands
the seed's numbers and texts to A and C in turn (as its DOWNSTREAM socket did), then one `x`
to each. Unlike the seed, every message is stored on both sides and receipted, so a client that
was down gets its share when it comes back. The command-line twin of a client is
`meshpost tail --node A --until x`. Exits 0 once each client got its share, in order, and its
`x`.
"""

from __future__ import annotations

import asyncio
import socket
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

from meshpost import Message, Node, NodeConfig, PeerConfig

NUMBERS = ["1", "2", "3"]
TEXTS = ["Esta es una prueba,1", "Desde zeroMQ,2", "Sigo probando,3", "Prueba...,4", "q,5",
         "1,6", "q,7"]
END = "x"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def configs(root: Path) -> dict[str, NodeConfig]:
    s_tcp, s_ipc = f"tcp://127.0.0.1:{free_port()}", f"ipc://{root}/S.sock"
    a_tcp, c_ipc = f"tcp://127.0.0.1:{free_port()}", f"ipc://{root}/C.sock"
    return {
        "S": NodeConfig(name="S", bind=(s_tcp, s_ipc), data_dir=root / "S", sync="normal",
                        peers=(PeerConfig("A", a_tcp), PeerConfig("C", c_ipc))),
        "A": NodeConfig(name="A", bind=(a_tcp,), peers=(PeerConfig("S", s_tcp),),
                        data_dir=root / "A", sync="normal"),
        "C": NodeConfig(name="C", bind=(c_ipc,), peers=(PeerConfig("S", s_ipc),),
                        data_dir=root / "C", sync="normal"),
    }


async def client(node: Node, inbox: AsyncIterator[Message]) -> list[str]:
    """What a seed client does: print each text until the marker (`messages()` reads the
    node's own store, so nothing sent before the marker can be skipped)."""
    got: list[str] = []
    async for msg in inbox:
        if msg.body == END:
            print(f"{node.name}: got {END!r}, done", flush=True)
            return got
        print(f"{node.name} ({'tcp' if node.name == 'A' else 'ipc'}): {msg.body}", flush=True)
        got.append(msg.body)
    return got


async def main(root: Path) -> int:
    cfg = configs(root)
    async with Node(cfg["S"]) as s, Node(cfg["A"]) as a, Node(cfg["C"]) as c:
        # Each inbox starts here, before anything is sent: it sees every message from now on.
        readers = {n.name: asyncio.create_task(client(n, n.messages())) for n in (a, c)}
        shares: dict[str, list[str]] = {"A": [], "C": []}
        for i, text in enumerate([*NUMBERS, *TEXTS]):
            to = "AC"[i % 2]
            await s.send(to, text, timeout_s=30)  # returns once `to` has stored it
            shares[to].append(text)
        for to in shares:
            await s.send(to, END, timeout_s=30)
        got = {name: await asyncio.wait_for(task, 30) for name, task in readers.items()}
    ok = got == shares
    print("every text arrived once, in order" if ok else f"MISMATCH: sent {shares}, got {got}")
    return 0 if ok else 1


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="mp-pipe-", dir="/tmp") as tmp:
        sys.exit(asyncio.run(main(Path(tmp))))

"""A two-node chat: type a line, it goes to the other node, which prints it.

    python examples/chat.py A        # in one terminal
    python examples/chat.py B        # in another
    python examples/chat.py --demo   # both nodes in this process, three lines each, no typing

Both nodes listen on ipc:// sockets in a folder of the system's temp dir, so nothing leaves
this machine. Each message is stored on both sides and receipted; the sender prints the
receipt, the receiver prints the message as `messages()` reads it from its own store.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

from meshpost import Node, NodeConfig, PeerConfig

ROOT = Path(tempfile.gettempdir()) / "meshpost-chat"
OTHER = {"A": "B", "B": "A"}


def config(name: str, root: Path = ROOT) -> NodeConfig:
    peer = OTHER[name]
    return NodeConfig(name=name, bind=(f"ipc://{root}/{name}.sock",),
                      peers=(PeerConfig(peer, f"ipc://{root}/{peer}.sock"),),
                      data_dir=root / name, sync="normal")


async def show_incoming(node: Node, count: int | None = None) -> None:
    """Print what the other node sends (`count` messages, or until cancelled)."""
    async for msg in node.messages():
        print(f"{msg.sender} > {msg.body}", flush=True)
        if count is not None:
            count -= 1
            if count == 0:
                return


async def say(node: Node, line: str) -> None:
    receipt = await node.send(OTHER[node.name], line, timeout_s=30)
    print(f"  ✓ stored by {receipt.to}", flush=True)


async def chat(name: str) -> None:
    """Lines typed here go to the other node; Ctrl-D leaves."""
    async with Node(config(name)) as node:
        printer = asyncio.create_task(show_incoming(node))
        loop = asyncio.get_running_loop()
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            if line.strip():
                await say(node, line.strip())
        printer.cancel()


async def demo(root: Path) -> None:
    """Both nodes here, three lines each way, then stop (the example's test runs this)."""
    async with Node(config("A", root)) as a, Node(config("B", root)) as b:
        readers = [asyncio.create_task(show_incoming(n, count=3)) for n in (a, b)]
        for i in range(3):
            await say(a, f"hello B, this is line {i}")
            await say(b, f"hello A, and this is answer {i}")
        await asyncio.wait_for(asyncio.gather(*readers), 30)  # each printed all three


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", nargs="?", choices=sorted(OTHER))
    parser.add_argument("--demo", action="store_true", help="run both nodes, no typing")
    args = parser.parse_args()
    if args.demo:
        with tempfile.TemporaryDirectory(prefix="meshpost-chat-") as root:
            asyncio.run(demo(Path(root)))
    elif args.name:
        ROOT.mkdir(exist_ok=True)
        asyncio.run(chat(args.name))
    else:
        parser.error("give a node name (A or B) or --demo")


if __name__ == "__main__":
    main()

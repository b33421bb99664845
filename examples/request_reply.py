"""Request/reply on the mesh: A asks, B's handler answers, A gets the reply it asked for.

    python examples/request_reply.py

`await node.request(peer, body, timeout_s=...)` returns B's reply; a timeout would say
whether B had the request (`RequestTimeout.outcome`). B's handler may be sync or async: what
it returns is the reply, linked to the request in both stores (history shows `kind`/`ref`).
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _mesh import mesh

from meshpost import Node
from meshpost.node import Message


async def add(msg: Message) -> str:
    """B's handler: adds the numbers in the request."""
    await asyncio.sleep(0)  # async handlers may await anything
    return str(sum(int(n) for n in msg.body.split("+")))


async def main(root: Path) -> None:
    configs = mesh(["A", "B"], root)
    async with Node(configs["A"]) as a, Node(configs["B"]) as b:
        b.on_request(add)
        for question in ("2+3", "40+2", "1+2+3+4"):
            reply = await a.request("B", question, timeout_s=30)
            print(f"A asked {question}, {reply.sender} replied {reply.body} "
                  f"(reply {reply.id} to request {reply.request_id})", flush=True)


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="meshpost-reqrep-") as folder:
        asyncio.run(main(Path(folder)))

"""Seed 000 on the mesh: an exclusive pair where B echoes every line A sends.

    python examples/pair_echo.py

B answers each message with its own text, as a reply linked to it (`on_request(...,
direct=True)`, what `meshpost node B --echo` does); A prints each echo with the id of the
message it answers. Every message and every echo is stored on both sides and receipted.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _mesh import mesh

from meshpost import Node

LINES = ["hola", "¿qué tal?", "adiós"]


async def main(root: Path) -> None:
    configs = mesh(["A", "B"], root)
    async with Node(configs["A"]) as a, Node(configs["B"]) as b:
        b.on_request(lambda msg: msg.body, direct=True)  # the echo server
        echoes = a.messages()
        sent = {}
        for line in LINES:
            receipt = await a.send("B", line, timeout_s=30)
            sent[receipt.message_id] = line
        for _ in LINES:
            echo = await asyncio.wait_for(anext(echoes), 30)
            assert echo.kind == "reply"
            assert echo.ref in sent
            print(f"B > {echo.body}  (echo of {sent[echo.ref]!r})", flush=True)
        await echoes.aclose()


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="meshpost-pair-") as folder:
        asyncio.run(main(Path(folder)))

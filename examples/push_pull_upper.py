"""Seed 002 on the mesh: a ventilator sends strings to two workers that upper-case them,
and a sink collects the results, every hop receipted and stored, each result kept once.

    python examples/push_pull_upper.py

V submits tasks to the queue `upper` (results to S); W1 and W2 serve it with `str.upper`.
Each task goes to the worker with the fewest in flight; S reads the results from its own
store as they arrive (`messages()`, header kind `result`, ref = the task id).
"""

from __future__ import annotations

import asyncio
import collections
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _mesh import mesh

from meshpost import Node

WORDS = ["hola", "mundo", "cero", "eme", "cu", "ventilador", "trabajador", "sumidero"]


async def main(root: Path) -> None:
    configs = mesh(["V", "W1", "W2", "S"], root)
    async with (Node(configs["V"]) as v, Node(configs["W1"]) as w1,
                Node(configs["W2"]) as w2, Node(configs["S"]) as s):
        results = s.messages()
        for worker in (w1, w2):
            await worker.serve_queue("upper", str.upper)
        async with asyncio.timeout(60):  # V heard both `serve` records and reaches both
            while v.queue_workers("upper") != ["W1", "W2"]:  # noqa: ASYNC110 (no event for it)
                await asyncio.sleep(0.01)
        task_ids = await v.submit("upper", WORDS, sink="S")
        by_task = dict(zip(task_ids, WORDS, strict=True))
        done: dict[str, str] = {}
        workers: collections.Counter[str] = collections.Counter()
        while len(done) < len(WORDS):
            msg = await asyncio.wait_for(anext(results), 60)
            if msg.kind == "result" and msg.ref in by_task and msg.ref not in done:
                done[msg.ref] = msg.body
                workers[msg.sender] += 1
                print(f"S < {msg.sender}: {by_task[msg.ref]} -> {msg.body}", flush=True)
        await results.aclose()
        assert all(done[t] == w.upper() for t, w in by_task.items())
        print(f"every result once: {len(done)} tasks, by worker {dict(sorted(workers.items()))}")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="meshpost-pushpull-") as folder:
        asyncio.run(main(Path(folder)))

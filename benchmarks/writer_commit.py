"""The group-commit writer's own Python per commit, SQLite left out (not part of `make test`).

One single send's writer work on the sender, repeated: the previous receipt's record (a lazy
add) and the next message, committed together inline (sync=normal) on a store whose `apply`
does nothing, awaited through the message's done callback. Under callgrind, instructions per
commit are the difference of two runs divided by the difference in commits:

    valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        .venv/bin/python benchmarks/writer_commit.py --commits 2000
    (the same with --commits 12000; (Collected 12000 - Collected 2000) / 10000)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from pathlib import Path
from typing import Any

from meshpost.clock import FakeClock
from meshpost.protocol import Envelope, ReceiptFrame
from meshpost.store import Delivery, WriteBatch
from meshpost.store.writer import GroupCommitWriter


class _Checkpointer:
    def checkpoint(self) -> int:
        return 0

    def close(self) -> None:
        pass


class _NullStore:
    """What the writer asks of a `Store`, doing nothing."""

    sync = "normal"
    page_size = 8192
    path = Path("/nonexistent")

    def open_checkpointer(self) -> _Checkpointer:
        return _Checkpointer()

    def apply(self, batch: WriteBatch, stored_at: int, *, wait_for_lock: bool = True
              ) -> tuple[list[Any], int]:
        return [], stored_at

    def checkpoint(self) -> bool:
        return True

    def close(self) -> None:
        pass


async def run(commits: int) -> GroupCommitWriter:
    writer = GroupCommitWriter(_NullStore(), FakeClock(), node="A")  # type: ignore[arg-type]
    task = asyncio.create_task(writer.run())
    await asyncio.sleep(0)
    loop = asyncio.get_running_loop()
    receipt = ReceiptFrame([(1, 1)], 1, 1, 1, 1, 1, "normal")
    for seq in range(1, commits + 1):
        if seq > 1:
            writer.add_delivery(Delivery("B", [seq - 1], receipt, 1), lambda: None)
        sent: asyncio.Future[int] = loop.create_future()
        writer.add_outgoing([Envelope(f"id{seq}", seq, "A", "B", "x", 1, seq)], sent.set_result)
        await sent
    await writer.flush()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    writer.close()
    return writer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commits", type=int, default=2000)
    args = parser.parse_args()
    writer = asyncio.run(run(args.commits))
    print(f"commits: {writer.commits} (inline {writer.inline_commits})")


if __name__ == "__main__":
    main()

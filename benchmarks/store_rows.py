"""The store alone: what one side of a pair asks of SQLite per message (not part of `make test`).

- `sender`: each batch inserts N outgoing rows and marks the previous N delivered, as the
  sender's writer does under pair-throughput;
- `receiver`: each batch inserts N incoming rows.

    .venv/bin/python benchmarks/store_rows.py --rows 200000 --batch 2048 --sync full
    valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        .venv/bin/python benchmarks/store_rows.py --rows 22528 --side sender

Wall-clock rates swing on a shared machine; instruction counts under callgrind do not. For a
per-row count, run it twice (e.g. --rows 2048 and --rows 22528) and divide the difference in
"Collected" by the difference in rows.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from meshpost.protocol import Envelope, ReceiptFrame
from meshpost.store import Delivery, Store, WriteBatch


def run(side: str, rows: int, batch: int, sync: str, data_dir: Path) -> float:
    """Rows per second for `side`."""
    store = Store.open(data_dir, name="A", sync=sync)
    try:
        now = time.time_ns()
        prefix = f"{now // 1_000_000:012x}"
        if side == "sender":
            messages = [Envelope(f"{prefix}{i:016x}", i, "A", "B", "x" * 100, now, now + i)
                        for i in range(1, rows + 1)]
        else:
            messages = [Envelope(f"{prefix}{i:016x}", i, "B", "A", "x" * 100, now, now + i)
                        for i in range(1, rows + 1)]
        receipt = ReceiptFrame([(1, 1)], now, now, now, now, now, sync)
        start = time.perf_counter()
        for k in range(0, rows, batch):
            chunk = messages[k:k + batch]
            if side == "sender":
                delivered = [Delivery("B", list(range(k - batch + 1, k + 1)), receipt, now)]
                store.apply(WriteBatch(outgoing=chunk, deliveries=delivered if k else []), now)
            else:
                store.apply(WriteBatch(incoming=[chunk]), now)
        return rows / (time.perf_counter() - start)
    finally:
        store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", choices=["sender", "receiver", "both"], default="both")
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--sync", choices=["full", "normal"], default="full")
    args = parser.parse_args()
    sides = ["sender", "receiver"] if args.side == "both" else [args.side]
    for side in sides:
        with tempfile.TemporaryDirectory(prefix="meshpost-store-rows-") as tmp:
            rate = run(side, args.rows, args.batch, args.sync, Path(tmp))
        print(f"{side}: {rate:,.0f} rows/s ({1e6 / rate:.1f} us/row), batch {args.batch}, "
              f"sync={args.sync}")


if __name__ == "__main__":
    main()

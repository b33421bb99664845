"""How long `Store.open` takes on a big store (not part of `make test`).

Builds (once) a store of N messages through the store's own write path, so every row carries
a valid checksum: half outgoing to B (all but the last 1,000 receipted), half incoming from B,
100-byte bodies. Then opens it `--repeat` times and prints each open's wall time and, where the
store reports it, how many rows open verified; with `--background`, also how long the
background verification of the rest takes.

    .venv/bin/python benchmarks/store_open.py --rows 1000000 --dir /tmp/meshpost-open-1M
    .venv/bin/python benchmarks/store_open.py --rows 10000000 --dir /tmp/meshpost-open-10M

A store already in `--dir` with the same row count is reused (building 10M rows takes a few
minutes). The first open after a build reads from the page cache; `--drop-caches` (root) asks
the kernel to drop it before each open, for a cold-cache figure.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import time
from pathlib import Path

from meshpost.protocol import Envelope, ReceiptFrame
from meshpost.store import DB_FILENAME, Delivery, Store, WriteBatch

BATCH = 4096
PENDING_TAIL = 1000


def _rows_in(data_dir: Path) -> int:
    db = data_dir / DB_FILENAME
    if not db.exists():
        return 0
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return int(conn.execute("SELECT COALESCE(MAX(rowid), 0) FROM messages").fetchone()[0])
    except sqlite3.Error:
        return 0
    finally:
        conn.close()


def build(data_dir: Path, rows: int) -> float:
    """Write `rows` messages into a new store in `data_dir`; seconds it took."""
    start = time.perf_counter()
    store = Store.open(data_dir, name="A", sync="off")
    try:
        now = time.time_ns()
        prefix = f"{now // 1_000_000:012x}"
        outgoing = rows // 2
        receipt = ReceiptFrame([(1, 1)], now, now, now, now, now, "off")
        seq = 0
        for k in range(0, rows, BATCH):
            batch = WriteBatch()
            for i in range(k, min(rows, k + BATCH)):
                hlc = now + i
                if i % 2 == 0:
                    seq += 1
                    batch.outgoing.append(
                        Envelope(f"{prefix}a{i:015x}", seq, "A", "B", "x" * 100, now, hlc))
                else:
                    if not batch.incoming:
                        batch.incoming.append([])
                    batch.incoming[0].append(
                        Envelope(f"{prefix}b{i:015x}", i // 2 + 1, "B", "A", "y" * 100, now,
                                 hlc))
            settled = min(seq, outgoing - PENDING_TAIL)
            first = seq - len(batch.outgoing) + 1
            if first <= settled:
                batch.deliveries.append(
                    Delivery("B", list(range(first, settled + 1)), receipt, now))
            store.apply(batch, now)
            if k % (BATCH * 256) == 0 and k:
                store.checkpoint()
                print(f"  built {k:,} rows", flush=True)
    finally:
        store.close()
    return time.perf_counter() - start


def _drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--drop-caches", action="store_true")
    parser.add_argument("--background", action="store_true",
                        help="also time the background verification (if the store has one)")
    args = parser.parse_args()
    have = _rows_in(args.dir)
    if have != args.rows:
        if have:
            for suffix in ("", "-wal", "-shm"):
                (args.dir / (DB_FILENAME + suffix)).unlink(missing_ok=True)
        print(f"building {args.rows:,} rows in {args.dir} ...", flush=True)
        print(f"built in {build(args.dir, args.rows):.1f} s", flush=True)
    size_mb = (args.dir / DB_FILENAME).stat().st_size / 1e6
    print(f"store: {args.rows:,} rows, {size_mb:,.0f} MB")
    for i in range(args.repeat):
        if args.drop_caches:
            _drop_caches()
        start = time.perf_counter()
        store = Store.open(args.dir, name="A", sync="normal")
        opened = time.perf_counter() - start
        verified = getattr(store, "rows_verified_at_open", None)
        # What a node reads next, before it serves: seq numbering, HLC floor, the outbox.
        start = time.perf_counter()
        store.last_seqs()
        store.max_hlc("out")
        store.max_hlc("in")
        pending = len(store.load_pending("B", 0, 32768))
        reads = time.perf_counter() - start
        line = f"open {i + 1}: {opened:.3f} s (then start reads {reads:.3f} s, {pending} pending)"
        if verified is not None:
            line += f", rows verified at open {verified:,}"
        if args.background and hasattr(store, "open_verifier"):
            verifier = store.open_verifier()
            start = time.perf_counter()
            try:
                verifier.run()
            finally:
                verifier.close()
            line += (f"; background verification {time.perf_counter() - start:.1f} s"
                     f" ({verifier.rows_verified:,} rows)")
        store.close()
        print(line, flush=True)


if __name__ == "__main__":
    main()

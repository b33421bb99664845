"""Verifying a store's rows against their content checksums, and its pages (`quick_check`).

Rule: read only. `Store.open` verifies the newest rows and those the node's state comes from
(`verify_at_open`); a `Verifier`, on a read-only connection of its own, does the rest off the
event loop. Every fault found is a `StoreCorrupt`.
"""

from __future__ import annotations

import dataclasses
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec

from meshpost.errors import StoreCorrupt
from meshpost.protocol import Envelope
from meshpost.store.checksum import CRC_OF_ARRAY7, crc32, envelope_bytes, header_decode

#: Rows per background verification step: one short read transaction each (about 0.1 s), so
#: that the writer's checkpoints are never held back for long.
VERIFY_CHUNK_ROWS = 50_000


def check_integrity(conn: sqlite3.Connection, path: Path) -> None:
    try:
        rows = conn.execute("PRAGMA quick_check").fetchall()
    except sqlite3.DatabaseError as exc:
        raise StoreCorrupt(str(path), str(exc)) from exc
    if rows != [("ok",)]:
        raise StoreCorrupt(str(path), "; ".join(str(r[0]) for r in rows[:3]))


def check_integrity_if_small(conn: sqlite3.Connection, path: Path, max_rows: int) -> bool:
    """`PRAGMA quick_check` if the store holds at most `max_rows` messages; True if it ran
    (and passed). Reading the schema also refuses a file that is not a database at all."""
    try:
        table = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'messages'"
        ).fetchone()
        rows = 0 if table is None else int(
            conn.execute("SELECT COALESCE(MAX(rowid), 0) FROM messages").fetchone()[0])
    except sqlite3.DatabaseError as exc:
        raise StoreCorrupt(str(path), str(exc)) from exc
    if rows > max_rows:
        return False
    check_integrity(conn, path)
    return True


@dataclasses.dataclass(slots=True)
class OpenVerification:
    """What `Store.open` verified: how many rows, and what it left to a `Verifier`."""

    rows: int = 0
    #: Rows with a lower rowid are not verified yet (0: none left).
    below_rowid: int = 0
    quick_check_deferred: bool = False


#: A row's columns as `check_rows` reads them: the envelope's fields with the header's
#: msgpack (schema 7; NULL for a direct message), then the checksum.
ENVELOPE_COLUMNS = "id, seq, sender, recipient, body, sent_at_ns, hlc, header"
CHECKED_COLUMNS = f"{ENVELOPE_COLUMNS}, checksum"
CHECKED_COLUMNS_BEFORE_7 = "id, seq, sender, recipient, body, sent_at_ns, hlc, NULL, checksum"


def check_rows(
    path: Path, rows: Iterator[Any] | list[Any], keep: list[Envelope] | None = None
) -> int:
    """Recompute each `CHECKED_COLUMNS` row's content checksum; how many rows there were. With
    `keep`, each row's `Envelope` is appended to it (built once for both).

    A flipped bit inside a record passes `quick_check` (which checks structure) but not this.
    Raises `StoreCorrupt` naming the first rows that fail (or that no longer decode)."""
    crc, encode, start = crc32, envelope_bytes, CRC_OF_ARRAY7
    add = keep.append if keep is not None else None
    bad: list[str] = []
    count = 0
    try:
        for id, seq, sender, recipient, body, sent_at_ns, hlc, blob, checksum in rows:
            count += 1
            m = Envelope(id, seq, sender, recipient, body, sent_at_ns, hlc)
            # The seven-field array's CRC, then the stored header's bytes chained after it.
            expected = crc(memoryview(encode(m))[1:-1], start)
            if blob is not None:
                expected = crc(blob, expected)
                m = Envelope(id, seq, sender, recipient, body, sent_at_ns, hlc,
                             header_decode(blob))
            if add is not None:
                add(m)
            if checksum != expected:
                bad.append(str(id))
                if len(bad) == 3:
                    break
    except sqlite3.DatabaseError as exc:  # e.g. text that no longer decodes as UTF-8
        raise StoreCorrupt(str(path), f"unreadable message row: {exc}") from exc
    except (TypeError, ValueError, OverflowError, msgspec.DecodeError) as exc:
        # a column of the wrong type, a header that no longer decodes
        raise StoreCorrupt(str(path), f"unreadable message row: {exc}") from exc
    if bad:
        raise StoreCorrupt(
            str(path), f"message rows fail their content checksum (ids {', '.join(bad)})"
        )
    return count


def check_rowid_range(conn: sqlite3.Connection, path: Path, low: int, high: int) -> int:
    """Check the rows with `low` < rowid <= `high`; how many there were."""
    try:
        cursor = conn.execute(
            f"SELECT {CHECKED_COLUMNS} FROM messages WHERE rowid > ? AND rowid <= ?", (low, high)
        )
    except sqlite3.DatabaseError as exc:
        raise StoreCorrupt(str(path), f"unreadable message rows: {exc}") from exc
    return check_rows(path, cursor)


def verify_at_open(
    conn: sqlite3.Connection, path: Path, verify_rows: int
) -> OpenVerification:
    """Check the newest `verify_rows` rows and the rows that set the node's seq and HLC state.

    Rowids only grow (rows are never deleted), so the newest rows are the last rowids: one
    range scan. The rest, below it, is left to a `Verifier`."""
    try:
        top = int(conn.execute("SELECT COALESCE(MAX(rowid), 0) FROM messages").fetchone()[0])
    except sqlite3.DatabaseError as exc:
        raise StoreCorrupt(str(path), str(exc)) from exc
    low = max(0, top - verify_rows)
    rows = check_rowid_range(conn, path, low, top)
    if low:
        # The highest seq per peer and the highest HLC stamps (what `last_seqs` and
        # `max_hlc` hand the node) are usually among the newest rows; check them anyway.
        rows += check_rows(path, state_rows(conn))
    return OpenVerification(rows=rows, below_rowid=low + 1 if low else 0)


def last_out_rows(conn: sqlite3.Connection) -> list[Any]:
    """Per peer, its outgoing row with the highest seq: (peer, then `CHECKED_COLUMNS` columns).

    Two index seeks per peer (the next peer, then its top seq) on `messages_out_link`: a
    `GROUP BY peer` with MAX(seq) scans the whole index instead, 1.0 s at 5M outgoing rows."""
    rows: list[Any] = []
    peer = ""
    while True:
        found = conn.execute(
            "SELECT peer FROM messages INDEXED BY messages_out_link WHERE direction = 'out'"
            " AND peer > ? ORDER BY peer LIMIT 1",
            (peer,),
        ).fetchone()
        if found is None:
            return rows
        peer = found[0]
        rows.append(conn.execute(
            f"SELECT peer, {CHECKED_COLUMNS} FROM messages INDEXED BY messages_out_link"
            " WHERE direction = 'out' AND peer = ? ORDER BY seq DESC LIMIT 1",
            (peer,),
        ).fetchone())


def state_rows(conn: sqlite3.Connection) -> list[Any]:
    """The rows behind `Store.last_seqs` and `Store.max_hlc`, as `CHECKED_COLUMNS` columns."""
    rows = [row[1:] for row in last_out_rows(conn)]
    for direction in ("out", "in"):
        rows.extend(conn.execute(
            f"SELECT {CHECKED_COLUMNS} FROM messages INDEXED BY messages_hlc WHERE direction = ?"
            " ORDER BY hlc DESC LIMIT 1",
            (direction,),
        ))
    return rows


class Verifier:
    """Verifies, on a read-only connection of its own, what `Store.open` left unchecked: the
    checksums of the older rows, newest first, a chunk per `step`, then `PRAGMA quick_check`.
    For one thread at a time; WAL lets it read beside the writer."""

    def __init__(self, path: Path, conn: sqlite3.Connection, left: OpenVerification) -> None:
        self.path = path
        self._conn = conn
        self._left = left
        self._next_high = left.below_rowid - 1 if left.below_rowid else 0
        self._quick_check = left.quick_check_deferred
        #: Rows whose checksum this verifier recomputed so far.
        self.rows_verified = 0

    @property
    def done(self) -> bool:
        return self._next_high <= 0 and not self._quick_check

    def step(self, rows: int = VERIFY_CHUNK_ROWS) -> bool:
        """Verify the next `rows` rows (or, once no row is left, the pages); True when done.
        Raises `StoreCorrupt` on the first corrupt row or page."""
        if self._next_high > 0:
            low = max(0, self._next_high - rows)
            self.rows_verified += check_rowid_range(self._conn, self.path, low,
                                                     self._next_high)
            self._next_high = low
            self._left.below_rowid = low + 1 if low else 0  # the store reads it: one store
        elif self._quick_check:
            check_integrity(self._conn, self.path)
            self._quick_check = False
            self._left.quick_check_deferred = False
        return self.done

    def run(self) -> None:
        """Every step, in this thread (benchmarks and tests; a node steps it off its loop)."""
        while not self.step():
            pass

    def close(self) -> None:
        self._conn.close()

    def __repr__(self) -> str:
        return (f"Verifier({self.path}, rows_left_below={self._next_high},"
                f" quick_check={self._quick_check})")

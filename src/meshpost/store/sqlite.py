"""SQLite storage: the store package holds the only SQL in meshpost; this module, its core.

Rule: one `Store` per data dir, owned by one writer thread; every write goes through `apply()`,
which runs a whole group of operations in one `BEGIN IMMEDIATE` transaction. The read side is
`reader.py`'s `StoreReader`: on read-only connections of its own (WAL lets them run beside the
writer), and composed here for the reads the node makes on the writer's connection. Checksums
(`checksum.py`), their verification (`verifier.py`), connections and error translation
(`connection.py`) and the pattern tables' SQL (`patterns.py`) live beside it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import itertools
import operator
import os
import secrets
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import msgspec

from meshpost.errors import (
    DataDirNotWritable,
    SchemaTooNew,
    StoreCorrupt,
    StoreError,
    StoreLocked,
)
from meshpost.protocol import Envelope, ReceiptFrame, to_ranges
from meshpost.protocol.groups import MemberRecord
from meshpost.protocol.workqueue import TaskRecord
from meshpost.store.checksum import (
    ARRAY7,
    CRC_OF_ARRAY7,
    content_checksum,
    crc32,
    envelope_bytes,
    envelope_encode_into,
    header_bytes,
    header_decode,
)
from meshpost.store.connection import (
    BUSY_TIMEOUT_MS,
    DB_FILENAME,
    check_data_dir,
    connect,
    translate,
    translated,
)
from meshpost.store.patterns import (
    NewTask,
    OwedDone,
    PatternTables,
    QueueCounts,
    StoredBroadcast,
)
from meshpost.store.reader import StoreReader
from meshpost.store.schema import MIGRATIONS, SCHEMA_VERSION
from meshpost.store.verifier import (
    CHECKED_COLUMNS,
    OpenVerification,
    Verifier,
    check_integrity_if_small,
    check_rows,
    verify_at_open,
)

LOCK_FILENAME = "node.lock"
#: Page size of a new store (an existing one keeps its own). Against SQLite's 4 KiB, 8 KiB
#: pages halve the WAL frames and the checkpoint's page copies (a system call or two each)
#: without slowing a one-row commit; 16 KiB did (figures: docs/benchmarks.md, "Constants and
#: their figures"). 4 KiB, tried again for single sends (fewer bytes for the WAL's checksums),
#: saved them 3-5% of their instructions and cost the saturated pair 2% a message: not kept.
PAGE_SIZE = 8192
#: A WAL file that grew past this (a reader kept it from starting over for a while) is cut
#: back to it when it next starts over. Above the ~66 MB the WAL reaches in a cycle of
#: `checkpoints.WAL_RESTART_PAGES` 8 KiB pages, so that a cycle's file is reused, not cut and
#: regrown.
WAL_SIZE_LIMIT_BYTES = 96 * 1024 * 1024

#: Rows whose content checksums `Store.open` verifies before it returns: the newest ones. A
#: store of at most this many rows is verified whole at open, and a corrupt one is refused
#: before the node serves; above it, open verifies these and the rows the node trusts at once
#: (highest seq per peer, highest HLC stamp), and a `Verifier` does the rest after start.
#: Sized so that open stays well under a second (docs/benchmarks.md).
#: `PRAGMA quick_check`, which reads every page (about 0.6-1 s per million 100-byte rows),
#: follows the same rule: at open for a store this small, in the background otherwise.
OPEN_VERIFY_ROWS = 100_000

#: Rows are inserted many per statement: `INSERT ... VALUES (...), (...), ...` binds every
#: value in C and runs one `sqlite3_step` (the GIL released once) per statement: about twice
#: the rows a second of `json_each` or `executemany` (docs/benchmarks.md). Statements hold a
#: power of two of rows, so a handful of them, prepared once, serve every
#: batch size from SQLite's statement cache.
_INSERT_HEAD = (
    "INSERT INTO messages (peer, sender, recipient, stored_at_ns, id, direction, seq, body,"
    " sent_at_ns, hlc, state, checksum) VALUES "
)
#: What every row of one statement shares is bound once, as ?1-?4: peer, sender, recipient,
#: stored_at_ns (a statement holds the rows of one link): binding them again for every row
#: was a tenth of each side's store work (docs/benchmarks.md).
_SHARED_VALUES = 4
#: Each row's own values: id, seq, body, sent_at_ns, hlc, checksum.
_VALUES_PER_ROW = 6
#: One row's placeholders per direction; an incoming id its sender already stored is skipped
#: (the caller tells retransmissions from conflicts). Ids are unique per sender only: one
#: peer's ids can never collide with, or block, another's. A bare `?` takes the number after
#: the highest so far: after the first row's ?1-?4, each row's own values are numbered in
#: order. (Numbering them explicitly, ?5 ?6 ..., made SQLite's parser search its variable
#: list for each: the first run of a 2,048-row statement took 172 ms instead of 5.)
_ROWS = {
    "out": ("(?1, ?2, ?3, ?4, ?, 'out', ?, ?, ?, ?, 'pending', ?)", ""),
    "in": ("(?1, ?2, ?3, ?4, ?, 'in', ?, ?, ?, ?, 'received', ?)",
           " ON CONFLICT (sender, id) DO NOTHING"),
}
#: Most rows per statement (a power of two), whatever the SQLite build allows above it.
MAX_ROWS_PER_STATEMENT = 2048


def rows_per_statement(max_variables: int) -> int:
    """Rows per INSERT: a power of two whose values fit the build's variable limit (999
    before SQLite 3.32, 32766 since)."""
    fit = max(1, (max_variables - _SHARED_VALUES) // _VALUES_PER_ROW)
    return min(MAX_ROWS_PER_STATEMENT, 1 << (fit.bit_length() - 1))


@functools.lru_cache(maxsize=64)
def _insert_sql(direction: str, rows: int) -> str:
    row, tail = _ROWS[direction]
    return _INSERT_HEAD + ", ".join(itertools.repeat(row, rows)) + tail


def _chunks(count: int, largest: int) -> Iterator[tuple[int, int]]:
    """(start, size) pieces of `count` rows, each a power of two no larger than `largest`."""
    start = 0
    while count - start >= largest:
        yield start, largest
        start += largest
    size = largest
    while start < count:
        size >>= 1
        if count - start >= size:
            yield start, size
            start += size


#: One row per contiguous range a receipt settles (schema 4). The dialer settles each seq once
#: and only while it is in flight (so pending), hence ranges never overlap and cover pending
#: rows only. A range that would overlap a stored one anyway (a receipt recorded twice) is
#: left out: the first receipt stands, as it did when deliveries were row updates. The one
#: candidate for an overlap is the stored range with the lowest last_seq >= first_seq.
def _receipt_overlaps(peer: str, first: str, last: str) -> str:
    """SQL: whether a stored range of `peer` overlaps `first`..`last` (SQL expressions)."""
    return (f"EXISTS (SELECT 1 FROM receipts WHERE peer = {peer} AND first_seq <= {last}"
            f" AND last_seq = (SELECT MIN(last_seq) FROM receipts WHERE peer = {peer}"
            f" AND last_seq >= {first}))")


_RECEIPT_COLUMNS = ("peer, last_seq, first_seq, stored_at_ns, received_at_ns, arrived_at_ns,"
                    " sync, hlc")
#: The record is written through TEMP views (this connection's own; nothing in the file
#: changes) whose INSTEAD OF triggers insert the range `WHEN` it overlaps no stored one.
#: `INSERT INTO receipts SELECT ... WHERE NOT EXISTS (SELECT ... FROM receipts ...)` did the
#: same in one statement, but an INSERT whose SELECT reads its own table goes through a
#: temporary table (SQLite opens and frees an ephemeral B-tree each time): 22,000
#: instructions of a sender's one-row commit of 191,000 (callgrind, benchmarks/single_send.py).
#: A trigger's WHEN clause reads `receipts` before the INSERT ... VALUES, with no such table.
_RECORD_RECEIPT_DDL = (
    f"CREATE TEMP VIEW IF NOT EXISTS mp_record_receipt ({_RECEIPT_COLUMNS})"
    " AS SELECT 1, 1, 1, 1, 1, 1, 1, 1 WHERE 0",
    "CREATE TEMP TRIGGER IF NOT EXISTS mp_record_receipt_insert"
    " INSTEAD OF INSERT ON mp_record_receipt"
    f" WHEN NOT {_receipt_overlaps('NEW.peer', 'NEW.first_seq', 'NEW.last_seq')} BEGIN"
    f" INSERT INTO receipts ({_RECEIPT_COLUMNS}) VALUES (NEW.peer, NEW.last_seq,"
    " NEW.first_seq, NEW.stored_at_ns, NEW.received_at_ns, NEW.arrived_at_ns, NEW.sync,"
    " NEW.hlc); END",
)
_RECORD_RECEIPT = (f"INSERT INTO mp_record_receipt ({_RECEIPT_COLUMNS})"
                   f" VALUES ({', '.join('?' * 8)})")
#: A sender's commit in a one-at-a-time exchange: its next message and the record of the
#: previous one's receipt (one range). One INSERT into a TEMP view whose INSTEAD OF triggers
#: write both rows: the message with the SQL of `_ROWS["out"]`, the range as
#: `_RECORD_RECEIPT` does. A single statement is its own transaction in autocommit mode, so
#: the commit needs no BEGIN IMMEDIATE and COMMIT: 71 -> 63 us CPU. (Both rows or neither:
#: a trigger's failure fails the statement.)
_SEND_AND_RECORD_DDL = (
    "CREATE TEMP VIEW IF NOT EXISTS mp_send_and_record (peer, sender, recipient, stored_at_ns,"
    " id, seq, body, sent_at_ns, hlc, checksum, r_peer, r_last, r_first, r_stored_at_ns,"
    " r_received_at_ns, r_arrived_at_ns, r_sync, r_hlc)"
    " AS SELECT 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1 WHERE 0",
    "CREATE TEMP TRIGGER IF NOT EXISTS mp_send_and_record_insert"
    " INSTEAD OF INSERT ON mp_send_and_record BEGIN"
    " INSERT INTO messages (peer, sender, recipient, stored_at_ns, id, direction, seq, body,"
    " sent_at_ns, hlc, state, checksum) VALUES (NEW.peer, NEW.sender, NEW.recipient,"
    " NEW.stored_at_ns, NEW.id, 'out', NEW.seq, NEW.body, NEW.sent_at_ns, NEW.hlc, 'pending',"
    " NEW.checksum); END",
    # Its own trigger, not a nested insert into mp_record_receipt: one trigger program less.
    "CREATE TEMP TRIGGER IF NOT EXISTS mp_send_and_record_receipt"
    " INSTEAD OF INSERT ON mp_send_and_record"
    f" WHEN NOT {_receipt_overlaps('NEW.r_peer', 'NEW.r_first', 'NEW.r_last')} BEGIN"
    f" INSERT INTO receipts ({_RECEIPT_COLUMNS}) VALUES (NEW.r_peer, NEW.r_last, NEW.r_first,"
    " NEW.r_stored_at_ns, NEW.r_received_at_ns, NEW.r_arrived_at_ns, NEW.r_sync, NEW.r_hlc);"
    " END",
)
_SEND_AND_RECORD = f"INSERT INTO mp_send_and_record VALUES ({', '.join('?' * 18)})"
#: The usual case of it, one send at a time: the receipt is from the message's own recipient
#: and of one seq. Values bound once and used twice (?1: the peer, the recipient and the
#: receipt's peer; ?10: its last and first seq): 15 bound instead of 18, each about 500
#: instructions (callgrind). A bare `?` takes the number after the highest so far.
_SEND_AND_RECORD_ONE = ("INSERT INTO mp_send_and_record VALUES (?1, ?2, ?1, ?3, ?, ?, ?, ?, ?, ?,"
                        " ?1, ?, ?10, ?, ?, ?, ?, ?)")
#: One direct message (`Store._apply_one_row`), its link's values bound once each: the peer
#: is the recipient of an outgoing row, the sender of an incoming one (?1, used twice).
_ONE_ROW = {
    "out": (_INSERT_HEAD + "(?1, ?2, ?1, ?3, ?, 'out', ?, ?, ?, ?, 'pending', ?)"),
    "in": (_INSERT_HEAD + "(?1, ?1, ?2, ?3, ?, 'in', ?, ?, ?, ?, 'received', ?)"
           " ON CONFLICT (sender, id) DO NOTHING"),
}
_MARK_REJECTED = (
    "UPDATE messages SET state = 'rejected', reject_reason = ?"
    " WHERE direction = 'out' AND peer = ? AND seq = ? AND state = 'pending'"
)


def _links(
    messages: Sequence[Envelope],
) -> Iterator[tuple[tuple[str, str], Sequence[Envelope]]]:
    """`messages` grouped by (sender, recipient), each group in its original order."""
    if not messages:
        return
    first = messages[0]
    link = sender, recipient = first.sender, first.recipient
    # The usual batch: one link, no regrouping. A plain loop: half the instructions of
    # all() over a generator, and fewer than map(attrgetter(...)) (callgrind, 2,048 rows).
    for m in messages:
        if m.sender != sender or m.recipient != recipient:
            break
    else:
        yield link, messages
        return
    groups: dict[tuple[str, str], list[Envelope]] = {}
    for m in messages:
        groups.setdefault((m.sender, m.recipient), []).append(m)
    yield from groups.items()


def _one_direct_row(batch: WriteBatch) -> Envelope | None:
    """The message of a batch that writes one direct message and nothing else, else None."""
    if batch.deliveries or batch.rejections or batch.tasks:
        return None
    if batch.outgoing:
        if batch.incoming or len(batch.outgoing) != 1:
            return None
        m = batch.outgoing[0]
    elif len(batch.incoming) == 1 and len(batch.incoming[0]) == 1:
        m = batch.incoming[0][0]
    else:
        return None
    return m if m.header is None else None


def _send_and_record(batch: WriteBatch) -> tuple[Envelope, Delivery, int, int] | None:
    """(message, delivery, first seq, last seq) of a batch that writes one direct outgoing
    message and one receipt of one range, and nothing else (`_SEND_AND_RECORD`), else None."""
    if (len(batch.outgoing) != 1 or len(batch.deliveries) != 1 or batch.incoming
            or batch.rejections or batch.tasks):
        return None
    m, d = batch.outgoing[0], batch.deliveries[0]
    if m.header is not None:
        return None
    seqs = d.seqs
    if len(seqs) == 1:
        return m, d, seqs[0], seqs[0]
    ranges = to_ranges(seqs)
    return (m, d, *ranges[0]) if len(ranges) == 1 else None


def _row_values(
    messages: Sequence[Envelope], scratch: bytearray | None = None
) -> list[Any] | None:
    """The values of `messages`' own columns, flat, in `_ROWS` order (after the shared ones),
    if they are all of the first one's link (sender, recipient) and none has a header
    (`_headed_row` takes those); else None. The writer's usual batch is checked in the same
    pass that builds its values: a pass of its own for the link and one for headers cost
    a third as much again (callgrind, 2,048 rows). `scratch`: a buffer to encode in, kept
    by the caller (a `Store`, used by one thread at a time) from one batch to the next."""
    if not messages:
        return []
    first = messages[0]
    sender, recipient = first.sender, first.recipient
    # envelope_checksum for a message without header, without a call per row or a new object
    # per row: each envelope is encoded into the same buffer, whose first byte (the eight-field
    # array's) becomes the seven-field array's and whose last (the missing header's nil) is
    # dropped, so the CRC is of the buffer itself from 0. 3,485 instructions a row instead of
    # 4,106 for a bytes slice from the start value (callgrind, 4,096 rows; docs/benchmarks.md).
    crc, encode_into = crc32, envelope_encode_into
    buf = bytearray() if scratch is None else scratch
    values: list[Any] = []
    add = values.extend
    for m in messages:
        if m.header is not None or m.sender != sender or m.recipient != recipient:
            return None
        encode_into(m, buf)
        buf[0] = ARRAY7
        del buf[-1]
        add((m.id, m.seq, m.body, m.sent_at_ns, m.hlc, crc(buf)))
    return values


#: A message with a pattern header: its columns too. One row per statement (the multi-row
#: statements stay for direct messages, the bulk); `_HEADED` after the shared ?1-?4.
_HEADED_ROWS = {
    "out": ("(?1, ?2, ?3, ?4, ?, 'out', ?, ?, ?, ?, 'pending', ?, ?, ?, ?, ?)", ""),
    "in": ("(?1, ?2, ?3, ?4, ?, 'in', ?, ?, ?, ?, 'received', ?, ?, ?, ?, ?)",
           " ON CONFLICT (sender, id) DO NOTHING"),
}
_INSERT_HEADED_HEAD = (
    "INSERT INTO messages (peer, sender, recipient, stored_at_ns, id, direction, seq, body,"
    " sent_at_ns, hlc, state, checksum, kind, ref, queue, header) VALUES "
)
_HEADER = operator.attrgetter("header")


def _headed_row(m: Envelope) -> tuple[Any, ...]:
    """Own values of a message with a header: those of `_row_values`, then kind, ref, queue
    ('' stored as NULL) and the header's msgpack."""
    h = m.header
    assert h is not None
    blob = header_bytes(h)
    crc = crc32(memoryview(envelope_bytes(m))[1:], CRC_OF_ARRAY7)
    return (m.id, m.seq, m.body, m.sent_at_ns, m.hlc, crc, str(h.kind), h.ref or None,
            h.queue or None, blob)


def _same_header(blob: bytes | None, m: Envelope) -> bool:
    """Whether the stored header `blob` is `m`'s: the same bytes, or (a row stored by an
    older version, whose header had fewer fields: seven before `prefetch`) the same header
    once decoded. A retransmission of a message stored before an upgrade is a duplicate,
    not a conflict."""
    h = m.header
    if blob is None or h is None:
        return blob is None and h is None
    return blob == header_bytes(h) or header_decode(blob) == h


# The records of a write are msgspec structs, not dataclasses: built in C, one costs a few
# times fewer instructions, and every commit makes a `WriteBatch` (4,700 -> 1,800 a batch),
# every incoming group an `IncomingResult` (3,700 -> 1,800) and every receipt a `Delivery`
# (frozen: a dataclass sets each field through `object.__setattr__`; five fields 8,700 ->
# 1,100; callgrind, 10,000 of each). Nothing encodes them: they are plain records.
class Delivery(msgspec.Struct, frozen=True):
    peer: str
    seqs: list[int]
    receipt: ReceiptFrame
    arrived_at_ns: int


class Rejection(msgspec.Struct, frozen=True):
    peer: str
    seqs: list[int]
    reason: str


class WriteBatch(msgspec.Struct):
    """Everything one transaction writes: the unit of group commit."""

    outgoing: list[Envelope] = msgspec.field(default_factory=list)
    incoming: list[list[Envelope]] = msgspec.field(default_factory=list)
    deliveries: list[Delivery] = msgspec.field(default_factory=list)
    rejections: list[Rejection] = msgspec.field(default_factory=list)
    #: A ventilator's new tasks (`tasks` rows), written before the batch's messages.
    tasks: list[NewTask] = msgspec.field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.outgoing or self.incoming or self.deliveries or self.rejections
                    or self.tasks)

    def wal_pages(self, page_size: int = PAGE_SIZE) -> int:
        """About how many pages (of `page_size` bytes) committing this batch appends to the WAL.

        A commit writes each B-tree page it changed once: the last leaf of every B-tree a
        direction's rows go into (outgoing rows: the table, its id index, `messages_out_link`
        and `messages_hlc`; incoming rows: the same but `messages_out_link`), the last leaf of
        `receipts`, the table pages a rejection rewrites, plus a page per ~12 inserted rows
        for each 4 KiB of page. Measured with `PRAGMA wal_checkpoint` (100-byte bodies, schema
        5), 4 KiB pages: one outgoing row 4.3 pages, one incoming 3.3, one delivery 1.0, 512
        rows 49, 4,096 rows 286-292; 8 KiB: 4.2, 3.1, 1.0, 31, 146-152.
        """
        # Each kind tested before its sum: a commit writes one or two kinds, and this runs at
        # every commit (one a side a single send): 3,450 -> ~1,300 instructions for one row.
        outgoing, incoming = self.outgoing, self.incoming
        inserted = len(outgoing)
        pages = 4 if outgoing else 0
        if incoming:
            inserted += len(incoming[0]) if len(incoming) == 1 else sum(map(len, incoming))
            pages += 3
        if self.deliveries:
            pages += 1
        if self.rejections:
            pages += sum([1 + len(r.seqs) // 12 for r in self.rejections])
        if self.tasks:
            pages += 1 + len(self.tasks) // 12
        return pages + inserted * 4096 // (12 * page_size)


#: Longest reason a Reject for a refused message carries (SQLite's constraint messages are
#: short; a peer needs the cause, not a page of it).
REFUSAL_CHARS = 200


class IncomingResult(msgspec.Struct):
    """Per incoming group: seqs now committed (new or already there), conflicting seqs,
    which of the committed ones are not new (retransmissions, and later copies of a message
    the group repeats: `Store._classify_incoming`), one entry per copy, and the
    messages the store refused on their own, each with why (`RowRefused`, or the error a
    value that cannot be bound raised): the writer fills `refused`, never `apply`."""

    committed: list[int]
    conflicts: list[int]
    duplicates: list[int] = msgspec.field(default_factory=list)
    refused: list[tuple[int, BaseException]] = msgspec.field(default_factory=list)

    def refusals(self) -> list[tuple[int, str]]:
        """(seq, why) of each refused message, as its sender is told (a `Reject`, code
        `unstorable`): the cause without this node's file paths, cut to `REFUSAL_CHARS`."""
        return [(seq, f"the receiver's store refused it: "
                      f"{getattr(error, 'detail', None) or error}"[:REFUSAL_CHARS])
                for seq, error in self.refused]


class Store:
    """The writable store of one node. Not thread-safe: one writer thread owns it."""

    def __init__(
        self, path: Path, conn: sqlite3.Connection, lock: IO[bytes], sync: str,
        *, verified: OpenVerification | None = None,
    ) -> None:
        self.path = path
        self.sync = sync
        self._conn = conn
        self._lock = lock
        self._waits_for_lock = True
        with translated(path):
            for ddl in (*_RECORD_RECEIPT_DDL, *_SEND_AND_RECORD_DDL):
                conn.execute(ddl)
        self._max_rows_per_statement = rows_per_statement(
            conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
        )
        self.node_id = self._meta("node_id")
        self.page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
        verified = verified or OpenVerification()
        #: Message rows whose checksum `open` recomputed (every row of a small store).
        self.rows_verified_at_open = verified.rows
        self.fully_verified_at_open = not (verified.below_rowid or verified.quick_check_deferred)
        # Shared with this store's `Verifier`, which lowers `below_rowid` as it goes.
        self._verification = verified
        # tasks, task_results, members: their SQL is patterns.py's, on this connection.
        self._patterns = PatternTables(path, conn)
        #: Where `_row_values` encodes each row for its checksum (one thread at a time).
        self._scratch = bytearray()
        # The reads the node makes through the writer thread: reader.py's, on this connection.
        self._reader = StoreReader(path, conn=conn, verification=verified)

    @property
    def rows_left_to_verify(self) -> bool:
        """True while rows present at open are not all verified yet: until then, every row
        loaded for sending is checked as it is read. (Rows are verified once per open, as
        they were when open verified them all: rows written since are not checked again.)"""
        return self._verification.below_rowid > 0

    def open_verifier(self) -> Verifier | None:
        """A read-only connection that verifies, a chunk at a time, the rows and pages `open`
        left unchecked (None if it left none). Run it off the event loop after start; a
        `StoreCorrupt` from it means the node must stop as it would have at open."""
        if self.fully_verified_at_open:
            return None
        with translated(self.path):
            conn = connect(self.path, read_only=True)
        return Verifier(self.path, conn, self._verification)

    @classmethod
    def open(
        cls, data_dir: Path, *, name: str, sync: str = "full", verify_rows: int | None = None
    ) -> Store:
        """Open (creating if needed) the store in `data_dir`; lock it against other nodes.

        Verifies the newest `verify_rows` rows' checksums and the rows the node trusts at once
        (all of a store that small, plus `PRAGMA quick_check`); `open_verifier` does the rest.
        `verify_rows` defaults to `OPEN_VERIFY_ROWS`.
        """
        if verify_rows is None:
            verify_rows = OPEN_VERIFY_ROWS
        lock = _lock_data_dir(data_dir)
        path = data_dir / DB_FILENAME
        try:
            with translated(path):
                conn = connect(path, read_only=False)
                try:
                    quick_check_deferred = not check_integrity_if_small(conn, path,
                                                                         verify_rows)
                    # Takes effect on a new, empty file only: before WAL mode and the schema.
                    conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")
                    conn.execute("PRAGMA journal_mode = WAL")
                    conn.execute(f"PRAGMA synchronous = {sync.upper()}")
                    # Checkpoints fsync even at synchronous=NORMAL; the writer runs them on
                    # a connection and thread of their own (`open_checkpointer`), so that no
                    # commit, on the loop or on the writer thread, ever waits for one.
                    conn.execute("PRAGMA wal_autocheckpoint = 0")
                    conn.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT_BYTES}")
                    # The schema's CHECK (... IN (...)) constraints cost SQLite 3.40 about a
                    # third of every insert; every write below names its direction and state
                    # as SQL literals, so on this connection they can never fail. Readers and
                    # other tools still see (and the file still carries) the constraints.
                    conn.execute("PRAGMA ignore_check_constraints = ON")
                    conn.create_function("mp_checksum", 7, content_checksum,
                                         deterministic=True)
                    migrate(conn, path)
                    verified = verify_at_open(conn, path, verify_rows)
                    verified.quick_check_deferred = quick_check_deferred
                    _init_meta(conn, name)
                except BaseException:
                    conn.close()
                    raise
        except BaseException:
            lock.close()
            raise
        return cls(path, conn, lock, sync, verified=verified)

    def _meta(self, key: str) -> str:
        with translated(self.path):
            row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        if row is None:
            raise StoreCorrupt(str(self.path), f"meta key {key!r} missing")
        return str(row[0])

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            # Checkpoint so the main file is self-contained for readers after we exit.
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._conn.close()
        self._lock.close()

    # -- writes ---------------------------------------------------------------------------

    def apply(
        self, batch: WriteBatch, stored_at_ns: int, *, wait_for_lock: bool = True
    ) -> list[IncomingResult]:
        """Write `batch` in one transaction; results for `batch.incoming`, in order.

        With `wait_for_lock=False` a lock held by another process raises `StoreLocked` at
        once instead of waiting up to `BUSY_TIMEOUT_MS` (for callers that must not block).
        """
        conn = self._conn
        # try/except rather than `with translated(...)`: a generator context manager per
        # commit cost more than the one-row commit's own Python work.
        try:
            if wait_for_lock is not self._waits_for_lock:
                conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS if wait_for_lock else 0}")
                self._waits_for_lock = wait_for_lock
            # The one-statement commits (a single send's: `_SEND_AND_RECORD` on the sender,
            # one row on the receiver), each looked for only where it can be.
            if batch.deliveries:
                pair = _send_and_record(batch)
                if pair is not None:
                    self._send_and_record(*pair, stored_at_ns)
                    return []
            else:
                one = _one_direct_row(batch)
                if one is not None:
                    return self._apply_one_row(one, batch, stored_at_ns)
            conn.execute("BEGIN IMMEDIATE")
            try:
                if batch.tasks:  # first: a task message in this batch marks its row assigned
                    self._patterns.add_tasks(batch.tasks)
                if batch.outgoing:
                    self._insert(batch.outgoing, "out", stored_at_ns)
                results: list[IncomingResult] = []
                for group in batch.incoming:
                    inserted = self._insert(group, "in", stored_at_ns)
                    if inserted == len(group):
                        results.append(IncomingResult([m.seq for m in group], []))
                    else:
                        results.append(self._classify_incoming(group, inserted))
                for d in batch.deliveries:
                    r = d.receipt
                    ranges = to_ranges(d.seqs)
                    shared = (r.stored_at_ns, r.received_at_ns, d.arrived_at_ns, r.sync, r.hlc)
                    if len(ranges) == 1:  # the usual receipt: no executemany for one row
                        (lo, hi), = ranges
                        conn.execute(_RECORD_RECEIPT, (d.peer, hi, lo, *shared))
                    else:
                        conn.executemany(_RECORD_RECEIPT,
                                         [(d.peer, hi, lo, *shared) for lo, hi in ranges])
                for rej in batch.rejections:
                    conn.executemany(
                        _MARK_REJECTED, [(rej.reason, rej.peer, s) for s in rej.seqs]
                    )
                conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise translate(exc, self.path) from exc
        return results

    def _apply_one_row(
        self, m: Envelope, batch: WriteBatch, stored_at_ns: int
    ) -> list[IncomingResult]:
        """`apply` for a batch of one direct message and nothing else (every send's commit
        on the receiver, a sender's commit with no receipt to record): one INSERT in
        SQLite's autocommit mode is its own transaction, as durable as BEGIN IMMEDIATE ...
        COMMIT, without those two statements (docs/benchmarks.md). One row, so either all of
        it is committed or none: nothing that follows can find it half done."""
        execute = self._conn.execute
        values = _row_values((m,), self._scratch)
        assert values is not None  # one direct message (`_one_direct_row`)
        if batch.outgoing:
            execute(_ONE_ROW["out"], [m.recipient, m.sender, stored_at_ns, *values])
            return []
        before = self._conn.total_changes
        execute(_ONE_ROW["in"], [m.sender, m.recipient, stored_at_ns, *values])
        if self._conn.total_changes - before == 1:
            return [IncomingResult([m.seq], [])]
        return [self._classify_incoming(batch.incoming[0], 0)]

    def _send_and_record(
        self, m: Envelope, d: Delivery, lo: int, hi: int, stored_at_ns: int
    ) -> None:
        """`apply` for one outgoing message and one receipt range (`_SEND_AND_RECORD`): both
        rows, or (the statement failing) neither."""
        values = _row_values((m,), self._scratch)
        assert values is not None  # one direct message (`_send_and_record`)
        r = d.receipt
        if lo == hi and d.peer == m.recipient:
            self._conn.execute(_SEND_AND_RECORD_ONE, [
                m.recipient, m.sender, stored_at_ns, *values,
                hi, r.stored_at_ns, r.received_at_ns, d.arrived_at_ns, r.sync, r.hlc])
            return
        self._conn.execute(_SEND_AND_RECORD, [
            m.recipient, m.sender, m.recipient, stored_at_ns, *values,
            d.peer, hi, lo, r.stored_at_ns, r.received_at_ns, d.arrived_at_ns, r.sync, r.hlc])

    def _insert(self, messages: Sequence[Envelope], direction: str, stored_at_ns: int) -> int:
        """Insert rows of one direction, a few multi-row statements per link; returns how
        many message rows were inserted (an incoming duplicate is not), not counting what
        a pattern message wrote besides its row (`PatternTables.derived`)."""
        conn = self._conn
        execute, width = conn.execute, _VALUES_PER_ROW
        outgoing = direction == "out"
        before = conn.total_changes
        # The bulk case (every row of one link, none with a header) in one pass over the rows.
        values = _row_values(messages, self._scratch) if messages else None
        if values is not None:
            sender, recipient = messages[0].sender, messages[0].recipient
            shared = [recipient if outgoing else sender, sender, recipient, stored_at_ns]
            for start, size in _chunks(len(messages), self._max_rows_per_statement):
                execute(_insert_sql(direction, size),
                        shared + values[start * width:(start + size) * width])
            return conn.total_changes - before
        derived = 0
        for (sender, recipient), link_rows in _links(messages):
            # The peer column is the recipient of an outgoing row, the sender of an incoming one.
            shared = [recipient if outgoing else sender, sender, recipient, stored_at_ns]
            # Runs of direct and of headed messages, in order (rowids keep the commit order
            # `incoming_after` reads); a batch of direct messages only is one run, found in C.
            runs: Iterator[tuple[bool, Sequence[Envelope]]] = (
                iter([(True, link_rows)]) if not any(map(_HEADER, link_rows))
                else ((not headed, list(run)) for headed, run in itertools.groupby(
                    link_rows, lambda m: m.header is not None))
            )
            for direct, rows in runs:
                if not direct:
                    row_sql, tail = _HEADED_ROWS[direction]
                    sql = _INSERT_HEADED_HEAD + row_sql + tail
                    for m in rows:
                        row_before = conn.total_changes
                        execute(sql, shared + list(_headed_row(m)))
                        if conn.total_changes > row_before:
                            # What it means for the pattern tables, in its own transaction
                            # (a duplicate was acted on when it first came).
                            self._patterns.derived(m, outgoing, stored_at_ns)
                            derived += conn.total_changes - row_before - 1
                    continue
                values = _row_values(rows, self._scratch)
                assert values is not None  # one link's direct messages
                for start, size in _chunks(len(rows), self._max_rows_per_statement):
                    execute(_insert_sql(direction, size),
                            shared + values[start * width:(start + size) * width])
        return conn.total_changes - before - derived

    def _classify_incoming(self, group: Sequence[Envelope], inserted: int) -> IncomingResult:
        """Some ids of `group` were there before its INSERT, which inserted `inserted` rows:
        for each message, a retransmission (same content: receipt again), a conflict (same id,
        other content: never overwrite, reject), or new.

        New means inserted by this group's own INSERT, told by rowid, not by time: a row of
        a rowid table without AUTOINCREMENT gets the table's highest rowid + 1 (SQLite's
        documented rule below 2**63 - 1 rowids; nothing deletes messages), so the group's
        rows are the `inserted` highest rowids, one `SELECT max(rowid)` (O(log n)) away, and
        read only on this path. Comparing `stored_at_ns` with this commit's timestamp took a
        retransmission for a new message whenever the wall clock had not moved between the
        two commits (a coarse or stepped-back clock, a FakeClock): it was announced and
        handed to its pattern handler again. Older rows are duplicates, whether committed
        before or by an earlier group of this transaction (a copy that arrived while the
        first waited for the commit). A message repeated within the group is new in its
        first copy only: the later copies are duplicates, or conflicts if their content
        differs from the first's (the one stored)."""
        conn = self._conn
        committed: list[int] = []
        conflicts: list[int] = []
        duplicates: list[int] = []
        first_new = (
            conn.execute("SELECT max(rowid) FROM messages").fetchone()[0] - inserted + 1
            if inserted else None
        )
        new_rows: set[int] = set()
        for m in group:
            row = conn.execute(
                "SELECT direction, sender, recipient, body, sent_at_ns, rowid,"
                f" {CHECKED_COLUMNS} FROM messages WHERE sender = ? AND id = ?",
                (m.sender, m.id),
            ).fetchone()
            if row is not None:
                # Receipting a retransmission again vouches for the stored copy: check it.
                check_rows(self.path, [row[6:]])
            if row is not None and row[:5] == ("in", m.sender, m.recipient, m.body,
                                               m.sent_at_ns) and _same_header(row[13], m):
                committed.append(m.seq)
                rowid = row[5]
                if first_new is None or rowid < first_new or rowid in new_rows:
                    duplicates.append(m.seq)
                else:
                    new_rows.add(rowid)
            else:
                conflicts.append(m.seq)
        return IncomingResult(committed, conflicts, duplicates)

    def checkpoint(self) -> bool:
        """Copy the WAL into the database file on this connection, between transactions.
        True if every page was copied, so that the next commit starts the WAL over."""
        busy, wal_pages, copied = _checkpoint_passive(self._conn, self.path)
        return busy == 0 and wal_pages == copied

    def open_checkpointer(self) -> Checkpointer:
        """A second connection that copies the WAL into the database file while this one
        goes on committing (WAL lets a PASSIVE checkpoint run beside a writer)."""
        with translated(self.path):
            conn = connect(self.path, read_only=False)
            conn.execute(f"PRAGMA synchronous = {self.sync.upper()}")
        return Checkpointer(self.path, conn)

    # -- the node's reads (reader.py), through the writer thread ---------------------------

    def last_seqs(self) -> dict[str, int]:
        """`StoreReader.last_seqs`: highest outgoing seq per peer."""
        return self._reader.last_seqs()

    def max_hlc_issued(self) -> tuple[int, int]:
        """`StoreReader.max_hlc_issued`: (highest HLC stamp issued here, its sent_at_ns)."""
        return self._reader.max_hlc_issued()

    def max_hlc(self, direction: str) -> int:
        """`StoreReader.max_hlc`: the highest HLC stamp on rows of `direction`."""
        return self._reader.max_hlc(direction)

    def load_pending(self, peer: str, after_seq: int, limit: int) -> list[Envelope]:
        """`StoreReader.load_pending`: up to `limit` undelivered messages to `peer` above
        `after_seq`, in seq order, each checked while rows present at open are unverified."""
        return self._reader.load_pending(peer, after_seq, limit)

    def pending_count(self, peer: str | None = None) -> int:
        """`StoreReader.pending_count`: outgoing messages still waiting for a receipt."""
        return self._reader.pending_count(peer)

    def has_outgoing(self, message_id: str, sender: str) -> bool:
        """`StoreReader.has_outgoing`: whether this node stored its own `message_id`."""
        return self._reader.has_outgoing(message_id, sender)

    def own_group_messages(self, sender: str, group: str, limit: int,
                           before_hlc: int = 0) -> list[tuple[str, int, int, str]]:
        """`StoreReader.own_group_messages`: this node's own messages to `group`."""
        return self._reader.own_group_messages(sender, group, limit, before_hlc)

    def unanswered_requests(self) -> list[tuple[str, str, bool]]:
        """`StoreReader.unanswered_requests`: requests sent here that got no reply."""
        return self._reader.unanswered_requests()

    def unanswered_incoming_requests(self, limit: int,
                                     history_only: bool = False) -> list[Envelope]:
        """`StoreReader.unanswered_incoming_requests`: requests to this node not replied to."""
        return self._reader.unanswered_incoming_requests(limit, history_only)

    def unanswered_incoming_tasks(self, queue: str, after_rowid: int,
                                  limit: int) -> list[tuple[int, Envelope]]:
        """`StoreReader.unanswered_incoming_tasks`: tasks of `queue` with no result sent."""
        return self._reader.unanswered_incoming_tasks(queue, after_rowid, limit)

    # -- the pattern tables (patterns.py) -------------------------------------------------

    def save_member(self, record: MemberRecord) -> bool:
        """`PatternTables.save_member`: keep a group membership record if it outranks the
        stored one; True if kept."""
        return self._patterns.save_member(record)

    def member_records(self) -> list[MemberRecord]:
        """`PatternTables.member_records`: every stored group membership record."""
        return self._patterns.member_records()

    def task_results(self) -> list[tuple[str, str, str]]:
        """`PatternTables.task_results`: (task id, result message id, worker) of every
        result this node keeps as a sink."""
        return self._patterns.task_results()

    def owed_dones(self) -> list[OwedDone]:
        """`PatternTables.owed_dones`: the `done`s a worker still owes (read at start)."""
        return self._patterns.owed_dones()

    def add_task(self, task_id: str, queue: str, body: str, sink: str, at_ns: int) -> None:
        """`PatternTables.add_task`: a ventilator's new task, queued."""
        self._patterns.add_task(task_id, queue, body, sink, at_ns)

    def set_task_state(self, task_id: str, state: str, *, worker: str | None = None,
                       attempts: int | None = None, at_ns: int | None = None) -> None:
        """`PatternTables.set_task_state`: a task assigned or finished."""
        self._patterns.set_task_state(task_id, state, worker=worker, attempts=attempts,
                                      at_ns=at_ns)

    def merge_member(self, namespace: str, name: str, member: str, joined: bool,
                     version: int, hlc: int, prefetch: int | None = None) -> None:
        """`PatternTables.merge_member`: keep the winning membership record."""
        self._patterns.merge_member(namespace, name, member, joined, version, hlc, prefetch)

    def members(self, namespace: str) -> list[tuple[str, str, bool, int, int | None]]:
        """`PatternTables.members`: (name, member, joined, version, prefetch) in
        `namespace`."""
        return self._patterns.members(namespace)

    def unfinished_tasks(self) -> dict[str, tuple[float | None, list[TaskRecord]]]:
        """`PatternTables.unfinished_tasks`: per queue, its lease and unfinished tasks."""
        return self._patterns.unfinished_tasks()

    def queue_counts(self) -> dict[str, QueueCounts]:
        """`PatternTables.queue_counts`: per queue, tasks done, abandoned, redelivered and
        results kept here."""
        return self._patterns.queue_counts()

    def broadcasts(self, logical_id: str) -> list[StoredBroadcast]:
        """`PatternTables.broadcasts`: broadcast `logical_id` from its copies and receipts."""
        return self._patterns.broadcasts(logical_id)

    def unsettled_broadcasts(self) -> list[StoredBroadcast]:
        """`PatternTables.unsettled_broadcasts`: the broadcasts not all receipted."""
        return self._patterns.unsettled_broadcasts()

    def execute_raw(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """Run one statement (tests and fault injection only)."""
        with translated(self.path):
            return self._conn.execute(sql, params).fetchall()

    def __repr__(self) -> str:
        return f"Store({self.path}, sync={self.sync})"


def _checkpoint_passive(conn: sqlite3.Connection, path: Path) -> tuple[int, int, int]:
    """PASSIVE checkpoint (never waits for a reader or blocks a writer): 1 if it could not
    run at all, the pages the WAL holds, and how many of them are now in the database file."""
    with translated(path):
        busy, wal_pages, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    return int(busy), int(wal_pages), int(copied)


class Checkpointer:
    """Runs WAL checkpoints on its own connection, for one thread at a time."""

    def __init__(self, path: Path, conn: sqlite3.Connection) -> None:
        self.path = path
        self._conn = conn

    def checkpoint(self) -> int:
        """Copy committed WAL pages into the database file; returns how many the WAL held."""
        return _checkpoint_passive(self._conn, self.path)[1]

    def close(self) -> None:
        self._conn.close()


def migrate(conn: sqlite3.Connection, path: Path) -> None:
    """Bring the schema to `SCHEMA_VERSION`, one numbered migration at a time."""
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if version > SCHEMA_VERSION:
        raise SchemaTooNew(str(path), version, SCHEMA_VERSION)
    for target in range(version + 1, SCHEMA_VERSION + 1):
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in MIGRATIONS[target - 1].split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {target}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise


def _init_meta(conn: sqlite3.Connection, name: str) -> None:
    conn.execute("BEGIN IMMEDIATE")
    conn.execute(
        "INSERT OR IGNORE INTO meta (key, value) VALUES ('node_id', ?)", (secrets.token_hex(8),)
    )
    conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('name', ?)", (name,))
    stored = conn.execute("SELECT value FROM meta WHERE key = 'name'").fetchone()[0]
    conn.execute("COMMIT")
    if stored != name:
        raise StoreError(
            f"this data directory belongs to node {stored!r}, not {name!r}; "
            "give each node its own --data directory"
        )


#: A store is private whatever the umask: its folder 0700, its files 0600 (SQLite gives the
#: WAL and shared-memory files the database file's mode).
DATA_DIR_MODE = 0o700
STORE_FILE_MODE = 0o600


def _make_private(data_dir: Path) -> None:
    """Create `data_dir` 0700 (or tighten it, if it is ours) and the database file 0600,
    before SQLite creates anything: with a loose umask other users could read every body."""
    data_dir.mkdir(mode=DATA_DIR_MODE, parents=True, exist_ok=True)
    _tighten(data_dir, DATA_DIR_MODE)
    db = data_dir / DB_FILENAME
    with contextlib.suppress(FileExistsError):
        os.close(os.open(db, os.O_WRONLY | os.O_CREAT | os.O_EXCL, STORE_FILE_MODE))
    for path in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        _tighten(path, STORE_FILE_MODE)


def _tighten(path: Path, mode: int) -> None:
    """chmod `path` to `mode` if it exists, is ours and is looser (a store made before)."""
    try:
        st = path.stat()
        if st.st_mode & 0o777 != mode and st.st_uid == os.getuid():
            path.chmod(mode)
    except FileNotFoundError:
        pass


def _lock_data_dir(data_dir: Path) -> IO[bytes]:
    check_data_dir(data_dir)
    try:
        _make_private(data_dir)
        fd = os.open(data_dir / LOCK_FILENAME, os.O_WRONLY | os.O_CREAT | os.O_APPEND,
                     STORE_FILE_MODE)
        lock = os.fdopen(fd, "ab")  # held for the node's life
    except OSError as exc:
        raise DataDirNotWritable(str(data_dir), exc.strerror or str(exc)) from None
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        lock.close()
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise StoreLocked(str(data_dir / DB_FILENAME)) from None
        raise DataDirNotWritable(str(data_dir), exc.strerror or str(exc)) from None
    if not os.access(data_dir, os.W_OK):
        lock.close()
        raise DataDirNotWritable(str(data_dir), "permission denied")
    return lock

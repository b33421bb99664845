"""Reads of a node's store: history and counts, the outbox, what the node's state comes from.

Rule: nothing here writes. A `StoreReader` reads on a read-only connection of its own
(`StoreReader(path)`, `for_data_dir`: the CLI, console, control server and tools; WAL lets it
run beside the writer) or, composed by `Store`, on the writer's connection: the reads the node
makes through the writer thread (`Store` delegates them here, as it does to `PatternTables`).
"""

from __future__ import annotations

import dataclasses
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from meshpost.errors import NoStore, StoreCorrupt
from meshpost.protocol import Envelope
from meshpost.protocol.groups import BroadcastStatus
from meshpost.store.checksum import header_decode
from meshpost.store.connection import (
    DB_FILENAME,
    check_data_dir,
    check_is_meshpost,
    connect,
    translate,
    translated,
)
from meshpost.store.patterns import broadcasts_of, task_results_with_bodies
from meshpost.store.verifier import (
    CHECKED_COLUMNS,
    CHECKED_COLUMNS_BEFORE_7,
    ENVELOPE_COLUMNS,
    OpenVerification,
    check_rows,
    last_out_rows,
)

#: The last seq of the run of adjacent receipt ranges (each starting where the one before
#: ended) that begins with the range ending at ?2.
_END_OF_RUN = (
    "SELECT last_seq FROM (SELECT last_seq, LEAD(first_seq) OVER (ORDER BY last_seq) AS next"
    " FROM receipts WHERE peer = ?1 AND last_seq >= ?2)"
    " WHERE next IS NULL OR next <> last_seq + 1 LIMIT 1"
)
#: Window functions (LEAD) came with SQLite 3.25; before it, runs are walked a range at a time.
_LEAD = sqlite3.sqlite_version_info >= (3, 25, 0)
#: Readers read `message_rows`, the messages as they stand with their receipts.
_ROWS_VIEW = "message_rows"


def _envelope(row: Sequence[Any]) -> Envelope:
    """An Envelope from (id, seq, sender, recipient, body, sent_at_ns, hlc, header blob)."""
    id, seq, sender, recipient, body, sent_at_ns, hlc, blob = row
    return Envelope(id, seq, sender, recipient, body, sent_at_ns, hlc,
                    None if blob is None else header_decode(blob))


@dataclasses.dataclass(frozen=True, slots=True)
class StoredMessage:
    """One row of history, as `meshpost history --json` prints it."""

    id: str
    direction: str
    peer: str
    sender: str
    recipient: str
    seq: int
    body: str
    sent_at_ns: int
    hlc: int
    state: str
    stored_at_ns: int
    receipt_stored_at_ns: int | None
    receipt_received_at_ns: int | None
    receipt_arrived_at_ns: int | None
    receipt_sync: str | None
    receipt_hlc: int | None
    reject_reason: str | None
    #: The pattern header's kind and ref (schema 7), None for a direct message: a reply's
    #: ref is its request's id, a task's or result's the task id.
    kind: str | None = None
    ref: str | None = None


#: `history(group=G)`: copies to G (to `all`: those with no group); of ours (n copies per
#: logical message) the first only.
_GROUP_ROWS = (
    "kind = 'group' AND COALESCE(queue, 'all') = ? AND (direction = 'in' OR id = (SELECT MIN(c.id)"
    " FROM messages AS c WHERE c.ref = message_rows.ref AND c.kind = 'group'"
    " AND c.direction = 'out'))"
)
_FIELDS = dataclasses.fields(StoredMessage)
_COLUMNS = ", ".join(f.name for f in _FIELDS)
#: A store at schema 6 or older has no kind and ref columns (a reader may open a store that
#: no node of this version has migrated yet).
_COLUMNS_BEFORE_7 = _COLUMNS.replace(", kind, ref", ", NULL, NULL")


class StoreReader:
    """Read-only access to a node's store; safe while the node runs."""

    def __init__(
        self, path: Path, *, conn: sqlite3.Connection | None = None,
        verification: OpenVerification | None = None,
    ) -> None:
        """Read the store at `path` on a read-only connection of its own; with `conn`, on
        that one instead (`Store` passes its own, and what its open verified: see
        `rows_left_to_verify`), which closes that connection itself, never this reader."""
        if conn is None and not path.exists():
            check_data_dir(path.parent)
            raise NoStore(str(path))
        self.path = path
        self._verification = verification
        with translated(path):
            self._conn = conn if conn is not None else connect(path, read_only=True)
            try:
                version = int(self._conn.execute("PRAGMA user_version").fetchone()[0])
                if conn is None and version == 0:
                    check_is_meshpost(self._conn, path)
            except BaseException:
                if conn is None:
                    self._conn.close()
                raise
        # A store no node of this version has opened yet keeps every receipt in its rows.
        self._receipts = version >= 4
        self._checksums = version >= 2
        self._rows = _ROWS_VIEW if self._receipts else "messages"
        self._columns = _COLUMNS if version >= 7 else _COLUMNS_BEFORE_7
        self._checked = CHECKED_COLUMNS if version >= 7 else CHECKED_COLUMNS_BEFORE_7

    @classmethod
    def for_data_dir(cls, data_dir: Path) -> StoreReader:
        return cls(data_dir / DB_FILENAME)

    def close(self) -> None:
        self._conn.close()

    @property
    def rows_left_to_verify(self) -> bool:
        """`Store.rows_left_to_verify` of the store that composed this reader; a reader of
        its own knows of no verification, so it checks every row it loads for sending."""
        return self._verification is None or self._verification.below_rowid > 0

    def __enter__(self) -> StoreReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def pending_count(self, peer: str | None = None) -> int:
        """As `Store.pending_count`, without occupying the writer's connection."""
        return _pending_count(self._conn, self.path, peer, receipts=self._receipts)

    def node_name(self) -> str | None:
        with translated(self.path):
            row = self._conn.execute("SELECT value FROM meta WHERE key = 'name'").fetchone()
        return None if row is None else str(row[0])

    def peers(self) -> list[str]:
        """Every peer this store holds messages with, sorted."""
        with translated(self.path):
            rows = self._conn.execute("SELECT DISTINCT peer FROM messages ORDER BY peer")
            return [str(peer) for (peer,) in rows.fetchall()]

    def history(
        self, *, peer: str | None = None, limit: int | None = None, direction: str | None = None,
        check: bool = True, group: str | None = None,
    ) -> list[StoredMessage]:
        """Messages in causal (HLC) order; with `limit`, the most recent ones. With `group`,
        the messages to that group (or `all`) only (copies with header kind `group`), this
        node's own as one row per logical message (its first copy: `group_history` adds the k/n).

        Each row's content checksum is checked as it is read: a row that rotted on disk raises
        `StoreCorrupt` rather than being shown as stored. `check=False` returns rows as they
        are, for tools that compare stores and count altered rows themselves (`verify`).
        """
        where, params = [], []
        if peer is not None:
            where.append("peer = ?")
            params.append(peer)
        if direction is not None:
            where.append("direction = ?")
            params.append(direction)
        if group is not None:
            if self._columns is not _COLUMNS:  # before schema 7 nothing went to a group
                return []
            where.append(_GROUP_ROWS)
            params.append(group)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        check = check and self._checksums
        columns = f"{self._columns}, {self._checked}" if check else self._columns
        sql = f"SELECT {columns} FROM {self._rows} {clause} ORDER BY hlc DESC, id DESC"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(str(limit))
        try:
            rows = self._conn.execute(sql, params).fetchall()
        except sqlite3.DatabaseError as exc:
            if "decode" in str(exc).lower():  # text that no longer decodes as UTF-8
                raise StoreCorrupt(str(self.path), f"unreadable message row: {exc}") from exc
            raise translate(exc, self.path) from exc
        if not check:
            return [StoredMessage(*row) for row in reversed(rows)]
        width = len(_FIELDS)
        check_rows(self.path, [row[width:] for row in rows])
        return [StoredMessage(*row[:width]) for row in reversed(rows)]


    def group_history(
        self, group: str, *, limit: int | None = None
    ) -> list[tuple[StoredMessage, BroadcastStatus | None]]:
        """`history(group=...)`, each of this node's own messages to the group with its
        status (delivered k/n from its copies' receipts), the others' with None."""
        rows = self.history(group=group, limit=limit)
        shown: list[tuple[StoredMessage, BroadcastStatus | None]] = []
        for row in rows:
            status = None
            if row.direction == "out" and row.ref is not None:
                with translated(self.path):
                    found = broadcasts_of(self._conn, row.ref)
                status = found[0].status if found else None
            shown.append((row, status))
        return shown

    def task_results(self) -> list[tuple[str, str, str, str]]:
        """(task id, worker, result message id, result body) of every result this node keeps
        as a sink, in task id order (empty before schema 7): `patterns.py`."""
        return task_results_with_bodies(self._conn, self.path)

    def last_incoming_cursor(self) -> int:
        """Where `incoming_after` starts to see only messages stored from now on."""
        with translated(self.path):
            row = self._conn.execute("SELECT MAX(rowid) FROM messages").fetchone()
        return int(row[0] or 0)

    def incoming_after(self, cursor: int, limit: int) -> list[tuple[int, StoredMessage]]:
        """Up to `limit` received messages stored after `cursor`, in commit order, each with
        its own cursor (rowids only grow: rows are never deleted)."""
        sql = (f"SELECT rowid, {self._columns} FROM messages WHERE rowid > ?"
               " AND direction = 'in'"
               " ORDER BY rowid LIMIT ?")
        with translated(self.path):
            rows = self._conn.execute(sql, (cursor, limit)).fetchall()
        return [(int(row[0]), StoredMessage(*row[1:])) for row in rows]

    def counts(self) -> dict[str, int]:
        """Rows per (direction, state), e.g. {'out/delivered': 10, 'in/received': 7}."""
        with translated(self.path):
            rows = self._conn.execute(
                "SELECT direction, state, COUNT(*) FROM messages GROUP BY direction, state"
            ).fetchall()
            covered = _receipted(self._conn, None) if self._receipts else 0
        # The rows as stored, then the receipt ranges' seqs moved from pending to delivered
        # (counting through `message_rows` would cost two seeks a row).
        counts = {f"{d}/{s}": int(n) for d, s, n in rows}
        if covered:
            counts["out/pending"] -= covered
            counts["out/delivered"] = counts.get("out/delivered", 0) + covered
            if not counts["out/pending"]:
                del counts["out/pending"]
        return counts

    # -- the node's reads (`Store` delegates them; the current schema only) ----------

    def last_seqs(self) -> dict[str, int]:
        """Highest outgoing seq per peer, so numbering continues after a restart."""
        with translated(self.path):
            rows = last_out_rows(self._conn)
        # Numbering goes on from these rows: a rotted seq would repeat or skip numbers.
        check_rows(self.path, [row[1:] for row in rows])
        return {row[0]: int(row[2]) for row in rows}

    def max_hlc_issued(self) -> tuple[int, int]:
        """(highest HLC stamp this node issued, its row's sent_at_ns), (0, 0) if none."""
        with translated(self.path):
            row = self._conn.execute(
                "SELECT hlc, sent_at_ns FROM messages INDEXED BY messages_hlc"
                " WHERE direction = 'out' ORDER BY hlc DESC LIMIT 1"
            ).fetchone()
        return (int(row[0]), int(row[1])) if row else (0, 0)

    def max_hlc(self, direction: str) -> int:
        """The highest HLC stamp stored on rows of `direction` ('out': stamps this node
        issued; 'in': its peers'), 0 if none."""
        with translated(self.path):
            row = self._conn.execute(
                # Walk the hlc index from the top: stops at the first row of that direction.
                "SELECT hlc FROM messages INDEXED BY messages_hlc WHERE direction = ?"
                " ORDER BY hlc DESC LIMIT 1",
                (direction,),
            ).fetchone()
        return int(row[0]) if row else 0

    def load_pending(self, peer: str, after_seq: int, limit: int) -> list[Envelope]:
        """Up to `limit` undelivered messages to `peer` with seq above `after_seq`, in order.

        Skips the settled run above `after_seq` (after a start, the whole delivered outbox) a
        run of adjacent receipt ranges at a time, then reads `message_rows` from there
        (SQLite walks `messages_out_link`). Later calls start above everything already loaded,
        where no receipt reaches.
        """
        # These go out as they are: while rows present at open are not all verified, a row
        # that rotted on disk is refused as it is read, never sent. (Checking costs 0.3-0.4
        # us a row, a quarter of this read: not paid once every row was verified.)
        check = self.rows_left_to_verify
        with translated(self.path):
            after_seq = self._settled_through(peer, after_seq)
            rows = self._conn.execute(
                f"SELECT {CHECKED_COLUMNS if check else ENVELOPE_COLUMNS} FROM {_ROWS_VIEW}"
                " WHERE direction = 'out' AND peer = ? AND seq > ? AND state = 'pending'"
                " ORDER BY seq LIMIT ?",
                (peer, after_seq, limit),
            ).fetchall()
        if not check:
            return [_envelope(row) for row in rows]
        envelopes: list[Envelope] = []
        check_rows(self.path, rows, envelopes)
        return envelopes

    def _settled_through(self, peer: str, seq: int) -> int:
        """The highest seq s >= `seq` such that no message to `peer` in (seq, s] is pending:
        each is covered by a receipt range or was settled otherwise (rejected, or delivered
        under schema 3)."""
        conn = self._conn
        while True:
            row = conn.execute(
                "SELECT first_seq, last_seq FROM receipts WHERE peer = ? AND last_seq > ?"
                " ORDER BY last_seq LIMIT 1",
                (peer, seq),
            ).fetchone()
            if row is None:
                return seq
            first, last = row
            if first > seq + 1 and conn.execute(
                "SELECT 1 FROM messages INDEXED BY messages_out_link WHERE direction = 'out'"
                " AND peer = ? AND seq BETWEEN ? AND ? AND state = 'pending' LIMIT 1",
                (peer, seq + 1, first - 1),
            ).fetchone():
                return seq  # a pending message before the next range
            # Then to the end of the run of adjacent ranges that starts here, in one query:
            # one receipt per message (sends one at a time) makes a range per seq, and a
            # query per range was 4.3 us each (0.9 s after a restart with 200,000 of them).
            seq = conn.execute(_END_OF_RUN, (peer, last)).fetchone()[0] if _LEAD else last

    def has_outgoing(self, message_id: str, sender: str) -> bool:
        """Whether this node already stored its own message `message_id` (a derived reply
        or result id: a handler that ran twice posts it once)."""
        with translated(self.path):
            return self._conn.execute(
                "SELECT 1 FROM messages WHERE sender = ? AND id = ?", (sender, message_id)
            ).fetchone() is not None

    def own_group_messages(self, sender: str, group: str, limit: int,
                           before_hlc: int = 0) -> list[tuple[str, int, int, str]]:
        """(logical id, sent_at_ns, hlc, body) of `sender`'s (this node's) own messages to
        `group`, one per logical message (its first copy), newest first, at most `limit`,
        only those below `before_hlc` if it is not 0: what a history request is answered with
        (docs/protocol.md 19.6). Never another node's message: rows this node sent only."""
        with translated(self.path):
            rows = self._conn.execute(
                "SELECT ref, MIN(sent_at_ns), MIN(hlc), body FROM messages"
                " WHERE direction = 'out' AND sender = ? AND kind = 'group' AND queue = ?"
                " AND (? = 0 OR hlc < ?) GROUP BY ref ORDER BY MIN(hlc) DESC, ref DESC"
                " LIMIT ?", (sender, group, before_hlc, before_hlc, limit),
            ).fetchall()
        return [(str(r), int(s), int(h), str(b)) for r, s, h, b in rows]

    def unanswered_requests(self) -> list[tuple[str, str, bool]]:
        """(request id, peer, delivered) of every request this node sent that no stored reply
        from that peer refers to (RequestTracker.restore after a restart). A scan of the
        table (a request's ref is empty, so it is not in `messages_ref`): once, at start."""
        with translated(self.path):
            rows = self._conn.execute(
                f"SELECT q.id, q.peer, q.state = 'delivered' FROM {_ROWS_VIEW} AS q"
                " WHERE q.direction = 'out' AND q.kind = 'request' AND NOT EXISTS ("
                " SELECT 1 FROM messages AS r INDEXED BY messages_ref WHERE r.ref = q.id"
                " AND r.kind = 'reply' AND r.direction = 'in' AND r.sender = q.peer)"
            ).fetchall()
        return [(str(i), str(p), bool(d)) for i, p, d in rows]

    def unanswered_incoming_requests(self, limit: int,
                                     history_only: bool = False) -> list[Envelope]:
        """Requests peers sent this node that it has not replied to (its handler runs again
        for them after a restart; the derived reply id keeps the reply single). With
        `history_only`, the history requests only (those that name a group: 19.6)."""
        only = " AND q.queue IS NOT NULL" if history_only else ""
        with translated(self.path):
            rows = self._conn.execute(
                "SELECT q.id, q.seq, q.sender, q.recipient, q.body, q.sent_at_ns, q.hlc,"
                " q.header FROM messages AS q WHERE q.direction = 'in' AND q.kind = 'request'"
                f"{only} AND NOT EXISTS (SELECT 1 FROM messages AS r INDEXED BY messages_ref"
                " WHERE r.ref = q.id AND r.kind = 'reply' AND r.direction = 'out'"
                " AND r.recipient = q.sender) ORDER BY q.rowid LIMIT ?", (limit,)
            ).fetchall()
        return [_envelope(row) for row in rows]

    def unanswered_incoming_tasks(self, queue: str, after_rowid: int,
                                  limit: int) -> list[tuple[int, Envelope]]:
        """Task messages of `queue` that peers sent this node and it sent no result for, in
        storage order after `after_rowid`, with their rowids (a worker runs them again when
        it serves the queue after a restart; the derived result id keeps each result single)."""
        with translated(self.path):
            rows = self._conn.execute(
                "SELECT q.rowid, q.id, q.seq, q.sender, q.recipient, q.body, q.sent_at_ns,"
                " q.hlc, q.header FROM messages AS q WHERE q.direction = 'in'"
                " AND q.kind = 'task' AND q.queue = ? AND q.rowid > ? AND NOT EXISTS"
                " (SELECT 1 FROM messages AS r INDEXED BY messages_ref WHERE r.ref = q.ref"
                " AND r.kind = 'result' AND r.direction = 'out') ORDER BY q.rowid LIMIT ?",
                (queue, after_rowid, limit)).fetchall()
        return [(int(row[0]), _envelope(row[1:])) for row in rows]


def _pending_count(
    conn: sqlite3.Connection, path: Path, peer: str | None, *, receipts: bool
) -> int:
    where = "direction = 'out' AND state = 'pending'" + (" AND peer = ?" if peer else "")
    with translated(path):
        row = conn.execute(
            f"SELECT COUNT(*) FROM messages INDEXED BY messages_out_link WHERE {where}",
            (peer,) if peer else (),
        ).fetchone()
        return int(row[0]) - (_receipted(conn, peer) if receipts else 0)


def _receipted(conn: sqlite3.Connection, peer: str | None) -> int:
    """Seqs the receipt ranges cover (of `peer`, or of all peers). Ranges never overlap and
    cover only rows that were in flight, hence stored as 'pending', when they were recorded:
    this many of the 'pending' rows are in fact delivered."""
    sql = "SELECT COALESCE(SUM(last_seq - first_seq + 1), 0) FROM receipts"
    row = conn.execute(sql + " WHERE peer = ?", (peer,)) if peer else conn.execute(sql)
    return int(row.fetchone()[0])

"""The pattern tables (issue 18): `tasks` (a ventilator's queue), `task_results` (a sink's
results, one per task) and `members` (group membership records).

Rule: their SQL lives here, over a connection the store owns; `Store` composes a
`PatternTables` and delegates to it (callers keep calling `Store`), and a result's row is
written inside `Store.apply`'s transaction with `RECORD_RESULT`.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from meshpost.protocol.groups import MemberRecord
from meshpost.store.connection import translated

#: A sink's result, recorded with the result message's row (ignored for a task it has).
RECORD_RESULT = (
    "INSERT INTO task_results (task_id, queue, message_id, worker, stored_at_ns)"
    " VALUES (?, ?, ?, ?, ?) ON CONFLICT (task_id) DO NOTHING"
)


class PatternTables:
    """The pattern tables of one store's writable connection (the writer thread's)."""

    def __init__(self, path: Path, conn: sqlite3.Connection) -> None:
        self.path = path
        self._conn = conn

    def save_member(self, record: MemberRecord) -> bool:
        """Keep a group membership record if it outranks the stored one for its (group,
        member) (`MemberRecord.rank`: higher version, a leave at equal versions); True if
        kept. One statement: committed on its own."""
        with translated(self.path):
            cursor = self._conn.execute(
                "INSERT INTO members (namespace, name, member, joined, version, hlc)"
                " VALUES ('group', ?, ?, ?, ?, ?)"
                " ON CONFLICT (namespace, name, member) DO UPDATE SET"
                " joined = excluded.joined, version = excluded.version, hlc = excluded.hlc"
                " WHERE excluded.version > members.version OR (excluded.version ="
                " members.version AND excluded.joined < members.joined)",
                (record.group, record.member, int(record.joined), record.version, record.hlc))
        return cursor.rowcount > 0

    def member_records(self) -> list[MemberRecord]:
        """Every stored group membership record (this node's own and its peers')."""
        with translated(self.path):
            rows = self._conn.execute(
                "SELECT name, member, joined, version, hlc FROM members"
                " WHERE namespace = 'group' ORDER BY name, member").fetchall()
        return [MemberRecord(str(g), str(m), bool(j), int(v), int(h)) for g, m, j, v, h in rows]

    def task_results(self) -> list[tuple[str, str, str]]:
        """(task id, result message id, worker) of every result this node keeps as a sink."""
        with translated(self.path):
            rows = self._conn.execute(
                "SELECT task_id, message_id, worker FROM task_results").fetchall()
        return [(str(t), str(m), str(w)) for t, m, w in rows]

    def add_task(self, task_id: str, queue: str, body: str, sink: str, at_ns: int) -> None:
        """A ventilator's new task, queued (its own transaction, before it is dispatched)."""
        self._write("INSERT INTO tasks (task_id, queue, body, sink, state, submitted_at_ns)"
                    " VALUES (?, ?, ?, ?, 'queued', ?)", (task_id, queue, body, sink, at_ns))

    def set_task_state(self, task_id: str, state: str, *, worker: str | None = None,
                       attempts: int | None = None, at_ns: int | None = None) -> None:
        """A task assigned (`worker`, `attempts`), or finished ('done' by `worker`, or
        'abandoned') at `at_ns`; a finished task stays finished."""
        if state == "assigned":
            self._write("UPDATE tasks SET state = 'assigned', worker = ?, attempts = ?"
                        " WHERE task_id = ? AND state IN ('queued', 'assigned')",
                        (worker, attempts, task_id))
        else:
            self._write("UPDATE tasks SET state = ?, finished_at_ns = ?, finished_by = ?"
                        " WHERE task_id = ? AND state IN ('queued', 'assigned')",
                        (state, at_ns, worker, task_id))

    def merge_member(self, namespace: str, name: str, member: str, joined: bool,
                     version: int, hlc: int) -> None:
        """Keep the winning membership record per (namespace, name, member): the highest
        version; at equal versions a leave (docs/patterns.md 6.2)."""
        self._write(
            "INSERT INTO members (namespace, name, member, joined, version, hlc)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (namespace, name, member) DO UPDATE SET"
            " joined = excluded.joined, version = excluded.version, hlc = excluded.hlc"
            " WHERE excluded.version > members.version OR (excluded.version = members.version"
            " AND excluded.joined < members.joined)",
            (namespace, name, member, int(joined), version, hlc))

    def members(self, namespace: str) -> list[tuple[str, str, bool, int]]:
        """(name, member, joined, version) of every record in `namespace`."""
        with translated(self.path):
            rows = self._conn.execute(
                "SELECT name, member, joined, version FROM members WHERE namespace = ?",
                (namespace,)).fetchall()
        return [(str(n), str(m), bool(j), int(v)) for n, m, j, v in rows]

    def _write(self, sql: str, params: Sequence[Any]) -> None:
        conn = self._conn
        with translated(self.path):
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute(sql, params)
                conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise


def task_results_with_bodies(
    conn: sqlite3.Connection, path: Path
) -> list[tuple[str, str, str, str]]:
    """(task id, worker, result message id, result body) of every result this node keeps
    as a sink, in task id order (empty before schema 7)."""
    with translated(path):
        if not conn.execute(
                "SELECT 1 FROM sqlite_master WHERE name = 'task_results'").fetchone():
            return []
        rows = conn.execute(
            "SELECT t.task_id, t.worker, t.message_id, m.body FROM task_results AS t"
            " JOIN messages AS m ON m.sender = t.worker AND m.id = t.message_id"
            " ORDER BY t.task_id").fetchall()
    return [(str(t), str(w), str(i), str(b)) for t, w, i, b in rows]

"""The pattern tables (issue 18): `tasks` (a ventilator's queue), `task_results` (a sink's
results, one per task) and `members` (group membership records).

Rule: their SQL lives here, over a connection the store owns; `Store` composes a
`PatternTables` and delegates to it (callers keep calling `Store`). What a pattern message
means for these tables is written in that message's own transaction (`derived`, called by
`Store.apply` for each headed row it inserts), and new tasks go through the writer's batch
(`add_tasks`), so a crash keeps a message and its state together or neither.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from meshpost.protocol import Envelope
from meshpost.protocol.groups import BroadcastStatus, MemberRecord
from meshpost.protocol.header import Kind
from meshpost.protocol.workqueue import TaskRecord, TaskState
from meshpost.store.checksum import header_decode
from meshpost.store.connection import translated

#: The clause both rules below share: this node sent a task message of task ?1 to peer ?2
#: (any attempt). A task id a peer names is no proof it was given the task (docs/protocol.md
#: 19.4): without it a peer that learnt the id of a queued task finished it unrun.
_GIVEN_TO_SENDER = (
    "EXISTS (SELECT 1 FROM messages AS g INDEXED BY messages_ref WHERE g.ref = ?1"
    " AND g.kind = 'task' AND g.direction = 'out' AND g.peer = ?2)"
)
#: A sink's result, recorded with the result message's row (ignored for a task it has).
#: At a sink that is also the task's ventilator (it has the `tasks` row) only a result from
#: a worker it gave the task to, naming the task's queue, counts; a sink elsewhere cannot
#: tell (it never saw the task), and keeps the first result as before.
RECORD_RESULT = (
    "INSERT INTO task_results (task_id, queue, message_id, worker, stored_at_ns)"
    " SELECT ?1, ?3, ?4, ?2, ?5 WHERE NOT EXISTS (SELECT 1 FROM tasks WHERE task_id = ?1)"
    " OR (EXISTS (SELECT 1 FROM tasks WHERE task_id = ?1 AND queue = ?3) AND"
    f" {_GIVEN_TO_SENDER}) ON CONFLICT (task_id) DO NOTHING"
)


#: A task message's commit marks its task assigned to the message's recipient, this attempt
#: (a finished task stays finished; an older attempt's message never moves it back).
_TASK_ASSIGNED = (
    "UPDATE tasks SET state = 'assigned', worker = ?, attempts = ?"
    " WHERE task_id = ? AND queue = ? AND state IN ('queued', 'assigned') AND attempts < ?"
)
#: A `done` (or a result at a ventilator that is its own sink) finishes its task, once, and
#: only from a worker the task was given to (`WorkQueueDispatcher.completed`, the same rule).
_TASK_DONE = (
    "UPDATE tasks SET state = 'done', finished_at_ns = ?3, finished_by = ?2"
    " WHERE task_id = ?1 AND queue = ?4 AND state IN ('queued', 'assigned')"
    f" AND {_GIVEN_TO_SENDER}"
)
#: A `done` finishes its task by the same rule, and only a task whose sink is another node
#: (?5: this node, the `done`'s recipient): a `done` vouches for a result at that sink; at
#: a ventilator that is the sink the result itself is what finishes the task.
_TASK_ACKED = _TASK_DONE + " AND sink != ?5"
#: The last-writer-wins rank of docs/protocol.md (membership records), in SQL: a higher
#: version wins; at equal versions a leave (joined 0) beats a join. The winner's `prefetch`
#: (a `serve` record's, as announced; NULL: not stated) comes with it (schema 8).
_MERGE_MEMBER = (
    "INSERT INTO members (namespace, name, member, joined, version, hlc, prefetch)"
    " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (namespace, name, member) DO UPDATE SET"
    " joined = excluded.joined, version = excluded.version, hlc = excluded.hlc,"
    " prefetch = excluded.prefetch"
    " WHERE excluded.version > members.version OR (excluded.version = members.version"
    " AND excluded.joined < members.joined)"
)
#: Logical ids of our broadcasts with a copy neither rejected nor covered by a receipt range
#: (the `message_rows` rule for 'delivered', over the pattern rows only).
_UNSETTLED_REFS = (
    "SELECT DISTINCT m.ref FROM messages AS m INDEXED BY messages_ref"
    " WHERE m.ref IS NOT NULL AND m.kind = 'group' AND m.direction = 'out'"
    " AND m.state = 'pending' AND NOT EXISTS (SELECT 1 FROM receipts AS r"
    " WHERE r.peer = m.peer AND r.first_seq <= m.seq AND r.last_seq = (SELECT MIN(c.last_seq)"
    " FROM receipts AS c WHERE c.peer = m.peer AND c.last_seq >= m.seq))"
)
#: A worker's results whose task came from a ventilator that is not the sink and that it
#: stored no `done` for, with whether the sink receipted each (a receipt range covers it,
#: as in `message_rows`, or the row says so) or rejected it. The pattern rows' partial
#: index only (ref IS NOT NULL): never a walk of the plain messages.
_OWED_DONES = (
    "SELECT DISTINCT r.ref, r.queue, q.sender, r.peer, r.seq, r.state = 'delivered' OR"
    " (r.state = 'pending' AND EXISTS (SELECT 1 FROM receipts AS c WHERE c.peer = r.peer"
    " AND c.first_seq <= r.seq AND c.last_seq = (SELECT MIN(x.last_seq) FROM receipts AS x"
    " WHERE x.peer = r.peer AND x.last_seq >= r.seq)))"
    " FROM messages AS r INDEXED BY messages_ref"
    " JOIN messages AS q INDEXED BY messages_ref ON q.ref = r.ref AND q.kind = 'task'"
    " AND q.direction = 'in' AND q.sender != r.peer"
    " WHERE r.ref IS NOT NULL AND r.kind = 'result' AND r.direction = 'out'"
    " AND r.state != 'rejected' AND NOT EXISTS (SELECT 1 FROM messages AS d"
    " INDEXED BY messages_ref WHERE d.ref = r.ref AND d.kind = 'done'"
    " AND d.direction = 'out' AND d.peer = q.sender)"
    " ORDER BY r.ref, r.peer, r.seq"
)
_ADD_TASK = ("INSERT INTO tasks (task_id, queue, body, sink, state, submitted_at_ns)"
             " VALUES (?, ?, ?, ?, 'queued', ?)")


@dataclasses.dataclass(frozen=True, slots=True)
class NewTask:
    """A task a ventilator accepts (`tasks` row, state 'queued'), written through the
    writer's batch: many submissions share one commit."""

    task_id: str
    queue: str
    body: str
    sink: str
    submitted_at_ns: int


@dataclasses.dataclass(frozen=True, slots=True)
class QueueCounts:
    """One queue's durable counts at one node: its tasks finished (`done`, `abandoned`),
    the redeliveries they took (attempts beyond each task's first), results kept as sink."""

    done: int = 0
    abandoned: int = 0
    redelivered: int = 0
    results: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class OwedDone:
    """A result this worker sent for `task_id` (to `sink`, its `seq` on that link) whose
    ventilator is another node and has no `done` from it stored here: `delivered`, the
    `done` is owed now; not yet, it is owed once the sink receipts the result."""

    task_id: str
    queue: str
    ventilator: str
    sink: str
    seq: int
    delivered: bool


@dataclasses.dataclass(frozen=True, slots=True)
class StoredBroadcast:
    """A broadcast this node sent, from its copies and their receipts: its `status`, and
    the (peer, seq) of each copy still pending (whose receipt moves it on)."""

    status: BroadcastStatus
    pending: tuple[tuple[str, int], ...] = ()


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
                     version: int, hlc: int, prefetch: int | None = None) -> None:
        """Keep the winning membership record per (namespace, name, member): the highest
        version; at equal versions a leave (docs/protocol.md 19.6). `prefetch`: a `serve`
        record's (None: not stated)."""
        self._write(_MERGE_MEMBER,
                    (namespace, name, member, int(joined), version, hlc, prefetch))

    # -- in the transaction of `Store.apply` ----------------------------------------------

    def add_tasks(self, tasks: Sequence[NewTask]) -> None:
        """Queue `tasks` (a batch's; the caller commits)."""
        self._conn.executemany(_ADD_TASK, [(t.task_id, t.queue, t.body, t.sink,
                                            t.submitted_at_ns) for t in tasks])

    def derived(self, m: Envelope, outgoing: bool, stored_at_ns: int) -> None:
        """What the headed message `m`, just inserted (not a duplicate), means for the
        pattern tables, in its transaction (the caller commits). Its header was checked at
        decode (`header_problem`): the fields its kind needs are there."""
        h = m.header
        assert h is not None
        execute = self._conn.execute
        kind = h.kind
        if kind is Kind.TASK:
            if outgoing:
                execute(_TASK_ASSIGNED, (m.recipient, h.attempt, h.ref, h.queue, h.attempt))
        elif kind is Kind.RESULT:
            if not outgoing:
                # The sink's rule: the first result committed for a task is its result.
                execute(RECORD_RESULT, (h.ref, m.sender, h.queue, m.id, stored_at_ns))
                # A ventilator that is its own sink: the result completes the task.
                execute(_TASK_DONE, (h.ref, m.sender, stored_at_ns, h.queue))
        elif kind is Kind.DONE:
            if not outgoing:
                execute(_TASK_ACKED, (h.ref, m.sender, stored_at_ns, h.queue, m.recipient))
        elif kind is Kind.MEMBER or kind is Kind.SERVE:
            # A record is the sender's about itself (a member speaks only for itself), so
            # the row is (queue, sender): our own when outgoing, the peer's when incoming.
            # A `serve` record keeps its prefetch as announced (the ventilator caps it when
            # it uses it); a `member` record has none.
            joined = m.body == ("join" if kind is Kind.MEMBER else "serve")
            execute(_MERGE_MEMBER, ("group" if kind is Kind.MEMBER else "queue", h.queue,
                                    m.sender, int(joined), h.version, m.hlc,
                                    h.prefetch if kind is Kind.SERVE else None))

    # -- reads at start and for status -------------------------------------------------------

    def unfinished_tasks(self) -> dict[str, tuple[float | None, list[TaskRecord]]]:
        """Per queue, the lease its tasks went out with (None: none went out) and every
        task not finished, in submission order, with whether the current assignee
        receipted its task message (if not, the message's seq): what
        `WorkQueueDispatcher.restore` takes."""
        with translated(self.path):
            rows = self._conn.execute(
                "SELECT task_id, queue, body, sink, state, attempts, worker FROM tasks"
                " INDEXED BY tasks_unfinished WHERE state IN ('queued', 'assigned')"
                " ORDER BY submitted_at_ns, task_id").fetchall()
            queues: dict[str, tuple[float | None, list[TaskRecord]]] = {}
            for task_id, queue, body, sink, state, attempts, worker in rows:
                lease, records = queues.setdefault(str(queue), (None, []))
                delivered, seq = False, None
                given: set[str] = set()
                if state == "assigned":
                    # Its task messages: the workers it was given to (whose completions
                    # count), and this attempt's lease, whether it arrived, and its seq (the
                    # receipt that starts its lease after the restart).
                    for peer, blob, msg_state, msg_seq in self._conn.execute(
                            "SELECT peer, header, state, seq FROM message_rows WHERE ref = ?"
                            " AND kind = 'task' AND direction = 'out'", (task_id,)):
                        given.add(str(peer))
                        header = header_decode(blob)
                        if peer == worker and header.attempt == attempts:
                            delivered = msg_state == "delivered"
                            seq = None if delivered else int(msg_seq)
                            lease = max(lease or 0.0, header.lease_ms / 1000)
                    queues[str(queue)] = (lease, records)
                records.append(TaskRecord(str(task_id), str(body), str(sink),
                                          TaskState(state), int(attempts),
                                          None if worker is None else str(worker), delivered,
                                          seq, tuple(sorted(given))))
        return queues

    def owed_dones(self) -> list[OwedDone]:
        """What a worker owes its ventilators at start: a `done` for each task whose result
        it sent (to a sink that is not the ventilator) and whose `done` it never stored, the
        crash having come between the sink's receipt and the `done`'s commit. A task with
        two results here (two task messages) is listed once per result."""
        with translated(self.path):
            rows = self._conn.execute(_OWED_DONES).fetchall()
        return [OwedDone(str(t), str(q), str(v), str(s), int(n), bool(d))
                for t, q, v, s, n, d in rows]

    def queue_counts(self) -> dict[str, QueueCounts]:
        """Per queue: tasks done and abandoned here, their redeliveries, results kept."""
        with translated(self.path):
            tasks = self._conn.execute(
                "SELECT queue, SUM(state = 'done'), SUM(state = 'abandoned'),"
                " SUM(MAX(attempts - 1, 0)) FROM tasks GROUP BY queue").fetchall()
            results = dict(self._conn.execute(
                "SELECT queue, COUNT(*) FROM task_results GROUP BY queue").fetchall())
        counts = {str(q): QueueCounts(int(d), int(a), int(r), int(results.pop(q, 0)))
                  for q, d, a, r in tasks}
        counts.update({str(q): QueueCounts(results=int(n)) for q, n in results.items()})
        return counts

    def broadcasts(self, logical_id: str) -> list[StoredBroadcast]:
        """Broadcast `logical_id` as this node sent it ([] if it sent none)."""
        with translated(self.path):
            return broadcasts_of(self._conn, logical_id)

    def unsettled_broadcasts(self) -> list[StoredBroadcast]:
        """Every broadcast this node sent with a copy still waiting for its receipt (read
        once at start: a scan of the pattern rows' index, then each such broadcast's
        copies)."""
        with translated(self.path):
            # The pattern rows' partial index, not the view: the view would walk every
            # outgoing row of the store (seconds for millions of direct messages).
            refs = [r for (r,) in self._conn.execute(_UNSETTLED_REFS)]
        return [b for ref in refs for b in self.broadcasts(str(ref))]

    def members(self, namespace: str) -> list[tuple[str, str, bool, int, int | None]]:
        """(name, member, joined, version, prefetch) of every record in `namespace`
        (prefetch: a `serve` record's as announced, None if it stated none)."""
        with translated(self.path):
            rows = self._conn.execute(
                "SELECT name, member, joined, version, prefetch FROM members"
                " WHERE namespace = ?", (namespace,)).fetchall()
        return [(str(n), str(m), bool(j), int(v), None if p is None else int(p))
                for n, m, j, v, p in rows]

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


def broadcasts_of(conn: sqlite3.Connection, logical_id: str) -> list[StoredBroadcast]:
    """Broadcast `logical_id` as the node of `conn` sent it, from its copies and their
    receipts ([] if it sent none); for the writer's connection and a reader's."""
    rows = conn.execute(
        "SELECT ref, queue, peer, seq, state, reject_reason FROM message_rows"
        " WHERE ref = ? AND kind = 'group' AND direction = 'out'", (logical_id,)).fetchall()
    by_ref: dict[str, list[Any]] = {}
    for row in rows:
        by_ref.setdefault(str(row[0]), []).append(row)
    found = []
    for ref, copies in by_ref.items():
        copies.sort(key=lambda c: c[2])
        delivered = tuple(str(c[2]) for c in copies if c[4] == "delivered")
        rejected = tuple((str(c[2]), str(c[5] or "")) for c in copies if c[4] == "rejected")
        pending = [c for c in copies if c[4] not in ("delivered", "rejected")]
        target = str(copies[0][1]) if copies[0][1] else "all"
        status = BroadcastStatus(ref, target, len(copies), delivered,
                                 tuple(str(c[2]) for c in pending), rejected)
        found.append(StoredBroadcast(status, tuple((str(c[2]), int(c[3])) for c in pending)))
    return found


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

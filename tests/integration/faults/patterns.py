"""The checker's rules for pattern messages (docs/patterns.md): tasks, results, dones, replies,
group copies, serve and member records.

Rule: read-only judgement of rows already read from the stores; each broken rule is one
finding named by the count it falls under (lost, missing, duplicated, phantom, mismatched,
no_result), so that `checker.evaluate` keeps one meaning for "clean". The observer never
attempted the messages the nodes derive (a task message, a result, a `done`, a reply, a
record); each must follow from something that is stored (a task at its ventilator, a delivery
at its worker, a request at both ends), and be stored once on both ends like any message.
"""

from __future__ import annotations

import collections
import dataclasses
import sqlite3
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from meshpost.protocol.header import UncheckedHeader, reply_id, result_id
from meshpost.store import DB_FILENAME

if TYPE_CHECKING:
    from .checker import Row

#: Kinds whose messages a node derives itself (the observer never attempts them).
DERIVED_KINDS = frozenset({"task", "result", "done", "reply", "serve", "member"})


@dataclasses.dataclass(frozen=True, slots=True)
class TaskRow:
    """A ventilator's `tasks` row."""

    task_id: str
    queue: str
    body: str
    sink: str
    state: str
    attempts: int
    worker: str | None


@dataclasses.dataclass(frozen=True, slots=True)
class KeptResult:
    """A sink's `task_results` row: the one result that counts for a task."""

    task_id: str
    queue: str
    message_id: str
    worker: str


@dataclasses.dataclass
class Tables:
    """A store's pattern tables (schema 7; empty for an older store)."""

    tasks: dict[str, TaskRow] = dataclasses.field(default_factory=dict)
    kept: dict[str, KeptResult] = dataclasses.field(default_factory=dict)


def read_tables(data_dir: Path) -> Tables:
    path = data_dir / DB_FILENAME
    tables = Tables()
    if not path.exists():
        return tables
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        if "tasks" in names:
            for row in conn.execute("SELECT task_id, queue, body, sink, state, attempts, worker"
                                    " FROM tasks"):
                tables.tasks[row[0]] = TaskRow(*row)
        if "task_results" in names:
            for row in conn.execute("SELECT task_id, queue, message_id, worker"
                                    " FROM task_results"):
                tables.kept[row[0]] = KeptResult(*row)
    finally:
        conn.close()
    return tables



def results_kept_at(data_dir: Path) -> int:
    """How many results the sink at `data_dir` keeps (one per task at most)."""
    return len(read_tables(data_dir).kept)

def header_of(row: Row) -> UncheckedHeader | None:
    if row.header is None:
        return None
    try:
        return msgspec.msgpack.decode(row.header, type=UncheckedHeader)
    except msgspec.DecodeError:
        return None


@dataclasses.dataclass
class TaskAttempt:
    """One task the observer submitted: to `ventilator`'s `queue`, result to `sink`."""

    ventilator: str
    queue: str
    sink: str
    body: str
    outcome: str = "attempted"  # accepted | refused | uncertain
    task_id: str | None = None
    error: str | None = None


@dataclasses.dataclass
class PatternFindings:
    """What the pattern rules found: problems by count, figures, and the rows they judged."""

    problems: dict[str, list[str]] = dataclasses.field(
        default_factory=lambda: collections.defaultdict(list))
    figures: dict[str, int] = dataclasses.field(
        default_factory=lambda: collections.defaultdict(int))
    #: (store, rowid) of every row judged here (the ledger's rules leave them alone).
    claimed: set[tuple[str, int]] = dataclasses.field(default_factory=set)

    def add(self, count: str, text: str) -> None:
        self.problems[count].append(text)


def check_patterns(
    rows: Mapping[str, list[Row]],
    tables: Mapping[str, Tables],
    tasks: Iterable[TaskAttempt],
    *,
    expect_result: Callable[[str], str] | None = None,
    request_replies: Mapping[tuple[str, str, str], str] | None = None,
    repliers: Iterable[str] = (),
    foreign: Iterable[str] = (),
) -> PatternFindings:
    """Judge every pattern row of every store.

    `tasks`: what the observer submitted. `expect_result(body)`: the result a task's body must
    give (None: not checked). `request_replies`: (requester, replier, request id) -> reply id
    the observer was shown; each must be stored on both ends. `repliers` answer every
    request they store (an echo): one without a reply is missing."""
    f = PatternFindings()
    foreign = set(foreign)
    by_id: dict[tuple[str, str, str, str], Row] = {}  # (store, direction, sender, id)
    for name, store_rows in rows.items():
        for r in store_rows:
            by_id[(name, r.direction, r.sender, r.id)] = r
    _pairs(f, rows, by_id, foreign)
    _tasks(f, rows, tables, list(tasks), expect_result)
    _replies(f, rows, by_id, request_replies or {}, set(repliers))
    _group_copies(f, rows)
    return f


def _pairs(f: PatternFindings, rows: Mapping[str, list[Row]],
           by_id: Mapping[tuple[str, str, str, str], Row], foreign: set[str]) -> None:
    """Each derived message once on each side: the sender's row and the receiver's row, with
    the same content (the store's unique (sender, id) makes "once" a matter of ids)."""
    for name, store_rows in rows.items():
        for r in store_rows:
            if r.kind not in DERIVED_KINDS:
                continue
            f.claimed.add((name, r.rowid))
            if r.direction == "out":
                if r.recipient not in rows:
                    continue  # a peer whose store the test does not read
                copy = by_id.get((r.recipient, "in", r.sender, r.id))
                if copy is None:
                    if r.state == "delivered":
                        f.add("lost", f"{r.kind} {r.id} {name}->{r.recipient}: receipted, "
                                      "not stored")
                    elif r.state != "rejected":
                        f.add("missing", f"{r.kind} {r.id} {name}->{r.recipient}: never "
                                         f"stored ({r.state})")
                elif _content(copy) != _content(r):
                    f.add("mismatched", f"{r.kind} {r.id} {name}->{r.recipient}: copies differ")
            elif r.sender in rows and r.sender not in foreign \
                    and (r.sender, "out", r.sender, r.id) not in by_id:
                f.add("phantom", f"{r.kind} {r.id} {r.sender}->{name}: stored at {name}, "
                                 f"never sent by {r.sender}")


def _content(r: Row) -> tuple[object, ...]:
    return (r.sender, r.recipient, r.seq, r.body, r.sent_at_ns, r.hlc, r.kind, r.ref, r.queue,
            r.header)


def _tasks(f: PatternFindings, rows: Mapping[str, list[Row]], tables: Mapping[str, Tables],
           submitted: list[TaskAttempt], expect_result: Callable[[str], str] | None) -> None:
    # Every task any ventilator holds, and who holds it.
    owner: dict[str, str] = {}
    for name, t in tables.items():
        for task_id in t.tasks:
            owner[task_id] = name
    # The observer's submissions: each accepted one is a task at its ventilator; a task no
    # submission explains is a phantom (an uncertain submit counts if its body is there).
    by_body = {(name, row.queue, row.body): row for name, t in tables.items()
               for row in t.tasks.values()}
    explained: set[str] = set()
    expected: dict[str, TaskAttempt] = {}
    for s in submitted:
        row = by_body.get((s.ventilator, s.queue, s.body))
        if row is None:
            if s.outcome == "accepted":
                f.add("missing", f"task {s.task_id} submitted to {s.ventilator}: not in its "
                                 "tasks table")
            continue
        if s.outcome == "refused":
            f.add("phantom", f"task {row.task_id}: refused ({s.error}) yet stored")
            continue
        if s.task_id is not None and s.task_id != row.task_id:
            f.add("mismatched", f"task {s.body[:30]!r}: id {row.task_id} in the store, "
                                f"{s.task_id} told to the observer")
        explained.add(row.task_id)
        expected[row.task_id] = s
    if submitted:
        for task_id in set(owner) - explained:
            f.add("phantom", f"task {task_id} at {owner[task_id]}: never submitted")
    f.figures["tasks"] = len(expected)

    # Deliveries: the ventilator's task messages, each of a task it holds, with its content,
    # one message per attempt number.
    deliveries: dict[str, list[Row]] = collections.defaultdict(list)
    for name, store_rows in rows.items():
        for r in store_rows:
            if r.kind != "task" or r.direction != "out":
                continue
            h = header_of(r)
            task = tables[name].tasks.get(str(r.ref)) if name in tables else None
            if task is None:
                f.add("phantom", f"task message {r.id} {name}->{r.recipient}: for task {r.ref}, "
                                 f"which {name} does not hold")
                continue
            if h is None or (r.body, r.queue, h.sink) != (task.body, task.queue, task.sink):
                f.add("mismatched", f"task message {r.id}: body, queue or sink differ from "
                                    f"task {task.task_id}")
            deliveries[task.task_id].append(r)
    for task_id, messages in deliveries.items():
        attempts = collections.Counter(getattr(header_of(m), "attempt", 0) for m in messages)
        for attempt, n in attempts.items():
            if n > 1:
                f.add("duplicated", f"task {task_id}: attempt {attempt} sent {n} times")
    f.figures["deliveries"] = sum(map(len, deliveries.values()))
    f.figures["redelivered"] = sum(len(m) - 1 for m in deliveries.values())

    # What each worker stored of each task: result ids it may derive, and tasks it may ack.
    stored_task: dict[tuple[str, str], set[str]] = collections.defaultdict(set)
    for name, store_rows in rows.items():
        for r in store_rows:
            if r.kind == "task" and r.direction == "in":
                stored_task[(name, str(r.ref))].add(result_id(r.id))

    # Results at sinks: each answers a delivery its sender stored (its id is derived from
    # that task message's id), with the expected body; dones likewise.
    results: dict[tuple[str, str], list[Row]] = collections.defaultdict(list)
    for name, store_rows in rows.items():
        for r in store_rows:
            if r.direction != "in" or r.kind not in ("result", "done"):
                continue
            task_id = str(r.ref)
            ventilator = owner.get(task_id)
            if ventilator is None:
                f.add("phantom", f"{r.kind} {r.id} {r.sender}->{name}: for unknown task "
                                 f"{task_id}")
                continue
            if r.sender in rows and not stored_task.get((r.sender, task_id)):
                f.add("phantom", f"{r.kind} {r.id} from {r.sender}: {r.sender} never stored "
                                 f"task {task_id}")
                continue
            if r.kind == "done":
                continue
            results[(name, task_id)].append(r)
            task = tables[ventilator].tasks[task_id]
            if name != task.sink:
                f.add("mismatched", f"result {r.id} of task {task_id} at {name}, its sink is "
                                    f"{task.sink}")
            if r.sender in rows and r.id not in stored_task[(r.sender, task_id)]:
                f.add("mismatched", f"result {r.id} from {r.sender}: answers none of its "
                                    f"deliveries of task {task_id}")
            if expect_result is not None and r.body != expect_result(task.body):
                f.add("mismatched", f"result {r.id} of task {task_id}: {r.body[:30]!r} is not "
                                    f"the expected {expect_result(task.body)[:30]!r}")

    # The sink keeps exactly one result per task, the first it stored; each submitted task
    # has it in the end.
    for name, t in tables.items():
        for task_id, kept in t.kept.items():
            stored = sorted(results.get((name, task_id), []), key=lambda r: r.rowid)
            if not stored:
                f.add("phantom", f"{name} keeps result {kept.message_id} of task {task_id}: "
                                 "no such result stored")
            elif (stored[0].sender, stored[0].id) != (kept.worker, kept.message_id):
                f.add("mismatched", f"{name} keeps {kept.message_id} from {kept.worker} for "
                                    f"task {task_id}, the first stored was {stored[0].id}")
            f.figures["results_kept"] += 1
            f.figures["results_twice"] += len(stored) > 1
    for task_id in expected:
        sink = tables[owner[task_id]].tasks[task_id].sink
        if sink in tables and task_id not in tables[sink].kept:
            f.add("no_result", f"task {task_id}: no result kept at {sink}")
        state = tables[owner[task_id]].tasks[task_id].state
        f.figures["tasks_done"] += state == "done"


def _replies(f: PatternFindings, rows: Mapping[str, list[Row]],
             by_id: Mapping[tuple[str, str, str, str], Row],
             request_replies: Mapping[tuple[str, str, str], str], repliers: set[str]) -> None:
    """A reply answers a request stored on both ends (its ref), under the id derived from
    that request's; the ones the observer was shown are stored on both ends; a replier
    that answers every request has one reply out for each request it stored."""
    for name, store_rows in rows.items():
        for r in store_rows:
            if r.kind != "reply" or r.direction != "out":
                continue
            f.figures["replies"] += 1
            request_id = str(r.ref)
            asked = by_id.get((r.recipient, "out", r.recipient, request_id))
            got = by_id.get((name, "in", r.recipient, request_id))
            if got is None or (r.recipient in rows and asked is None):
                f.add("phantom", f"reply {r.id} {name}->{r.recipient}: to request {request_id}, "
                                 "not stored on both ends")
            if r.id != reply_id(request_id):
                f.add("mismatched", f"reply {r.id} to {request_id}: not the derived id "
                                    f"{reply_id(request_id)}")
    for name in repliers & set(rows):
        answered = {(r.recipient, str(r.ref)) for r in rows[name]
                    if r.kind == "reply" and r.direction == "out"}
        for r in rows[name]:
            if r.kind == "request" and r.direction == "in" and (r.sender, r.id) not in answered:
                f.add("missing", f"request {r.id} {r.sender}->{name}: stored at {name}, never "
                                 "answered")
    for (requester, replier, request_id), rid in request_replies.items():
        for store, direction, sender in ((replier, "out", replier), (requester, "in", replier)):
            if store in rows and (store, direction, sender, rid) not in by_id:
                f.add("lost", f"reply {rid} to {request_id}: shown to the observer, not "
                              f"stored at {store}")


def _group_copies(f: PatternFindings, rows: Mapping[str, list[Row]]) -> None:
    """One logical message to a group or all: n copies under one logical id (ref), at most one
    per member, all with the same text; each copy is an attempt of the observer's and is
    counted stored once on both ends by the ledger's rules."""
    for name, store_rows in rows.items():
        logical: dict[str, list[Row]] = collections.defaultdict(list)
        for r in store_rows:
            if r.kind == "group" and r.direction == "out":
                logical[str(r.ref)].append(r)
        for ref, copies in logical.items():
            f.figures["group_messages"] += 1
            f.figures["group_copies"] += len(copies)
            members = collections.Counter(r.recipient for r in copies)
            for member, n in members.items():
                if n > 1:
                    f.add("duplicated", f"group message {ref} of {name}: {n} copies to {member}")
            if len({(r.body, r.queue) for r in copies}) > 1:
                f.add("mismatched", f"group message {ref} of {name}: copies differ in text or "
                                    "group")

"""The fault battery's checker: the observer's history, the drain, and the counts.

Rule: the checker believes only what it saw itself (what it attempted, which sends a node
acknowledged to it, which receipts reached it) and what it reads from the stores afterwards.
It never asks a node for its opinion of the mesh.

A run goes: start nodes (real `meshpost node` processes, plus optionally an in-process `Node`
used as a fast sender) -> send while injecting faults -> `Mesh.finish()`: resume stopped nodes,
restart dead ones without fault hooks, heal proxies, wait (bounded) until no outbox row is
pending, stop everything, read every store and print one line of counts.

Counts (per (sender, recipient, body) attempt; bodies are unique within a test):
- attempted / accepted (the node acknowledged the send to the observer) / refused (a clear
  error came back, or the node was not running) / uncertain (the request went out, no answer
  came back: the node died or hung; the sender's store decides whether it was accepted);
- receipted: the observer saw a receipt; stored: the receiver holds a copy;
- lost: receipted but not stored; missing: accepted (or found in the sender's outbox) but not
  stored after the drain; duplicated: extra copies of one attempt on either end;
  phantom: rows nobody attempted (or a refused send that got stored); mismatched: id, body,
  sender time or HLC differ between the observer, the sender's copy and the receiver's copy;
- recovered: stored although the observer never saw a receipt;
- order breaks per pair: receiver rows stored out of the sender's seq order (reported only).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec
import psutil
import zmq
import zmq.asyncio

from meshpost.cli import CRASH_ENV
from meshpost.cluster import LocalCluster, NodeProcess
from meshpost.config import MeshConfig
from meshpost.control import (
    ENDPOINT_FILE,
    AnswerReply,
    PeerRequest,
    Reply,
    Request,
    SendRequest,
    StatusRequest,
    SubmitReply,
    SubmitRequest,
)
from meshpost.errors import MeshpostError
from meshpost.node import CrashPoint, Node
from meshpost.store import DB_FILENAME, StoreReader
from meshpost.verify import verify_stores

from .patterns import DERIVED_KINDS, TaskAttempt, check_patterns, read_tables

#: Small protocol timeouts so that faults are noticed and healed within seconds.
FAST_OPTIONS: dict[str, Any] = {
    "ping_interval_s": 0.2,
    "peer_timeout_s": 1.5,
    "retransmit_initial_s": 0.2,
    "retransmit_max_s": 1.0,
}
#: Upper bound for the final drain (every outbox empty) after the faults are healed.
DRAIN_TIMEOUT_S = 90.0
#: Upper bound for one control request (a send waits for its commit, and for its receipt up to
#: the request's own timeout).
REQUEST_TIMEOUT_S = 60.0
#: Every counts line printed in this session, for the terminal summary.
RESULTS: list[str] = []

_encoder = msgspec.msgpack.Encoder()
_reply_decoder = msgspec.msgpack.Decoder(Reply)

Key = tuple[str, str, str]  # (sender, recipient, body)

_WORDS = ("hola", "hello", "aloha", "buenos días", "grüße", "日本語", "ünïcödé", "emoji 🛰️",
          "tab\there", "quote'\"", "line\nbreak", "x" * 40)


#: Padding letters: random bytes mapped onto them with one `bytes.translate`. Drawing them one
#: `rng.choice` at a time cost ~10 ms per 32 KB body, 40 s of test 13's flood of 4,000.
_PAD = bytes((b"abcdefghijklmnopqrstuvwxyz " * 10)[b] for b in range(256))


def make_body(rng: random.Random, tag: str, index: int, size: int = 0) -> str:
    """A body unique within a test (tag + index), with some Unicode and optional padding."""
    text = f"{tag}#{index:06d} {rng.choice(_WORDS)}"
    if size > len(text):
        pad = size - len(text) - 1
        text += " " + rng.randbytes(pad).translate(_PAD).decode("ascii")
    return text


# -- the observer's history ---------------------------------------------------------------


@dataclasses.dataclass
class Attempt:
    sender: str
    to: str
    body: str
    outcome: str = "attempted"  # accepted | refused | uncertain
    id: str | None = None
    seq: int | None = None
    sent_at_ns: int | None = None
    receipted: bool = False
    rejected: bool = False
    error: str | None = None

    def accept(self, message_id: str | None = None, seq: int | None = None,
               sent_at_ns: int | None = None) -> None:
        self.outcome = "accepted"
        self.id, self.seq, self.sent_at_ns = message_id, seq, sent_at_ns

    def refuse(self, error: str) -> None:
        self.outcome = "refused"
        self.error = error

    def unsure(self, error: str) -> None:
        self.outcome = "uncertain"
        self.error = error


class Ledger:
    """What the observer attempted and saw, keyed by (sender, recipient, body); the tasks it
    submitted (`TaskAttempt`), what their results must be, and the replies it was shown."""

    def __init__(self) -> None:
        self.attempts: dict[Key, Attempt] = {}
        self.tasks: list[TaskAttempt] = []
        #: The result a task's body must give (seed 002's workers upper-case); None: any.
        self.expect_result: Callable[[str], str] | None = None
        #: (requester, replier, request id) -> the reply id the observer was shown.
        self.replies: dict[tuple[str, str, str], str] = {}
        #: Nodes that answer every request they store (`--echo`): each must have a reply.
        self.repliers: set[str] = set()

    def submit(self, ventilator: str, queue: str, sink: str,
               bodies: Iterable[str]) -> list[TaskAttempt]:
        made = [TaskAttempt(ventilator, queue, sink, body) for body in bodies]
        known = {(t.ventilator, t.queue, t.body) for t in self.tasks}
        if len({t.body for t in made}) != len(made) or any(
                (t.ventilator, t.queue, t.body) in known for t in made):
            raise AssertionError("test bug: task body reused")
        self.tasks.extend(made)
        return made

    def attempt(self, sender: str, recipients: Iterable[str], body: str) -> list[Attempt]:
        made = []
        for to in recipients:
            key = (sender, to, body)
            if key in self.attempts:
                raise AssertionError(f"test bug: body reused for {key}")
            self.attempts[key] = made_attempt = Attempt(sender, to, body)
            made.append(made_attempt)
        return made

    def get(self, sender: str, to: str, body: str) -> Attempt:
        return self.attempts[(sender, to, body)]

    def __len__(self) -> int:
        return len(self.attempts)


# -- reading stores -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Row:
    rowid: int
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
    #: The pattern header (schema 7): kind, ref, queue and the msgpack header; None for a
    #: direct message.
    kind: str | None = None
    ref: str | None = None
    queue: str | None = None
    header: bytes | None = None


def read_rows(data_dir: Path, where: str = "", params: Sequence[Any] = ()) -> list[Row]:
    """Every message row of a store, in storage (rowid) order; [] if it has no database."""
    path = data_dir / DB_FILENAME
    if not path.exists():
        return []
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        # The state a reader sees (`message_rows`: a receipt range may settle a row), in
        # storage order (`messages.rowid`, which the view does not carry).
        rows = conn.execute(
            "SELECT * FROM (SELECT m.rowid AS rowid, v.id, v.direction, v.peer, v.sender,"
            " v.recipient, v.seq, v.body, v.sent_at_ns, v.hlc, v.state, v.kind, v.ref,"
            " v.queue, v.header FROM messages AS m"
            f" JOIN message_rows AS v ON v.id = m.id) {where} ORDER BY rowid", params,
        ).fetchall()
    finally:
        conn.close()
    return [Row(*r) for r in rows]


def integrity(path: Path) -> list[str]:
    """`PRAGMA integrity_check` of a database file, read-only (it changes nothing on disk, so
    the node's own recovery at restart is the one that counts)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        return [str(r[0]) for r in conn.execute("PRAGMA integrity_check").fetchall()]
    finally:
        conn.close()


def receipt_violations(data_dirs: Mapping[str, Path]) -> list[str]:
    """Rows a sender marked delivered that its receiver does not hold (a receipt before commit).

    Senders are read before receivers: a receiver commits before it sends the receipt, so a
    row delivered at our sender read is already committed at our (later) receiver read.
    """
    delivered = {name: read_rows(dd, "WHERE direction = 'out' AND state = 'delivered'")
                 for name, dd in data_dirs.items()}
    stored = {name: {r.id for r in read_rows(dd, "WHERE direction = 'in'")}
              for name, dd in data_dirs.items()}
    bad = []
    for name, rows in delivered.items():
        for r in rows:
            if r.recipient in stored and r.id not in stored[r.recipient]:
                bad.append(f"{r.id} {name}->{r.recipient} seq {r.seq}: receipted, not stored")
    return bad


# -- counting -----------------------------------------------------------------------------


@dataclasses.dataclass
class Counts:
    test: str
    attempted: int = 0
    accepted: int = 0
    uncertain: int = 0
    refused: int = 0
    rejected: int = 0
    receipted: int = 0
    stored: int = 0
    lost: int = 0
    missing: int = 0
    duplicated: int = 0
    phantom: int = 0
    mismatched: int = 0
    recovered: int = 0
    #: Tasks submitted and accepted that have no result kept at their sink after the drain.
    no_result: int = 0
    #: Pattern figures (tasks, deliveries, results kept, replies, group copies), when any.
    patterns: dict[str, int] = dataclasses.field(default_factory=dict)
    order_breaks: dict[str, int] = dataclasses.field(default_factory=dict)
    verify: str = ""
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    problems: list[str] = dataclasses.field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not (self.lost or self.missing or self.duplicated or self.phantom
                    or self.mismatched or self.no_result)

    def line(self) -> str:
        breaks = ",".join(f"{pair}:{n}" for pair, n in sorted(self.order_breaks.items()))
        extra = "".join(f" {k}={v}" for k, v in self.extra.items())
        if "tasks" in self.patterns or self.no_result:
            extra = f" no_result={self.no_result}" + extra
        extra = "".join(f" {k}={v}" for k, v in self.patterns.items()) + extra
        return (
            f"[faults] {self.test}: attempted={self.attempted} accepted={self.accepted} "
            f"uncertain={self.uncertain} refused={self.refused} receipted={self.receipted} "
            f"stored={self.stored} lost={self.lost} missing={self.missing} "
            f"duplicated={self.duplicated} phantom={self.phantom} "
            f"mismatched={self.mismatched} recovered={self.recovered} "
            f"order_breaks={{{breaks}}} verify={self.verify}{extra}"
        )

    def problem(self, text: str) -> None:
        if len(self.problems) < 30:
            self.problems.append(text)


def evaluate(
    test: str,
    ledger: Ledger,
    data_dirs: Mapping[str, Path],
    *,
    foreign_senders: Iterable[str] = (),
) -> Counts:
    """Compare the observer's history with every store. `foreign_senders` are raw test
    clients (no store of their own): rows they got stored are reported, not judged."""
    counts = Counts(test)
    foreign = set(foreign_senders)
    outs: dict[Key, list[Row]] = defaultdict(list)
    ins_by_key: dict[Key, list[Row]] = defaultdict(list)
    ins_by_id: dict[tuple[str, str], Row] = {}
    all_rows: dict[str, list[Row]] = {}
    for name, dd in data_dirs.items():
        rows = read_rows(dd)
        all_rows[name] = rows
        for r in rows:
            if r.kind in DERIVED_KINDS:
                continue  # nobody attempted it: the pattern rules below judge it
            if r.direction == "out":
                outs[(name, r.recipient, r.body)].append(r)
            else:
                ins_by_key[(r.sender, name, r.body)].append(r)
                ins_by_id[(name, r.id)] = r
    claimed: set[tuple[str, int]] = set()  # (store, rowid)

    for key, a in ledger.attempts.items():
        counts.attempted += 1
        counts.accepted += a.outcome == "accepted"
        counts.uncertain += a.outcome == "uncertain"
        counts.refused += a.outcome == "refused"
        counts.receipted += a.receipted
        sent = outs.get(key, [])
        claimed.update((a.sender, r.rowid) for r in sent)
        ids = {a.id} if a.id else {r.id for r in sent}
        copies = {r.rowid: r for r in ins_by_key.get(key, [])}
        for i in ids:
            row = ins_by_id.get((a.to, i))
            if row is not None:
                copies[row.rowid] = row
        claimed.update((a.to, rowid) for rowid in copies)
        extra_copies = max(0, len(sent) - 1) + max(0, len(copies) - 1)
        if extra_copies:
            counts.duplicated += extra_copies
            counts.problem(f"{a.sender}->{a.to} {a.body[:40]!r}: {len(sent)} outbox rows, "
                           f"{len(copies)} inbox rows")
        if a.outcome == "refused" and (sent or copies):
            counts.phantom += 1
            counts.problem(f"{a.sender}->{a.to} {a.body[:40]!r}: refused ({a.error}) yet stored")
        if a.rejected or any(r.state == "rejected" for r in sent):
            counts.rejected += 1
            continue
        durable = a.outcome == "accepted" or (a.outcome == "uncertain" and bool(sent))
        if copies:
            counts.stored += 1
            if not a.receipted:
                counts.recovered += 1
        elif a.receipted:
            counts.lost += 1
            counts.problem(f"{a.sender}->{a.to} id {a.id}: receipted but not stored")
        elif durable:
            counts.missing += 1
            state = sent[0].state if sent else "no outbox row"
            counts.problem(f"{a.sender}->{a.to} id {a.id or [r.id for r in sent]}: accepted, "
                           f"never stored ({state})")
        if _mismatch(a, sent, list(copies.values())):
            counts.mismatched += 1
            inbox = [(r.id, r.sent_at_ns, r.hlc, r.body[:20]) for r in copies.values()]
            counts.problem(f"{a.sender}->{a.to} {a.body[:40]!r}: copies differ "
                           f"(observer id={a.id} sent_at={a.sent_at_ns}; outbox "
                           f"{[(r.id, r.sent_at_ns, r.hlc) for r in sent]}; inbox {inbox})")

    findings = check_patterns(all_rows, {name: read_tables(dd) for name, dd in data_dirs.items()},
                              ledger.tasks, expect_result=ledger.expect_result,
                              request_replies=ledger.replies, repliers=ledger.repliers,
                              foreign=foreign)
    claimed |= findings.claimed
    for count, texts in findings.problems.items():
        setattr(counts, count, getattr(counts, count) + len(texts))
        for text in texts:
            counts.problem(text)
    counts.patterns = {k: v for k, v in findings.figures.items() if v}

    for name, rows in all_rows.items():
        for r in rows:
            if (name, r.rowid) in claimed:
                continue
            if r.direction == "in" and r.sender in foreign:
                counts.extra[f"foreign_rows_{name}"] = counts.extra.get(
                    f"foreign_rows_{name}", 0) + 1
                continue
            counts.phantom += 1
            counts.problem(f"{name}: {r.direction} row {r.id} {r.sender}->{r.recipient} "
                           f"{r.body[:40]!r} was never attempted")

    for name, rows in all_rows.items():
        last: dict[str, int] = {}
        for r in rows:
            if r.direction != "in" or r.sender in foreign:
                continue
            pair = f"{r.sender}>{name}"
            counts.order_breaks.setdefault(pair, 0)
            if r.seq < last.get(r.sender, 0):
                counts.order_breaks[pair] += 1
            last[r.sender] = max(last.get(r.sender, 0), r.seq)

    report = verify_stores(dict(data_dirs), ignore_senders=foreign)
    counts.verify = "ok" if report.ok else "FAIL"
    if not report.ok:
        counts.problems.extend(f"verify: {p}" for p in report.problems[:10])
    return counts


def _mismatch(a: Attempt, sent: list[Row], copies: list[Row]) -> bool:
    for r in [*sent, *copies]:
        if r.body != a.body or r.sender != a.sender or r.recipient != a.to:
            return True
        if a.id is not None and r.id != a.id:
            return True
        if a.sent_at_ns is not None and r.sent_at_ns != a.sent_at_ns:
            return True
    for s in sent:
        for c in copies:
            if (s.id, s.sent_at_ns, s.hlc, s.seq) != (c.id, c.sent_at_ns, c.hlc, c.seq):
                return True
    return False


def report(counts: Counts) -> None:
    line = counts.line()
    RESULTS.append(line)
    print(line, flush=True)
    path = os.environ.get("MESHPOST_FAULTS_REPORT")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")


# -- the mesh under test --------------------------------------------------------------------


class NotSent(MeshpostError):
    """The control request never left the observer: the node was not running."""


class NoAnswer(MeshpostError):
    """The control request left, no answer came back (node died, hung or was too slow)."""


class Mesh:
    """Real node processes (and optionally in-process sender nodes) plus the observer."""

    def __init__(
        self,
        root: Path,
        test: str,
        names: Sequence[str],
        *,
        real: Sequence[str] | None = None,
        absent: Sequence[str] = (),
        transport: str = "ipc",
        options: Mapping[str, Any] | None = None,
        connect: Mapping[str, str] | None = None,
        seed: int = 4,
        node_args: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        self.root = root
        self.test = test
        self.names = list(names)
        self.absent = list(absent)  # configured peers that never run (raw test clients)
        self.real = [n for n in (real if real is not None else names) if n not in self.absent]
        self.inproc_names = [n for n in self.names if n not in self.real + self.absent]
        self.options = {**FAST_OPTIONS, **(options or {})}
        #: Extra `meshpost node` arguments per node (`--worker Q=H`), at every (re)start.
        self.node_args = {name: tuple(args) for name, args in (node_args or {}).items()}
        self.cluster = LocalCluster.create(root, len(self.names), names=self.names,
                                           transport=transport, options=self.options)
        if connect:
            text = self.cluster.config_path.read_text(encoding="utf-8")
            for name, endpoint in connect.items():
                text = text.replace(f"[nodes.{name}]\n",
                                    f"[nodes.{name}]\nconnect = {json.dumps(endpoint)}\n")
            self.cluster.config_path.write_text(text, encoding="utf-8")
        self.rng = random.Random(seed)
        self.ledger = Ledger()
        self.inproc: dict[str, Node] = {}
        self.stopped: set[str] = set()
        self.extra: dict[str, Any] = {}
        self.foreign_senders: set[str] = set()
        self.cleanups: list[Callable[[], None]] = []
        self.healers: list[Callable[[], None]] = []
        self._ctx: zmq.asyncio.Context | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.counts: Counts | None = None
        self.helpers: list[Helper] = []
        #: Nodes the test itself killed, stopped or let exit; any other exit is a crash.
        self.expected_down: set[str] = set()
        #: Unexpected exits seen: "NAME exit CODE: last log line".
        self.crashes: list[str] = []
        self._seen_exits: set[int] = set()

    # -- paths ------------------------------------------------------------------------------

    def data_dir(self, name: str) -> Path:
        return self.cluster.data_dir(name)

    def db(self, name: str) -> Path:
        return self.data_dir(name) / DB_FILENAME

    def endpoint(self, name: str) -> str:
        return self.cluster.endpoints[name]

    def log_tail(self, name: str, lines: int = 40) -> str:
        path = self.root / "logs" / f"{name}.log"
        try:
            return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def log_text(self, name: str) -> str:
        path = self.root / "logs" / f"{name}.log"
        try:
            return path.read_text(errors="replace")
        except OSError:
            return ""

    # -- real processes (blocking: call through asyncio.to_thread from async code) -------

    def proc(self, name: str) -> NodeProcess:
        return self.cluster.nodes[name]

    def alive(self, name: str) -> bool:
        node = self.cluster.nodes.get(name)
        return node is not None and node.alive()

    def spawn(self, name: str, *, crash_at: CrashPoint | None = None) -> NodeProcess:
        """Start a real node process (no waiting); `crash_at` sets the crash hook."""
        old = self.cluster.nodes.get(name)
        if old is not None:
            if old.alive():
                raise AssertionError(f"test bug: {name} is already running")
            old.stop()  # reaps it and closes its log
        env = {CRASH_ENV: crash_at.value} if crash_at else None
        node = NodeProcess(name, self.cluster.config_path, self.data_dir(name),
                           self.root / "logs" / f"{name}.log", env=env,
                           extra_args=self.node_args.get(name, ()))
        self.cluster.nodes[name] = node
        self.stopped.discard(name)
        if crash_at is None:
            self.expected_down.discard(name)
        else:
            self.expected_down.add(name)  # it is meant to die at the hook
        return node.start()

    def start_real(self, names: Iterable[str] | None = None, *,
                   crash_at: CrashPoint | None = None, wait: bool = True) -> None:
        started = [self.spawn(n, crash_at=crash_at) for n in (names or self.real)]
        if wait:
            for node in started:
                node.wait_ready()

    def kill(self, name: str) -> int | None:
        """kill -9, reaped; returns the exit code."""
        node = self.proc(name)
        self.check_crashes()
        self.expected_down.add(name)
        if name in self.stopped:
            self.stopped.discard(name)  # SIGKILL works on a stopped process too
        node.kill()
        return node.stop()

    def terminate(self, name: str) -> int | None:
        self.check_crashes()
        self.expected_down.add(name)
        if name in self.stopped:
            self.sigcont(name)
        return self.proc(name).stop()

    def wait_exit(self, name: str, timeout_s: float = 30.0) -> int:
        """Wait for a node to exit by itself (crash hook, start-up failure)."""
        node = self.proc(name)
        assert node.process is not None
        self.expected_down.add(name)
        try:
            code = node.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{name} did not exit within {timeout_s}s:\n"
                                 f"{self.log_tail(name)}") from None
        node.stop()
        return code

    def check_crashes(self) -> list[str]:
        """Record real nodes that exited although the test did not end them."""
        for name, node in self.cluster.nodes.items():
            process = node.process
            if process is None or name in self.expected_down or process.pid in self._seen_exits:
                continue
            code = process.poll()
            if code is None:
                continue
            self._seen_exits.add(process.pid)
            last = self.log_tail(name, 12).splitlines()
            hint = next((line for line in reversed(last)
                         if "Assertion" in line or "Error" in line or "Traceback" in line),
                        last[-1] if last else "")
            self.crashes.append(f"{name} exit {code}: {hint.strip()}")
        return self.crashes

    def sigstop(self, name: str) -> None:
        os.kill(self.proc(name).pid, signal.SIGSTOP)
        self.stopped.add(name)

    def sigcont(self, name: str) -> None:
        if self.alive(name):
            os.kill(self.proc(name).pid, signal.SIGCONT)
        self.stopped.discard(name)

    def ps(self, name: str) -> psutil.Process:
        return psutil.Process(self.proc(name).pid)

    # -- in-process nodes ---------------------------------------------------------------------

    async def start_inproc(self, name: str) -> Node:
        cfg = MeshConfig.load(self.cluster.config_path).node(name, data_dir=self.data_dir(name))
        node = Node(cfg)
        await node.start()
        self.inproc[name] = node
        return node

    async def start(self) -> None:
        """Start every real node (waiting until each answers) and every in-process node."""
        await asyncio.to_thread(self.start_real)
        for name in self.inproc_names:
            await self.start_inproc(name)

    # -- control endpoint ----------------------------------------------------------------------

    @property
    def ctx(self) -> zmq.asyncio.Context:
        if self._ctx is None:
            self._ctx = zmq.asyncio.Context()
        return self._ctx

    async def control(self, name: str, request: Request, *,
                      timeout_s: float = REQUEST_TIMEOUT_S) -> Reply:
        """One control request to a real node; `NotSent` or `NoAnswer` when it cannot answer."""
        node = self.cluster.nodes.get(name)
        try:
            text = (self.data_dir(name) / ENDPOINT_FILE).read_text(encoding="utf-8")
            endpoint, pid = text.split()[:2]
        except (OSError, ValueError):
            raise NotSent(f"{name}: no control endpoint") from None
        if node is None or not node.alive() or node.pid != int(pid):
            raise NotSent(f"{name}: not running")
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.connect(endpoint)
            await sock.send(_encoder.encode(request))
            deadline = time.monotonic() + timeout_s
            while True:
                if await sock.poll(100):
                    return _reply_decoder.decode(await sock.recv())
                if not node.alive():
                    raise NoAnswer(f"{name} exited with the request pending")
                if time.monotonic() > deadline:
                    raise NoAnswer(f"{name} did not answer within {timeout_s}s")
        finally:
            sock.close(0)

    async def status(self, name: str) -> dict[str, Any]:
        reply = await self.control(name, StatusRequest(), timeout_s=10)
        return dict(reply.status)

    async def wait_connected(self, name: str, timeout_s: float = 30.0) -> None:
        """Wait until a real node reports every peer connected."""
        deadline = time.monotonic() + timeout_s
        while True:
            with contextlib.suppress(NotSent, NoAnswer):
                reply = await self.control(name, StatusRequest(), timeout_s=5)
                if reply.peers and all(p.connected for p in reply.peers):
                    return
            if time.monotonic() > deadline:
                raise AssertionError(f"{name}: peers not connected after {timeout_s}s")
            await asyncio.sleep(0.05)

    # -- sending -------------------------------------------------------------------------------

    def recipients(self, sender: str, target: str) -> list[str]:
        if target.lower() == "all":
            return [n for n in self.names if n != sender]
        return [target]

    async def send(self, sender: str, target: str, body: str, *,
                   receipt_timeout_s: float = 10.0,
                   request_timeout_s: float = REQUEST_TIMEOUT_S) -> list[Attempt]:
        """Send through `sender` (in-process `post()` or the control endpoint) and log it."""
        attempts = self.ledger.attempt(sender, self.recipients(sender, target), body)
        node = self.inproc.get(sender)
        if node is not None:
            await self._post(node, target, attempts)
        else:
            await self._send_control(sender, target, body, attempts, receipt_timeout_s,
                                     request_timeout_s)
        return attempts

    async def _post(self, node: Node, target: str, attempts: list[Attempt]) -> None:
        try:
            handles = await node.post(target, attempts[0].body)
        except MeshpostError as exc:
            for a in attempts:
                a.refuse(f"{type(exc).__name__}: {exc}")
            return
        by_to = {h.to: h for h in handles}
        for a in attempts:
            handle = by_to[a.to]
            a.accept(handle.id, handle.seq, handle.sent_at_ns)

            def seen(future: asyncio.Future[Any], a: Attempt = a) -> None:
                if not future.cancelled() and future.exception() is None:
                    a.receipted = True
                elif not future.cancelled() and isinstance(future.exception(),
                                                          _rejected_types()):
                    a.rejected = True

            handle.receipt.add_done_callback(seen)

    async def _send_control(self, sender: str, target: str, body: str,
                            attempts: list[Attempt], receipt_timeout_s: float,
                            request_timeout_s: float) -> None:
        try:
            reply = await self.control(sender, SendRequest(target, body, receipt_timeout_s),
                                       timeout_s=request_timeout_s + receipt_timeout_s)
        except NotSent as exc:
            for a in attempts:
                a.refuse(str(exc))
            return
        except NoAnswer as exc:
            for a in attempts:
                a.unsure(str(exc))
            return
        if not reply.ok:
            for a in attempts:
                a.refuse(f"{reply.error_kind}: {reply.error}")
            return
        by_to = {r.to: r for r in reply.sent}
        for a in attempts:
            r = by_to.get(a.to)
            if r is None:
                a.unsure("no result for this recipient")
                continue
            a.accept(r.id, r.seq, r.sent_at_ns)
            if r.delivered:
                a.receipted = True
            elif r.error:
                a.rejected = True
                a.error = r.error

    async def submit(self, ventilator: str, queue: str, sink: str, bodies: Sequence[str], *,
                     lease_s: float) -> list[TaskAttempt]:
        """Submit one task per body through `ventilator`'s control endpoint and log them."""
        tasks = self.ledger.submit(ventilator, queue, sink, bodies)
        try:
            reply = await self.control(ventilator, SubmitRequest(queue, sink, list(bodies),
                                                                 lease_s))
        except NotSent as exc:
            for t in tasks:
                t.outcome, t.error = "refused", str(exc)
            return tasks
        except NoAnswer as exc:
            for t in tasks:
                t.outcome, t.error = "uncertain", str(exc)
            return tasks
        if not isinstance(reply, SubmitReply):
            for t in tasks:
                t.outcome, t.error = "refused", f"{reply.error_kind}: {reply.error}"
            return tasks
        for t, task_id in zip(tasks, reply.task_ids, strict=True):
            t.outcome, t.task_id = "accepted", task_id
        return tasks

    async def request(self, sender: str, to: str, body: str, *,
                      timeout_s: float = 5.0) -> Attempt:
        """A request through `sender`'s control endpoint (`meshpost request`), logged; the
        reply it returns is logged too (it must then be stored on both ends)."""
        (a,) = self.ledger.attempt(sender, [to], body)
        try:
            reply = await self.control(sender, PeerRequest(to, body, timeout_s),
                                       timeout_s=REQUEST_TIMEOUT_S + timeout_s)
        except NotSent as exc:
            a.refuse(str(exc))
            return a
        except NoAnswer as exc:
            a.unsure(str(exc))
            return a
        if isinstance(reply, AnswerReply):
            a.accept(reply.request_id)
            a.receipted = True  # a reply implies the request was stored and receipted
            self.ledger.replies[(sender, to, reply.request_id)] = reply.reply_id
        elif getattr(reply, "error_kind", "") == "request_timeout":
            a.unsure(reply.error)  # stored at the sender; the stores decide the rest
        else:
            a.refuse(f"{reply.error_kind}: {reply.error}")
        return a

    async def stream(self, sender: str, target: str, count: int, *, tag: str,
                     concurrency: int = 20, pause_s: float = 0.01, size: int = 0,
                     receipt_timeout_s: float = 10.0) -> None:
        """Send `count` messages, `concurrency` at a time, pausing between rounds."""
        for start in range(0, count, concurrency):
            await asyncio.gather(*(
                self.send(sender, target, make_body(self.rng, tag, i, size),
                          receipt_timeout_s=receipt_timeout_s)
                for i in range(start, min(count, start + concurrency))
            ))
            if pause_s:
                await asyncio.sleep(pause_s)

    def spawn_task(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def keep_streaming(self, sender: str, receiver: str, done: asyncio.Event,
                       pause_s: float) -> asyncio.Task[Any]:
        """A good pair that keeps exchanging (rounds of 10) until `done` is set."""

        async def good_pair() -> None:
            round_ = 0
            while not done.is_set():
                await self.stream(sender, receiver, 10, tag=f"good{round_}", concurrency=10,
                                  pause_s=0)
                round_ += 1
                await asyncio.sleep(pause_s)

        return self.spawn_task(good_pair())

    # -- observation while running -----------------------------------------------------------

    def stores(self) -> dict[str, Path]:
        return {n: self.data_dir(n) for n in self.names if self.db(n).exists()}

    def pending(self) -> dict[str, int]:
        result = {}
        for name, dd in self.stores().items():
            with StoreReader.for_data_dir(dd) as reader:
                result[name] = reader.counts().get("out/pending", 0)
        return result

    def assert_no_receipt_without_commit(self, when: str) -> None:
        bad = receipt_violations(self.stores())
        assert not bad, f"{when}: receipt without commit:\n" + "\n".join(bad[:20])

    def diagnostics(self) -> str:
        parts = [f"pending: {self.pending()}"]
        for name, node in self.inproc.items():
            parts.append(f"{name} (in-process): {node.peers()} {node.snapshot_stats()}")
        for name in self.real:
            state = "alive" if self.alive(name) else "dead"
            parts.append(f"--- {name} ({state}) log tail:\n{self.log_tail(name)}")
        return "\n".join(parts)

    # -- the end of every test -------------------------------------------------------------------

    async def heal_and_drain(self, timeout_s: float = DRAIN_TIMEOUT_S) -> None:
        """Heal links, resume or restart every node without hooks, wait for empty outboxes."""
        for heal in self.healers:
            heal()
        for name in list(self.stopped):
            self.sigcont(name)
        if self._tasks:
            _done, not_done = await asyncio.wait(self._tasks, timeout=timeout_s)
            assert not not_done, f"sends still running after {timeout_s}s"
        self.check_crashes()
        dead = [n for n in self.real if not self.alive(n)]
        if dead:
            await asyncio.to_thread(self.start_real, dead)
        for name in self.inproc_names:
            if name not in self.inproc:
                await self.start_inproc(name)
        deadline = time.monotonic() + timeout_s
        while True:
            pending = await asyncio.to_thread(self.pending)
            if not any(pending.values()):
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"outboxes not drained after {timeout_s}s\n"
                                     f"{self.diagnostics()}")
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.05)  # let in-process receipt callbacks run

    async def finish(self, *, assert_clean: bool = True) -> Counts:
        """Heal, drain, stop everything, read every store and report the counts line."""
        await self.heal_and_drain()
        self.assert_no_receipt_without_commit("after the drain")
        codes = await asyncio.to_thread(
            lambda: {n: self.terminate(n) for n in self.real if self.alive(n)}
        )
        for name in list(self.inproc):
            await self.inproc.pop(name).close()
        counts = evaluate(self.test, self.ledger, self.stores(),
                          foreign_senders=self.foreign_senders)
        counts.extra.update(self.extra)
        if self.crashes:
            counts.extra["crashes"] = len(self.crashes)
            counts.problems.extend(f"crash: {c}" for c in self.crashes)
        unclean_exit = {n: c for n, c in codes.items() if c != 0}
        if unclean_exit:
            counts.problem(f"nodes did not stop cleanly on SIGTERM: {unclean_exit}")
        self.counts = counts
        report(counts)
        if assert_clean:
            assert counts.clean, counts.line() + "\n" + "\n".join(counts.problems)
            assert counts.verify == "ok", "\n".join(counts.problems)
            assert not unclean_exit, f"unclean exits {unclean_exit}"
            assert not self.crashes, "nodes crashed:\n" + "\n".join(self.crashes)
        return counts

    # -- running a scenario ------------------------------------------------------------------

    def run(self, scenario: Callable[[], Awaitable[None]], timeout_s: float = 240.0) -> None:
        """Run an async scenario; in-process nodes and pending tasks are closed however it ends."""

        async def main() -> None:
            try:
                await asyncio.wait_for(scenario(), timeout_s)
            finally:
                for task in list(self._tasks):
                    task.cancel()
                for task in list(self._tasks):
                    with contextlib.suppress(BaseException):
                        await task
                for name in list(self.inproc):
                    with contextlib.suppress(Exception):
                        await self.inproc.pop(name).close()
                if self._ctx is not None:
                    self._ctx.destroy(linger=0)
                    self._ctx = None

        asyncio.run(main())

    def teardown(self) -> None:
        """Whatever happened: resume, stop or kill every process, undo injected faults."""
        for name in list(self.stopped):
            with contextlib.suppress(Exception):
                self.sigcont(name)
        for helper in self.helpers:
            with contextlib.suppress(Exception):
                helper.kill()
        for node in self.cluster.nodes.values():
            with contextlib.suppress(Exception):
                node.stop(timeout_s=5)
        for cleanup in reversed(self.cleanups):
            with contextlib.suppress(Exception):
                cleanup()


HELPER_SCRIPT = Path(__file__).with_name("embedded_node.py")


class Helper:
    """An `embedded_node.py` process: a Node embedded in a script, sending via its API."""

    def __init__(self, mesh: Mesh, name: str, args: Sequence[str]) -> None:
        self.mesh = mesh
        self.name = name
        index = len(mesh.helpers)
        self.out = mesh.root / f"{name}-helper{index}.jsonl"
        self.log_path = mesh.root / "logs" / f"{name}-helper{index}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, str(HELPER_SCRIPT), "--config", str(mesh.cluster.config_path),
                 "--name", name, "--data", str(mesh.data_dir(name)), "--out", str(self.out),
                 *args],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
            )
        mesh.helpers.append(self)

    @property
    def pid(self) -> int:
        return self.process.pid

    def events(self) -> list[dict[str, Any]]:
        try:
            lines = self.out.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        result = []
        for line in lines:
            with contextlib.suppress(json.JSONDecodeError):  # a line cut by kill -9
                result.append(json.loads(line))
        return result

    def wait_event(self, ev: str, timeout_s: float = 30.0, count: int = 1) -> None:
        deadline = time.monotonic() + timeout_s
        while sum(e["ev"] == ev for e in self.events()) < count:
            if self.process.poll() is not None:
                raise AssertionError(f"helper exited ({self.process.returncode}) before {ev}:"
                                     f"\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"helper: no {ev} after {timeout_s}s:\n{self.log_tail()}")
            time.sleep(0.01)

    def wait(self, timeout_s: float = 60.0) -> int:
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"helper still running after {timeout_s}s:\n"
                                 f"{self.log_tail()}") from None

    def kill(self) -> int:
        if self.process.poll() is None:
            self.process.kill()
        return self.process.wait(10)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def ingest_posts(self, to: str) -> None:
        """Put the helper's one-at-a-time posts into the observer's ledger."""
        ledger = self.mesh.ledger
        for e in self.events():
            if e["ev"] == "attempt":
                (a,) = ledger.attempt(self.name, [to], e["body"])
                a.unsure("helper ended before post() returned")
            elif e["ev"] == "accepted":
                ledger.get(self.name, to, e["body"]).accept(e["id"], e["seq"], e["sent_at_ns"])
            elif e["ev"] == "receipt":
                for a in ledger.attempts.values():
                    if a.id == e["id"]:
                        a.receipted = True

    def ingest_chunks(self, to: str, tag: str, chunk_size: int, size: int) -> dict[str, Any]:
        """Put the helper's post_many() chunks into the ledger: a chunk whose call returned
        (and, with --flush-each, was flushed) is accepted; a chunk cut short is uncertain."""
        from .embedded_node import flood_body

        ledger = self.mesh.ledger
        events = self.events()
        accepted = {e["k"] for e in events if e["ev"] == "chunk-accepted"}
        refused = {e["k"]: e["error"] for e in events if e["ev"] == "chunk-refused"}
        for e in events:
            if e["ev"] != "chunk-attempt":
                continue
            k = e["k"]
            for i in range(chunk_size):
                (a,) = ledger.attempt(self.name, [to], flood_body(tag, k, i, size))
                if k in accepted:
                    a.accept()
                elif k in refused:
                    a.refuse(refused[k])
                else:
                    a.unsure("helper ended inside post_many()")
        return {"chunks_accepted": len(accepted), "chunks_refused": len(refused)}


def _rejected_types() -> tuple[type[BaseException], ...]:
    from meshpost.errors import MessageRejected

    return (MessageRejected,)


async def sleep_random(rng: random.Random, low: float, high: float) -> None:
    await asyncio.sleep(rng.uniform(low, high))

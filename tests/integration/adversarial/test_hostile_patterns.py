"""A hostile peer against the patterns (docs/protocol.md 19): a real, welcomed peer that crafts
pattern headers by hand, against real `meshpost node` processes on ipc:// with real SQLite.

The attacker is either an in-process `Node` of the mesh driven through its API with headers
made by hand (`Node.post(..., header=...)`: valid headers, wrong claims), or the independent
`wire_peer` (headers the document does not allow, which the API refuses to make). Each test
says what the attack is, what the node must do, and (for what was fixed) what it did before.
The two rules judged: no input from a peer may cost another message, and a name or an id a
peer chooses is never proof of who it is.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
import threading
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zmq

from meshpost import keys
from meshpost.cluster import LocalCluster
from meshpost.control import (
    BroadcastReply,
    BroadcastRequest,
    BroadcastStatusRequest,
    ErrorReply,
    GroupRequest,
    PeerRequest,
    QueueStatusReply,
    QueueStatusRequest,
    SendRequest,
    StatusRequest,
    SubmitReply,
    SubmitRequest,
)
from meshpost.control.client import ControlClient
from meshpost.node import Node
from meshpost.protocol import (
    PROTOCOL_VERSION,
    Batch,
    Envelope,
    Hello,
    ReceiptFrame,
    Refuse,
    Reject,
    Welcome,
    decode,
    encode,
)
from meshpost.protocol.header import Kind, PatternHeader
from tests.integration import wire_peer as wp
from tests.integration.faults.checker import Mesh, read_rows
from tests.integration.faults.patterns import read_tables

from .conftest import MeshFactory, until_true

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.timeout(240)]

#: Every wait for a node: generous for a loaded 2-core machine, never a threshold.
PATIENCE_S = 60.0
until = partial(until_true, timeout_s=PATIENCE_S)
WORKER = ("--worker", "work=upper")


def finished_by(mesh: Mesh, name: str) -> dict[str, str | None]:
    """Who finished each task of `name` (the ventilator's `tasks.finished_by`)."""
    conn = sqlite3.connect(f"file:{mesh.db(name)}?mode=ro", uri=True, timeout=30)
    try:
        return dict(conn.execute("SELECT task_id, finished_by FROM tasks").fetchall())
    finally:
        conn.close()


async def posted(node: Node, to: str, body: str, header: PatternHeader) -> None:
    """`node` posts one message with a hand-made header and waits (bounded) for its receipt:
    the victim stored it."""
    (handle,) = await node.post(to, body, header=header)
    await asyncio.wait_for(handle.receipt, PATIENCE_S)


# -- work queues -----------------------------------------------------------------------------


def test_a_done_or_result_for_a_task_never_given_to_the_sender_finishes_nothing(
    mesh_factory: MeshFactory,
) -> None:
    """V (its own sink) has three tasks queued and no worker yet; M, a welcomed peer that
    serves nothing and was given no task, learnt their ids (a task id is a key, not a secret
    one can count on) and says `done` for the first and sends a result for the second. Then
    a real worker W comes. Every task must be done by W with W's result kept: the forged
    completions finish nothing (stored and receipted as the messages they are, counted,
    logged). Before the fix V finished both tasks at M's word: the first was never run by
    anyone (no result anywhere) and the second kept M's made-up result."""
    mesh = mesh_factory(["V", "W", "M"], real=["V", "W"], node_args={"W": WORKER}, seed=31)

    async def scenario() -> None:
        await asyncio.to_thread(mesh.start_real, ["V"])
        m = await mesh.start_inproc("M")
        tasks = await mesh.submit("V", "work", "V", ["one", "two", "three"], lease_s=30)
        ids = [t.task_id for t in tasks]
        assert all(ids), tasks
        await posted(m, "V", "done", PatternHeader(Kind.DONE, ids[0], "work"))
        await posted(m, "V", "MADE UP", PatternHeader(Kind.RESULT, ids[1], "work"))
        v = read_tables(mesh.data_dir("V"))
        assert {t: v.tasks[t].state for t in ids} == dict.fromkeys(ids, "queued"), v.tasks
        assert not v.kept, v.kept
        await asyncio.to_thread(mesh.start_real, ["W"])
        await until("every task done at V", lambda: all(
            t.state == "done" for t in read_tables(mesh.data_dir("V")).tasks.values()))
        v = read_tables(mesh.data_dir("V"))
        assert {t: v.kept[t].worker for t in ids} == dict.fromkeys(ids, "W"), v.kept
        status = await mesh.status("V")
        assert status["stats"]["completions_refused"] == 2, status["stats"]
        assert mesh.log_text("V").count("never gave it") == 2
        await mesh.finish(assert_clean=False)

    mesh.run(scenario)


def test_a_worker_saying_done_to_a_ventilator_that_is_its_own_sink_finishes_nothing(
    mesh_factory: MeshFactory,
) -> None:
    """M, a welcomed peer, announces by hand that it serves V's queue, takes V's four tasks
    (V is their sink) and answers each with a `done` and no result. A `done` says "the
    result is at the sink": here the sink is V, which has no result. The tasks must stay
    unfinished until their lease gives them to a real worker W, whose results V keeps.
    Before the fix V finished all four at M's `done`s: no result anywhere, for good."""
    mesh = mesh_factory(["V", "W", "M"], real=["V", "W"], node_args={"W": WORKER}, seed=38)

    async def scenario() -> None:
        await asyncio.to_thread(mesh.start_real, ["V"])
        m = await mesh.start_inproc("M")
        await posted(m, "V", "serve", PatternHeader(Kind.SERVE, queue="work", version=1))
        tasks = await mesh.submit("V", "work", "V", [f"t{i}" for i in range(4)], lease_s=2)
        await until("M holds the four tasks", lambda: len(read_rows(
            mesh.data_dir("M"), "WHERE kind = 'task'")) == 4)
        for row in read_rows(mesh.data_dir("M"), "WHERE kind = 'task'"):
            await posted(m, "V", "done", PatternHeader(Kind.DONE, row.ref, "work"))
        v = read_tables(mesh.data_dir("V"))
        assert {t.state for t in v.tasks.values()} == {"assigned"}, v.tasks
        await asyncio.to_thread(mesh.start_real, ["W"])
        await until("every task done at V", lambda: all(
            t.state == "done" for t in read_tables(mesh.data_dir("V")).tasks.values()))
        v = read_tables(mesh.data_dir("V"))
        assert {v.kept[t.task_id].worker for t in tasks} == {"W"}, v.kept
        assert finished_by(mesh, "V") == dict.fromkeys(v.tasks, "W")
        stats = (await mesh.status("V"))["stats"]
        assert stats["completions_refused"] == 4, stats
        assert mesh.log_text("V").count("only the task's result finishes it") == 4
        await mesh.finish(assert_clean=False)

    mesh.run(scenario)


def test_a_task_whose_sink_is_no_peer_of_the_worker_is_not_run(
    mesh_factory: MeshFactory,
) -> None:
    """M, a welcomed peer, sends worker W tasks by hand whose sink W cannot send a result
    to: `all`, a group W knows, W itself, a name that is no peer. W must not run them (a
    handler's work and effects for a result that can go nowhere), nor run them again at
    each start, nor send anyone anything for them; it counts and logs them. Before, W ran
    each one, then failed to post its result (`all` and the group: a ValueError out of a
    handler task, "one message id for 2 peers"), and ran them all again after a restart."""
    mesh = mesh_factory(["W", "B", "M"], real=["W", "B"],
                        node_args={"W": ("--worker", "work=upper")}, seed=40)

    async def scenario() -> None:
        await mesh.start()
        m = mesh.inproc["M"]
        await mesh.control("B", GroupRequest("join", "team"))
        await mesh.control("W", GroupRequest("join", "team"))
        for i, sink in enumerate(["all", "team", "W", "NOPE"]):
            await posted(m, "W", f"task {i}", PatternHeader(Kind.TASK, f"t{i}", "work", sink,
                                                           60_000, 1))
        await until("W refused the four", lambda: mesh.log_text("W").count(
            "not run: its sink") == 4)
        stats = (await mesh.status("W"))["stats"]
        assert (stats["tasks_refused"], stats["handler_errors"]) == (4, 0), stats
        await asyncio.to_thread(mesh.terminate, "W")
        await asyncio.to_thread(mesh.start_real, ["W"])
        await until("W refused the four again at start", lambda: mesh.log_text("W").count(
            "not run: its sink") == 8)
        stats = (await mesh.status("W"))["stats"]
        assert (stats["tasks_refused"], stats["handler_errors"]) == (4, 0), stats
        out = read_rows(mesh.data_dir("W"), "WHERE direction = 'out'")
        assert {r.kind for r in out} <= {"serve", "member"}, out
        assert "never retrieved" not in mesh.log_text("W")
        await mesh.finish(assert_clean=False)

    mesh.run(scenario)


class RejectingWorker:
    """M as the independent peer: it tells V (on its own connection, as a dialer) that it
    serves `queue`, and at its own endpoint (where V's link to M dials) welcomes V and
    rejects every message V sends it `invalid`, from a thread."""

    def __init__(self, mesh: Mesh, queue: str) -> None:
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.listener = wp.ListenerPeer(self.ctx, "M", mesh.endpoint("M"))
        self.dialer = wp.Dialer(self.ctx, "M", mesh.endpoint("V"))
        self.queue = queue
        self.rejected = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        mesh.cleanups.append(self.close)

    def announce(self) -> None:
        self.dialer.handshake(PATIENCE_S)
        (serve,) = self.dialer.envelopes("V", ["serve"])
        self.dialer.batch([dataclasses.replace(serve, header=["serve", "", self.queue, "", 0,
                                                              0, 1])])
        assert answers(self.dialer, {serve.seq}) == {serve.seq: ("receipt", "")}
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                rid, frame, read_at = self.listener.recv(0.1)
            except TimeoutError:
                continue
            if frame.tag == "hello":
                self.listener.welcome(rid)
            elif frame.tag == "ping":
                self.listener.pong(rid, frame, read_at)
            elif frame.tag == "batch":
                seqs = [e.seq for e in frame["messages"]]
                self.listener.send(rid, "reject", seqs, "invalid", "no, whatever it is")
                self.rejected += len(seqs)

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        self.listener.close()
        self.dialer.close()
        self.ctx.term()


def test_a_worker_that_rejects_its_task_messages_cannot_make_the_ventilator_drop_them(
    mesh_factory: MeshFactory,
) -> None:
    """W has served V's queue and is down for a moment. M, a welcomed peer, says it serves
    the queue too, and rejects every task message V sends it (`invalid`). V must neither
    give up on those tasks nor leave them with M: W, back, does every one of them at once
    (the lease is an hour). Before, V never saw a fresh task message's rejection (its
    receipt future was forgotten, a weak reference nobody held): the tasks stayed "in
    flight" at M for their whole lease; and the rule it meant to apply, abandon a task at
    its first refusal, would have let M drop every task it was given, for good."""
    mesh = mesh_factory(["V", "W", "M"], real=["V", "W"], absent=["M"],
                        node_args={"W": WORKER}, seed=42)
    mesh.foreign_senders.add("M")

    async def scenario() -> None:
        await mesh.start()
        await until("V knows W serves", lambda: bool(read_rows(
            mesh.data_dir("V"), "WHERE kind = 'serve' AND sender = 'W'")))
        await asyncio.to_thread(mesh.terminate, "W")
        m = RejectingWorker(mesh, "work")
        await asyncio.to_thread(m.announce)
        tasks = await mesh.submit("V", "work", "V", [f"t{i}" for i in range(4)],
                                  lease_s=3600)
        await until("M rejected task messages", lambda: m.rejected >= 1)
        await asyncio.to_thread(mesh.start_real, ["W"])
        await until("every task done at V", lambda: {
            t.state for t in read_tables(mesh.data_dir("V")).tasks.values()} == {"done"})
        v = read_tables(mesh.data_dir("V"))
        assert {v.kept[t.task_id].worker for t in tasks} == {"W"}
        mesh.extra["rejected_by_m"] = m.rejected
        await mesh.finish(assert_clean=False)

    mesh.run(scenario)


#: Serve/stop rounds of the churning worker.
CHURN_ROUNDS = 10


def test_a_worker_that_serves_and_stops_again_and_again_gets_one_task_a_round(
    mesh_factory: MeshFactory,
) -> None:
    """V has 16 tasks queued and no real worker yet. M, a welcomed peer, announces `serve`
    and `stop` by hand CHURN_ROUNDS times, never finishing anything. Each `serve` made V
    send it every task waiting (16 task messages, 16 rows in V's store per record M sent):
    a peer's two messages cost V a full window of its own. A worker that walked away with
    tasks in hand now comes back suspect (one task at a time until it completes one), so V
    sends at most 16 + one per round; W, started after, does all 16."""
    mesh = mesh_factory(["V", "W", "M"], real=["V", "W"], node_args={"W": WORKER}, seed=39)

    async def scenario() -> None:
        await asyncio.to_thread(mesh.start_real, ["V"])
        m = await mesh.start_inproc("M")
        tasks = await mesh.submit("V", "work", "V", [f"t{i}" for i in range(16)], lease_s=60)
        version = 0

        def to_m() -> int:
            return len(read_rows(mesh.data_dir("V"), "WHERE kind = 'task' AND peer = 'M'"))

        for _ in range(CHURN_ROUNDS):
            before = await asyncio.to_thread(to_m)
            version += 1
            await posted(m, "V", "serve", PatternHeader(Kind.SERVE, queue="work",
                                                        version=version))
            await until("V gave M something", lambda b=before: to_m() > b)
            version += 1
            await posted(m, "V", "stop", PatternHeader(Kind.SERVE, queue="work",
                                                       version=version))
        sent_to_m = await asyncio.to_thread(to_m)
        mesh.extra["task_messages_to_m"] = sent_to_m
        assert sent_to_m <= 16 + CHURN_ROUNDS, sent_to_m
        await asyncio.to_thread(mesh.start_real, ["W"])
        await until("every task done at V", lambda: all(
            t.state == "done" for t in read_tables(mesh.data_dir("V")).tasks.values()))
        assert {read_tables(mesh.data_dir("V")).kept[t.task_id].worker for t in tasks} == {"W"}
        await mesh.finish(assert_clean=False)

    mesh.run(scenario)


def test_a_worker_announcing_an_absurd_prefetch_is_clamped_counted_and_costs_no_message(
    mesh_factory: MeshFactory,
) -> None:
    """M announces to V, by hand, 200 `serve` records of queue `work` with a prefetch of
    10**12 (each a new version) while A streams 40 messages to V and a real worker W serves
    the queue. V must keep each record (it is M's own word about itself), honour it as
    MAX_PREFETCH (1,024), count each (`prefetch_clamped`), log them paced (never a line
    each), and store every one of A's messages once. Then 40 tasks go to W and M by fewest
    in flight: M, which runs nothing, holds its share until a short lease gives them to W,
    and every task has W's result. (Before, the field did not exist: every worker got 16.)"""
    mesh = mesh_factory(["V", "A", "W", "M"], real=["V", "A", "W"], node_args={"W": WORKER},
                        seed=43)
    records = 200

    async def scenario() -> None:
        await asyncio.to_thread(mesh.start_real, ["V", "A", "W"])
        m = await mesh.start_inproc("M")
        streaming = mesh.spawn_task(mesh.stream("A", "V", 40, tag="honest", concurrency=10))
        handles = await asyncio.gather(*(
            m._post("V", "serve", held=False, header=PatternHeader(
                Kind.SERVE, queue="work", version=m.hlc.now(), prefetch=10**12))
            for _ in range(records)))
        await asyncio.wait_for(asyncio.gather(*(h.receipt for (h,) in handles)), PATIENCE_S)
        await streaming
        stats = (await mesh.status("V"))["stats"]
        assert stats["prefetch_clamped"] == records, stats
        log = mesh.log_text("V")
        lines = log.count("announcing a prefetch of 1000000000000")
        assert 1 <= lines < records and log.count("announces prefetches above 1024") == 1
        # W's own serve record may still be on its way (W starts as a process: under a
        # whole suite's load it was not at V yet once); M's are all receipted by now.
        deadline = asyncio.get_running_loop().time() + PATIENCE_S
        while True:
            queues = await mesh.control("V", QueueStatusRequest(queue="work"))
            assert isinstance(queues, QueueStatusReply), queues
            [work] = queues.queues
            prefetches = {w.name: w.prefetch for w in work.workers}
            if "W" in prefetches or asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.1)
        assert prefetches == {"M": 1024, "W": 16}
        tasks = await mesh.submit("V", "work", "V", [f"t{i}" for i in range(40)],
                                  lease_s=2.0)
        await until("every task done at V", lambda: all(
            t.state == "done" for t in read_tables(mesh.data_dir("V")).tasks.values()))
        kept = read_tables(mesh.data_dir("V")).kept
        assert {kept[t.task_id].worker for t in tasks} == {"W"}
        counts = await mesh.finish(assert_clean=False)
        assert counts.accepted == counts.receipted == counts.stored == counts.attempted == 40

    mesh.run(scenario)


#: The flood's size per kind: enough to see derived state grow with it, small enough for CI.
FLOOD = 600


def test_a_flood_of_made_up_task_ids_and_records_costs_no_other_message(
    mesh_factory: MeshFactory,
) -> None:
    """While A streams 100 messages to V and V has three real tasks queued (its own sink),
    M sends V by hand FLOOD `done`s and FLOOD results naming task ids that never existed,
    FLOOD/2 membership joins of distinct groups and FLOOD/2 `serve` records of distinct
    queues. Each is a message M pays for: V stores and receipts each, keeps derived state in
    proportion (a result row per made-up result as a sink, a record per (group, member)),
    never more; A's messages are all stored once; V's tasks table keeps its three tasks, a
    real worker W does them; V's status and queue status still answer."""
    mesh = mesh_factory(["V", "A", "W", "M"], real=["V", "A", "W"], node_args={"W": WORKER},
                        seed=37)

    async def scenario() -> None:
        await asyncio.to_thread(mesh.start_real, ["V", "A"])
        m = await mesh.start_inproc("M")
        tasks = await mesh.submit("V", "work", "V", ["one", "two", "three"], lease_s=30)
        streaming = mesh.spawn_task(mesh.stream("A", "V", 100, tag="honest", concurrency=10))
        made_up = [
            *(("done", PatternHeader(Kind.DONE, f"fake-{i}", "work")) for i in range(FLOOD)),
            *(("X", PatternHeader(Kind.RESULT, f"fake-{i}", "work")) for i in range(FLOOD)),
            *(("join", PatternHeader(Kind.MEMBER, queue=f"g{i}", version=1))
              for i in range(FLOOD // 2)),
            *(("serve", PatternHeader(Kind.SERVE, queue=f"q{i}", version=1))
              for i in range(FLOOD // 2)),
        ]
        for start in range(0, len(made_up), 200):
            chunk = made_up[start:start + 200]
            handles = await asyncio.gather(*(m._post("V", body, held=False, header=header)
                                             for body, header in chunk))
            await asyncio.wait_for(asyncio.gather(*(h.receipt for (h,) in handles)),
                                   PATIENCE_S)
        await streaming
        status = await mesh.status("V")
        assert len([g for g in status["groups"] if g.startswith("g")]) == FLOOD // 2
        queues = await mesh.control("V", QueueStatusRequest())
        assert isinstance(queues, QueueStatusReply), queues
        assert {q.queue for q in queues.queues} >= {"work", *(f"q{i}" for i in range(5))}
        v = read_tables(mesh.data_dir("V"))
        assert set(v.tasks) == {t.task_id for t in tasks}, len(v.tasks)
        assert len(v.kept) == FLOOD, len(v.kept)  # one row per made-up result: no more
        await asyncio.to_thread(mesh.start_real, ["W"])
        await until("every task done at V", lambda: all(
            t.state == "done" for t in read_tables(mesh.data_dir("V")).tasks.values()))
        v = read_tables(mesh.data_dir("V"))
        assert {v.kept[t.task_id].worker for t in tasks} == {"W"}
        stored = len(read_rows(mesh.data_dir("V"), "WHERE sender = 'M'"))
        assert stored == len(made_up), stored
        counts = await mesh.finish(assert_clean=False)
        assert counts.accepted == counts.receipted == counts.stored == counts.attempted == 100
        assert counts.lost == counts.duplicated == counts.mismatched == 0, counts.line()
        assert counts.verify == "ok", counts.problems

    mesh.run(scenario)


# -- request/reply and echo ------------------------------------------------------------------


def test_a_reply_from_a_peer_the_request_did_not_go_to_answers_nothing(
    mesh_factory: MeshFactory,
) -> None:
    """A asks B (not running yet). M, a welcomed peer, names A's request id (learnt somehow)
    in a reply of its own, and replies to its own reply. A's caller must not get M's body:
    its request times out `not-delivered`, the forged replies are stored and counted
    (`replies_unmatched`). A restarts: the request still waits for B (M's reply, stored, does
    not count as its answer), and when B comes up with --echo, B's reply is the one linked."""
    mesh = mesh_factory(["A", "B", "M"], real=["A", "B"], node_args={"B": ("--echo",)},
                        seed=34)

    async def scenario() -> None:
        await asyncio.to_thread(mesh.start_real, ["A"])
        m = await mesh.start_inproc("M")
        asking = mesh.spawn_task(mesh.control("A", PeerRequest("B", "question", 4.0)))
        await until("A stored its request", lambda: bool(read_rows(
            mesh.data_dir("A"), "WHERE kind = 'request'")))
        (request,) = read_rows(mesh.data_dir("A"), "WHERE kind = 'request'")
        (forged,) = await m.post("A", "forged answer", header=PatternHeader(Kind.REPLY,
                                                                             request.id))
        await asyncio.wait_for(forged.receipt, PATIENCE_S)
        await posted(m, "A", "reply to a reply", PatternHeader(Kind.REPLY, forged.id))
        answer = await asking
        assert isinstance(answer, ErrorReply), answer
        assert answer.kind == "request_timeout" and "not delivered" in answer.message, answer
        stats = (await mesh.status("A"))["stats"]
        assert stats["replies_unmatched"] == 2, stats
        assert "the request went to 'B'" in mesh.log_text("A")
        await asyncio.to_thread(mesh.terminate, "A")
        await asyncio.to_thread(mesh.start_real, ["A", "B"])
        await until("B's reply linked at A", lambda: f"to request {request.id} from B" in
                    mesh.log_text("A"))
        replies = read_rows(mesh.data_dir("A"), "WHERE kind = 'reply' AND ref = ?",
                            (request.id,))
        assert sorted((r.sender, r.body) for r in replies) == [
            ("B", "question"), ("M", "forged answer")], replies
        await mesh.finish(assert_clean=False)

    mesh.run(scenario)


def test_echo_nodes_answer_only_their_sender_and_never_each_other(
    mesh_factory: MeshFactory,
) -> None:
    """E1 and E2 run --echo. M, a welcomed peer, sends each one message of every kind by
    hand: a request, a plain message, a group copy, a reply (to the echo's own reply, too),
    a membership and a serve record, a task for a queue it does not serve, a result and a
    `done`. Each echo answers the request, the plain message and the group copy, once each,
    to M; nothing else; and the two echoes exchange nothing: no input costs another
    message, and no ping-pong between echoes can start."""
    mesh = mesh_factory(["E1", "E2", "M"], real=["E1", "E2"],
                        node_args={"E1": ("--echo",), "E2": ("--echo",)}, seed=35)

    async def scenario() -> None:
        await mesh.start()
        m = mesh.inproc["M"]
        for echo in ("E1", "E2"):
            headers = [PatternHeader(Kind.REQUEST), None, PatternHeader(Kind.GROUP, "L1"),
                       PatternHeader(Kind.REPLY, "nothing"),
                       PatternHeader(Kind.MEMBER, queue="team", version=1),
                       PatternHeader(Kind.SERVE, queue="work", version=1),
                       PatternHeader(Kind.TASK, "t1", "work", "M", 1000, 1),
                       PatternHeader(Kind.RESULT, "t1", "work"),
                       PatternHeader(Kind.DONE, "t1", "work")]
            for i, header in enumerate(headers):
                body = "join" if header is not None and header.kind is Kind.MEMBER else (
                    "serve" if header is not None and header.kind is Kind.SERVE else f"k{i}")
                (handle,) = await m._post(echo, body, held=False, header=header)
                await asyncio.wait_for(handle.receipt, PATIENCE_S)
        await until("three echoes from each", lambda: len(read_rows(
            mesh.data_dir("M"), "WHERE direction = 'in' AND kind = 'reply'")) >= 6)
        echoes = read_rows(mesh.data_dir("M"), "WHERE direction = 'in' AND kind = 'reply'")
        for echo in echoes:  # a reply to the echo's reply: no answer either
            await posted(m, echo.sender, "and back", PatternHeader(Kind.REPLY, echo.id))
        counts = await mesh.finish(assert_clean=False)
        assert sorted((r.sender, r.body) for r in echoes) == sorted(
            (e, b) for e in ("E1", "E2") for b in ("k0", "k1", "k2")), echoes
        for echo in ("E1", "E2"):
            out = read_rows(mesh.data_dir(echo), "WHERE direction = 'out'")
            assert [(r.recipient, r.kind, r.body) for r in out] == [
                ("M", "reply", b) for b in ("k0", "k1", "k2")], out
        assert counts.verify == "ok", counts.problems

    mesh.run(scenario)


# -- live groups -----------------------------------------------------------------------------


async def groups_at(mesh: Mesh, name: str) -> dict[str, list[str]]:
    return {g: sorted(m) for g, m in (await mesh.status(name))["groups"].items()}


def test_a_peer_speaks_only_for_itself_in_groups_and_names_no_node(
    mesh_factory: MeshFactory,
) -> None:
    """B is in group `team`. M, a welcomed peer, sends every peer membership records by hand:
    a leave of `team` of the highest version (which can only be about M: a record is its
    sender's), and joins of groups named after V itself, after the peer B and after `ALL`.
    B must stay in `team`; and V's sends to `B`, to `V` and to `ALL` must never go to M,
    whatever groups M claims: a group name a peer chooses does not take a node's name."""
    mesh = mesh_factory(["V", "B", "M"], real=["V", "B"], seed=33)

    async def scenario() -> None:
        await mesh.start()
        m = mesh.inproc["M"]
        await mesh.control("B", GroupRequest("join", "team"))
        async with asyncio.timeout(PATIENCE_S):
            while "B" not in (await groups_at(mesh, "V")).get("team", []):
                await asyncio.sleep(0.05)
        for group, body, version in [("team", "leave", 2**63 - 1), ("team", "join", 5),
                                     ("V", "join", 6), ("B", "join", 7), ("ALL", "join", 8)]:
            for handle in await m.post("all", body, header=PatternHeader(
                    Kind.MEMBER, queue=group, version=version)):
                await asyncio.wait_for(handle.receipt, PATIENCE_S)
        groups = await groups_at(mesh, "V")
        assert groups.get("team") == ["B"], groups
        before = len(read_rows(mesh.data_dir("M"), "WHERE direction = 'in'"))
        sent = {}
        for target in ("B", "V", "ALL"):
            sent[target] = await mesh.control("V", SendRequest(target, f"to {target}", 10.0))
        after = read_rows(mesh.data_dir("M"), "WHERE direction = 'in'")
        leaked = [r.body for r in after[before:] if r.body in ("to B", "to V")]
        assert leaked == [], (leaked, sent)
        assert isinstance(sent["V"], ErrorReply), sent["V"]  # its own name is no target
        assert [s.to for s in sent["B"].sent] == ["B"], sent["B"]
        assert sorted(s.to for s in sent["ALL"].sent) == ["B", "M"], sent["ALL"]
        assert groups == {"team": ["B"]}, groups
        stats = (await mesh.status("V"))["stats"]
        assert stats["memberships_refused"] == 3, stats
        assert mesh.log_text("V").count("that is a node's name") == 3
        await mesh.finish(assert_clean=False)

    mesh.run(scenario)


# -- broadcast k/n -----------------------------------------------------------------------------


def test_a_recipient_cannot_move_a_broadcasts_k_of_n(mesh_factory: MeshFactory) -> None:
    """A broadcasts to all while B is down: delivered 1/2 (M), B pending. M, a recipient that
    knows the logical id (its copy carries it), sends A a `group` copy of its own under that
    id, a reply to its copy and a `done` and a result naming the id. A's k/n moves only by
    its own copies' receipts: still 1/2 with B pending (after a restart of A too, rebuilt
    from the store), then 2/2 once B is up."""
    mesh = mesh_factory(["A", "B", "M"], real=["A", "B"], seed=36)

    async def scenario() -> None:
        await asyncio.to_thread(mesh.start_real, ["A"])
        m = await mesh.start_inproc("M")
        reply = await mesh.control("A", BroadcastRequest("all", "to everyone"))
        assert isinstance(reply, BroadcastReply), reply
        logical = reply.status.logical_id
        await until("M has its copy", lambda: bool(read_rows(
            mesh.data_dir("M"), "WHERE kind = 'group' AND ref = ?", (logical,))))
        (copy,) = read_rows(mesh.data_dir("M"), "WHERE kind = 'group' AND ref = ?", (logical,))
        for body, header in [("mine too", PatternHeader(Kind.GROUP, logical)),
                             ("got it", PatternHeader(Kind.REPLY, copy.id)),
                             ("done", PatternHeader(Kind.DONE, logical, "all")),
                             ("B got it", PatternHeader(Kind.RESULT, logical, "all"))]:
            await posted(m, "A", body, header)

        async def status(seen: int) -> BroadcastReply:
            answer = await mesh.control("A", BroadcastStatusRequest(logical, seen, 0.0))
            assert isinstance(answer, BroadcastReply), answer
            return answer

        s = (await status(0)).status
        assert (s.total, s.delivered, s.pending, s.rejected) == (2, ("M",), ("B",), ()), s
        # Rebuilt from the store after a restart (M's rows under the id are in it too).
        await asyncio.to_thread(mesh.terminate, "A")
        await asyncio.to_thread(mesh.start_real, ["A"])
        s = (await status(0)).status
        assert (s.total, s.delivered, s.pending, s.rejected) == (2, ("M",), ("B",), ()), s
        await asyncio.to_thread(mesh.start_real, ["B"])
        async with asyncio.timeout(PATIENCE_S):
            while (s := (await status(1)).status).pending:
                await asyncio.sleep(0.05)
        assert (s.total, s.delivered, s.rejected) == (2, ("B", "M"), ()), s
        await mesh.finish(assert_clean=False)

    mesh.run(scenario)


# -- headers the document does not allow, from the independent peer ------------------------


def raw_peer(mesh: Mesh, name: str, to: str) -> wp.Dialer:
    """The independent peer (docs/protocol.md alone) as `name`, welcomed by `to`."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    peer = wp.Dialer(ctx, name, mesh.endpoint(to))
    mesh.cleanups.append(lambda: (peer.close(), ctx.term()))
    peer.handshake(PATIENCE_S)
    return peer


def answers(peer: wp.Dialer, seqs: set[int]) -> dict[int, tuple[str, str]]:
    """Read the node's answers until each of `seqs` is receipted or rejected (bounded):
    seq -> ("receipt", "") or ("reject", code)."""
    got: dict[int, tuple[str, str]] = {}
    while not seqs <= got.keys():
        frame = peer.recv(PATIENCE_S)
        if frame.tag == "receipt":
            for lo, hi in frame["ranges"]:
                got.update({s: ("receipt", "") for s in range(lo, hi + 1)})
        elif frame.tag == "reject":
            got.update({s: ("reject", frame["code"]) for s in frame["seqs"]})
    return got


def test_headers_the_document_does_not_allow_are_rejected_alone_and_counted(
    mesh_factory: MeshFactory,
) -> None:
    """M, a welcomed peer, sends V one batch of messages whose headers break 4.4.1 (an
    unknown kind, a reply or a done without its ref, a ref over 64 characters, queue names
    of odd bytes and of 100 characters, a task without a lease, a membership record of
    version 0, numbers out of range, a worker's prefetch of 0, below, a string) between
    messages whose headers are allowed (a longer
    header of a later version, a reply whose ref is its own id, a request that names
    itself). Each bad one must be rejected `invalid` alone, never stored; every good one
    receipted and stored once; the violations counted and logged; and A's messages to V,
    sent meanwhile, all stored once (the checker)."""
    mesh = mesh_factory(["V", "A", "M"], real=["V", "A"], absent=["M"], seed=32)
    mesh.foreign_senders.add("M")

    async def scenario() -> None:
        await mesh.start()
        peer = await asyncio.to_thread(raw_peer, mesh, "M", "V")
        bad: dict[str, Any] = {
            "unknown kind": ["steal", "x"],
            "reply without ref": ["reply", ""],
            "done without ref": ["done", "", "work"],
            "ref of 65 characters": ["reply", "r" * 65],
            "queue of odd bytes": ["member", "", "te am\x00"],
            "queue of 100 characters": ["serve", "", "q" * 100, "", 0, 0, 1],
            "task without lease": ["task", "t1", "work", "V", 0, 1],
            "task of attempt 0": ["task", "t1", "work", "V", 1000, 0],
            "lease over a day": ["task", "t1", "work", "V", 86_400_001, 1],
            "member of version 0": ["member", "", "team"],
            "version over 2**63-1": ["member", "", "team", "", 0, 0, 2**64 - 1],
            "empty kind": [""],
            # A worker's prefetch (19.4) that is no count: refused, never clamped.
            "prefetch 0": ["serve", "", "work", "", 0, 0, 1, 0],
            "prefetch -5": ["serve", "", "work", "", 0, 0, 1, -5],
            "prefetch a string": ["serve", "", "work", "", 0, 0, 1, "lots"],
            "prefetch over 2**63-1": ["serve", "", "work", "", 0, 0, 1, 2**64 - 1],
        }
        envelopes = peer.envelopes("V", [f"m{i}" for i in range(len(bad) + 4)])
        good = {
            # A later version's longer header: the extra fields are ignored (4.4.1), those
            # after the eighth, `prefetch` (nil: not stated).
            envelopes[0].seq: ["request", "", "", "", 0, 0, 0, None, "later", 7],
            envelopes[1].seq: ["reply", envelopes[1].id],  # a reply to itself
            envelopes[2].seq: ["request", envelopes[2].id],  # a request naming itself
            envelopes[3].seq: None,
        }
        bad_seqs = {e.seq: name for e, name in zip(envelopes[4:], bad, strict=True)}
        headers = {**good, **{seq: bad[name] for seq, name in bad_seqs.items()}}
        sent = [dataclasses.replace(e, header=headers[e.seq]) for e in envelopes]
        violations_before = (await mesh.status("V"))["stats"]["violations"]
        streaming = mesh.spawn_task(mesh.stream("A", "V", 40, tag="honest", concurrency=10))
        peer.batch(sent)
        got = await asyncio.to_thread(answers, peer, set(headers))
        await streaming
        assert {s: got[s] for s in good} == dict.fromkeys(good, ("receipt", "")), got
        assert {bad_seqs[s]: got[s] for s in bad_seqs} == dict.fromkeys(
            bad, ("reject", "invalid")), got
        stored = {r.id: r for r in read_rows(mesh.data_dir("V"), "WHERE sender = 'M'")}
        assert set(stored) == {e.id for e in sent if e.seq in good}, stored
        stats = (await mesh.status("V"))["stats"]
        assert stats["violations"] > violations_before, stats
        assert "unknown" in mesh.log_text("V") or "out of range" in mesh.log_text("V")
        counts = await mesh.finish()
        assert counts.accepted == counts.receipted == counts.stored == counts.attempted == 40

    mesh.run(scenario)


def test_a_header_of_the_wrong_layout_refuses_only_its_own_batch(
    mesh_factory: MeshFactory,
) -> None:
    """A header that is not an array of the header's types (a string; a ref that is an
    integer; a trailing field nested 100,000 arrays deep) makes its whole batch `malformed`
    (8.2): none of it stored, nothing else lost. M then says Hello again and sends the same
    good message alone: stored once, as are A's messages throughout."""
    mesh = mesh_factory(["V", "A", "M"], real=["V", "A"], absent=["M"], seed=41)
    mesh.foreign_senders.add("M")

    async def scenario() -> None:
        await mesh.start()
        peer = await asyncio.to_thread(raw_peer, mesh, "M", "V")
        streaming = mesh.spawn_task(mesh.stream("A", "V", 30, tag="honest", concurrency=10))
        (good,) = peer.envelopes("V", ["good"])
        for i, header in enumerate(["task", ["reply", 12345], "nested"]):
            (bad,) = peer.envelopes("V", [f"bad {i}"], first_seq=2 + i)
            if header == "nested":  # by hand: msgspec encodes no such depth
                peer.send_raw(deeply_nested_batch(good, bad))
            else:
                peer.batch([good, dataclasses.replace(bad, header=header)])
            refused = await asyncio.to_thread(peer.recv, PATIENCE_S)
            assert refused.tag == "refuse" and refused["code"] == "malformed", refused
            await asyncio.to_thread(peer.handshake, PATIENCE_S)
        assert read_rows(mesh.data_dir("V"), "WHERE sender = 'M'") == []
        peer.batch([good])
        assert await asyncio.to_thread(answers, peer, {good.seq}) == {1: ("receipt", "")}
        await streaming
        assert [r.id for r in read_rows(mesh.data_dir("V"), "WHERE sender = 'M'")] == [good.id]
        counts = await mesh.finish()
        assert counts.accepted == counts.receipted == counts.stored == counts.attempted == 30

    mesh.run(scenario)


def deeply_nested_batch(good: wp.Envelope, bad: wp.Envelope, depth: int = 100_000) -> bytes:
    """A batch of `good` and `bad`, whose header's eighth field is `depth` nested arrays,
    encoded by hand (msgpack: 0x91 is an array of one)."""
    encode = msgspec.msgpack.encode
    header = b"\x98" + encode("request") + b"\xa0\xa0\xa0\x00\x00\x00" + b"\x91" * depth + b"\xc0"
    envelope = b"\x98" + b"".join(encode(f) for f in bad.wire()[:7]) + header
    return (b"\x93" + encode("batch") + encode(wp.wall_ns()) + b"\x92" + encode(good.wire())
            + envelope)


# -- under --secure: the key decides who a record or a completion is from --------------------


class CurvePeer:
    """A raw DEALER holding node M's own CURVE key (a real, allowlisted peer), speaking the
    wire format by hand to V."""

    def __init__(self, endpoint: str, server_key: bytes, public: bytes, secret: bytes) -> None:
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDTIMEO, int(PATIENCE_S * 1000))
        self.sock.setsockopt(zmq.CURVE_SERVERKEY, server_key)
        self.sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
        self.sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
        self.sock.connect(endpoint)

    def send(self, frame: Any) -> None:
        self.sock.send(encode(frame))

    def answer(self) -> Any:
        assert self.sock.poll(int(PATIENCE_S * 1000)), "no answer from V"
        return decode(self.sock.recv(), max_bytes=1 << 20)

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


@pytest.fixture
def secure_mesh(short_tmp: Path) -> Iterator[LocalCluster]:
    """V and B run --secure; M has keys both allowlist but runs nowhere: the test holds M's
    key in a raw socket."""
    cluster = LocalCluster.create(short_tmp, 3, names=["V", "B", "M"], transport="ipc",
                                  extra_args=["--secure"])
    keys.generate_mesh_keys({n: cluster.data_dir(n) for n in cluster.names})
    cluster.start(["V", "B"])
    try:
        yield cluster
    finally:
        cluster.stop()


def test_under_secure_a_peers_key_speaks_only_for_itself_in_patterns(
    secure_mesh: LocalCluster,
) -> None:
    """Under --secure, M's own key: a Hello as B is refused (`identity`); on M's welcomed
    connection, a membership record leaving `team` with B as its envelope's sender is
    rejected `invalid` (the sender must be the session's name); M's own `done` and result
    for V's queued tasks are stored and receipted but finish nothing. B stays in `team`."""
    cluster = secure_mesh
    with ControlClient(cluster.data_dir("B"), name="B") as b:
        assert b.request(GroupRequest("join", "team"), timeout_s=PATIENCE_S).ok
    with ControlClient(cluster.data_dir("V"), name="V") as v:
        secure_attack(cluster, v)


def secure_attack(cluster: LocalCluster, v: ControlClient) -> None:
    """The attack of the test above, with V's control client."""
    deadline = time.monotonic() + PATIENCE_S
    while "B" not in v.request(StatusRequest(), timeout_s=PATIENCE_S).status["groups"].get(
            "team", []):
        assert time.monotonic() < deadline, "V never saw B join team"
        time.sleep(0.05)
    submitted = v.request(SubmitRequest("work", "V", ["one", "two"], 30.0),
                          timeout_s=PATIENCE_S)
    assert isinstance(submitted, SubmitReply), submitted
    ids = submitted.task_ids
    _v_secret, v_public = keys.load_own(cluster.data_dir("V"))
    m_secret, m_public = keys.load_own(cluster.data_dir("M"))
    endpoint = cluster.endpoints["V"]
    now = time.time_ns()

    as_b = CurvePeer(endpoint, v_public, m_public, m_secret)
    try:
        as_b.send(Hello(PROTOCOL_VERSION, "0123456789abcdef", "B", now, now >> 4))
        refused = as_b.answer()
    finally:
        as_b.close()
    assert isinstance(refused, Refuse) and refused.code == "identity", refused

    m = CurvePeer(endpoint, v_public, m_public, m_secret)
    try:
        m.send(Hello(PROTOCOL_VERSION, "0123456789abcdef", "M", now, now >> 4))
        assert isinstance(m.answer(), Welcome)
        sent = [
            Envelope(f"{now:x}a", 1, "B", "V", "leave", now, now >> 4,
                     PatternHeader(Kind.MEMBER, queue="team", version=2**62)),
            Envelope(f"{now:x}b", 2, "M", "V", "done", now, now >> 4,
                     PatternHeader(Kind.DONE, ids[0], "work")),
            Envelope(f"{now:x}c", 3, "M", "V", "MADE UP", now, now >> 4,
                     PatternHeader(Kind.RESULT, ids[1], "work")),
        ]
        m.send(Batch(now, sent))
        answers = [m.answer(), m.answer()]
    finally:
        m.close()
    rejects = [a for a in answers if isinstance(a, Reject)]
    receipts = [a for a in answers if isinstance(a, ReceiptFrame)]
    assert [(r.seqs, r.code) for r in rejects] == [([1], "invalid")], answers
    assert [r.ranges for r in receipts] == [[(2, 3)]], answers
    deadline = time.monotonic() + PATIENCE_S
    while True:  # counted when V's work-queue loop performs the refusals, just after
        status = v.request(StatusRequest(), timeout_s=PATIENCE_S).status
        if status["stats"]["completions_refused"] == 2:
            break
        assert time.monotonic() < deadline, status["stats"]
        time.sleep(0.05)
    assert status["groups"].get("team") == ["B"], status["groups"]
    assert read_tables(cluster.data_dir("V")).kept == {}
    assert {t.state for t in read_tables(cluster.data_dir("V")).tasks.values()} == {"queued"}

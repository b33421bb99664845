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
from functools import partial
from typing import Any

import pytest
import zmq

from meshpost.control import ErrorReply, GroupRequest, SendRequest
from meshpost.node import Node
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
        leaked = [r.body for r in after[before:] if r.body != "to ALL"]
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
    version 0, numbers out of range) between messages whose headers are allowed (a longer
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
        }
        envelopes = peer.envelopes("V", [f"m{i}" for i in range(len(bad) + 4)])
        good = {
            # A later version's longer header: the extra fields are ignored (4.4.1).
            envelopes[0].seq: ["request", "", "", "", 0, 0, 0, "later", 7],
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

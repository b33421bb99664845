"""Keys changed under a running `--secure` node: `meshpost keys reload` (control `reload-keys`)
and SIGHUP put authorized_keys in force at once (docs/protocol.md 2.3, "Changing keys under a
running node"; docs/reliability.md, "Keys changed under a running node").

Real node processes on loopback. The independent `wire_peer` dialers (no meshpost import)
show what an open connection under a removed or replaced key can still do (nothing: its
frames are dropped and counted); pairs of real nodes show that what a revoked peer sends stays
pending at it, not lost, and is stored once at each end when its key is back, and that a
rotated key is heard once the other side reloads. Every wait is bounded; no timing threshold.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from meshpost import keys
from meshpost.cluster import LocalCluster
from meshpost.control import ControlClient, StatusRequest
from meshpost.control.messages import ErrorReply

from . import control_peer as cp
from . import wire_peer as wp
from .conftest import wait_until
from .test_secure_conformance import ANSWER_S, Flow, SecureMesh, silent, try_hello_and_batch

pytestmark = pytest.mark.integration

CLI_TIMEOUT_S = 90
#: Every wait for a delivery after a change: a revoked peer's link must first find the
#: connection silent, redial, and be refused, then redial again once its key is back (each
#: within seconds); generous for a loaded 2-core machine, never a threshold.
DELIVERY_S = 90.0


def meshpost(*args: str, timeout_s: float = CLI_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meshpost", *args], capture_output=True,
                          text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)


def reload(data: Path, name: str) -> subprocess.CompletedProcess[str]:
    return meshpost("keys", "reload", "--node", name, "--data", str(data))


def changes(done: subprocess.CompletedProcess[str]) -> dict[str, str]:
    """`keys reload`'s three lines: {"added": "C", "removed": "-", "changed": "-"}."""
    assert done.returncode == 0, done
    lines = dict(line.split(": ", 1) for line in done.stdout.splitlines())
    assert set(lines) == {"added", "removed", "changed"}, done.stdout
    return lines


def drop_line(data: Path, name: str) -> str:
    """Remove `name`'s line from the authorized_keys in `data`; return the line."""
    path = data / keys.AUTHORIZED_KEYS
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    (mine,) = [line for line in lines if line.split()[:1] == [name]]
    path.write_text("".join(line for line in lines if line is not mine), encoding="utf-8")
    return mine.strip()


def add_line(data: Path, line: str) -> None:
    with (data / keys.AUTHORIZED_KEYS).open("a", encoding="utf-8") as f:
        f.write(line + "\n")


# -- independent dialers at one node N -------------------------------------------------------

@pytest.fixture
def mesh(short_tmp: Path) -> Iterator[SecureMesh]:
    m = SecureMesh(short_tmp, ["P", "Q"])
    m.start()
    try:
        yield m
    finally:
        m.close()


def test_a_key_added_while_n_runs_is_admitted_after_keys_reload_and_cuts_nobody(
    mesh: SecureMesh,
) -> None:
    p = Flow(mesh, "P")
    p.check("before")
    r_key = wp.KeyPair.new()
    mesh.keys["R"] = r_key
    early = mesh.dialer("R", reconnect=False)
    try_hello_and_batch(early, "R before N lists it")
    assert early.handshake_result(ANSWER_S) == wp.HandshakeResult("auth", 400)
    early.close()

    mesh.authorize("R", r_key.public)
    assert changes(reload(mesh.data, "N")) == {"added": "R", "removed": "-", "changed": "-"}
    r = Flow(mesh, "R")  # a name not in N's config: its key proves it (2.3)
    r.check("R after the reload")
    p.check("after the reload")  # P's session, on its connection of before, goes on
    r.stored_once()
    p.stored_once()
    assert "authorized_keys reloaded: added R" in mesh.log()
    # The same file again changes nothing.
    assert changes(reload(mesh.data, "N")) == {"added": "-", "removed": "-", "changed": "-"}
    p.check("after a reload that changed nothing")


def test_a_removed_key_s_open_connection_delivers_nothing_more_and_new_ones_are_refused(
    mesh: SecureMesh,
) -> None:
    p = Flow(mesh, "P")
    q = Flow(mesh, "Q")
    p.check("before")
    q.check("before")
    drop_line(mesh.data, "P")
    assert changes(reload(mesh.data, "N")) == {"added": "-", "removed": "P", "changed": "-"}

    # P's connection, admitted before, stays open (ZeroMQ cannot close one peer's), but
    # nothing on it is taken any more: a message, a Ping, a Hello.
    (env,) = p.peer.envelopes("N", ["P after its key was removed"], first_seq=p.seq + 1)
    p.peer.batch([env])
    p.peer.send("ping", wp.wall_ns())
    p.peer.hello()
    assert silent(p.peer)
    wait_until(lambda: mesh.stats()["frames_from_revoked"] >= 3, ANSWER_S,
               "N counting P's three frames as from a revoked connection")
    assert mesh.stored_from("P") == p.bodies
    fresh = mesh.dialer("P", reconnect=False)
    try_hello_and_batch(fresh, "P on a new connection")
    assert fresh.handshake_result(ANSWER_S) == wp.HandshakeResult("auth", 400)
    fresh.close()
    q.check("after P's key was removed")  # a reload never cuts a peer whose key stayed
    q.stored_once()
    stats = mesh.stats()
    assert stats["violations"] == 0 and stats["denied_connections"] >= 1
    assert "no longer in authorized_keys (keys reload)" in mesh.log()
    assert mesh.stored_from("P") == p.bodies


def test_a_connection_admitted_under_a_key_since_replaced_is_not_taken_as_its_name(
    mesh: SecureMesh,
) -> None:
    """A thief holding P's key K is connected as P; P's line gets its new key K2 and N
    reloads: what comes on the thief's connection is not P's any more, P with K2 is."""
    thief = Flow(mesh, "P")
    thief.check("the thief, while K is P's")
    new_key = wp.KeyPair.new()
    path = mesh.data / keys.AUTHORIZED_KEYS
    path.write_text(path.read_text().replace(mesh.keys["P"].public.decode(),
                                             new_key.public.decode()))
    assert changes(reload(mesh.data, "N")) == {"added": "-", "removed": "-", "changed": "P"}
    before = mesh.stats()["frames_from_revoked"]
    (env,) = thief.peer.envelopes("N", ["the thief after the change"], first_seq=thief.seq + 1)
    thief.peer.batch([env])
    assert silent(thief.peer)
    wait_until(lambda: mesh.stats()["frames_from_revoked"] > before, ANSWER_S,
               "N counting the thief's frame")
    p = Flow(mesh, "P", mesh.dialer("P", key=new_key))  # a session of its own
    p.check("P with its new key")
    assert sorted(mesh.stored_from("P")) == sorted([*thief.bodies, *p.bodies])
    old = mesh.dialer("P", reconnect=False)
    try_hello_and_batch(old, "K on a new connection")
    assert old.handshake_result(ANSWER_S) == wp.HandshakeResult("auth", 400)
    old.close()


def test_a_key_given_to_another_name_speaks_for_neither_on_its_old_connection(
    mesh: SecureMesh,
) -> None:
    """P's key K becomes R's (P's line replaced by `R K`): the connection K opened as P is
    not P's any more (P's line is gone) nor R's (its Hello said P, its session is P's)."""
    p = Flow(mesh, "P")
    p.check("P, while K is P's")
    path = mesh.data / keys.AUTHORIZED_KEYS
    path.write_text(path.read_text().replace("P ", "R ", 1))
    assert changes(reload(mesh.data, "N")) == {"added": "R", "removed": "P", "changed": "-"}
    before = mesh.stats()["frames_from_revoked"]
    (env,) = p.peer.envelopes("N", ["on P's session after K became R's"], first_seq=p.seq + 1)
    p.peer.batch([env])
    assert silent(p.peer)
    wait_until(lambda: mesh.stats()["frames_from_revoked"] > before, ANSWER_S,
               "N counting the frame of K's connection as P")
    assert mesh.stored_from("P") == p.bodies
    mesh.keys["R"] = mesh.keys["P"]
    r = Flow(mesh, "R")  # K on a new connection is R now
    r.check("R with K")
    r.stored_once()


def test_a_bad_authorized_keys_is_refused_with_exit_2_naming_the_line_and_the_keys_stay(
    mesh: SecureMesh,
) -> None:
    p = Flow(mesh, "P")
    path = mesh.data / keys.AUTHORIZED_KEYS
    good = path.read_text()
    bad_files = {
        "a key that is not Z85": (good + "R " + "~" * 40 + "\n", "expected 'NAME Z85KEY'"),
        "a name with two keys": (good + wp.authorized_line("P", wp.KeyPair.new().public) + "\n",
                                 "P has another key on line"),
        "a key under two names": (good + wp.authorized_line("R", mesh.keys["Q"].public) + "\n",
                                  "this key is Q's on line"),
    }
    for label, (text, words) in bad_files.items():
        path.write_text(text)
        done = reload(mesh.data, "N")
        assert done.returncode == 2, (label, done)
        assert f"{path}:" in done.stderr and words in done.stderr, (label, done.stderr)
        p.check(f"after {label}")  # the keys in force stay: P still flows
    assert "authorized_keys not reloaded (the 2 keys in force stay)" in mesh.log()
    path.unlink()
    done = reload(mesh.data, "N")
    assert done.returncode == 2 and "secure mode needs" in done.stderr, done
    q = Flow(mesh, "Q")  # a new connection is still admitted by the list in force
    q.check("after the file went")
    p.stored_once()


def test_the_reload_keys_reply_carries_the_documented_fields(mesh: SecureMesh) -> None:
    """docs/protocol.md 14.4/14.5e, by an independent control client."""
    drop_line(mesh.data, "Q")
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        client = cp.ControlPeer(ctx, mesh.data)
        reply = client.call("reload-keys", ANSWER_S)
        assert set(reply) == {"type", "id", "added", "removed", "changed"}, reply
        assert (reply["type"], reply["added"], reply["removed"], reply["changed"]) == (
            "keys-reloaded", [], ["Q"], [])
        (mesh.data / keys.AUTHORIZED_KEYS).write_text("P " + "~" * 40 + "\n")
        error = client.call("reload-keys", ANSWER_S)
        assert (error["type"], error["kind"], error["exit_code"]) == ("error", "config", 2)
        assert "authorized_keys:1: expected 'NAME Z85KEY'" in error["message"]
        client.close()
    finally:
        ctx.destroy(linger=0)


# -- pairs of real nodes ---------------------------------------------------------------------

@pytest.fixture
def pair(short_tmp: Path) -> Iterator[LocalCluster]:
    # Retransmissions capped at 1 s: a message waiting for a peer to be heard again goes
    # soon after it is (fewer seconds of test, nothing timed).
    cluster = LocalCluster.create(short_tmp, 2, transport="tcp", extra_args=["--secure"],
                                  options={"retransmit_max_s": 1.0})
    keys.generate_mesh_keys({n: cluster.data_dir(n) for n in cluster.names})
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


def send(cluster: LocalCluster, frm: str, to: str, body: str,
         timeout_s: float) -> subprocess.CompletedProcess[str]:
    return meshpost("send", "--node", frm, "--data", str(cluster.data_dir(frm)), "--to", to,
                    "--timeout", str(timeout_s), body, timeout_s=timeout_s + CLI_TIMEOUT_S)


def delivered(cluster: LocalCluster, frm: str, to: str, body: str) -> None:
    done = send(cluster, frm, to, body, DELIVERY_S)
    assert done.returncode == 0, done


def status(cluster: LocalCluster, name: str) -> dict[str, Any]:
    with ControlClient(cluster.data_dir(name), name=name) as client:
        reply = client.request(StatusRequest(), timeout_s=ANSWER_S)
    assert not isinstance(reply, ErrorReply), reply
    return dict(reply.status)


def history(cluster: LocalCluster, name: str) -> list[dict[str, Any]]:
    done = meshpost("history", "--node", name, "--data", str(cluster.data_dir(name)), "--json")
    assert done.returncode == 0, done.stderr
    rows: list[dict[str, Any]] = json.loads(done.stdout)
    return rows


def rows_of(cluster: LocalCluster, name: str, body: str) -> list[dict[str, Any]]:
    return [r for r in history(cluster, name) if r["body"] == body]


def peer_of(cluster: LocalCluster, name: str, peer: str) -> dict[str, Any]:
    done = meshpost("peers", "--node", name, "--data", str(cluster.data_dir(name)), "--json")
    assert done.returncode == 0, done.stderr
    (found,) = [p for p in json.loads(done.stdout)["peers"] if p["name"] == peer]
    return dict(found)


def test_a_revoked_peer_s_messages_stay_pending_and_arrive_once_when_its_key_is_back(
    pair: LocalCluster,
) -> None:
    a = pair.data_dir("A")
    delivered(pair, "B", "A", "before")
    delivered(pair, "A", "B", "before, to B")
    line = drop_line(a, "B")
    assert changes(reload(a, "A")) == {"added": "-", "removed": "B", "changed": "-"}

    # B's connection to A was admitted before and stays open: what B sends on it is dropped
    # and counted at A, and stays pending at B (exit 3: no receipt in time, still queued).
    during = send(pair, "B", "A", "while revoked", 3.0)
    assert during.returncode == 3, during
    wait_until(lambda: status(pair, "A")["stats"]["frames_from_revoked"] >= 1, ANSWER_S,
               "A counting what B sent on its old connection")
    assert rows_of(pair, "A", "while revoked") == []
    assert [r["state"] for r in rows_of(pair, "B", "while revoked")] == ["pending"]
    # A no longer dials B: what A queues for B stays queued, and A's peers say why.
    queued = send(pair, "A", "B", "to B while revoked", 3.0)
    assert queued.returncode == 3, queued
    assert "not dialled" in (peer_of(pair, "A", "B")["refusal"] or "")
    # B's new connections are refused once its link redials (ZAP 400, counted at A).
    wait_until(lambda: status(pair, "A")["stats"]["denied_connections"] >= 1, DELIVERY_S,
               "A refusing a new connection of B's")

    add_line(a, line)
    assert changes(reload(a, "A")) == {"added": "B", "removed": "-", "changed": "-"}
    wait_until(lambda: status(pair, "B")["pending"] == 0 and status(pair, "A")["pending"] == 0,
               DELIVERY_S, "both outboxes empty once B's key is back")
    for name, body, direction in (("A", "while revoked", "in"), ("B", "while revoked", "out"),
                                  ("A", "to B while revoked", "out"),
                                  ("B", "to B while revoked", "in")):
        rows = rows_of(pair, name, body)
        assert [r["direction"] for r in rows] == [direction], (name, body, rows)
        assert rows[0]["state"] in ("delivered", "received"), rows
    delivered(pair, "B", "A", "after")
    assert pair.nodes["A"].alive() and pair.nodes["B"].alive()


def test_a_peer_that_rotated_its_key_is_heard_again_once_the_other_side_reloads(
    pair: LocalCluster,
) -> None:
    a, b = pair.data_dir("A"), pair.data_dir("B")
    delivered(pair, "B", "A", "with B's first key")
    pair.stop(["B"])
    made = meshpost("keys", "generate", "--node", "B", "--data", str(b), "--force")
    assert made.returncode == 0, made
    new_line = made.stdout.strip()
    drop_line(a, "B")
    add_line(a, new_line)
    pair.start(["B"])
    # Until A reloads, A holds B's old key both ways: B's new key is denied at A's ROUTER,
    # and A's link to B expects B's old server key.
    early = send(pair, "B", "A", "before A reloads", 3.0)
    assert early.returncode == 3, early
    assert changes(reload(a, "A")) == {"added": "-", "removed": "-", "changed": "B"}
    delivered(pair, "B", "A", "with B's new key")
    delivered(pair, "A", "B", "to B's new key")
    wait_until(lambda: status(pair, "B")["pending"] == 0, DELIVERY_S,
               "B's message from before the reload delivered")
    assert [r["direction"] for r in rows_of(pair, "A", "before A reloads")] == ["in"]
    assert [r["state"] for r in rows_of(pair, "B", "before A reloads")] == ["delivered"]


def test_sighup_reloads_authorized_keys_as_the_command_does(pair: LocalCluster) -> None:
    a = pair.data_dir("A")
    node = pair.nodes["A"]
    delivered(pair, "A", "B", "before")
    line = drop_line(a, "B")
    os.kill(node.pid, signal.SIGHUP)
    wait_until(lambda: "authorized_keys reloaded: removed B" in node.log_tail(200),
               ANSWER_S, "A logging the reload SIGHUP asked for")
    assert "not dialled" in (peer_of(pair, "A", "B")["refusal"] or "")
    queued = send(pair, "A", "B", "while B is removed", 3.0)
    assert queued.returncode == 3, queued
    # A bad file: logged, the keys in force kept, the node still running.
    (a / keys.AUTHORIZED_KEYS).write_text("B " + "~" * 40 + "\n")
    os.kill(node.pid, signal.SIGHUP)
    wait_until(lambda: "authorized_keys not reloaded" in node.log_tail(200), ANSWER_S,
               "A logging why it kept its keys")
    assert node.alive()
    (a / keys.AUTHORIZED_KEYS).write_text(line + "\n")
    os.kill(node.pid, signal.SIGHUP)
    wait_until(lambda: "authorized_keys reloaded: added B" in node.log_tail(200), ANSWER_S,
               "A logging the second reload")
    wait_until(lambda: status(pair, "A")["pending"] == 0, DELIVERY_S,
               "A's queued message delivered once B is listed again")
    assert [r["direction"] for r in rows_of(pair, "B", "while B is removed")] == ["in"]
    delivered(pair, "B", "A", "after")


def test_hosted_secure_nodes_each_reload_their_own_keys(short_tmp: Path) -> None:
    """Three nodes, A and B in one host process: removing C's line at A cuts C at A only;
    a restart of A inside its host applies A's files as they are then (C's rotated key)."""
    cluster = LocalCluster.create(short_tmp, 3, transport="tcp", extra_args=["--secure"],
                                  options={"retransmit_max_s": 1.0}, per_process=2)
    keys.generate_mesh_keys({n: cluster.data_dir(n) for n in cluster.names})
    cluster.start()
    try:
        delivered(cluster, "C", "A", "before")
        delivered(cluster, "C", "B", "before, to B")
        line = drop_line(cluster.data_dir("A"), "C")
        assert changes(reload(cluster.data_dir("A"), "A")) == {
            "added": "-", "removed": "C", "changed": "-"}
        cut = send(cluster, "C", "A", "to A while removed", 3.0)
        assert cut.returncode == 3, cut
        delivered(cluster, "C", "B", "to B meanwhile")  # B's list is its own
        assert status(cluster, "B")["stats"]["frames_from_revoked"] == 0
        add_line(cluster.data_dir("A"), line)
        assert changes(reload(cluster.data_dir("A"), "A"))["added"] == "C"
        wait_until(lambda: status(cluster, "C")["pending"] == 0, DELIVERY_S,
                   "C's message to A delivered once A lists C again")
        assert [r["direction"] for r in rows_of(cluster, "A", "to A while removed")] == ["in"]
        # A restart inside the host reads the files again, as a node process's start does
        # (it used the keys the host read when it started): C rotates its key, A's line is
        # replaced without a reload, and A restarted in its host hears C's new key.
        cluster.stop(["C"])
        made = meshpost("keys", "generate", "--node", "C", "--data",
                        str(cluster.data_dir("C")), "--force")
        assert made.returncode == 0, made
        drop_line(cluster.data_dir("A"), "C")
        add_line(cluster.data_dir("A"), made.stdout.strip())
        cluster.start(["C"])
        cluster.restart("A")
        delivered(cluster, "C", "A", "C's new key, to A restarted in its host")
    finally:
        cluster.stop()

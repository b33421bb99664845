"""docs/protocol.md is precise enough for an independent implementation: `wire_peer`, written
from the document alone (no meshpost import), dials real `meshpost node` processes and is
dialled by them on ipc://, and every answer is checked against the document's words.

The harness (starting nodes, reading their stores through `meshpost history --json`) uses
meshpost's CLI and cluster helpers; the peer never does.
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zmq
import zmq.utils.monitor

from meshpost.cluster import write_mesh_config
from meshpost.processes import NodeProcess

from . import wire_peer as wp
from .conftest import wait_until

pytestmark = pytest.mark.integration

CLI_TIMEOUT_S = 60
#: Every wait for a node's answer: generous for a loaded 2-core machine, never a threshold.
ANSWER_S = 20.0
#: The node's `max_message_bytes` in these tests: small, so a too-large body is cheap.
MAX_MESSAGE_BYTES = 1024
DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"


def meshpost(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meshpost", *args], capture_output=True,
                          text=True, timeout=CLI_TIMEOUT_S, stdin=subprocess.DEVNULL)


class Mesh:
    """One real node N whose config lists the independent peers by name and ipc endpoint."""

    def __init__(self, root: Path, peers: list[str], extra_args: tuple[str, ...] = ()) -> None:
        self.root = root
        self.endpoints = {name: f"ipc://{root}/{name}.sock" for name in ["N", *peers]}
        self.config = root / "mesh.toml"
        write_mesh_config(self.config, self.endpoints,
                          options={"max_message_bytes": MAX_MESSAGE_BYTES},
                          peers={"N": peers, **{p: ["N"] for p in peers}})
        self.data = root / "N"
        self.node = NodeProcess("N", self.config, self.data, root / "N.log", extra_args)
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()

    def start(self) -> None:
        self.node.start()
        try:
            self.node.wait_ready()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        self.node.stop()
        self.ctx.destroy(linger=0)

    def dialer(self, name: str, node_id: str | None = None,
               routing_id: bytes | None = None) -> wp.Dialer:
        return wp.Dialer(self.ctx, name, self.endpoints["N"], node_id, routing_id)

    def history(self) -> list[dict[str, Any]]:
        done = meshpost("history", "--node", "N", "--data", str(self.data), "--json")
        assert done.returncode == 0, done.stderr
        rows: list[dict[str, Any]] = json.loads(done.stdout)
        return rows

    def node_id(self) -> str:
        done = meshpost("peers", "--node", "N", "--data", str(self.data), "--json")
        assert done.returncode == 0, done.stderr
        return str(json.loads(done.stdout)["status"]["node_id"])


@pytest.fixture
def mesh(short_tmp: Path) -> Iterator[Mesh]:
    m = Mesh(short_tmp, ["P", "Q", "R"])
    m.start()
    try:
        yield m
    finally:
        m.stop()


def expect(peer: wp.Dialer, tag: str, timeout_s: float = ANSWER_S) -> wp.Frame:
    frame = peer.recv(timeout_s)
    assert frame.tag == tag, f"expected {tag}, got {frame}"
    return frame


def history_fields() -> list[str]:
    """Section 15's table of `meshpost history --json` fields, in the document's order."""
    text = DOC.read_text()
    table = text[text.index("## 15. "):text.index("## 16. ")]
    return re.findall(r"^\| `([a-z_]+)` \|", table, flags=re.M)


def check_welcome(welcome: wp.Frame, name: str) -> None:
    """Section 4.2, field by field."""
    assert welcome["version"] == wp.PROTOCOL_VERSION
    assert re.fullmatch(r"[0-9a-f]{16}", welcome["node_id"]), welcome  # 5.2
    assert welcome["name"] == name
    assert welcome["sync"] in ("full", "normal")
    assert isinstance(welcome["resume"], bytes) and len(welcome["resume"]) == 8


# -- the document's own examples -------------------------------------------------------------

def doc_dumps() -> list[tuple[str, int, bytes]]:
    """Each hex dump of section 4: (its caption's first word, its stated size, its bytes)."""
    text = DOC.read_text()
    section4 = text[text.index("## 4. The frames"):text.index("## 5. Identifiers")]
    dumps = []
    for block in re.findall(r"```\n(.*?)```", section4, flags=re.S):
        size = re.search(r"-- (\d+) bytes", block)
        if size is None:
            continue
        data = bytearray()
        for line in block.splitlines():
            row = re.match(r"[0-9a-f]{8}  ((?:[0-9a-f]{2} {1,2})+)", line)
            if row:
                data += bytes.fromhex(row.group(1))
        dumps.append((block.split("(")[0].strip(), int(size.group(1)), bytes(data)))
    return dumps


def test_the_documents_hex_dumps_decode_as_it_says() -> None:
    """Every dump of section 4 is as long as its caption says and reads, with the document's
    field table, as the values its caption shows."""
    dumps = {name: (size, data) for name, size, data in doc_dumps()}
    assert set(dumps) == {"Hello", "Welcome", "Refuse", "Batch", "ReceiptFrame", "Reject",
                          "Ping", "Pong", "Bye", "Close"}
    for size, data in dumps.values():
        assert len(data) == size
    t = 1700000000123456789
    hlc = wp.Hlc.pack(t // 1_000_000, 0)
    assert hlc == 111411200008060928 == 0x018BCFE5687B0000  # section 4's timeline
    hello = wp.decode(dumps["Hello"][1])
    assert hello.fields == {"version": 1, "node_id": "9c41e07a5b2d3f18", "name": "A",
                            "sent_at_ns": t, "hlc": hlc, "resume": b""}
    assert wp.encode("hello", *hello.fields.values()) == dumps["Hello"][1]
    welcome = wp.decode(dumps["Welcome"][1])
    assert welcome["resume"] == b"_\x1c\x9a>\x07\xd2\xb6H" and welcome["sync"] == "full"
    batch = wp.decode(dumps["Batch"][1])
    (env,) = batch["messages"]
    assert env == wp.Envelope("018bcfe5687b5a17c0ffee000001", 1, "A", "B", "hi", t, hlc)
    assert wp.encode("batch", batch["tx_at_ns"], [env.wire()[:7]]) == dumps["Batch"][1]
    # Today's envelope is 8 long with a nil header: one byte more (4.4).
    assert len(wp.encode("batch", batch["tx_at_ns"], [env.wire()])) == dumps["Batch"][0] + 1
    receipt = wp.decode(dumps["ReceiptFrame"][1])
    assert receipt["ranges"] == [[1, 1]] and receipt["echo_tx_at_ns"] == batch["tx_at_ns"]
    assert wp.encode("receipt", [[1, 3], [7, 7]])[len(b"\x92\xa7receipt"):] == bytes.fromhex(
        "92920103920707")
    assert wp.decode(dumps["Reject"][1]).fields["code"] == "too-large"
    assert wp.decode(dumps["Refuse"][1]).fields == {"code": "hello-required",
                                                    "detail": "send Hello first"}
    pong = wp.decode(dumps["Pong"][1])
    assert pong["echo_sent_at_ns"] == wp.decode(dumps["Ping"][1])["sent_at_ns"] == t
    assert pong["pending"] == 0
    assert wp.decode(dumps["Bye"][1]).fields == {"reason": "shutting down"}
    assert wp.decode(dumps["Close"][1]).fields == {}
    for name, (_, data) in dumps.items():
        frame = wp.decode(data)
        assert msgspec.msgpack.encode([frame.tag, *msgspec.msgpack.decode(data)[1:]]) == data, name


# -- 1. the independent peer dials a node ----------------------------------------------------

def test_an_independent_dialer_handshakes_sends_a_batch_and_is_stored_once(mesh: Mesh) -> None:
    p = mesh.dialer("P")
    welcome = p.handshake(ANSWER_S)
    check_welcome(welcome, "N")
    assert welcome["node_id"] == mesh.node_id()

    # Ping -> Pong (4.7, 4.8, 7.5): the echo, one listener reading for t2 and t3, nothing
    # pending on a connection that sent no batch.
    sent = wp.wall_ns()
    p.send("ping", sent)
    pong = expect(p, "pong")
    assert pong["echo_sent_at_ns"] == sent
    assert pong["received_at_ns"] == pong["replied_at_ns"]
    assert pong["pending"] == 0

    envelopes = p.envelopes("N", ["uno", "dos", "tres"])
    tx = p.batch(envelopes)
    receipt = expect(p, "receipt")
    assert receipt["ranges"] == [[1, 3]]
    assert receipt["echo_tx_at_ns"] == tx
    # One clock (the listener's), read in this order: arrival, before BEGIN, after COMMIT.
    assert receipt["received_at_ns"] <= receipt["stored_at_ns"] <= receipt["replied_at_ns"]
    assert receipt["sync"] == welcome["sync"] == "full"
    # 9.2: the listener observed the batch's HLCs before storing, and the receipt is a new tick.
    assert receipt["hlc"] > max(e.hlc for e in envelopes)
    first = receipt

    # A retransmission (4.4: the same envelopes, a new tx_at_ns): the same seqs receipted from
    # the stored rows (7.2), nothing stored again.
    tx2 = p.batch(envelopes, tx_at_ns=tx + 1)
    again = expect(p, "receipt")
    assert again["ranges"] == [[1, 3]] and again["echo_tx_at_ns"] == tx2
    # A batch mixing a retransmitted seq with new ones, and a gap (5.4: gaps are not checked):
    # the ranges are maximal and sorted (4.5).
    more = p.envelopes("N", ["cuatro", "seis"], first_seq=4)
    more[1] = wp.Envelope(more[1].id, 6, "P", "N", "seis", more[1].sent_at_ns, more[1].hlc)
    p.batch([envelopes[2], *more])
    assert expect(p, "receipt")["ranges"] == [[3, 4], [6, 6]]

    p.send("ping", wp.wall_ns())
    assert expect(p, "pong")["pending"] == 0  # every batch answered (4.8)

    history = mesh.history()
    assert all(list(row) == history_fields() for row in history)  # exactly these (15)
    rows = {r["id"]: r for r in history if r["direction"] == "in"}
    assert len(rows) == 5
    for env in [*envelopes, *more]:
        row = rows[env.id]
        assert (row["from"], row["to"], row["body"], row["state"]) == ("P", "N", env.body,
                                                                        "received")
        assert row["sent_at_ns"] == env.sent_at_ns and row["hlc"] == env.hlc  # sender's
        assert row["kind"] is None and row["ref"] is None
    for env in envelopes:  # 16: an `in` row's stored_at_ns is the one its receipt said
        assert rows[env.id]["stored_at_ns"] == first["stored_at_ns"]
    p.close()


def test_a_bye_or_close_ends_the_session_and_a_new_hello_opens_one(mesh: Mesh) -> None:
    """4.9 and 4.10: after Bye or Close a Ping gets hello-required; Hello opens a session."""
    p = mesh.dialer("P")
    p.handshake(ANSWER_S)
    for last in (("bye", "shutting down"), ("close",)):
        p.send(*last)
        p.send("ping", wp.wall_ns())
        refuse = expect(p, "refuse")  # nothing answers the Bye or Close themselves
        assert refuse["code"] == "hello-required"
        welcome = p.handshake(ANSWER_S)
        p.send("ping", wp.wall_ns())
        assert expect(p, "pong")["pending"] == 0
        assert welcome["name"] == "N"
    p.close()


# -- 2. a node dials the independent peer ----------------------------------------------------

def serve(peer: wp.ListenerPeer, sender: subprocess.Popen[str], on_batch: Any,
          ) -> tuple[str, str]:
    """Answer the node as section 11 says until `sender` (a `meshpost send`) exits: Welcome to
    Hello (a repeated Hello keeps its session's token), Pong to Ping, `on_batch` to Batch."""
    deadline = time.monotonic() + CLI_TIMEOUT_S
    while sender.poll() is None and time.monotonic() < deadline:
        try:
            rid, frame, read_at = peer.recv(0.2)
        except TimeoutError:
            continue
        if frame.tag == "hello":
            token = peer.sessions.get(rid)
            assert frame["resume"] in (b"", token)
            assert peer.welcome(rid) == token or token is None
        elif frame.tag == "ping":
            peer.pong(rid, frame, read_at)
        elif frame.tag == "batch":
            on_batch(rid, frame, read_at)
    return sender.communicate(timeout=CLI_TIMEOUT_S)


def send_to_p(m: Mesh, body: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "meshpost", "send", "--node", "N", "--data", str(m.data),
         "--to", "P", "--timeout", str(CLI_TIMEOUT_S - 10), body],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)


def test_a_node_dials_an_independent_listener_and_records_its_answers(short_tmp: Path) -> None:
    m = Mesh(short_tmp, ["P"])
    peer = wp.ListenerPeer(m.ctx, "P", m.endpoints["P"], sync="normal")
    m.start()
    try:
        # N has one peer, so it dials it at start (2.1) and says Hello first (6.2). Its
        # DEALER sets no routing id: the one we see was made by our ROUTER (2.1).
        rid, hello, _ = peer.recv(ANSWER_S)
        assert hello.tag == "hello" and rid[:1] == b"\x00" and len(rid) == 5
        assert hello["version"] == 1 and hello["name"] == "N" and hello["resume"] == b""
        assert hello["node_id"] == m.node_id()
        peer.welcome(rid)

        # A message, receipted by this peer as 7.2 says once it has "committed" it.
        got: list[wp.Envelope] = []
        said: dict[str, Any] = {}

        def receipt(rid: bytes, frame: wp.Frame, read_at: int) -> None:
            got.extend(frame["messages"])
            answer = peer.receipt(rid, frame, read_at, [e.seq for e in frame["messages"]],
                                  stored_at_ns=wp.wall_ns())
            if not said:  # the receipt that settles it; a resend's settles nothing more (7.3)
                said.update(answer)

        sender = send_to_p(m, "hola P")
        out, err = serve(peer, sender, receipt)
        assert sender.returncode == 0 and "delivered to P" in out, (out, err)
        (env,) = {e.id: e for e in got}.values()  # a retransmission carries the same id
        assert (env.seq, env.sender, env.recipient, env.body) == (1, "N", "P", "hola P")
        assert re.fullmatch(r"[0-9a-f]{28}", env.id)  # 5.3
        assert env.header is None  # a direct message (4.4)

        # A message this peer rejects (4.6): never resent, recorded as rejected (7.3).
        def reject(rid: bytes, frame: wp.Frame, read_at: int) -> None:
            peer.send(rid, "reject", [e.seq for e in frame["messages"]], "too-large",
                      "bigger than P takes")

        sender = send_to_p(m, "adios P")
        out, err = serve(peer, sender, reject)
        assert sender.returncode == 5, (out, err)  # 14.6: rejected
        assert "(too-large): bigger than P takes" in err

        rows = {r["body"]: r for r in m.history() if r["direction"] == "out"}
        row = rows["hola P"]
        assert (row["id"], row["to"], row["state"]) == (env.id, "P", "delivered")
        assert row["sent_at_ns"] == env.sent_at_ns and row["hlc"] == env.hlc
        # 15: the receipt's fields as the sender recorded them.
        assert row["delivered_at_ns"] == said["stored_at_ns"]
        assert row["receipt_received_at_ns"] == said["received_at_ns"]
        assert row["receipt_sync"] == "normal"
        assert rows["adios P"]["state"] == "rejected"
        assert rows["adios P"]["delivered_at_ns"] is None
    finally:
        m.stop()
        peer.close()


def test_a_welcome_naming_another_node_refuses_the_link_until_the_next_hello(
    short_tmp: Path,
) -> None:
    """4.2: the dialer checks a Welcome's name; another name is taken as Refuse(identity),
    the link is REFUSED, says why, and says Hello again (6.3: every 10 s)."""
    m = Mesh(short_tmp, ["P"])
    peer = wp.ListenerPeer(m.ctx, "P", m.endpoints["P"])
    m.start()
    try:
        rid, hello, _ = peer.recv(ANSWER_S)
        assert hello.tag == "hello"
        peer.send(rid, "welcome", 1, peer.node_id, "Q", wp.wall_ns(), 0, "full", b"12345678")

        def p_status() -> dict[str, Any]:
            done = meshpost("peers", "--node", "N", "--data", str(m.data), "--json")
            (p,) = [p for p in json.loads(done.stdout)["peers"] if p["name"] == "P"]
            return dict(p)

        wait_until(lambda: p_status()["state"] == "refused", ANSWER_S, "P refused")
        refused_seen = wp.wall_ns()
        assert p_status()["refusal"].startswith("identity: ")
        # The next Hello (REFUSED_RETRY_S later; Hellos sent before the refusal may still come).
        deadline = time.monotonic() + 60.0
        while hello["sent_at_ns"] < refused_seen:
            rid, hello, _ = peer.recv(max(0.1, deadline - time.monotonic()))
            assert hello.tag == "hello"
        peer.welcome(rid)
        wait_until(lambda: p_status()["state"] == "ready", ANSWER_S, "P ready")
    finally:
        m.stop()
        peer.close()


# -- 3. refusals and rejections --------------------------------------------------------------

def test_refusals_as_section_6_3_defines_them(mesh: Mesh) -> None:
    # A Batch or Ping before Hello: hello-required (6.2 step 4), with the documented detail.
    p = mesh.dialer("P")
    p.send("ping", wp.wall_ns())
    refuse = expect(p, "refuse")
    assert refuse.fields == {"code": "hello-required", "detail": "send Hello first"}
    p.batch(p.envelopes("N", ["too soon"]))
    assert expect(p, "refuse")["code"] == "hello-required"

    # Undecodable bytes, bytes after the value, an unknown tag, a short frame, a wrong type,
    # a listener-direction frame, an integer beyond signed 64 bits (1, 3, 8.1): malformed,
    # and the connection keeps working.
    p.handshake(ANSWER_S)
    bad = [
        b"\xc1",
        wp.encode("ping", wp.wall_ns()) + b"\x00",
        wp.encode("gossip", 1),
        wp.encode("ping"),
        wp.encode("ping", "now"),
        wp.encode("ping", 1.5),
        wp.encode("ping", True),
        wp.encode("pong", 1, 2, 3, 0),
        wp.encode("ping", 2**63),
        msgspec.msgpack.encode({"tag": "ping"}),
    ]
    for data in bad:
        p.send_raw(data)
        refuse = expect(p, "refuse")
        assert refuse["code"] == "malformed", (data, refuse)
    p.send("ping", wp.wall_ns(), "an extra trailing element")  # 3: ignored, not malformed
    assert expect(p, "pong")["pending"] == 0

    # P as another node id while P's session is live (6.2 check 6, no keys): identity.
    other = mesh.dialer("P")
    other.hello()
    assert expect(other, "refuse")["code"] == "identity"

    # A Hello of another version, whole or only its first two elements (6.2, lenient).
    v = mesh.dialer("Q")
    v.hello(version=2)
    assert expect(v, "refuse")["code"] == "version"
    v.send("hello", 2)
    assert expect(v, "refuse")["code"] == "version"
    v.send("hello", 1)  # version 1 but too short to be a Hello: malformed
    assert expect(v, "refuse")["code"] == "malformed"
    v.handshake(ANSWER_S)  # and the same connection is then welcomed

    # A name the node does not list (6.2 check 4), after the version (check 1).
    z = mesh.dialer("Z")
    z.hello(version=2)
    assert expect(z, "refuse")["code"] == "version"
    z.hello()
    refuse = expect(z, "refuse")
    assert refuse["code"] == "unknown-peer"
    # Bye and Close without a session change nothing and get no answer (11): the next answer
    # on the connection is the Ping's.
    z.send("bye", "shutting down")
    z.send("close")
    z.send("ping", 3)
    assert expect(z, "refuse")["code"] == "hello-required"
    for peer in (p, v, z, other):
        peer.close()


def test_rejections_as_section_8_2_defines_them(mesh: Mesh) -> None:
    r = mesh.dialer("R")
    r.handshake(ANSWER_S)
    good = r.envelopes("N", ["a", "b", "c"])
    e = good[0]

    def env(seq: int, **change: Any) -> wp.Envelope:
        fields = {"id": f"{e.id}-{seq}", "seq": seq, "sender": "R", "recipient": "N",
                  "body": f"body {seq}", "sent_at_ns": e.sent_at_ns, "hlc": e.hlc}
        return wp.Envelope(**{**fields, **change})

    # The body limit is UTF-8 bytes, not characters (8.2): 512 two-byte characters are 1024
    # bytes and pass, 513 are too large although shorter than the limit in characters.
    fits = env(1, body="é" * (MAX_MESSAGE_BYTES // 2))
    too_large = env(2, body="é" * (MAX_MESSAGE_BYTES // 2 + 1))
    wrong_recipient = env(3, recipient="P")
    wrong_sender = env(4, sender="P")
    empty = env(5, body="")
    long_id = env(6, id="x" * 65)
    max_id = env(7, id="y" * 64)
    repeated = [env(8, body="one"), env(8, body="two")]
    huge_hlc = env(9, hlc=2**63)
    tx = r.batch([fits, too_large, wrong_recipient, wrong_sender, empty, long_id, max_id,
                  *repeated, huge_hlc])
    answers = [expect(r, "reject"), expect(r, "reject"), expect(r, "reject")]
    # The repeated seqs first (8.2), then one Reject per code (7.2).
    assert answers[0].fields["seqs"] == [8] and answers[0]["code"] == "invalid"
    assert "seq 8 appears 2 times" in answers[0]["detail"]
    by_code = {a["code"]: sorted(a["seqs"]) for a in answers[1:]}
    assert by_code == {"invalid": [3, 4, 5, 6, 9], "too-large": [2]}
    receipt = expect(r, "receipt")
    assert receipt["ranges"] == [[1, 1], [7, 7]] and receipt["echo_tx_at_ns"] == tx

    # A wrong msgpack type in one envelope malforms the whole batch (8.2): nothing of it is
    # stored, not even its good envelope.
    lost = env(11, body="in a malformed batch")
    r.send("batch", wp.wall_ns(), [lost.wire(), [*env(12).wire()[:4], b"bin body",
                                                 *env(12).wire()[5:]]])
    assert expect(r, "refuse")["code"] == "malformed"

    # Same id, other content: a conflict, after the Receipt of the rest (7.2 step 4).
    conflict = env(10, id=fits.id, body="not what was stored")
    r.batch([conflict, good[1]])
    receipt = expect(r, "receipt")
    assert receipt["ranges"] == [[2, 2]]
    reject = expect(r, "reject")
    assert reject["seqs"] == [10] and reject["code"] == "conflict"

    rows = {row["id"]: row for row in mesh.history() if row["direction"] == "in"}
    assert set(rows) == {fits.id, max_id.id, good[1].id}
    assert rows[fits.id]["body"] == fits.body
    r.close()


def test_a_node_in_an_exclusive_pair_refuses_any_other_peer(short_tmp: Path) -> None:
    """6.2 check 3 (after the version, before the peer list): Refuse("exclusive")."""
    m = Mesh(short_tmp, ["P", "Q"], extra_args=("--exclusive", "Q"))
    m.start()
    try:
        p = m.dialer("P")
        p.hello()
        refuse = expect(p, "refuse")
        assert refuse["code"] == "exclusive" and "'Q'" in refuse["detail"]
        z = m.dialer("Z")  # not a peer at all: still exclusive, check 3 comes before 4
        z.hello()
        assert expect(z, "refuse")["code"] == "exclusive"
        q = m.dialer("Q")
        q.handshake(ANSWER_S)
        for peer in (p, z, q):
            peer.close()
    finally:
        m.stop()


# -- sessions: the resume token (sections 4.1, 4.2, 10, 11) ----------------------------------

def test_a_hello_with_a_sessions_token_continues_it_and_gets_its_answers(mesh: Mesh) -> None:
    """A second connection whose Hello carries the first's token (same name and node id)
    supersedes it: answers to the first are also sent to it, ahead of its next answer. One
    without the token is an independent session and gets none of them."""
    first = mesh.dialer("P")
    token = first.handshake(ANSWER_S)["resume"]
    second = mesh.dialer("P", node_id=first.node_id)
    second.resume = token
    assert second.handshake(ANSWER_S)["resume"] not in (b"", token)  # a new session's token
    third = mesh.dialer("P", node_id=first.node_id)
    third.handshake(ANSWER_S)

    tx = first.batch(first.envelopes("N", ["on the first connection"]))
    original = expect(first, "receipt")  # the original still goes to its own connection
    assert original["ranges"] == [[1, 1]] and original["echo_tx_at_ns"] == tx
    second.send("ping", 1)
    forwarded = expect(second, "receipt")
    assert forwarded.fields == original.fields
    assert expect(second, "pong")["echo_sent_at_ns"] == 1
    third.send("ping", 2)
    assert expect(third, "pong")["echo_sent_at_ns"] == 2  # nothing forwarded to it
    for peer in (first, second, third):
        peer.close()


# -- a bug found on the way --------------------------------------------------------------------

def test_a_routing_id_a_peer_chooses_cannot_end_the_node(mesh: Mesh) -> None:
    """2.1: the routing id only labels a connection. A stranger that names its connection as
    the ROUTER's next generated id must not stop the node for everyone else.

    libzmq 4.3.5 aborts the process (Assertion failed: ok, socket_base.cpp:2113) when its
    ROUTER generates a routing id (0x00 + a 32-bit counter) that a peer already chose for its
    own connection, and never checks. Found here, the counter starting at the same value in
    every node (glibc's unseeded rand()); the node now seeds it (transport/routing_ids.py,
    adversarial/test_routing_ids.py), and its log names connections by a keyed digest, so
    this harness, which aims at the id after the one the log names, misses: the node lives."""
    a = mesh.dialer("P")
    a.handshake(ANSWER_S)
    b = mesh.dialer("P", node_id=a.node_id)
    b.handshake(ANSWER_S)
    # What the log names b's connection by, taken as its routing id: the next one would go to
    # the next connection. (Until the labels were digests, this aimed true and the node died.)
    log = mesh.root / "N.log"
    wait_until(lambda: "said Hello as P" in log.read_text(), ANSWER_S, "the second session")
    found = re.findall(r"connection ([0-9a-f]{10}) said Hello as P", log.read_text())
    if not found:
        pytest.fail("the node's log no longer names the connection: the test needs another way")
    following = (int(found[-1], 16) + 1).to_bytes(5, "big")
    squatter = mesh.dialer("Z", routing_id=following)
    squatter.send("ping", 1)
    answer = expect(squatter, "refuse")  # the node has taken the squatter's connection
    if answer["code"] != "hello-required":
        pytest.fail(f"unexpected answer {answer}")
    ordinary = mesh.dialer("P", node_id=a.node_id)
    ordinary.hello()
    deadline = time.monotonic() + ANSWER_S
    while mesh.node.alive() and time.monotonic() < deadline:
        if ordinary.sock.poll(200):
            break
    assert mesh.node.alive(), f"the node died: {mesh.node.log_tail(3)}"
    assert expect(ordinary, "welcome")["name"] == "N"
    for peer in (a, b, squatter, ordinary):
        peer.close()


# -- the frame size limit (8.3) ---------------------------------------------------------------

def max_frame_bytes(max_message_bytes: int) -> int:
    """Section 8.3's formula, with the constants it names."""
    return max(max_message_bytes, 4 * 262144) + 2048 * 1024 + 4096


def batch_of_exactly(peer: wp.Dialer, size: int) -> tuple[bytes, int]:
    """A valid Batch frame of exactly `size` bytes, with as many envelopes as that takes."""
    body = "x" * (MAX_MESSAGE_BYTES - 24)
    count = size // len(wp.encode("batch", wp.wall_ns(), [peer.envelopes("N", [body])[0]
                                                           .wire()]))
    envs = peer.envelopes("N", [body] * count)
    tx = wp.wall_ns()
    deficit = size - len(wp.encode("batch", tx, [e.wire() for e in envs]))
    assert 0 <= deficit <= 24 * count
    for i, e in enumerate(envs):  # grow bodies (str16 headers: one byte per character)
        grow = min(24, deficit)
        envs[i] = dataclasses.replace(e, body=e.body + "y" * grow)
        deficit -= grow
    data = wp.encode("batch", tx, [e.wire() for e in envs])
    assert len(data) == size
    return data, count


def test_the_largest_frame_a_listener_takes_is_as_section_8_3_computes(mesh: Mesh) -> None:
    """A batch of exactly max_frame_bytes is taken, whatever its count (4.4); one byte more
    and ZeroMQ drops the connection before the node reads it (2.2 MAXMSGSIZE, 13), and the
    node goes on (a new connection needs a new Hello)."""
    limit = max_frame_bytes(MAX_MESSAGE_BYTES)
    assert limit == 3_149_824
    p = mesh.dialer("P")
    p.handshake(ANSWER_S)
    data, count = batch_of_exactly(p, limit)
    assert count > 2048  # more than a dialer puts in a batch: a listener takes it anyway
    p.send_raw(data)
    assert expect(p, "receipt")["ranges"] == [[1, count]]

    monitor = p.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    too_big, _ = batch_of_exactly(p, limit + 1)
    p.send_raw(too_big)
    assert monitor.poll(int(ANSWER_S * 1000)), "the node kept a connection that sent too much"
    event = zmq.utils.monitor.recv_monitor_message(monitor)
    assert event["event"] == zmq.EVENT_DISCONNECTED
    p.sock.disable_monitor()
    monitor.close(linger=0)
    p.send("ping", 1)  # ZeroMQ reconnected: a new connection, without a session
    assert expect(p, "refuse")["code"] == "hello-required"
    p.handshake(ANSWER_S)
    assert len([r for r in mesh.history() if r["direction"] == "in"]) == count
    p.close()

"""Secure mode as docs/protocol.md 2.3, README's "Secure mode" and `meshpost keys` say it:
`wire_peer`, written from those words alone (no meshpost import), holds CURVE keys, reads a
node's public key file, dials real `meshpost node --secure` processes and is dialled by them,
over tcp and ipc. Every refusal is checked on both ends (what the refused side sees on the
wire, what the node logs and counts) while a listed peer's link keeps flowing: no input from
a peer may cost another message, and a name a peer chooses is never proof of who it is.

The harness (keys made with `meshpost keys`, nodes started, stores and counters read through
meshpost's CLI and control socket) uses meshpost; the peer never does.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from meshpost.cluster import free_tcp_ports, write_mesh_config
from meshpost.control import ControlClient, StatusRequest
from meshpost.control.messages import ErrorReply
from meshpost.processes import NodeProcess

from . import wire_peer as wp
from .conftest import wait_until

pytestmark = pytest.mark.integration

CLI_TIMEOUT_S = 60
#: Every wait for an answer or a count: generous for a loaded 2-core machine, never a threshold.
ANSWER_S = 20.0
#: How long a refused connection is watched for a frame it must never get. A wait that ends
#: without one proves nothing by itself: the node's counters (no violation, nothing stored)
#: and the refused socket's own handshake event are the checks; this only gives a frame that
#: would wrongly come the time to show up.
SILENCE_S = 1.0


def meshpost(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meshpost", *args], capture_output=True,
                          text=True, timeout=CLI_TIMEOUT_S, stdin=subprocess.DEVNULL)


class SecureMesh:
    """One real node N (`--secure` unless `secure=False`) listing independent peers, with its
    keys made by `meshpost keys generate` and each peer's line appended to its
    authorized_keys as README says."""

    def __init__(self, root: Path, peers: list[str], *, transport: str = "ipc",
                 secure: bool = True) -> None:
        self.root = root
        self.secure = secure
        names = ["N", *peers]
        ports = iter(free_tcp_ports(len(names)))
        self.endpoints = {
            name: (f"ipc://{root}/{name}.sock" if transport == "ipc"
                   else f"tcp://127.0.0.1:{next(ports)}")
            for name in names}
        self.config = write_mesh_config(root / "mesh.toml", self.endpoints,
                                        peers={"N": peers, **{p: ["N"] for p in peers}})
        self.data = root / "N"
        self.keys: dict[str, wp.KeyPair] = {p: wp.KeyPair.new() for p in peers}
        self.node_line = ""
        if secure:
            made = meshpost("keys", "generate", "--node", "N", "--data", str(self.data))
            assert made.returncode == 0, made.stderr
            self.node_line = made.stdout.strip()
            for name, pair in self.keys.items():
                self.authorize(name, pair.public)
        self.node = NodeProcess("N", self.config, self.data, root / "N.log",
                                ("--secure",) if secure else ())
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.dialers: list[wp.Dialer] = []

    def authorize(self, name: str, public: bytes) -> None:
        """Append `name`'s line to N's authorized_keys (README: `keys show ... >> ...`)."""
        with (self.data / "authorized_keys").open("a", encoding="utf-8") as f:
            f.write(wp.authorized_line(name, public) + "\n")

    def node_key(self) -> bytes:
        """N's public key, read from its key file as 2.3 describes it."""
        return wp.read_public_key(wp.key_files(self.data)[0])

    def start(self) -> None:
        self.node.start()
        try:
            self.node.wait_ready()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        self.node.stop()

    def close(self) -> None:
        self.node.stop()
        for dialer in self.dialers:
            dialer.close()
        self.ctx.destroy(linger=0)

    def exit_code_of_start(self) -> int | None:
        """Start N again and wait for it to exit (a start that must fail)."""
        self.node.start()
        assert self.node.process is not None
        try:
            return self.node.process.wait(timeout=CLI_TIMEOUT_S)
        finally:
            self.node.stop()

    def dialer(self, name: str, *, key: wp.KeyPair | None = None, node_id: str | None = None,
               server_key: bytes | None = None, keyless: bool = False,
               mechanism: str | None = None, reconnect: bool = True) -> wp.Dialer:
        """A dialer claiming `name`, with `key` (by default the one N lists for `name`)."""
        curve = None
        if not keyless:
            pair = key or self.keys[name]
            curve = wp.CurveClient(pair, server_key or self.node_key())
        return self.add(wp.Dialer(self.ctx, name, self.endpoints["N"], node_id, curve=curve,
                                  mechanism=mechanism, reconnect=reconnect))

    def add(self, dialer: wp.Dialer) -> wp.Dialer:
        """`dialer`, closed with the mesh."""
        self.dialers.append(dialer)
        return dialer

    def stats(self) -> dict[str, Any]:
        with ControlClient(self.data, name="N") as client:
            reply = client.request(StatusRequest(), timeout_s=ANSWER_S)
        assert not isinstance(reply, ErrorReply), reply
        return dict(reply.status["stats"])

    def history(self) -> list[dict[str, Any]]:
        done = meshpost("history", "--node", "N", "--data", str(self.data), "--json")
        assert done.returncode == 0, done.stderr
        rows: list[dict[str, Any]] = json.loads(done.stdout)
        return rows

    def stored_from(self, sender: str) -> list[str]:
        return [r["body"] for r in self.history() if r["direction"] == "in"
                and r["from"] == sender]

    def peer(self, name: str) -> dict[str, Any]:
        done = meshpost("peers", "--node", "N", "--data", str(self.data), "--json")
        assert done.returncode == 0, done.stderr
        (found,) = [p for p in json.loads(done.stdout)["peers"] if p["name"] == name]
        return dict(found)

    def log(self) -> str:
        return (self.root / "N.log").read_text(encoding="utf-8", errors="replace")


def expect(peer: wp.Dialer, tag: str, timeout_s: float = ANSWER_S) -> wp.Frame:
    frame = peer.recv(timeout_s)
    assert frame.tag == tag, f"expected {tag}, got {frame}"
    return frame


class Flow:
    """A listed peer's link that must keep flowing: each `check` sends one new message on its
    open session and needs its receipt, so a refusal elsewhere that cost it would show."""

    def __init__(self, mesh: SecureMesh, name: str, dialer: wp.Dialer | None = None) -> None:
        self.mesh = mesh
        self.peer = dialer or mesh.dialer(name)
        self.peer.handshake(ANSWER_S)
        self.seq = 0
        self.bodies: list[str] = []

    def check(self, label: str) -> None:
        self.seq += 1
        body = f"{self.peer.name} flows {self.seq} ({label})"
        (env,) = self.peer.envelopes("N", [body], first_seq=self.seq)
        self.peer.batch([env])
        assert expect(self.peer, "receipt")["ranges"] == [[self.seq, self.seq]], label
        self.bodies.append(body)

    def stored_once(self) -> None:
        assert sorted(self.mesh.stored_from(self.peer.name)) == sorted(self.bodies)


def silent(peer: wp.Dialer) -> bool:
    """No frame comes on `peer`'s socket within SILENCE_S."""
    return not peer.sock.poll(int(SILENCE_S * 1000), zmq.POLLIN)


def try_hello_and_batch(peer: wp.Dialer, body: str) -> None:
    """What a refused peer would say if it could: a Hello and a message (queued on the socket,
    or refused by it at once when it has no connection to queue on)."""
    try:
        peer.sock.send(wp.encode("hello", 1, peer.node_id, peer.name, wp.wall_ns(), 1, b""),
                       zmq.DONTWAIT)
        peer.sock.send(wp.encode("batch", wp.wall_ns(),
                                 [e.wire() for e in peer.envelopes("N", [body])]), zmq.DONTWAIT)
    except zmq.Again:
        pass


def failures_grow(mesh: SecureMesh, before: int, by: int = 1) -> int:
    """Wait until N counts `by` more failed handshakes than `before`; return the count."""
    seen = [before]

    def grown() -> bool:
        seen[0] = mesh.stats()["handshakes_failed"]
        return bool(seen[0] >= before + by)

    wait_until(grown, ANSWER_S, f"N counting {by} more failed handshake(s) than {before}")
    return seen[0]


@pytest.fixture
def mesh(short_tmp: Path) -> Iterator[SecureMesh]:
    m = SecureMesh(short_tmp, ["P", "Q"])
    m.start()
    try:
        yield m
    finally:
        m.close()


# -- the keys, as `meshpost keys` and 2.3 say -------------------------------------------------

def test_keys_prints_the_documented_line_and_its_file_is_read_by_an_independent_peer(
    short_tmp: Path,
) -> None:
    helped = meshpost("keys", "--help")
    assert helped.returncode == 0 and "generate" in helped.stdout and "show" in helped.stdout
    data = short_tmp / "N"
    made = meshpost("keys", "generate", "--node", "N", "--data", str(data))
    assert made.returncode == 0, made.stderr
    # stdout is the authorized_keys line and nothing else (README, 2.3).
    assert re.fullmatch(rf"N {wp.Z85_KEY.pattern}\n", made.stdout), made.stdout
    public_file, secret_file = wp.key_files(data)
    assert f"public key: {public_file}" in made.stderr
    assert f"secret key: {secret_file} (mode 0600)" in made.stderr
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(secret_file.parent.stat().st_mode) == 0o700
    assert made.stdout.strip() == wp.authorized_line("N", wp.read_public_key(public_file))
    assert wp.read_authorized_keys(made.stdout) == {"N": wp.read_public_key(public_file)}
    # `show` prints the same line again and replaces nothing.
    shown = meshpost("keys", "show", "--node", "N", "--data", str(data))
    assert shown.returncode == 0 and shown.stdout == made.stdout
    # A second `generate` replaces nothing without --force, and says so (exit 2).
    again = meshpost("keys", "generate", "--node", "N", "--data", str(data))
    assert again.returncode == 2 and "--force" in again.stderr
    assert meshpost("keys", "show", "--node", "N", "--data", str(data)).stdout == made.stdout
    forced = meshpost("keys", "generate", "--node", "N", "--data", str(data), "--force")
    assert forced.returncode == 0 and forced.stdout != made.stdout
    assert forced.stdout.strip() == wp.authorized_line("N", wp.read_public_key(public_file))


# -- a listed peer: welcomed, stored once, receipted (tcp and ipc) ----------------------------

@pytest.mark.parametrize("transport", ["tcp", "ipc"])
def test_a_listed_independent_dialer_is_welcomed_stored_once_and_receipted(
    short_tmp: Path, transport: str,
) -> None:
    m = SecureMesh(short_tmp, ["P", "Q"], transport=transport)
    m.start()
    try:
        p = m.dialer("P")
        welcome = p.handshake(ANSWER_S)
        assert p.handshake_result(ANSWER_S) == wp.HandshakeResult("succeeded", 0)
        assert welcome["name"] == "N" and len(welcome["resume"]) == 8
        envelopes = p.envelopes("N", ["uno", "dos", "tres"])
        tx = p.batch(envelopes)
        receipt = expect(p, "receipt")
        assert receipt["ranges"] == [[1, 3]] and receipt["echo_tx_at_ns"] == tx
        p.batch(envelopes)  # a resend: receipted again from the stored rows, not stored again
        assert expect(p, "receipt")["ranges"] == [[1, 3]]
        assert sorted(m.stored_from("P")) == ["dos", "tres", "uno"]
        stats = m.stats()
        assert stats["handshakes_failed"] == 0 and stats["violations"] == 0
        p.close()
    finally:
        m.close()


def serve_until(peer: wp.ListenerPeer, sender: subprocess.Popen[str]) -> list[wp.Envelope]:
    """Answer N as section 11 says until `sender` (a `meshpost send`) exits; the messages."""
    got: list[wp.Envelope] = []
    deadline = time.monotonic() + CLI_TIMEOUT_S
    while sender.poll() is None and time.monotonic() < deadline:
        try:
            rid, frame, read_at = peer.recv(0.2)
        except TimeoutError:
            continue
        assert peer.user_ids[rid] == "N", "every frame comes on a connection N's key proves"
        if frame.tag == "hello":
            assert frame["name"] == "N"
            peer.welcome(rid)
        elif frame.tag == "ping":
            peer.pong(rid, frame, read_at)
        elif frame.tag == "batch":
            got.extend(frame["messages"])
            peer.receipt(rid, frame, read_at, [e.seq for e in frame["messages"]], wp.wall_ns())
    return got


def send_from_n(m: SecureMesh, to: str, body: str, timeout_s: float = CLI_TIMEOUT_S - 10,
                ) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "meshpost", "send", "--node", "N", "--data", str(m.data),
         "--to", to, "--timeout", str(timeout_s), body],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("transport", ["tcp", "ipc"])
def test_a_node_dials_a_listed_independent_listener_with_the_key_it_lists(
    short_tmp: Path, transport: str,
) -> None:
    """2.3: N's DEALER to P is a CURVE client expecting the key N's authorized_keys lists
    for P; P's ZAP handler sees N's key (the one `keys generate` printed) and names the
    connection N."""
    m = SecureMesh(short_tmp, ["P"], transport=transport)
    n_key = wp.read_authorized_keys(m.node_line)["N"]
    listener = wp.ListenerPeer(m.ctx, "P", m.endpoints["P"],
                               curve=wp.CurveServer(m.keys["P"], {n_key: "N"}))
    m.start()
    try:
        sender = send_from_n(m, "P", "hola P")
        got = serve_until(listener, sender)
        out, err = sender.communicate(timeout=CLI_TIMEOUT_S)
        assert sender.returncode == 0 and "delivered to P" in out, (out, err)
        assert {(e.sender, e.recipient, e.body) for e in got} == {("N", "P", "hola P")}
        assert listener.zap is not None and listener.zap.denied == []
        (row,) = [r for r in m.history() if r["direction"] == "out"]
        assert row["state"] == "delivered"
    finally:
        m.close()
        listener.close()


def test_a_listener_that_is_not_the_key_n_lists_or_that_refuses_n_gets_nothing(
    short_tmp: Path,
) -> None:
    """As listener, the two refusals: a P holding another key than N lists for P (N cannot
    authenticate it), and a P whose ZAP handler does not admit N's key. N sends nothing, and
    its `peers` says why (README: `✗ B refuses us: ...`)."""
    m = SecureMesh(short_tmp, ["P"])
    impostor = wp.ListenerPeer(m.ctx, "P", m.endpoints["P"],
                               curve=wp.CurveServer(wp.KeyPair.new(), {}))
    m.start()
    try:
        sender = send_from_n(m, "P", "for the real P only", timeout_s=3)
        with pytest.raises(TimeoutError):
            impostor.recv(SILENCE_S * 3)
        out, err = sender.communicate(timeout=CLI_TIMEOUT_S)
        assert sender.returncode == 3, (out, err)
        assert "P: handshake failed" in err and "not the one in this node's authorized_keys" in err
        impostor.close()

        # A context of its own: a ZAP handler's endpoint is one per context, and libzmq
        # releases the closed one's name later.
        other_ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        refusing = wp.ListenerPeer(other_ctx, "P", m.endpoints["P"],
                                   curve=wp.CurveServer(m.keys["P"], {}))
        assert refusing.zap is not None
        deadline = time.monotonic() + ANSWER_S
        while not refusing.zap.denied and time.monotonic() < deadline:
            with pytest.raises(TimeoutError):  # ZAP requests answered, never a frame
                refusing.recv(0.2)
        assert refusing.zap.denied, "N dialed P again"
        assert refusing.zap.denied[0] == wp.read_authorized_keys(m.node_line)["N"]
        wait_until(lambda: "handshake refused" in (m.peer("P")["refusal"] or ""), ANSWER_S,
                   "N saying P refuses its key")
        assert "`meshpost keys show --node N`" in m.peer("P")["refusal"]
        refusing.close()
        other_ctx.destroy(linger=0)
        (row,) = [r for r in m.history() if r["direction"] == "out"]
        assert row["state"] == "pending"
    finally:
        m.close()


# -- unknown keys: no traffic at all ----------------------------------------------------------

def test_an_unknown_key_gets_no_traffic_is_logged_and_counted_and_costs_no_message(
    mesh: SecureMesh,
) -> None:
    flow = Flow(mesh, "P")
    flow.check("before")
    before = mesh.stats()
    stranger_key = wp.KeyPair.new()
    x = mesh.dialer("Q", key=stranger_key, reconnect=False)  # claims a listed name
    try_hello_and_batch(x, "from a stranger")
    # On the wire: ZAP says 400 and libzmq closes the connection (no reconnect after it).
    assert x.handshake_result(ANSWER_S) == wp.HandshakeResult("auth", 400)
    assert silent(x)
    failures_grow(mesh, before["handshakes_failed"])
    flow.check("after an unknown key")
    after = mesh.stats()
    assert after["handshakes_failed"] == before["handshakes_failed"] + 1
    assert after["denied_connections"] == before["denied_connections"] + 1
    assert after["violations"] == before["violations"]  # no frame of it reached the protocol
    assert mesh.stored_from("Q") == []
    log = mesh.log()
    assert f"[N] CURVE client with unknown key {stranger_key.public.decode()} denied" in log
    x.close()
    flow.stored_once()


def test_a_stream_of_unknown_keys_is_counted_each_but_logged_at_a_pace(
    mesh: SecureMesh,
) -> None:
    """Each attempt costs a stranger a handshake; each log line about it cost the node about
    150 bytes, a line per attempt until this was paced: 20 lines of a kind, then a line per
    10 s saying how many more."""
    flow = Flow(mesh, "P")
    attempts = 30
    started = time.monotonic()
    for _ in range(attempts):
        x = mesh.dialer("Q", key=wp.KeyPair.new(), reconnect=False)
        assert x.handshake_result(ANSWER_S) == wp.HandshakeResult("auth", 400)
        x.close()
    failures_grow(mesh, 0, by=attempts)
    elapsed_s = time.monotonic() - started
    flow.check("after the stream")
    log = mesh.log().splitlines()
    bound = 20 + int(elapsed_s / 10) + 1
    denied = [line for line in log if "CURVE client with unknown key" in line]
    assert 20 <= len(denied) <= bound, (len(denied), bound)
    stats = mesh.stats()
    assert stats["handshakes_failed"] == stats["denied_connections"] == attempts


# -- a listed key saying another listed name --------------------------------------------------

def test_a_listed_key_saying_another_listed_name_is_refused_identity_and_cuts_nothing(
    mesh: SecureMesh,
) -> None:
    """P's key, Hello as Q (even with Q's node id and Q's resume token): Refuse("identity"),
    counted; the connection gets no session, so its batch gets hello-required and nothing is
    stored as Q; Q's own session keeps its answers and its token."""
    q = Flow(mesh, "Q")
    q.check("before")
    q_token = q.peer.resume
    before = mesh.stats()
    liar = mesh.dialer("P", node_id=q.peer.node_id)
    liar.resume = q_token
    liar.hello(name="Q")
    refuse = expect(liar, "refuse")
    assert refuse.fields == {"code": "identity",
                             "detail": "connection authenticated as 'P' claims to be 'Q'"}
    liar.batch([dataclasses.replace(e, sender="Q") for e in liar.envelopes("N", ["as Q"])])
    assert expect(liar, "refuse")["code"] == "hello-required"
    q.check("after P's key said Q")
    q.peer.send("ping", 7)
    pong = expect(q.peer, "pong")  # nothing of the liar's was forwarded to Q's session
    assert pong["echo_sent_at_ns"] == 7 and pong["pending"] == 0
    # The same connection may be what its key proves, and then sends only as P.
    liar.hello(name="P")
    assert expect(liar, "welcome")["name"] == "N"
    envs = liar.envelopes("N", ["as P, sender Q", "as P"])
    envs[0] = dataclasses.replace(envs[0], sender="Q")
    liar.batch(envs)
    reject = expect(liar, "reject")
    assert reject["seqs"] == [1] and reject["code"] == "invalid"
    assert expect(liar, "receipt")["ranges"] == [[2, 2]]
    q.check("after the liar's batch")
    after = mesh.stats()
    assert after["violations"] == before["violations"] + 2  # the Hello, the message
    assert sorted(mesh.stored_from("Q")) == sorted(q.bodies)
    assert mesh.stored_from("P") == ["as P"]
    assert "connection authenticated as 'P' claims to be 'Q'" in mesh.log()
    liar.close()


def test_a_listed_key_with_its_name_and_another_node_id_is_welcomed_beside_the_first(
    mesh: SecureMesh,
) -> None:
    """2.3: under --secure the key is the proof; the node id a Hello says is not checked
    against another session's (6.2 check 6 is keyless only). A second process holding P's key
    pair (P restarted with a new data dir, say) gets its own session; P's keeps flowing."""
    p = Flow(mesh, "P")
    p.check("first")
    other = mesh.dialer("P")
    assert other.node_id != p.peer.node_id
    assert other.handshake(ANSWER_S)["resume"] != p.peer.resume
    (env,) = other.envelopes("N", ["from P's second node id"], first_seq=1)
    other.batch([env])
    assert expect(other, "receipt")["ranges"] == [[1, 1]]
    p.check("second")
    p.bodies.append("from P's second node id")
    p.stored_once()
    assert mesh.stats()["violations"] == 0
    other.close()


# -- keys changing: a peer's, the node's, files under a running node --------------------------

def test_a_peer_restarted_with_a_new_key_is_refused_until_n_lists_it(mesh: SecureMesh) -> None:
    q = Flow(mesh, "Q")
    new_key = wp.KeyPair.new()
    before = mesh.stats()["handshakes_failed"]
    p_new = mesh.dialer("P", key=new_key, reconnect=False)
    try_hello_and_batch(p_new, "with P's new key, before N knows it")
    assert p_new.handshake_result(ANSWER_S) == wp.HandshakeResult("auth", 400)
    failures_grow(mesh, before)
    q.check("after P's new key was refused")
    p_new.close()

    # `keys show ... >> authorized_keys` with the old line still there: N will not guess
    # which is P's; it says so and does not start (exit 2).
    mesh.stop()
    mesh.authorize("P", new_key.public)
    assert mesh.exit_code_of_start() == 2
    assert "P has another key on line" in mesh.log()
    # The old line removed: the new key is P, the old one a stranger.
    text = (mesh.data / "authorized_keys").read_text()
    old_line = wp.authorized_line("P", mesh.keys["P"].public)
    (mesh.data / "authorized_keys").write_text(text.replace(old_line + "\n", ""))
    mesh.start()
    p = Flow(mesh, "P", mesh.dialer("P", key=new_key))
    p.check("P with its new key")
    stale = mesh.dialer("P", reconnect=False)
    assert stale.handshake_result(ANSWER_S) == wp.HandshakeResult("auth", 400)
    p.check("after P's old key was refused")
    assert mesh.stored_from("P") == p.bodies  # nothing from before N listed the new key
    stale.close()


def test_a_node_restarted_with_a_new_key_refuses_a_peer_holding_its_old_one(
    mesh: SecureMesh,
) -> None:
    old_server_key = mesh.node_key()
    mesh.stop()
    made = meshpost("keys", "generate", "--node", "N", "--data", str(mesh.data), "--force")
    assert made.returncode == 0, made.stderr
    mesh.start()
    q = Flow(mesh, "Q")  # reads N's key file again: the new key
    stale = mesh.dialer("P", server_key=old_server_key, reconnect=False)
    try_hello_and_batch(stale, "to N's old key")
    result = stale.handshake_result(ANSWER_S)
    assert result.event in ("protocol", "no detail"), result  # N cannot open its box
    failures_grow(mesh, 0)
    q.check("after a peer with N's old key")
    assert mesh.stored_from("P") == []
    assert "[N] refused an inbound connection: a CURVE client whose box this node's key " \
           "cannot open" in mesh.log() or "holding another public key for this node" in mesh.log()
    stale.close()
    # P, reading N's key file again as 2.3 says, is welcomed.
    p = Flow(mesh, "P")
    p.check("P with N's new key")


def test_key_files_changed_under_a_running_node_take_effect_at_its_next_start(
    mesh: SecureMesh,
) -> None:
    """2.3: keys and authorized_keys are read once, at start. `keys generate --force` is
    refused while the node runs (exit 2). Removing the node's key files or a peer's line
    changes nothing in the running node (no link drops, no new refusal); the next start
    applies them: without a key it refuses to start saying what to run."""
    p = Flow(mesh, "P")
    q = Flow(mesh, "Q")
    # A new pair is not made under the running node: the files would stop saying which key
    # it holds, and a peer reading them (as 2.3 says it may) would be refused.
    key = mesh.node_key()
    forced = meshpost("keys", "generate", "--node", "N", "--data", str(mesh.data), "--force")
    assert forced.returncode == 2, forced
    assert "node N is running" in forced.stderr and "`meshpost stop --node N`" in forced.stderr
    assert mesh.node_key() == key
    public_file, secret_file = wp.key_files(mesh.data)
    public_file.unlink()
    secret_file.unlink()
    kept = (mesh.data / "authorized_keys").read_text()
    (mesh.data / "authorized_keys").write_text(
        kept.replace(wp.authorized_line("Q", mesh.keys["Q"].public) + "\n", ""))
    p.check("after the files changed")
    q.check("after Q's line went")
    fresh = mesh.dialer("Q", server_key=wp.read_authorized_keys(mesh.node_line)["N"])
    Flow(mesh, "Q", fresh).check("a new connection of Q's, admitted by the keys read at start")
    mesh.stop()
    assert mesh.exit_code_of_start() == 2
    assert f"`meshpost keys generate --node N --data {mesh.data}`" in mesh.log()


def test_an_authorized_keys_line_libzmq_would_refuse_stops_the_start_with_exit_2(
    short_tmp: Path,
) -> None:
    """Bug: a key of 40 characters outside ZeroMQ's Z85 alphabet passed the check, and the
    node died at its first dial with a ZMQError traceback, its process never exiting."""
    m = SecureMesh(short_tmp, ["P"])
    (m.data / "authorized_keys").write_text("# P\nP " + "~" * 40 + "\n")
    try:
        assert m.exit_code_of_start() == 2
        assert "authorized_keys:2: expected 'NAME Z85KEY'" in m.log()
    finally:
        m.close()


def test_a_transport_given_a_key_libzmq_cannot_read_raises_a_meshpost_error() -> None:
    """The boundary under the load check: a key that is not Z85 (given by code, not by a
    file) was a raw `zmq.ZMQError` out of `add_peer`, the half-made socket left open."""
    from meshpost.errors import TransportError
    from meshpost.transport import ZmqTransport

    own = wp.KeyPair.new()

    async def scenario() -> None:  # the authenticator runs on the event loop
        transport = ZmqTransport(name="N", max_frame_bytes=1 << 20, curve_secret_key=own.secret,
                                 curve_public_key=own.public, peer_public_keys={"P": b"~" * 40})
        try:
            with pytest.raises(TransportError, match="CURVE keys for peer 'P' are not Z85 keys"):
                transport.add_peer("P", "tcp://127.0.0.1:9")
        finally:
            transport.close()

    asyncio.run(scenario())


# -- mechanisms that do not match -------------------------------------------------------------

@pytest.mark.parametrize("mechanism", ["null", "plain"])
def test_a_keyless_or_plain_peer_at_a_secure_node_is_refused_logged_and_counted(
    mesh: SecureMesh, mechanism: str,
) -> None:
    flow = Flow(mesh, "P")
    before = mesh.stats()
    once = mesh.dialer("Q", keyless=True, mechanism=mechanism, reconnect=False)
    try_hello_and_batch(once, f"from a {mechanism} peer")
    result = once.handshake_result(ANSWER_S)
    assert result.event in ("protocol", "no detail"), result
    assert silent(once)
    once.close()
    failures_grow(mesh, before["handshakes_failed"])
    # More of them, each sending before its handshake fails, between P's messages.
    for i in range(3):
        again = mesh.dialer("Q", keyless=True, mechanism=mechanism, reconnect=False)
        try_hello_and_batch(again, f"from a {mechanism} peer, again")
        assert again.handshake_result(ANSWER_S).event in ("protocol", "no detail")
        flow.check(f"between {mechanism} peers ({i})")
        again.close()
    failures_grow(mesh, before["handshakes_failed"], by=4)
    assert mesh.stats()["violations"] == before["violations"]
    assert mesh.stored_from("Q") == []
    assert "[N] refused an inbound connection: a " in mesh.log()
    flow.stored_once()


@pytest.mark.parametrize("mechanism", ["curve", "plain"])
def test_a_secure_or_plain_peer_at_a_keyless_node_is_refused_logged_and_counted(
    short_tmp: Path, mechanism: str,
) -> None:
    m = SecureMesh(short_tmp, ["P", "Q"], secure=False)
    m.start()
    try:
        flow = Flow(m, "P", m.dialer("P", keyless=True))
        flow.check("before")
        curve = (wp.CurveClient(wp.KeyPair.new(), wp.KeyPair.new().public)
                 if mechanism == "curve" else None)
        x = m.add(wp.Dialer(m.ctx, "Q", m.endpoints["N"], curve=curve,
                            mechanism=None if curve else mechanism, reconnect=False))
        try_hello_and_batch(x, f"a {mechanism} peer")
        result = x.handshake_result(ANSWER_S)
        assert result.event in ("protocol", "no detail"), result
        assert silent(x)
        failures_grow(m, 0)
        flow.check(f"after a {mechanism} peer")
        x.close()
        stats = m.stats()
        assert stats["violations"] == 0
        assert m.stored_from("Q") == []
        assert "[N] refused an inbound connection: a " in m.log()
        flow.stored_once()
    finally:
        m.close()


def test_doc_states_what_these_tests_check() -> None:
    """The words this file relies on are in docs/protocol.md 2.3."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text()
    section = " ".join(doc[doc.index("### 2.3 "):doc.index("## 3. ")].split())
    for words in ("keys/node.key", "node.key_secret", "public-key = ", "authorized_keys",
                  "User-Id", "handshakes_failed", "identity", "read once, at start",
                  "ZAP status 400"):
        assert words in section, words

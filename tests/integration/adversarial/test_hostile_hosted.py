"""Hostile peers against nodes hosted many to a process (`meshpost host`, `cluster up
--per-process K`): what a stranger on loopback, or a legitimate peer of one hosted node, does
to that node must cost no message of the *other* nodes of its process, and a key or name one
hosted node accepts must be worth nothing at another.

Real host processes (`LocalCluster(per_process=K)`), real SQLite stores, sends through each
node's control socket; the fault battery's checker (`evaluate`) then proves every message the
test attempted stored once on each side. docs/reliability.md, "Hostile peers against hosted
nodes", says what each test found.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import resource
import signal
import socket
import sqlite3
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec
import psutil
import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from meshpost import keys
from meshpost.cluster import LocalCluster
from meshpost.config import DEFAULT_MAX_MESSAGE_BYTES, MeshConfig
from meshpost.control import (
    ENDPOINT_FILE,
    ControlClient,
    ErrorReply,
    EventsReply,
    EventsRequest,
    GroupRequest,
    SendRequest,
    StatusRequest,
    SubmitRequest,
    checked,
)
from meshpost.control.messages import encoder, reply_decoder
from meshpost.errors import ControlUnavailable
from meshpost.host import HOST_ENDPOINT_FILE, HostClient, HostReply, HostRequest, NodeHost
from meshpost.protocol import (
    PROTOCOL_VERSION,
    Batch,
    Envelope,
    Hello,
    Ping,
    Refuse,
    RefuseCode,
    Reject,
    RejectCode,
    Welcome,
    decode,
    encode,
)
from meshpost.protocol.frames import max_frame_bytes
from meshpost.store import DB_FILENAME, StoreReader
from meshpost.transport.inbound import LOG_BURST, LOG_EVERY_S
from tests.integration.faults.checker import FAST_OPTIONS, Ledger, evaluate

from . import zmtp_raw as z

pytestmark = [pytest.mark.faults, pytest.mark.integration]

#: Bound of one answer from a node (it answers in ms; a loaded machine may take seconds).
ANSWER_WAIT_S = 10.0
#: Bound of a send's receipt through a control socket.
RECEIPT_TIMEOUT_S = 30.0
#: Bound of the final drain (every outbox empty).
DRAIN_TIMEOUT_S = 90.0


class HostedMesh:
    """A `LocalCluster` of host processes, sent through by control sockets, with the
    checker's ledger of what was attempted and seen."""

    def __init__(self, root: Path, names: Sequence[str], *, per_process: int,
                 peers: Mapping[str, Sequence[str]] | None = None,
                 extra_args: Sequence[str] = (),
                 options: Mapping[str, Any] | None = None,
                 env: Mapping[str, str] | None = None, transport: str = "ipc") -> None:
        self.cluster = LocalCluster.create(
            root, len(names), names=list(names), transport=transport, per_process=per_process,
            peers=peers, extra_args=tuple(extra_args), env=env,
            options={**FAST_OPTIONS, "sync": "normal", **(options or {})})
        self.ledger = Ledger()
        self.count = 0

    def data_dir(self, name: str) -> Path:
        return self.cluster.data_dir(name)

    def endpoint(self, name: str) -> str:
        return self.cluster.endpoints[name]

    def host_pid(self, name: str) -> int:
        return self.cluster.host_of(name).pid

    def send(self, sender: str, to: str, *, receipt_timeout_s: float = RECEIPT_TIMEOUT_S
             ) -> bool:
        """One message `sender` -> `to`, logged; whether its receipt came in time."""
        self.count += 1
        (attempt,) = self.ledger.attempt(sender, [to], f"{sender}>{to} #{self.count}")
        with ControlClient(self.data_dir(sender), name=sender) as client:
            reply = checked(client.request(SendRequest(to, attempt.body, receipt_timeout_s),
                                           timeout_s=receipt_timeout_s + 30))
        (result,) = reply.sent
        attempt.accept(result.id, result.seq, result.sent_at_ns)
        attempt.receipted = result.delivered
        return result.delivered

    def status(self, name: str) -> dict[str, Any]:
        with ControlClient(self.data_dir(name), name=name) as client:
            return dict(checked(client.request(StatusRequest(), timeout_s=ANSWER_WAIT_S))
                        .status)

    def pending(self, names: Sequence[str]) -> int:
        total = 0
        for name in names:
            with StoreReader.for_data_dir(self.data_dir(name)) as reader:
                total += reader.counts().get("out/pending", 0)
        return total

    def finish(self, running: Sequence[str], *, foreign: Sequence[str] = ()) -> None:
        """Wait until no outbox of `running` holds a pending message, stop every host, and
        check every attempted message stored once on each side (`foreign`: senders the test
        played by hand, whose rows the checker leaves alone)."""
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while self.pending(running):
            assert time.monotonic() < deadline, f"outboxes not drained: {self.pending(running)}"
            time.sleep(0.1)
        # A clean exit is what counts here, not its speed: once, under a whole suite's load,
        # the host of the flooded node took longer than `cluster stop`'s default 11.5 s (its
        # close ends with a checkpoint of a WAL that holds the flood's 25 MB of batches) and
        # was killed (-9). Alone, or beside two busy loops, it stops within a few seconds.
        codes = self.cluster.stop(timeout_s=STOP_WAIT_S)
        assert all(code == 0 for code in codes.values()), codes
        stores = {n: self.data_dir(n) for n in running}
        counts = evaluate("hosted", self.ledger, stores, foreign_senders=set(foreign))
        assert counts.clean, counts.line() + "\n" + "\n".join(counts.problems)
        assert counts.stored == counts.attempted == len(self.ledger)


@contextlib.contextmanager
def curve_dealer(endpoint: str, server: bytes, public: bytes, secret: bytes
                 ) -> Iterator[tuple[zmq.Socket[bytes], zmq.Socket[bytes]]]:
    """A CURVE client DEALER connected to `endpoint`, with a monitor of its handshake."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDTIMEO, int(ANSWER_WAIT_S * 1000))
        sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = (
            server, public, secret)
        monitor = sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
            | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
        sock.connect(endpoint)
        yield sock, monitor
    finally:
        ctx.destroy(0)


def handshake_outcome(monitor: zmq.Socket[bytes]) -> int:
    """The first handshake event of a `curve_dealer` (ZMQ_EVENT_HANDSHAKE_*)."""
    assert monitor.poll(int(ANSWER_WAIT_S * 1000)), "no handshake outcome"
    return int(recv_monitor_message(monitor)["event"])


def answer(sock: zmq.Socket[bytes]) -> object:
    assert sock.poll(int(ANSWER_WAIT_S * 1000)), "no answer"
    return decode(sock.recv(), max_bytes=1 << 20)


def hello(name: str) -> bytes:
    now = time.time_ns()
    return encode(Hello(PROTOCOL_VERSION, "feedfacefeedface", name, now, 1))


def batch(sender: str, to: str, body: str) -> bytes:
    now = time.time_ns()
    return encode(Batch(now, [Envelope(f"{now:x}hosted", 1_000_000, sender, to, body, now, 1)]))


def wait_for(what: str, check: Any, timeout_s: float = 60.0) -> None:
    """Poll `check()` until true; fail with `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout_s}s: {what}"
        time.sleep(0.1)


def bodies_at(data_dir: Path) -> list[str]:
    with StoreReader.for_data_dir(data_dir) as reader:
        return [m.body for m in reader.history(direction="in")]


# -- 1. --secure: one process, one key per node's own allowlist ------------------------------


@pytest.mark.timeout(240)
def test_a_key_one_hosted_node_accepts_is_refused_by_another_node_of_its_process(
    short_tmp: Path,
) -> None:
    """X and Y are hosted in one process under --secure; X lists M's key, Y does not. M's key
    gets a connection to X (and only as M), none to Y: Y's own authenticator refuses it at the
    handshake, counts it in Y's status (not X's) and names Y in the host's log line. ZAP is
    one handler per ZeroMQ context, so nodes sharing a context would share one allowlist:
    each secure hosted node keeps a context of its own (host.py), which this pins down."""
    mesh = HostedMesh(short_tmp, ["X", "Y", "M"], per_process=2,
                      peers={"X": ["Y", "M"], "Y": ["X"], "M": ["X"]},
                      extra_args=["--secure"])
    publics = keys.generate_mesh_keys({n: mesh.data_dir(n) for n in ("X", "Y", "M")})
    keys.write_authorized(mesh.data_dir("Y"), {"X": publics["X"]})  # Y trusts X only
    m_secret, m_public = keys.load_own(mesh.data_dir("M"))
    try:
        mesh.cluster.start(["X", "Y"])  # host h1 runs X and Y; M never runs: the attacker
        assert mesh.host_pid("X") == mesh.host_pid("Y")
        assert mesh.send("X", "Y") and mesh.send("Y", "X")

        # M's key at X, which lists it: a connection, a Welcome as M, nothing under Y's name.
        with curve_dealer(mesh.endpoint("X"), publics["X"], m_public, m_secret) as (s, mon):
            assert handshake_outcome(mon) == zmq.EVENT_HANDSHAKE_SUCCEEDED
            s.send(hello("Y"))
            refused = answer(s)
            assert isinstance(refused, Refuse) and refused.code == RefuseCode.IDENTITY, refused
            s.send(batch("Y", "X", "M as Y at X"))
            refused = answer(s)
            assert isinstance(refused, Refuse) and refused.code == RefuseCode.HELLO_REQUIRED
            s.send(hello("M"))
            assert isinstance(answer(s), Welcome)
            # Welcomed as M at X: a message for Y, X's neighbour in the process, is X's to
            # reject; nothing reaches Y's store through X.
            s.send(batch("M", "Y", "M as M to Y through X"))
            rejected = answer(s)
            assert isinstance(rejected, Reject) and rejected.code == RejectCode.INVALID, rejected

        # M's key at Y, in the same process, which does not list it: refused at the handshake.
        for claimed in ("M", "X"):
            with curve_dealer(mesh.endpoint("Y"), publics["Y"], m_public, m_secret) as (s, mon):
                assert handshake_outcome(mon) == zmq.EVENT_HANDSHAKE_FAILED_AUTH
                with contextlib.suppress(zmq.Again):  # no connection to queue on
                    s.send(hello(claimed), zmq.NOBLOCK)
                    s.send(batch(claimed, "Y", f"M as {claimed} at Y"), zmq.NOBLOCK)
                assert not s.poll(1000), "Y answered a key it does not list"

        y_stats, x_stats = mesh.status("Y")["stats"], mesh.status("X")["stats"]
        assert y_stats["denied_connections"] == 2, y_stats
        assert x_stats["denied_connections"] == 0, x_stats
        log_text = mesh.cluster.host_of("Y").log_path.read_text(errors="replace")
        assert log_text.count("[Y] CURVE client with unknown key") == 2, log_text[-3000:]
        assert "[X] CURVE client" not in log_text
        # The real peers are untouched, and nothing of M's was stored under any name.
        assert mesh.send("X", "Y") and mesh.send("Y", "X")
        assert not [b for n in ("X", "Y") for b in bodies_at(mesh.data_dir(n))
                    if b.startswith("M as")]
        mesh.finish(["X", "Y"])
    finally:
        mesh.cluster.stop()


# -- 2. a flood on one hosted node -----------------------------------------------------------

#: Each flood is bounded by a count, not a time: the same input on every run.
JUNK_FRAMES = 4 * 1_500
MAX_SIZE_FRAMES = 12
OVERSIZED_FRAMES = 3
PEER_BATCHES = 12
#: How long `finish` lets each process take to exit after SIGTERM before it counts as hung.
STOP_WAIT_S = 60.0
UNREAD_PINGS = 20_000
ZMTP_PINGS = 2_000
EXTRA_CONNECTIONS = 40
#: B's (and every node's) inbound cap here: the connection flood goes beyond it.
INBOUND_CAP = 16
#: A flood's send that cannot go (no connection) fails the test rather than hang it.
ATTACK_SEND_TIMEOUT_MS = 60_000


def _attacker(ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str, linger_ms: int
              ) -> zmq.Socket[bytes]:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, linger_ms)
    sock.setsockopt(zmq.SNDTIMEO, ATTACK_SEND_TIMEOUT_MS)
    sock.connect(endpoint)
    return sock


def _junk(endpoint: str) -> None:
    """4 connections, each 1,500 undecodable 5-byte frames; never read."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        socks = [_attacker(ctx, endpoint, 5000) for _ in range(4)]
        for _ in range(JUNK_FRAMES // 4):
            for sock in socks:
                sock.send(b"\x00junk")
    finally:
        ctx.destroy(5000)


def _max_size(endpoint: str, frame_bytes: int) -> None:
    """Undecodable frames of B's largest frame size, then some one byte over it (each of
    those closes its connection, MAXMSGSIZE)."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        sock = _attacker(ctx, endpoint, 5000)
        payload = b"\xff" * frame_bytes
        for _ in range(MAX_SIZE_FRAMES):
            sock.send(payload, copy=False)
        for _ in range(OVERSIZED_FRAMES):
            over = _attacker(ctx, endpoint, 5000)
            over.send(payload + b"!", copy=False)
            over.close(5000)
    finally:
        ctx.destroy(5000)


def _peer_batches(endpoint: str) -> list[str]:
    """A peer of B only (E: B lists it, without --secure a name is all it takes) says Hello
    and sends PEER_BATCHES Batches of 32 messages of 64 KiB, each near the largest frame; it
    reads nothing back. Returns the bodies, which B must store once each."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    bodies = []
    try:
        sock = _attacker(ctx, endpoint, 10_000)
        sock.send(hello("E"))
        seq = 0
        for i in range(PEER_BATCHES):
            now = time.time_ns()
            envelopes = []
            for j in range(32):
                seq += 1
                body = f"E>B {i}.{j} " + "e" * 65_000
                bodies.append(body)
                envelopes.append(Envelope(f"{now:x}e{seq:06d}", seq, "E", "B", body, now,
                                          now + seq))
            sock.send(encode(Batch(now, envelopes)), copy=False)
    finally:
        ctx.destroy(10_000)
    return bodies


def _unread_pings(endpoint: str) -> None:
    """Meshpost Pings before any Hello, each answered `hello-required`; nothing is read."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        sock = _attacker(ctx, endpoint, 5000)
        ping = encode(Ping(sent_at_ns=time.time_ns()))
        for _ in range(UNREAD_PINGS):
            sock.send(ping)
    finally:
        ctx.destroy(5000)


def _zmtp_pings(endpoint: str) -> None:
    """ZMTP by hand: a handshake, ZMTP_PINGS PING commands never read, then a reset."""
    peer = z.RawPeer(endpoint)
    try:
        peer.handshake()
        with contextlib.suppress(OSError):
            peer.send(z.ping(ttl_ds=100, context=b"host") * ZMTP_PINGS)
    finally:
        peer.reset()


def _connections(endpoint: str) -> int:
    """EXTRA_CONNECTIONS + INBOUND_CAP raw connections held open at once (handshaken, idle):
    how many B closed within the handshake interval."""
    peers = []
    closed = 0
    try:
        for _ in range(INBOUND_CAP + EXTRA_CONNECTIONS):
            with contextlib.suppress(OSError, AssertionError):
                peer = z.RawPeer(endpoint)
                peers.append(peer)
                peer.handshake()
        closed = sum(p.closed_by_peer(0.2) for p in peers)
    finally:
        for peer in peers:
            peer.close()
    return closed


def answers_a_fresh_connection(endpoint: str) -> bool:
    """A new connection's Ping (before any Hello) gets B's `hello-required`."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        sock.send(encode(Ping(sent_at_ns=time.time_ns())))
        got = answer(sock)
        return isinstance(got, Refuse) and got.code == RefuseCode.HELLO_REQUIRED
    finally:
        ctx.destroy(0)


def keep_exchanging(mesh: HostedMesh, pairs: Sequence[tuple[str, str]],
                    attacks: Sequence[concurrent.futures.Future[Any]]) -> None:
    """Send a message each way of `pairs` while any of `attacks` runs, and once after; each
    must be receipted."""
    while True:
        running = not all(a.done() for a in attacks)
        for sender, to in pairs:
            assert mesh.send(sender, to), f"{sender}->{to} not receipted in the flood"
        if not running:
            return


@pytest.mark.timeout(400)
def test_a_flood_on_one_hosted_node_costs_the_others_of_its_process_no_message(
    short_tmp: Path,
) -> None:
    """A, B, C in one host, D in another. While B takes junk frames, frames of its largest
    size and over it, a peer's near-largest batches (stored), Pings nobody reads, raw ZMTP
    PINGs and more connections than its cap, A, C and D keep exchanging: every one of their
    messages is receipted and stored once; B still answers and exchanges after; what the
    flood cost is counted at B alone (A's and C's counters stay at zero)."""
    mesh = HostedMesh(short_tmp, ["A", "B", "C", "D"], per_process=3,
                      peers={"A": ["B", "C", "D"], "B": ["A", "C", "E"], "C": ["A", "B"],
                             "D": ["A"]},
                      options={"max_inbound_connections": INBOUND_CAP})
    config = mesh.cluster.config_path
    config.write_text(config.read_text(encoding="utf-8")
                      + f'[nodes.E]\nbind = ["ipc://{short_tmp}/E.sock"]\n', encoding="utf-8")
    endpoint = mesh.endpoint("B")
    good = [("A", "C"), ("C", "A"), ("D", "A"), ("A", "D")]
    try:
        mesh.cluster.start()
        assert mesh.host_pid("A") == mesh.host_pid("B") == mesh.host_pid("C") != \
            mesh.host_pid("D")
        for sender, to in [*good, ("A", "B"), ("B", "C")]:
            assert mesh.send(sender, to)
        frame_bytes = max_frame_bytes(DEFAULT_MAX_MESSAGE_BYTES)
        with concurrent.futures.ThreadPoolExecutor(max_workers=5) as pool:
            # The frames first, then (their connections closed) the connections beyond the
            # cap: one refused at the cap would take a frame attacker's Hello with it.
            attacks = [pool.submit(_junk, endpoint), pool.submit(_max_size, endpoint, frame_bytes),
                       pool.submit(_unread_pings, endpoint), pool.submit(_zmtp_pings, endpoint)]
            batches = pool.submit(_peer_batches, endpoint)
            keep_exchanging(mesh, good, [*attacks, batches])
            for attack in attacks:
                attack.result()
            peer_bodies = batches.result()
            connections = pool.submit(_connections, endpoint)
            keep_exchanging(mesh, good, [connections])
            closed = connections.result()
        assert closed >= EXTRA_CONNECTIONS - 4, closed  # (a few may still be handshaking)
        assert answers_a_fresh_connection(endpoint)
        for sender, to in [*good, ("A", "B"), ("B", "A"), ("C", "B")]:
            assert mesh.send(sender, to), f"{sender}->{to} after the flood"
        wait_for("B to read every junk frame", lambda: mesh.status("B")["stats"][
            "violations"] >= JUNK_FRAMES + MAX_SIZE_FRAMES)
        stats = {n: mesh.status(n)["stats"] for n in ("A", "B", "C")}
        assert stats["B"]["inbound_refused"] > 0, stats["B"]
        for name in ("A", "C"):
            assert stats[name]["violations"] == stats[name]["inbound_refused"] == 0, (
                name, stats[name])
        # E's messages: B stores each once (and receipts them to E, who never reads).
        until = time.monotonic() + DRAIN_TIMEOUT_S
        while sorted(b for b in bodies_at(mesh.data_dir("B")) if b.startswith("E>B")) \
                != sorted(peer_bodies):
            assert time.monotonic() < until, "E's messages not all stored at B"
            time.sleep(0.2)
        mesh.finish(["A", "B", "C", "D"], foreign=["E"])
    finally:
        mesh.cluster.stop()


# -- 3. one hosted node's store fails --------------------------------------------------------

#: Loaded into every process of the host (PYTHONPATH): a node's `Store.apply` raises (a bug,
#: not a store condition: the writer breaks, the node fails) once `break-now` exists in its
#: data dir, as tests/integration/test_node_failure.py breaks a lone node.
BREAKER = """
from pathlib import Path

from meshpost.store import Store

_apply = Store.apply


def apply(self, *args, **kwargs):
    if (Path(self.path).parent / "break-now").exists():
        raise RuntimeError("injected store bug")
    return _apply(self, *args, **kwargs)


Store.apply = apply
"""


def host_status(mesh: HostedMesh, name: str) -> Any:
    with HostClient(mesh.cluster.host_of(name).data_dir) as client:
        return client.request("status", timeout_s=ANSWER_WAIT_S)


@pytest.mark.timeout(400)
def test_a_hosted_node_whose_store_fails_leaves_the_others_of_its_process_serving(
    short_tmp: Path,
) -> None:
    """A, B, C in one host, D in another. B's store is write-locked by another process, then
    read-only (as fault battery test 9 makes them): B retries and says so, the others serve,
    and B catches up once it clears. Then B's store breaks for good (its writer fails): the
    host records B failed and counts it, the others serve, A's message to B waits in A's
    outbox, and B restarted in its host takes it, stored once."""
    site = short_tmp / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BREAKER, encoding="utf-8")
    mesh = HostedMesh(short_tmp, ["A", "B", "C", "D"], per_process=3,
                      env={"PYTHONPATH": os.pathsep.join(
                          [str(site), *filter(None, [os.environ.get("PYTHONPATH")])])})
    good = [("A", "C"), ("C", "A"), ("D", "A"), ("C", "D")]
    db = mesh.data_dir("B") / DB_FILENAME
    try:
        mesh.cluster.start()
        for sender, to in [*good, ("A", "B"), ("B", "C")]:
            assert mesh.send(sender, to)

        # A write lock held by another process: B retries, reports it, the others serve.
        locker = sqlite3.connect(str(db), timeout=10, isolation_level=None)
        try:
            locker.execute("BEGIN IMMEDIATE")
            assert not mesh.send("A", "B", receipt_timeout_s=1.0)
            for sender, to in good:
                assert mesh.send(sender, to), f"{sender}->{to} while B's store is locked"
            wait_for("B to report its retries",
                     lambda: mesh.status("B")["stats"]["store_retry_attempts"] > 0)
            assert mesh.status("B")["stats"]["store_retry_error"].startswith("store_locked")
        finally:
            with contextlib.suppress(sqlite3.Error):
                locker.execute("ROLLBACK")
            locker.close()
        wait_for("A's message to B receipted once B's store is free",
                 lambda: mesh.pending(["A"]) == 0)

        # Its database and WAL immutable (a disk error: SQLite's SQLITE_IOERR): the same.
        files = [db, db.with_name(db.name + "-wal")]
        try:
            chattr = subprocess.run(["chattr", "+i", *map(str, files)], capture_output=True,
                                    text=True, check=False)
            assert chattr.returncode == 0, f"this test needs `chattr +i`: {chattr.stderr}"
            assert not mesh.send("A", "B", receipt_timeout_s=1.0)
            for sender, to in good:
                assert mesh.send(sender, to), f"{sender}->{to} while B's store is read-only"
            wait_for("B to report its retries",
                     lambda: mesh.status("B")["stats"]["store_retry_error"]
                     .startswith("storage"))
        finally:
            subprocess.run(["chattr", "-i", *map(str, files)], check=False)
        wait_for("A's message to B receipted once B's store is writable",
                 lambda: mesh.pending(["A"]) == 0)

        # The store breaks for good: B fails, counted by its host; the others serve.
        (mesh.data_dir("B") / "break-now").touch()
        assert not mesh.send("A", "B", receipt_timeout_s=1.0)

        def b_failed() -> bool:
            states = {n.name: n for n in host_status(mesh, "B").nodes}
            return states["B"].state == "failed"

        wait_for("B failed in its host's status", b_failed)
        reply = host_status(mesh, "B")
        assert reply.failures == 1, reply
        assert {n.name: n.state for n in reply.nodes} == {
            "A": "serving", "B": "failed", "C": "serving"}, reply
        assert "injected store bug" in (next(n for n in reply.nodes if n.name == "B").error
                                        or "")
        with pytest.raises(ControlUnavailable):
            ControlClient(mesh.data_dir("B"), name="B").request(StatusRequest(), timeout_s=2)
        for sender, to in good:
            assert mesh.send(sender, to), f"{sender}->{to} after B failed"
        assert mesh.pending(["A"]) == 1  # A's message to B waits, stored at A

        # Repaired and restarted inside its running host: it takes what waited, once.
        (mesh.data_dir("B") / "break-now").unlink()
        pid = mesh.host_pid("B")
        mesh.cluster.restart("B")  # the host endpoint's `restart`
        assert mesh.host_pid("B") == pid
        for sender, to in [*good, ("A", "B"), ("B", "A")]:
            assert mesh.send(sender, to)
        mesh.finish(["A", "B", "C", "D"])
    finally:
        mesh.cluster.stop()



# -- 4. control: each hosted node's socket answers for itself --------------------------------


def _raw_request(endpoint: str, payload: bytes, routing_id: bytes) -> bytes:
    """One request on a DEALER with the routing id `routing_id`; the reply's bytes."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTING_ID, routing_id)
        sock.connect(endpoint)
        sock.send(payload)
        assert sock.poll(int(ANSWER_WAIT_S * 1000) * 3), f"no reply from {endpoint}"
        return sock.recv()
    finally:
        ctx.destroy(0)


def _control_endpoint(mesh: HostedMesh, name: str) -> str:
    return (mesh.data_dir(name) / ENDPOINT_FILE).read_text(encoding="utf-8").split()[0]


@pytest.mark.timeout(240)
def test_a_hosted_nodes_control_socket_acts_for_that_node_alone(short_tmp: Path) -> None:
    """X and Y in one host (Z in another): X's control socket answers as X, sends as X, joins
    X to a group and subscribes to X's events only, even for a client using the same routing
    id at Y; a host request sent to X's control socket, or a control request to the host's
    endpoint, is refused and acts on nothing."""
    mesh = HostedMesh(short_tmp, ["X", "Y", "Z"], per_process=2)
    try:
        mesh.cluster.start()
        x_end, y_end = _control_endpoint(mesh, "X"), _control_endpoint(mesh, "Y")
        assert x_end != y_end
        x, y = mesh.status("X"), mesh.status("Y")
        assert (x["name"], y["name"]) == ("X", "Y")
        assert x["pid"] == y["pid"] and x["node_id"] != y["node_id"]

        # One client routing id, a subscription at each: each sees its own node's arrivals.
        same = b"one-client"
        for end in (x_end, y_end):
            got = reply_decoder.decode(_raw_request(end, encoder.encode(
                EventsRequest(wait_s=0.0, id=1)), same))
            assert isinstance(got, EventsReply), got
        assert mesh.send("Z", "X") and mesh.send("Z", "Y") and mesh.send("X", "Z")
        seen = {}
        for name, end in (("X", x_end), ("Y", y_end)):
            got = reply_decoder.decode(_raw_request(end, encoder.encode(
                EventsRequest(wait_s=5.0, id=2)), same))
            assert isinstance(got, EventsReply), got
            seen[name] = {(i.sender, i.body) for i in got.incoming}
        assert seen == {"X": {("Z", "Z>X #1")}, "Y": {("Z", "Z>Y #2")}}, seen

        # A group joined through X's socket has X as a member, never Y.
        with ControlClient(mesh.data_dir("X"), name="X") as client:
            joined = checked(client.request(GroupRequest(action="join", group="ops", id=3),
                                            timeout_s=ANSWER_WAIT_S))
        assert joined.members == ["X"], joined
        wait_for("Y to hear that X joined", lambda: "ops" in mesh.status("Y")["groups"])
        assert mesh.status("Y")["groups"]["ops"] == ["X"]
        # X's send through its socket left from X: Z stored it from X, Y sent nothing.
        with StoreReader.for_data_dir(mesh.data_dir("Z")) as reader:
            assert [(m.sender, m.body) for m in reader.history(direction="in")
                    if ">" in m.body] == [("X", "X>Z #3")]
        with StoreReader.for_data_dir(mesh.data_dir("Y")) as reader:
            assert not reader.history(direction="out")

        # The host's records and the nodes' do not mix: each endpoint refuses the other's.
        folder = mesh.cluster.host_of("Y").data_dir
        restart = msgspec.msgpack.encode(HostRequest("restart", "Y", 7))
        got = reply_decoder.decode(_raw_request(x_end, restart, b"host-client"))
        assert isinstance(got, ErrorReply) and got.kind == "bad_request", got
        host_end = (folder / HOST_ENDPOINT_FILE).read_text(encoding="utf-8").split()[0]
        reply = msgspec.msgpack.decode(_raw_request(host_end, encoder.encode(
            StatusRequest(id=8)), b"control-client"), type=HostReply)
        assert reply.error is not None and reply.error.startswith("bad host request"), reply
        assert {n.name: n.starts for n in host_status(mesh, "Y").nodes} == {"X": 1, "Y": 1}
        assert mesh.status("Y")["node_id"] == y["node_id"]
        mesh.finish(["X", "Y", "Z"])
    finally:
        mesh.cluster.stop()


# -- 5. the process dies: every node of it, and nothing lost ---------------------------------


@pytest.mark.timeout(300)
def test_a_host_aborted_takes_its_nodes_down_together_and_loses_nothing(
    short_tmp: Path,
) -> None:
    """What a libzmq assertion (abort()) in a host does: every node of that process goes at
    once, the other hosts' messages to them wait in their own outboxes, nothing restarts the
    host by itself, and `cluster restart` of one of its nodes starts the whole host again,
    after which every waiting message is stored once."""
    mesh = HostedMesh(short_tmp, ["A", "B", "C", "D"], per_process=2)
    try:
        mesh.cluster.start()
        for sender, to in [("A", "B"), ("A", "C"), ("D", "B"), ("C", "A")]:
            assert mesh.send(sender, to)
        host = mesh.cluster.host_of("A")
        assert host.process is not None
        os.kill(host.pid, signal.SIGABRT)
        assert host.process.wait(ANSWER_WAIT_S) == -signal.SIGABRT
        for name in ("A", "B"):
            with pytest.raises(ControlUnavailable):
                ControlClient(mesh.data_dir(name), name=name).request(StatusRequest(),
                                                                      timeout_s=2)
        for sender, to in [("C", "A"), ("D", "B"), ("C", "B")]:
            assert not mesh.send(sender, to, receipt_timeout_s=0.5)
        assert mesh.pending(["C", "D"]) == 3
        assert mesh.send("C", "D") and mesh.send("D", "C")  # the other host serves
        assert not host.alive()  # nothing restarted it
        restarted = mesh.cluster.restart("B")  # its host is dead: the whole host starts
        assert restarted.pid != host.pid and mesh.host_pid("A") == restarted.pid
        wait_for("every waiting message receipted", lambda: mesh.pending(["C", "D"]) == 0,
                 timeout_s=DRAIN_TIMEOUT_S)
        assert mesh.send("A", "D") and mesh.send("B", "C")
        mesh.finish(["A", "B", "C", "D"])
    finally:
        mesh.cluster.stop()


# -- 6. a worker's handlers, busy: the other nodes of its process keep their threads ---------

#: A task handler that blocks until its release file exists (what a slow real handler is,
#: without a time in the test): loaded in the host through PYTHONPATH.
BLOCKING_HANDLER = """
import os
import time
from pathlib import Path


def wait(body):
    release = Path(os.environ["HOSTADV_RELEASE"])
    (release.parent / "started").mkdir(exist_ok=True)
    (release.parent / "started" / body).touch()
    while not release.exists():
        time.sleep(0.02)
    return body.upper()
"""
TASKS = 16
#: Threads of an event loop's default executor (`asyncio.to_thread`'s), which W's handlers
#: filled before they had threads of their own (on a machine of 12 CPUs or more, 16 tasks
#: leave some free and the old code would pass: it is 6 on this project's 2-core machines).
DEFAULT_EXECUTOR_THREADS = min(32, (os.cpu_count() or 1) + 4)


@pytest.mark.timeout(300)
def test_a_workers_busy_handlers_leave_the_other_nodes_of_its_process_their_threads(
    short_tmp: Path,
) -> None:
    """W serves queue `work` with a handler that blocks (a slow job) and V, a peer in another
    host, submits 16 tasks: W runs them at once (16 in flight per queue). S, hosted beside W,
    must still answer its control socket (`status` reads its store on a thread) and restart
    in place (its store opens on a thread), and W its own, while every handler still blocks;
    then the handlers are released and every result reaches V, once."""
    site = short_tmp / "site"
    site.mkdir()
    (site / "hosted_blocking.py").write_text(BLOCKING_HANDLER, encoding="utf-8")
    release = short_tmp / "release"
    mesh = HostedMesh(short_tmp, ["W", "S", "V"], per_process=2, env={
        "PYTHONPATH": os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "HOSTADV_RELEASE": str(release)})
    config = mesh.cluster.config_path
    config.write_text(config.read_text(encoding="utf-8").replace(
        "[nodes.W]\n", '[nodes.W]\nworker = ["work=hosted_blocking:wait"]\n'), encoding="utf-8")
    try:
        mesh.cluster.start()
        assert mesh.host_pid("W") == mesh.host_pid("S") != mesh.host_pid("V")

        def v_heard_w() -> bool:
            with StoreReader.for_data_dir(mesh.data_dir("V")) as reader:
                return any(r.sender == "W" and r.kind == "serve" for r in reader.history())

        wait_for("V to hear that W serves `work`", v_heard_w)
        bodies = [f"task {i}" for i in range(TASKS)]
        with ControlClient(mesh.data_dir("V"), name="V") as client:
            checked(client.request(SubmitRequest(queue="work", sink="V", bodies=bodies,
                                                 lease_s=600.0), timeout_s=60))
        wait_for("W to hold every task",
                 lambda: sum(1 for b in bodies_at(mesh.data_dir("W")) if b in bodies) == TASKS)
        # W's handlers started, as many as could (none returns: not released).
        wait_for("W's handlers to start", lambda: len(list(
            (short_tmp / "started").glob("*"))) >= min(TASKS, DEFAULT_EXECUTOR_THREADS))
        assert mesh.status("S")["name"] == "S", "S's control socket answers"
        assert mesh.status("W")["name"] == "W", "W's own control socket answers"
        pid = mesh.host_pid("S")
        mesh.cluster.restart("S")  # S's store opens again on a thread
        assert mesh.host_pid("S") == pid
        assert mesh.send("V", "S") and mesh.send("S", "V")
        release.touch()

        def results() -> list[str]:
            with StoreReader.for_data_dir(mesh.data_dir("V")) as reader:
                return [b for _t, _w, _m, b in reader.task_results()]

        wait_for("every result at V", lambda: len(results()) == TASKS)
        assert sorted(results()) == sorted(b.upper() for b in bodies)
        mesh.finish(["W", "S", "V"])
    finally:
        release.touch()
        mesh.cluster.stop()


# -- 7. big stores verified after start: the other nodes of the host still start ------------

#: Loaded into the host (PYTHONPATH) once `slow-verify` exists: every store of more than 10
#: rows is verified after start (as one of more than 100,000 is), and that pass does not end
#: until `verify-release` exists (what 25-30 s for a store of 10M rows is, without a time).
SLOW_VERIFIER = """
import os
import time
from pathlib import Path

flag = Path(os.environ["HOSTADV_SLOW_VERIFY"])
if flag.exists():
    import meshpost.store.sqlite as sqlite_module
    from meshpost.store.verifier import Verifier

    sqlite_module.OPEN_VERIFY_ROWS = 10
    _step = Verifier.step

    def step(self, *args, **kwargs):
        while not flag.with_name("verify-release").exists():
            time.sleep(0.02)
        return _step(self, *args, **kwargs)

    Verifier.step = step
"""
BIG_HOST = [f"N{i}" for i in range(1, 10)]


@pytest.mark.timeout(400)
def test_a_host_of_big_stores_starts_every_node_while_their_verification_runs(
    short_tmp: Path,
) -> None:
    """Nine nodes in one host, each store big enough to be verified after start (here: more
    than 10 rows, each pass held until released). Every node must start, serve and answer
    its control socket while the passes run, and each pass then ends with its store good."""
    site = short_tmp / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SLOW_VERIFIER, encoding="utf-8")
    flag = short_tmp / "slow-verify"
    mesh = HostedMesh(short_tmp, BIG_HOST, per_process=len(BIG_HOST), env={
        "PYTHONPATH": os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "HOSTADV_SLOW_VERIFY": str(flag)})
    pairs = list(zip(BIG_HOST, BIG_HOST[1:] + BIG_HOST[:1], strict=True))
    try:
        mesh.cluster.start()
        for _ in range(8):  # 8 out and 8 in: 16 rows a store, more than 10
            for sender, to in pairs:
                assert mesh.send(sender, to)
        mesh.cluster.stop()
        flag.touch()
        mesh.cluster.start()  # NodeNotStarted if a node does not serve and answer
        for name in BIG_HOST:
            assert mesh.status(name)["name"] == name
        for sender, to in pairs:
            assert mesh.send(sender, to)
        flag.with_name("verify-release").touch()
        host_log = mesh.cluster.host_of("N1").log_path
        wait_for("every store verified", lambda: host_log.read_text(
            errors="replace").count("store verified:") == len(BIG_HOST))
        mesh.finish(BIG_HOST)
    finally:
        flag.with_name("verify-release").touch()
        mesh.cluster.stop()


# -- 8. descriptors: connections to every node of a host at once ----------------------------

#: The host's descriptor limit, soft and hard (set at its start: it cannot raise it).
HOST_FD_LIMIT = 512
#: Idle TCP connections opened to each hosted node, all held at once: together several
#: times the host's whole limit.
IDLE_PER_NODE = 300
FD_LIMITER = f"""
import resource

resource.setrlimit(resource.RLIMIT_NOFILE, ({HOST_FD_LIMIT}, {HOST_FD_LIMIT}))
"""


def _idle_connections(port: int, count: int) -> list[socket.socket]:
    opened = []
    for _ in range(count):
        with contextlib.suppress(OSError):  # a full backlog refuses before any descriptor
            opened.append(socket.create_connection(("127.0.0.1", port), timeout=5))
    return opened


@pytest.mark.timeout(300)
def test_idle_connections_to_every_node_of_a_host_cannot_use_up_its_descriptors(
    short_tmp: Path,
) -> None:
    """Four nodes in one host limited to 512 descriptors; 300 idle TCP connections to each
    node, held at once. libzmq aborts the whole process when an accept on an ipc listener
    (a control socket) meets EMFILE; each node's inbound cap is its share of the limit, so
    the host lives, every node answers its control socket and exchanges, and each counts the
    connections it refused."""
    site = short_tmp / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(FD_LIMITER, encoding="utf-8")
    names = ["A", "B", "C", "D"]
    mesh = HostedMesh(short_tmp, [*names, "E"], per_process=4, transport="tcp", env={
        "PYTHONPATH": os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])])})
    pairs = [("A", "B"), ("B", "C"), ("C", "D"), ("D", "A"), ("E", "A"), ("C", "E")]
    held: list[socket.socket] = []
    try:
        mesh.cluster.start()
        host = mesh.cluster.host_of("A")
        assert psutil.Process(host.pid).rlimit(resource.RLIMIT_NOFILE) == (
            HOST_FD_LIMIT, HOST_FD_LIMIT)
        for sender, to in pairs:
            assert mesh.send(sender, to)
        with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
            for opened in pool.map(lambda n: _idle_connections(
                    int(mesh.endpoint(n).rsplit(":", 1)[1]), IDLE_PER_NODE), names):
                held += opened
        assert len(held) > HOST_FD_LIMIT
        for name in names:
            assert mesh.status(name)["name"] == name, f"{name}'s control socket"
        for sender, to in pairs:
            assert mesh.send(sender, to), f"{sender}->{to} while the connections are held"
        assert host.alive()
        for name in names:
            assert mesh.status(name)["stats"]["inbound_refused"] > 0, name
        mesh.finish([*names, "E"])
    finally:
        for sock in held:
            sock.close()
        mesh.cluster.stop()


# -- 9. the host's own endpoint ----------------------------------------------------------------


def test_the_host_endpoint_answers_every_request_and_keeps_its_socket_its_own(
    short_tmp: Path,
) -> None:
    """The host's endpoint (`cluster status/restart`; a `NodeHost` in this process here) is a
    local control socket too. A request
    of two ZeroMQ parts gets an error reply (it got none: the client waited out its timeout,
    as the nodes' control sockets did before docs/protocol.md 14.2). A host folder too long
    for a socket path in it, given as one of its nodes' data dirs, got the very socket path
    of that node's control socket (both hashed from `FOLDER/control.sock`): the node's bind
    replaced the host's, and `cluster status` read a node's reply as the host's."""
    folder = short_tmp / ("h" * 60) / ("o" * 40)
    cluster = LocalCluster.create(short_tmp, 2, transport="ipc", options=FAST_OPTIONS)
    mesh = MeshConfig.load(cluster.config_path)
    configs = [mesh.node("A", data_dir=folder), mesh.node("B")]

    async def scenario() -> None:
        async with NodeHost(configs, folder=folder) as host:
            assert host.serving == ["A", "B"]
            reply = await asyncio.to_thread(_host_request, folder)
            assert [n.name for n in reply.nodes] == ["A", "B"] and reply.error is None
            endpoint = (folder / HOST_ENDPOINT_FILE).read_text(encoding="utf-8").split()[0]
            assert endpoint != _control_endpoint_of(folder)
            parts = await asyncio.to_thread(_two_parts, endpoint)
            assert parts.error is not None and "one ZeroMQ message part" in parts.error, parts

    asyncio.run(asyncio.wait_for(scenario(), 120))


def _host_request(folder: Path) -> HostReply:
    with HostClient(folder) as client:
        return client.request("status", timeout_s=ANSWER_WAIT_S)


def _control_endpoint_of(data_dir: Path) -> str:
    return (data_dir / ENDPOINT_FILE).read_text(encoding="utf-8").split()[0]


def _two_parts(endpoint: str) -> HostReply:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        sock.send_multipart([msgspec.msgpack.encode(HostRequest("status", "", 5)), b"more"])
        assert sock.poll(int(ANSWER_WAIT_S * 1000)), "no reply to a request of two parts"
        return msgspec.msgpack.decode(sock.recv(), type=HostReply)
    finally:
        ctx.destroy(0)


# -- 10. unknown keys, one after another -------------------------------------------------------

UNKNOWN_KEYS = 200


@pytest.mark.timeout(240)
def test_handshakes_with_unknown_keys_are_counted_each_and_cannot_flood_the_hosts_log(
    short_tmp: Path,
) -> None:
    """200 CURVE handshakes with made-up keys at Y, a secure hosted node: each refused and
    counted at Y, but the host's log (every node's) takes 20 lines, then one every 10 s
    saying how many went unlogged, as for the frames the transport drops: a line each (about
    130 bytes a handshake) filled the disk at the speed of the handshakes."""
    mesh = HostedMesh(short_tmp, ["X", "Y"], per_process=2, extra_args=["--secure"])
    publics = keys.generate_mesh_keys({n: mesh.data_dir(n) for n in ("X", "Y")})
    try:
        mesh.cluster.start()
        started = time.monotonic()
        for _ in range(UNKNOWN_KEYS):
            public, secret = zmq.curve_keypair()
            with curve_dealer(mesh.endpoint("Y"), publics["Y"], public, secret) as (_s, mon):
                assert handshake_outcome(mon) == zmq.EVENT_HANDSHAKE_FAILED_AUTH
        elapsed = time.monotonic() - started
        assert mesh.status("Y")["stats"]["denied_connections"] == UNKNOWN_KEYS
        assert mesh.send("X", "Y") and mesh.send("Y", "X")
        log_text = mesh.cluster.host_of("Y").log_path.read_text(errors="replace")
        lines = log_text.count("[Y] CURVE client with unknown key")
        assert lines <= LOG_BURST + elapsed / LOG_EVERY_S + 1, lines
        mesh.finish(["X", "Y"])
    finally:
        mesh.cluster.stop()

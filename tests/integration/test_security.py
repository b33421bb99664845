"""CURVE security: only allowlisted keys get in, a key speaks only for its own name, and an
authenticator that is not running means no traffic at all. Each hostile client's accepted
message count is printed and must be 0."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from meshpost import keys
from meshpost.cluster import LocalCluster
from meshpost.control import ControlClient, SendRequest
from meshpost.protocol import PROTOCOL_VERSION, Batch, Envelope, Hello, decode, encode
from meshpost.store import StoreReader
from meshpost.transport import ZmqTransport

pytestmark = pytest.mark.integration
REPLY_WAIT_MS = 1500


@pytest.fixture
def secure_pair(short_tmp: Path) -> Iterator[LocalCluster]:
    cluster = LocalCluster.create(short_tmp, 2, transport="tcp", extra_args=["--secure"])
    keys.generate_mesh_keys({n: cluster.data_dir(n) for n in cluster.names})
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


def stored_at_b(cluster: LocalCluster) -> int:
    with StoreReader.for_data_dir(cluster.data_dir("B")) as reader:
        return reader.counts().get("in/received", 0)


def dealer(
    ctx: zmq.Context[zmq.Socket[bytes]], routing_id: str,
    curve: tuple[bytes, bytes, bytes] | None,
) -> zmq.Socket[bytes]:
    """A DEALER that presents itself as `routing_id`, with CURVE (server, public, secret) keys."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTING_ID, routing_id.encode())
    if curve is not None:
        server_key, public, secret = curve
        sock.setsockopt(zmq.CURVE_SERVERKEY, server_key)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
    return sock


def hostile_exchange(
    endpoint: str, *, routing_id: str, name: str, sender: str, curve: tuple[bytes, bytes,
                                                                            bytes] | None,
) -> list[object]:
    """Connect like a peer would, say Hello and send one message; return decoded replies."""
    ctx = zmq.Context()
    sock = dealer(ctx, routing_id, curve)
    # A failed handshake leaves no connection to queue on: sends must not block forever.
    sock.setsockopt(zmq.SNDTIMEO, REPLY_WAIT_MS)
    sock.connect(endpoint)
    now = time.time_ns()
    message = Envelope(f"{now:x}hostile", 1_000_000, sender, "B", "intruder", now, 1)
    replies: list[object] = []
    try:
        sock.send(encode(Hello(PROTOCOL_VERSION, "feedface", name, now, 1)))
        if sock.poll(REPLY_WAIT_MS):
            replies.append(decode(sock.recv(), max_bytes=1 << 20))
        sock.send(encode(Batch(now, [message])))
        while sock.poll(REPLY_WAIT_MS):
            replies.append(decode(sock.recv(), max_bytes=1 << 20))
    except zmq.Again:
        replies.append("send refused: no authenticated connection")
    finally:
        sock.close(0)
        ctx.term()
    return replies


def test_secure_mesh_delivers_and_refuses_every_hostile_client(
    secure_pair: LocalCluster,
) -> None:
    cluster = secure_pair
    endpoint = cluster.endpoints["B"]
    with ControlClient(cluster.data_dir("A"), name="A") as client:
        reply = client.request(SendRequest("B", "legit", 10.0), timeout_s=20)
    assert reply.ok and reply.sent[0].delivered, "the legitimate peer gets through"
    assert stored_at_b(cluster) == 1

    _b_secret, b_public = keys.load_own(cluster.data_dir("B"))
    a_secret, a_public = keys.load_own(cluster.data_dir("A"))
    stranger_public, stranger_secret = zmq.curve_keypair()
    wrong_server, _ = zmq.curve_keypair()
    attempts = {
        "no CURVE at all": dict(routing_id="A", name="A", sender="A", curve=None),
        "wrong server key": dict(routing_id="A", name="A", sender="A",
                                 curve=(wrong_server, a_public, a_secret)),
        "unknown client key": dict(routing_id="A", name="A", sender="A",
                                   curve=(b_public, stranger_public, stranger_secret)),
        "A's key, routing id B": dict(routing_id="B", name="B", sender="B",
                                      curve=(b_public, a_public, a_secret)),
        "A's key, Hello as B": dict(routing_id="A", name="B", sender="B",
                                    curve=(b_public, a_public, a_secret)),
    }
    accepted = {}
    for label, kwargs in attempts.items():
        before = stored_at_b(cluster)
        hostile_exchange(endpoint, **kwargs)  # type: ignore[arg-type]
        accepted[label] = stored_at_b(cluster) - before
    print("hostile clients, messages accepted:", accepted)
    assert accepted == dict.fromkeys(attempts, 0)
    assert cluster.nodes["B"].alive(), "B survives every attempt"


def test_a_legitimate_resend_is_stored_once_and_receipted_again(
    secure_pair: LocalCluster,
) -> None:
    cluster = secure_pair
    _b_secret, b_public = keys.load_own(cluster.data_dir("B"))
    a_secret, a_public = keys.load_own(cluster.data_dir("A"))
    ctx = zmq.Context()
    sock = dealer(ctx, "A", (b_public, a_public, a_secret))
    sock.connect(cluster.endpoints["B"])
    now = time.time_ns()
    frame = encode(Batch(now, [Envelope(f"{now:x}again", 424242, "A", "B", "twice", now, 1)]))
    receipts = 0
    try:
        sock.send(encode(Hello(PROTOCOL_VERSION, "feedface", "A", now, 1)))
        assert sock.poll(5000)
        sock.recv()
        for _ in range(2):
            sock.send(frame)  # the same bytes twice: a replay by a legitimate peer
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and sock.poll(500):
                if type(decode(sock.recv(), max_bytes=1 << 20)).__name__ == "ReceiptFrame":
                    receipts += 1
                    break
    finally:
        sock.close(0)
        ctx.term()
    assert receipts == 2, "each copy is receipted"
    with StoreReader.for_data_dir(cluster.data_dir("B")) as reader:
        assert [m.body for m in reader.history(direction="in")] == ["twice"]


def test_no_authenticator_means_no_traffic(tmp_path: Path) -> None:
    """Fail closed: with the ZAP handler stopped, even a valid key gets nothing through."""
    server_public, server_secret = zmq.curve_keypair()
    client_public, client_secret = zmq.curve_keypair()

    async def scenario() -> int:
        transport = ZmqTransport(
            name="B", max_frame_bytes=1 << 20, curve_secret_key=server_secret,
            curve_public_key=server_public, peer_public_keys={"A": client_public},
        )
        try:
            assert transport._authenticator is not None
            transport._authenticator.stop()
            (endpoint,) = transport.bind(["tcp://127.0.0.1:*"])
            ctx = zmq.Context()
            sock = dealer(ctx, "A", (server_public, client_public, client_secret))
            sock.connect(endpoint)
            sock.send(b"anything", zmq.DONTWAIT) if sock.poll(100, zmq.POLLOUT) else None
            frames: list[bytes] = []
            transport.start(lambda _identity, data, _user: frames.append(data),
                            lambda _peer, _data: None)
            await asyncio.sleep(REPLY_WAIT_MS / 1000)
            sock.close(0)
            ctx.term()
            return len(frames)
        finally:
            transport.close()

    assert asyncio.run(scenario()) == 0


def test_keys_show_prints_the_line_again_and_a_failed_handshake_says_why(
    short_tmp: Path,
) -> None:
    """Issue 17 item 11: `keys show` replaces nothing; a sender whose key the receiver does
    not accept (or who holds a stale key of the receiver) is told why, from libzmq's socket
    monitor, not only "no receipt"."""
    import json
    import os
    import subprocess
    import sys

    def meshpost(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "meshpost", *args], capture_output=True,
                              text=True, timeout=60, stdin=subprocess.DEVNULL,
                              env=dict(os.environ))

    cluster = LocalCluster.create(short_tmp, 2, transport="tcp", extra_args=["--secure"])
    publics = keys.generate_mesh_keys({n: cluster.data_dir(n) for n in cluster.names})
    data_a = str(cluster.data_dir("A"))
    shown = meshpost("keys", "show", "--node", "A", "--data", data_a)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.strip() == f"A {publics['A'].decode()}"
    assert "add the line `A " in shown.stderr
    assert keys.load_public(cluster.data_dir("A")) == publics["A"], "show replaces nothing"
    # A gets a new key that B does not know; B still holds A's old key for dialing A.
    regenerated = meshpost("keys", "generate", "--node", "A", "--data", data_a, "--force")
    assert regenerated.returncode == 0, regenerated.stderr
    cluster.start()
    try:
        sent = meshpost("send", "--node", "A", "--data", data_a, "--to", "B", "--timeout",
                        "3", "hello?")
        assert sent.returncode == 3
        assert "B: handshake refused" in sent.stderr and "does not accept" in sent.stderr
        assert "`meshpost keys show --node A`" in sent.stderr  # the command as it is typed
        peers_b = meshpost("peers", "--node", "B", "--data", str(cluster.data_dir("B")),
                           "--json")
        (a_seen_by_b,) = json.loads(peers_b.stdout)["peers"]
        assert "handshake failed" in (a_seen_by_b["refusal"] or "")
    finally:
        cluster.stop()

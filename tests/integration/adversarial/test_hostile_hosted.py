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

import contextlib
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from meshpost import keys
from meshpost.cluster import LocalCluster
from meshpost.control import ControlClient, SendRequest, StatusRequest, checked
from meshpost.protocol import (
    PROTOCOL_VERSION,
    Batch,
    Envelope,
    Hello,
    Refuse,
    RefuseCode,
    Welcome,
    decode,
    encode,
)
from meshpost.store import StoreReader
from tests.integration.faults.checker import FAST_OPTIONS, Ledger, evaluate

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
                 options: Mapping[str, Any] | None = None) -> None:
        self.cluster = LocalCluster.create(
            root, len(names), names=list(names), transport="ipc", per_process=per_process,
            peers=peers, extra_args=tuple(extra_args),
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

    def finish(self, running: Sequence[str]) -> None:
        """Wait until no outbox of `running` holds a pending message, stop every host, and
        check every attempted message stored once on each side."""
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while self.pending(running):
            assert time.monotonic() < deadline, f"outboxes not drained: {self.pending(running)}"
            time.sleep(0.1)
        codes = self.cluster.stop()
        assert all(code == 0 for code in codes.values()), codes
        stores = {n: self.data_dir(n) for n in running}
        counts = evaluate("hosted", self.ledger, stores)
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

        # M's key at Y, in the same process, which does not list it: refused at the handshake.
        for claimed in ("M", "X"):
            with curve_dealer(mesh.endpoint("Y"), publics["Y"], m_public, m_secret) as (s, mon):
                assert handshake_outcome(mon) == zmq.EVENT_HANDSHAKE_FAILED_AUTH
                with contextlib.suppress(zmq.Again):  # no connection to queue on
                    s.send(hello(claimed))
                    s.send(batch(claimed, "Y", f"M as {claimed} at Y"))
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

"""A hostile peer against real `meshpost node` processes: what it sends must cost no other
peer's message, and a name or node id it claims must take nothing from the peer it names.

Each test plays the hostile peer with raw pyzmq DEALERs speaking the wire format, while real
nodes exchange through their control endpoints; the fault battery's checker then proves every
acknowledged message stored once on each side (`Mesh.finish`).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import threading
import time
from typing import Any

import pytest
import zmq

from meshpost.config import DEFAULT_MAX_MESSAGE_BYTES
from meshpost.control import SendRequest, StatusRequest
from meshpost.node.claims import CLAIM_CHECK_TIMEOUT_S
from meshpost.protocol import (
    PROTOCOL_VERSION,
    Batch,
    Bye,
    Envelope,
    Hello,
    Ping,
    Pong,
    ReceiptFrame,
    Refuse,
    RefuseCode,
    Welcome,
    decode,
    encode,
    to_ranges,
)
from meshpost.protocol.claims import CLAIM_CHECK_INTERVAL_NS
from meshpost.protocol.frames import max_frame_bytes
from meshpost.protocol.ratelimit import INPUT_WARNINGS_BURST, INPUT_WARNINGS_PER_S
from meshpost.transport.inbound import LOG_BURST, LOG_EVERY_S
from tests.integration.faults.checker import NoAnswer, read_rows

from .conftest import MeshFactory, until_true

pytestmark = [pytest.mark.faults, pytest.mark.integration]

#: A's sends while the claimant runs must be receipted within this (B answers in ms).
RECEIPT_TIMEOUT_S = 10.0


class Claimant:
    """Connections that all say Hello as `name` with `node_id` (a peer's, learnt from any
    Hello it sent), kept busy so that each is more recently active than the real peer's:
    pings on all but one, then a Hello on the last, again and again, from a thread."""

    def __init__(self, endpoint: str, name: str, node_id: str, connections: int) -> None:
        self.ctx = zmq.Context()
        self.socks: list[zmq.Socket[bytes]] = []
        for _ in range(connections):
            sock = self.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(endpoint)
            self.socks.append(sock)
        self.hello = encode(Hello(version=PROTOCOL_VERSION, node_id=node_id, name=name,
                                  sent_at_ns=time.time_ns(), hlc=1))
        self.rounds = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        for sock in self.socks:
            sock.send(self.hello)
        self._thread.start()

    def _run(self) -> None:
        *pingers, last = self.socks
        dropped: set[int] = set()  # connections B dropped the session of: Hello again
        while not self._stop.is_set():
            for i, sock in enumerate(pingers):
                frame = self.hello if i in dropped else encode(Ping(sent_at_ns=time.time_ns()))
                with contextlib.suppress(zmq.Again):  # B reads slower than we write
                    sock.send(frame, zmq.NOBLOCK)
            dropped.clear()
            with contextlib.suppress(zmq.Again):
                last.send(self.hello, zmq.NOBLOCK)
            for i, sock in enumerate(self.socks):  # read B's answers: its queues stay short
                while sock.poll(0):
                    answer = decode(sock.recv(), max_bytes=1 << 20)
                    if isinstance(answer, Refuse) and answer.code == RefuseCode.HELLO_REQUIRED:
                        dropped.add(i)
            self.rounds += 1
            self._stop.wait(0)

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        for sock in self.socks:
            sock.close(0)
        self.ctx.term()


def test_a_claimant_of_a_peers_name_and_node_id_cannot_cut_its_connection(
    mesh_factory: MeshFactory,
) -> None:
    """Before the fix B kept at most 4 sessions per name and dropped the least recently
    active one at a Hello past that: a claimant whose 4 connections stayed more active than
    A's dropped A's session again and again, and A's batches got `hello-required` (no
    receipt within 10 s for most of A's sends while it ran)."""
    mesh = mesh_factory(["A", "B"], seed=25)
    claimant: Claimant | None = None

    async def scenario() -> None:
        nonlocal claimant
        await mesh.start()
        await mesh.stream("A", "B", 10, tag="before", concurrency=10)
        node_id = (await mesh.status("A"))["node_id"]
        claimant = Claimant(mesh.endpoint("B"), "A", node_id, connections=4)
        mesh.cleanups.append(claimant.close)
        claimant.start()
        await asyncio.sleep(0.5)  # the claimant's sessions are up and busy
        first = len(mesh.ledger)
        await mesh.stream("A", "B", 40, tag="during", concurrency=10,
                          receipt_timeout_s=RECEIPT_TIMEOUT_S)
        during = list(mesh.ledger.attempts.values())[first:]
        receipted = sum(a.receipted for a in during)
        mesh.extra["receipted_while_claimed"] = f"{receipted}/{len(during)}"
        mesh.extra["claimant_rounds"] = claimant.rounds
        claimant.close()
        counts = await mesh.finish()
        assert receipted == len(during), (
            f"only {receipted}/{len(during)} of A's sends receipted while its name was claimed")
        assert counts.accepted == counts.receipted == counts.stored == counts.attempted

    mesh.run(scenario)


# -- a hostile listener: one Receipt of many narrow ranges over seqs never sent ---------------


class BombingListener:
    """K's place in the mesh: welcomes A and keeps what it sends without receipting it until
    told to `bomb`: then one Receipt as large as A accepts, of ranges each as wide as what A
    has in flight but over seqs A never sent, and from then on honest receipts."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.stored: dict[str, Envelope] = {}
        self.seqs: set[int] = set()
        self.arrivals = 0
        self.bomb_ranges = 0
        self.errors: list[str] = []
        self._bomb = threading.Event()
        self.bombed = threading.Event()
        self._honest = False
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fake-K", daemon=True)

    def __enter__(self) -> BombingListener:
        self._thread.start()
        assert self._ready.wait(10), "fake listener did not bind"
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def bomb(self) -> None:
        self._bomb.set()

    def _receipt(self, ranges: list[tuple[int, int]], echo_ns: int) -> ReceiptFrame:
        now = time.time_ns()
        return ReceiptFrame(ranges=ranges, echo_tx_at_ns=echo_ns, received_at_ns=now,
                            stored_at_ns=now, replied_at_ns=now, hlc=now, sync="full")

    def _bomb_frame(self) -> bytes:
        width = len(self.seqs)  # what A has in flight (none of it receipted yet)
        lo = max(self.seqs) + 1_000  # above every seq A sent: nothing in them is in flight
        # Each pair of 16-bit seqs takes 7 bytes; stay under A's frame limit.
        count = (max_frame_bytes(DEFAULT_MAX_MESSAGE_BYTES) - 1_000) // 7
        self.bomb_ranges = count
        ranges = [(lo + i % 1_000, lo + i % 1_000 + width - 1) for i in range(count)]
        return encode(self._receipt(ranges, time.time_ns()))

    def _answer(self, frame: Any) -> Any:
        now = time.time_ns()
        match frame:
            case Hello():
                return Welcome(PROTOCOL_VERSION, "fake-k-node-id", "K", now, now, "full")
            case Ping(sent_at_ns=t1):
                return Pong(t1, now, now, pending=0 if self._honest else 1)
            case Batch(messages=messages, tx_at_ns=tx):
                for m in messages:
                    self.arrivals += 1
                    if self.stored.setdefault(m.id, m) != m:
                        self.errors.append(f"{m.id}: a different message under the same id")
                    self.seqs.add(m.seq)
                if self._honest:
                    return self._receipt(to_ranges([m.seq for m in messages]), tx)
                return None
            case _:
                return None

    def _run(self) -> None:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        peer: bytes | None = None
        try:
            sock.bind(self.endpoint)
            self._ready.set()
            while not self._stop.is_set():
                if self._bomb.is_set() and peer is not None and not self._honest:
                    sock.send_multipart([peer, self._bomb_frame()])
                    self._honest = True
                    self.bombed.set()
                    # Then the truth: everything kept so far is stored.
                    sock.send_multipart([peer, encode(self._receipt(
                        to_ranges(sorted(self.seqs)), time.time_ns()))])
                if not sock.poll(50):
                    continue
                identity, data = sock.recv_multipart()
                peer = identity
                try:
                    reply = self._answer(decode(data, max_bytes=1 << 24))
                except Exception as exc:  # a bug of this fake: reported by the test
                    self.errors.append(repr(exc))
                    continue
                if reply is not None:
                    sock.send_multipart([identity, encode(reply)])
        finally:
            sock.close(0)
            ctx.term()


#: Messages A holds in flight to K when the bomb comes (the wider each range, the costlier).
IN_FLIGHT_TO_K = 1_000
#: A answers a status request in milliseconds; the old code took about 30 s (1,000 in flight).
ANSWER_TIMEOUT_S = 10.0


def test_a_receipt_of_many_ranges_over_unsent_seqs_does_not_stall_the_node(
    mesh_factory: MeshFactory,
) -> None:
    """Before the fix the dialer walked every range seq by seq when it was no wider than
    what was in flight: one 3 MB Receipt of 450,000 ranges, 1,000 seqs wide each, none sent,
    held A's event loop (its links, listener and control endpoint) for about 30 s."""
    mesh = mesh_factory(["A", "B", "K"], real=["A", "B"], absent=["K"], seed=26)

    async def scenario() -> None:
        with BombingListener(mesh.endpoint("K")) as fake:
            await mesh.start()
            await mesh.wait_connected("A")
            for start in range(0, IN_FLIGHT_TO_K, 100):
                await asyncio.gather(*(
                    mesh.control("A", SendRequest(target="K", body=f"to K {i}", timeout_s=0.01))
                    for i in range(start, start + 100)))
            await until_true("K holds what A sent", lambda: len(fake.stored) == IN_FLIGHT_TO_K,
                             30)
            fake.bomb()
            assert await asyncio.to_thread(fake.bombed.wait, 10), "K never sent its receipt"
            # A reads it at once; a node whose loop it holds answers nothing meanwhile.
            await asyncio.sleep(0.2)
            try:
                await mesh.control("A", StatusRequest(), timeout_s=ANSWER_TIMEOUT_S)
            except NoAnswer:
                pytest.fail(f"A answered no status request for {ANSWER_TIMEOUT_S} s after "
                            f"K's receipt of {fake.bomb_ranges} ranges")
            first = len(mesh.ledger)
            await mesh.stream("A", "B", 20, tag="after the bomb", concurrency=5,
                              receipt_timeout_s=RECEIPT_TIMEOUT_S)
            during = list(mesh.ledger.attempts.values())[first:]
            receipted = sum(a.receipted for a in during)
            await until_true("A's outbox drained", lambda: not mesh.pending().get("A"), 60)
            stats = (await mesh.status("A"))["stats"]
            mesh.extra.update(receipted_after_bomb=f"{receipted}/{len(during)}",
                              bomb_ranges=fake.bomb_ranges, arrivals_at_K=fake.arrivals)
            assert not fake.errors, fake.errors
            kept_at_k = dict(fake.stored)
        assert receipted == len(during), (
            f"only {receipted}/{len(during)} of A's sends to B receipted after K's receipt")
        assert stats["store_errors"] == 0, stats
        # Everything A sent K is stored there once, and delivered at A.
        to_k = [r for r in read_rows(mesh.data_dir("A")) if r.recipient == "K"]
        assert len(to_k) == IN_FLIGHT_TO_K == len(kept_at_k)
        assert {r.id for r in to_k} == set(kept_at_k)
        assert {r.state for r in to_k} == {"delivered"}
        counts = await mesh.finish(assert_clean=False)
        assert counts.lost == counts.missing == counts.duplicated == counts.mismatched == 0, (
            counts.line())
        # The only rows nobody attempted through the ledger are A's messages to K.
        assert counts.phantom == IN_FLIGHT_TO_K, counts.line()
        assert counts.accepted == counts.receipted == counts.stored == counts.attempted

    mesh.run(scenario)


# -- a flood of cheap bad input must not flood the log ----------------------------------------

#: Malformed frames and name claims the flood sends (each is one warning on the old code).
FLOOD_FRAMES = 3_000
FLOOD_CLAIMS = 600
#: Two-part messages (three at the ROUTER), dropped by the transport.
FLOOD_MULTIPART = 1_000


def _flood(endpoint: str, hello: bytes) -> None:
    """FLOOD_FRAMES undecodable frames and FLOOD_CLAIMS Hellos claiming a live peer's name
    and node id, from two connections, as fast as they go; the sockets stay open (their
    queues are unbounded) until the caller closes the context."""
    ctx = zmq.Context.instance()
    junk, claims, parts = ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER)
    for sock in (junk, claims, parts):
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.connect(endpoint)
    for i in range(FLOOD_FRAMES):
        junk.send(b"\xc1" + i.to_bytes(4, "big"))
    for _ in range(FLOOD_CLAIMS):
        claims.send(hello)
    for _ in range(FLOOD_MULTIPART):
        parts.send_multipart([b"a", b"b"])
    _FLOOD_SOCKETS.extend((junk, claims, parts))


_FLOOD_SOCKETS: list[zmq.Socket[bytes]] = []


def test_a_flood_of_bad_frames_and_name_claims_is_counted_whole_and_logged_at_a_bounded_rate(
    mesh_factory: MeshFactory,
) -> None:
    """Before the fix every undecodable frame, every Hello claiming a name in session and
    every multipart message was one WARNING line (about 170 bytes for a 5-byte frame): a
    peer could fill the node's disk with its log at the speed of its own link."""
    mesh = mesh_factory(["A", "B"], seed=28)

    async def scenario() -> None:
        await mesh.start()
        await mesh.wait_connected("B")
        await mesh.stream("A", "B", 5, tag="before", concurrency=5)
        node_id = (await mesh.status("A"))["node_id"]
        hello = encode(Hello(version=PROTOCOL_VERSION, node_id=node_id, name="A",
                             sent_at_ns=time.time_ns(), hlc=1))
        before = (await mesh.status("B"))["stats"]
        lines_before = len(mesh.log_text("B").splitlines())
        started = time.monotonic()
        try:
            await asyncio.to_thread(_flood, mesh.endpoint("B"), hello)
            await mesh.stream("A", "B", 20, tag="during", concurrency=5)
            stats: dict[str, Any] = {}

            def counted() -> bool:
                return (stats.get("violations", 0) - before["violations"] >= FLOOD_FRAMES
                        and stats.get("name_claims", 0) - before["name_claims"]
                        >= FLOOD_CLAIMS)

            deadline = time.monotonic() + 60
            while not counted():
                assert time.monotonic() < deadline, f"B counted only {stats}"
                stats = (await mesh.status("B"))["stats"]
                await asyncio.sleep(0.1)
            elapsed_s = time.monotonic() - started
        finally:
            for sock in _FLOOD_SOCKETS:
                sock.close(0)
            _FLOOD_SOCKETS.clear()
        lines = mesh.log_text("B").splitlines()[lines_before:]
        warnings = [line for line in lines if " WARNING " in line and any(
            what in line for what in ("protocol violation", "said Hello as", "bad input"))]
        # The burst, then at most one a second, and the note that they are now only counted.
        bound = INPUT_WARNINGS_BURST + int(elapsed_s * INPUT_WARNINGS_PER_S) + 1
        mesh.extra.update(violations=stats["violations"] - before["violations"],
                          name_claims=stats["name_claims"] - before["name_claims"],
                          warnings=len(warnings), warnings_bound=bound,
                          elapsed_s=round(elapsed_s, 1))
        assert len(warnings) <= bound, (len(warnings), bound, warnings[-3:])
        assert any("counted" in line for line in warnings), warnings[-3:]
        # The transport's own line for dropped multipart messages, summed up past a burst.
        multipart = [line for line in lines if "-part message" in line]
        mesh.extra["multipart_warnings"] = len(multipart)
        assert 1 <= len(multipart) <= LOG_BURST + int(elapsed_s / LOG_EVERY_S) + 1, (
            len(multipart), multipart[-2:])
        counts = await mesh.finish()
        assert counts.accepted == counts.receipted == counts.stored == counts.attempted == 25

    mesh.run(scenario)


def _junk_listener(endpoint: str, ready: threading.Event, done: threading.Event) -> None:
    """K's place: welcomes every Hello of A's and answers Pings, and after the first Pong
    sends FLOOD_FRAMES undecodable frames."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    flooded, a_connection = False, b""
    try:
        sock.bind(endpoint)
        ready.set()
        while not done.is_set():
            if not sock.poll(50):
                continue
            identity, data = sock.recv_multipart()
            frame, now = decode(data, max_bytes=1 << 24), time.time_ns()
            if isinstance(frame, Hello):
                sock.send_multipart([identity, encode(
                    Welcome(PROTOCOL_VERSION, "fake-k-node-id", "K", now, now, "full"))])
                if frame.name == "A":  # B dials K too: only A's connection is flooded
                    a_connection = identity
            elif isinstance(frame, Ping):
                # A Ping comes on the connection A took our Welcome on: flood that one.
                sock.send_multipart([identity, encode(Pong(frame.sent_at_ns, now, now))])
                if identity == a_connection and not flooded:
                    for i in range(FLOOD_FRAMES):
                        sock.send_multipart([identity, b"\xc1" + i.to_bytes(4, "big")])
                    flooded = True
    finally:
        sock.close(0)
        ctx.term()


def test_a_listener_answering_with_a_flood_of_bad_frames_is_counted_not_logged_per_frame(
    mesh_factory: MeshFactory,
) -> None:
    """The dialer's side of the same rule: before the fix A logged a WARNING for every
    undecodable frame its peer K sent on their link."""
    mesh = mesh_factory(["A", "B", "K"], real=["A", "B"], absent=["K"], seed=29)
    ready, done = threading.Event(), threading.Event()
    fake = threading.Thread(target=_junk_listener, args=(mesh.endpoint("K"), ready, done),
                            daemon=True)

    async def scenario() -> None:
        fake.start()
        mesh.cleanups.append(done.set)
        assert await asyncio.to_thread(ready.wait, 10)
        started = time.monotonic()
        await mesh.start()
        stats: dict[str, Any] = {}
        deadline = time.monotonic() + 60
        while stats.get("undecodable", 0) < FLOOD_FRAMES:
            assert time.monotonic() < deadline, f"A counted only {stats}"
            await asyncio.sleep(0.1)
            stats = (await mesh.status("A"))["stats"]
        elapsed_s = time.monotonic() - started
        done.set()
        await mesh.stream("A", "B", 10, tag="after", concurrency=5)
        warnings = [line for line in mesh.log_text("A").splitlines()
                    if " WARNING " in line and "bad frame" in line]
        bound = INPUT_WARNINGS_BURST + int(elapsed_s * INPUT_WARNINGS_PER_S) + 1
        mesh.extra.update(undecodable=stats["undecodable"], warnings=len(warnings),
                          warnings_bound=bound)
        assert len(warnings) <= bound, (len(warnings), bound, warnings[-2:])
        counts = await mesh.finish()
        assert counts.accepted == counts.receipted == counts.stored == counts.attempted == 10

    mesh.run(scenario)


# -- a Bye under a peer's name --------------------------------------------------------------


class ByeSayer:
    """Says Hello as `name` with `node_id` (neither is proof) and then Bye, on a new
    connection every `every_s`: each Bye tells the node that `name` is shutting down."""

    def __init__(self, endpoint: str, name: str, node_id: str, every_s: float) -> None:
        self.endpoint, self.every_s = endpoint, every_s
        self.hello = encode(Hello(version=PROTOCOL_VERSION, node_id=node_id, name=name,
                                  sent_at_ns=time.time_ns(), hlc=1))
        self.byes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        ctx = zmq.Context()
        try:
            while not self._stop.is_set():
                sock = ctx.socket(zmq.DEALER)
                sock.setsockopt(zmq.LINGER, 100)
                sock.connect(self.endpoint)
                sock.send(self.hello)
                sock.send(encode(Bye(reason="shutting down")))
                sock.poll(20)
                sock.close()
                self.byes += 1
                self._stop.wait(self.every_s)
        finally:
            ctx.term()

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


def test_byes_under_a_peers_name_do_not_stop_the_node_sending_to_that_peer(
    mesh_factory: MeshFactory,
) -> None:
    """Before the fix every Bye reported the peer departed again and pushed the Hello that
    would bring the link back a ping interval later: Byes more often than that (here every
    0.05 s against 0.2 s) kept B's link to A down for as long as they came, and none of 40
    sends B -> A was receipted within 10 s. Now B says Hello at its usual pace, A welcomes
    it, and B's messages go (each Bye still makes B count A gone until then)."""
    mesh = mesh_factory(["A", "B"], seed=30)
    sayer: ByeSayer | None = None

    async def scenario() -> None:
        nonlocal sayer
        await mesh.start()
        await mesh.wait_connected("B")
        node_id = (await mesh.status("A"))["node_id"]
        sayer = ByeSayer(mesh.endpoint("B"), "A", node_id, every_s=0.05)
        mesh.cleanups.append(sayer.close)
        sayer.start()
        await asyncio.sleep(0.5)  # the Byes have started
        first = len(mesh.ledger)
        await mesh.stream("B", "A", 40, tag="during", concurrency=10,
                          receipt_timeout_s=RECEIPT_TIMEOUT_S)
        during = list(mesh.ledger.attempts.values())[first:]
        receipted = sum(a.receipted for a in during)
        sayer.close()
        mesh.extra.update(receipted_during_byes=f"{receipted}/{len(during)}", byes=sayer.byes)
        counts = await mesh.finish()
        assert receipted == len(during), (
            f"only {receipted}/{len(during)} of B's sends to A receipted during the Byes")
        assert counts.accepted == counts.receipted == counts.stored == counts.attempted

    mesh.run(scenario)


# -- a keyless name: decided by what the name's configured endpoint answers -----------------------

#: The node id a stranger says in its Hellos as A (not A's: a node id is anyone's to say).
STRANGER_NODE_ID = "0123456789abcdef"
#: A raw peer's wait for one answer from B (B answers in milliseconds).
ANSWER_WAIT_MS = 10_000


class RawPeer:
    """One raw DEALER connection to a node, speaking the wire format: Hello as any name and
    node id, Ping, and B's answers one at a time."""

    def __init__(self, endpoint: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def hello(self, name: str, node_id: str) -> None:
        self.sock.send(encode(Hello(version=PROTOCOL_VERSION, node_id=node_id, name=name,
                                    sent_at_ns=time.time_ns(), hlc=1)))

    def ping(self) -> None:
        self.sock.send(encode(Ping(sent_at_ns=time.time_ns())))

    def answer(self, wait_ms: int = ANSWER_WAIT_MS) -> Any:
        """B's next frame to this connection, or None if none came within `wait_ms`."""
        if not self.sock.poll(wait_ms):
            return None
        return decode(self.sock.recv(), max_bytes=1 << 20)

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


def _refused(frame: Any, code: str) -> bool:
    return isinstance(frame, Refuse) and frame.code == code


def test_a_stranger_taking_an_idle_peers_name_does_not_keep_that_peer_out(
    mesh_factory: MeshFactory,
) -> None:
    """A's link to B idles out (Close: B forgets the session). A stranger then says Hello
    to B as A, with a node id of its own, and pings: B welcomes it (B has not heard from A's
    endpoint: first come). Before the fix, while the stranger stayed active B refused A's own
    Hello (LIVE_CLAIM) and A's next messages waited (0 of 3 receipted in 5 s each). Now A's
    refused Hello makes B ask A's configured endpoint who it is, on B's own link: A answers,
    B ends the stranger's session and welcomes A's refused connection (3 of 3)."""
    mesh = mesh_factory(["A", "B"], seed=31, options={"link_idle_s": 1.0, "dial_at_start": 0})

    async def scenario() -> None:
        await mesh.start()
        await mesh.stream("A", "B", 3, tag="before", concurrency=3)
        await until_true("A's link to B idled out",
                         lambda: "link to B idle" in mesh.log_text("A"), 30)
        ctx = zmq.Context()
        stranger = ctx.socket(zmq.DEALER)
        stranger.setsockopt(zmq.LINGER, 0)
        stranger.connect(mesh.endpoint("B"))
        stop = threading.Event()

        def keep_active() -> None:
            stranger.send(encode(Hello(version=PROTOCOL_VERSION, node_id="0123456789abcdef",
                                       name="A", sent_at_ns=time.time_ns(), hlc=1)))
            while not stop.wait(0.1):
                stranger.send(encode(Ping(sent_at_ns=time.time_ns())))
                while stranger.poll(0):
                    stranger.recv()

        pinger = threading.Thread(target=keep_active, daemon=True)
        pinger.start()
        try:
            await asyncio.sleep(0.5)
            first = len(mesh.ledger)
            await mesh.stream("A", "B", 3, tag="while taken", concurrency=3,
                              receipt_timeout_s=5.0)
            receipted = sum(a.receipted for a in list(mesh.ledger.attempts.values())[first:])
        finally:
            stop.set()
            pinger.join(5)
            stranger.close(0)
            ctx.term()
        assert receipted == 3, f"{receipted}/3 of A's sends receipted while its name was taken"
        await mesh.finish()

    mesh.run(scenario)


def test_a_stranger_under_a_live_peers_name_stays_refused_and_its_hellos_cost_few_checks(
    mesh_factory: MeshFactory,
) -> None:
    """A is live at B (and B's own link to A was welcomed by A). A stranger's Hellos as A
    with a node id of its own are refused, as before the checks; however many come, B asks
    A's endpoint at most once per CLAIM_CHECK_INTERVAL_NS, and A's messages flow meanwhile."""
    mesh = mesh_factory(["A", "B"], seed=33)
    hellos = 200

    async def scenario() -> None:
        await mesh.start()
        await mesh.wait_connected("A")
        await mesh.wait_connected("B")
        await mesh.stream("A", "B", 5, tag="before", concurrency=5)
        stranger = RawPeer(mesh.endpoint("B"))
        mesh.cleanups.append(stranger.close)
        before = (await mesh.status("B"))["stats"]
        started = time.monotonic()

        def claim() -> list[Any]:
            answers = []
            for _ in range(hellos):
                stranger.hello("A", STRANGER_NODE_ID)
                answers.append(stranger.answer())
            stranger.ping()
            answers.append(stranger.answer())
            return answers

        *refusals, to_ping = await asyncio.to_thread(claim)
        first = len(mesh.ledger)
        await mesh.stream("A", "B", 20, tag="during", concurrency=5,
                          receipt_timeout_s=RECEIPT_TIMEOUT_S)
        elapsed_s = time.monotonic() - started
        stats = (await mesh.status("B"))["stats"]
        receipted = sum(a.receipted for a in list(mesh.ledger.attempts.values())[first:])
        checks = stats["name_checks"] - before["name_checks"]
        bound = 1 + int(elapsed_s * 1e9 / CLAIM_CHECK_INTERVAL_NS)
        mesh.extra.update(receipted_during=f"{receipted}/20", checks=checks,
                          checks_bound=bound, elapsed_s=round(elapsed_s, 1))
        assert all(_refused(a, RefuseCode.IDENTITY) for a in refusals), refusals[:3]
        assert _refused(to_ping, RefuseCode.HELLO_REQUIRED), to_ping
        assert stats["name_claims"] - before["name_claims"] == hellos
        assert checks <= bound, (checks, bound)
        assert receipted == 20
        counts = await mesh.finish()
        assert counts.accepted == counts.receipted == counts.stored == counts.attempted

    mesh.run(scenario)


def test_a_stranger_welcomed_under_an_idle_peers_name_is_ended_once_bs_own_link_hears_a(
    mesh_factory: MeshFactory,
) -> None:
    """A's link to B idled out and B had never dialed A: a stranger's Hello as A (its own
    node id) is welcomed, first come. Then B sends to A: B's own link is welcomed by A's
    configured endpoint as A's node id, and B ends the stranger's session: its Ping gets
    `hello-required` and its next Hello a name clash. Before, the stranger kept its session
    (its Pings answered with Pongs) until it went silent."""
    mesh = mesh_factory(["A", "B"], seed=34, options={"link_idle_s": 1.0, "dial_at_start": 0})

    async def scenario() -> None:
        await mesh.start()
        await mesh.stream("A", "B", 3, tag="before", concurrency=3)
        await until_true("A's link to B idled out",
                         lambda: "link to B idle" in mesh.log_text("A"), 30)
        stranger = RawPeer(mesh.endpoint("B"))
        mesh.cleanups.append(stranger.close)

        def say(frame: str) -> Any:
            if frame == "hello":
                stranger.hello("A", STRANGER_NODE_ID)
            else:
                stranger.ping()
            return stranger.answer()

        assert isinstance(await asyncio.to_thread(say, "hello"), Welcome)
        assert isinstance(await asyncio.to_thread(say, "ping"), Pong)
        await mesh.stream("B", "A", 3, tag="B to A", concurrency=3)
        await until_true("B ended the stranger's session",
                         lambda: "ended 1 session(s) of A" in mesh.log_text("B"), 30)
        assert _refused(await asyncio.to_thread(say, "ping"), RefuseCode.HELLO_REQUIRED)
        refused = await asyncio.to_thread(say, "hello")
        assert _refused(refused, RefuseCode.IDENTITY), refused
        assert "its configured endpoint answered so" in refused.detail
        await mesh.stream("A", "B", 3, tag="after", concurrency=3)
        counts = await mesh.finish()
        assert counts.accepted == counts.receipted == counts.stored == counts.attempted

    mesh.run(scenario)


def test_a_claim_bs_endpoint_check_cannot_answer_stays_first_come_first_served_and_logged(
    mesh_factory: MeshFactory,
) -> None:
    """A's configured endpoint answers nobody (A runs nowhere: its Hellos here come from a
    raw connection). A stranger holds A's name at B; A's Hello is refused and B asks A's
    endpoint, which stays silent: after CLAIM_CHECK_TIMEOUT_S B logs that it could not check
    who A is, the stranger keeps the name (as before the checks) and A stays refused."""
    mesh = mesh_factory(["A", "B"], real=["B"], absent=["A"], seed=35)

    async def scenario() -> None:
        await mesh.start()
        stranger, claimant = RawPeer(mesh.endpoint("B")), RawPeer(mesh.endpoint("B"))
        mesh.cleanups.extend((stranger.close, claimant.close))
        stranger.hello("A", STRANGER_NODE_ID)
        assert isinstance(await asyncio.to_thread(stranger.answer), Welcome)
        claimant.hello("A", "fedcba9876543210")
        refused = await asyncio.to_thread(claimant.answer)
        assert _refused(refused, RefuseCode.IDENTITY), refused
        assert "asking the endpoint configured for 'A'" in refused.detail
        await until_true("B gave up checking A", lambda: "could not check who A is"
                         in mesh.log_text("B"), CLAIM_CHECK_TIMEOUT_S + 30)
        # The check settled with no answer: nothing more comes to the refused claimant.
        assert await asyncio.to_thread(claimant.answer, 0) is None
        stranger.ping()
        assert isinstance(await asyncio.to_thread(stranger.answer), Pong)
        stats = (await mesh.status("B"))["stats"]
        assert stats["name_checks"] == 1
        await mesh.finish()

    mesh.run(scenario)


def test_a_peer_restarted_with_a_new_data_dir_is_welcomed_once_b_checks_its_endpoint(
    mesh_factory: MeshFactory,
) -> None:
    """A restarts at once with a new data dir (a new node id) while its old session at B was
    live a moment ago. Before, B refused A's Hello until the old session had been silent 30 s
    (LIVE_SESSION_NS): none of A's 5 sends receipted within 10 s each. Now B's own link to A
    is welcomed by the new node id, or A's refused Hello makes B ask: B ends the old session
    and welcomes A."""
    mesh = mesh_factory(["A", "B"], seed=36)

    async def scenario() -> None:
        await mesh.start()
        await mesh.wait_connected("A")
        await mesh.wait_connected("B")
        old_id = (await mesh.status("A"))["node_id"]
        await asyncio.to_thread(mesh.kill, "A")
        shutil.rmtree(mesh.data_dir("A"))
        await asyncio.to_thread(mesh.start_real, ["A"])
        new_id = (await mesh.status("A"))["node_id"]
        assert new_id != old_id
        first = len(mesh.ledger)
        await mesh.stream("A", "B", 5, tag="after the restart", concurrency=5,
                          receipt_timeout_s=RECEIPT_TIMEOUT_S)
        receipted = sum(a.receipted for a in list(mesh.ledger.attempts.values())[first:])
        mesh.extra["receipted_after_restart"] = f"{receipted}/5"
        assert receipted == 5, f"{receipted}/5 of the restarted A's sends receipted"
        assert f"answers as node {new_id}" in mesh.log_text("B")
        counts = await mesh.finish()
        assert counts.accepted == counts.receipted == counts.stored == counts.attempted

    mesh.run(scenario)

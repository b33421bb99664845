"""Hostile guests of the text gateways (docs/protocol.md section 17), against real nodes.

Each attack runs while node A, the gateway's node, keeps sending to B through its control
endpoint; the fault battery's checker (`Mesh.finish`) then proves every one of those messages
stored once on both ends and receipted. The guests' own rows at A (senders `tcp:IP:PORT`,
`udp:IP:PORT`) are checked by each test and reported to the checker as foreign.

The clients are blocking stdlib sockets on 127.0.0.1 (and other 127/8 source addresses,
which Linux routes over loopback: one host, or many, as the attack needs), run in threads.
Two attacks need a gateway timeout shorter than its 300 s default, which no flag sets: they
run the gateway on an in-process node A (real SQLite, a real B process).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import re
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from meshpost import Node, NodeConfig
from meshpost.cluster import free_tcp_ports
from meshpost.gateway import DEFAULT_MAX_CLIENTS, Gateway, GatewayConfig
from tests.integration.faults.checker import Mesh

from .conftest import MeshFactory

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

#: Every wait for an answer: generous for a loaded 2-core machine, never a threshold.
WAIT_S = 30.0
ACK = re.compile(rb"^received [0-9a-f]{28} at \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z\n$")
LIMIT = 1000  # max_message_bytes of these meshes


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Ports:
    def __init__(self) -> None:
        self.tcp = free_tcp_ports(1)[0]
        self.udp = free_udp_port()

    def args(self, *extra: str) -> list[str]:
        return ["--text-listen", f"tcp://127.0.0.1:{self.tcp}",
                "--udp-listen", f"udp://127.0.0.1:{self.udp}", *extra]


def gateway_mesh(mesh_factory: MeshFactory, *extra: str, seed: int) -> tuple[Mesh, Ports]:
    ports = Ports()
    mesh = mesh_factory(["A", "B"], seed=seed, options={"max_message_bytes": LIMIT},
                        node_args={"A": ports.args(*extra)})
    return mesh, ports


def connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(WAIT_S)
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    return s


def read_line(s: socket.socket) -> bytes:
    got = b""
    while not got.endswith(b"\n"):
        chunk = s.recv(65536)
        if not chunk:
            return got
        got += chunk
    return got


def read_to_end(s: socket.socket) -> bytes:
    got = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := s.recv(65536):
            got += chunk
    return got


def udp_ask(port: int, data: bytes, source: str = "127.0.0.1") -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(WAIT_S)
        s.bind((source, 0))
        s.sendto(data, ("127.0.0.1", port))
        return s.recv(70_000)


def guest_rows(data_dir: Path) -> list[sqlite3.Row]:
    """A's rows from guests, read from the file as docs/protocol.md section 16 gives it."""
    db = sqlite3.connect(f"file:{data_dir / 'meshpost.db'}?mode=ro", uri=True)
    try:
        db.row_factory = sqlite3.Row
        return db.execute("SELECT * FROM messages WHERE sender LIKE 'tcp:%' OR sender LIKE "
                          "'udp:%' ORDER BY rowid").fetchall()
    finally:
        db.close()


async def keep_sending_while(mesh: Mesh, attack: Callable[[], Any]) -> Any:
    """Start A and B, run the blocking `attack` while A keeps sending to B, then send 10
    more; return what the attack returned (the checker judges A's sends in `finish`)."""
    await mesh.start()
    await mesh.wait_connected("A")
    done = asyncio.Event()
    mesh.keep_streaming("A", "B", done, pause_s=0.05)
    try:
        result = await asyncio.to_thread(attack)
    finally:
        done.set()
    await mesh.stream("A", "B", 10, tag="after", concurrency=10)
    return result


async def finish(mesh: Mesh, relayed: int = 0) -> None:
    """The checker's verdict on A's and B's messages (`relayed` of them a guest's `@B`,
    accepted by A's answer, not receipted to the test); guests' rows are foreign to it."""
    rows = await asyncio.to_thread(guest_rows, mesh.data_dir("A"))
    mesh.foreign_senders.update(r["sender"] for r in rows)
    counts = await mesh.finish()
    assert counts.receipted + relayed == counts.stored == counts.attempted > 10, counts.line()


# -- TCP: clients that do not play along ---------------------------------------------------


def test_clients_that_send_and_never_read_are_cut_and_free_their_places(
    mesh_factory: MeshFactory,
) -> None:
    """Before: the gateway waited for ever for such a client to read its answers (asyncio's
    drain without a bound), keeping its place, its buffered answers and its descriptor: two
    of them kept a gateway of two places from answering anybody else, for good. Now a client
    that reads nothing for `idle_timeout_s` is cut (counted `closed_not_reading`)."""
    mesh = mesh_factory(["A", "B"], real=["B"], seed=41)
    config = GatewayConfig(tcp=("127.0.0.1", 0), max_clients=2, idle_timeout_s=1.0)

    async def scenario() -> None:
        await mesh.start()
        async with Gateway(mesh.inproc["A"], config) as gw:
            assert gw.tcp_address is not None
            port = gw.tcp_address[1]
            # Answers worth reading: 20 messages of 900 control characters, each shown as
            # 3,600 bytes by `/inbox` (escaped), so every `/inbox` line costs 72 KB.
            for _ in range(20):
                await asyncio.to_thread(post, port, b"\x01" * 900)

            def flood() -> socket.socket:
                s = connect(port)
                s.setblocking(False)
                sent = 0
                deadline = time.monotonic() + WAIT_S
                while time.monotonic() < deadline:  # until the node stops reading
                    try:
                        sent += s.send(b"/inbox 200\n" * 100)
                    except BlockingIOError:
                        # Full: the node's buffers and ours. Wait once to be sure.
                        time.sleep(0.5)
                        try:
                            sent += s.send(b"/inbox 200\n")
                        except BlockingIOError:
                            return s
                raise AssertionError("the node read everything a non-reader sent")

            held = [await asyncio.to_thread(flood) for _ in range(2)]
            mesh.cleanups.extend(s.close for s in held)

            def served() -> bytes:
                deadline = time.monotonic() + WAIT_S
                while True:
                    with connect(port) as s:
                        s.sendall(b"a reader\n")
                        reply = read_line(s)
                    if reply.startswith(b"received ") or time.monotonic() > deadline:
                        return reply
                    time.sleep(0.2)

            reply = await asyncio.to_thread(served)
            assert ACK.match(reply), reply
            deadline = time.monotonic() + WAIT_S
            while gw.stats.closed_not_reading < 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert gw.stats.closed_not_reading == 2, gw.stats
        await finish_inproc(mesh)

    mesh.run(scenario)


def post(port: int, body: bytes) -> None:
    with connect(port) as s:
        s.sendall(body + b"\n")
        assert ACK.match(read_line(s))


async def finish_inproc(mesh: Mesh) -> None:
    await mesh.stream("A", "B", 20, tag="after", concurrency=10)
    await finish(mesh)


def test_one_host_trickling_partial_lines_cannot_keep_other_hosts_out(
    mesh_factory: MeshFactory,
) -> None:
    """Slowloris: every place of the gateway taken by connections from one address, each
    trickling a partial line, a byte a second, under the idle gap (here 30 s) and the
    size limit. Before, the 256 places were all its (another host got `256 clients
    already`, for as long as the trickle went on: a 1,000-byte line lasts 16 minutes, a
    64 KiB line at a byte per 0.19 s three and a half hours). Now one address holds at most
    64 places, the rest of its connections are refused; another host is served."""
    mesh, ports = gateway_mesh(mesh_factory, "--text-idle-gap", "30", seed=42)
    per_host = 64

    def attack() -> tuple[list[bytes], bytes, bytes]:
        held: list[socket.socket] = []
        refused: list[bytes] = []
        stop = threading.Event()
        try:
            for _ in range(DEFAULT_MAX_CLIENTS):
                s = connect(ports.tcp)
                s.send(b"x")
                held.append(s)

            def trickle() -> None:
                while not stop.wait(1.0):
                    for s in held:
                        with contextlib.suppress(OSError):
                            s.send(b"x")

            trickler = threading.Thread(target=trickle, daemon=True)
            trickler.start()
            # Those past the per-host cap were answered and closed; the rest hear nothing.
            for s in held[per_host:]:
                refused.append(read_to_end(s))
            for s in held[:per_host]:
                s.setblocking(False)
                with pytest.raises(BlockingIOError):
                    s.recv(1)
            with connect(ports.tcp, source="127.0.0.2") as other:
                other.sendall(b"from another host\n")
                served = read_line(other)
            with connect(ports.tcp) as same:
                again = read_to_end(same)
            stop.set()
            trickler.join(WAIT_S)
        finally:
            stop.set()
            for s in held:
                s.close()
        return refused, served, again

    async def scenario() -> None:
        refused, served, again = await keep_sending_while(mesh, attack)
        assert ACK.match(served), served
        assert set(refused) == {b"error: 64 connections from 127.0.0.1 already; try later\n"}
        assert again == b"error: 64 connections from 127.0.0.1 already; try later\n"
        rows = await asyncio.to_thread(guest_rows, mesh.data_dir("A"))
        assert [r["body"] for r in rows if r["body"] == "from another host"] == [
            "from another host"]
        await finish(mesh)

    mesh.run(scenario)


def test_lines_at_over_and_far_over_the_limit(mesh_factory: MeshFactory) -> None:
    """A line of exactly `max_message_bytes` (CRLF or not) is stored; one byte over, on TCP,
    is refused and ends the connection as 10 MB does (before, a line of limit + 1 bytes
    without a CR was answered and read on while limit + 2 closed: the CR of a CRLF was
    allowed to any line); over UDP the error says the size. Nothing over the limit is
    stored, and the node never buffers more than the limit for a line."""
    mesh, ports = gateway_mesh(mesh_factory, seed=43)

    def attack() -> dict[str, bytes]:
        out = {}
        for name, line in (("at", b"a" * LIMIT + b"\n"), ("at_crlf", b"b" * LIMIT + b"\r\n"),
                           ("over", b"c" * (LIMIT + 1) + b"\n"),
                           ("over_crlf", b"d" * (LIMIT + 1) + b"\r\n")):
            with connect(ports.tcp) as s:
                s.sendall(line)
                out[name] = read_line(s)
                if not name.startswith("at"):
                    out[name + "_then"] = read_to_end(s)
        with connect(ports.tcp) as s:
            sent = 0
            with contextlib.suppress(OSError):  # the node closes after LIMIT bytes
                for _ in range(10_000):
                    sent += s.send(b"e" * 1000)
            out["far"] = read_to_end(s)
            out["far_sent"] = str(sent).encode()
        for name, datagram in (("udp_at", b"f" * LIMIT), ("udp_at_lf", b"g" * LIMIT + b"\n"),
                               ("udp_over", b"h" * (LIMIT + 1)),
                               ("udp_far", b"i" * 65_000)):
            out[name] = udp_ask(ports.udp, datagram)
        return out

    async def scenario() -> None:
        out = await keep_sending_while(mesh, attack)
        for name in ("at", "at_crlf", "udp_at", "udp_at_lf"):
            assert ACK.match(out[name]), (name, out[name])
        for name in ("over", "over_crlf"):
            assert out[name] == (f"error: message of {LIMIT + 1} bytes or more is over the "
                                 f"limit of {LIMIT} bytes; closing\n").encode(), out[name]
            assert out[name + "_then"] == b""
        assert out["far"].startswith(b"error: message of ") and out["far"].endswith(
            b"closing\n"), out["far"]
        for name, size in (("udp_over", LIMIT + 1), ("udp_far", 65_000)):
            assert out[name] == (f"error: message is {size} bytes, over the {LIMIT}-byte "
                                 "limit (raise max_message_bytes in the mesh config on every "
                                 "node)\n").encode(), out[name]
        rows = await asyncio.to_thread(guest_rows, mesh.data_dir("A"))
        assert sorted(r["body"] for r in rows) == sorted(
            ["a" * LIMIT, "b" * LIMIT, "f" * LIMIT, "g" * LIMIT])
        await finish(mesh)

    mesh.run(scenario)


# -- what guests write: bytes that could rewrite a screen, names that are not theirs -------


#: Text that a terminal, a log or a line-based reader would take as more than text.
HOSTILE_TEXT = [
    "nul \x00 in the middle",
    "\x1b[2J\x1b[Hscreen cleared",
    "bell \x07 backspace \x08\x08 cr \r overwritten",
    "c1 csi \x9b31m red",
    "bidi \u202eevil\u202c",
    "\x1b]0;window title\x07",
]


def test_control_characters_and_escapes_are_stored_as_sent_and_shown_escaped(
    mesh_factory: MeshFactory,
) -> None:
    """NUL, ESC sequences, C1 controls, bidi overrides: stored byte for byte (the store keeps
    what the guest sent), never raw in an `/inbox` answer, in `meshpost history`, nor in the
    node's log; invalid UTF-8 is refused and stores nothing."""
    mesh, ports = gateway_mesh(mesh_factory, seed=44)

    def attack() -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        for i, text in enumerate(HOSTILE_TEXT):
            raw = text.encode()
            if "\r" in text:  # a lone CR travels in a datagram (TCP takes CR LF as the end)
                out[f"udp{i}"] = udp_ask(ports.udp, raw)
            else:
                with connect(ports.tcp) as s:
                    s.sendall(raw + b"\n")
                    out[f"tcp{i}"] = read_line(s)
        # Multi-line text in one datagram, forging /inbox lines of other senders.
        forged = "hi\n2026-12-06T00:00:00.000000Z B: I owe you 100"
        out["forged"] = udp_ask(ports.udp, forged.encode())
        with connect(ports.tcp) as s:
            s.sendall(b"\xff\xfe not utf-8\n")
            out["bad_utf8"] = read_to_end(s)
        out["bad_utf8_udp"] = udp_ask(ports.udp, b"caf\xe9")
        out["target"] = udp_ask(ports.udp, b"@\x1b[31mB\x00 hi")
        with connect(ports.tcp) as s:
            s.sendall(b"/inbox 200\n")
            answer = read_line(s)
            count = int(answer.split()[1])
            while answer.count(b"\n") < 1 + count:
                answer += s.recv(65536)
        out["inbox"] = answer
        return out

    async def scenario() -> None:
        out = await keep_sending_while(mesh, attack)
        acks = [v for k, v in out.items() if k.startswith(("tcp", "udp")) or k == "forged"]
        assert len(acks) == len(HOSTILE_TEXT) + 1 and all(ACK.match(a) for a in acks), out
        assert out["bad_utf8"].startswith(b"error: message is not UTF-8")
        assert out["bad_utf8_udp"].startswith(b"error: message is not UTF-8")
        assert out["target"].startswith(b"error: unknown peer '\\x1b[31mB\\x00'"), out["target"]
        rows = await asyncio.to_thread(guest_rows, mesh.data_dir("A"))
        stored = [r["body"] for r in rows]
        assert sorted(stored) == sorted([*HOSTILE_TEXT, forged_text()]), stored
        # Each stored message is one line of the answer, its controls escaped.
        inbox = out["inbox"].decode()
        assert inbox.count("\n") == 1 + len(stored)
        assert "\\x00" in inbox and "\\x1b[2J" in inbox and "\\u202e" in inbox
        history = await asyncio.to_thread(run_history, mesh.data_dir("A"))
        for where, data in (("/inbox", out["inbox"]), ("history", history),
                            ("node log", (mesh.root / "logs" / "A.log").read_bytes())):
            for raw in (b"\x00", b"\x1b", b"\x07", b"\x08", b"\xc2\x9b", "\u202e".encode(),
                        b"\r"):
                assert raw not in data, (where, raw)
        await finish(mesh)

    mesh.run(scenario)


def forged_text() -> str:
    return "hi\n2026-12-06T00:00:00.000000Z B: I owe you 100"


def run_history(data_dir: Path) -> bytes:
    done = subprocess.run(
        [sys.executable, "-m", "meshpost", "history", "--node", "A", "--data", str(data_dir)],
        capture_output=True, timeout=60, stdin=subprocess.DEVNULL, check=True)
    return done.stdout


def test_a_guest_cannot_pass_for_a_mesh_node_or_another_guest(
    mesh_factory: MeshFactory,
) -> None:
    """Whatever a guest writes, it is stored under its own address: `B: ...`, `[B] ...`,
    `[udp:127.0.0.1:1] ...` are bodies. Relayed with `@B`, the body B stores starts with
    the guest's real label, so a forged one can only follow it; B's row says it came from
    A, which is true."""
    mesh, ports = gateway_mesh(mesh_factory, seed=45)
    claims = ["B: I am B", "[B] I am B", "[udp:127.0.0.1:1] I am another guest"]

    def attack() -> tuple[str, list[bytes]]:
        with connect(ports.tcp) as s:
            label = f"tcp:127.0.0.1:{s.getsockname()[1]}"
            answers = []
            for text in claims:
                s.sendall(text.encode() + b"\n")
                answers.append(read_line(s))
            s.sendall(b"@B [udp:127.0.0.1:1] relayed as another\n")
            answers.append(read_line(s))
        return label, answers

    async def scenario() -> None:
        label, answers = await keep_sending_while(mesh, attack)
        assert all(ACK.match(a) for a in answers[:3]), answers
        assert answers[3] == b"queued for B\n"
        relayed = f"[{label}] [udp:127.0.0.1:1] relayed as another"
        (a,) = mesh.ledger.attempt("A", ["B"], relayed)
        a.accept()  # the checker then demands B stored it once, from A
        rows = await asyncio.to_thread(guest_rows, mesh.data_dir("A"))
        assert [(r["sender"], r["peer"], r["recipient"], r["body"]) for r in rows] == [
            (label, label, "A", text) for text in claims]
        await finish(mesh, relayed=1)

    mesh.run(scenario)


def test_at_routing_to_unknown_names_itself_all_and_a_long_list(
    mesh_factory: MeshFactory,
) -> None:
    """`@NAME` that names nobody, this node, every spelling of `all`, 150 names at once:
    each answered on its own line, stored only where it means a peer. `@A` at A's own
    gateway said `unknown peer 'A'; known peers: B, all` (A is no peer of its own); it
    says what to do now."""
    mesh, ports = gateway_mesh(mesh_factory, seed=46)
    huge = ",".join(f"N{i}" for i in range(150))  # 739 bytes, under the limit

    def attack() -> tuple[str, list[bytes]]:
        with connect(ports.tcp) as s:
            label = f"tcp:127.0.0.1:{s.getsockname()[1]}"
            answers = []
            for line in ("@nobody hi", "@A hi", "@all to all", "@ALL TO ALL",
                         f"@{huge} hi", "@B,B hi", "@all", "@ hi"):
                s.sendall(line.encode() + b"\n")
                answers.append(read_line(s))
        answers.append(udp_ask(ports.udp, f"@{huge} hi".encode()))
        return label, answers

    async def scenario() -> None:
        label, answers = await keep_sending_while(mesh, attack)
        nobody, me, to_all, to_all_caps, big, listed, empty, bare, big_udp = answers
        assert nobody == b"error: unknown peer 'nobody'; known peers: B, all\n"
        assert me == b"error: 'A' is this node; to write to it, send the text without '@A'\n"
        assert to_all == to_all_caps == b"queued for B\n"
        assert big.startswith(b"error: unknown peer 'N0,N1,") and big.endswith(
            b"'; known peers: B, all\n")
        assert listed == b"error: unknown peer 'B,B'; known peers: B, all\n"
        assert empty.startswith(b"error: message body is empty")
        assert bare.startswith(b"error: '@' must be followed by")
        assert big_udp.startswith(b"error: unknown peer 'N0,N1,")
        for body in ("to all", "TO ALL"):
            (a,) = mesh.ledger.attempt("A", ["B"], f"[{label}] {body}")
            a.accept()  # the checker then demands B stored it once, from A
        assert await asyncio.to_thread(guest_rows, mesh.data_dir("A")) == []
        await finish(mesh, relayed=2)

    mesh.run(scenario)


# -- UDP: sources that cannot be trusted ------------------------------------------------------


def test_udp_answers_are_never_much_larger_than_what_asked(mesh_factory: MeshFactory) -> None:
    """A UDP source address is not proof of who sent: an answer larger than its request
    makes the node an amplifier aimed at a forged source. Before, `/inbox` (6 bytes) was
    answered with up to 65,507 bytes (10,917 times), an unknown target's error with every
    peer's name. Now every answer is at most 3 times its datagram or 128 bytes: `/inbox`
    lists what fits (padding the request with spaces asks for more)."""
    mesh, ports = gateway_mesh(mesh_factory, seed=47)

    def attack() -> tuple[str, dict[bytes, bytes]]:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(WAIT_S)
            s.bind(("127.0.0.1", 0))
            label = f"udp:127.0.0.1:{s.getsockname()[1]}"
            for _ in range(20):
                s.sendto(b"\x01" * 900, ("127.0.0.1", ports.udp))
                assert ACK.match(s.recv(1024))
            out = {}
            for request in (b"/inbox", b"/inbox 200", b"/inbox" + b" " * 900, b"x",
                            b"@all x", b"@nobody x", b"@" + b"Z" * 900 + b" x", b"/inbox 0",
                            b"\xff", b"y" * (LIMIT + 1)):
                s.sendto(request, ("127.0.0.1", ports.udp))
                out[request] = s.recv(70_000)
        return label, out

    async def scenario() -> None:
        label, out = await keep_sending_while(mesh, attack)
        (a,) = mesh.ledger.attempt("A", ["B"], f"[{label}] x")
        a.accept()  # the checker then demands B stored it once, from A
        for request, answer in out.items():
            assert len(answer) <= max(128, 3 * len(request)), (request[:20], len(answer))
            assert answer.endswith(b"\n"), answer
        assert ACK.match(out[b"x"])
        # The newest message's line (3,650 bytes) is cut to what the answer has room for.
        for request, budget in ((b"/inbox", 128), (b"/inbox" + b" " * 900, 2718)):
            answer = out[request].decode()
            assert answer.startswith(f"inbox: 1 message(s) (the newest that fit an answer "
                                     f"of {budget} bytes)\n"), answer[:100]
            assert answer.endswith("…\n") and len(answer.encode()) > budget - 8, answer
        await finish(mesh, relayed=1)

    mesh.run(scenario)


def test_a_udp_flood_from_many_sources_keeps_bounded_state_and_stores_each_once(
    mesh_factory: MeshFactory,
) -> None:
    """4,200 source addresses (127.0.x.y), each one datagram, 100 at a time: every datagram
    acknowledged and stored once; the gateway remembers 4,096 sources' message counts at
    most (the first source, sending again after them, counts from 1 again). Zero-length
    datagrams (1,000) are answered with nothing and store nothing."""
    mesh, ports = gateway_mesh(mesh_factory, seed=48)
    sources = [f"127.0.{i // 250 + 1}.{i % 250 + 1}" for i in range(4200)]

    def attack() -> tuple[int, bool, int]:
        first = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with first:
            first.settimeout(WAIT_S)
            first.bind((sources[0], 0))
            first.sendto(b"first", ("127.0.0.1", ports.udp))
            assert ACK.match(first.recv(1024))
            acked = 0
            # 100 at a time: a burst that fills the node's receive buffer is dropped by the
            # kernel (about 270 small datagrams fit in its 208 KiB).
            for start in range(1, len(sources), 100):
                socks = []
                for source in sources[start:start + 100]:
                    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                    s.settimeout(WAIT_S)
                    s.bind((source, 0))
                    s.sendto(f"from {source}".encode(), ("127.0.0.1", ports.udp))
                    socks.append(s)
                for s in socks:
                    acked += bool(ACK.match(s.recv(1024)))
                    s.close()
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as empties, \
                    socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                empties.bind((sources[1], 0))
                for _ in range(1000):
                    empties.sendto(b"", ("127.0.0.1", ports.udp))
                # Read past them with a question that stores nothing (asked again while
                # the kernel drops it behind a full buffer): datagrams are taken in order.
                probe.settimeout(1.0)
                deadline = time.monotonic() + WAIT_S
                while True:
                    probe.sendto(b"/inbox 1", ("127.0.0.1", ports.udp))
                    try:
                        assert probe.recv(1024).startswith(b"inbox: 1 ")
                        break
                    except TimeoutError:
                        assert time.monotonic() < deadline, "no answer to /inbox"
                empties.setblocking(False)
                try:
                    empties.recv(1024)
                    silent = False
                except BlockingIOError:
                    silent = True
            first.sendto(b"again", ("127.0.0.1", ports.udp))
            assert ACK.match(first.recv(1024))
        return acked, silent, len(sources) - 1

    async def scenario() -> None:
        acked, silent, flood = await keep_sending_while(mesh, attack)
        assert (acked, silent) == (flood, True)
        rows = await asyncio.to_thread(guest_rows, mesh.data_dir("A"))
        assert len(rows) == flood + 2
        assert len({r["body"] for r in rows}) == len(rows)
        first_source = [r for r in rows if r["sender"].startswith(f"udp:{sources[0]}:")]
        assert [(r["body"], r["seq"]) for r in first_source] == [("first", 1), ("again", 1)]
        await finish(mesh)

    mesh.run(scenario)


def test_a_flood_of_bad_datagrams_is_counted_and_logged_at_a_bounded_rate(
    mesh_factory: MeshFactory,
) -> None:
    """2,000 datagrams that are not UTF-8, 2,000 over the limit: each answered with its
    error, none stored. Before, each was a WARNING line in the node's log (a flood filled
    the disk at its own speed); now 20 at once, then one a second, and a line saying so."""
    mesh, ports = gateway_mesh(mesh_factory, seed=49)

    def attack() -> int:
        errors = 0
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(WAIT_S)
            for i in range(4000):
                s.sendto(b"\xff" * 10 if i % 2 else b"z" * (LIMIT + 10),
                         ("127.0.0.1", ports.udp))
                errors += s.recv(1024).startswith(b"error: ")
        return errors

    async def scenario() -> None:
        errors = await keep_sending_while(mesh, attack)
        assert errors == 4000
        assert await asyncio.to_thread(guest_rows, mesh.data_dir("A")) == []
        log = (mesh.root / "logs" / "A.log").read_text(errors="replace")
        warnings = [line for line in log.splitlines() if "gateway guest" in line]
        # 20 at once, one a second after: bounded by the test's own length, not 4,000.
        assert 20 <= len(warnings) < 20 + 300, len(warnings)
        assert "comes faster than 20 warnings at once" in log
        await finish(mesh)

    mesh.run(scenario)


def test_a_node_stopped_with_guests_connected_stops_cleanly(mesh_factory: MeshFactory) -> None:
    """SIGTERM while guests are connected: idle, mid-line, and one that sends and never
    reads. Before, asyncio 3.11 logged each cancelled guest as `Exception in callback
    ...: CancelledError` with a traceback at ERROR, one per connection (256 of them at most)
    at every stop. Now the node exits 0 with no error in its log; the unfinished line is not
    stored (the guest never ended it), the acknowledged ones are."""
    mesh, ports = gateway_mesh(mesh_factory, "--text-idle-gap", "30", seed=50)
    guests: list[socket.socket] = []

    def attack() -> None:
        idle = connect(ports.tcp)
        idle.sendall(b"said and acknowledged\n")
        assert ACK.match(read_line(idle))
        mid_line = connect(ports.tcp)
        mid_line.sendall(b"never ended")
        deaf = connect(ports.tcp)
        deaf.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            for _ in range(10_000):
                deaf.send(b"/inbox 200\n" * 100)
        guests.extend([idle, mid_line, deaf])
        mesh.cleanups.extend(g.close for g in guests)

    async def scenario() -> None:
        await keep_sending_while(mesh, attack)
        await finish(mesh)  # stops A and B (SIGTERM) with the guests connected; exit 0
        log = (mesh.root / "logs" / "A.log").read_text(errors="replace")
        assert "Traceback" not in log and "ERROR" not in log, log[-3000:]
        bodies = [r["body"] for r in await asyncio.to_thread(guest_rows, mesh.data_dir("A"))]
        assert bodies == ["said and acknowledged"]

    mesh.run(scenario)


def test_a_datagram_forged_from_another_gateway_cannot_start_an_endless_exchange(
    short_tmp: Path,
) -> None:
    """One datagram to A whose source is C's UDP gateway (UDP sources can be forged; the
    test hands it to A's gateway as its socket would, since forging needs a raw socket),
    and one to C from C's own address: each is stored and acknowledged to C. Before, C
    stored that acknowledgement as a guest's message and acknowledged it to A, which stored
    it and acknowledged it to C, for ever: a row a turn on each node from one datagram (852
    rows at A, 851 at C within 5 s, and going; C alone answered itself the same way). Now a
    datagram that is exactly an acknowledgement is dropped (counted, logged at the bounded
    rate) and never answered: every message is answered with one, so every chain ends
    there."""

    def node(name: str) -> Node:
        return Node(NodeConfig(name=name, bind=(f"ipc://{short_tmp}/{name}.sock",),
                               data_dir=short_tmp / name))

    def guest_bodies(name: str) -> list[str]:
        return [r["body"] for r in guest_rows(short_tmp / name)]

    async def main() -> tuple[list[str], list[str], int]:
        udp_only = GatewayConfig(udp=("127.0.0.1", 0))
        async with node("A") as a, node("C") as c, Gateway(a, udp_only) as gw_a, \
                Gateway(c, udp_only) as gw_c:
            assert gw_a.udp_address is not None and gw_c.udp_address is not None
            gw_a._datagram(b"hi from a forged source", gw_c.udp_address)
            gw_c._datagram(b"to C from C itself", gw_c.udp_address)

            def c_took_it() -> bool:
                dropped = getattr(gw_c.stats, "udp_acknowledgements_dropped", 0)
                return dropped > 1 or len(guest_bodies("C")) > 1

            deadline = time.monotonic() + WAIT_S
            while not await asyncio.to_thread(c_took_it):
                assert time.monotonic() < deadline, "C never got A's acknowledgement"
                await asyncio.sleep(0.05)
            # Datagrams are taken in order: once each answers a later one, nothing of the
            # first exchange is still on its way.
            for gw in (gw_a, gw_c):
                answer = await asyncio.to_thread(udp_ask, gw.udp_address[1], b"/inbox 1")
                assert answer.startswith(b"inbox: ")
            return (await asyncio.to_thread(guest_bodies, "A"),
                    await asyncio.to_thread(guest_bodies, "C"),
                    getattr(gw_c.stats, "udp_acknowledgements_dropped", 0))

    a_rows, c_rows, dropped = asyncio.run(asyncio.wait_for(main(), 120))
    assert (a_rows, c_rows, dropped) == (["hi from a forged source"], ["to C from C itself"], 2)


@pytest.fixture(autouse=True)
def _many_sources_need_loopback_aliases() -> None:
    """127.0.0.2 and the rest of 127/8 are loopback on Linux; say so clearly otherwise."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.bind(("127.0.0.2", 0))
        except OSError as exc:
            if exc.errno == errno.EADDRNOTAVAIL:
                pytest.skip("127.0.0.2 is not a loopback address here")
            raise

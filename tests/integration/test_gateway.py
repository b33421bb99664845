"""Plain-socket clients, written the way seeds 003/004 write them, against running nodes.

The clients use blocking `socket` only (no meshpost import): send without a newline, then
`recv(1024)`. Node processes are started with `--text-listen` / `--udp-listen` on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshpost.cluster import LocalCluster, NodeProcess, free_tcp_ports
from meshpost.store import StoreReader
from tests.integration.conftest import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

WAIT_S = 30.0
ACK = re.compile(r"^received ([0-9a-f]{28}) at \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def connect(port: int) -> socket.socket:
    """A blocking TCP client, as seed 004's; retried while the gateway is still starting."""
    deadline = time.monotonic() + WAIT_S
    while True:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(WAIT_S)
        try:
            s.connect(("127.0.0.1", port))
            return s
        except ConnectionRefusedError:
            s.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def say(s: socket.socket, text: str | bytes) -> str:
    """Seed 004's exchange: send the text with no newline, block in recv(1024)."""
    s.send(text.encode("utf-8") if isinstance(text, str) else text)
    return s.recv(1024).decode("utf-8")


def rows(data_dir: Path, **filters: str) -> list:  # type: ignore[type-arg]
    with StoreReader.for_data_dir(data_dir) as reader:
        return [m for m in reader.history()
                if all(getattr(m, k) == v for k, v in filters.items())]


class Mesh:
    """Two nodes A and B over ipc; A serves the text gateways."""

    def __init__(self, root: Path, *, max_message_bytes: int = 65536) -> None:
        self.cluster = LocalCluster.create(
            root, 2, transport="ipc",
            options={"ping_interval_s": 0.2, "peer_timeout_s": 1.0,
                     "max_message_bytes": max_message_bytes},
        )
        self.tcp_port = free_tcp_ports(1)[0]
        self.udp_port = free_udp_port()
        self.a = NodeProcess(
            "A", self.cluster.config_path, self.cluster.data_dir("A"), root / "logs" / "A.log",
            extra_args=["--text-listen", f"tcp://127.0.0.1:{self.tcp_port}",
                        "--udp-listen", f"udp://127.0.0.1:{self.udp_port}"],
        )
        self.cluster.nodes["A"] = self.a

    def start(self) -> None:
        self.a.start()
        self.cluster.start(["B"], wait=False)
        self.a.wait_ready()
        self.cluster.nodes["B"].wait_ready()

    def stop(self) -> None:
        self.cluster.stop()


@pytest.fixture
def mesh(short_tmp: Path) -> Iterator[Mesh]:
    m = Mesh(short_tmp, max_message_bytes=2000)
    m.start()
    try:
        yield m
    finally:
        m.stop()


def test_many_tcp_clients_at_once_each_message_stored_once_and_acknowledged(mesh: Mesh) -> None:
    clients = 20
    replies: dict[int, list[str]] = {}
    errors: list[BaseException] = []

    def client(i: int) -> None:
        try:
            with connect(mesh.tcp_port) as s:
                replies[i] = [say(s, f"hola {i} #{k}") for k in range(3)]
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S * 2)
    assert not errors, errors
    ids = set()
    for i in range(clients):
        assert len(replies[i]) == 3
        for reply in replies[i]:
            match = ACK.match(reply.rstrip("\n"))
            assert match, reply
            ids.add(match.group(1))
    stored = rows(mesh.cluster.data_dir("A"), direction="in", recipient="A")
    assert {m.id for m in stored} == ids
    assert len(stored) == clients * 3
    assert sorted(m.body for m in stored) == sorted(
        f"hola {i} #{k}" for i in range(clients) for k in range(3))
    for m in stored:
        assert re.fullmatch(r"tcp:127\.0\.0\.1:\d+", m.sender) and m.peer == m.sender


def test_newline_terminated_lines_are_separate_messages(mesh: Mesh) -> None:
    with connect(mesh.tcp_port) as s:
        s.send(b"one\ntwo\r\n")
        got = b""
        while got.count(b"\n") < 2:
            got += s.recv(1024)
    assert all(ACK.match(line) for line in got.decode().splitlines())
    bodies = [m.body for m in rows(mesh.cluster.data_dir("A"), direction="in")]
    assert bodies == ["one", "two"]


def test_at_b_is_routed_to_b_and_receipted_and_inbox_shows_the_answer(mesh: Mesh) -> None:
    data_a, data_b = mesh.cluster.data_dir("A"), mesh.cluster.data_dir("B")
    with connect(mesh.tcp_port) as s:
        guest = f"tcp:127.0.0.1:{s.getsockname()[1]}"
        assert say(s, "@B hola B") == "queued for B\n"
        wait_until(lambda: any(m.state == "delivered" for m in rows(data_a, peer="B")),
                   WAIT_S, "A's relayed message receipted by B")
        (received,) = rows(data_b, direction="in")
        assert (received.sender, received.body) == ("A", f"[{guest}] hola B")
        assert rows(data_a, direction="in") == []  # relayed, not also stored as A's
        answer = subprocess.run(
            [sys.executable, "-m", "meshpost", "send", "--node", "B", "--data", str(data_b),
             "--to", "A", "hola guest"], capture_output=True, text=True, timeout=60,
            stdin=subprocess.DEVNULL, env=dict(os.environ),
        )
        assert answer.returncode == 0, answer.stderr
        s.send(b"/inbox")
        got = b""
        while b"hola guest" not in got:
            got += s.recv(1024)
        lines = got.decode().splitlines()
        assert lines[0] == "inbox: 1 message(s)"
        assert lines[1].endswith(" B: hola guest")
        assert say(s, "@all a todos") == "queued for B\n"


def test_udp_datagrams_are_stored_and_acknowledged_and_seed_003_client_works(
    mesh: Mesh,
) -> None:
    # Seed 003's client: connect, send, never read.
    seed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    seed.connect(("localhost", mesh.udp_port))
    for text in ("uno", "dos", "tres"):
        seed.send(text.encode("utf-8"))
    data_a = mesh.cluster.data_dir("A")
    wait_until(lambda: len(rows(data_a, direction="in")) == 3, WAIT_S, "three datagrams stored")
    port = seed.getsockname()[1]
    assert {m.sender for m in rows(data_a, direction="in")} == {f"udp:127.0.0.1:{port}"}
    seed.close()
    # A client that reads its acknowledgement.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(WAIT_S)
        s.sendto(b"cuatro", ("127.0.0.1", mesh.udp_port))
        ack = s.recv(1024).decode()
        assert ACK.match(ack.rstrip("\n")), ack
        assert ack.split()[1] in {m.id for m in rows(data_a, body="cuatro")}
        s.sendto(b"@B por udp", ("127.0.0.1", mesh.udp_port))
        assert s.recv(1024) == b"queued for B\n"
        s.sendto(b"\xff\xfe", ("127.0.0.1", mesh.udp_port))
        assert s.recv(1024).startswith(b"error: message is not UTF-8")
    assert sorted(m.body for m in rows(data_a, direction="in")) == [
        "cuatro", "dos", "tres", "uno"]


def test_bad_input_gets_an_error_line_and_nothing_is_stored(mesh: Mesh) -> None:
    data_a = mesh.cluster.data_dir("A")
    with connect(mesh.tcp_port) as s:
        assert say(s, "@Z hola").startswith("error: unknown peer 'Z'")
        assert say(s, "@B ").startswith("error:")
        assert say(s, "/inbox 0").startswith("error: /inbox takes a count")
        # Still connected after a bad command; invalid UTF-8 ends the conversation.
        assert say(s, b"caf\xe9").startswith("error: message is not UTF-8")
        assert s.recv(1024) == b""
    with connect(mesh.tcp_port) as s:
        reply = say(s, "x" * 3000)
        assert reply.startswith("error: message of") and "limit of 2000 bytes" in reply
        assert s.recv(1024) == b""
    with connect(mesh.tcp_port) as s:
        assert ACK.match(say(s, "still serving").rstrip("\n"))
    assert [m.body for m in rows(data_a)] == ["still serving"]
    assert rows(mesh.cluster.data_dir("B")) == []
    assert mesh.a.alive()
    # What the gateway refused is counted where A's user looks, while it runs: `status` (as
    # `peers --json` gives it) and `meshpost peers`.
    peers = [sys.executable, "-m", "meshpost", "peers", "--node", "A", "--data", str(data_a)]
    shown = subprocess.run([*peers, "--json"], capture_output=True, text=True, timeout=60,
                           stdin=subprocess.DEVNULL, env=dict(os.environ))
    assert shown.returncode == 0, shown.stderr
    counters = json.loads(shown.stdout)["status"]["roles"]["gateway"]
    assert (counters["connections"], counters["messages"], counters["closed_for_input"]) == (
        3, 1, 2), counters
    assert counters["errors"] >= 3, counters
    table = subprocess.run(peers, capture_output=True, text=True, timeout=60,
                           stdin=subprocess.DEVNULL, env=dict(os.environ))
    assert table.returncode == 0, table.stderr
    assert "gateway:" in table.stdout
    assert re.search(r"^  closed_for_input +2$", table.stdout, re.M), table.stdout


def test_client_killed_mid_message_loses_nothing_stored_and_node_keeps_serving(
    mesh: Mesh,
) -> None:
    # Half a message then a reset: what was acknowledged stays, the rest is the client's.
    s = connect(mesh.tcp_port)
    assert ACK.match(say(s, "kept").rstrip("\n"))
    s.send(b"cut off mid")
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    s.close()  # RST
    with connect(mesh.tcp_port) as s2:
        assert ACK.match(say(s2, "after").rstrip("\n"))
    bodies = [m.body for m in rows(mesh.cluster.data_dir("A"))]
    assert bodies.count("kept") == 1 and bodies.count("after") == 1
    assert set(bodies) <= {"kept", "after", "cut off mid"}


def test_flood_of_clients_some_killed_mid_message_loses_and_duplicates_nothing(
    mesh: Mesh,
) -> None:
    """The battery's counts for the gateway: every acknowledged message stored exactly once
    (lost 0, duplicated 0), and nothing stored that no client sent whole."""
    clients, per_client = 30, 10
    acked: dict[str, str] = {}  # id -> body
    sent_whole: set[str] = set()
    errors: list[BaseException] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        try:
            s = connect(mesh.tcp_port)
            for k in range(per_client):
                body = f"c{i} m{k}"
                if i % 5 == 0 and k == per_client // 2:
                    s.send(body[:3].encode())  # half a message, then a reset
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                 b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    s.close()
                    with lock:
                        sent_whole.add(body[:3])  # a reset may still end it as a message
                    return
                with lock:
                    sent_whole.add(body)
                reply = say(s, body).rstrip("\n")
                match = ACK.match(reply)
                assert match, reply
                with lock:
                    acked[match.group(1)] = body
            s.close()
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S * 2)
    assert not errors, errors
    stored = rows(mesh.cluster.data_dir("A"), direction="in")
    by_id = {m.id: m.body for m in stored}
    lost = [i for i, body in acked.items() if by_id.get(i) != body]
    bodies = [m.body for m in stored]
    duplicated = len(bodies) - len(set(bodies))
    phantom = [b for b in bodies if b not in sent_whole]
    assert (len(lost), duplicated, len(phantom)) == (0, 0, 0), (lost, duplicated, phantom)
    assert len(acked) == clients * per_client - (clients // 5) * (per_client - per_client // 2)
    assert mesh.a.alive()


def test_readmes_six_line_client_gets_an_answer_to_an_empty_line_too(mesh: Mesh) -> None:
    """README's version of seed 004's client sends each line (newline included) and blocks in
    recv: an empty line (the user pressed Enter) used to get no answer, so it hung for ever.
    Now every line is answered, and the empty one stores nothing."""
    with connect(mesh.tcp_port) as s:
        answers = []
        for line in ("hola\n", "\n", "adios\n"):
            s.send(line.encode("utf-8"))
            answers.append(s.recv(1024).decode("utf-8"))
    assert ACK.match(answers[0].rstrip("\n")), answers
    assert answers[1].startswith("error: empty line; nothing stored"), answers
    assert ACK.match(answers[2].rstrip("\n")), answers
    assert [m.body for m in rows(mesh.cluster.data_dir("A"), direction="in")] == ["hola", "adios"]

"""docs/protocol.md section 17 (and README's "Plain sockets") are enough for a gateway client:
the clients here are written from those words alone, with the standard library's `socket`
(no meshpost import), against real `meshpost node` processes; what the nodes stored is read
with `sqlite3` as section 16 gives the schema. Every answer the section spells out is checked
byte for byte, and each such text is checked to be in the section, so the two cannot part.

The harness (mesh.toml, starting nodes) uses meshpost's cluster helpers; the clients never do.
Three nodes A, B, C on ipc://, group `team` = A, B, C; A serves the gateways on 127.0.0.1, C
on ::1 (when the machine has it); `max_message_bytes` = 1000.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import socket
import sqlite3
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from meshpost.cluster import free_tcp_ports, write_mesh_config
from meshpost.processes import NodeProcess

from .conftest import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

#: Every wait for an answer: generous for a loaded 2-core machine, never a threshold.
WAIT_S = 30.0
LIMIT = 1000
DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"
README = Path(__file__).resolve().parents[2] / "README.md"
#: 17.2: "Times are UTC, ISO 8601 with microseconds: `2026-12-05T23:59:01.123456Z`".
TIME = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z"
#: 5.3: a message id is 28 lowercase hex digits.
ACK = re.compile(rf"received ([0-9a-f]{{28}}) at ({TIME})\n")
BLANK = b"error: empty line; nothing stored (type some text, @NODE text, or /inbox)\n"


def section(text: str, start: str, end: str) -> str:
    return text[text.index(start):text.index(end, text.index(start))]


SECTION_17 = section(DOC.read_text(encoding="utf-8"), "## 17. Text gateways",
                     "## 18. ")
README_GATEWAY = section(README.read_text(encoding="utf-8"), "## Plain sockets", "\n## ")


def documented(text: str) -> str:
    """`text`, an answer the section spells out (so that the test and the doc agree)."""
    assert text in " ".join(SECTION_17.split()), f"section 17 does not say {text!r}"
    return text


def has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def free_port(host: str, kind: socket.SocketKind) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, kind) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class Mesh:
    def __init__(self, root: Path) -> None:
        self.root = root
        endpoints = {n: f"ipc://{root}/{n.lower()}.sock" for n in "ABC"}
        config = write_mesh_config(root / "mesh.toml", endpoints,
                                   options={"max_message_bytes": LIMIT},
                                   groups={"team": ["A", "B", "C"]})
        self.tcp = free_tcp_ports(1)[0]
        self.udp = free_port("127.0.0.1", socket.SOCK_DGRAM)
        gateways = {"A": ["--text-listen", f"tcp://127.0.0.1:{self.tcp}",
                          "--udp-listen", f"udp://127.0.0.1:{self.udp}"]}
        self.ipv6 = has_ipv6()
        if self.ipv6:
            self.tcp6 = free_port("::1", socket.SOCK_STREAM)
            self.udp6 = free_port("::1", socket.SOCK_DGRAM)
            gateways["C"] = ["--text-listen", f"tcp://[::1]:{self.tcp6}",
                             "--udp-listen", f"udp://[::1]:{self.udp6}"]
        self.nodes = {n: NodeProcess(n, config, root / n, root / f"{n}.log",
                                     extra_args=gateways.get(n, ())) for n in "ABC"}

    def start(self) -> None:
        for node in self.nodes.values():
            node.start()
        for node in self.nodes.values():
            node.wait_ready()

    def stop(self) -> None:
        for node in self.nodes.values():
            node.stop()

    def rows(self, name: str, where: str = "1", params: tuple[Any, ...] = (), *,
             order: str = "hlc, id") -> list[Any]:
        """Rows of `name`'s `message_rows` view (section 16: messages with their receipts'
        state), oldest first."""
        db = sqlite3.connect(f"file:{self.root / name / 'meshpost.db'}?mode=ro", uri=True)
        try:
            db.row_factory = sqlite3.Row
            return db.execute(f"SELECT * FROM message_rows WHERE {where} ORDER BY {order}",
                              params).fetchall()
        finally:
            db.close()

    def row(self, name: str, message_id: str) -> Any:
        (row,) = self.rows(name, "id = ?", (message_id,))
        return row


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    root = Path(tempfile.mkdtemp(prefix="mpg-", dir="/tmp"))
    m = Mesh(root)
    try:
        m.start()
        yield m
    finally:
        m.stop()
        shutil.rmtree(root, ignore_errors=True)


# -- clients, as a student would write them from the section ---------------------------------


def tcp(mesh: Mesh, source: str = "127.0.0.1") -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(WAIT_S)
    s.bind((source, 0))
    s.connect(("127.0.0.1", mesh.tcp))
    _unread.pop(id(s), None)  # an id of a socket gone before
    return s


def label(s: socket.socket, scheme: str = "tcp") -> str:
    """17.3: a guest's label is `tcp:IP:PORT` or `udp:IP:PORT`, its address as seen."""
    host, port = s.getsockname()[:2]
    return f"{scheme}:{host}:{port}"


#: Bytes read past the lines asked for, per socket, for the next call.
_unread: dict[int, bytes] = {}


def lines(s: socket.socket, count: int) -> list[bytes]:
    """The next `count` answer lines (each `\\n`-terminated, 17.2)."""
    got = _unread.pop(id(s), b"")
    while got.count(b"\n") < count:
        chunk = s.recv(65536)
        assert chunk, f"closed after {got!r}"
        got += chunk
    out = got.splitlines(keepends=True)
    _unread[id(s)] = b"".join(out[count:])
    return out[:count]


def line(s: socket.socket) -> bytes:
    return lines(s, 1)[0]


def to_end(s: socket.socket) -> bytes:
    got = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := s.recv(65536):
            got += chunk
    return got


def udp(mesh: Mesh) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(WAIT_S)
    s.bind(("127.0.0.1", 0))
    s.connect(("127.0.0.1", mesh.udp))
    return s


def stored_time(ns: int) -> str:
    """17.2's time of a stored row: UTC, microseconds."""
    seconds, rest = divmod(ns, 1_000_000_000)
    moment = datetime.fromtimestamp(seconds, tz=UTC).replace(microsecond=rest // 1000)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def acked(mesh: Mesh, answer: bytes, guest: str, body: str, seq: int) -> None:
    """17.2 `received <id> at <stored time>` and 17.3's row behind it, committed."""
    match = ACK.fullmatch(answer.decode())
    assert match, answer
    row = mesh.row("A", match.group(1))
    assert (row["direction"], row["peer"], row["sender"], row["recipient"], row["state"],
            row["body"], row["seq"]) == ("in", guest, guest, "A", "received", body, seq)
    assert match.group(2) == stored_time(row["stored_at_ns"])
    # sent_at_ns: the node's wall time when the message was complete, before its commit.
    assert 0 < row["sent_at_ns"] <= row["stored_at_ns"]


# -- 17.1 messages -------------------------------------------------------------------------


def test_tcp_lines_end_at_lf_a_cr_before_it_is_dropped_and_each_is_answered(
    mesh: Mesh,
) -> None:
    with tcp(mesh) as s:
        s.sendall("uno\ndos\r\ntrés\n".encode())
        answers = lines(s, 3)
        for seq, (answer, body) in enumerate(zip(answers, ["uno", "dos", "trés"],
                                                 strict=True), start=1):
            acked(mesh, answer, label(s), body, seq)


def test_tcp_text_without_a_newline_is_a_message_after_a_pause(mesh: Mesh) -> None:
    """Seed 004's client: send with no newline, block in recv(1024)."""
    with tcp(mesh) as s:
        s.send(b"hola")
        acked(mesh, s.recv(1024), label(s), "hola", 1)


def test_tcp_text_buffered_when_the_client_closes_is_a_last_message(mesh: Mesh) -> None:
    with tcp(mesh) as s:
        s.sendall(b"first\nadios")
        s.shutdown(socket.SHUT_WR)
        answers = to_end(s).splitlines(keepends=True)
        acked(mesh, answers[0], label(s), "first", 1)
        acked(mesh, answers[1], label(s), "adios", 2)
        assert len(answers) == 2


def test_udp_a_datagram_is_a_message_and_one_trailing_newline_is_dropped(mesh: Mesh) -> None:
    with udp(mesh) as s:
        for seq, (datagram, body) in enumerate(
                [(b"uno", "uno"), (b"dos\n", "dos"), (b"tres\n\n", "tres\n"),
                 (b"cuatro\r\n", "cuatro"), (b"a\nb", "a\nb")], start=1):
            s.send(datagram)
            acked(mesh, s.recv(65536), label(s, "udp"), body, seq)


def test_udp_an_acknowledgement_is_neither_stored_nor_answered(mesh: Mesh) -> None:
    """17.1: another gateway's answer is not a message (it would be answered for ever)."""
    documented("A datagram that is exactly an acknowledgement")
    ack = b"received 0123456789abcdef0123456789ab at 2026-12-05T23:59:01.123456Z"
    with udp(mesh) as s:
        for datagram in (ack, ack + b"\n"):
            s.send(datagram)
        s.send(ack + b" and more")  # not exactly one: a message
        # 17.3: a dropped datagram is not counted.
        acked(mesh, s.recv(65536), label(s, "udp"), ack.decode() + " and more", 1)
    assert mesh.rows("A", "body = ?", (ack.decode(),)) == []


def test_invalid_utf8_is_an_error_and_ends_a_tcp_connection(mesh: Mesh) -> None:
    before = len(mesh.rows("A"))
    with tcp(mesh) as s:
        s.sendall(b"caf\xe9\nnot read\n")
        answer = to_end(s)
        assert answer.startswith(b"error: message is not UTF-8 text")
        assert answer.endswith(b"; closing\n") and answer.count(b"\n") == 1
    with udp(mesh) as s:
        s.send(b"caf\xe9")
        assert s.recv(65536).startswith(b"error: message is not UTF-8 text")
    assert len(mesh.rows("A")) == before


def test_the_size_limit_counts_bytes_without_the_line_end(mesh: Mesh) -> None:
    with tcp(mesh) as s:
        s.sendall(b"x" * LIMIT + b"\r\n")
        acked(mesh, line(s), label(s), "x" * LIMIT, 1)
        s.sendall(b"y" * (LIMIT + 1) + b"\n")
        assert to_end(s) == (f"error: message of {LIMIT + 1} bytes or more is over the "
                             f"limit of {LIMIT} bytes; closing\n").encode()
    with tcp(mesh) as s:  # never ended: refused once the limit is passed
        with contextlib.suppress(OSError):
            for _ in range(100):
                s.send(b"z" * 1000)
        assert to_end(s).startswith(b"error: message of ")
    with udp(mesh) as s:
        s.send(b"u" * LIMIT + b"\n")
        acked(mesh, s.recv(65536), label(s, "udp"), "u" * LIMIT, 1)
        s.send(b"v" * (LIMIT + 1))
        assert s.recv(65536) == (f"error: message is {LIMIT + 1} bytes, over the {LIMIT}-byte "
                                 "limit (raise max_message_bytes in the mesh config on every "
                                 "node)\n").encode()


def test_connections_past_the_limits_are_told_and_closed(mesh: Mesh) -> None:
    """64 connections at once from one address, 256 in all (section 17.1)."""
    documented("`max_clients_per_host` (64)")
    documented("`max_clients` (256)")
    held: list[socket.socket] = []
    try:
        documented("error: N connections from IP already; try later")
        documented("error: N clients already; try later")
        for host in range(4):  # 127.0.0.10 .. 13: 64 each
            for _ in range(64):
                s = tcp(mesh, f"127.0.0.{10 + host}")
                held.append(s)
            # The last is served (one round trip), one more from its address is not.
            held[-1].sendall(b"/inbox 1\n")
            assert line(held[-1]).startswith(b"inbox: ")
            with tcp(mesh, f"127.0.0.{10 + host}") as s:
                assert to_end(s) == (f"error: 64 connections from 127.0.0.{10 + host} "
                                     "already; try later\n" if host < 3 else  # 256: full
                                     "error: 256 clients already; try later\n").encode()
        with tcp(mesh, "127.0.0.20") as s:
            assert to_end(s) == b"error: 256 clients already; try later\n"
    finally:
        for s in held:
            s.close()
    # The places are free again once the connections are closed.
    def served() -> bool:
        with tcp(mesh, "127.0.0.20") as s:
            s.sendall(b"/inbox 1\n")
            return line(s).startswith(b"inbox: ")
    wait_until(served, WAIT_S, "a place free again")


# -- 17.2 lines ------------------------------------------------------------------------------


def test_an_empty_or_blank_line_is_answered_over_tcp_and_not_over_udp(mesh: Mesh) -> None:
    before = len(mesh.rows("A"))
    documented(BLANK.decode().rstrip("\n"))
    with tcp(mesh) as s:
        s.sendall(b"\n   \n\r\n\t\n")
        assert lines(s, 4) == [BLANK] * 4
        s.sendall(b"then\n")
        acked(mesh, line(s), label(s), "then", 5)  # 17.3: each line counts
    with udp(mesh) as s:
        for datagram in (b"", b"\n", b"  ", b"\r\n"):
            s.send(datagram)
        s.send(b"after blanks")
        acked(mesh, s.recv(65536), label(s, "udp"), "after blanks", 5)
    assert len(mesh.rows("A")) == before + 2


def escaped(text: str) -> str:
    """17.2: a body on one line, each character that is not printable (controls, line and
    paragraph separators, format characters such as bidi overrides) written as in a
    Python string literal: `\\n`, `\\t`, `\\x1b`, `\\u202e`."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)


def test_inbox_lists_what_this_node_received_with_stored_times_and_escapes(
    mesh: Mesh,
) -> None:
    with udp(mesh) as s:  # something to list, whatever ran before
        s.send("é \u202e\x00\n\\n".encode())
        assert ACK.fullmatch(s.recv(65536).decode())
    with tcp(mesh) as s:
        s.sendall(b"/inbox 200\n")
        header = line(s).decode()
        match = re.fullmatch(r"inbox: (\d+) message\(s\)\n", header)
        assert match, header
        count = int(match.group(1))
        listed = lines(s, count)
    received = mesh.rows("A", "direction = 'in'")
    assert count == min(len(received), 200)
    for row, text in zip(received[-count:], listed, strict=True):
        assert text.decode() == (f"{stored_time(row['stored_at_ns'])} {row['sender']}: "
                                 f"{escaped(row['body'])}\n")
    assert listed[-1].decode().endswith(": é \\u202e\\x00\\n\\n\n")


def test_inbox_counts_are_1_to_200(mesh: Mesh) -> None:
    with tcp(mesh) as s:
        for arg in ("0", "201", "x", "-1"):
            s.sendall(f"/inbox {arg}\n".encode())
            assert line(s) == f"error: /inbox takes a count from 1 to 200, not '{arg}'\n".encode()
        s.sendall(b"/inbox 1\n")
        assert line(s).startswith(b"inbox: 1 message(s)\n")


def test_a_body_with_control_characters_is_one_inbox_line(mesh: Mesh) -> None:
    """17.2: "`\\n` as the two characters `\\` `n`"."""
    with udp(mesh) as s:
        s.send(b"two\nlines\ttab\x1b[0m")
        match = ACK.fullmatch(s.recv(65536).decode())
        assert match
        s.send(b"/inbox 1" + b" " * 100)
        answer = s.recv(65536)
    assert answer.endswith(b": two\\nlines\\ttab\\x1b[0m\n"), answer
    assert answer.count(b"\n") == 2


def test_at_target_relays_as_this_nodes_own_message(mesh: Mesh) -> None:
    with tcp(mesh) as s:
        guest = label(s)
        for target, queued in (("B", b"queued for B\n"), ("team", b"queued for B, C\n"),
                               ("all", b"queued for B, C\n")):
            s.sendall(f"@{target} hola {target}\n".encode())
            assert line(s) == queued
    for target, recipients in (("B", ["B"]), ("team", ["B", "C"]), ("all", ["B", "C"])):
        body = f"[{guest}] hola {target}"
        out = mesh.rows("A", "direction = 'out' AND body = ?", (body,))
        assert sorted(r["recipient"] for r in out) == recipients  # stored once per peer
        assert all(r["sender"] == "A" for r in out)
        for r in out:
            message_id: str = r["id"]
            wait_until(lambda i=message_id: mesh.row("A", i)["state"] == "delivered",  # type: ignore[misc]
                       WAIT_S, f"{r['recipient']}'s receipt")
            (copy,) = mesh.rows(r["recipient"], "direction = 'in' AND body = ?", (body,))
            assert (copy["id"], copy["sender"]) == (r["id"], "A")
        # Not also stored as incoming at A.
        assert mesh.rows("A", "direction = 'in' AND body LIKE ?", (f"%hola {target}",)) == []


def test_failures_are_one_error_line_and_the_connection_goes_on(mesh: Mesh) -> None:
    before = len(mesh.rows("A"))
    with tcp(mesh) as s:
        for text, answer in (
            ("@nobody hi", b"error: unknown peer 'nobody'; known peers: B, C, all, team\n"),
            ("@B", b"error: message body is empty; type some text after the recipient\n"),
            ("@B   ", b"error: message body is empty; type some text after the recipient\n"),
            ("@ hi", b"error: '@' must be followed by a node, a group or 'all': @B text\n"),
            ("@A hi", documented(
                "error: 'A' is this node; to write to it, send the text without '@A'"
            ).encode() + b"\n"),
        ):
            s.sendall(text.encode() + b"\n")
            assert line(s) == answer, text
        s.sendall(b"still here\n")
        acked(mesh, line(s), label(s), "still here", 6)
    assert len(mesh.rows("A")) == before + 1


def test_an_over_the_limit_relay_counts_the_label(mesh: Mesh) -> None:
    """`@B text` sends `[LABEL] text`: the limit applies to that body."""
    with tcp(mesh) as s:
        room = LIMIT - len(f"[{label(s)}] ")
        s.sendall(b"@B " + b"r" * room + b"\n")
        assert line(s) == b"queued for B\n"
        s.sendall(b"@B " + b"s" * (room + 1) + b"\n")
        assert line(s) == (f"error: message is {LIMIT + 1} bytes, over the {LIMIT}-byte limit "
                           "(raise max_message_bytes in the mesh config on every node)\n"
                           ).encode()


def test_udp_answers_are_one_datagram_bounded_by_the_request(mesh: Mesh) -> None:
    documented("3 times")
    with udp(mesh) as s:
        for request in (b"/inbox 200", b"/inbox 200" + b" " * 990):
            s.send(request)
            answer = s.recv(65536)
            assert len(answer) <= max(128, 3 * len(request)), (request[:12], len(answer))
            assert answer.startswith(b"inbox: ") and answer.endswith(b"\n")


# -- 17.3 how guests are stored ---------------------------------------------------------------


def test_seq_counts_a_udp_addresss_datagrams(mesh: Mesh) -> None:
    with udp(mesh) as s:
        for seq in range(1, 4):
            s.send(f"n{seq}".encode())
            acked(mesh, s.recv(65536), label(s, "udp"), f"n{seq}", seq)


def test_ipv6_guests_are_labelled_with_their_address(mesh: Mesh) -> None:
    if not mesh.ipv6:
        pytest.skip("no ::1 on this machine")
    with socket.create_connection(("::1", mesh.tcp6), timeout=WAIT_S) as s:
        s.sendall(b"over ipv6\n")
        match = ACK.fullmatch(line(s).decode())
        assert match
        host, port = s.getsockname()[:2]
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as u:
        u.settimeout(WAIT_S)
        u.sendto(b"udp over ipv6", ("::1", mesh.udp6))
        umatch = ACK.fullmatch(u.recv(65536).decode())
        assert umatch
        uport = u.getsockname()[1]
    ids = (match.group(1), umatch.group(1))
    assert [r["sender"] for r in mesh.rows("C", "id IN (?, ?)", ids)] == [
        f"tcp:{host}:{port}", f"udp:::1:{uport}"]


def test_readmes_example_answers_are_the_ones_given(mesh: Mesh) -> None:
    """README's session: its answers' shapes, as a reader would copy them."""
    assert "received 018f2c4e1a7b3f9c0d5e6a7b8c9d at 2026-12-05T23:59:01.123456Z" in (
        README_GATEWAY)
    assert ACK.fullmatch("received 018f2c4e1a7b3f9c0d5e6a7b8c9d at "
                         "2026-12-05T23:59:01.123456Z\n")
    with tcp(mesh) as s:
        s.sendall(b"@nobody hi\n")
        answer = line(s).decode()
    assert answer == "error: unknown peer 'nobody'; known peers: B, C, all, team\n"


def test_nothing_is_answered_before_it_is_committed(mesh: Mesh) -> None:
    """17.3: the answer is sent only after the commit: a reader at once sees the row."""
    with tcp(mesh) as s:
        for i in range(20):
            s.sendall(f"committed {i}\n".encode())
            match = ACK.fullmatch(line(s).decode())
            assert match
            assert mesh.row("A", match.group(1))["body"] == f"committed {i}"

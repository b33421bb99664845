"""Text gateways: plain TCP and UDP clients (`nc`, seed 003/004 programs) talk to a node.

Rule: a guest's message is answered only after the store has committed it (`received ...`,
`queued for ...`) or refused it (`error: ...`); bad input costs its sender alone, never the
node or another client, and no answer is larger than the gateway can afford to buffer (TCP) or
to send to an address it cannot verify (UDP). Framing, parsing and the answers' sizes are pure;
only the servers do I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import errno
import logging
import re
from collections import Counter, OrderedDict
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from meshpost.errors import (
    EndpointInUse,
    InvalidEndpoint,
    InvalidMessage,
    MeshpostError,
    MessageTooLarge,
    UnknownPeer,
)
from meshpost.protocol.ratelimit import (
    INPUT_WARNINGS_BURST,
    INPUT_WARNINGS_PER_S,
    Allowed,
    RateLimiter,
)
from meshpost.store import StoreReader

if TYPE_CHECKING:
    from meshpost.node import Node

log = logging.getLogger(__name__)

#: A client that pauses this long with unterminated text buffered has sent a message: seed
#: 004's client sends no newline and then blocks in recv(1024), waiting for our answer.
DEFAULT_IDLE_GAP_S = 0.2
#: A connected client silent this long (nothing buffered) is told so and disconnected, so
#: forgotten connections do not pile up.
DEFAULT_IDLE_TIMEOUT_S = 300.0
#: Connections served at once; one more is answered with an error and closed.
DEFAULT_MAX_CLIENTS = 256
#: Connections served at once from one IP address. Without it one host could hold every
#: place: 256 connections each trickling a line a byte at a time, just under the idle gap
#: (slowloris), kept every other guest out for as long as it kept trickling (a 64 KiB line at
#: a byte per 0.19 s is three and a half hours, then it reconnects).
DEFAULT_MAX_CLIENTS_PER_HOST = 64
#: A committed message is answered within this; past it the guest is told the store is slow
#: (the message may still be stored: the store retries, it never drops).
STORE_TIMEOUT_S = 30.0
#: Messages `/inbox` lists by default, and at most.
INBOX_DEFAULT = 20
INBOX_MAX = 200
#: The shortest `/inbox` line: a time (27 bytes), a space, a sender of a byte at least, `: `,
#: the body (none, at the least) and the newline.
INBOX_LINE_MIN_BYTES = 32
#: UDP guests whose message counters we remember (their `seq`); the oldest is forgotten.
UDP_GUESTS_REMEMBERED = 4096
#: UDP datagrams being stored at once; more are dropped and counted (UDP may drop anyway).
UDP_MAX_IN_FLIGHT = 1024
#: Largest UDP reply: one IPv4 datagram's payload.
UDP_MAX_REPLY_BYTES = 65_507
#: A UDP answer is at most this many times the size of the datagram it answers (or
#: `UDP_REPLY_FLOOR_BYTES`). A datagram's source address is not proof of who sent it: a large
#: answer to a small datagram with a forged source makes the node an amplifier aimed at that
#: address (`/inbox`, 6 bytes, was answered with up to 65,507: 10,917 times its size).
UDP_AMPLIFICATION = 3
#: Every datagram may be answered with this much: an acknowledgement (69 bytes) or a short
#: error. The worst ratio left, on the wire (28 bytes of IPv4 and UDP headers each way), is a
#: 1-byte datagram answered with 128 bytes: 156 / 29, under 6.
UDP_REPLY_FLOOR_BYTES = 128
#: The most bytes of one answer over TCP (an `/inbox`, an error quoting a long `@target`):
#: 200 messages of 64 KiB, their control characters escaped (4 bytes each), were a 52 MB
#: `/inbox` answer held in memory for a client that reads nothing, 13 GB for 256 of them.
TCP_MAX_ANSWER_BYTES = 1 << 20
#: The answer to an empty line or datagram: nothing is stored, and the client that waits for
#: an answer to each line it sends gets one.
BLANK_ANSWER = "error: empty line; nothing stored (type some text, @NODE text, or /inbox)"
#: Bytes read from a TCP stream at a time.
_READ_CHUNK = 65_536
#: A datagram that is exactly a gateway's acknowledgement (ours or another node's).
_ACKNOWLEDGEMENT = re.compile(
    rb"received [0-9a-f]{28} at \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z\n?")


class GatewayInputError(InvalidMessage):
    """A guest sent bytes the gateway cannot take (too long, not UTF-8): answer and close."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class GatewayConfig:
    """Where the gateways listen (None: off) and how patient they are."""

    tcp: tuple[str, int] | None = None
    udp: tuple[str, int] | None = None
    idle_gap_s: float = DEFAULT_IDLE_GAP_S
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S
    max_clients: int = DEFAULT_MAX_CLIENTS
    max_clients_per_host: int = DEFAULT_MAX_CLIENTS_PER_HOST

    @property
    def enabled(self) -> bool:
        return self.tcp is not None or self.udp is not None


def parse_listen(url: str, scheme: str) -> tuple[str, int]:
    """`tcp://HOST:PORT` (or `udp://`) -> (host, port); port 0 picks a free one."""
    prefix = f"{scheme}://"
    if not url.startswith(prefix):
        raise InvalidEndpoint(url, f"expected {prefix}HOST:PORT")
    host, sep, port = url[len(prefix):].rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host:
        raise InvalidEndpoint(url, f"expected {prefix}HOST:PORT")
    if not (port.isascii() and port.isdigit()) or not 0 <= int(port) < 65536:
        raise InvalidEndpoint(url, f"port {port!r} is not a number from 0 to 65535")
    return host, int(port)


# -- pure parts: framing and line commands --------------------------------------------------


class Framer:
    """Splits a TCP byte stream into messages: at each newline, or (`flush`) at a pause.

    `feed` raises `GatewayInputError` once more than `max_bytes` are buffered without a
    newline, so one client cannot make the node hold unbounded memory.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._buffer = bytearray()

    @property
    def pending(self) -> bool:
        return bool(self._buffer)

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        *lines, rest = self._buffer.split(b"\n")
        self._buffer = bytearray(rest)
        for line in lines:
            # The CR of a CRLF is not the message's: a line of max_bytes + 1 without one was
            # answered `error:` and read on, one of max_bytes + 2 closed the connection.
            if _size(line) > self.max_bytes:
                raise GatewayInputError(_too_long(_size(line), self.max_bytes))
        if _size(self._buffer) > self.max_bytes:
            raise GatewayInputError(_too_long(len(self._buffer), self.max_bytes))
        return [bytes(line) for line in lines]

    def flush(self) -> bytes:
        """The unterminated text buffered so far (the client paused): a message of its own."""
        data, self._buffer = bytes(self._buffer), bytearray()
        return data


def _size(raw: bytes | bytearray) -> int:
    """A message's size as the limit counts it: without the CR of a CRLF."""
    return len(raw) - raw.endswith(b"\r")


def _too_long(size: int, limit: int) -> str:
    return f"message of {size} bytes or more is over the limit of {limit} bytes"


def decode_text(raw: bytes) -> str:
    """One message's bytes as text: UTF-8, a trailing CR (of CRLF) dropped."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise GatewayInputError(f"message is not UTF-8 text (byte {exc.start})") from None
    return text.removesuffix("\r")


@dataclasses.dataclass(frozen=True, slots=True)
class Post:
    """Text for this node (`target` None) or, relayed, for a peer, group or `all`."""

    target: str | None
    body: str


@dataclasses.dataclass(frozen=True, slots=True)
class Inbox:
    """`/inbox [N]`: the last N messages this node received."""

    limit: int


@dataclasses.dataclass(frozen=True, slots=True)
class Blank:
    """An empty line: nothing to store. Over TCP it is answered all the same (`BLANK_ANSWER`):
    a client written as seed 004's (send a line, block in `recv`) would otherwise wait for
    ever when its user pressed Enter. An empty UDP datagram gets no answer (seed 003's client
    never reads, and its server took one as the end)."""


Command = Post | Inbox | Blank


def parse_line(text: str) -> Command:
    """What one guest message asks for. Raises `InvalidMessage` for a malformed command."""
    if not text.strip():
        return Blank()
    if text.startswith("/inbox"):
        arg = text[len("/inbox"):].strip()
        if not arg:
            return Inbox(INBOX_DEFAULT)
        if not (arg.isascii() and arg.isdigit()) or not 0 < int(arg) <= INBOX_MAX:
            raise InvalidMessage(f"/inbox takes a count from 1 to {INBOX_MAX}, not {arg!r}")
        return Inbox(int(arg))
    if text.startswith("@"):
        target, _sep, body = text[1:].partition(" ")
        if not target:
            raise InvalidMessage("'@' must be followed by a node, a group or 'all': @B text")
        return Post(target, body)
    return Post(None, text)


def relayed_body(guest: str, text: str) -> str:
    """The body a node sends for a guest's `@B text`: the message is the node's, and names
    the guest it came from (a guest is not a mesh peer and cannot send as one)."""
    return f"[{guest}] {text}"


def format_time(ns: int) -> str:
    """UTC, microseconds, ISO 8601: `2026-12-05T23:59:01.123456Z`."""
    seconds, rest = divmod(ns, 1_000_000_000)  # integers: a float would round the micros
    moment = datetime.datetime.fromtimestamp(seconds, tz=datetime.UTC).replace(
        microsecond=rest // 1000)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _one_line(text: str) -> str:
    """A body on one reply line: newlines and other control characters escaped."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)


def cut_line(line: str, room_bytes: int) -> str:
    """`line` in at most `room_bytes` bytes of UTF-8 (at least 4): a cut ends in `…`."""
    data = line.encode("utf-8")
    if len(data) <= room_bytes:
        return line
    return data[:room_bytes - 3].decode("utf-8", "ignore") + "…"


def fit_answer(lines: Sequence[str], budget_bytes: int) -> bytes:
    """The answer's bytes, each line `\n`-terminated, in at most `budget_bytes`: whole lines
    while they fit, then the first that does not, cut (`…`); nothing after it."""
    out: list[bytes] = []
    used = 0
    for line in lines:
        data = f"{line}\n".encode()
        if used + len(data) > budget_bytes:
            room = budget_bytes - used - 1
            if room >= 4:
                out.append(f"{cut_line(line, room)}\n".encode())
            break
        out.append(data)
        used += len(data)
    return b"".join(out)


def udp_budget(request_bytes: int) -> int:
    """The most bytes a datagram of `request_bytes` may be answered with."""
    return min(UDP_MAX_REPLY_BYTES,
               max(UDP_REPLY_FLOOR_BYTES, UDP_AMPLIFICATION * request_bytes))


def inbox_rows(limit: int, budget_bytes: int) -> int:
    """How many of the newest rows `/inbox` reads for an answer of `budget_bytes`: what can
    fit, and one more (it says that some did not). A row costs its whole body to read (and
    to check): 200 rows of 64 KiB, 12 MB, for an answer of 128 bytes to a datagram of 10
    was 28 ms of the node's CPU."""
    return min(limit, budget_bytes // INBOX_LINE_MIN_BYTES + 1)


def inbox_lines(rows: Sequence[tuple[int, str, str]], budget_bytes: int) -> list[str]:
    """`/inbox`'s answer for `rows` (stored_at_ns, sender, body; oldest first) in at most
    `budget_bytes`: the newest messages that fit (the newest one cut to fit if it alone does
    not); the first line says how many, and whether some were left out or cut."""
    total = len(rows)
    # The header's longest form, so that the lines and the header together fit.
    room = budget_bytes - len(_inbox_header(total, budget_bytes).encode()) - 1
    lines: list[str] = []
    cut = False
    for stored_at_ns, sender, body in reversed(rows):
        # Each character is at least one byte of the answer: the rest of a long body could
        # never fit, so it is not escaped either (a 16 MiB body would cost seconds).
        line = f"{format_time(stored_at_ns)} {_one_line(sender)}: {_one_line(body[:room])}"
        size = len(line.encode("utf-8")) + 1
        if size > room:
            cut = True
            if not lines and room >= 5:
                lines.append(cut_line(line, room - 1))
            break
        lines.append(line)
        room -= size
    lines.reverse()
    header = (_inbox_header(len(lines), budget_bytes) if cut
              else f"inbox: {len(lines)} message(s)")
    return [header, *lines]


def _inbox_header(shown: int, budget_bytes: int) -> str:
    return f"inbox: {shown} message(s) (the newest that fit an answer of {budget_bytes} bytes)"


@dataclasses.dataclass(slots=True)
class GatewayStats:
    """Counters of both gateways: in control `status` (`roles.gateway`) while they run, and
    logged when they close."""

    connections: int = 0
    messages: int = 0
    relayed: int = 0
    errors: int = 0
    closed_for_input: int = 0
    closed_idle: int = 0
    closed_not_reading: int = 0
    refused_busy: int = 0
    refused_host_busy: int = 0
    udp_dropped: int = 0
    udp_acknowledgements_dropped: int = 0
    udp_answers_cut: int = 0
    warnings_not_logged: int = 0


# -- serving -------------------------------------------------------------------------------


class Gateway:
    """The TCP and UDP text gateways of one node. Use as `async with Gateway(node, cfg):`."""

    def __init__(self, node: Node, config: GatewayConfig) -> None:
        self.node = node
        self.config = config
        self.stats = GatewayStats()
        self.tcp_address: tuple[str, int] | None = None
        self.udp_address: tuple[str, int] | None = None
        self._server: asyncio.Server | None = None
        self._udp: asyncio.DatagramTransport | None = None
        self._clients: set[asyncio.Task[None]] = set()
        self._clients_per_host: Counter[str] = Counter()
        #: One bucket (key "input") for every guest's bad input: a flood may use many
        #: addresses, and each warning used to be a line of the log (a UDP flood of bad
        #: datagrams filled the disk at the speed of the flood).
        self._warnings = RateLimiter(rate_per_s=INPUT_WARNINGS_PER_S, burst=INPUT_WARNINGS_BURST)
        self._udp_tasks: set[asyncio.Task[None]] = set()
        self._udp_seqs: OrderedDict[str, int] = OrderedDict()
        self._closing = False

    async def __aenter__(self) -> Gateway:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        cfg, name = self.config, self.node.name
        loop = asyncio.get_running_loop()
        if cfg.tcp is not None:
            with _bind_errors("tcp", cfg.tcp):
                self._server = await asyncio.start_server(self._serve_client, *cfg.tcp)
            self.tcp_address = self._server.sockets[0].getsockname()[:2]
            log.info("[%s] text gateway on tcp://%s:%d", name, *self._display(self.tcp_address))
        if cfg.udp is not None:
            with _bind_errors("udp", cfg.udp):
                transport, _protocol = await loop.create_datagram_endpoint(
                    lambda: _UdpProtocol(self), local_addr=cfg.udp
                )
            self._udp = transport
            self.udp_address = transport.get_extra_info("sockname")[:2]
            log.info("[%s] text gateway on udp://%s:%d", name, *self._display(self.udp_address))
        if cfg.tcp is not None or cfg.udp is not None:
            # Seen while it runs (control `status`, `meshpost peers`), not only in the log line
            # at close: a flood it refuses or cuts is counted where its node's user looks.
            self.node.add_role_counters("gateway", lambda: dataclasses.asdict(self.stats))

    @staticmethod
    def _display(address: tuple[str, int]) -> tuple[str, int]:
        host, port = address
        return (f"[{host}]" if ":" in host else host), port

    async def close(self) -> None:
        self._closing = True
        self.node.remove_role_counters("gateway")
        if self._server is not None:
            self._server.close()
        if self._udp is not None:
            self._udp.close()
        for task in [*self._clients, *self._udp_tasks]:
            task.cancel()
        await asyncio.gather(*self._clients, *self._udp_tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5.0):
                    await self._server.wait_closed()
        log.info("[%s] gateway closed: %s", self.node.name, self.stats)

    # -- one message, either transport ---------------------------------------------------

    async def handle(self, guest: str, seq: int, raw: bytes, *, answer_blank: bool = False,
                     answer_bytes: int = TCP_MAX_ANSWER_BYTES) -> list[str]:
        """Answer one guest message: the reply lines (for a blank line, `BLANK_ANSWER` if
        `answer_blank`, else none); an `/inbox` answer fits in `answer_bytes`.

        Raises `GatewayInputError` for bytes that end the conversation (not UTF-8).
        """
        text = decode_text(raw)
        try:
            command = parse_line(text)
        except InvalidMessage as exc:
            self.stats.errors += 1
            return [f"error: {_one_line(str(exc))}"]
        if answer_blank and isinstance(command, Blank):
            return [BLANK_ANSWER]
        return await self.perform(guest, seq, command, answer_bytes=answer_bytes)

    async def perform(self, guest: str, seq: int, command: Command, *,
                      answer_bytes: int = TCP_MAX_ANSWER_BYTES) -> list[str]:
        node = self.node
        try:
            match command:
                case Blank():
                    return []
                case Inbox(limit=limit):
                    return await self._inbox(limit, answer_bytes)
                case Post(target=str(target)) if target == node.name:
                    # A node is no peer of its own: "unknown peer 'A'; known peers: B" told
                    # A's guest less than this does.
                    raise InvalidMessage(f"{target!r} is this node; to write to it, send the "
                                         f"text without '@{target}'")
                case Post(target=None, body=body):
                    async with asyncio.timeout(STORE_TIMEOUT_S):
                        message_id, stored_at = await node.store_guest_message(guest, seq, body)
                    self.stats.messages += 1
                    return [f"received {message_id} at {format_time(stored_at)}"]
                case Post(target=str(target), body=body):
                    node.validate_body(body)  # the guest's text, before the label is added
                    async with asyncio.timeout(STORE_TIMEOUT_S):
                        handles = await node.post(target, relayed_body(guest, body))
                    self.stats.relayed += 1
                    if not handles:
                        raise UnknownPeer(target, [])
                    return [f"queued for {', '.join(h.to for h in handles)}"]
        except GatewayInputError:
            raise
        except MeshpostError as exc:
            self.stats.errors += 1
            return [f"error: {_one_line(str(exc))}"]
        except TimeoutError:
            self.stats.errors += 1
            return [f"error: the store did not commit within {STORE_TIMEOUT_S:.0f}s; "
                    "the message may still be stored"]
        raise AssertionError(f"unhandled command {command!r}")  # pragma: no cover

    async def _inbox(self, limit: int, answer_bytes: int) -> list[str]:
        data_dir = self.node.config.data_dir

        def read() -> list[str]:
            with StoreReader.for_data_dir(data_dir) as reader:
                rows = reader.history(direction="in",
                                      limit=inbox_rows(limit, answer_bytes))
            return inbox_lines([(m.stored_at_ns, m.sender, m.body) for m in rows], answer_bytes)

        return await asyncio.to_thread(read)

    # -- TCP -------------------------------------------------------------------------------

    async def _serve_client(self, reader: asyncio.StreamReader,
                            writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.stats.connections += 1
        host = str(writer.get_extra_info("peername")[0])
        if len(self._clients) >= self.config.max_clients:
            self.stats.refused_busy += 1
            writer.write(f"error: {len(self._clients)} clients already; try later\n".encode())
            await _close(writer)
            return
        if self._clients_per_host[host] >= self.config.max_clients_per_host:
            self.stats.refused_host_busy += 1
            writer.write(f"error: {self._clients_per_host[host]} connections from {host} "
                         "already; try later\n".encode())
            await _close(writer)
            return
        self._clients.add(task)
        self._clients_per_host[host] += 1
        try:
            await self._converse(reader, writer)
        except (ConnectionError, OSError) as exc:
            log.info("[%s] gateway client dropped: %s", self.node.name, exc)
        except asyncio.CancelledError:
            # Cancelled by close(): the task ends here. asyncio 3.11's done callback of a
            # client task takes a cancelled one for a failure (`task.exception()` unchecked,
            # fixed in 3.12) and logged a traceback at ERROR for every guest still connected,
            # at every stop. Any other cancellation goes on.
            if not self._closing:
                raise
        finally:
            self._clients.discard(task)
            self._clients_per_host[host] -= 1
            if not self._clients_per_host[host]:
                del self._clients_per_host[host]
            await _close(writer)

    async def _converse(self, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> None:
        host, port = writer.get_extra_info("peername")[:2]
        guest = f"tcp:{host}:{port}"
        cfg = self.config
        framer = Framer(self.node.config.max_message_bytes)
        seq = 0
        while True:
            wait_s = cfg.idle_gap_s if framer.pending else cfg.idle_timeout_s
            try:
                async with asyncio.timeout(wait_s):
                    data = await reader.read(_READ_CHUNK)
            except TimeoutError:
                if not framer.pending:
                    self.stats.closed_idle += 1
                    writer.write(f"error: idle for {wait_s:g}s; closing\n".encode())
                    return
                messages, last = [framer.flush()], False
            else:
                try:
                    messages = framer.feed(data) if data else []
                    if not data and framer.pending:
                        messages.append(framer.flush())
                except GatewayInputError as exc:
                    self._input_error(writer, guest, exc)
                    return
                last = not data
            for raw in messages:
                seq += 1
                try:
                    replies = await self.handle(guest, seq, raw, answer_blank=True)
                except GatewayInputError as exc:
                    self._input_error(writer, guest, exc)
                    return
                if replies and not await self._answer(writer, guest, replies):
                    return
            if last:
                return

    async def _answer(self, writer: asyncio.StreamWriter, guest: str,
                      replies: list[str]) -> bool:
        """Send `replies`; False if the guest read none of them for `idle_timeout_s` (then
        the connection is cut). Its answers wait in a buffer of asyncio's high-water mark
        (64 KiB) at most, since the next message is read only after this drains; without the
        bound, a client that sends and never reads held its place, its buffer and its
        descriptor for ever (every place taken so, the gateway answered nobody else)."""
        writer.write(fit_answer(replies, TCP_MAX_ANSWER_BYTES))
        try:
            async with asyncio.timeout(self.config.idle_timeout_s):
                await writer.drain()
        except TimeoutError:
            self.stats.closed_not_reading += 1
            self._warn("gateway guest %s read no answer for %gs; closing", guest,
                       self.config.idle_timeout_s)
            writer.transport.abort()
            return False
        return True

    def _input_error(self, writer: asyncio.StreamWriter, guest: str,
                     exc: GatewayInputError) -> None:
        self.stats.errors += 1
        self.stats.closed_for_input += 1
        self._warn("gateway guest %s: %s; closing", guest, exc)
        writer.write(f"error: {exc}; closing\n".encode())

    def _warn(self, message: str, *args: object) -> None:
        """Log a guest's bad input at WARNING at a bounded rate (every case is counted in
        `stats` by its caller): 20 at once, then one a second; the first not logged says so."""
        decision = self._warnings.check("input", asyncio.get_running_loop().time())
        if isinstance(decision, Allowed):
            log.warning("[%s] " + message, self.node.name, *args)
            return
        self.stats.warnings_not_logged += 1
        if decision.burst_started:
            log.warning("[%s] gateway guests' bad input comes faster than %d warnings at once "
                        "and %g a second: each is counted (the gateway's stats, logged when it "
                        "closes), and logged at that rate until it slows down", self.node.name,
                        INPUT_WARNINGS_BURST, INPUT_WARNINGS_PER_S)

    # -- UDP -------------------------------------------------------------------------------

    def _datagram(self, data: bytes, addr: tuple[str, int]) -> None:
        if _ACKNOWLEDGEMENT.fullmatch(data):
            # A gateway's answer, not a guest's message. Answered, it was stored and answered
            # in turn: one datagram whose forged source was a gateway (another node's, or
            # this one's) set the two answering each other for ever, a row a turn on each.
            # Every message is answered with an acknowledgement, so every chain ends here.
            self.stats.udp_acknowledgements_dropped += 1
            self._warn("udp gateway: a datagram from %s:%d is a gateway's acknowledgement; "
                       "dropped, not answered", addr[0], addr[1])
            return
        if len(self._udp_tasks) >= UDP_MAX_IN_FLIGHT:
            self.stats.udp_dropped += 1
            self._warn("udp gateway: %d datagrams being stored already; one dropped",
                       UDP_MAX_IN_FLIGHT)
            return
        guest = f"udp:{addr[0]}:{addr[1]}"
        seq = self._udp_seqs.pop(guest, 0) + 1
        self._udp_seqs[guest] = seq
        if len(self._udp_seqs) > UDP_GUESTS_REMEMBERED:
            self._udp_seqs.popitem(last=False)
        task = asyncio.create_task(self._answer_datagram(guest, seq, data, addr))
        self._udp_tasks.add(task)
        task.add_done_callback(self._udp_tasks.discard)

    async def _answer_datagram(self, guest: str, seq: int, data: bytes,
                               addr: tuple[str, int]) -> None:
        limit = self.node.config.max_message_bytes
        budget = udp_budget(len(data))
        try:
            raw = data.removesuffix(b"\n")
            if _size(raw) > limit:  # the size is known: said as a local send says it
                raise GatewayInputError(str(MessageTooLarge(_size(raw), limit)))
            replies = await self.handle(guest, seq, raw, answer_bytes=budget)
        except GatewayInputError as exc:
            self.stats.errors += 1
            self._warn("gateway guest %s: %s", guest, exc)
            replies = [f"error: {exc}"]
        if replies and self._udp is not None and not self._udp.is_closing():
            reply = fit_answer(replies, budget)
            if len(reply) < sum(len(line.encode()) + 1 for line in replies):
                self.stats.udp_answers_cut += 1
            self._udp.sendto(reply, addr)


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self._gateway._datagram(data, addr)

    def error_received(self, exc: Exception) -> None:
        # An ICMP "port unreachable" for an ack to a client that never reads (seed 003's):
        # nothing is lost, the message was stored before the ack left.
        log.debug("[%s] udp gateway: %s", self._gateway.node.name, exc)


@contextlib.contextmanager
def _bind_errors(scheme: str, address: tuple[str, int]) -> Iterator[None]:
    """A listening address we cannot take, as the error a user can act on."""
    url = f"{scheme}://{address[0]}:{address[1]}"
    try:
        yield
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise EndpointInUse(url, exc.strerror or str(exc)) from None
        raise InvalidEndpoint(url, exc.strerror or str(exc)) from None


async def _close(writer: asyncio.StreamWriter) -> None:
    try:
        writer.close()
        async with asyncio.timeout(2.0):
            await writer.wait_closed()
    except TimeoutError:
        # close() sends what is buffered first: to a client that reads nothing it never
        # closed, and the connection kept its descriptor and its buffer for ever.
        writer.transport.abort()
    except (ConnectionError, OSError):
        pass


__all__ = [
    "DEFAULT_MAX_CLIENTS_PER_HOST",
    "Framer",
    "Gateway",
    "GatewayConfig",
    "GatewayInputError",
    "GatewayStats",
    "fit_answer",
    "inbox_lines",
    "parse_line",
    "parse_listen",
    "udp_budget",
]

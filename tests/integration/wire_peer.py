"""An independent meshpost peer, written from docs/protocol.md alone.

Rule: nothing here comes from `meshpost`: only pyzmq, msgspec's plain msgpack encode/decode of
arrays, and the document's words (each piece names the section it follows). It is the minimum a
second implementation needs to dial a node and to be dialled by one; tests drive it step by
step, so it keeps no timers and every wait is bounded by the caller's timeout. With `curve`,
each side speaks secure mode (section 2.3): CURVE keys read from the files the document
describes, and, as a listener, a ZAP handler of its own (ZeroMQ RFC 27) polled between frames.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import secrets
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec
import zmq
import zmq.utils.monitor
import zmq.utils.z85

#: Section 6.1: element 1 of a "hello" array.
PROTOCOL_VERSION = 1

#: Section 4: each frame's fields after the tag, in wire order. The trailing fields with a
#: default may be absent (4.1 `resume`, 4.2 `resume`, 4.8 `pending`); extra trailing elements
#: are ignored (section 3).
FIELDS: dict[str, tuple[str, ...]] = {
    "hello": ("version", "node_id", "name", "sent_at_ns", "hlc", "resume"),
    "welcome": ("version", "node_id", "name", "sent_at_ns", "hlc", "sync", "resume"),
    "refuse": ("code", "detail"),
    "batch": ("tx_at_ns", "messages"),
    "receipt": ("ranges", "echo_tx_at_ns", "received_at_ns", "stored_at_ns", "replied_at_ns",
                "hlc", "sync"),
    "reject": ("seqs", "code", "detail"),
    "ping": ("sent_at_ns",),
    "pong": ("echo_sent_at_ns", "received_at_ns", "replied_at_ns", "pending"),
    "bye": ("reason",),
    "close": (),
}
DEFAULTS: dict[str, dict[str, Any]] = {
    "hello": {"resume": b""},
    "welcome": {"resume": b""},
    "pong": {"pending": -1},
}
#: Section 4.4: the envelope, an untagged array; `header` is nil for a direct message and may be
#: absent (an older node's 7-element envelope).
ENVELOPE_FIELDS = ("id", "seq", "sender", "recipient", "body", "sent_at_ns", "hlc", "header")
#: Section 3: which side may send which frame.
DIALER_TAGS = frozenset({"hello", "batch", "ping", "bye", "close"})
LISTENER_TAGS = frozenset({"welcome", "refuse", "receipt", "reject", "pong"})
#: Section 6.3 and 7.4.
REFUSE_CODES = frozenset({"version", "unknown-peer", "identity", "exclusive", "hello-required",
                          "malformed"})
REJECT_CODES = frozenset({"invalid", "too-large", "conflict", "unstorable"})


class WireError(Exception):
    """A frame this peer could not read as the document describes it."""


@dataclasses.dataclass(frozen=True)
class Frame:
    """One decoded frame: its tag and its fields by the document's names."""

    tag: str
    fields: dict[str, Any]

    def __getitem__(self, name: str) -> Any:
        return self.fields[name]


@dataclasses.dataclass(frozen=True)
class Envelope:
    """Section 4.4's envelope, by name."""

    id: str
    seq: int
    sender: str
    recipient: str
    body: str
    sent_at_ns: int
    hlc: int
    header: Any = None

    def wire(self) -> list[Any]:
        return [self.id, self.seq, self.sender, self.recipient, self.body, self.sent_at_ns,
                self.hlc, self.header]


def encode(tag: str, *fields: Any) -> bytes:
    """Section 3: one msgpack array, the tag first, then the fields in order."""
    return msgspec.msgpack.encode([tag, *fields])


def decode(data: bytes) -> Frame:
    """Section 3 read strictly enough for a test: an array, a known tag, enough fields."""
    try:
        value = msgspec.msgpack.decode(data)
    except msgspec.DecodeError as exc:
        raise WireError(f"not one msgpack value: {exc}") from exc
    if not isinstance(value, list) or not value or not isinstance(value[0], str):
        raise WireError(f"not a tagged array: {value!r}")
    tag, rest = value[0], value[1:]
    if tag not in FIELDS:
        raise WireError(f"unknown tag {tag!r}")
    names = FIELDS[tag]
    defaults = DEFAULTS.get(tag, {})
    fields: dict[str, Any] = {}
    for i, name in enumerate(names):
        if i < len(rest):
            fields[name] = rest[i]
        elif name in defaults:
            fields[name] = defaults[name]
        else:
            raise WireError(f"{tag} has {len(rest)} fields, needs {name!r} too")
    if tag == "batch":
        fields["messages"] = [envelope_from_wire(e) for e in fields["messages"]]
    return Frame(tag, fields)


def envelope_from_wire(value: Any) -> Envelope:
    if not isinstance(value, list) or len(value) < 7:
        raise WireError(f"an envelope is an array of 7 or 8: {value!r}")
    return Envelope(*value[:8])


def wall_ns() -> int:
    """Section 1: times are the writer's wall clock, ns since the epoch."""
    return time.time_ns()


class Hlc:
    """Section 9.2's hybrid logical clock: (physical_ms << 16) | logical."""

    def __init__(self) -> None:
        self.l = 0
        self.c = 0

    @staticmethod
    def pack(ms: int, logical: int) -> int:
        return (ms << 16) | logical

    @staticmethod
    def unpack(hlc: int) -> tuple[int, int]:
        return hlc >> 16, hlc & 0xFFFF

    def _bump(self, ms: int, c: int) -> tuple[int, int]:
        return (ms, c + 1) if c < 0xFFFF else (ms + 1, 0)

    def now(self) -> int:
        pt = wall_ns() // 1_000_000
        self.l, self.c = (pt, 0) if pt > self.l else self._bump(self.l, self.c)
        return self.pack(self.l, self.c)

    def observe(self, remote: int) -> int:
        r, rc = self.unpack(remote)
        pt = wall_ns() // 1_000_000
        if r > max(pt + 60_000, self.l):
            return self.now()
        top = max(pt, self.l, r)
        if top == self.l == r:
            self.l, self.c = self._bump(top, max(self.c, rc))
        elif top == self.l:
            self.l, self.c = self._bump(self.l, self.c)
        elif top == r:
            self.l, self.c = self._bump(r, rc)
        else:
            self.l, self.c = pt, 0
        return self.pack(self.l, self.c)


def new_node_id() -> str:
    """Section 5.2: 16 lowercase hex digits."""
    return secrets.token_hex(8)


def message_ids(count: int) -> list[str]:
    """Section 5.3: 12 hex digits of wall ms, then a 64-bit tail counting up from a random
    start (the ids of one post to many)."""
    ms = wall_ns() // 1_000_000
    start = secrets.randbits(64)
    return [format(ms, "012x") + format((start + i) % 2**64, "016x") for i in range(count)]


def to_ranges(seqs: Sequence[int]) -> list[list[int]]:
    """Section 4.5: inclusive, sorted, non-overlapping, maximal ranges."""
    out: list[list[int]] = []
    for seq in sorted(set(seqs)):
        if out and seq == out[-1][1] + 1:
            out[-1][1] = seq
        else:
            out.append([seq, seq])
    return out


# -- secure mode (section 2.3) ----------------------------------------------------------------

#: 2.3: ZeroMQ's CURVE keys are 32 bytes, written as 40 Z85 characters (ZeroMQ RFC 32).
Z85_KEY = re.compile(r"[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}")
#: 2.3: the line of a node's public key file that holds the key.
_PUBLIC_KEY_LINE = re.compile(r'^\s+public-key\s*=\s*"(.{40})"\s*$', re.M)
HANDSHAKE_EVENTS = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
                    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH)


def key_files(data_dir: Path) -> tuple[Path, Path]:
    """2.3: (public key file, secret key file) in a node's data dir."""
    return data_dir / "keys" / "node.key", data_dir / "keys" / "node.key_secret"


def read_public_key(path: Path) -> bytes:
    """2.3: a node's public key from its `node.key` (a ZeroMQ certificate: `#` comments, a
    `metadata` section, and `public-key = "Z85"` indented under `curve`)."""
    found = _PUBLIC_KEY_LINE.findall(path.read_text(encoding="utf-8"))
    if len(found) != 1 or not Z85_KEY.fullmatch(found[0]):
        raise WireError(f"{path}: not one Z85 public-key line")
    return str(found[0]).encode("ascii")


def authorized_line(name: str, public: bytes) -> str:
    """2.3: the `NAME Z85KEY` line a node's authorized_keys lists a peer with."""
    return f"{name} {public.decode('ascii')}"


def read_authorized_keys(text: str) -> dict[str, bytes]:
    """2.3: authorized_keys' lines (whole-line `#` comments and blank lines skipped)."""
    keys: dict[str, bytes] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, key = line.split()
            keys[name] = key.encode("ascii")
    return keys


@dataclasses.dataclass(frozen=True)
class KeyPair:
    """A CURVE key pair in Z85, made by libzmq (`zmq_curve_keypair`)."""

    public: bytes
    secret: bytes

    @classmethod
    def new(cls) -> KeyPair:
        public, secret = zmq.curve_keypair()
        return cls(public, secret)


@dataclasses.dataclass(frozen=True)
class CurveClient:
    """2.3: a dialer's side: its own key pair and the public key of the node it dials."""

    own: KeyPair
    server_key: bytes

    def apply(self, sock: zmq.Socket[bytes]) -> None:
        sock.setsockopt(zmq.CURVE_SERVERKEY, self.server_key)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.own.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.own.secret)


@dataclasses.dataclass(frozen=True)
class CurveServer:
    """2.3: a listener's side: its own key pair and the keys it admits, each naming a node."""

    own: KeyPair
    names_by_key: Mapping[bytes, str]

    def apply(self, sock: zmq.Socket[bytes]) -> None:
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.own.secret)
        # As the node does: a ZAP domain, and no traffic at all without an authenticator.
        sock.setsockopt(zmq.ZAP_DOMAIN, b"wire-peer")
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)


class ZapHandler:
    """ZeroMQ RFC 27's handler for CURVE: admits the listed keys (status 200, User-Id = the
    key's name), denies any other (400). One per context; answered from `ListenerPeer.recv`."""

    ENDPOINT = "inproc://zeromq.zap.01"

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], names_by_key: Mapping[bytes, str],
                 ) -> None:
        self.names_by_key = dict(names_by_key)
        self.denied: list[bytes] = []
        self.sock = ctx.socket(zmq.REP)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(self.ENDPOINT)

    def answer(self) -> None:
        version, request_id, _domain, _address, _identity, mechanism, *credentials = (
            self.sock.recv_multipart())
        key = zmq.utils.z85.encode(credentials[0]) if mechanism == b"CURVE" else b""
        name = self.names_by_key.get(key)
        if name is None:
            self.denied.append(key)
        status, text, user = ((b"200", b"OK", name.encode()) if name is not None
                              else (b"400", b"unknown key", b""))
        self.sock.send_multipart([version, request_id, status, text, user, b""])

    def close(self) -> None:
        self.sock.close(linger=0)


@dataclasses.dataclass(frozen=True)
class HandshakeResult:
    """How a connection's ZMTP handshake ended: `event` is "succeeded", "auth" (the ZAP
    status in `value`), "protocol" (libzmq's protocol error) or "no detail" (an errno)."""

    event: str
    value: int


_RESULTS: dict[int, str] = {
    zmq.EVENT_HANDSHAKE_SUCCEEDED: "succeeded", zmq.EVENT_HANDSHAKE_FAILED_AUTH: "auth",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "protocol",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "no detail",
}


def _handshake_result(monitor: zmq.Socket[bytes], timeout_s: float) -> HandshakeResult:
    if not monitor.poll(int(timeout_s * 1000), zmq.POLLIN):
        raise TimeoutError(f"no handshake result within {timeout_s}s")
    event = zmq.utils.monitor.recv_monitor_message(monitor)
    return HandshakeResult(_RESULTS[event["event"]], int(event["value"]))


def _socket_defaults(sock: zmq.Socket[bytes]) -> None:
    # Section 2.2's options that matter to a peer: bounded linger and queues, no ZMTP
    # heartbeats. MAXMSGSIZE is left unset: this peer reads whatever the node sends.
    sock.setsockopt(zmq.LINGER, 200)
    sock.setsockopt(zmq.SNDTIMEO, 10_000)  # a send never waits for ever (zmq.Again after it)
    sock.setsockopt(zmq.SNDHWM, 256)
    sock.setsockopt(zmq.RCVHWM, 256)


class Dialer:
    """Section 2.1's dialer side: a DEALER per connection, its routing id left to ZeroMQ (the
    node's ROUTER has no ROUTER_HANDOVER: a second connection under a routing id in use would
    never be heard)."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], name: str, endpoint: str,
                 node_id: str | None = None, routing_id: bytes | None = None, *,
                 curve: CurveClient | None = None, mechanism: str | None = None,
                 reconnect: bool = True) -> None:
        """`curve`: secure mode (2.3); `mechanism`: "null" (keyless, as without `curve`) or
        "plain" (a PLAIN client, which no node speaks), its handshake watched as a secure one
        is (`handshake_result`); `reconnect=False`: one connection attempt only, so that one
        refusal is one."""
        self.name = name
        self.node_id = node_id or new_node_id()
        self.hlc = Hlc()
        self.sock = ctx.socket(zmq.DEALER)
        _socket_defaults(self.sock)
        if routing_id is not None:
            self.sock.setsockopt(zmq.ROUTING_ID, routing_id)
        if curve is not None:
            curve.apply(self.sock)
        elif mechanism == "plain":
            self.sock.setsockopt(zmq.PLAIN_USERNAME, name.encode())
            self.sock.setsockopt(zmq.PLAIN_PASSWORD, b"no password opens a meshpost node")
        if not reconnect:
            self.sock.setsockopt(zmq.RECONNECT_IVL, -1)
        #: The connection's handshake events (2.3: why a secure handshake failed is told only
        #: there; a refused connection gets no frame).
        self.monitor = (self.sock.get_monitor_socket(HANDSHAKE_EVENTS)
                        if curve is not None or mechanism is not None else None)
        self.sock.connect(endpoint)
        self.resume = b""

    def handshake_result(self, timeout_s: float) -> HandshakeResult:
        """How this connection's ZMTP handshake ended (the first result), or fail after
        `timeout_s`."""
        assert self.monitor is not None, "made without curve or mechanism"
        return _handshake_result(self.monitor, timeout_s)

    def send_raw(self, data: bytes) -> None:
        self.sock.send(data)

    def send(self, tag: str, *fields: Any) -> None:
        self.send_raw(encode(tag, *fields))

    def hello(self, *, version: int = PROTOCOL_VERSION, name: str | None = None) -> None:
        """Section 4.1, carrying the last Welcome's token (empty before the first)."""
        self.send("hello", version, self.node_id, self.name if name is None else name,
                  wall_ns(), self.hlc.now(), self.resume)

    def recv(self, timeout_s: float) -> Frame:
        """The next frame from the node (a DEALER gets one part), or fail after `timeout_s`."""
        if not self.sock.poll(int(timeout_s * 1000), zmq.POLLIN):
            raise TimeoutError(f"{self.name}: no frame from the node within {timeout_s}s")
        parts = self.sock.recv_multipart()
        if len(parts) != 1:
            raise WireError(f"a listener's answer is one part, got {len(parts)}")
        frame = decode(parts[0])
        if frame.tag not in LISTENER_TAGS:
            raise WireError(f"a listener sent a dialer-direction frame {frame.tag!r}")
        return frame

    def handshake(self, timeout_s: float) -> Frame:
        """Hello until Welcome (6.2 step 1: Hello again until an answer)."""
        deadline = time.monotonic() + timeout_s
        while True:
            self.hello()
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.name}: no Welcome within {timeout_s}s")
            try:
                frame = self.recv(min(1.0, left))
            except TimeoutError:
                continue
            if frame.tag != "welcome":
                raise WireError(f"{self.name}: Hello answered with {frame}")
            self.resume = frame["resume"]
            return frame

    def batch(self, envelopes: Sequence[Envelope], tx_at_ns: int | None = None) -> int:
        """Section 4.4; returns the frame's `tx_at_ns`."""
        tx = wall_ns() if tx_at_ns is None else tx_at_ns
        self.send("batch", tx, [e.wire() for e in envelopes])
        return tx

    def envelopes(self, recipient: str, bodies: Sequence[str], first_seq: int = 1,
                  ) -> list[Envelope]:
        """Messages as a sender makes them (7.1, 5.3, 5.4, 9.2): fresh ids, consecutive
        seqs, the sender's wall time and one HLC tick each."""
        ids = message_ids(len(bodies))
        return [Envelope(ids[i], first_seq + i, self.name, recipient, body, wall_ns(),
                         self.hlc.now()) for i, body in enumerate(bodies)]

    def close(self) -> None:
        if self.monitor is not None:
            with contextlib.suppress(zmq.ZMQError):
                self.sock.disable_monitor()
            self.monitor.close(linger=0)
        self.sock.close(linger=0)


class ListenerPeer:
    """Section 2.1's listener side: one ROUTER bound where the node dials us."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], name: str, endpoint: str,
                 node_id: str | None = None, sync: str = "full", *,
                 curve: CurveServer | None = None) -> None:
        """`curve`: secure mode (2.3), a CURVE server that admits the keys it lists."""
        self.name = name
        self.node_id = node_id or new_node_id()
        self.sync = sync
        self.hlc = Hlc()
        self.zap: ZapHandler | None = None
        self.sock = ctx.socket(zmq.ROUTER)
        _socket_defaults(self.sock)
        # 2.2: replies to a vanished connection fail loudly; no ROUTER_HANDOVER (2.1).
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        if curve is not None:
            self.zap = ZapHandler(ctx, curve.names_by_key)
            curve.apply(self.sock)
        self.sock.bind(endpoint)
        #: Section 6.2 step 3: sessions by connection (routing id), each with its token.
        self.sessions: dict[bytes, bytes] = {}
        #: Secure mode: the name each connection's key proves (its `User-Id`, 2.3).
        self.user_ids: dict[bytes, str] = {}

    def recv(self, timeout_s: float) -> tuple[bytes, Frame, int]:
        """(routing id, frame, wall time read) or fail after `timeout_s`. In secure mode the
        ZAP requests that come meanwhile are answered, and the frame's `User-Id` is kept in
        `user_ids`."""
        deadline = time.monotonic() + timeout_s
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        if self.zap is not None:
            poller.register(self.zap.sock, zmq.POLLIN)
        while True:
            left_ms = int((deadline - time.monotonic()) * 1000)
            ready = dict(poller.poll(max(0, left_ms)))
            if self.zap is not None and self.zap.sock in ready:
                self.zap.answer()
            if self.sock in ready:
                break
            if left_ms <= 0:
                raise TimeoutError(f"{self.name}: no frame from the node within {timeout_s}s")
        rid = self.sock.recv()
        if not self.sock.getsockopt(zmq.RCVMORE):
            raise WireError("a ROUTER sees [routing id, payload], got 1 part")
        payload = self.sock.recv(copy=False)
        read_at = wall_ns()
        if payload.more:
            raise WireError("a ROUTER sees [routing id, payload], got more parts")
        if self.zap is not None:
            self.user_ids[rid] = str(payload.get("User-Id"))
        frame = decode(payload.bytes)
        if frame.tag not in DIALER_TAGS:
            raise WireError(f"a dialer sent a listener-direction frame {frame.tag!r}")
        return rid, frame, read_at

    def send(self, rid: bytes, tag: str, *fields: Any) -> None:
        self.sock.send_multipart([rid, encode(tag, *fields)])

    def welcome(self, rid: bytes) -> bytes:
        """Section 4.2: a fresh 8-byte token per session, the same one for a repeated Hello."""
        token = self.sessions.setdefault(rid, secrets.token_bytes(8))
        self.send(rid, "welcome", PROTOCOL_VERSION, self.node_id, self.name, wall_ns(),
                  self.hlc.pack(self.hlc.l, self.hlc.c), self.sync, token)
        return token

    def pong(self, rid: bytes, ping: Frame, read_at: int, pending: int = 0) -> None:
        """Section 4.8: received and replied from one reading, as this implementation does."""
        self.send(rid, "pong", ping["sent_at_ns"], read_at, read_at, pending)

    def receipt(self, rid: bytes, batch: Frame, read_at: int, seqs: Sequence[int],
                stored_at_ns: int) -> dict[str, Any]:
        """Section 4.5 for seqs 'committed' at `stored_at_ns`; returns what it said."""
        sent = {
            "ranges": to_ranges(seqs), "echo_tx_at_ns": batch["tx_at_ns"],
            "received_at_ns": read_at, "stored_at_ns": stored_at_ns,
            "replied_at_ns": wall_ns(), "hlc": self.hlc.now(), "sync": self.sync,
        }
        self.send(rid, "receipt", *(sent[name] for name in FIELDS["receipt"]))
        return sent

    def close(self) -> None:
        self.sock.close(linger=0)
        if self.zap is not None:
            self.zap.close()

"""Wire frames: one frozen msgspec struct per operation, encoded as tagged msgpack arrays.

Rule: this package is sans-IO. It imports no asyncio, zmq, sqlite3, socket or time; every
timestamp it needs is passed in by the caller.
"""

from __future__ import annotations

import msgspec

#: Bumped on any incompatible change to a frame's layout or meaning.
PROTOCOL_VERSION = 1


class Hello(msgspec.Struct, tag="hello", array_like=True, frozen=True):
    """Dialer -> listener, first on every connection: who I am and what I speak."""

    version: int
    node_id: str
    name: str
    sent_at_ns: int
    hlc: int


class Welcome(msgspec.Struct, tag="welcome", array_like=True, frozen=True):
    """Listener -> dialer: handshake accepted."""

    version: int
    node_id: str
    name: str
    sent_at_ns: int
    hlc: int
    sync: str


class Refuse(msgspec.Struct, tag="refuse", array_like=True, frozen=True):
    """Listener -> dialer: the connection-level request was refused (see `RefuseCode`)."""

    code: str
    detail: str


class Envelope(msgspec.Struct, array_like=True, frozen=True):
    """One user message. `id` is unique across the mesh; `seq` numbers it on its link."""

    id: str
    seq: int
    sender: str
    recipient: str
    body: str
    sent_at_ns: int
    hlc: int


class Batch(msgspec.Struct, tag="batch", array_like=True, frozen=True):
    """Dialer -> listener: one or more messages; `tx_at_ns` is the sender clock at transmit."""

    tx_at_ns: int
    messages: list[Envelope]


class Receipt(msgspec.Struct, tag="receipt", array_like=True, frozen=True):
    """Listener -> dialer: every seq in `ranges` (inclusive pairs) is committed to my store.

    `echo_tx_at_ns` repeats the acknowledged batch's `tx_at_ns`; with `received_at_ns` and
    `replied_at_ns` (listener clock) and the dialer's arrival time it gives NTP's four
    timestamps. `stored_at_ns` is the listener clock when the rows were committed.
    """

    ranges: list[tuple[int, int]]
    echo_tx_at_ns: int
    received_at_ns: int
    stored_at_ns: int
    replied_at_ns: int
    hlc: int
    sync: str


class Reject(msgspec.Struct, tag="reject", array_like=True, frozen=True):
    """Listener -> dialer: these seqs will never be stored (see `RejectCode`); stop resending."""

    seqs: list[int]
    code: str
    detail: str


class Ping(msgspec.Struct, tag="ping", array_like=True, frozen=True):
    """Dialer -> listener: liveness and a clock sample."""

    sent_at_ns: int


class Pong(msgspec.Struct, tag="pong", array_like=True, frozen=True):
    """Listener -> dialer: answers a Ping with the listener's receive and reply times."""

    echo_sent_at_ns: int
    received_at_ns: int
    replied_at_ns: int


class Bye(msgspec.Struct, tag="bye", array_like=True, frozen=True):
    """Dialer -> listener: this node is shutting down cleanly; count it as gone now rather
    than after `peer_timeout_s` of silence. No reply."""

    reason: str


Frame = Hello | Welcome | Refuse | Batch | Receipt | Reject | Ping | Pong | Bye

#: Frames a listener (ROUTER side) accepts, and frames a dialer (DEALER side) accepts.
DIALER_FRAMES = (Hello, Batch, Ping, Bye)
LISTENER_FRAMES = (Welcome, Refuse, Receipt, Reject, Pong)


class RefuseCode:
    VERSION = "version"
    UNKNOWN_PEER = "unknown-peer"
    IDENTITY = "identity"
    HELLO_REQUIRED = "hello-required"
    MALFORMED = "malformed"


class RejectCode:
    CONFLICT = "conflict"
    TOO_LARGE = "too-large"
    INVALID = "invalid"

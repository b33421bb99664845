"""Wire frames: one frozen msgspec struct per operation, encoded as tagged msgpack arrays.

Rule: this package is sans-IO. It imports no asyncio, zmq, sqlite3, socket or time; every
timestamp it needs is passed in by the caller.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from meshpost.protocol.header import PatternHeader, UncheckedHeader

# Re-exported: frames was their home before headers, and its importers still read them here.
from meshpost.protocol.limits import INT64_MAX as INT64_MAX
from meshpost.protocol.limits import INT64_MIN as INT64_MIN
from meshpost.protocol.limits import MAX_ID_LENGTH as MAX_ID_LENGTH

#: Bumped on any incompatible change to a frame's layout or meaning.
PROTOCOL_VERSION = 1

#: A batch frame carries at most this many messages, and (unless it holds a single message)
#: bodies of at most this many characters in all: big enough to amortise each frame's costs
#: on both sides (decoding, checks, a receipt), small enough that a lost frame costs little
#: to resend. 2,048 against 512: docs/benchmarks.md, "Constants and their figures".
MAX_BATCH_MESSAGES = 2048
MAX_BATCH_BODY_BYTES = 256 * 1024
#: Every integer on the wire: checked while decoding, so that no value a peer sends can reach
#: the store (or a clock) outside what SQLite and the HLC hold. A frame with one out of range
#: is malformed as a whole (an envelope's own fields are the exception: see `Envelope`).
Int64 = Annotated[int, msgspec.Meta(ge=INT64_MIN, le=INT64_MAX)]
#: A message's number on its link (from 1).
Seq = Annotated[int, msgspec.Meta(ge=1, le=INT64_MAX)]
#: A receiver's durability level, as it reports it in Welcome and in receipts: "full" or
#: "normal" (a str to type checkers, so that configuration values pass as they are).
Sync = Annotated[str, msgspec.Meta(pattern=r"^(?:full|normal)\Z")]
#: Bytes a listener puts in a resume token (64 random bits), and the most a Hello may carry.
RESUME_TOKEN_BYTES = 8
#: A session's resume token: given in its Welcome, proof in a later Hello that the dialer is
#: the one that session welcomed (docs/protocol.md 10). Empty: no token.
ResumeToken = Annotated[bytes, msgspec.Meta(max_length=32)]
#: The most an envelope adds to its body's bytes: the array header, an id of MAX_ID_LENGTH
#: four-byte characters, two names of 63 ASCII characters, three 9-byte integers and the
#: string headers come to 422; a pattern header adds at most HEADER_MAX_BYTES (430), so
#: 1,024 (was 512 before headers: docs/protocol.md).
ENVELOPE_OVERHEAD_BYTES = 1024
#: The batch's own header (tag, tx time, array headers), and then some.
FRAME_OVERHEAD_BYTES = 4096


def max_frame_bytes(max_message_bytes: int) -> int:
    """The largest frame a node accepts (and a dialer builds) when messages may carry up to
    `max_message_bytes` bytes of body: a batch of several messages holds at most
    MAX_BATCH_BODY_BYTES characters (4 bytes each in UTF-8 at worst), a lone message its own
    size, and every envelope its overhead."""
    bodies = max(max_message_bytes, 4 * MAX_BATCH_BODY_BYTES)
    return bodies + MAX_BATCH_MESSAGES * ENVELOPE_OVERHEAD_BYTES + FRAME_OVERHEAD_BYTES


def oversize(body: str, max_bytes: int) -> int | None:
    """The body's UTF-8 size if it exceeds `max_bytes`, else None: the one size rule, applied
    by the listener to a peer's messages and by `meshpost.rules` to local sends."""
    # Character count bounds the UTF-8 size from below and 4x from above: encode only when
    # the cheap check cannot decide.
    if len(body) * 4 > max_bytes:
        size = len(body.encode("utf-8", "surrogatepass"))
        if size > max_bytes:
            return size
    return None


class Hello(msgspec.Struct, tag="hello", array_like=True, frozen=True):
    """Dialer -> listener, first on every connection: who I am and what I speak."""

    version: Int64
    node_id: str
    name: str
    sent_at_ns: Int64
    hlc: Int64
    #: The token of the last Welcome this dialer got on the link (empty: none yet). Only a
    #: Hello carrying a session's token continues it: a name and a node id prove nothing.
    #: Trailing with a default: an older dialer's 6-element Hello decodes as "no token".
    resume: ResumeToken = b""


class Welcome(msgspec.Struct, tag="welcome", array_like=True, frozen=True):
    """Listener -> dialer: handshake accepted."""

    version: Int64
    node_id: str
    name: str
    sent_at_ns: Int64
    hlc: Int64
    sync: Sync
    #: A fresh random token for this session, sent only on its connection: the dialer's next
    #: Hello carries it to continue the session (an older dialer ignores the element).
    resume: ResumeToken = b""


class Refuse(msgspec.Struct, tag="refuse", array_like=True, frozen=True):
    """Listener -> dialer: the connection-level request was refused (see `RefuseCode`)."""

    code: str
    detail: str


class Envelope(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """One user message. `id` is unique across the mesh; `seq` numbers it on its link.

    Decoding checks what every stored message needs, in C as it decodes: an id of 1 to
    MAX_ID_LENGTH characters, a seq from 1, a body that is not empty, 64-bit stamps (building
    one checks nothing). A batch with a message that fails decodes as an `UncheckedBatch`
    instead, so that the others can still be stored and only the failing ones rejected.

    `gc=False`: its fields are strings, integers and a header of scalars, so it can never
    be part of a reference cycle; untracked, the 2,048 made or decoded per batch frame do
    not set off the garbage collector's young-generation passes (one per 700 allocations).
    """

    id: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID_LENGTH)]
    seq: Seq
    sender: str
    recipient: str
    body: Annotated[str, msgspec.Meta(min_length=1)]
    sent_at_ns: Int64
    hlc: Int64
    #: What the message is for (task, reply, ...); None for a direct message. Trailing with
    #: a default, so a 7-element envelope from an older node decodes with None, and an older
    #: node reads an 8-element one as the plain message it also is.
    header: PatternHeader | None = None


class Batch(msgspec.Struct, tag="batch", array_like=True, frozen=True):
    """Dialer -> listener: one or more messages; `tx_at_ns` is the sender clock at transmit."""

    tx_at_ns: Int64
    messages: list[Envelope]


class _UncheckedEnvelope(msgspec.Struct, array_like=True, frozen=True):
    """An `Envelope`'s layout and types without its checks."""

    id: str
    seq: int
    sender: str
    recipient: str
    body: str
    sent_at_ns: int
    hlc: int
    header: UncheckedHeader | None = None


class UncheckedBatch(msgspec.Struct, tag="batch", array_like=True, frozen=True):
    """A batch whose layout and types are right but some message of which fails the
    `Envelope` checks: the listener checks each message and rejects the failing ones."""

    tx_at_ns: Int64
    messages: list[_UncheckedEnvelope]

    def batch(self) -> Batch:
        """The same messages as `Envelope`s (which building does not check). A header that
        passes its decode-time checks becomes a `PatternHeader`; one that fails stays an
        `UncheckedHeader`, which the listener rejects (that message alone)."""
        return Batch(self.tx_at_ns, [
            Envelope(m.id, m.seq, m.sender, m.recipient, m.body, m.sent_at_ns, m.hlc,
                     None if m.header is None
                     else m.header.checked())  # type: ignore[arg-type]  # rejected later
            for m in self.messages
        ])


class ReceiptFrame(msgspec.Struct, tag="receipt", array_like=True, frozen=True):
    """Listener -> dialer: every seq in `ranges` (inclusive pairs) is committed to my store.

    `echo_tx_at_ns` repeats the acknowledged batch's `tx_at_ns`; with `received_at_ns` and
    `replied_at_ns` (listener clock) and the dialer's arrival time it gives NTP's four
    timestamps. `stored_at_ns` is the listener clock when the rows were committed. (The
    API's `meshpost.Receipt` is what a sender's caller gets once this frame is recorded.)
    """

    ranges: list[tuple[Int64, Int64]]
    echo_tx_at_ns: Int64
    received_at_ns: Int64
    stored_at_ns: Int64
    replied_at_ns: Int64
    hlc: Int64
    sync: Sync


class Reject(msgspec.Struct, tag="reject", array_like=True, frozen=True):
    """Listener -> dialer: these seqs will never be stored (see `RejectCode`); stop resending."""

    seqs: list[Int64]
    code: str
    detail: str


class Ping(msgspec.Struct, tag="ping", array_like=True, frozen=True):
    """Dialer -> listener: liveness and a clock sample."""

    sent_at_ns: Int64


class Pong(msgspec.Struct, tag="pong", array_like=True, frozen=True):
    """Listener -> dialer: answers a Ping with the listener's receive and reply times, and
    how many batches of this connection it still has to store (-1: not said, an older peer;
    decoders that predate the field ignore it)."""

    echo_sent_at_ns: Int64
    received_at_ns: Int64
    replied_at_ns: Int64
    pending: Int64 = -1


class Bye(msgspec.Struct, tag="bye", array_like=True, frozen=True):
    """Dialer -> listener: this node is shutting down cleanly; count it as gone now rather
    than after `peer_timeout_s` of silence. No reply."""

    reason: str


class Close(msgspec.Struct, tag="close", array_like=True, frozen=True):
    """Dialer -> listener: this connection closes because the link is idle (nothing to send
    for `link_idle_s`); forget its session. Not a departure: the node stays up and dials
    again, with a new Hello, for its next message. No reply."""


Frame = Hello | Welcome | Refuse | Batch | ReceiptFrame | Reject | Ping | Pong | Bye | Close

#: Frames a listener (ROUTER side) accepts, and frames a dialer (DEALER side) accepts.
DIALER_FRAMES = (Hello, Batch, Ping, Bye, Close)
LISTENER_FRAMES = (Welcome, Refuse, ReceiptFrame, Reject, Pong)


class RefuseCode:
    VERSION = "version"
    UNKNOWN_PEER = "unknown-peer"
    IDENTITY = "identity"
    HELLO_REQUIRED = "hello-required"
    MALFORMED = "malformed"
    #: The listener is one end of an exclusive pair (`--exclusive PEER`) with another peer.
    EXCLUSIVE = "exclusive"


class RejectCode:
    CONFLICT = "conflict"
    TOO_LARGE = "too-large"
    INVALID = "invalid"
    #: The receiver's store refused the message on its own (docs/protocol.md 7.4).
    UNSTORABLE = "unstorable"

"""The listener's side of every inbound link: handshakes, validation of incoming messages,
receipts after storage, pings.

Rule: pure state, the same shape as `DialerLink`: `receive()` takes raw bytes from a connection
identity and the current wall time, decodes them and queues the answers (`frames_to_send()`)
and events (`events()`). The node stores what arrived and then calls `stored()`, which queues
the receipt: a receipt never precedes the commit. Each connection's state moves only along
`TRANSITIONS`.
"""

from __future__ import annotations

import enum
import operator
from collections.abc import Collection, Iterable
from typing import NamedTuple

from meshpost.errors import IdentityMismatch, MalformedFrame, ProtocolError, UnsupportedVersion
from meshpost.protocol.codec import decode
from meshpost.protocol.events import Event, MessagesArrived, PeerLeft, ViolationDetected
from meshpost.protocol.frames import (
    INT64_MAX,
    INT64_MIN,
    MAX_ID_LENGTH,
    PROTOCOL_VERSION,
    Batch,
    Bye,
    Envelope,
    Frame,
    Hello,
    Ping,
    Pong,
    ReceiptFrame,
    Refuse,
    RefuseCode,
    Reject,
    RejectCode,
    UncheckedBatch,
    Welcome,
    max_frame_bytes,
)

_SENDER, _RECIPIENT, _BODY = (
    operator.attrgetter(f) for f in ("sender", "recipient", "body")
)


def to_ranges(seqs: Iterable[int]) -> list[tuple[int, int]]:
    """Collapse seqs into sorted inclusive ranges: [1, 2, 3, 7] -> [(1, 3), (7, 7)]."""
    if isinstance(seqs, list) and seqs:
        # The usual case, a whole batch in order: one comparison in C instead of a loop.
        lo, hi = seqs[0], seqs[-1]
        if hi - lo + 1 == len(seqs) and seqs == list(range(lo, hi + 1)):
            return [(lo, hi)]
    ranges: list[tuple[int, int]] = []
    for s in sorted(set(seqs)):
        if ranges and s == ranges[-1][1] + 1:
            ranges[-1] = (ranges[-1][0], s)
        else:
            ranges.append((s, s))
    return ranges


class SessionState(enum.Enum):
    NEW = "new"  # nothing accepted on this connection yet: only a Hello is taken
    OPEN = "open"  # welcomed: batches and pings are taken
    LEFT = "left"  # said Bye: only a Hello is taken, as after a restart


class SessionInput(enum.Enum):
    """What a connection can send a listener (`Hello` split by whether it passes the checks)."""

    HELLO = "Hello (a known peer, under its own name)"
    BAD_HELLO = "Hello (unknown name, not the connection's, or a name clash)"
    BATCH = "Batch"
    PING = "Ping"
    BYE = "Bye"


class Answer(enum.Enum):
    """What the listener does with an input (the `value` is how docs/protocol.md says it)."""

    WELCOME = "Welcome"
    REFUSE_HELLO = "Refuse(identity or unknown-peer); reported"
    HELLO_REQUIRED = "Refuse(hello-required)"
    ARRIVED = "MessagesArrived reported; ReceiptFrame/Reject once stored (`stored()`)"
    PONG = "Pong"
    LEFT = "nothing; PeerLeft reported"
    NOTHING = "nothing"


class Step(NamedTuple):
    """What an input does in a state: the next state and the answer."""

    next: SessionState
    answer: Answer


_S, _I, _A = SessionState, SessionInput, Answer
#: (state, input) -> (next state, answer). Every pair is here: a listener takes any frame a
#: dialer sends in any state; bytes that do not decode and frames meant for a dialer are
#: answered Refuse(malformed) (or Refuse(version)) in any state and change nothing.
TRANSITIONS: dict[tuple[SessionState, SessionInput], Step] = {
    (_S.NEW, _I.HELLO): Step(_S.OPEN, _A.WELCOME),
    (_S.NEW, _I.BAD_HELLO): Step(_S.NEW, _A.REFUSE_HELLO),
    (_S.NEW, _I.BATCH): Step(_S.NEW, _A.HELLO_REQUIRED),
    (_S.NEW, _I.PING): Step(_S.NEW, _A.HELLO_REQUIRED),
    (_S.NEW, _I.BYE): Step(_S.NEW, _A.NOTHING),
    (_S.OPEN, _I.HELLO): Step(_S.OPEN, _A.WELCOME),
    (_S.OPEN, _I.BAD_HELLO): Step(_S.OPEN, _A.REFUSE_HELLO),
    (_S.OPEN, _I.BATCH): Step(_S.OPEN, _A.ARRIVED),
    (_S.OPEN, _I.PING): Step(_S.OPEN, _A.PONG),
    (_S.OPEN, _I.BYE): Step(_S.LEFT, _A.LEFT),
    (_S.LEFT, _I.HELLO): Step(_S.OPEN, _A.WELCOME),
    (_S.LEFT, _I.BAD_HELLO): Step(_S.LEFT, _A.REFUSE_HELLO),
    (_S.LEFT, _I.BATCH): Step(_S.LEFT, _A.HELLO_REQUIRED),
    (_S.LEFT, _I.PING): Step(_S.LEFT, _A.HELLO_REQUIRED),
    (_S.LEFT, _I.BYE): Step(_S.LEFT, _A.NOTHING),
}
del _S, _I, _A


class Listener:
    """Protocol state for everything peers send to this node.

    A connection's state is kept once it has been welcomed (and so only for the names of
    known peers: a hostile stream of connections leaves nothing behind); sessions do not
    expire, since a dialer that stops is found by its own silence, and its next Hello opens
    the session again anyway.
    """

    def __init__(
        self,
        *,
        local_name: str,
        local_node_id: str,
        known_peers: Collection[str],
        max_message_bytes: int,
        sync: str,
    ) -> None:
        self.local_name = local_name
        self.local_node_id = local_node_id
        self.known_peers = frozenset(known_peers)
        #: Peers whose node id is known (discovery): a Hello with their name and another id
        #: is a second node claiming the name, refused so it never takes the first's messages.
        self.expected_node_ids: dict[str, str] = {}
        self.max_message_bytes = max_message_bytes
        self.sync = sync
        #: Largest frame accepted: the largest batch a dialer builds (`max_frame_bytes`).
        self.max_frame_bytes = max_frame_bytes(max_message_bytes)
        #: Connection identity -> (its state, the peer it was welcomed as).
        self._sessions: dict[str, tuple[SessionState, str]] = {}
        self._frames: list[tuple[str, Frame]] = []
        self._events: list[Event] = []

    # -- outputs --------------------------------------------------------------------------

    def frames_to_send(self) -> list[tuple[str, Frame]]:
        """The answers queued since the last call, as (connection identity, frame), in order.
        Drained after each `receive` or `stored`, they are all for that call's connection."""
        frames, self._frames = self._frames, []
        return frames

    def events(self) -> list[Event]:
        events, self._events = self._events, []
        return events

    def session_state(self, identity: str) -> SessionState:
        """Where connection `identity` stands (`NEW` if it never was welcomed)."""
        session = self._sessions.get(identity)
        return session[0] if session else SessionState.NEW

    # -- inputs ---------------------------------------------------------------------------

    def receive(self, identity: str, data: bytes, wall_ns: int, hlc: int) -> None:
        """Handle one frame's bytes from connection `identity`; answers go to `frames_to_send`."""
        try:
            frame = decode(data, max_bytes=self.max_frame_bytes)
        except UnsupportedVersion as exc:
            self._violation(identity, exc)
            self._reply(identity, Refuse(RefuseCode.VERSION, str(exc)))
            return
        except ProtocolError as exc:
            self._violation(identity, exc)
            self._reply(identity, Refuse(RefuseCode.MALFORMED, str(exc)))
            return
        checked = True
        if isinstance(frame, UncheckedBatch):
            frame, checked = frame.batch(), False
        refusal: tuple[str, ProtocolError] | None = None
        match frame:
            case Hello():
                refusal = self._check_hello(identity, frame)
                kind = SessionInput.HELLO if refusal is None else SessionInput.BAD_HELLO
            case Batch():
                kind = SessionInput.BATCH
            case Ping():
                kind = SessionInput.PING
            case Bye():
                kind = SessionInput.BYE
            case _:
                self._violation(identity, MalformedFrame(f"{type(frame).__name__} is not for me"))
                self._reply(identity, Refuse(RefuseCode.MALFORMED,
                                             "frame type not accepted by a listener"))
                return
        state, peer = self._sessions.get(identity, (SessionState.NEW, identity))
        step = TRANSITIONS[state, kind]
        if isinstance(frame, Hello) and step.next is SessionState.OPEN:
            peer = frame.name
        if step.next is not state:  # only welcomed names get here: the dict stays bounded
            self._sessions[identity] = (step.next, peer)
        match step.answer:
            case Answer.WELCOME:
                self._reply(identity, Welcome(
                    version=PROTOCOL_VERSION, node_id=self.local_node_id,
                    name=self.local_name, sent_at_ns=wall_ns, hlc=hlc, sync=self.sync,
                ))
            case Answer.REFUSE_HELLO:
                assert refusal is not None
                code, error = refusal
                self._violation(identity, error)
                self._reply(identity, Refuse(code, str(error)))
            case Answer.HELLO_REQUIRED:
                self._reply(identity, Refuse(RefuseCode.HELLO_REQUIRED, "send Hello first"))
            case Answer.ARRIVED:
                assert isinstance(frame, Batch)
                self._on_batch(identity, peer, frame, wall_ns, checked=checked)
            case Answer.PONG:
                assert isinstance(frame, Ping)
                self._reply(identity, Pong(echo_sent_at_ns=frame.sent_at_ns,
                                           received_at_ns=wall_ns, replied_at_ns=wall_ns))
            case Answer.LEFT:
                assert isinstance(frame, Bye)
                self._events.append(PeerLeft(peer, frame.reason))
            case Answer.NOTHING:
                pass

    def stored(
        self,
        arrived: MessagesArrived,
        *,
        committed: list[int],
        conflicts: list[int],
        stored_at_ns: int,
        replied_at_ns: int,
        hlc: int,
    ) -> None:
        """Queue the frames answering `arrived` once `committed` seqs are durably stored."""
        to = arrived.peer
        if committed:
            self._reply(to,
                ReceiptFrame(
                    ranges=to_ranges(committed),
                    echo_tx_at_ns=arrived.echo_tx_at_ns,
                    received_at_ns=arrived.received_at_ns,
                    stored_at_ns=stored_at_ns,
                    replied_at_ns=replied_at_ns,
                    hlc=hlc,
                    sync=self.sync,
                ),
            )
        if conflicts:
            self._reply(to, Reject(
                sorted(conflicts),
                RejectCode.CONFLICT,
                "a different message with this id is already stored",
            ))

    # -- internals ------------------------------------------------------------------------

    def _violation(self, who: str, error: ProtocolError) -> None:
        self._events.append(ViolationDetected(who, error))

    def _reply(self, identity: str, frame: Frame) -> None:
        self._frames.append((identity, frame))

    def _check_hello(self, identity: str, hello: Hello) -> tuple[str, ProtocolError] | None:
        """Why this Hello is refused (the refuse code and the error), or None. (Its version
        was checked by `decode`.)"""
        if hello.name != identity:
            return RefuseCode.IDENTITY, IdentityMismatch(
                f"connection authenticated as {identity!r} claims to be {hello.name!r}"
            )
        if hello.name not in self.known_peers:
            return RefuseCode.UNKNOWN_PEER, IdentityMismatch(
                f"{hello.name!r} is not a peer of {self.local_name!r}"
            )
        expected = self.expected_node_ids.get(hello.name)
        if expected is not None and expected != hello.node_id:
            return RefuseCode.IDENTITY, IdentityMismatch(
                f"name clash: {hello.name!r} is node {expected}, not node {hello.node_id}"
            )
        return None

    def _on_batch(
        self, identity: str, peer: str, batch: Batch, wall_ns: int, *, checked: bool
    ) -> None:
        """`checked`: decoding has run the `Envelope` checks on every message."""
        if checked and self._all_valid(peer, batch.messages):
            if batch.messages:
                self._events.append(
                    MessagesArrived(peer, list(batch.messages), batch.tx_at_ns, wall_ns)
                )
            return
        good: list[Envelope] = []
        rejected: dict[str, list[int]] = {}
        details: dict[str, str] = {}
        for message in batch.messages:
            code, detail = self._check(peer, message)
            if code is None:
                good.append(message)
            else:
                rejected.setdefault(code, []).append(message.seq)
                details.setdefault(code, detail)
        for code, seqs in rejected.items():
            error = MalformedFrame(f"{len(seqs)} message(s): {details[code]}")
            self._violation(peer, error)
            self._reply(identity, Reject(seqs, code, details[code]))
        if good:
            self._events.append(MessagesArrived(peer, good, batch.tx_at_ns, wall_ns))

    def _all_valid(self, peer: str, messages: list[Envelope]) -> bool:
        """True only if `_check` passes every message of a batch that decoding has checked
        (ids, seqs, stamps, empty bodies: `Envelope`); what is left is decided by a few
        passes in C, so a good batch costs no per-message Python. False sends the batch
        through `_check`."""
        if not messages:
            return True
        return (
            set(map(_SENDER, messages)) == {peer}
            and set(map(_RECIPIENT, messages)) == {self.local_name}
            and max(map(len, map(_BODY, messages))) * 4 <= self.max_message_bytes
        )

    def _check(self, peer: str, message: Envelope) -> tuple[str | None, str]:
        if message.sender != peer:
            return RejectCode.INVALID, f"sender {message.sender!r} is not the connection's {peer!r}"
        if message.recipient != self.local_name:
            return RejectCode.INVALID, f"recipient {message.recipient!r} is not {self.local_name!r}"
        if message.seq < 1:
            return RejectCode.INVALID, "seq must be positive"
        if not (
            message.seq <= INT64_MAX
            and INT64_MIN <= message.sent_at_ns <= INT64_MAX
            and INT64_MIN <= message.hlc <= INT64_MAX
        ):
            return RejectCode.INVALID, "seq, sent_at_ns and hlc must be signed 64-bit integers"
        if not 0 < len(message.id) <= MAX_ID_LENGTH:
            return RejectCode.INVALID, f"message id must be 1-{MAX_ID_LENGTH} characters"
        if not message.body:
            return RejectCode.INVALID, "empty body"
        # Character count bounds the UTF-8 size from below and 4x from above: encode only when
        # the cheap check cannot decide.
        if len(message.body) * 4 > self.max_message_bytes:
            size = len(message.body.encode("utf-8", "surrogatepass"))
            if size > self.max_message_bytes:
                return RejectCode.TOO_LARGE, (
                    f"body of {size} bytes exceeds the {self.max_message_bytes}-byte limit"
                )
        return None, ""

    def __repr__(self) -> str:
        open_ = sorted(i for i, (state, _) in self._sessions.items() if state is SessionState.OPEN)
        return f"Listener({self.local_name}, sessions={open_})"

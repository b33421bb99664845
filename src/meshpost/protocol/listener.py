"""The listener's side of every inbound link: handshakes, validation of incoming messages,
receipts after storage, pings.

Rule: pure state. `receive()` takes raw bytes from a connection identity and the current wall
time; it returns the frames to send back and records events. A connection identity names one
connection (chosen by our transport, never by the peer); who is behind it is what its Hello
says, checked against the authenticated name when there is one. The node stores what arrived and
then calls `stored()`, which builds the receipt: a receipt never precedes the commit.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Collection, Iterable

from meshpost.errors import IdentityMismatch, MalformedFrame, ProtocolError, UnsupportedVersion
from meshpost.protocol.codec import decode
from meshpost.protocol.events import (
    Event,
    MessagesArrived,
    PeerDeparted,
    SessionClaimed,
    ViolationDetected,
)
from meshpost.protocol.frames import (
    DIALER_FRAMES,
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
    Receipt,
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


#: Sessions one name may hold at once (restarts leave dead ones behind until then); past it
#: the least recently active goes, so a borrower cannot evict a peer that is sending.
MAX_SESSIONS_PER_PEER = 4
#: Without a key, a Hello naming a peer whose session (another node id) was active this
#: recently is refused: a live peer's name cannot be borrowed by a stranger. Its own restart
#: (same node id) is welcomed, and a peer whose store was replaced waits at most this long.
LIVE_SESSION_NS = 30_000_000_000


@dataclasses.dataclass(slots=True)
class _Session:
    peer: str
    node_id: str
    #: `Listener._activity` when the session last sent a frame (least recent goes first).
    last_active: int = 0
    last_active_ns: int = 0


class Listener:
    """Protocol state for everything peers send to this node."""

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
        self._sessions: dict[str, _Session] = {}
        self._activity = 0
        self._events: list[Event] = []

    def events(self) -> list[Event]:
        events, self._events = self._events, []
        return events

    def session_peer(self, identity: str) -> str | None:
        session = self._sessions.get(identity)
        return session.peer if session else None

    def forget(self, identity: str) -> None:
        self._sessions.pop(identity, None)

    def receive(
        self, identity: str, data: bytes, wall_ns: int, hlc: int,
        authenticated: str | None = None,
    ) -> list[Frame]:
        """Handle one frame from connection `identity`; return the frames to send back.
        `authenticated`: the name the connection's key proves (secure mode), else None."""
        try:
            frame = decode(data, max_bytes=self.max_frame_bytes)
        except UnsupportedVersion as exc:
            self._violation(identity, exc)
            return [Refuse(RefuseCode.VERSION, str(exc))]
        except ProtocolError as exc:
            self._violation(identity, exc)
            return [Refuse(RefuseCode.MALFORMED, str(exc))]
        if isinstance(frame, UncheckedBatch):
            return self._on_batch(identity, frame.batch(), wall_ns, checked=False)
        if not isinstance(frame, DIALER_FRAMES):
            self._violation(identity, MalformedFrame(f"{type(frame).__name__} is not for me"))
            return [Refuse(RefuseCode.MALFORMED, "frame type not accepted by a listener")]
        match frame:
            case Hello():
                return self._on_hello(identity, frame, wall_ns, hlc, authenticated)
            case Batch():
                return self._on_batch(identity, frame, wall_ns)
            case Ping(sent_at_ns=t1):
                session = self._sessions.get(identity)
                if session is None:
                    return [Refuse(RefuseCode.HELLO_REQUIRED, "send Hello first")]
                self._activity += 1
                session.last_active, session.last_active_ns = self._activity, wall_ns
                return [Pong(echo_sent_at_ns=t1, received_at_ns=wall_ns, replied_at_ns=wall_ns)]
            case Bye(reason=reason):
                # The session ends here; after a restart the peer says Hello again anyway.
                session = self._sessions.pop(identity, None)
                if session is not None:
                    self._events.append(PeerDeparted(session.peer, reason))
                return []
            case _:  # pragma: no cover - DIALER_FRAMES filters the rest
                return []

    def stored(
        self,
        arrived: MessagesArrived,
        *,
        committed: list[int],
        conflicts: list[int],
        stored_at_ns: int,
        replied_at_ns: int,
        hlc: int,
    ) -> list[Frame]:
        """Frames answering `arrived` once `committed` seqs are durably stored."""
        frames: list[Frame] = []
        if committed:
            frames.append(
                Receipt(
                    ranges=to_ranges(committed),
                    echo_tx_at_ns=arrived.echo_tx_at_ns,
                    received_at_ns=arrived.received_at_ns,
                    stored_at_ns=stored_at_ns,
                    replied_at_ns=replied_at_ns,
                    hlc=hlc,
                    sync=self.sync,
                )
            )
        if conflicts:
            frames.append(
                Reject(
                    sorted(conflicts),
                    RejectCode.CONFLICT,
                    "a different message with this id is already stored",
                )
            )
        return frames

    # -- internals ------------------------------------------------------------------------

    def _violation(self, who: str, error: ProtocolError) -> None:
        self._events.append(ViolationDetected(who, error))

    def _on_hello(
        self, identity: str, hello: Hello, wall_ns: int, hlc: int, authenticated: str | None
    ) -> list[Frame]:
        error: ProtocolError
        if hello.version != PROTOCOL_VERSION:
            error = UnsupportedVersion(hello.version, PROTOCOL_VERSION)
            self._violation(identity, error)
            return [Refuse(RefuseCode.VERSION, str(error))]
        if authenticated is not None and hello.name != authenticated:
            error = IdentityMismatch(
                f"connection authenticated as {authenticated!r} claims to be {hello.name!r}"
            )
            self._violation(identity, error)
            return [Refuse(RefuseCode.IDENTITY, str(error))]
        if hello.name not in self.known_peers:
            error = IdentityMismatch(f"{hello.name!r} is not a peer of {self.local_name!r}")
            self._violation(identity, error)
            return [Refuse(RefuseCode.UNKNOWN_PEER, str(error))]
        expected = self.expected_node_ids.get(hello.name)
        if expected is not None and expected != hello.node_id:
            error = IdentityMismatch(
                f"name clash: {hello.name!r} is node {expected}, not node {hello.node_id}"
            )
            self._violation(identity, error)
            return [Refuse(RefuseCode.IDENTITY, str(error))]
        self._sessions.pop(identity, None)
        mine = [(s.last_active, i) for i, s in self._sessions.items() if s.peer == hello.name]
        if authenticated is None and any(
            s.node_id != hello.node_id and wall_ns - s.last_active_ns < LIVE_SESSION_NS
            for s in map(self._sessions.__getitem__, (i for _a, i in mine))
        ):
            self._events.append(SessionClaimed(hello.name, identity, len(mine), refused=True))
            return [Refuse(RefuseCode.IDENTITY,
                           f"{hello.name!r} is connected already, as another node")]
        others = mine
        if others:
            self._events.append(SessionClaimed(hello.name, identity, len(others) + 1))
            others.sort()
            for _last, stale in others[: max(0, len(others) + 1 - MAX_SESSIONS_PER_PEER)]:
                del self._sessions[stale]
        self._activity += 1
        self._sessions[identity] = _Session(hello.name, hello.node_id, self._activity, wall_ns)
        return [
            Welcome(
                version=PROTOCOL_VERSION,
                node_id=self.local_node_id,
                name=self.local_name,
                sent_at_ns=wall_ns,
                hlc=hlc,
                sync=self.sync,
            )
        ]

    def _on_batch(
        self, identity: str, batch: Batch, wall_ns: int, *, checked: bool = True
    ) -> list[Frame]:
        """`checked`: decoding has run the `Envelope` checks on every message."""
        session = self._sessions.get(identity)
        if session is None:
            return [Refuse(RefuseCode.HELLO_REQUIRED, "send Hello first")]
        self._activity += 1
        session.last_active, session.last_active_ns = self._activity, wall_ns
        if checked and self._all_valid(session.peer, batch.messages):
            if batch.messages:
                self._events.append(
                    MessagesArrived(session.peer, list(batch.messages), batch.tx_at_ns, wall_ns)
                )
            return []
        good: list[Envelope] = []
        rejected: dict[str, list[int]] = {}
        details: dict[str, str] = {}
        for message in batch.messages:
            code, detail = self._check(session.peer, message)
            if code is None:
                good.append(message)
            else:
                rejected.setdefault(code, []).append(message.seq)
                details.setdefault(code, detail)
        frames: list[Frame] = []
        for code, seqs in rejected.items():
            error = MalformedFrame(f"{len(seqs)} message(s): {details[code]}")
            self._violation(session.peer, error)
            frames.append(Reject(seqs, code, details[code]))
        if good:
            self._events.append(MessagesArrived(session.peer, good, batch.tx_at_ns, wall_ns))
        return frames

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
        return f"Listener({self.local_name}, sessions={sorted(self._sessions)})"

"""The listener's side of every inbound link: handshakes, validation of incoming messages,
receipts after storage, pings.

Rule: pure state, the same shape as `DialerLink`: `receive()` takes raw bytes from a connection
identity and the current wall time, decodes them and queues the answers (`frames_to_send()`)
and events (`events()`). A connection identity names one connection (chosen by our transport,
never by the peer); who is behind it is what its Hello says, checked against the authenticated
name when there is one. The node stores what arrived and then calls `stored()`, which queues
the receipt for the connection the batch came on: a receipt never precedes the commit. Each
connection's state moves only along `TRANSITIONS`.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import secrets
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import NamedTuple

from meshpost.errors import IdentityMismatch, MalformedFrame, ProtocolError, UnsupportedVersion
from meshpost.protocol.claims import ClaimBook
from meshpost.protocol.codec import decode
from meshpost.protocol.events import (
    ClaimSettled,
    ClaimUnchecked,
    Event,
    MessagesArrived,
    PeerLeft,
    SessionClaimed,
    ViolationDetected,
)
from meshpost.protocol.frames import (
    INT64_MAX,
    INT64_MIN,
    MAX_ID_LENGTH,
    PROTOCOL_VERSION,
    RESUME_TOKEN_BYTES,
    Batch,
    Bye,
    Close,
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
    oversize,
)
from meshpost.protocol.header import header_problem


def to_ranges(seqs: Iterable[int]) -> list[tuple[int, int]]:
    """Collapse seqs into sorted inclusive ranges: [1, 2, 3, 7] -> [(1, 3), (7, 7)]."""
    if isinstance(seqs, list) and seqs:
        # The usual case, a whole batch in order: one comparison in C instead of a loop
        # (and for one seq, a single send's, not even that).
        lo, hi = seqs[0], seqs[-1]
        if len(seqs) == 1 or (hi - lo + 1 == len(seqs) and seqs == list(range(lo, hi + 1))):
            return [(lo, hi)]
    ranges: list[tuple[int, int]] = []
    for s in sorted(set(seqs)):
        if ranges and s == ranges[-1][1] + 1:
            ranges[-1] = (ranges[-1][0], s)
        else:
            ranges.append((s, s))
    return ranges


#: Sessions one name may hold at once (restarts leave dead ones behind until then); past it
#: the least recently active goes, so a borrower cannot evict a peer that is sending. One that
#: goes with batches still being stored is kept aside until they are answered (`_draining`).
MAX_SESSIONS_PER_PEER = 4
#: Without a key, a Hello naming a peer whose session (another node id) was active this
#: recently is refused, when this node does not know who the peer is (its configured endpoint
#: never answered it): a live peer's name cannot be borrowed by a stranger. Its own restart
#: (same node id) is welcomed; a peer whose store was replaced is welcomed once its endpoint
#: answers a check as its new node id, else after the old one has been silent this long.
LIVE_SESSION_NS = 30_000_000_000
#: Answers (receipts, rejects) kept for the session that superseded the one they answer, until
#: that session next sends a frame. Beyond this the oldest go: the dialer resends what they
#: answered and is answered again from the store (a bound, not a loss).
MAX_FORWARDED_ANSWERS = 1024


def new_resume_token() -> bytes:
    """A session's resume token: RESUME_TOKEN_BYTES from the OS's secure random source, so
    that no peer can guess another connection's (a counter or a clock could be)."""
    return secrets.token_bytes(RESUME_TOKEN_BYTES)


class SessionState(enum.Enum):
    # Members are singletons compared by identity: hashed as objects, not by Enum's
    # `hash(self._name_)`, a Python call (the `TRANSITIONS` lookup made two per frame).
    __hash__ = object.__hash__

    NEW = "new"  # nothing accepted on this connection yet: only a Hello is taken
    OPEN = "open"  # welcomed: batches and pings are taken
    LEFT = "left"  # said Bye: only a Hello is taken, as after a restart


class SessionInput(enum.Enum):
    """What a connection can send a listener (`Hello` split by what its checks find)."""

    __hash__ = object.__hash__  # as `SessionState`'s

    HELLO = "Hello (a known peer; under --secure the key's name; no session on another connection)"
    CLAIM = "Hello (as HELLO, but the name has a session on another connection)"
    LIVE_CLAIM = ("Hello without a key naming a peer as another node id than the one its "
                  "configured endpoint answered as; or, not known so, than one active on "
                  "another connection within LIVE_SESSION_NS")
    BAD_HELLO = "Hello (unknown name, not the key's name, or a name clash)"
    BATCH = "Batch"
    PING = "Ping"
    BYE = "Bye"
    CLOSE = "Close (the dialer closes its idle link)"
    VOUCHED = ("the name's configured endpoint answered as the node id this connection's "
               "refused Hello said (`endpoint_answered`)")
    DISOWNED = ("the name's configured endpoint answered as another node id than this "
                "session's (`endpoint_answered`)")


class Answer(enum.Enum):
    """What the listener does with an input (the `value` is how docs/protocol.md says it)."""

    WELCOME = "Welcome"
    WELCOME_CLAIM = ("Welcome; SessionClaimed reported; past MAX_SESSIONS_PER_PEER the name's "
                     "least recently active session goes")
    REFUSE_CLAIM = ("Refuse(identity); SessionClaimed(refused) reported; ClaimCheckWanted "
                    "reported at most once per name per CLAIM_CHECK_INTERVAL_NS")
    WELCOME_LATE = "Welcome (to the refused Hello); ClaimSettled reported"
    END = ("nothing; the session ends (its next frame gets hello-required); ClaimSettled "
           "reported")
    REFUSE_HELLO = "Refuse(identity or unknown-peer); reported"
    HELLO_REQUIRED = "Refuse(hello-required)"
    ARRIVED = ("MessagesArrived reported; ReceiptFrame/Reject once stored (`stored()`), on this "
               "connection")
    PONG = "Pong"
    LEFT = "nothing; PeerLeft reported"
    FORGET = "nothing; the session is forgotten (the peer is not reported gone)"
    NOTHING = "nothing"


class Step(NamedTuple):
    """What an input does in a state: the next state and the answer."""

    next: SessionState
    answer: Answer


_S, _I, _A = SessionState, SessionInput, Answer
#: (state, input) -> (next state, answer). Every pair is here: a listener takes any frame a
#: dialer sends in any state; bytes that do not decode and frames meant for a dialer are
#: answered Refuse(malformed) (or Refuse(version)) in any state and change nothing. A refused
#: claim ends the connection's own session, if it had one, as any new Hello replaces it.
TRANSITIONS: dict[tuple[SessionState, SessionInput], Step] = {
    (_S.NEW, _I.HELLO): Step(_S.OPEN, _A.WELCOME),
    (_S.NEW, _I.CLAIM): Step(_S.OPEN, _A.WELCOME_CLAIM),
    (_S.NEW, _I.LIVE_CLAIM): Step(_S.NEW, _A.REFUSE_CLAIM),
    (_S.NEW, _I.BAD_HELLO): Step(_S.NEW, _A.REFUSE_HELLO),
    (_S.NEW, _I.BATCH): Step(_S.NEW, _A.HELLO_REQUIRED),
    (_S.NEW, _I.PING): Step(_S.NEW, _A.HELLO_REQUIRED),
    (_S.NEW, _I.BYE): Step(_S.NEW, _A.NOTHING),
    (_S.NEW, _I.CLOSE): Step(_S.NEW, _A.NOTHING),
    (_S.NEW, _I.VOUCHED): Step(_S.OPEN, _A.WELCOME_LATE),
    (_S.NEW, _I.DISOWNED): Step(_S.NEW, _A.NOTHING),
    (_S.OPEN, _I.HELLO): Step(_S.OPEN, _A.WELCOME),
    (_S.OPEN, _I.CLAIM): Step(_S.OPEN, _A.WELCOME_CLAIM),
    (_S.OPEN, _I.LIVE_CLAIM): Step(_S.NEW, _A.REFUSE_CLAIM),
    (_S.OPEN, _I.BAD_HELLO): Step(_S.OPEN, _A.REFUSE_HELLO),
    (_S.OPEN, _I.BATCH): Step(_S.OPEN, _A.ARRIVED),
    (_S.OPEN, _I.PING): Step(_S.OPEN, _A.PONG),
    (_S.OPEN, _I.BYE): Step(_S.LEFT, _A.LEFT),
    (_S.OPEN, _I.CLOSE): Step(_S.NEW, _A.FORGET),
    (_S.OPEN, _I.VOUCHED): Step(_S.OPEN, _A.NOTHING),
    (_S.OPEN, _I.DISOWNED): Step(_S.NEW, _A.END),
    (_S.LEFT, _I.HELLO): Step(_S.OPEN, _A.WELCOME),
    (_S.LEFT, _I.CLAIM): Step(_S.OPEN, _A.WELCOME_CLAIM),
    (_S.LEFT, _I.LIVE_CLAIM): Step(_S.NEW, _A.REFUSE_CLAIM),
    (_S.LEFT, _I.BAD_HELLO): Step(_S.LEFT, _A.REFUSE_HELLO),
    (_S.LEFT, _I.BATCH): Step(_S.LEFT, _A.HELLO_REQUIRED),
    (_S.LEFT, _I.PING): Step(_S.LEFT, _A.HELLO_REQUIRED),
    (_S.LEFT, _I.BYE): Step(_S.LEFT, _A.NOTHING),
    (_S.LEFT, _I.CLOSE): Step(_S.NEW, _A.FORGET),
    (_S.LEFT, _I.VOUCHED): Step(_S.LEFT, _A.NOTHING),
    (_S.LEFT, _I.DISOWNED): Step(_S.NEW, _A.END),
}
del _S, _I, _A
#: Read per frame as module globals: `SessionState.OPEN` is a lookup through
#: `EnumType.__getattr__` in Python 3.11 (a Python call).
_OPEN = SessionState.OPEN


@dataclasses.dataclass(slots=True)
class _Session:
    state: SessionState
    peer: str
    node_id: str
    #: `Listener._activity` when the session last sent a frame (least recent goes first).
    last_active: int = 0
    last_active_ns: int = 0
    #: Batches taken on this connection (`MessagesArrived`) and not yet answered (`stored`):
    #: a Pong says it, so the dialer knows a receipt is still to come.
    pending: int = 0
    #: The connection of the session that superseded this one: a later Hello of the same
    #: name and node id on another connection, carrying this session's resume token (the
    #: dialer redialled: this connection is likely closed, and answers sent on it lost).
    #: Answers to this session are forwarded there.
    successor: str | None = None
    #: The connections of the sessions this one superseded (its Pongs count their pending).
    predecessors: tuple[str, ...] = ()
    #: Answers to superseded sessions, sent on this connection with its next answer.
    forwarded: list[Frame] | None = None
    #: The resume token its Welcome gave (only on its connection): a later Hello supersedes
    #: this session only if it carries it (`Listener._supersede`).
    token: bytes = b""


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
        exclusive: str | None = None,
        new_token: Callable[[], bytes] = new_resume_token,
    ) -> None:
        """`new_token`: where each new session's resume token comes from (injected, as time
        is; by default the OS's secure random source)."""
        self.local_name = local_name
        self._new_token = new_token
        #: The one peer this node accepts (seed 000's PAIR); every other Hello is refused.
        self.exclusive = exclusive
        self.local_node_id = local_node_id
        self.known_peers = frozenset(known_peers)
        #: Peers whose node id is known (discovery): a Hello with their name and another id
        #: is a second node claiming the name, refused so it never takes the first's messages.
        self.expected_node_ids: dict[str, str] = {}
        self.max_message_bytes = max_message_bytes
        self.sync = sync
        #: Largest frame accepted: the largest batch a dialer builds (`max_frame_bytes`).
        self.max_frame_bytes = max_frame_bytes(max_message_bytes)
        #: Connection identity -> its session (only welcomed connections: `NEW` is absent).
        self._sessions: dict[str, _Session] = {}
        #: Sessions evicted past MAX_SESSIONS_PER_PEER while batches they took were still being
        #: stored (their connection is `NEW` again): kept until `stored()` answered the last,
        #: so their successor's Pongs count those batches and their answers are forwarded to
        #: it. Bounded by the batches being stored, each of which is in memory anyway.
        self._draining: dict[str, _Session] = {}
        #: Keyless names this node asked (or learnt) the configured endpoint of, by name:
        #: only known peers' (bounded by the configuration and discovery).
        self._claims = ClaimBook()
        self._activity = 0
        self._frames: list[tuple[str, Frame]] = []
        self._events: list[Event] = []

    # -- outputs --------------------------------------------------------------------------

    def frames_to_send(self) -> list[tuple[str, Frame]]:
        """The answers queued since the last call, as (connection identity, frame), in order.
        Drained after each `receive` or `stored`, they are all for that call's connection;
        after `endpoint_answered`, each is for its own (a claimant's late Welcome)."""
        frames, self._frames = self._frames, []
        return frames

    def events(self) -> list[Event]:
        events, self._events = self._events, []
        return events

    def output(self) -> tuple[list[tuple[str, Frame]], list[Event]]:
        """`frames_to_send()` and `events()` in one call: what the node takes after every
        `receive` (a call each cost more than the taking)."""
        frames, events = self._frames, self._events
        self._frames, self._events = [], []
        return frames, events

    def session_state(self, identity: str) -> SessionState:
        """Where connection `identity` stands (`NEW` if it never was welcomed)."""
        session = self._sessions.get(identity)
        return session.state if session else SessionState.NEW

    def session_peer(self, identity: str) -> str | None:
        """The peer connection `identity` was welcomed as, while its session is open."""
        session = self._sessions.get(identity)
        return session.peer if session and session.state is SessionState.OPEN else None

    # -- inputs ---------------------------------------------------------------------------

    def receive(
        self, identity: str, data: bytes, wall_ns: int, hlc: int,
        authenticated: str | None = None,
    ) -> None:
        """Handle one frame's bytes from connection `identity`; answers go to `frames_to_send`.
        `authenticated`: the name the connection's key proves (secure mode), else None."""
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
        if type(frame) is Batch:
            # The usual frame, a batch on an open session, ahead of the general path below:
            # `TRANSITIONS[OPEN, BATCH]` keeps the session OPEN and answers ARRIVED
            # (tests/unit/protocol/test_listener.py pins that), which is all this does. The
            # general path looks two enum members up (each through `EnumType.__getattr__`'s
            # slow path in Python 3.11) and the table, for the same.
            session = self._sessions.get(identity)
            if session is not None and session.state is _OPEN:
                self._on_batch(identity, session, frame, wall_ns, checked)
                return
        refusal: tuple[str, ProtocolError] | None = None
        others: list[tuple[int, str]] = []
        match frame:
            case Hello():
                kind, refusal, others = self._check_hello(identity, frame, wall_ns, authenticated)
            case Batch():
                kind = SessionInput.BATCH
            case Ping():
                kind = SessionInput.PING
            case Bye():
                kind = SessionInput.BYE
            case Close():
                kind = SessionInput.CLOSE
            case _:
                self._violation(identity, MalformedFrame(f"{type(frame).__name__} is not for me"))
                self._reply(identity, Refuse(RefuseCode.MALFORMED,
                                             "frame type not accepted by a listener"))
                return
        session = self._sessions.get(identity)
        state = session.state if session else SessionState.NEW
        step = TRANSITIONS[state, kind]
        if isinstance(frame, Hello) and step.answer in (Answer.WELCOME, Answer.WELCOME_CLAIM):
            # A new session (a welcomed Hello replaces the connection's own): bound to this
            # connection. A refused Hello leaves an open session as it was: were it rebound to
            # the refused name, the connection could send as a peer it was refused as.
            session = self._open_session(identity, frame.name, frame.node_id, wall_ns, session)
            if frame.resume:
                self._supersede(session, identity, others, frame.resume)
        elif step.next is not state:  # (a stored session is never NEW: no pop from NEW)
            if step.next is SessionState.NEW:
                self._sessions.pop(identity, None)  # only welcomed connections are kept
            elif session is not None:
                session.state = step.next
        # The usual frames first: each case looks its member up on the enum class, which
        # Python 3.11 does through `EnumType.__getattr__`'s slow path.
        match step.answer:
            case Answer.ARRIVED:
                assert isinstance(frame, Batch)
                assert session is not None
                self._on_batch(identity, session, frame, wall_ns, checked)
            case Answer.PONG:
                assert isinstance(frame, Ping)
                assert session is not None
                self._mark_active(identity, session, wall_ns)
                self._reply(identity, Pong(echo_sent_at_ns=frame.sent_at_ns,
                                           received_at_ns=wall_ns, replied_at_ns=wall_ns,
                                           pending=self._pending(session)))
            case Answer.WELCOME:
                assert session is not None
                self._welcome(identity, session, wall_ns, hlc)
            case Answer.WELCOME_CLAIM:
                assert isinstance(frame, Hello)
                self._events.append(SessionClaimed(frame.name, identity, len(others) + 1))
                self._evict_past_cap(others)
                assert session is not None
                self._welcome(identity, session, wall_ns, hlc)
            case Answer.REFUSE_CLAIM:
                assert isinstance(frame, Hello)
                self._events.append(SessionClaimed(frame.name, identity, len(others),
                                                   refused=True))
                # Kept, to welcome if the name's endpoint answers as this Hello's node id;
                # the endpoint asked unless it was, or answered, lately.
                asked, wanted = self._claims.refused(frame.name, identity, frame.node_id,
                                                     wall_ns)
                if wanted is not None:
                    self._events.append(wanted)
                self._reply(identity, Refuse(RefuseCode.IDENTITY,
                                             self._claim_refusal(frame, asked)))
            case Answer.REFUSE_HELLO:
                assert refusal is not None
                code, error = refusal
                if code != RefuseCode.EXCLUSIVE:
                    self._violation(identity, error)
                self._reply(identity, Refuse(code, str(error)))
            case Answer.HELLO_REQUIRED:
                self._reply(identity, Refuse(RefuseCode.HELLO_REQUIRED, "send Hello first"))
            case Answer.LEFT:
                assert isinstance(frame, Bye)
                assert session is not None
                self._events.append(PeerLeft(session.peer, frame.reason))
            case Answer.NOTHING | Answer.FORGET:
                pass  # a forgotten session was dropped above (its next state is NEW)

    def endpoint_answered(self, peer: str, node_id: str, wall_ns: int, hlc: int) -> None:
        """This node's own link to `peer`'s configured endpoint was answered, at `wall_ns`,
        by node `node_id` (a Welcome; or a Pong on the session a Welcome opened as it): that
        is who `peer` is for a Hello without a key, whatever a claimant says. Sessions of
        `peer` under another node id end (`DISOWNED`: their connections must say Hello again,
        and are refused while this answer stands), and the connections refused as claims
        within CLAIMANT_KEPT_NS that said Hello as `node_id` are welcomed (`VOUCHED`). Call it for
        every Welcome the node's own link takes, and with the answer to `ClaimCheckWanted`;
        send what `frames_to_send()` then holds to each frame's own connection (not under
        --secure, where keys decide)."""
        if peer not in self.known_peers:
            return
        asked, claimants = self._claims.answered(peer, node_id, wall_ns)
        # Which claimants the answer welcomes is decided first: one that said Hello again
        # since (welcomed as another node id, or as another name) is decided by that.
        vouched = []
        for connection in claimants:
            own = self._sessions.get(connection)
            state = own.state if own else SessionState.NEW
            if TRANSITIONS[state, SessionInput.VOUCHED].answer is Answer.WELCOME_LATE:
                vouched.append((connection, own))
        evicted = 0
        for connection, session in list(self._sessions.items()):
            if session.peer != peer or session.node_id == node_id:
                continue
            if TRANSITIONS[session.state, SessionInput.DISOWNED].answer is Answer.END:
                del self._sessions[connection]
                if session.pending > 0:  # its batches are still answered on its connection
                    self._draining[connection] = session
                evicted += 1
        for connection, own in vouched:
            others = [(s.last_active, c) for c, s in self._sessions.items()
                      if c != connection and s.peer == peer and s.state is SessionState.OPEN]
            self._evict_past_cap(others)
            self._welcome(connection, self._open_session(connection, peer, node_id, wall_ns, own),
                          wall_ns, hlc)
        welcomed = len(vouched)
        if asked or evicted or welcomed:
            self._events.append(ClaimSettled(peer, node_id, evicted, welcomed, asked))

    def endpoint_unanswered(self, peer: str) -> None:
        """`peer`'s configured endpoint did not answer the `ClaimCheckWanted` in time (or
        `peer` has none): what it answered before is no longer taken as who `peer` is (a
        restarted peer must not stay locked out by it), so the name is first come, first
        served (`LIVE_SESSION_NS`) until it answers again; the claimants stay refused."""
        refused = self._claims.unanswered(peer)
        if refused is not None:
            self._events.append(ClaimUnchecked(peer, refused))

    def stored(
        self,
        arrived: MessagesArrived,
        *,
        committed: list[int],
        conflicts: list[int],
        stored_at_ns: int,
        replied_at_ns: int,
        hlc: int,
        refused: Sequence[tuple[int, str]] = (),
    ) -> None:
        """Queue the frames answering `arrived` once `committed` seqs are durably stored;
        `refused` are (seq, why) of messages the store refused on their own (`unstorable`).
        They go to the connection the batch came on (`arrived.connection`), never to a name:
        a name may have several connections, and only this one sent these messages."""
        to = arrived.connection
        session = self._sessions.get(to)
        draining = session is None and to in self._draining
        if draining:
            session = self._draining[to]
        if session is not None and session.pending > 0:
            session.pending -= 1
        first = len(self._frames)
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
        if refused:  # one Reject per cause
            causes: dict[str, list[int]] = {}
            for seq, why in refused:
                causes.setdefault(why, []).append(seq)
            for why, seqs in causes.items():
                self._reply(to, Reject(sorted(seqs), RejectCode.UNSTORABLE, why))
        if session is not None and session.successor is not None:
            self._forward(session, [frame for _to, frame in self._frames[first:]])
        if draining and session is not None and session.pending == 0:
            del self._draining[to]  # its last batch answered

    # -- internals ------------------------------------------------------------------------

    def _open_session(self, identity: str, peer: str, node_id: str, wall_ns: int,
                      replaced: _Session | None) -> _Session:
        """A new open session of `peer` as `node_id` on connection `identity` (which had
        `replaced`, if any), its token drawn; not yet welcomed."""
        self._activity += 1
        session = _Session(SessionState.OPEN, peer, node_id, self._activity, wall_ns,
                           token=self._new_token())
        drained = self._draining.pop(identity, None)
        if replaced is None and drained is not None:
            replaced = drained  # evicted, batches still being stored: the same rule
        if (replaced is not None and replaced.peer == session.peer
                and replaced.node_id == session.node_id):
            # The same node again on this connection (a Hello it retried): what it sent
            # before is still being stored, and answers forwarded to it still wait.
            session.pending, session.forwarded = replaced.pending, replaced.forwarded
            session.predecessors = replaced.predecessors
            # Its token too: the connection is ours to name, so it is the same dialer,
            # and the Welcome with a new token might be lost (its next redial would then
            # carry the old one).
            session.token = replaced.token
        self._sessions[identity] = session
        return session

    def _evict_past_cap(self, others: list[tuple[int, str]]) -> None:
        """A name's new session joins `others` (its open sessions on other connections, as
        (last active, connection)): past MAX_SESSIONS_PER_PEER the least recently active go,
        those with batches still being stored kept aside (`_draining`)."""
        others.sort()
        for _last, stale in others[: max(0, len(others) + 1 - MAX_SESSIONS_PER_PEER)]:
            evicted = self._sessions.pop(stale)
            if evicted.pending > 0:
                self._draining[stale] = evicted

    def _supersede(self, session: _Session, identity: str,
                   others: list[tuple[int, str]], token: bytes) -> None:
        """`session` (just welcomed on `identity`) supersedes the session on another
        connection whose resume token its Hello carries (same name and node id), and the
        sessions that one superseded: the dialer redialled after a silence, and what it sent
        on the old connection may still be unread or unanswered here. Their pending batches
        count in this session's Pongs, and their answers from now on are forwarded to it
        (`_forward`), so the dialer learns what we stored instead of sending it all again.
        A name and a node id are claims anyone can copy, so without the token (sent only on
        the old session's connection) a Hello supersedes nothing: another connection's
        answers could settle this dialer's messages under the same seqs (docs/reliability.md,
        "A stranger's receipts forwarded to a redialled peer")."""
        evicted = [(0, c) for c, s in self._draining.items()
                   if c != identity and s.peer == session.peer]
        candidates: dict[str, _Session] = {}
        for _last, connection in [*others, *evicted]:
            other = self._sessions.get(connection) or self._draining[connection]
            if other.node_id == session.node_id:
                candidates[connection] = other
        matched = next((c for c, other in candidates.items()
                        if other.token and secrets.compare_digest(other.token, token)), None)
        if matched is None:
            return
        # The matched session's chain: those it superseded, and those that continued it
        # already (the same token: a redial whose Welcome this dialer never got).
        chain = [matched, *(c for c, other in candidates.items() if matched in other.predecessors)]
        superseded = list(dict.fromkeys(
            c for link in chain for c in (link, *candidates[link].predecessors)
            if c in candidates))
        forwarded: list[Frame] = []
        for connection in superseded:
            other = candidates[connection]
            other.successor = identity
            if other.forwarded:
                forwarded.extend(other.forwarded)
                other.forwarded = None
        session.predecessors = tuple(dict.fromkeys([*session.predecessors, *superseded]))
        if forwarded:
            kept = [*(session.forwarded or ()), *forwarded]
            session.forwarded = kept[-MAX_FORWARDED_ANSWERS:]
        if forwarded:
            session.forwarded = forwarded[-MAX_FORWARDED_ANSWERS:]

    def _mark_active(self, identity: str, session: _Session, wall_ns: int) -> None:
        """A batch or ping arrived: the session is the most recently active (eviction and
        LIVE_SESSION_NS go by it) and takes the answers forwarded to it."""
        self._activity += 1
        session.last_active, session.last_active_ns = self._activity, wall_ns
        if session.forwarded:
            self._flush_forwarded(identity, session)

    def _forward(self, session: _Session, frames: list[Frame]) -> None:
        """Keep `frames` (answers to the superseded `session`) for its successor, if that
        is still a session of the same name and node id."""
        successor = self._sessions.get(session.successor or "")
        if (not frames or successor is None or successor.state is not SessionState.OPEN
                or successor.peer != session.peer or successor.node_id != session.node_id):
            return
        if successor.forwarded is None:
            successor.forwarded = []
        successor.forwarded.extend(frames)
        if len(successor.forwarded) > MAX_FORWARDED_ANSWERS:
            del successor.forwarded[:-MAX_FORWARDED_ANSWERS]

    def _flush_forwarded(self, identity: str, session: _Session) -> None:
        """Send the answers forwarded to `session` on its own connection, ahead of its
        answer to the frame being read (so a Pong after them counts them done)."""
        assert session.forwarded is not None
        for frame in session.forwarded:
            self._reply(identity, frame)
        session.forwarded = None

    def _pending(self, session: _Session) -> int:
        """What a Pong says is pending: this session's batches not yet answered, and those
        of the sessions it superseded (still the same name and node id)."""
        pending = session.pending
        for connection in session.predecessors:
            other = self._sessions.get(connection) or self._draining.get(connection)
            if (other is not None and other.peer == session.peer
                    and other.node_id == session.node_id):
                pending += other.pending
        return pending

    def _violation(self, who: str, error: ProtocolError) -> None:
        self._events.append(ViolationDetected(who, error))

    def _reply(self, identity: str, frame: Frame) -> None:
        self._frames.append((identity, frame))

    def _welcome(self, identity: str, session: _Session, wall_ns: int, hlc: int) -> None:
        self._reply(identity, Welcome(
            version=PROTOCOL_VERSION, node_id=self.local_node_id, name=self.local_name,
            sent_at_ns=wall_ns, hlc=hlc, sync=self.sync, resume=session.token,
        ))

    def _claim_refusal(self, hello: Hello, asked: bool) -> str:
        """Why a keyless Hello under a peer's name is refused, as `_check_hello` decided it:
        the name's configured endpoint answered as another node id, or (not known) another
        node id has an open session under that name, active on another of this node's inbound
        connections within LIVE_SESSION_NS. `asked`: the endpoint is being asked, and this
        connection is welcomed if it answers as the Hello's node id."""
        vouched = self._claims.known(hello.name)
        live_s = LIVE_SESSION_NS // 1_000_000_000
        if vouched is not None:
            why = (f"{self.local_name!r} knows {hello.name!r} as node {vouched}: its "
                   f"configured endpoint answered so")
        else:
            holder = max((s for s in self._sessions.values()
                          if s.peer == hello.name and s.state is SessionState.OPEN
                          and s.node_id != hello.node_id),
                         key=lambda s: s.last_active, default=None)
            whose = f"node {holder.node_id}" if holder is not None else "another node"
            why = (f"{self.local_name!r} knows {hello.name!r} as {whose}, which sent on "
                   f"another connection within the last {live_s} s")
        then = (f"{self.local_name!r} is asking the endpoint configured for {hello.name!r} "
                f"which node it is, and welcomes this connection if it answers as node "
                f"{hello.node_id}" if asked else
                f"if {hello.name!r}'s data dir was replaced, a later Hello is checked against "
                f"the endpoint configured for it")
        return (
            f"{why}; this Hello is from node {hello.node_id}. A name is no proof without "
            f"keys: {then} (if this is a second node given that name, give this node a "
            f"name of its own; with --secure the key decides)"
        )

    def _check_hello(
        self, identity: str, hello: Hello, wall_ns: int, authenticated: str | None
    ) -> tuple[SessionInput, tuple[str, ProtocolError] | None, list[tuple[int, str]]]:
        """Which input this Hello is: with, for `BAD_HELLO`, the refuse code and the error,
        and the name's open sessions on other connections as (last active, connection).
        (Its version was checked by `decode`.) Sessions that said Bye under the name go: the
        peer is back, and a connection's id is never reused, so they would only pile up."""
        if authenticated is not None and hello.name != authenticated:
            return SessionInput.BAD_HELLO, (RefuseCode.IDENTITY, IdentityMismatch(
                f"connection authenticated as {authenticated!r} claims to be {hello.name!r}"
            )), []
        if self.exclusive is not None and hello.name != self.exclusive:
            # Not a fault of the peer's (it may be configured for a mesh): refused, and
            # REFUSE_HELLO counts no violation for this code.
            return SessionInput.BAD_HELLO, (RefuseCode.EXCLUSIVE, IdentityMismatch(
                f"{self.local_name!r} is in an exclusive pair with "
                f"{self.exclusive!r} and accepts no other peer"
            )), []
        if hello.name not in self.known_peers:
            return SessionInput.BAD_HELLO, (RefuseCode.UNKNOWN_PEER, IdentityMismatch(
                f"{hello.name!r} is not a peer of {self.local_name!r}"
            )), []
        expected = self.expected_node_ids.get(hello.name)
        if expected is not None and expected != hello.node_id:
            return SessionInput.BAD_HELLO, (RefuseCode.IDENTITY, IdentityMismatch(
                f"name clash: {hello.name!r} is node {expected}, not node {hello.node_id}"
            )), []
        others: list[tuple[int, str]] = []
        for connection, session in list(self._sessions.items()):
            if connection == identity or session.peer != hello.name:
                continue
            if session.state is SessionState.OPEN:
                others.append((session.last_active, connection))
            else:
                del self._sessions[connection]
        if authenticated is None:
            # Who the name is, by what this node checked itself: the node id the name's
            # configured endpoint answered as (its sessions of other node ids ended then).
            # Not known: first come, first served while the other is live.
            vouched = self._claims.known(hello.name)
            if vouched is not None and vouched != hello.node_id:
                return SessionInput.LIVE_CLAIM, None, others
            if vouched is None and any(
                self._sessions[c].node_id != hello.node_id
                and wall_ns - self._sessions[c].last_active_ns < LIVE_SESSION_NS
                for _a, c in others
            ):
                return SessionInput.LIVE_CLAIM, None, others
        return (SessionInput.CLAIM if others else SessionInput.HELLO), None, others

    def _on_batch(
        self, identity: str, session: _Session, batch: Batch, wall_ns: int, checked: bool
    ) -> None:
        """A batch on the open `session` (the answer ARRIVED): messages that arrived to be
        stored are reported (`MessagesArrived`; `stored()` answers them), the others
        rejected. `checked`: decoding has run the `Envelope` checks on every message."""
        self._mark_active(identity, session, wall_ns)
        peer = session.peer
        if checked and self._all_valid(peer, batch.messages):
            if batch.messages:
                self._events.append(
                    MessagesArrived(peer, list(batch.messages), batch.tx_at_ns, wall_ns, identity)
                )
                session.pending += 1
            return
        repeated = self._repeated_seqs(identity, peer, batch.messages)
        good: list[Envelope] = []
        rejected: dict[str, list[int]] = {}
        details: dict[str, str] = {}
        for message in batch.messages:
            if repeated and message.seq in repeated:
                continue  # rejected above, every copy
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
            self._events.append(MessagesArrived(peer, good, batch.tx_at_ns, wall_ns, identity))
            session.pending += 1

    def _repeated_seqs(self, identity: str, peer: str, messages: list[Envelope]) -> set[int]:
        """The seqs that more than one envelope of a batch carries, refused at once: a seq
        names one message to its sender (receipts and rejects name messages by seq), so an
        answer naming a repeated one would be about several. Every copy is rejected `invalid`
        in one Reject, reported once as a violation; the rest of the batch goes on."""
        if len(messages) < 2:
            return set()
        seqs = [m.seq for m in messages]
        if len(set(seqs)) == len(seqs):
            return set()
        counts = collections.Counter(seqs)
        repeated = sorted(seq for seq, n in counts.items() if n > 1)
        first, others = repeated[0], len(repeated) - 1
        more = ("" if not others else " (and 1 more seq repeats)" if others == 1
                else f" (and {others} more seqs repeat)")
        detail = (f"seq {first} appears {counts[first]} times in one batch{more}: a seq "
                  f"names one message")
        self._violation(peer, MalformedFrame(f"batch from {peer!r}: {detail}"))
        self._reply(identity, Reject(repeated, RejectCode.INVALID, detail))
        return set(repeated)

    def _all_valid(self, peer: str, messages: list[Envelope]) -> bool:
        """True only if `_check` passes every message of a batch that decoding has checked
        (ids, seqs, stamps, empty bodies: `Envelope`); what is left is decided in one pass.
        False sends the batch through `_check`."""
        # One plain loop: 0.4x the instructions of four map(attrgetter(...)) passes
        # (attrgetter on a msgspec struct is a generic getattr; the loop's attribute loads
        # are specialised). A batch with a pattern header goes through `_check`.
        # Seqs strictly rising (as a dialer builds a batch: section 4.4) are also distinct;
        # any other order goes through `_check` too, which finds repeats (`_repeated_seqs`).
        local, longest, last_seq = self.local_name, 0, 0
        for m in messages:
            if (m.sender != peer or m.recipient != local or m.header is not None
                    or m.seq <= last_seq):
                return False
            last_seq = m.seq
            if len(m.body) > longest:
                longest = len(m.body)
        return longest * 4 <= self.max_message_bytes

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
        if message.header is not None:
            problem = header_problem(message.header)
            if problem is not None:
                return RejectCode.INVALID, problem
        size = oversize(message.body, self.max_message_bytes)
        if size is not None:
            return RejectCode.TOO_LARGE, (
                f"body of {size} bytes exceeds the {self.max_message_bytes}-byte limit"
            )
        return None, ""

    def __repr__(self) -> str:
        open_ = sorted(i for i, s in self._sessions.items() if s.state is SessionState.OPEN)
        return f"Listener({self.local_name}, sessions={open_})"

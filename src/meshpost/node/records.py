"""The node's public records and events: what its API returns and what subscribers receive.

Rule: plain data and the few helpers that build it; no I/O and no node state. Everything here
is re-exported by `meshpost.node`, which is where callers import it from.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
from collections.abc import Awaitable, Callable
from contextvars import Context
from typing import TYPE_CHECKING

import msgspec

from meshpost.protocol import Envelope
from meshpost.protocol.groups import BroadcastStatus

if TYPE_CHECKING:  # the store's writer is only named here; importing it loads the store
    from meshpost.store.writer import StoreRetry


class CrashPoint(enum.Enum):
    """Protocol steps at which a debug build can be told to die (`os._exit`), for fault tests."""

    AFTER_SENDER_STORE = "after-sender-store"
    AFTER_TRANSMIT = "after-transmit"
    AFTER_RECEIVER_COMMIT = "after-receiver-commit"
    BEFORE_ACK_SEND = "before-ack-send"
    AFTER_ACK_RECEIVE = "after-ack-receive"
    #: The receipt was reported to its caller (`send()` returned) but not yet recorded in
    #: the sender's store: the window the record's commit leaves open.
    AFTER_RECEIPT_REPORTED = "after-receipt-reported"
    #: A worker's result was receipted by its sink; its `done` to the ventilator is not
    #: stored yet (the `done` a worker owes at its next start).
    AFTER_RESULT_RECEIPT = "after-result-receipt"


class Receipt(msgspec.Struct, frozen=True):
    """Proof that `to` committed message `message_id` to its store (the API's record of a
    receipt; the wire frame that carries it is `meshpost.protocol.ReceiptFrame`).

    Immutable, compared and hashed by value, picklable. A frozen `msgspec.Struct` rather than a
    dataclass, because one is built per send and a frozen dataclass's `__init__` costs ~12,000
    instructions (a Python call per field) against ~1,000: copy one with changes through
    `msgspec.structs.replace(receipt, seq=2)` (`copy.replace` from Python 3.13), not
    `dataclasses.replace`.
    """

    message_id: str
    to: str
    seq: int
    sent_at_ns: int
    #: Receiver's clock when it committed the message.
    delivered_at_ns: int
    #: Receiver's clock when the message arrived.
    received_at_ns: int
    #: Our clock when the receipt arrived.
    recorded_at_ns: int
    #: The receiver's durability level: "full" or "normal".
    sync: str


#: (peer, seq): one outgoing message of this node.
_MessageKey = tuple[str, int]


class ReceiptFuture(asyncio.Future[Receipt]):
    """The future of one message's receipt (`Outgoing.receipt`).

    Its node holds it weakly until someone waits for it (awaits it, or adds a done callback,
    as `gather`, `wait` and `shield` do): a future nobody can observe any more is forgotten,
    so posting through a long outage keeps no memory per message beyond what the caller
    keeps. The message itself is durable either way, and is delivered and receipted.
    """

    __slots__ = ("_held", "_holder", "_key")

    def __init__(
        self, loop: asyncio.AbstractEventLoop, holder: dict[_MessageKey, ReceiptFuture],
        key: _MessageKey,
    ) -> None:
        super().__init__(loop=loop)
        self._holder, self._key, self._held = holder, key, False

    def add_done_callback(
        self, fn: Callable[[ReceiptFuture], object], /, *, context: Context | None = None
    ) -> None:
        if not self._held:
            # Someone waits: hold the future until it is done, even if they keep nothing else
            # (a callback alone must still be called).
            self._held = True
            self._holder[self._key] = self
            super().add_done_callback(_release_receipt_future)
        super().add_done_callback(fn, context=context)


def _release_receipt_future(future: ReceiptFuture) -> None:
    future._holder.pop(future._key, None)


@dataclasses.dataclass(frozen=True, slots=True)
class Message:
    """A message a peer sent this node, as `Node.messages()` yields it (already stored)."""

    id: str
    sender: str
    recipient: str
    body: str
    #: The sender's wall clock when it sent the message (ns since the epoch).
    sent_at_ns: int
    #: The sender's hybrid logical clock stamp: sorts causally across nodes.
    hlc: int
    #: Our clock when we committed it.
    stored_at_ns: int
    #: The pattern header's kind and ref (`PatternHeader`), None for a direct message.
    kind: str | None = None
    ref: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Reply:
    """The reply to a request this node sent (`Node.request`), as stored here."""

    #: The request's message id; the reply's header refers to it (history links them).
    request_id: str
    #: The reply's own message id (`reply_id(request_id)`).
    id: str
    sender: str
    body: str
    #: The replier's wall clock when it sent the reply.
    sent_at_ns: int
    hlc: int
    #: Our clock when we committed it.
    stored_at_ns: int


@dataclasses.dataclass(frozen=True, slots=True)
class FetchedMessage:
    """One of a member's own messages to a group, as that member sent it back for a history
    request (`Node.fetch_group_history`): not stored as received (it is in the reply row)."""

    #: The member that answered on its own link: the sender proved by the link, not a name
    #: anyone wrote in a body.
    sender: str
    group: str
    #: The logical message id (the same for every copy of it).
    id: str
    sent_at_ns: int
    hlc: int
    body: str


@dataclasses.dataclass(frozen=True, slots=True)
class GroupHistory:
    """What `Node.fetch_group_history` gathered: the members' messages merged by HLC (oldest
    first), who answered, and who did not within the timeout (member -> why)."""

    group: str
    messages: tuple[FetchedMessage, ...]
    answered: tuple[str, ...]
    #: member -> "not-delivered" / "delivered-unanswered" (no reply in time), or why its reply
    #: was unreadable or a refusal ("refused: rate-limited, ask again in S s")
    unanswered: dict[str, str]


#: What a request handler may be: called with the request (a `Message`); returning a str
#: (or an awaitable of one) replies with it; None replies nothing (or the handler calls
#: `Node.reply` itself).
RequestHandler = Callable[["Message"], "str | Awaitable[str | None] | None"]
#: What a work-queue handler may be: called with a task's body; its result (or what an
#: awaitable result gives), as a str, goes to the task's sink.
TaskHandler = Callable[[str], object]


@dataclasses.dataclass(slots=True)
class Outgoing:
    """A message accepted into the durable outbox. Await `receipt` for its delivery."""

    id: str
    to: str
    seq: int
    body: str
    sent_at_ns: int
    hlc: int
    receipt: asyncio.Future[Receipt]


class BroadcastHandle:
    """One logical message to `all` or a group: one copy per member (`copies`), and how far
    it has got (`status`: delivered k of n, who is pending). Members down keep their copy in
    the outbox, retried until they receipt; `status` follows receipts as they come."""

    def __init__(self, logical_id: str, target: str, copies: list[Outgoing],
                 status: BroadcastStatus) -> None:
        self.logical_id = logical_id
        self.target = target
        self.copies = copies
        self.status = status
        self._changed = asyncio.Event()

    def _update(self, status: BroadcastStatus) -> None:
        self.status = status
        self._changed.set()

    async def changed(self, timeout_s: float | None) -> BroadcastStatus:
        """The status once it differs from the one last returned here (at once if settled);
        the same status after `timeout_s` without a change."""
        if not self.status.settled and not self._changed.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await self._changed.wait()
        self._changed.clear()
        return self.status

    def __repr__(self) -> str:
        s = self.status
        return (f"<BroadcastHandle {self.logical_id} to {self.target!r} "
                f"delivered {len(s.delivered)}/{s.total}>")


class PeerStatus(msgspec.Struct, frozen=True):
    """One peer as `/peers` and `meshpost peers` show it (also sent over the control socket)."""

    name: str
    endpoint: str
    connected: bool
    state: str
    last_seen_ns: int | None
    rtt_ns: int | None
    offset_ns: int | None
    unacknowledged: int
    refusal: str | None
    #: How the peer was found: "config" (--peer, --config) or "beacon" (--discover).
    found: str = "config"


class PeerProbe(msgspec.Struct, frozen=True):
    """What a probe of one peer found (`Node.probe_peers`, `meshpost peers --probe`): `live`
    (it answered within the wait, `rtt_ns` the round trip of that answer), `lost` (nothing
    from it within the wait) or `refused` (it refused us: `detail`). `state` is the link's
    state when the wait ended."""

    name: str
    result: str
    rtt_ns: int | None
    state: str
    detail: str | None = None


# -- events for subscribers (console, control tail) ----------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class MessageReceived:
    message: Envelope
    stored_at_ns: int


@dataclasses.dataclass(frozen=True, slots=True)
class DeliveryRecorded:
    peer: str
    seqs: list[int]
    delivered_at_ns: int


class PeerChange(enum.Enum):
    """What happened to a peer's link (`PeerChanged.kind`)."""

    CONNECTED = "connected"
    JOINED = "joined"
    LEFT = "left"
    LOST = "lost"
    REFUSED = "refused"


@dataclasses.dataclass(frozen=True, slots=True)
class PeerChanged:
    """A peer connected, left, went silent or refused us; `reason` says why (may be empty)."""

    peer: str
    connected: bool
    kind: PeerChange
    reason: str = ""

    @property
    def detail(self) -> str:
        """One line for a user, e.g. "left: shutting down" (also sent over the control
        socket, where `from_detail` reads it back)."""
        match self.kind:
            case PeerChange.CONNECTED:
                return "connected"
            case PeerChange.LOST:
                return self.reason
            case PeerChange.JOINED:
                return f"joined {self.reason}"
            case _:
                return f"{self.kind.value}: {self.reason}"

    @classmethod
    def from_detail(cls, peer: str, connected: bool, detail: str) -> PeerChanged:
        """The event `detail` was made from (the control socket carries only the text)."""
        for kind in (PeerChange.LEFT, PeerChange.REFUSED):
            if detail.startswith(f"{kind.value}: "):
                return cls(peer, connected, kind, detail.removeprefix(f"{kind.value}: "))
        if detail == "connected":
            return cls(peer, connected, PeerChange.CONNECTED)
        if detail.startswith("joined "):
            return cls(peer, connected, PeerChange.JOINED, detail.removeprefix("joined "))
        return cls(peer, connected, PeerChange.LOST, detail)


@dataclasses.dataclass(frozen=True, slots=True)
class PeerRefused:
    """We refused a connection's handshake: `who` is the routing id it chose (not proof)."""

    who: str
    code: str
    detail: str


@dataclasses.dataclass(frozen=True, slots=True)
class BroadcastProgress:
    """A broadcast posted before this node restarted got a receipt (or a rejection): its
    `status` now (delivered k/n, pending). Live broadcasts report through their handle."""

    status: BroadcastStatus


NodeEvent = MessageReceived | DeliveryRecorded | PeerChanged | PeerRefused | BroadcastProgress


@dataclasses.dataclass(slots=True)
class NodeStats:
    """Counters a node keeps; `meshpost status` and the console show them."""

    sent: int = 0
    delivered: int = 0
    received: int = 0
    duplicates: int = 0
    conflicts: int = 0
    rejected: int = 0
    violations: int = 0
    undecodable: int = 0
    dropped_sends: int = 0
    retransmissions: int = 0
    #: Of those, messages whose first transmission was receipted after all (the resend was
    #: not needed: docs/protocol.md 10).
    spurious_retransmissions: int = 0
    store_errors: int = 0
    #: The writer retrying after store errors right now (docs/reliability.md, "Store errors:
    #: retried or refused"): failed attempts since the last commit (0: writes commit), the
    #: delay before the next attempt, how long it has been failing, and the last error as
    #: `kind: message` (e.g. `store_full: ...`); zeros and "" once a commit goes through.
    store_retry_attempts: int = 0
    store_retry_delay_s: float = 0.0
    store_retry_for_s: float = 0.0
    store_retry_error: str = ""
    store_commits: int = 0
    #: Writes the store refused on their own (a row breaking a constraint): each dropped
    #: alone and logged, never retried; a peer's message is rejected `unstorable`.
    store_refused: int = 0
    #: Hellos naming a peer that already had a session on another connection.
    name_claims: int = 0
    #: Keyless name claims this node asked the name's configured endpoint about (a Ping or
    #: Hello on its own link; at most one per name per 5 s: docs/protocol.md 6.2).
    name_checks: int = 0
    #: Remote HLC stamps not merged: beyond the wall clock + the forward bound.
    hlc_rejected: int = 0
    #: Corrupt rows or pages found after start (the node fails on the first one).
    store_corrupt: int = 0
    #: Inbound connections shut down because `max_inbound_connections` were open.
    inbound_refused: int = 0
    #: Inbound frames the transport dropped before the protocol: more than one part after
    #: the routing id, or a connection's routing id over 255 bytes (each logged, paced).
    inbound_dropped: int = 0
    #: Secure mode: connections refused at the CURVE handshake, their key not on this node's
    #: allowlist (each logged with the key).
    denied_connections: int = 0
    #: Inbound connections whose ZMTP or CURVE handshake failed, so that no frame of theirs
    #: reached the node: a keyless or PLAIN peer at a --secure node or the reverse, a key
    #: not in authorized_keys (also in `denied_connections`), a client holding another key
    #: for this node (each logged, paced).
    handshakes_failed: int = 0
    #: Secure mode: inbound frames dropped because the key their connection was admitted
    #: with was removed or changed by a reload since (`meshpost keys reload`, SIGHUP): the
    #: connection stays open (ZeroMQ cannot close one peer's), nothing it sends is taken.
    frames_from_revoked: int = 0
    #: Request handlers that raised (the request stays unanswered; logged).
    handler_errors: int = 0
    #: Replies stored but linked to no request waiting here (late beyond memory, or from
    #: a peer the request did not go to).
    replies_unmatched: int = 0
    #: History requests whose query was unreadable (answered with nothing), and history
    #: replies that were not a bounded list of the member's messages (docs/protocol.md 19.6).
    history_requests_invalid: int = 0
    history_replies_invalid: int = 0
    #: History requests refused because their asker was over its rate (19.6.1): each got
    #: a refusal reply instead of a store query and a large reply.
    history_requests_refused: int = 0
    #: Results and `done`s that said a task of this ventilator was finished, from a peer it
    #: never gave that task to (or a `done` for a task whose sink is this node): stored and
    #: receipted, but they finish nothing (19.4).
    completions_refused: int = 0
    #: Peers' membership records not merged: about a group named after a node (this one,
    #: a peer, `all`), or malformed (docs/protocol.md 19.6).
    memberships_refused: int = 0
    #: Task messages this worker stored but did not run: their sink is no peer of this node
    #: (`all`, a group, itself, an unknown name), so a result could go nowhere (19.4).
    tasks_refused: int = 0
    #: Workers' `serve` records announcing a prefetch above MAX_PREFETCH (1,024): each worker
    #: is given at most that many tasks at once (19.4). A prefetch of 0, a negative or not a
    #: whole number is refused with its message (`invalid`, a violation).
    prefetch_clamped: int = 0

    def note_store_retry(self, retry: StoreRetry | None) -> None:
        """Set the `store_retry_*` fields from the writer's episode under way (None: none)."""
        if retry is None:
            self.store_retry_attempts, self.store_retry_delay_s = 0, 0.0
            self.store_retry_for_s, self.store_retry_error = 0.0, ""
            return
        self.store_retry_attempts, self.store_retry_delay_s = retry.attempts, retry.delay_s
        self.store_retry_for_s = max(0.0, retry.for_s)
        self.store_retry_error = f"{retry.error.kind}: {retry.error}"


def _message_of(m: Envelope, stored_at_ns: int) -> Message:
    h = m.header
    return Message(m.id, m.sender, m.recipient, m.body, m.sent_at_ns, m.hlc, stored_at_ns,
                   None if h is None else str(h.kind), None if h is None or not h.ref else h.ref)

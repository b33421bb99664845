"""Events the protocol state machines report to the node, in the past tense.

Each is a frozen `msgspec.Struct`, not a frozen dataclass: one is built per receipt and per
batch received, and a frozen dataclass's `__init__` makes an `object.__setattr__` call per
field (~0.5k instructions each), a Struct's none.
"""

from __future__ import annotations

import msgspec

from meshpost.errors import ProtocolError
from meshpost.protocol.frames import Envelope, ReceiptFrame


class PeerConnected(msgspec.Struct, frozen=True):
    peer: str
    node_id: str


class PeerLost(msgspec.Struct, frozen=True):
    peer: str
    silent_for_s: float


class RedialWanted(msgspec.Struct, frozen=True):
    """The link is still lost `peer_timeout_s` after its loss with nothing heard on its
    connection since (its Hello unanswered): the connection is likely dead or half-open, so
    the node replaces it (a new connection). A peer merely stopped keeps the old one, and
    with it the frames still queued for it. Once per loss."""

    peer: str
    silent_for_s: float


class PeerLeft(msgspec.Struct, frozen=True):
    """The peer said Bye: it is shutting down cleanly. The `Listener` reports it when the Bye
    arrives (hand it to that peer's `DialerLink.peer_left`); the link reports it again when
    that made a reachable peer gone (show it)."""

    peer: str
    reason: str


class LinkRefused(msgspec.Struct, frozen=True):
    """The peer refused our handshake (wrong version, unknown to it, ...)."""

    peer: str
    code: str
    detail: str


class MessagesDelivered(msgspec.Struct, frozen=True):
    """The peer committed these seqs (all of which we had in flight)."""

    peer: str
    seqs: list[int]
    receipt: ReceiptFrame
    arrived_at_ns: int


class MessagesRejected(msgspec.Struct, frozen=True):
    peer: str
    seqs: list[int]
    code: str
    detail: str


class MessagesArrived(msgspec.Struct, frozen=True):
    """Valid messages from `peer`; store them, then call `Listener.stored()`, which answers
    on `connection`, the connection they came on (a name may have several)."""

    peer: str
    messages: list[Envelope]
    echo_tx_at_ns: int
    received_at_ns: int
    connection: str


class ViolationDetected(msgspec.Struct, frozen=True):
    """A peer (or an unknown connection) sent something invalid; it was rejected and counted."""

    who: str
    error: ProtocolError


class SessionClaimed(msgspec.Struct, frozen=True):
    """A connection said Hello as `peer` while `peer` already has a session on another
    connection: a restart (the old connection is dead), or someone borrowing the name. Both
    sessions stay, each answered on its own connection, unless `refused` (no key, and a live
    session of another node id has the name); the node logs and counts it."""

    peer: str
    connection: str
    sessions: int
    refused: bool = False


class ClaimCheckWanted(msgspec.Struct, frozen=True):
    """Without a key, a Hello as `peer` with node id `claimant` was refused because `peer` is
    another node (`holder`, None if unknown: one active on another connection). Ask `peer`'s
    configured endpoint who it is, through this node's own link to it (a Ping, or a Hello if
    the link is not ready), within a bounded time; then tell the listener the node id that
    answered (`Listener.endpoint_answered`) or that none did (`Listener.endpoint_unanswered`).
    At most one per name per `CLAIM_CHECK_INTERVAL_NS`, however many Hellos come."""

    peer: str
    claimant: str
    holder: str | None


class ClaimSettled(msgspec.Struct, frozen=True):
    """`peer`'s configured endpoint answered as node `node_id`, and that changed something:
    `evicted` sessions of `peer` under other node ids ended (their connections must say
    Hello again, and are refused), `welcomed` connections lately refused as claims of that
    node id were welcomed (their Welcome is queued). `asked`: it answered a `ClaimCheckWanted`."""

    peer: str
    node_id: str
    evicted: int
    welcomed: int
    asked: bool


class ClaimUnchecked(msgspec.Struct, frozen=True):
    """`peer`'s configured endpoint did not answer a `ClaimCheckWanted` in time (or there is
    none): the name stays first come, first served; `refused` claimants stay refused."""

    peer: str
    refused: int


Event = (
    PeerConnected
    | PeerLost
    | RedialWanted
    | PeerLeft
    | LinkRefused
    | MessagesDelivered
    | MessagesRejected
    | MessagesArrived
    | ViolationDetected
    | SessionClaimed
    | ClaimCheckWanted
    | ClaimSettled
    | ClaimUnchecked
)

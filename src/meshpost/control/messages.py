"""The control protocol's records: one msgspec struct per request and per reply.

Rule: pure data. Every request carries an `id` that its reply echoes (a client accepts only the
reply to its own request); every error travels as an `ErrorReply` with the error's kind and
exit code from `meshpost.errors`. docs/protocol.md ("Control protocol") describes the wire.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, ClassVar, Literal, TypeVar

import msgspec

from meshpost.errors import MeshpostError, RemoteError
from meshpost.node import GroupHistory, PeerProbe, PeerStatus, StoredMessage
from meshpost.protocol.groups import BroadcastStatus
from meshpost.protocol.limits import INT64_MAX, INT64_MIN
from meshpost.protocol.workqueue import QueueStatus

#: The file in a node's data dir naming its control endpoint (line 1) and pid (line 2).
ENDPOINT_FILE = "control.endpoint"


# -- requests -------------------------------------------------------------------------------

#: The longest a request may wait (a day, as `meshpost send --timeout` allows): a larger
#: value is a typo, not a wish.
MAX_WAIT_S = 86_400.0
#: A request's timeout or wait, checked while decoding like every field a client sends: a
#: NaN waited for ever (a `tail` or `request` never answered), and in asyncio's timer heap it
#: breaks the order of every other timer of the node. A bad value is `bad_request`.
Seconds = Annotated[float, msgspec.Meta(ge=0.0, le=MAX_WAIT_S)]
#: An integer the store compares with its own (cursors, HLCs, counts): SQLite's INTEGER
#: holds no more (a `tail` after 2**63 failed inside the store as an internal error).
Int64 = Annotated[int, msgspec.Meta(ge=INT64_MIN, le=INT64_MAX)]


class _Request(msgspec.Struct, frozen=True, kw_only=True):
    #: Chosen by the client (unique among its requests in flight); 0 until the client sends.
    id: int = 0


class SendRequest(_Request, tag="send", frozen=True):
    """Post `body` to `target`; reply once stored and receipted (or after `timeout_s`)."""

    target: str
    body: str
    timeout_s: Seconds


class PeersRequest(_Request, tag="peers", frozen=True):
    """The status of every configured peer."""


#: The longest a `probe` waits for answers: a probe is a look, not a watch.
PROBE_WAIT_MAX_S = 30.0


class ProbeRequest(_Request, tag="probe", frozen=True):
    """Ask `peers` (every peer if empty) for a sign of life now, idle links included, and
    reply after at most `wait_s` with what each did (`Node.probe_peers`)."""

    peers: list[str] = []
    wait_s: float = 2.0


class StatusRequest(_Request, tag="status", frozen=True):
    """The node's status (name, endpoints, counters, config) and its peers."""


class EventsRequest(_Request, tag="events", frozen=True):
    """Long-poll: events since the last call; waits up to `wait_s` for the first one."""

    wait_s: Seconds


class PeerRequest(_Request, tag="request", frozen=True):
    """Send `body` to `to` as a request and reply with its reply (or the `request_timeout`
    error saying whether `to` had it, after `timeout_s`)."""

    to: str
    body: str
    timeout_s: Seconds


class SubmitRequest(_Request, tag="submit", frozen=True):
    """Queue one task per body on `queue` (this node is the ventilator), results to `sink`."""

    queue: str
    sink: str
    bodies: list[str]
    lease_s: float


class TailRequest(_Request, tag="tail", frozen=True):
    """Long-poll: received messages committed after `after` (nil: the cursor of now, no
    rows), from `sender` only when set, at most `limit`; waits up to `wait_s` for a first one."""

    after: Int64 | None = None
    sender: str | None = None
    limit: Int64 = 512
    wait_s: Seconds = 0.0


class BroadcastRequest(_Request, tag="broadcast", frozen=True):
    """Post `body` to every member of `target` (`all` or a group) as one logical message;
    reply once every copy is stored, with its status (`delivered k/n`)."""

    target: str
    body: str


class BroadcastStatusRequest(_Request, tag="broadcast-status", frozen=True):
    """Long-poll: the status of broadcast `logical_id` once it differs from what the client
    saw (`seen`: delivered + rejected), or after `wait_s`."""

    logical_id: str
    seen: Int64 = 0
    wait_s: Seconds = 0.0


class GroupRequest(_Request, tag="group", frozen=True):
    """`join` or `leave` group `group` at run time, or list its `members`."""

    action: Literal["join", "leave", "members"]
    group: str


class QueueStatusRequest(_Request, tag="queue-status", frozen=True):
    """Each work queue the node knows (only `queue` when set): workers, tasks waiting, in
    flight, leased, done, abandoned, redelivered, results kept."""

    queue: str | None = None


class GroupHistoryRequest(_Request, tag="group-history", frozen=True):
    """Ask each other member of `group` for its own messages to it (`Node.fetch_group_history`,
    docs/protocol.md 19.6): at most `limit` each, below `before_hlc` if not 0, waiting up to
    `wait_s` for the replies."""

    group: str
    limit: Int64 = 50
    before_hlc: Int64 = 0
    wait_s: Seconds = 5.0


class ReloadKeysRequest(_Request, tag="reload-keys", frozen=True):
    """Secure mode: read authorized_keys again and put it in force (`Node.
    reload_authorized_keys`); a file that would not start the node is a `config` error and
    the keys in force stay."""


Request = (SendRequest | PeersRequest | StatusRequest | EventsRequest | PeerRequest
           | SubmitRequest | TailRequest | BroadcastRequest | BroadcastStatusRequest
           | GroupRequest | QueueStatusRequest | GroupHistoryRequest | ProbeRequest
           | ReloadKeysRequest)


# -- replies --------------------------------------------------------------------------------


class SendResult(msgspec.Struct, frozen=True):
    to: str
    id: str
    seq: int
    sent_at_ns: int
    delivered: bool
    delivered_at_ns: int | None = None
    received_at_ns: int | None = None
    sync: str | None = None
    error: str | None = None


class IncomingInfo(msgspec.Struct, frozen=True):
    id: str
    sender: str
    body: str
    sent_at_ns: int
    hlc: int
    stored_at_ns: int


class PeerChangeInfo(msgspec.Struct, frozen=True):
    peer: str
    connected: bool
    detail: str


class RefusedInfo(msgspec.Struct, frozen=True):
    """This node refused a connection's handshake; `who` is the name it claimed (not proof)."""

    who: str
    code: str
    detail: str


class DeliveryInfo(msgspec.Struct, frozen=True):
    peer: str
    seqs: list[int]
    delivered_at_ns: int


class BroadcastProgressInfo(msgspec.Struct, frozen=True):
    """A broadcast posted before the node restarted moved on (a receipt or a rejection)."""

    status: BroadcastStatus


class _Reply(msgspec.Struct, frozen=True, kw_only=True):
    #: The id of the request this answers.
    id: int = 0
    ok: ClassVar[bool] = True


class SendReply(_Reply, tag="sent", frozen=True):
    sent: list[SendResult] = []


class PeersReply(_Reply, tag="peers", frozen=True):
    peers: list[PeerStatus] = []


class ProbeReply(_Reply, tag="probe", frozen=True):
    probes: list[PeerProbe] = []


class StatusReply(_Reply, tag="status", frozen=True):
    status: dict[str, Any] = {}
    peers: list[PeerStatus] = []


class EventsReply(_Reply, tag="events", frozen=True):
    incoming: list[IncomingInfo] = []
    peer_changes: list[PeerChangeInfo] = []
    deliveries: list[DeliveryInfo] = []
    refused: list[RefusedInfo] = []
    #: k/n of broadcasts posted before the node restarted (live ones report to their sender).
    broadcasts: list[BroadcastProgressInfo] = []
    #: Events this subscriber lost since its last poll (too slow, or over the memory bound).
    dropped: int = 0


class AnswerReply(_Reply, tag="answered", frozen=True):
    """A `PeerRequest`'s reply, linked to the request by `request_id`."""

    request_id: str
    reply_id: str
    sender: str
    body: str
    sent_at_ns: int
    stored_at_ns: int


class SubmitReply(_Reply, tag="submitted", frozen=True):
    """The ids of a `SubmitRequest`'s tasks, in order (each stored at the ventilator)."""

    task_ids: list[str] = []
class TailReply(_Reply, tag="tail", frozen=True):
    """Rows as `history --json` has them, and the cursor to ask after next time (it moves
    past rows of other senders too)."""

    cursor: int
    messages: list[StoredMessage] = []


class BroadcastReply(_Reply, tag="broadcast", frozen=True):
    """Where one logical message to many stands: delivered k of n, who is pending."""

    status: BroadcastStatus


class GroupReply(_Reply, tag="group", frozen=True):
    """The group's members after the request; `changed`: the join or leave did something."""

    group: str
    members: list[str] = []
    changed: bool = False


class QueueStatusReply(_Reply, tag="queue-status", frozen=True):
    """One status per queue, by name (`QueueStatus`)."""

    queues: list[QueueStatus] = []


class GroupHistoryReply(_Reply, tag="group-history", frozen=True):
    """What the members sent back (`GroupHistory`): merged by HLC, who answered, who not."""

    history: GroupHistory


class KeysReloadedReply(_Reply, tag="keys-reloaded", frozen=True):
    """The names (sorted) whose line a `reload-keys` added, removed, or changed the key of;
    all empty: the file says what was in force."""

    added: list[str] = []
    removed: list[str] = []
    changed: list[str] = []


class ErrorReply(_Reply, tag="error", frozen=True):
    """The request failed: `kind` and `exit_code` come from the `MeshpostError` class."""

    kind: str
    message: str
    exit_code: int
    ok: ClassVar[bool] = False

    @property
    def error(self) -> str:
        return self.message

    @property
    def error_kind(self) -> str:
        return self.kind

    def exception(self) -> RemoteError:
        return RemoteError(self.kind, self.message)

    @classmethod
    def of(cls, exc: MeshpostError, id: int = 0) -> ErrorReply:
        return cls(kind=exc.kind, message=str(exc), exit_code=exc.exit_code, id=id)


Reply = (SendReply | PeersReply | StatusReply | EventsReply | AnswerReply | SubmitReply
         | TailReply | BroadcastReply | GroupReply | QueueStatusReply | GroupHistoryReply
         | ProbeReply | KeysReloadedReply | ErrorReply)
R = TypeVar("R", SendReply, PeersReply, StatusReply, EventsReply, AnswerReply, SubmitReply,
            TailReply, BroadcastReply, GroupReply, QueueStatusReply, GroupHistoryReply,
            ProbeReply, KeysReloadedReply)


def checked(reply: R | ErrorReply) -> R:
    """`reply`, or raise the node's error (`RemoteError`, with its kind and exit code)."""
    if isinstance(reply, ErrorReply):
        raise reply.exception()
    return reply


# -- not on the wire --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class NodeGone:
    """Published by an attached console's `RemoteNode` once its node stopped answering."""

    name: str


@dataclasses.dataclass(frozen=True, slots=True)
class EventsDropped:
    """Published by `RemoteNode` when the node reports events it dropped for this console."""

    count: int


encoder = msgspec.msgpack.Encoder()
request_decoder = msgspec.msgpack.Decoder(Request)
reply_decoder = msgspec.msgpack.Decoder(Reply)

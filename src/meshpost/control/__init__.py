"""The local control endpoint: how `meshpost send/peers/attach` talk to a running node.

Rule: typed records (`messages`), the node's side (`server`), one client (`client`, sync and
asyncio); nothing here holds protocol or storage state of its own.
"""

from typing import TYPE_CHECKING

from meshpost.control.client import AsyncControlClient, ControlClient, process_alive
from meshpost.control.messages import (
    ENDPOINT_FILE,
    AnswerReply,
    BroadcastProgressInfo,
    BroadcastReply,
    BroadcastRequest,
    BroadcastStatusRequest,
    DeliveryInfo,
    ErrorReply,
    EventsDropped,
    EventsReply,
    EventsRequest,
    GroupHistoryReply,
    GroupHistoryRequest,
    GroupReply,
    GroupRequest,
    IncomingInfo,
    KeysReloadedReply,
    NodeGone,
    PeerChangeInfo,
    PeerRequest,
    PeersReply,
    PeersRequest,
    ProbeReply,
    ProbeRequest,
    QueueStatusReply,
    QueueStatusRequest,
    RefusedInfo,
    ReloadKeysRequest,
    Reply,
    Request,
    SendReply,
    SendRequest,
    SendResult,
    StatusReply,
    StatusRequest,
    SubmitReply,
    SubmitRequest,
    TailReply,
    TailRequest,
    checked,
)
from meshpost.lazy import lazy_exports

# The node's side is imported on first use (module `__getattr__`): it imports the node, its
# store and transport, which a command talking to a running node (peers, send...) never needs.
if TYPE_CHECKING:
    from meshpost.control.server import (
        SUBSCRIBER_IDLE_S,
        SUBSCRIBERS_MAX_BYTES,
        ControlServer,
        control_endpoint_for,
        write_endpoint_file,
    )

_SERVER_NAMES = frozenset({"SUBSCRIBER_IDLE_S", "SUBSCRIBERS_MAX_BYTES", "ControlServer",
                           "control_endpoint_for", "write_endpoint_file"})


__getattr__, __dir__ = lazy_exports(
    __name__, dict.fromkeys(_SERVER_NAMES, "meshpost.control.server"))


__all__ = [
    "ENDPOINT_FILE",
    "SUBSCRIBERS_MAX_BYTES",
    "SUBSCRIBER_IDLE_S",
    "AnswerReply",
    "AsyncControlClient",
    "BroadcastProgressInfo",
    "BroadcastReply",
    "BroadcastRequest",
    "BroadcastStatusRequest",
    "ControlClient",
    "ControlServer",
    "DeliveryInfo",
    "ErrorReply",
    "EventsDropped",
    "EventsReply",
    "EventsRequest",
    "GroupHistoryReply",
    "GroupHistoryRequest",
    "GroupReply",
    "GroupRequest",
    "IncomingInfo",
    "KeysReloadedReply",
    "NodeGone",
    "PeerChangeInfo",
    "PeerRequest",
    "PeersReply",
    "PeersRequest",
    "ProbeReply",
    "ProbeRequest",
    "QueueStatusReply",
    "QueueStatusRequest",
    "RefusedInfo",
    "ReloadKeysRequest",
    "Reply",
    "Request",
    "SendReply",
    "SendRequest",
    "SendResult",
    "StatusReply",
    "StatusRequest",
    "SubmitReply",
    "SubmitRequest",
    "TailReply",
    "TailRequest",
    "checked",
    "control_endpoint_for",
    "process_alive",
    "write_endpoint_file",
]

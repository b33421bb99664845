"""The local control endpoint: how `meshpost send/peers/attach` talk to a running node.

Rule: typed records (`messages`), the node's side (`server`), one client (`client`, sync and
asyncio); nothing here holds protocol or storage state of its own.
"""

from meshpost.control.client import AsyncControlClient, ControlClient, process_alive
from meshpost.control.messages import (
    ENDPOINT_FILE,
    AnswerReply,
    DeliveryInfo,
    ErrorReply,
    EventsDropped,
    EventsReply,
    EventsRequest,
    IncomingInfo,
    NodeGone,
    PeerChangeInfo,
    PeerRequest,
    PeersReply,
    PeersRequest,
    RefusedInfo,
    Reply,
    Request,
    SendReply,
    SendRequest,
    SendResult,
    StatusReply,
    StatusRequest,
    checked,
)
from meshpost.control.server import (
    SUBSCRIBER_IDLE_S,
    SUBSCRIBERS_MAX_BYTES,
    ControlServer,
    control_endpoint_for,
    write_endpoint_file,
)

__all__ = [
    "ENDPOINT_FILE",
    "SUBSCRIBERS_MAX_BYTES",
    "SUBSCRIBER_IDLE_S",
    "AnswerReply",
    "AsyncControlClient",
    "ControlClient",
    "ControlServer",
    "DeliveryInfo",
    "ErrorReply",
    "EventsDropped",
    "EventsReply",
    "EventsRequest",
    "IncomingInfo",
    "NodeGone",
    "PeerChangeInfo",
    "PeerRequest",
    "PeersReply",
    "PeersRequest",
    "RefusedInfo",
    "Reply",
    "Request",
    "SendReply",
    "SendRequest",
    "SendResult",
    "StatusReply",
    "StatusRequest",
    "checked",
    "control_endpoint_for",
    "process_alive",
    "write_endpoint_file",
]

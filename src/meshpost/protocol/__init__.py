"""The sans-IO wire protocol: frames, codec, and per-peer state machines.

Rule: no I/O here. No asyncio, zmq, sqlite3, socket or time imports: inputs are bytes, frames
and timestamps handed in by the caller; outputs are frames to send and events.
"""

from meshpost.protocol.codec import decode, encode
from meshpost.protocol.dialer import DialerLink, LinkInput, LinkState
from meshpost.protocol.events import (
    ClaimCheckWanted,
    ClaimSettled,
    ClaimUnchecked,
    Event,
    LinkRefused,
    MessagesArrived,
    MessagesDelivered,
    MessagesRejected,
    PeerConnected,
    PeerLeft,
    PeerLost,
    RedialWanted,
    SessionClaimed,
    ViolationDetected,
)
from meshpost.protocol.frames import (
    MAX_BATCH_MESSAGES,
    PROTOCOL_VERSION,
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
    Welcome,
    max_frame_bytes,
)
from meshpost.protocol.listener import Listener, SessionInput, SessionState, to_ranges
from meshpost.protocol.outbox import HELD_MESSAGE_OVERHEAD, Outbox, held_size
from meshpost.protocol.recovery import LossRecovery

__all__ = [
    "HELD_MESSAGE_OVERHEAD",
    "MAX_BATCH_MESSAGES",
    "PROTOCOL_VERSION",
    "Batch",
    "Bye",
    "ClaimCheckWanted",
    "ClaimSettled",
    "ClaimUnchecked",
    "Close",
    "DialerLink",
    "Envelope",
    "Event",
    "Frame",
    "Hello",
    "LinkInput",
    "LinkRefused",
    "LinkState",
    "Listener",
    "LossRecovery",
    "MessagesArrived",
    "MessagesDelivered",
    "MessagesRejected",
    "Outbox",
    "PeerConnected",
    "PeerLeft",
    "PeerLost",
    "Ping",
    "Pong",
    "ReceiptFrame",
    "RedialWanted",
    "Refuse",
    "RefuseCode",
    "Reject",
    "RejectCode",
    "SessionClaimed",
    "SessionInput",
    "SessionState",
    "ViolationDetected",
    "Welcome",
    "decode",
    "encode",
    "held_size",
    "max_frame_bytes",
    "to_ranges",
]

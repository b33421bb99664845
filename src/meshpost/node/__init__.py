"""The node package: one meshpost node, composed from clock, protocol, store and transport.

Rule: this file only re-exports; `from meshpost.node import X` is the public import path.
"""

from __future__ import annotations

from meshpost.node.core import Node, wait_receipt
from meshpost.node.records import (
    BroadcastHandle,
    CrashPoint,
    DeliveryRecorded,
    Message,
    MessageReceived,
    NodeEvent,
    NodeStats,
    Outgoing,
    PeerChange,
    PeerChanged,
    PeerRefused,
    PeerStatus,
    Receipt,
    ReceiptFuture,
    Reply,
    RequestHandler,
    TaskHandler,
)
from meshpost.store import StoredMessage

__all__ = [
    "BroadcastHandle",
    "CrashPoint",
    "DeliveryRecorded",
    "Message",
    "MessageReceived",
    "Node",
    "NodeEvent",
    "NodeStats",
    "Outgoing",
    "PeerChange",
    "PeerChanged",
    "PeerRefused",
    "PeerStatus",
    "Receipt",
    "ReceiptFuture",
    "Reply",
    "RequestHandler",
    "StoredMessage",  # what `incoming_after` returns (the store's row type)
    "TaskHandler",
    "wait_receipt",
]

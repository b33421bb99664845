"""The node package: one meshpost node, composed from clock, protocol, store and transport.

Rule: `from meshpost.node import X` is the public import path; this file only re-exports.

    core       `Node`: lifecycle, the listener, the post/send path, store callbacks; it
               composes the components below and delegates to them
    records    the API's records and events (plain data)
    links      `Links`: the links to the peers, their connections, timer and feed loops
    inbound    `Inbound`: the frames peers send our ROUTER, through the listener; arrived
               messages stored, then receipted and handed on (readers, subscribers,
               the patterns)
    receipts   `Receipts`: our messages' receipt futures, send() timeouts, and the
               recording of their receipts and rejections; `wait_receipt`
    events     `Events`: what the links and the listener report, performed (receipts
               recorded, peer changes logged and told, violations counted); the
               subscribers' queues
    readers    `Readers`: what callers read of the store (`messages()`, `incoming_after`,
               `pending_count`) on read-only connections, woken by each commit
    groups     `Groups`: membership and broadcasts (k/n)
    requests   `Requests`: request/reply and the request handler
    workqueue  `WorkQueues`: ventilator, worker and sink roles

The links, the inbound path, the receipts, the events, the readers and the patterns are
components, not mixins: each owns its state (links and timers, refusal notices, receipt
futures, subscribers, readers' wake-ups, tracker, dispatchers, waiters, handlers) behind its
own attributes, so which code may touch which state is visible, and `Node` keeps its public
methods as one-line delegates. A component reaches its node's post path and store through the
node it is given (`_post`, `_writer`, `_links`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from meshpost.lazy import lazy_exports

# The names below are imported on first use (module `__getattr__`, as in `meshpost`): a
# `meshpost` command that only talks to a running node (peers, send, group...) needs a few
# records from here, not the node, its store and transport (~0.3 s of every command's start).
if TYPE_CHECKING:
    from meshpost.node.core import Node
    from meshpost.node.receipts import wait_receipt
    from meshpost.node.records import (
        BroadcastHandle,
        BroadcastProgress,
        CrashPoint,
        DeliveryRecorded,
        FetchedMessage,
        GroupHistory,
        Message,
        MessageReceived,
        NodeEvent,
        NodeStats,
        Outgoing,
        PeerChange,
        PeerChanged,
        PeerProbe,
        PeerRefused,
        PeerStatus,
        Receipt,
        ReceiptFuture,
        Reply,
        RequestHandler,
        TaskHandler,
    )
    from meshpost.store import StoredMessage

#: Public name -> the module that defines it (add a name here, above and to `__all__`).
_EXPORTS: dict[str, str] = {
    "BroadcastHandle": "meshpost.node.records",
    "BroadcastProgress": "meshpost.node.records",
    "CrashPoint": "meshpost.node.records",
    "DeliveryRecorded": "meshpost.node.records",
    "FetchedMessage": "meshpost.node.records",
    "GroupHistory": "meshpost.node.records",
    "Message": "meshpost.node.records",
    "MessageReceived": "meshpost.node.records",
    "Node": "meshpost.node.core",
    "NodeEvent": "meshpost.node.records",
    "NodeStats": "meshpost.node.records",
    "Outgoing": "meshpost.node.records",
    "PeerChange": "meshpost.node.records",
    "PeerChanged": "meshpost.node.records",
    "PeerProbe": "meshpost.node.records",
    "PeerRefused": "meshpost.node.records",
    "PeerStatus": "meshpost.node.records",
    "Receipt": "meshpost.node.records",
    "ReceiptFuture": "meshpost.node.records",
    "Reply": "meshpost.node.records",
    "RequestHandler": "meshpost.node.records",
    "StoredMessage": "meshpost.store",
    "TaskHandler": "meshpost.node.records",
    "wait_receipt": "meshpost.node.receipts",
}


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)


__all__ = [
    "BroadcastHandle",
    "BroadcastProgress",
    "CrashPoint",
    "DeliveryRecorded",
    "FetchedMessage",
    "GroupHistory",
    "Message",
    "MessageReceived",
    "Node",
    "NodeEvent",
    "NodeStats",
    "Outgoing",
    "PeerChange",
    "PeerChanged",
    "PeerProbe",
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

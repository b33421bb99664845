"""A node's events: what its links and its listener report (the protocol's events), performed,
and the `NodeEvent`s it tells its subscribers (console, control tail).

Rule: this component is the one place a protocol event becomes what the node does about it: a
receipt or a rejection recorded (through `Receipts`), a peer's change logged and told, a name
claim or a violation counted. Subscribers' queues are bounded: a slow reader loses its oldest
events, and publishing never waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from meshpost.node.claims import CLAIM_CHECK_TIMEOUT_S, Claims
from meshpost.node.records import NodeEvent, PeerChange, PeerChanged
from meshpost.protocol import (
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
    SessionClaimed,
    ViolationDetected,
)
from meshpost.protocol.ratelimit import (
    INPUT_WARNINGS_BURST,
    INPUT_WARNINGS_PER_S,
    Allowed,
    RateLimiter,
)
from meshpost.transport.routing_ids import connection_label

if TYPE_CHECKING:
    from meshpost.node.core import Node

log = logging.getLogger(__name__)

#: Subscriber queues (console, control tail) drop their oldest events past this many.
SUBSCRIBER_QUEUE = 10_000


class Events:
    """A node's handling of its links' and listener's events (`on_event`) and its subscribers
    (`subscribe`, `unsubscribe`, `publish`)."""

    def __init__(self, node: Node) -> None:
        self._node = node
        #: One queue per subscriber. Never rebound: the node keeps it at hand, and the paths
        #: that build an event only for subscribers test it first.
        self.subscribers: list[asyncio.Queue[NodeEvent]] = []
        #: One bucket (key "input"), across all connections (a flood may use many), for the
        #: warnings of bad input that costs its sender nothing: past it, counted only.
        self._input_warnings = RateLimiter(rate_per_s=INPUT_WARNINGS_PER_S,
                                           burst=INPUT_WARNINGS_BURST)
        #: Checks of keyless name claims against the names' configured endpoints.
        self.claims = Claims(node)

    def subscribe(self) -> asyncio.Queue[NodeEvent]:
        """A queue of `NodeEvent`s from now on; slow readers lose the oldest events."""
        queue: asyncio.Queue[NodeEvent] = asyncio.Queue(SUBSCRIBER_QUEUE)
        self.subscribers.append(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[NodeEvent]) -> None:
        with contextlib.suppress(ValueError):
            self.subscribers.remove(queue)

    def on_event(self, event: Event) -> None:
        """What a link (`Links`) or the listener (`Inbound`) reported, performed."""
        node = self._node
        match event:
            case MessagesDelivered():
                node._receipts.record_delivery(event)
            case MessagesRejected(peer=peer, seqs=seqs, code=code, detail=detail):
                node._receipts.record_rejection(peer, seqs, code, detail)
            case PeerConnected(peer=peer, node_id=node_id):
                log.info("[%s] connected to %s (node %s)", node.name, peer, node_id)
                # Who `peer` is, as its configured endpoint says: what a keyless Hello
                # under its name is judged by (docs/protocol.md 6.2).
                self.claims.endpoint_answered(peer, node_id)
                node._queues.peer_event(peer, True)
                self.publish(PeerChanged(peer, True, PeerChange.CONNECTED))
            case PeerLeft(peer=peer, reason=reason):
                log.info("[%s] %s left: %s", node.name, peer, reason)
                node._queues.peer_event(peer, False)
                self.publish(PeerChanged(peer, False, PeerChange.LEFT, reason))
            case PeerLost(peer=peer, silent_for_s=silent):
                log.warning("[%s] lost %s: silent for %.1fs", node.name, peer, silent)
                node._queues.peer_event(peer, False)
                self.publish(PeerChanged(peer, False, PeerChange.LOST,
                                         f"silent for {silent:.1f}s"))
            case SessionClaimed() | ViolationDetected() if not self._may_warn(event):
                pass  # counted by `_may_warn`; a flood of bad input must not flood the log
            case SessionClaimed(peer=peer, connection=connection, refused=True):
                node.stats.name_claims += 1
                # Worded as the listener's Refuse is: the name's holder may have no open link
                # here (idle links close), so "connected" would not be true.
                log.warning("[%s] refused connection %s saying Hello as %s: a node with another "
                            "node id holds that name and was heard on another connection "
                            "recently (someone borrowing the name, a second node given the same "
                            "name, or one restarted with a new data directory)", node.name,
                            connection_label(connection), peer)
            case SessionClaimed(peer=peer, connection=connection, sessions=sessions):
                node.stats.name_claims += 1
                log.warning("[%s] connection %s said Hello as %s, which already has a "
                            "session (%d sessions now): a restart, or someone borrowing the "
                            "name", node.name, connection_label(connection), peer, sessions)
            case ClaimCheckWanted():
                self.claims.check(event)
            case ClaimSettled(peer=peer, node_id=node_id, evicted=evicted, welcomed=welcomed):
                if evicted or welcomed:
                    log.warning("[%s] %s's configured endpoint answers as node %s: ended %d "
                                "session(s) of %s under other node ids (refused from now on) "
                                "and welcomed %d connection(s) it had refused as that node",
                                node.name, peer, node_id, evicted, peer, welcomed)
                else:
                    log.info("[%s] %s's configured endpoint answers as node %s: Hellos as %s "
                             "with other node ids stay refused", node.name, peer, node_id, peer)
            case ClaimUnchecked(peer=peer):
                log.warning("[%s] could not check who %s is: its configured endpoint did not "
                            "answer within %g s; without keys the name stays first come, first "
                            "served until it answers (use --secure to decide by key)",
                            node.name, peer, CLAIM_CHECK_TIMEOUT_S)
            case LinkRefused(peer=peer, code=code, detail=detail):
                log.error("[%s] %s refused us (%s): %s", node.name, peer, code, detail)
                self.publish(PeerChanged(peer, False, PeerChange.REFUSED, detail))
            case ViolationDetected(who=who, error=error):
                node.stats.violations += 1
                log.warning("[%s] protocol violation by connection %s: %s", node.name,
                            connection_label(who), error)
            case MessagesArrived():  # pragma: no cover - handled by Inbound.on_frame
                pass

    def _may_warn(self, event: SessionClaimed | ViolationDetected) -> bool:
        """True if bad input's `event` may be logged now (the case for it counts and logs
        it); else it is counted here only, and the first time in a burst the log says so."""
        node = self._node
        decision = self._input_warnings.check("input", node.clock.monotonic())
        if isinstance(decision, Allowed):
            return True
        if isinstance(event, ViolationDetected):
            node.stats.violations += 1
        else:
            node.stats.name_claims += 1
        if decision.burst_started:
            log.warning("[%s] bad input (protocol violations, name claims) comes faster than "
                        "%d warnings at once and %g a second: each is counted (`violations`, "
                        "`name_claims` in `meshpost peers --json`), and logged at that rate "
                        "until it slows down", node.name, INPUT_WARNINGS_BURST,
                        INPUT_WARNINGS_PER_S)
        return False

    def publish(self, event: NodeEvent) -> None:
        """Tell every subscriber `event`; a full queue drops its oldest first."""
        for queue in self.subscribers:
            if queue.full():
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()
            queue.put_nowait(event)

    def __repr__(self) -> str:
        return f"Events({self._node.name!r}, subscribers={len(self.subscribers)})"

"""Who a keyless name is, by what this node checks itself: the node id that name's configured
endpoint answers as on this node's own link to it.

Rule: the listener (sans-IO) decides when a claim needs checking (`ClaimCheckWanted`) and what
an answer changes; this component performs the check through the node's own link (a Ping, or
a Hello if it is not ready: `Links.probe`), bounded by CLAIM_CHECK_TIMEOUT_S, hands the
listener every node id a Welcome on the node's own links carries, and sends what the listener
then answers to the connection each answer is for. Under --secure keys decide: nothing here.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from meshpost.errors import NodeClosed
from meshpost.protocol import ClaimCheckWanted, LinkState, encode

if TYPE_CHECKING:
    from meshpost.node.core import Node

log = logging.getLogger(__name__)

#: How long a check waits for the endpoint's answer (a Pong, or a Welcome on a new
#: connection: a round trip or two) before the name stays first come, first served. Shorter
#: than the listener's CLAIM_CHECK_INTERVAL_NS, so a check is settled before the next may be
#: asked; long enough for a slow link's handshake.
CLAIM_CHECK_TIMEOUT_S = 3.0


class Claims:
    """A node's checks of keyless name claims (`check`) and what its own links learn of who
    its peers are (`endpoint_answered`), handed to its listener."""

    def __init__(self, node: Node) -> None:
        self._node = node
        #: Names whose endpoint is being asked now (one check each at a time).
        self._checking: set[str] = set()

    def __repr__(self) -> str:
        return f"Claims({self._node.name!r}, checking={sorted(self._checking)})"

    def endpoint_answered(self, peer: str, node_id: str) -> None:
        """The node's own link to `peer` was welcomed by node `node_id` (`PeerConnected`)."""
        node = self._node
        listener, transport = node._listener, node._transport
        if listener is None or transport is None or transport.secure:
            return
        listener.endpoint_answered(peer, node_id, node.clock.wall_ns(), node.hlc.now())
        self._perform()

    def check(self, wanted: ClaimCheckWanted) -> None:
        """Ask `wanted.peer`'s configured endpoint who it is (the listener asks at most once
        per name per CLAIM_CHECK_INTERVAL_NS); its answer, or its silence, goes back to the
        listener within CLAIM_CHECK_TIMEOUT_S."""
        node = self._node
        peer = wanted.peer
        node.stats.name_checks += 1
        holder = f"node {wanted.holder}" if wanted.holder else "another node id's live session"
        log.warning("[%s] a Hello as %s from node %s conflicts with %s: asking %s's configured "
                    "endpoint which node it is", node.name, peer, wanted.claimant, holder, peer)
        if peer in self._checking:
            return
        if peer not in node._links:  # no endpoint to ask
            listener = node._listener
            if listener is not None:
                listener.endpoint_unanswered(peer)
                self._perform()
            return
        self._checking.add(peer)
        node._spawn_handler(self._check(peer), f"claim-check-{peer}")

    async def _check(self, peer: str) -> None:
        node = self._node
        link = node._links[peer]
        answers = link.answers
        try:
            await node._links.probe(peer, wait_s=CLAIM_CHECK_TIMEOUT_S)
        except NodeClosed:
            return
        finally:
            self._checking.discard(peer)
        # An answer since the probe (a Pong on the session a Welcome opened, or a Welcome)
        # says who holds the endpoint now: a restarted node there answers no Ping of an old
        # session (`hello-required`), and then welcomes a new Hello as itself.
        if link.answers > answers and link.state is LinkState.READY and link.peer_node_id:
            self.endpoint_answered(peer, link.peer_node_id)
            return
        listener = node._listener
        if listener is not None and node._transport is not None:
            listener.endpoint_unanswered(peer)
            self._perform()

    def _perform(self) -> None:
        """Send the listener's answers, each to its own connection (late Welcomes), and
        perform its events (what a check settled)."""
        node = self._node
        listener, transport = node._listener, node._transport
        if listener is None or transport is None:
            return
        for to, frame in listener.frames_to_send():
            transport.reply(bytes.fromhex(to), encode(frame))
        for event in listener.events():
            node._on_event(event)

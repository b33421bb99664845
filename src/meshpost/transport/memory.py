"""An in-memory fake transport: nodes of one process exchange frames through a `MemoryNetwork`.

Rule: the same interface as `ZmqTransport` (`transport.base.Transport`), no sockets and no
threads. Frames are delivered on the event loop with `call_soon`, in order, so tests of
`Node` are fast and deterministic; a test can cut a link (`partition`) to drop frames.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Sequence

from meshpost.errors import TransportError
from meshpost.transport.base import DrainedHandler, InboundHandler, PeerFrameHandler
from meshpost.transport.security import KeyChanges


@dataclasses.dataclass
class MemoryNetwork:
    """Endpoints of one test's nodes, and which pairs of them can reach each other."""

    nodes: dict[str, MemoryTransport] = dataclasses.field(default_factory=dict)
    #: (from name, to name) pairs whose frames are dropped, both directions listed apart.
    cut: set[tuple[str, str]] = dataclasses.field(default_factory=set)
    #: Every frame offered: (from name, to name, payload), for tests to look at.
    log: list[tuple[str, str, bytes]] = dataclasses.field(default_factory=list)

    def transport(self, name: str) -> MemoryTransport:
        """A transport for node `name`, reachable at `memory://name`."""
        transport = MemoryTransport(self, name)
        self.nodes[name] = transport
        return transport

    def partition(self, a: str, b: str) -> None:
        """Drop every frame between `a` and `b` from now on."""
        self.cut |= {(a, b), (b, a)}

    def heal(self, a: str, b: str) -> None:
        self.cut -= {(a, b), (b, a)}

    def _deliver(self, sender: str, to: str, deliver: Callable[[], None]) -> bool:
        if (sender, to) in self.cut or to not in self.nodes:
            return False
        asyncio.get_running_loop().call_soon(deliver)
        return True


class MemoryTransport:
    """One node's end of a `MemoryNetwork`. Routing ids are the sender's name."""

    def __init__(self, network: MemoryNetwork, name: str) -> None:
        self.network = network
        self.name = name
        self.bound: list[str] = []
        self.peers: dict[str, str] = {}
        #: How often each peer was dialed (`add_peer`), for tests of lazy links.
        self.dials: dict[str, int] = {}
        self.dropped_sends = 0
        #: The fake has no connections to cap.
        self.inbound_refused = 0
        self.handshakes_failed = 0  # (no handshakes here)
        self.inbound_dropped = 0  # (frames here are never multipart, ids never long)
        self.denied_connections = 0  # (no keys, no handshakes)
        self.frames_from_revoked = 0  # (no keys to revoke)
        self._inbound_paused = False
        #: Inbound frames that came while paused or before `start` (ZeroMQ queues those too).
        self._held: list[tuple[bytes, bytes]] = []
        self._held_peer_frames: list[tuple[str, bytes]] = []
        self._on_inbound: InboundHandler | None = None
        self._on_peer_frame: PeerFrameHandler | None = None
        self._on_drained: DrainedHandler | None = None
        self.closed = False

    @property
    def secure(self) -> bool:
        return False

    @property
    def inbound_paused(self) -> bool:
        return self._inbound_paused

    def bind(self, endpoints: Sequence[str]) -> list[str]:
        self.bound = [f"memory://{self.name}"]
        return list(self.bound)

    def add_peer(self, peer: str, endpoint: str) -> None:
        self.peers[peer] = endpoint
        self.dials[peer] = self.dials.get(peer, 0) + 1

    def drop_peer(self, peer: str) -> None:
        """Forget the link to `peer` (idle): frames back from it are dropped from now on."""
        self.peers.pop(peer, None)

    def start(
        self, on_inbound: InboundHandler, on_peer_frame: PeerFrameHandler,
        on_drained: DrainedHandler | None = None,
    ) -> None:
        self._on_inbound, self._on_peer_frame = on_inbound, on_peer_frame
        self._on_drained = on_drained
        held, self._held_peer_frames = self._held_peer_frames, []
        for peer, payload in held:
            self._peer_frame(peer, payload)
        if not self._inbound_paused:
            self.resume_inbound()

    def send_to_peer(self, peer: str, payload: bytes) -> bool:
        """To `peer`'s inbound handler, as if its ROUTER received it from us."""
        if peer not in self.peers:  # no connection (an idle link): nothing to queue it on
            return False
        self.network.log.append((self.name, peer, payload))
        target = self.network.nodes.get(peer)
        if self.closed or target is None:
            self.dropped_sends += 1
            return False
        identity = self.name.encode()
        if not self.network._deliver(self.name, peer,
                                     lambda: target._inbound(identity, payload)):
            self.dropped_sends += 1
            return False
        return True

    def reply(self, identity: bytes, payload: bytes) -> bool:
        """Back to the node `identity` names, on its link to us."""
        peer = identity.decode()
        self.network.log.append((self.name, peer, payload))
        target = self.network.nodes.get(peer)
        if self.closed or target is None:
            self.dropped_sends += 1
            return False
        if not self.network._deliver(self.name, peer,
                                     lambda: target._peer_frame(self.name, payload)):
            self.dropped_sends += 1
            return False
        return True

    def handshake_failure(self, peer: str) -> str | None:
        return None  # no handshake below the protocol's own

    def redial(self, peer: str) -> None:
        pass  # an in-memory link cannot be left open but unread

    def set_peer_keys(self, peer_keys: dict[str, bytes]) -> KeyChanges:
        raise TransportError(f"{self.name} is an in-memory transport: it has no keys to set")

    def pause_inbound(self) -> None:
        self._inbound_paused = True

    def resume_inbound(self) -> None:
        self._inbound_paused = False
        held, self._held = self._held, []
        for identity, payload in held:
            self._inbound(identity, payload)

    def close(self) -> None:
        self.closed = True
        self.network.nodes.pop(self.name, None)

    def _inbound(self, identity: bytes, payload: bytes) -> None:
        if self.closed:
            return
        if self._inbound_paused or self._on_inbound is None:
            self._held.append((identity, payload))
            return
        try:
            self._on_inbound(identity, payload, None)
        finally:  # as the real transport: on_drained follows even a handler that raised
            if self._on_drained is not None:
                self._on_drained()

    def _peer_frame(self, peer: str, payload: bytes) -> None:
        if self.closed or peer not in self.peers:
            return
        if self._on_peer_frame is None:
            self._held_peer_frames.append((peer, payload))
            return
        try:
            self._on_peer_frame(peer, payload)
        finally:
            if self._on_drained is not None:
                self._on_drained()

    def __repr__(self) -> str:
        return f"MemoryTransport({self.name!r}, peers={sorted(self.peers)})"


__all__ = ["MemoryNetwork", "MemoryTransport"]

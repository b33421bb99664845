"""The seam between a node and its transport: what `Node` calls, as a `typing.Protocol`.

Rule: only the shape of the interface lives here (no sockets), so that a node can run on
`ZmqTransport` or on `MemoryNetwork`'s in-memory fake alike.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from meshpost.transport.security import KeyChanges

#: (routing identity, payload, authenticated user id or None) of a frame sent to our ROUTER.
InboundHandler = Callable[[bytes, bytes, "str | None"], None]
#: (peer name, payload) of a frame a peer sent back on our link to it.
PeerFrameHandler = Callable[[str, bytes], None]
#: Called after a batch of frames was handled: work they started can begin now.
DrainedHandler = Callable[[], None]


class Transport(Protocol):
    """Frames in and out for one node: one inbound endpoint, one outbound link per peer."""

    @property
    def secure(self) -> bool:
        """Whether inbound frames come with an authenticated user id."""
        ...

    @property
    def inbound_paused(self) -> bool: ...

    @property
    def dropped_sends(self) -> int:
        """Frames dropped because a queue was full (the protocol retransmits them)."""
        ...

    @property
    def inbound_refused(self) -> int:
        """Inbound connections shut down because the cap of open ones was reached."""
        ...

    @property
    def denied_connections(self) -> int:
        """Secure mode: clients refused at the handshake, their key not on the allowlist."""
        ...

    @property
    def handshakes_failed(self) -> int:
        """Inbound connections whose handshake failed before any frame (a keyless or PLAIN
        peer at a secure node and the reverse, a key not in authorized_keys, a key that is
        not this node's)."""
        ...

    @property
    def inbound_dropped(self) -> int:
        """Inbound frames dropped before the protocol saw them: not one part after the
        routing id, or from a connection whose routing id is over 255 bytes."""
        ...

    @property
    def frames_from_revoked(self) -> int:
        """Secure mode: inbound frames dropped because their connection's key was removed or
        changed by `set_peer_keys` since it was admitted."""
        ...

    def set_peer_keys(self, peer_keys: dict[str, bytes]) -> KeyChanges:
        """Secure mode: put `peer_keys` ({name: Z85 key}) in force for both directions at
        once (admitted keys, each frame's sender, the keys peers are dialled with); return
        what changed."""
        ...

    def bind(self, endpoints: Sequence[str]) -> list[str]:
        """Listen on `endpoints`; return them as bound (ports resolved)."""
        ...

    def add_peer(self, peer: str, endpoint: str) -> None:
        """Connect a link to `peer` (its socket); frames to it can be queued from now on."""
        ...

    def drop_peer(self, peer: str) -> None:
        """Close the link to `peer` (idle); frames already queued on it may still leave."""
        ...

    def start(
        self, on_inbound: InboundHandler, on_peer_frame: PeerFrameHandler,
        on_drained: DrainedHandler | None = None,
    ) -> None:
        """Deliver every frame from now on to the handlers, on the running event loop, and
        call `on_drained` after every callback that handled frames, before the loop's next
        turn (the node relies on it: what those frames added to its writer commits then)."""
        ...

    def send_to_peer(self, peer: str, payload: bytes) -> bool:
        """Queue `payload` on our link to `peer`; False if it was dropped (or the link has
        no connection)."""
        ...

    def reply(self, identity: bytes, payload: bytes) -> bool:
        """Send `payload` back to the inbound connection `identity`; False if dropped."""
        ...

    def handshake_failure(self, peer: str) -> str | None:
        """Why the last secure handshake with `peer` failed (None once one succeeds)."""
        ...

    def redial(self, peer: str) -> None:
        """Replace our link to `peer` by a new connection (it went silent)."""
        ...

    def pause_inbound(self) -> None: ...

    def resume_inbound(self) -> None: ...

    def close(self) -> None: ...


__all__ = ["DrainedHandler", "InboundHandler", "PeerFrameHandler", "Transport"]

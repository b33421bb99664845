"""meshpost: a brokerless messaging mesh.

Every message is acknowledged by its receiver after it is committed to the receiver's store,
stored exactly once on both nodes, and stamped with the sender's wall clock and a hybrid
logical clock.

The Python API: `async with Node(config) as node`, `await node.send(to, body)` (a `Receipt`),
`await node.post(target, body)` (`Outgoing` handles), `async for msg in node.messages()`
(`Message` records). README.md's "Python API" section shows them at work.

The public names below are imported on first use (module `__getattr__`), so that importing
any part of meshpost, or running `meshpost --help`, does not load ZeroMQ, SQLite and asyncio.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from meshpost.lazy import lazy_exports

if TYPE_CHECKING:
    from meshpost.config import MeshConfig, NodeConfig, PeerConfig
    from meshpost.errors import MeshpostError
    from meshpost.node import Message, Node, Outgoing, Receipt

__all__ = [
    "MeshConfig",
    "MeshpostError",
    "Message",
    "Node",
    "NodeConfig",
    "Outgoing",
    "PeerConfig",
    "Receipt",
]
__version__ = "0.1.0"

#: Public name -> the module that defines it (add a name here, to `__all__` and above).
_EXPORTS: dict[str, str] = {
    "MeshConfig": "meshpost.config",
    "MeshpostError": "meshpost.errors",
    "Message": "meshpost.node",
    "Node": "meshpost.node",
    "NodeConfig": "meshpost.config",
    "Outgoing": "meshpost.node",
    "PeerConfig": "meshpost.config",
    "Receipt": "meshpost.node",
}


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

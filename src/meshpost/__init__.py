"""meshpost: a brokerless messaging mesh.

Every message is acknowledged by its receiver after it is committed to the receiver's store,
stored exactly once on both nodes, and stamped with the sender's wall clock and a hybrid
logical clock.
"""

from meshpost.config import MeshConfig, NodeConfig, PeerConfig
from meshpost.errors import MeshpostError
from meshpost.node import Node, Receipt

__all__ = ["MeshConfig", "MeshpostError", "Node", "NodeConfig", "PeerConfig", "Receipt"]
__version__ = "0.1.0"

"""ZeroMQ transport: one ROUTER for everything peers send us, one DEALER per peer we send to.

`Transport` is the interface a node uses; `MemoryNetwork` gives in-memory fakes for tests."""

from meshpost.transport.base import Transport
from meshpost.transport.memory import MemoryNetwork, MemoryTransport
from meshpost.transport.zmq_transport import ZmqTransport

__all__ = ["MemoryNetwork", "MemoryTransport", "Transport", "ZmqTransport"]

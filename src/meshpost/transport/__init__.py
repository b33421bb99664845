"""ZeroMQ transport: one ROUTER for everything peers send us, one DEALER per peer we send to."""

from meshpost.transport.zmq_transport import ZmqTransport

__all__ = ["ZmqTransport"]

"""Trace points: the steps of a send that a probe can stamp (`meshpost bench send-timeline`).

Rule: this module imports nothing from meshpost. The node and its store writer call
`probe.mark(label)` at each step when a probe is given; without one (the default) each step
costs one `is None` test, so the hot path pays nothing measurable.
"""

from __future__ import annotations

from typing import Protocol


class Probe(Protocol):
    """Told each trace point as it passes; `mark` must be cheap and must not raise."""

    def mark(self, label: str) -> None: ...


# Labels end in "<" (a step begins) or ">" (it ends).
#: A frame from a peer's dealer reached our ROUTER / a frame came back on our own link.
INBOUND_FRAME = "router readable<"
PEER_FRAME = "dealer readable<"
LISTENER_RECEIVE = ("listener.receive<", "listener.receive>")
LISTENER_STORED = ("listener.stored<", "listener.stored>")
DIALER_RECEIVE = ("dialer.receive<", "dialer.receive>")
#: Handing one encoded frame to ZeroMQ (queueing it, waking its I/O thread); stamped by the
#: transport the node builds.
SEND = ("zmq send<", "zmq send>")
#: One `Store.apply`: a transaction of the group-commit writer.
COMMIT = ("commit<", "commit>")
WRITER_SUBMITS = "writer submits<"
OUTGOING_STORED = "outgoing stored<"
INCOMING_STORED = "incoming stored<"
DELIVERY_STORED = "delivery stored<"
# Events beside the steps (`meshpost.timeline` reads them as intervals, not steps of a send):
#: A WAL checkpoint on the store's checkpoint thread, and the writer's own catch-up copy.
CHECKPOINT = ("checkpoint<", "checkpoint>")
CATCH_UP = ("catch-up<", "catch-up>")
#: A batch handed to the writer thread rather than committed inline on the loop.
THREAD_COMMIT = "writer thread<"
#: A garbage collection (stamped by `MarkRecorder.track_gc`, not by the node).
GC = ("gc<", "gc>")

__all__ = [
    "CATCH_UP",
    "CHECKPOINT",
    "COMMIT",
    "DELIVERY_STORED",
    "DIALER_RECEIVE",
    "GC",
    "INBOUND_FRAME",
    "INCOMING_STORED",
    "LISTENER_RECEIVE",
    "LISTENER_STORED",
    "OUTGOING_STORED",
    "PEER_FRAME",
    "SEND",
    "THREAD_COMMIT",
    "WRITER_SUBMITS",
    "Probe",
]

"""A cap on the connections a node's ROUTER accepts, kept through libzmq's socket monitor.

Rule: libzmq accepts every connection by itself and has no option limiting how many; this
module counts ACCEPTED against DISCONNECTED/CLOSED events in a thread of its own (so a busy
event loop cannot delay it) and shuts down each connection accepted beyond the cap. It never
closes a descriptor (libzmq owns them) and never touches a connection accepted under the cap.
It also counts and logs the ZMTP handshakes that fail on the ROUTER (a keyless or PLAIN peer
at a --secure node and the reverse, an unknown CURVE key, a box the node's key cannot open):
libzmq tells only the monitor, and a refusal nobody can see is no clear refusal.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

log = logging.getLogger(__name__)

#: Descriptors left to the node itself whatever the cap: store and WAL, log, the DEALERs to
#: its peers and their ZeroMQ mailboxes, the control socket and its clients.
FD_HEADROOM = 64
#: Smallest and largest default cap (a mesh of thousands of peers sets its own).
MIN_INBOUND_CAP = 8
MAX_DEFAULT_INBOUND_CAP = 4096
#: A refusal is logged at most this often (a flood would otherwise flood the log too).
LOG_EVERY_S = 10.0
#: Monitor events queued for the guard's thread; libzmq's own default (1,000) is too few for
#: a burst of connections accepted and closed again.
MONITOR_RCVHWM = 100_000
#: The thread wakes on events, and on MONITOR_STOPPED when closed; this poll is only a safety
#: net (an idle guard of each of a host's hundreds of nodes must not wake 10 times a second).
_POLL_MS = 5_000
#: How long `close()` waits for the thread (it wakes on MONITOR_STOPPED at once).
_JOIN_S = 0.5
#: Refusals or drops of one kind logged one by one before they are only summed up
#: (`PacedCount`: then a line per LOG_EVERY_S).
LOG_BURST = 20
_HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                     | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
_EVENTS = (zmq.EVENT_LISTENING | zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED
           | zmq.EVENT_CLOSED | zmq.EVENT_MONITOR_STOPPED | _HANDSHAKE_FAILED)


class PacedCount:
    """Refusals or drops of one kind: counted, and logged LOG_BURST at once, then a line every
    LOG_EVERY_S saying how many went unlogged since (a flood of them was a line each: tens of
    bytes of log for a few bytes, or one reconnection, of a stranger's)."""

    __slots__ = ("_logged_at", "_unlogged", "count")

    def __init__(self) -> None:
        self.count = 0
        self._unlogged = 0
        self._logged_at = -LOG_EVERY_S

    def add(self) -> str | None:
        """Count one; None if it is not to be logged now, else the end of its log line: ""
        or ", and N more since the last such line"."""
        self.count += 1
        now = time.monotonic()
        if self.count <= LOG_BURST or now - self._logged_at >= LOG_EVERY_S:
            tail = (f", and {self._unlogged} more since the last such line"
                    if self._unlogged else "")
            self._unlogged, self._logged_at = 0, now
            return tail
        self._unlogged += 1
        return None


def handshake_failure(kind: int, value: int, *, secure: bool) -> str:
    """What a failed handshake on a node's ROUTER means, in a user's words (`kind`, `value`:
    the monitor event's; `secure`: the node runs --secure). A key ZAP denied is not one of
    them: the transport logs it with the key (`denied_connections`)."""
    if kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        if value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
            return ("a peer without CURVE (a keyless or PLAIN one): this node runs --secure"
                    if secure else
                    "a peer asking for CURVE or PLAIN: this node runs without --secure")
        if value == zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC:
            return ("a CURVE client whose box this node's key cannot open: it holds another "
                    "public key for this node (a stale line, or this node made a new key)")
        return f"a ZMTP handshake that broke the protocol (error {value:#x})"
    # No detail: the peer hung up first (a libzmq peer closes as soon as it sees a mechanism
    # or a key it cannot use, so which side tells depends on who reads first).
    if secure:
        return (f"a connection that ended in its handshake ({os.strerror(value)}): a peer "
                "without CURVE, or holding another public key for this node, hangs up so")
    return (f"a connection that ended in its handshake ({os.strerror(value)}): a peer asking "
            "for CURVE or PLAIN hangs up so")


def default_inbound_cap(fd_limit: int) -> int:
    """Half of the descriptors the limit leaves beyond the node's own headroom: the other
    half absorbs connections accepted in a burst before the guard has shut them down."""
    return max(MIN_INBOUND_CAP, min(MAX_DEFAULT_INBOUND_CAP, (fd_limit - FD_HEADROOM) // 2))


def _local_key(sock: socket.socket) -> object:
    """What an accepted connection shares with its listener: the port (TCP), the path (ipc)."""
    name = sock.getsockname()
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        return ("port", name[1])
    return name


class InboundGuard:
    """Counts a ROUTER's inbound connections and shuts down those beyond `cap`.

    Create it before the socket binds (its LISTENING events name the listeners); `close()` it
    before closing the socket."""

    def __init__(self, context: zmq.Context[Any], router: zmq.Socket[bytes], *,
                 cap: int, name: str, secure: bool = False) -> None:
        self.cap = cap
        self.name = name
        self.secure = secure
        #: Connections shut down because the cap was reached.
        self.refused = 0
        #: Inbound connections whose ZMTP (or CURVE) handshake failed: no frame of theirs
        #: ever reaches the node.
        self.handshakes_failed = 0
        #: Per kind of failure (what it means), its count and its log's pace.
        self._failures: dict[str, PacedCount] = {}
        self._router = router
        self._fds: set[int] = set()
        self._listeners: set[object] = set()
        self._logged_at = 0.0
        self._unlogged = 0
        address = f"inproc://meshpost-inbound-{name}-{id(router)}"
        router.monitor(address, _EVENTS)
        self._monitor: zmq.Socket[bytes] = zmq.Socket(context, zmq.PAIR)
        self._monitor.setsockopt(zmq.RCVHWM, MONITOR_RCVHWM)
        self._monitor.setsockopt(zmq.LINGER, 0)
        self._monitor.connect(address)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"meshpost-inbound-{name}",
                                        daemon=True)
        self._thread.start()

    @property
    def open(self) -> int:
        """Inbound connections open now (as far as the monitor has told)."""
        return len(self._fds)

    def _run(self) -> None:
        monitor = self._monitor
        try:
            while not self._stop.is_set():
                if not monitor.poll(_POLL_MS):
                    continue
                while True:
                    try:
                        event = recv_monitor_message(monitor, zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    if event["event"] == zmq.EVENT_MONITOR_STOPPED:
                        return
                    self._handle(event["event"], event["value"])
        except zmq.ZMQError as exc:  # the context went away under us
            if not self._stop.is_set():
                log.warning("[%s] inbound connection guard stopped: %s", self.name, exc)
        finally:
            monitor.close(0)

    def _handle(self, kind: int, fd: int) -> None:
        if kind == zmq.EVENT_LISTENING:
            with contextlib.suppress(OSError):
                sock = socket.socket(fileno=fd)
                try:
                    self._listeners.add(_local_key(sock))
                finally:
                    sock.detach()
        elif kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            # Counted only: the transport logs each denied key itself (`denied_connections`).
            self.handshakes_failed += 1
        elif kind & _HANDSHAKE_FAILED:
            self._handshake_failed(handshake_failure(kind, fd, secure=self.secure))
        elif kind == zmq.EVENT_ACCEPTED:
            if len(self._fds) < self.cap:
                self._fds.add(fd)
            else:
                self._refuse(fd)
        else:  # DISCONNECTED or CLOSED
            self._fds.discard(fd)

    def _handshake_failed(self, why: str) -> None:
        """Count one, and log it at its kind's pace (a peer may reconnect as fast as it
        likes)."""
        self.handshakes_failed += 1
        tail = self._failures.setdefault(why, PacedCount()).add()
        if tail is not None:
            log.warning("[%s] refused an inbound connection: %s%s", self.name, why, tail)

    def _refuse(self, fd: int) -> None:
        """Shut down the connection on `fd`; libzmq then closes it as if the peer had left."""
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            return  # already closed: nothing to refuse
        try:
            # By the time the event is read the descriptor may have been closed and its number
            # reused: act only on a connection to one of our own listeners.
            if _local_key(sock) not in self._listeners:
                return
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            return
        finally:
            sock.detach()
        self.refused += 1
        self._unlogged += 1
        now = time.monotonic()
        if now - self._logged_at >= LOG_EVERY_S:
            log.warning(
                "[%s] refused %d inbound connection(s): %d open, the cap is %d "
                "(max_inbound_connections; raise it, or the descriptor limit, if these are "
                "real peers)", self.name, self._unlogged, len(self._fds), self.cap)
            self._logged_at, self._unlogged = now, 0

    def close(self) -> None:
        """Stop watching: the monitor's MONITOR_STOPPED wakes the thread, which ends."""
        self._stop.set()
        with contextlib.suppress(zmq.ZMQError):
            self._router.disable_monitor()
        self._thread.join(timeout=_JOIN_S)

    def __repr__(self) -> str:
        return (f"InboundGuard({self.name}, open={self.open}, cap={self.cap}, "
                f"refused={self.refused})")

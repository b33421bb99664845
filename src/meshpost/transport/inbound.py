"""A cap on the connections a node's ROUTER accepts, kept through libzmq's socket monitor.

Rule: libzmq accepts every connection by itself and has no option limiting how many; this
module counts ACCEPTED against DISCONNECTED/CLOSED events in a thread of its own (so a busy
event loop cannot delay it) and shuts down each connection accepted beyond the cap. It never
closes a descriptor (libzmq owns them) and never touches a connection accepted under the cap.
"""

from __future__ import annotations

import contextlib
import logging
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
_EVENTS = (zmq.EVENT_LISTENING | zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED
           | zmq.EVENT_CLOSED | zmq.EVENT_MONITOR_STOPPED)


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
                 cap: int, name: str) -> None:
        self.cap = cap
        self.name = name
        #: Connections shut down because the cap was reached.
        self.refused = 0
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
        elif kind == zmq.EVENT_ACCEPTED:
            if len(self._fds) < self.cap:
                self._fds.add(fd)
            else:
                self._refuse(fd)
        else:  # DISCONNECTED or CLOSED
            self._fds.discard(fd)

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

"""pyzmq sockets on the asyncio loop, with the options a reliable mesh needs.

Rule: bytes in, bytes out. This module knows endpoints, identities and socket options, nothing
about frames or storage. A successful send only means *queued*: the protocol above must never
rely on delivery, so every send here is non-blocking and reports back-pressure as `False`.

Frames are handed to the node's handlers straight from the event loop's reader callback on the
socket's ZMQ_FD, drained until the socket is empty: no future, no task wake-up per frame. (That
is what `zmq.asyncio` does per `recv`, and on a 2-core machine its extra trips round the loop
cost about 50 us per hop.) ZMQ_FD is edge-triggered and any send may consume the edge, so every
send looks at the socket once more: at the end of the drain it was made in (a reply to what
was just read), else at once, through ZMQ_EVENTS (`_look_after_send`). A drain reads at once
(the descriptor fired: a frame almost always waits), then while ZMQ_EVENTS says POLLIN;
reading ZMQ_EVENTS processes the socket's pending commands, which re-arms ZMQ_FD. (It is
read straight from libzmq, `_events_reader`: about 4,500 instructions, against 9,000 through
pyzmq's `get` and five times that for a recv that ends in `zmq.Again`, whose exception
object is built in Python.) Frames are read part by part: `recv_multipart` asks ZMQ_RCVMORE
after every part. Sockets are read and written through pyzmq's backend methods (`_RECV`,
`_SEND`): the sugar class's `send` is a Python wrapper around them, and its `__getattr__`
makes every attribute lookup on a socket a slow one (which is also why the per-frame path
never asks `sock.closed`: the transport knows which of its sockets are open). A frame to
the ROUTER: its identity is read as bytes (1.2 against 2.9 us for a `zmq.Frame`), its
payload as a `zmq.Frame`, which carries ZMQ_RCVMORE (and, in secure mode, the `User-Id`):
asking the socket for ZMQ_RCVMORE cost more than the frame object.

Socket choices (the ZeroMQ traps the protocol designs around):
- ROUTER_MANDATORY: a reply to an unknown or vanished peer raises instead of vanishing silently;
- the ROUTER's generated routing ids start where no peer can tell (`routing_ids`): libzmq's
  start the same in every process, and a peer that named its connection after the next one
  would abort the process at the next ordinary connection;
- routing ids are per connection and chosen by our ROUTER, never by the peer (no
  ROUTING_ID on our DEALERs, no ROUTER_HANDOVER): a peer that names its connection after
  another peer would otherwise take that peer's connection over before we read a frame. Who
  a connection is comes from the CURVE key (`User-Id`) or the protocol's Hello, per connection;
- no ZMTP heartbeats: with libzmq 4.3.5 a heartbeat timer firing on a connection the peer
  closed while our input pipe was full aborts the whole process (`!_io_error`, libzmq issues
  4364/4767; reproduced by tests/integration/faults/test_04_sigstop.py). Liveness is the
  protocol's own Ping/peer timeout, and TCP keepalive clears half-open connections the kernel
  would otherwise keep forever (ZeroMQ then reconnects by itself). A link still lost a peer
  timeout after the protocol found it silent, its Hellos unanswered (`RedialWanted`), is
  redialled on a *new* DEALER (`redial`): `disconnect()` + `connect()` on the same socket
  races in libzmq and can leave it with no connection at all;
- bounded LINGER, SNDHWM and MAXMSGSIZE: shutdown never hangs, what waits to be sent stays
  bounded, an oversized frame closes the offending connection before it is read into memory;
- no receive high-water mark (RCVHWM 0): with one, a peer that filled its connection's pipe
  and reset it could abort the node (a ZMTP PING left in the read buffer) or leave a
  connection nobody cleans up (see `RCVHWM`); peers' windows bound what they queue to us;
- HANDSHAKE_IVL of 5 s (libzmq's default is 30 s) and the soft RLIMIT_NOFILE raised to the
  hard limit: idle or half-open connections, which hold a descriptor each before any CURVE
  check, are dropped sooner and need far more of them to run the process out of descriptors
  (libzmq asserts when an accept on an ipc listener, such as the control socket, hits EMFILE);
- inbound connections capped (`inbound.InboundGuard`, from the ROUTER's socket monitor): one
  accepted beyond the cap is shut down at once, so idle connections cannot take the
  descriptors the node's own sockets need;
- frames of a connection whose routing id is over 255 bytes (ZMTP's bound; libzmq takes a
  peer's id of any length) are dropped before the node names the connection by it;
- secure mode: a frame is taken only while the authorized_keys line that admitted its
  connection (its `User-Id`) is in force, so a reload (`set_peer_keys`) cuts a removed or
  replaced key's open connections without closing them (a ROUTER cannot close one peer's);
  and a peer that refused our key (ZAP 400) is redialled by us, as libzmq never does.
Left to libzmq 4.3.5 (tests/integration/adversarial/test_zmtp_attacks.py, a strict xfail):
the parts of a message that never ends are queued without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import functools
import logging
import os
import resource
import sys
from collections.abc import Callable, Sequence
from typing import TypeVar, cast

import zmq
import zmq.asyncio
from zmq.utils.monitor import recv_monitor_message

import meshpost.probes as probes
from meshpost.errors import EndpointInUse, InvalidEndpoint, TransportError
from meshpost.transport.inbound import InboundGuard, PacedCount, default_inbound_cap
from meshpost.transport.ipc import IpcPathLock, check_ipc_path_free, ipc_path, missing_folder
from meshpost.transport.routing_ids import unpredictable_routing_ids
from meshpost.transport.security import ZAP_DOMAIN, KeyChanges, MeshAuthenticator, user_id

log = logging.getLogger(__name__)

#: Longest routing id a frame may come with: ZMTP's bound for the Identity property, and all
#: a libzmq socket can set (ZMQ_ROUTING_ID). libzmq's ROUTER takes any length from the wire,
#: up to MAXMSGSIZE; the node names a connection by its id, so a megabyte-long one made each
#: log line about it two megabytes. Frames of such a connection are dropped and counted.
MAX_ROUTING_ID_BYTES = 255

#: Pending frames per socket to send; a frame carries up to hundreds of messages, so this is
#: plenty, and frames beyond it are dropped (and retransmitted later) rather than buffered.
SNDHWM = 256
#: No receive high-water mark (0): with libzmq 4.3.5 a connection's full input pipe is how a
#: peer stops or kills the node. A full pipe stops the engine's input with its read buffer
#: half decoded; a reset then only marks it `_io_error`, and a ZMTP PING left in the buffer
#: aborts the process when the node reads on (`out_event`'s assertion); a connection under a
#: routing id in use is never read, so after a reset it was never cleaned up and held a
#: place under the inbound cap for good (tests/integration/adversarial/test_zmtp_attacks.py).
#: What a peer has queued to us is bounded by its window (`window`/`window_bytes` a link)
#: instead; a stranger's flood can grow the queue, as libzmq lets the parts of one endless
#: message do anyway (docs/reliability.md, "Hostile peers").
RCVHWM = 0
#: On close, give queued frames this long to leave; lost ones are retransmitted after restart.
LINGER_MS = 200
#: TCP keepalive: probe after 10 s idle, every 5 s, give up after 3 misses (about 25 s).
TCP_KEEPALIVE_IDLE_S = 10
TCP_KEEPALIVE_INTVL_S = 5
TCP_KEEPALIVE_CNT = 3
RECONNECT_IVL_MS = 100
#: A connection that has not completed its ZMTP (and CURVE) handshake within this is closed.
HANDSHAKE_IVL_MS = 5_000
#: Ceiling for the raised descriptor limit when the hard limit is "unlimited".
FD_LIMIT_CEILING = 1 << 20
RECONNECT_IVL_MAX_MS = 1000
#: Secure mode: a peer that refused our key (ZAP status 400) is dialled again after this,
#: doubling per refusal up to AUTH_REDIAL_MAX_S. libzmq never dials again after a 400, and the
#: peer may list our key later without a restart (`meshpost keys reload`); a handshake every
#: 10 s costs it nothing it would notice.
AUTH_REDIAL_INITIAL_S = 1.0
AUTH_REDIAL_MAX_S = 10.0
#: Lines a reload took away, remembered only to tell them in the log from lines never listed
#: (a forged `User-Id`); the oldest are forgotten past this.
RETIRED_LINES_KEPT = 1024
#: Frames handled per reader callback before other callbacks get a turn (timers, other peers).
DRAIN_BUDGET = 64
#: Payload bytes the ROUTER's drain handles before the others get a turn (at least one frame
#: is). Frames alone were no bound for big ones: 64 of the largest (3 MiB) were 192 MiB of
#: copying and decoding, about 0.1-0.4 s, between two turns of every other socket and timer,
#: which in a host process are the other nodes' (benchmarks/hosted_flood.py). The ROUTER is
#: where anyone's frames come in; a DEALER reads what the listener it dialled sends back.
DRAIN_BYTES_BUDGET = 1 << 20

#: (routing identity, payload, CURVE user id or None) of a frame sent to our ROUTER.
InboundHandler = Callable[[bytes, bytes, "str | None"], None]
#: (peer name, payload) of a frame a peer sent back on our DEALER to it.
PeerFrameHandler = Callable[[str, bytes], None]
#: Called after a reader callback handled its frames: work they started can begin now,
#: instead of at the next trip round the loop.
DrainedHandler = Callable[[], None]


# Plain ints: pyzmq's constants are enum flags, and enum arithmetic costs microseconds per
# call on the per-frame path.
_NOBLOCK, _SNDMORE = int(zmq.NOBLOCK), int(zmq.SNDMORE)
_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)
#: The socket's own methods, from pyzmq's backend class that `zmq.Socket` derives from
#: (see the module's doc for why).
_RECV = zmq.backend.Socket.recv
_SEND = zmq.backend.Socket.send
#: Typed once here rather than with `typing.cast` at each call (a Python call per look).
_GET = cast("Callable[[zmq.Socket[bytes], int], int]", zmq.backend.Socket.get)
#: libzmq's `zmq_getsockopt` and `zmq_errno`, from the library pyzmq's backend is linked to
#: (the same one, already loaded), or None if it does not export them. ZMQ_EVENTS is read
#: through it (`_events_reader`): 4,500 instructions a look against 9,000 for pyzmq's `get`,
#: which makes a `SocketOption` enum of the option and compares three `_OptType` members
#: (Python code) at every call; a side looks twice a send (callgrind, 10,000 looks).
_ZMQ_GETSOCKOPT: Callable[..., int] | None
_ZMQ_ERRNO: Callable[[], int] | None
try:
    # The extension module of the backend's Socket class, linked to libzmq.
    _LIBZMQ = ctypes.CDLL(sys.modules[zmq.backend.Socket.__module__].__file__)
    _ZMQ_GETSOCKOPT, _ZMQ_ERRNO = _LIBZMQ.zmq_getsockopt, _LIBZMQ.zmq_errno
except (AttributeError, KeyError, OSError, TypeError):  # another backend, no such symbols
    _ZMQ_GETSOCKOPT = _ZMQ_ERRNO = None
#: The value and size buffers of every look (only the loop's thread looks), passed by
#: reference objects made once.
_EVENTS_VALUE, _EVENTS_SIZE = ctypes.c_int(), ctypes.c_size_t(ctypes.sizeof(ctypes.c_int))
_EVENTS_VALUE_REF, _EVENTS_SIZE_REF = ctypes.byref(_EVENTS_VALUE), ctypes.byref(_EVENTS_SIZE)
#: Payloads at least this large are sent without a copy (ZeroMQ's zero-copy costs more for
#: small ones than copying them does).
_ZERO_COPY_BYTES = 65536

_T = TypeVar("_T")


_HANDSHAKE_EVENTS = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)


def _events_reader(sock: zmq.Socket[bytes], direct: bool) -> Callable[[], int]:
    """A function reading `sock`'s ZMQ_EVENTS, raising `zmq.ZMQError` if that fails.
    `direct`: straight from libzmq on the socket's handle, which is only safe while the socket
    is open: pyzmq checks that, libzmq cannot (a closed socket's memory is freed), so the
    transport forgets a socket's reader before it closes it and owns the context (nobody else
    can destroy it and close its sockets meanwhile)."""
    getsockopt = _ZMQ_GETSOCKOPT
    if not direct or getsockopt is None:
        return functools.partial(_GET, sock, _EVENTS)
    handle = ctypes.c_void_p(sock.underlying)

    def events() -> int:
        if getsockopt(handle, _EVENTS, _EVENTS_VALUE_REF, _EVENTS_SIZE_REF):
            assert _ZMQ_ERRNO is not None
            raise zmq.ZMQError(_ZMQ_ERRNO())
        return _EVENTS_VALUE.value

    return events


def _handshake_failure_reason(kind: int, value: int, name: str) -> str:
    """A user's words for a failed CURVE handshake of node `name`, from libzmq's monitor
    event."""
    if kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return (f"handshake refused (ZAP status {value}): the peer does not accept this node's "
                f"key; add the line of `meshpost keys show --node {name}` (run where {name} "
                "keeps its data) to its authorized_keys")
    if kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        return (f"handshake failed (protocol error {value:#x}): the peer's key is not the one in "
                "this node's authorized_keys, or the peer is not in secure mode")
    # No detail: the peer hung up in the handshake, which is what a CURVE server does with a
    # client whose box its key cannot open (we hold another key for it), and a keyless one
    # with any CURVE client.
    return (f"handshake failed ({os.strerror(value)}: the peer hung up): the peer's key is "
            "not the one in this node's authorized_keys, or the peer is not in secure mode")


def _names_by_user_id(peer_keys: dict[str, bytes]) -> dict[str, str]:
    """{`User-Id` of a connection admitted by the line (`NAME Z85KEY`): NAME} of `peer_keys`."""
    return {user_id(name, key): name for name, key in peer_keys.items()}


def raise_fd_limit() -> tuple[int, int]:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit; return (before, after).
    Idempotent; a limit that cannot be raised is left as it is."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = FD_LIMIT_CEILING if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            log.warning("could not raise the descriptor limit from %d to %d", soft, target)
            return soft, soft
        return soft, target
    return soft, soft


class ZmqTransport:
    """All ZeroMQ sockets of one node."""

    def __init__(
        self,
        *,
        name: str,
        max_frame_bytes: int,
        context: zmq.asyncio.Context | None = None,
        curve_secret_key: bytes | None = None,
        curve_public_key: bytes | None = None,
        peer_public_keys: dict[str, bytes] | None = None,
        probe: probes.Probe | None = None,
        max_inbound_connections: int | None = None,
    ) -> None:
        """`probe` (`meshpost.probes`) is told when each frame is handed to ZeroMQ;
        `max_inbound_connections` caps the connections the ROUTER keeps (None: derived from
        the descriptor limit, `inbound.default_inbound_cap`)."""
        self.name = name
        self._probe = probe
        self.max_frame_bytes = max_frame_bytes
        self._own_context = context is None
        self.context = context or zmq.asyncio.Context()
        self._curve_secret = curve_secret_key
        #: Whether inbound frames come with an authenticated user id: a plain attribute, not a
        #: property (the node asks at every inbound frame; a property is a Python call).
        self.secure = curve_secret_key is not None
        self._curve_public = curve_public_key
        self._peer_keys = dict(peer_public_keys or {})
        #: Secure mode: the name of each line in force, by the `User-Id` a connection admitted
        #: by it has (`NAME Z85KEY`): every inbound frame is looked up here (`_recv_router`).
        self._names_by_user_id = _names_by_user_id(self._peer_keys)
        #: `User-Id`s of the lines `set_peer_keys` took away (an ordered set, for the log).
        self._retired: dict[str, None] = {}
        #: Frames read from a connection admitted under a key no longer in force.
        self._revoked = PacedCount()
        #: Secure mode: peers whose key is not (or no longer) listed: wanted (an endpoint),
        #: never dialled until a reload lists a key for them again.
        self._keyless: set[str] = set()
        #: Peers that refused our key (ZAP 400): refusals in a row, and the timed redial.
        self._auth_refusals: dict[str, int] = {}
        self._auth_redials: dict[str, asyncio.TimerHandle] = {}
        #: The ZMQ_EVENTS reader of each open socket we read (`_events_reader`), forgotten
        #: before the socket is closed: a socket without one is closed.
        self._looks: dict[zmq.Socket[bytes], Callable[[], int]] = {}
        unpredictable_routing_ids()  # before the ROUTER: see transport/routing_ids.py
        self._router = self._socket(zmq.ROUTER)
        self._looks[self._router] = _events_reader(self._router, self._own_context)
        self._router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._router.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_IVL_MS)
        self.fd_limit = raise_fd_limit()[1]
        self._router.setsockopt(zmq.MAXMSGSIZE, max_frame_bytes)
        self._authenticator: MeshAuthenticator | None = None
        #: Secure mode: CURVE clients whose key is not on the allowlist, refused at the
        #: handshake (logged like the multipart ones: a line each was about 130 bytes a
        #: handshake, 470 a second from one client making up keys; a host's log is every
        #: node's).
        self._denied = PacedCount()
        if self.secure:
            # Authenticator first, then CURVE on the socket, and ZAP_ENFORCE_DOMAIN so that a
            # missing or dead authenticator means no traffic at all (fail closed).
            self._authenticator = MeshAuthenticator(self.context, self._peer_keys,
                                                     on_denied=self._denied_key)
            self._authenticator.start()
            self._router.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
            self._router.setsockopt(zmq.CURVE_SERVER, 1)
            assert curve_secret_key is not None
            self._router.setsockopt(zmq.CURVE_SECRETKEY, curve_secret_key)
            self._router.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN.encode())
        self._dealers: dict[str, zmq.Socket[bytes]] = {}
        #: Secure mode: each DEALER's socket monitor, and the last handshake failure it told
        #: (libzmq says why a CURVE handshake failed only there; the dealer just stays silent).
        self._monitors: dict[str, zmq.Socket[bytes]] = {}
        self._handshake_failures: dict[str, str] = {}
        self._endpoints: dict[str, str] = {}
        #: Reader fd of each peer's DEALER, so that `redial` can stop watching the old one.
        self._dealer_fds: dict[str, int] = {}
        self.redials = 0
        self._monitor_fds: dict[str, int] = {}
        self._dealer_drains: dict[str, Callable[[], None]] = {}
        self.bound: list[str] = []
        #: The ipc paths bound, each held under its lock until `close` (`transport.ipc`).
        self._ipc_locks: list[IpcPathLock] = []
        self.dropped_sends = 0
        #: Messages of more than two parts dropped at the ROUTER (`multipart_dropped`).
        self._multipart = PacedCount()
        #: Frames dropped because their connection's routing id is over MAX_ROUTING_ID_BYTES
        #: (logged like the multipart ones, without the id).
        self._long_id = PacedCount()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_inbound: InboundHandler | None = None
        self._on_peer_frame: PeerFrameHandler | None = None
        self._on_drained: DrainedHandler | None = None
        self._inbound_paused = False
        #: Sockets with a drain already scheduled by `call_soon` (keyed by id of the socket).
        self._drain_scheduled: set[int] = set()
        #: The socket whose drain is running, and whether something was sent on it meanwhile
        #: (so that drain looks at it once more before it returns).
        self._draining: zmq.Socket[bytes] | None = None
        self._sent_while_draining = False
        #: Payload bytes the running drain has read from the ROUTER (DRAIN_BYTES_BUDGET).
        self._drained_bytes = 0
        self._readers: list[int] = []
        # Last (nothing after it can fail) and before any bind: the guard learns the
        # listeners from their LISTENING events.
        self._inbound = InboundGuard(
            self.context, self._router, name=name, secure=self.secure,
            cap=max_inbound_connections or default_inbound_cap(self.fd_limit))

    def _socket(self, kind: int) -> zmq.Socket[bytes]:
        # A plain socket on the shared context: the loop watches its ZMQ_FD (see module doc).
        sock: zmq.Socket[bytes] = zmq.Socket(self.context, kind)
        sock.setsockopt(zmq.LINGER, LINGER_MS)
        sock.setsockopt(zmq.SNDHWM, SNDHWM)
        sock.setsockopt(zmq.RCVHWM, RCVHWM)
        sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
        sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, TCP_KEEPALIVE_IDLE_S)
        sock.setsockopt(zmq.TCP_KEEPALIVE_INTVL, TCP_KEEPALIVE_INTVL_S)
        sock.setsockopt(zmq.TCP_KEEPALIVE_CNT, TCP_KEEPALIVE_CNT)
        return sock

    # -- inbound --------------------------------------------------------------------------

    def bind(self, endpoints: Sequence[str]) -> list[str]:
        """Bind every endpoint; return them with wildcard ports resolved."""
        for endpoint in endpoints:
            # Under the path's lock, held until close: two nodes starting on one ipc path at
            # once cannot both find it free and the later bind take it from the earlier.
            lock = IpcPathLock.acquire(endpoint)
            try:
                check_ipc_path_free(endpoint)
                self._bind(endpoint)
            except BaseException:
                if lock is not None:
                    lock.release(remove_socket=False)
                raise
            if lock is not None:
                self._ipc_locks.append(lock)
        return list(self.bound)

    def _bind(self, endpoint: str) -> None:
        try:
            self._router.bind(endpoint)
        except zmq.ZMQError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise EndpointInUse(endpoint, exc.strerror) from None
            if exc.errno == errno.ENOENT and endpoint.startswith("ipc://"):
                # The folder vanished between the check and the bind.
                raise InvalidEndpoint(endpoint, missing_folder(endpoint)) from None
            if exc.errno in (errno.EINVAL, errno.EPROTONOSUPPORT, errno.ENODEV):
                raise InvalidEndpoint(endpoint, exc.strerror) from None
            raise TransportError(f"cannot bind {endpoint}: {exc.strerror}") from None
        actual = self._router.getsockopt(zmq.LAST_ENDPOINT)
        assert isinstance(actual, bytes)
        self.bound.append(actual.decode())

    def start(
        self,
        on_inbound: InboundHandler,
        on_peer_frame: PeerFrameHandler,
        on_drained: DrainedHandler | None = None,
    ) -> None:
        """Deliver every frame from now on to the handlers, from the running event loop."""
        self._loop = asyncio.get_running_loop()
        self._on_inbound = on_inbound
        self._on_peer_frame = on_peer_frame
        self._on_drained = on_drained
        self._watch(self._router, self._drain_router)
        for peer, sock in self._dealers.items():
            self._watch_dealer(peer, sock)

    @property
    def inbound_paused(self) -> bool:
        return self._inbound_paused

    def pause_inbound(self) -> None:
        """Stop reading frames sent to us (back-pressure); ZeroMQ queues them meanwhile."""
        self._inbound_paused = True

    def resume_inbound(self) -> None:
        self._inbound_paused = False
        self._schedule_drain(self._router, self._drain_router)

    def _watch(self, sock: zmq.Socket[bytes], drain: Callable[[], None]) -> int:
        assert self._loop is not None
        fd = cast("int", sock.getsockopt(zmq.FD))
        self._loop.add_reader(fd, drain)
        self._readers.append(fd)
        # Frames may have arrived before the loop watched the descriptor: look once now.
        self._schedule_drain(sock, drain)
        return fd

    def _watch_dealer(self, peer: str, sock: zmq.Socket[bytes]) -> None:
        self._dealer_fds[peer] = self._watch(sock, self._dealer_drain(peer))
        monitor = self._monitors.get(peer)
        if monitor is not None:
            self._monitor_fds[peer] = self._watch(
                monitor, lambda: self._drain_monitor(peer, monitor))

    def handshake_failure(self, peer: str) -> str | None:
        """Why the last secure handshake with `peer` failed (None once one succeeds)."""
        return self._handshake_failures.get(peer)

    def _drain_monitor(self, peer: str, monitor: zmq.Socket[bytes]) -> None:
        while True:
            try:
                event = recv_monitor_message(monitor, _NOBLOCK)
            except zmq.ZMQError:
                return
            kind, value = event["event"], event["value"]
            if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._handshake_failures.pop(peer, None)
                self._auth_refusals.pop(peer, None)
                continue
            reason = _handshake_failure_reason(kind, value, self.name)
            if reason != self._handshake_failures.get(peer):
                log.warning("[%s] secure handshake with %s failed: %s", self.name, peer, reason)
            self._handshake_failures[peer] = reason
            if kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                self._redial_after_refusal(peer)

    def _redial_after_refusal(self, peer: str) -> None:
        """`peer` refused our key (ZAP 400), after which libzmq never dials again: redial
        on a new DEALER after AUTH_REDIAL_INITIAL_S, doubling per refusal in a row up to
        AUTH_REDIAL_MAX_S, so that a peer that lists our key later (a reload) hears from us.
        """
        sock = self._dealers.get(peer)
        if self._loop is None or sock is None or peer in self._auth_redials:
            return
        refusals = self._auth_refusals.get(peer, 0)
        self._auth_refusals[peer] = refusals + 1
        delay_s = min(AUTH_REDIAL_MAX_S, AUTH_REDIAL_INITIAL_S * 2 ** min(refusals, 16))

        def redial() -> None:
            self._auth_redials.pop(peer, None)
            if self._dealers.get(peer) is sock:  # not dropped or redialled meanwhile
                self.redial(peer)

        self._auth_redials[peer] = self._loop.call_later(delay_s, redial)

    def _dealer_drain(self, peer: str) -> Callable[[], None]:
        """The drain callback of `peer`'s DEALER, made once (sends schedule it often), with
        its receive and handle steps."""
        drain = self._dealer_drains.get(peer)
        if drain is None:
            sock = self._dealers[peer]
            # (A partial of the backend's method: no Python frame a read.)
            receive: Callable[[], bytes] = functools.partial(_RECV, sock, _NOBLOCK)

            def handle(data: bytes) -> None:
                on_peer_frame = self._on_peer_frame
                if on_peer_frame is not None:
                    on_peer_frame(peer, data)

            def drain() -> None:
                # Not started, closed, or dropped (an idle link) or redialled: the socket
                # is ours only while it is the peer's DEALER (we close none we keep), which
                # a dict lookup tells for less than `sock.closed` (a slow attribute lookup,
                # see the module's doc, and a getsockopt).
                if self._on_peer_frame is not None and self._dealers.get(peer) is sock:
                    self._drain(sock, receive, handle, drain)

            self._dealer_drains[peer] = drain
        return drain

    def _look_after_send(self, sock: zmq.Socket[bytes]) -> bool:
        """A send may have consumed ZMQ_FD's edge: look at the socket once more. In its own
        drain, that drain looks again before it returns; elsewhere, reading ZMQ_EVENTS now
        re-arms the edge, and only a frame already waiting needs a drain (one loop turn less
        per send than a drain scheduled every time): True if the caller must schedule it.
        (The caller names the drain only then: a DEALER's is a lookup.)"""
        if sock is self._draining:
            self._sent_while_draining = True
            return False
        events = self._looks.get(sock)
        # Not started, or closed (`close` clears both first):
        if events is None or self._on_inbound is None:
            return False
        try:
            return bool(events() & _POLLIN)
        except zmq.ZMQError:
            return False

    def _schedule_drain(self, sock: zmq.Socket[bytes], drain: Callable[[], None]) -> None:
        if sock is self._draining:
            self._sent_while_draining = True  # that drain looks again before it returns
            return
        if self._loop is None or id(sock) in self._drain_scheduled:
            return
        self._drain_scheduled.add(id(sock))

        def run() -> None:
            self._drain_scheduled.discard(id(sock))
            drain()

        self._loop.call_soon(run)

    def _drain_router(self) -> None:
        self._drain(self._router, self._recv_router, self._handle_inbound, self._drain_router)

    def _drain(
        self,
        sock: zmq.Socket[bytes],
        receive: Callable[[], _T],
        handle: Callable[[_T], None],
        again: Callable[[], None],
    ) -> None:
        """Handle up to DRAIN_BUDGET frames waiting on `sock`, then let others have a turn.
        A send on `sock` meanwhile (a reply, from the handlers or `on_drained`) makes it look
        once more, within the same budget, instead of scheduling another drain.

        The first read does not look first: a drain runs because ZMQ_FD fired (or a look
        found a frame), and then a frame is almost always there (4 drains in 1,207 found
        none in a single-send run). A read of an empty socket costs about 24,800 instructions
        (its `zmq.Again`), a look about 4,500 (9,000 through pyzmq's `get`): one look fewer
        per frame pays. On the ROUTER it does not look right after either: `on_drained`
        runs after that first frame, so that what it starts (the commit of a batch, then its
        receipt, sent on this socket) goes before the socket is looked at, and one look then
        serves both (another frame? did the send take the edge?): a receiver looked twice a
        single send. Frames found by that look are read on, each looked for, and share the
        next `on_drained` (the writer commits them together). (A DEALER's answers start no
        send on it from `on_drained`: a receipt's record commits later. There the look
        after the first frame stays, in the same `_read`.)"""
        # Not started, or closed (`close` clears it first; a dropped DEALER's drain is not
        # called, see `_dealer_drain`): no `sock.closed`, a slow lookup on every drain.
        if self._on_inbound is None:
            return
        outer, self._draining = self._draining, sock
        outer_bytes, self._drained_bytes = self._drained_bytes, 0
        try:
            handled = 0
            look, most = False, 1 if sock is self._router else DRAIN_BUDGET
            while True:
                self._sent_while_draining = False
                before = handled
                handled, ended = self._read(sock, receive, handle, handled, look, most)
                if handled > before and self._on_drained is not None:
                    self._on_drained()
                # `ended`: the socket said it has nothing (or may not be read); it was
                # looked at after everything read, but not after what was sent meanwhile.
                full = handled >= DRAIN_BUDGET or self._drained_bytes >= DRAIN_BYTES_BUDGET
                if full or (ended and not self._sent_while_draining):
                    break
                look, most = True, DRAIN_BUDGET
        finally:
            self._draining, self._drained_bytes = outer, outer_bytes
        if full:
            self._schedule_drain(sock, again)  # more may wait: after the others' turn

    def _read(
        self,
        sock: zmq.Socket[bytes],
        receive: Callable[[], _T],
        handle: Callable[[_T], None],
        handled: int,
        look: bool = True,
        most: int = DRAIN_BUDGET,
    ) -> tuple[int, bool]:
        """Read and handle frames while `sock` has some, `most` at a time and up to
        DRAIN_BUDGET in all (or until the ROUTER's DRAIN_BYTES_BUDGET is spent); returns the
        new count, and whether reading ended because the socket has nothing now or may not be
        read (False: `most` were read, or the bytes spent, none looked for after them).
        `receive` raises `zmq.Again` when the socket is empty. `look`: ask ZMQ_EVENTS before
        the first read too (after it, always)."""
        limit = handled + most
        if limit > DRAIN_BUDGET:
            limit = DRAIN_BUDGET
        while handled < limit and self._drained_bytes < DRAIN_BYTES_BUDGET:
            if sock is self._router and self._inbound_paused:
                return handled, True
            try:
                if look:
                    # Again each time: a handler may have closed `sock` (`drop_peer`).
                    events = self._looks.get(sock)
                    if events is None or not events() & _POLLIN:
                        return handled, True
                item = receive()
            except zmq.Again:
                return handled, True
            except zmq.ZMQError as exc:  # closed or terminated under us
                log.warning("[%s] receiving failed: %s", self.name, exc)
                return handled, True
            handled += 1
            look = True
            try:
                handle(item)
            except Exception:
                # A bug in one frame's handling must not stop the socket: ZMQ_FD is
                # edge-triggered, so a drain that ends early might never be woken again.
                log.exception("[%s] handling a frame failed", self.name)
        return handled, False

    def _recv_router(self) -> tuple[bytes, bytes, str | None] | None:
        """One message from the ROUTER as (identity, payload, CURVE user id or None), or None
        for a malformed one (read to its end and dropped). Raises `zmq.Again` when there is
        none. A ROUTER puts the connection's identity before every message, and a message has
        at least one part: the identity is always followed by a payload."""
        sock = self._router
        identity = _RECV(sock, _NOBLOCK)
        # The payload as a `zmq.Frame`, which carries its ZMQ_RCVMORE: 4,700 instructions
        # more than reading bytes, against 8,400 for asking the socket through pyzmq's
        # `get` (callgrind; about as much as the frame straight from libzmq, and secure
        # mode needs the frame's `User-Id` anyway).
        frame = _RECV(sock, _NOBLOCK, copy=False)
        payload, more = frame.bytes, frame.more
        self._drained_bytes += len(payload)
        user_id: str | None = None
        line: str | None = None
        if self._curve_secret is not None:
            with contextlib.suppress(zmq.ZMQError):
                value = frame.get("User-Id")  # the line ZAP admitted the connection by
                line = value if isinstance(value, str) else None
            # Who sent it: that line's name while the line is in force, not merely when the
            # connection was admitted (a reload may have removed or replaced it).
            user_id = self._names_by_user_id.get(line) if line is not None else None
        if not more:
            if len(identity) > MAX_ROUTING_ID_BYTES:
                self._drop_long_id(len(identity))
                return None
            if user_id is None and self._curve_secret is not None:
                self._drop_revoked(line)
                return None
            return identity, payload, user_id
        # [identity, payload] is all we send; anything longer is not ours to parse. The
        # remaining parts are already here (ZeroMQ delivers a message whole).
        parts = 2
        while more:
            more = _RECV(sock, _NOBLOCK, copy=False).more
            parts += 1
        tail = self._multipart.add()
        if tail is not None:
            log.warning("[%s] dropped a %d-part message%s", self.name, parts, tail)
        return None

    @property
    def multipart_dropped(self) -> int:
        """Inbound messages of more than [routing id, payload] dropped."""
        return self._multipart.count

    @property
    def long_id_dropped(self) -> int:
        """Inbound frames dropped for a routing id over MAX_ROUTING_ID_BYTES."""
        return self._long_id.count

    @property
    def inbound_dropped(self) -> int:
        return self._multipart.count + self._long_id.count

    @property
    def frames_from_revoked(self) -> int:
        """Secure mode: inbound frames dropped because the line their connection was admitted
        by is no longer in force (its key removed, changed or given to another name by
        `set_peer_keys`)."""
        return self._revoked.count

    def _drop_revoked(self, line: str | None) -> None:
        """Count (and log, paced) a frame whose connection's line was taken away."""
        tail = self._revoked.add()
        if tail is not None:
            name, _, key = (line or "").partition(" ")
            known = line in self._retired
            log.warning("[%s] dropped a frame from a connection admitted as %s with key %s, a "
                        "line %s authorized_keys (keys reload): nothing it sends is taken%s",
                        self.name, name or "?", key or "?",
                        "no longer in" if known else "not in", tail)

    def set_peer_keys(self, peer_keys: dict[str, bytes]) -> KeyChanges:
        """Put `peer_keys` ({name: Z85 key}, checked by `keys.load_authorized`) in force at
        once, for both directions, and say what changed. Inbound: the ZAP allowlist admits
        exactly these keys from the next handshake on, and every frame from now on is taken
        only if its connection's key is still listed (for that name). Outbound: a peer whose
        key was removed is no longer dialled (its DEALER closed: the protocol's frames to it
        are dropped, what the node queued for it stays queued); one whose key changed is
        redialled with the new key; one that regains a key is dialled. Peers whose key did
        not change are not touched."""
        changes = KeyChanges.between(self._peer_keys, peer_keys)
        if not self.secure or not changes:
            self._peer_keys = dict(peer_keys)
            return changes
        for name in changes.cut:
            old = user_id(name, self._peer_keys[name])
            self._retired.pop(old, None)
            self._retired[old] = None
            if len(self._retired) > RETIRED_LINES_KEPT:
                self._retired.pop(next(iter(self._retired)))
        self._peer_keys = dict(peer_keys)
        self._names_by_user_id = _names_by_user_id(self._peer_keys)
        if self._authenticator is not None:
            self._authenticator.replace(self._peer_keys)
        for peer in changes.removed:
            if peer in self._endpoints:
                self._stop_dialling(peer)
        for peer in (*changes.added, *changes.changed):
            if peer not in self._endpoints:
                continue
            self._keyless.discard(peer)
            self._handshake_failures.pop(peer, None)
            self._auth_refusals.pop(peer, None)
            if peer in self._dealers:
                self.redial(peer)  # the old DEALER holds the old server key
            else:
                self._connect(peer, self._endpoints[peer])
        return changes

    def _stop_dialling(self, peer: str) -> None:
        """`peer` has no key now: close its DEALER, keep its endpoint for a later key."""
        self._close_dealer(peer, 0)
        self._dealer_drains.pop(peer, None)
        self._keyless.add(peer)
        self._handshake_failures[peer] = (
            f"not dialled: {peer} has no key in this node's authorized_keys (removed by a "
            f"reload); messages to it stay queued until its line is back and the keys "
            f"reloaded (`meshpost keys reload --node {self.name}`)")
        log.warning("[%s] %s's key is no longer in authorized_keys: its link is not dialled "
                    "until a key is listed again; what is queued for it stays queued",
                    self.name, peer)

    def _drop_long_id(self, length: int) -> None:
        """Count (and log, at the multipart lines' pace) a frame whose connection named
        itself with a routing id of `length` bytes, over MAX_ROUTING_ID_BYTES."""
        tail = self._long_id.add()
        if tail is not None:
            log.warning("[%s] dropped a frame from a connection whose routing id is %d bytes "
                        "long (ZMTP allows %d; not a meshpost peer)%s", self.name, length,
                        MAX_ROUTING_ID_BYTES, tail)

    def _handle_inbound(self, message: tuple[bytes, bytes, str | None] | None) -> None:
        if message is not None:
            assert self._on_inbound is not None
            self._on_inbound(*message)

    def reply(self, identity: bytes, payload: bytes) -> bool:
        """Queue `payload` for the connection `identity`; False if it is gone or full."""
        sent = self._send_now(self._router, payload, identity)
        if self._look_after_send(self._router):
            self._schedule_drain(self._router, self._drain_router)
        return sent

    # -- outbound -------------------------------------------------------------------------

    def add_peer(self, peer: str, endpoint: str) -> None:
        """Connect a DEALER to `peer`; ZeroMQ reconnects it by itself from now on. In secure
        mode a peer without a key (its line removed by a reload) is not dialled: it waits,
        its endpoint kept, until `set_peer_keys` lists a key for it."""
        if self.secure and peer not in self._peer_keys:
            self._endpoints[peer] = endpoint
            if peer not in self._keyless:
                self._stop_dialling(peer)
            return
        self._connect(peer, endpoint)

    def _connect(self, peer: str, endpoint: str) -> None:
        sock = self._dealer(peer, endpoint)
        self._dealers[peer] = sock
        self._looks[sock] = _events_reader(sock, self._own_context)
        self._endpoints[peer] = endpoint
        if self._loop is not None:
            self._watch_dealer(peer, sock)

    def drop_peer(self, peer: str) -> None:
        """Close `peer`'s DEALER (its link is idle): frames already queued on it, such as the
        link's Close, still get `LINGER_MS` to leave. `add_peer` connects it again."""
        if self._close_dealer(peer, LINGER_MS) or peer in self._keyless:
            self._endpoints.pop(peer, None)
            self._dealer_drains.pop(peer, None)
            self._handshake_failures.pop(peer, None)
            self._keyless.discard(peer)
            self._auth_refusals.pop(peer, None)

    def _close_dealer(self, peer: str, linger_ms: int) -> bool:
        """Stop watching and close `peer`'s DEALER and its monitor; False if it has none."""
        timer = self._auth_redials.pop(peer, None)
        if timer is not None:
            timer.cancel()
        old = self._dealers.pop(peer, None)
        if old is None:
            return False
        del self._looks[old]  # before it is closed (see `_events_reader`)
        for fd in (self._dealer_fds.pop(peer, None), self._monitor_fds.pop(peer, None)):
            if fd is not None and self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(fd)
                with contextlib.suppress(ValueError):
                    self._readers.remove(fd)
        self._drain_scheduled.discard(id(old))
        monitor = self._monitors.pop(peer, None)
        if monitor is not None:
            with contextlib.suppress(zmq.ZMQError):
                old.disable_monitor()
            monitor.close(0)
        old.close(linger_ms)
        return True

    def redial(self, peer: str) -> None:
        """Replace `peer`'s DEALER by a new one (a new connection): its link stayed lost and
        silent (`RedialWanted`), and a dead or half-open connection would otherwise stay open
        for good. Frames still queued on the old socket are dropped; the protocol retransmits
        them."""
        if not self._close_dealer(peer, 0):
            return
        sock = self._dealer(peer, self._endpoints[peer])
        self._dealers[peer] = sock
        self._looks[sock] = _events_reader(sock, self._own_context)
        self._dealer_drains.pop(peer, None)
        self.redials += 1
        log.info("[%s] redialling %s on a new connection", self.name, peer)
        if self._loop is not None:
            self._watch_dealer(peer, sock)

    def _dealer(self, peer: str, endpoint: str) -> zmq.Socket[bytes]:
        """A connected DEALER to `peer`. No ROUTING_ID: the peer's ROUTER picks one."""
        sock = self._socket(zmq.DEALER)
        sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS)
        sock.setsockopt(zmq.MAXMSGSIZE, self.max_frame_bytes)
        if self.secure:
            server_key = self._peer_keys.get(peer)
            if server_key is None:
                sock.close(0)
                raise TransportError(f"no public key for peer {peer!r}; cannot connect securely")
            assert self._curve_public is not None
            assert self._curve_secret is not None
            try:
                sock.setsockopt(zmq.CURVE_SERVERKEY, server_key)
                sock.setsockopt(zmq.CURVE_PUBLICKEY, self._curve_public)
                sock.setsockopt(zmq.CURVE_SECRETKEY, self._curve_secret)
            except zmq.ZMQError as exc:  # a key libzmq cannot read (keys.z85_key checks files)
                sock.close(0)
                raise TransportError(f"the CURVE keys for peer {peer!r} are not Z85 keys: "
                                     f"{exc.strerror}") from None
            # A plain PAIR socket (get_monitor_socket would make an asyncio one here).
            address = f"inproc://meshpost-monitor-{self.name}-{peer}-{id(sock)}"
            sock.monitor(address, _HANDSHAKE_EVENTS)
            monitor: zmq.Socket[bytes] = zmq.Socket(self.context, zmq.PAIR)
            monitor.connect(address)
            self._monitors[peer] = monitor
        try:
            sock.connect(endpoint)
        except zmq.ZMQError as exc:
            sock.close(0)
            raise InvalidEndpoint(endpoint, exc.strerror) from None
        return sock

    def send_to_peer(self, peer: str, payload: bytes) -> bool:
        sock = self._dealers.get(peer)
        if sock is None:  # no connection (an idle link): nothing to queue it on
            return False
        sent = self._send_now(sock, payload)
        if self._look_after_send(sock):
            self._schedule_drain(sock, self._dealer_drain(peer))
        return sent

    # -- shared ---------------------------------------------------------------------------

    def _send_now(
        self, sock: zmq.Socket[bytes], payload: bytes, identity: bytes | None = None
    ) -> bool:
        """Queue `payload` (after `identity`, on the ROUTER). Part by part rather than with
        `send_multipart`, which checks every part's type first (6 against 3 us here); a
        message is still atomic: ZeroMQ takes the later parts once it took the first."""
        probe = self._probe
        if probe is not None:
            probe.mark(probes.SEND[0])
        try:
            if identity is not None:
                _SEND(sock, identity, _NOBLOCK | _SNDMORE)
            if len(payload) < _ZERO_COPY_BYTES:
                _SEND(sock, payload, _NOBLOCK)
            else:
                _SEND(sock, payload, _NOBLOCK, copy=False)
        except zmq.ZMQError as exc:
            self.dropped_sends += 1
            if exc.errno not in (errno.EHOSTUNREACH, errno.EAGAIN):
                log.warning("[%s] send failed: %s", self.name, exc)
            return False
        finally:
            if probe is not None:
                probe.mark(probes.SEND[1])
        return True

    @property
    def inbound_refused(self) -> int:
        """Inbound connections shut down because `inbound_cap` connections were open."""
        return self._inbound.refused

    @property
    def handshakes_failed(self) -> int:
        """Inbound connections whose ZMTP or CURVE handshake failed (`inbound.InboundGuard`)."""
        return self._inbound.handshakes_failed

    @property
    def inbound_cap(self) -> int:
        return self._inbound.cap

    @property
    def denied_connections(self) -> int:
        """Secure mode: CURVE clients refused at the handshake (a key not on the allowlist)."""
        return self._denied.count

    def _denied_key(self, key: str) -> None:
        """The authenticator refused a client's `key` (Z85): counted, logged at a pace."""
        tail = self._denied.add()
        if tail is not None:
            log.warning("[%s] CURVE client with unknown key %s denied%s", self.name, key, tail)

    def close(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            for fd in self._readers:
                self._loop.remove_reader(fd)
        self._readers.clear()
        self._on_inbound = self._on_peer_frame = None
        self._looks.clear()  # before the sockets are closed (see `_events_reader`)
        for timer in self._auth_redials.values():
            timer.cancel()
        self._auth_redials.clear()
        if self._authenticator is not None:
            self._authenticator.stop()
        for peer, monitor in self._monitors.items():
            with contextlib.suppress(zmq.ZMQError):
                self._dealers[peer].disable_monitor()
            monitor.close(0)
        for sock in self._dealers.values():
            sock.close(LINGER_MS)
        self._inbound.close()
        self._router.close(LINGER_MS)
        if self._own_context:
            self.context.term()
        for lock in self._ipc_locks:
            lock.release(remove_socket=True)
        locked = {lock.path for lock in self._ipc_locks}
        self._ipc_locks.clear()
        for endpoint in self.bound:
            path = ipc_path(endpoint)  # a wildcard's path, which libzmq chose: no lock
            if path is not None and path not in locked:
                with contextlib.suppress(OSError):
                    os.unlink(path)

    def __repr__(self) -> str:
        return f"ZmqTransport({self.name}, bound={self.bound}, peers={sorted(self._dealers)})"



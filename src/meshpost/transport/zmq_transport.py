"""pyzmq asyncio sockets with the options a reliable mesh needs.

Rule: bytes in, bytes out. This module knows endpoints, identities and socket options, nothing
about frames or storage. A successful send only means *queued*: the protocol above must never
rely on delivery, so every send here is non-blocking and reports back-pressure as `False`.

Socket choices (the ZeroMQ traps the protocol designs around):
- ROUTER_MANDATORY: a reply to an unknown or vanished peer raises instead of vanishing silently;
- ROUTER_HANDOVER: a restarted peer reusing its routing id takes over the old connection;
- no ZMTP heartbeats: with libzmq 4.3.5 a heartbeat timer firing on a connection the peer
  closed while our input pipe was full aborts the whole process (`!_io_error`, libzmq issues
  4364/4767; reproduced by tests/integration/faults/test_04_sigstop.py). Liveness is the
  protocol's own Ping/peer timeout, and TCP keepalive clears half-open connections the kernel
  would otherwise keep forever (ZeroMQ then reconnects by itself). Redialling on a lost peer
  was tried and dropped: `disconnect()` + `connect()` to the same endpoint races in libzmq and
  can leave the socket with no connection at all;
- bounded LINGER, SNDHWM/RCVHWM and MAXMSGSIZE: shutdown never hangs, memory stays bounded,
  an oversized frame closes the offending connection before it is read into memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
from collections.abc import Sequence
from typing import Any, cast

import zmq
import zmq.asyncio

from meshpost.errors import EndpointInUse, InvalidEndpoint, TransportError
from meshpost.transport.security import ZAP_DOMAIN, MeshAuthenticator

log = logging.getLogger(__name__)

#: Pending frames per socket; a frame carries up to hundreds of messages, so this is plenty,
#: and frames beyond it are dropped (and retransmitted later) rather than buffered without end.
SNDHWM = 256
RCVHWM = 256
#: On close, give queued frames this long to leave; lost ones are retransmitted after restart.
LINGER_MS = 200
#: TCP keepalive: probe after 10 s idle, every 5 s, give up after 3 misses (about 25 s).
TCP_KEEPALIVE_IDLE_S = 10
TCP_KEEPALIVE_INTVL_S = 5
TCP_KEEPALIVE_CNT = 3
RECONNECT_IVL_MS = 100
RECONNECT_IVL_MAX_MS = 1000


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
    ) -> None:
        self.name = name
        self.max_frame_bytes = max_frame_bytes
        self._own_context = context is None
        self.context = context or zmq.asyncio.Context()
        self._curve_secret = curve_secret_key
        self._curve_public = curve_public_key
        self._peer_keys = peer_public_keys or {}
        self._router = self._socket(zmq.ROUTER)
        self._router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._router.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self._router.setsockopt(zmq.MAXMSGSIZE, max_frame_bytes)
        self._authenticator: MeshAuthenticator | None = None
        if self.secure:
            # Authenticator first, then CURVE on the socket, and ZAP_ENFORCE_DOMAIN so that a
            # missing or dead authenticator means no traffic at all (fail closed).
            self._authenticator = MeshAuthenticator(self.context, self._peer_keys)
            self._authenticator.start()
            self._router.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
            self._router.setsockopt(zmq.CURVE_SERVER, 1)
            assert curve_secret_key is not None
            self._router.setsockopt(zmq.CURVE_SECRETKEY, curve_secret_key)
            self._router.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN.encode())
        self._dealers: dict[str, zmq.asyncio.Socket] = {}
        self.bound: list[str] = []
        self.dropped_sends = 0

    @property
    def secure(self) -> bool:
        return self._curve_secret is not None

    def _socket(self, kind: int) -> zmq.asyncio.Socket:
        sock = self.context.socket(kind)
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
            try:
                self._router.bind(endpoint)
            except zmq.ZMQError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise EndpointInUse(endpoint, exc.strerror) from None
                if exc.errno in (errno.EINVAL, errno.EPROTONOSUPPORT, errno.ENODEV):
                    raise InvalidEndpoint(endpoint, exc.strerror) from None
                raise TransportError(f"cannot bind {endpoint}: {exc.strerror}") from None
            actual = self._router.getsockopt(zmq.LAST_ENDPOINT)
            assert isinstance(actual, bytes)
            self.bound.append(actual.decode())
        return list(self.bound)

    async def recv_inbound(self) -> tuple[bytes, bytes, str | None]:
        """Next frame sent to us: (routing identity, payload, CURVE user id or None)."""
        while True:
            parts = await self._router.recv_multipart(copy=False)
            if len(parts) != 2:
                # A ROUTER frame is [identity, payload]; anything else is not ours to parse.
                log.warning("[%s] dropped a %d-part message", self.name, len(parts))
                continue
            user_id: str | None = None
            if self.secure:
                with contextlib.suppress(zmq.ZMQError):
                    value = parts[1].get("User-Id")
                    user_id = value if isinstance(value, str) else None
            return parts[0].bytes, parts[1].bytes, user_id

    def reply(self, identity: bytes, payload: bytes) -> bool:
        """Queue `payload` for the connection `identity`; False if it is gone or full."""
        return self._send_now(self._router, [identity, payload])

    # -- outbound -------------------------------------------------------------------------

    def add_peer(self, peer: str, endpoint: str) -> None:
        """Connect a DEALER to `peer`; ZeroMQ reconnects it by itself from now on."""
        sock = self._socket(zmq.DEALER)
        sock.setsockopt(zmq.ROUTING_ID, self.name.encode())
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
            sock.setsockopt(zmq.CURVE_SERVERKEY, server_key)
            sock.setsockopt(zmq.CURVE_PUBLICKEY, self._curve_public)
            sock.setsockopt(zmq.CURVE_SECRETKEY, self._curve_secret)
        try:
            sock.connect(endpoint)
        except zmq.ZMQError as exc:
            sock.close(0)
            raise InvalidEndpoint(endpoint, exc.strerror) from None
        self._dealers[peer] = sock


    def send_to_peer(self, peer: str, payload: bytes) -> bool:
        return self._send_now(self._dealers[peer], [payload])

    async def recv_from_peer(self, peer: str) -> bytes:
        data = await self._dealers[peer].recv(copy=True)
        assert isinstance(data, bytes)
        return data

    # -- shared ---------------------------------------------------------------------------

    def _send_now(self, sock: zmq.asyncio.Socket, parts: list[bytes]) -> bool:
        # With DONTWAIT pyzmq's asyncio socket sends synchronously and hands back a finished
        # future; its exception must be read here or asyncio reports it as never retrieved.
        future = cast(
            "asyncio.Future[Any]",
            sock.send_multipart(parts, flags=zmq.DONTWAIT, copy=len(parts[-1]) < 65536),
        )
        exc = future.exception() if future.done() else None
        if exc is None:
            return True
        self.dropped_sends += 1
        if isinstance(exc, zmq.ZMQError) and exc.errno in (errno.EHOSTUNREACH, errno.EAGAIN):
            return False
        log.warning("[%s] send failed: %s", self.name, exc)
        return False

    @property
    def denied_connections(self) -> int:
        return self._authenticator.allowlist.denied if self._authenticator else 0

    def close(self) -> None:
        if self._authenticator is not None:
            self._authenticator.stop()
        for sock in self._dealers.values():
            sock.close(LINGER_MS)
        self._router.close(LINGER_MS)
        if self._own_context:
            self.context.term()
        for endpoint in self.bound:
            if endpoint.startswith("ipc://"):
                with contextlib.suppress(OSError):
                    os.unlink(endpoint[len("ipc://") :])

    def __repr__(self) -> str:
        return f"ZmqTransport({self.name}, bound={self.bound}, peers={sorted(self._dealers)})"



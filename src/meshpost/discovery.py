"""LAN discovery: nodes announce themselves in small UDP beacons and connect to what they hear.

Rule: a beacon is a claim, never proof. It only tells a node where to dial; who answers is
still decided by the handshake (and under --secure by the CURVE key in authorized_keys). The
beacon format and the `Directory` that judges beacons are pure; `Discovery` does the I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import socket
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import msgspec

from meshpost.config import NAME_PATTERN, validate_endpoint
from meshpost.errors import InvalidEndpoint, MeshpostError, ProtocolError
from meshpost.protocol import PROTOCOL_VERSION

if TYPE_CHECKING:
    from meshpost.node import Node

log = logging.getLogger(__name__)

#: Every beacon starts with these bytes; the 4th is the beacon format's version.
BEACON_MAGIC = b"MPB"
BEACON_VERSION = 1
#: A beacon is one small datagram; anything longer is not ours.
MAX_BEACON_BYTES = 512
#: Default UDP port of beacons (one port per LAN, as ZRE's 5670).
DEFAULT_DISCOVERY_PORT = 5671
#: A beacon a second: a new node is found within about a second.
DEFAULT_INTERVAL_S = 1.0
#: A node not heard for this long is reported lost (its link keeps its queued messages).
DEFAULT_SILENCE_S = 5.0
DEFAULT_MESH = "meshpost"
#: Reports (clashes, unauthorized nodes) remembered for rate-limiting; a flood of made-up node
#: ids only makes the log louder, never the memory larger.
_REPORTS_REMEMBERED = 1024


class BeaconError(ProtocolError):
    """A datagram on the beacon port that is not a beacon we can use."""


class Beacon(msgspec.Struct, array_like=True, frozen=True, forbid_unknown_fields=True):
    """What a node announces. `endpoint` may have a wildcard host (`tcp://*:7000`): the
    receiver dials the beacon's source address instead."""

    mesh: str
    node_id: str
    name: str
    endpoint: str
    protocol: int
    #: SHA-256 of the node's CURVE public key (hex, first 32 digits) under --secure.
    key: str | None = None


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Beacon)


def encode_beacon(beacon: Beacon) -> bytes:
    return BEACON_MAGIC + bytes([BEACON_VERSION]) + _encoder.encode(beacon)


def decode_beacon(data: bytes) -> Beacon:
    """The beacon in `data`; raises `BeaconError` for anything else (never returns None)."""
    if len(data) > MAX_BEACON_BYTES:
        raise BeaconError(f"{len(data)} bytes is too long for a beacon")
    if not data.startswith(BEACON_MAGIC) or len(data) < len(BEACON_MAGIC) + 1:
        raise BeaconError("not a meshpost beacon (bad magic)")
    version = data[len(BEACON_MAGIC)]
    if version != BEACON_VERSION:
        raise BeaconError(f"beacon format {version}, this node reads {BEACON_VERSION}")
    try:
        return _decoder.decode(data[len(BEACON_MAGIC) + 1:])
    except msgspec.DecodeError as exc:
        raise BeaconError(f"malformed beacon: {exc}") from None


def key_fingerprint(public_key: bytes) -> str:
    return hashlib.sha256(public_key).hexdigest()[:32]


def dial_endpoint(endpoint: str, source_ip: str) -> str:
    """The endpoint to dial for a beacon from `source_ip`: a wildcard host becomes it."""
    if endpoint.startswith("tcp://"):
        host, _sep, port = endpoint[len("tcp://"):].rpartition(":")
        if host in ("*", "0.0.0.0", "[::]", "::"):
            host = f"[{source_ip}]" if ":" in source_ip else source_ip
        return f"tcp://{host}:{port}"
    return endpoint


# -- judging beacons (pure) --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Found:
    """A node to dial, heard for the first time."""

    name: str
    node_id: str
    endpoint: str


@dataclasses.dataclass(frozen=True, slots=True)
class Clash:
    """Two nodes claim one name; `ours` says whether the name is this node's own."""

    name: str
    known_id: str
    other_id: str
    other_endpoint: str
    ours: bool


@dataclasses.dataclass(frozen=True, slots=True)
class Moved:
    """A node already found is heard at another endpoint after nothing came from its own for
    `silence_s` (restarted elsewhere: another address, another port): its link follows it."""

    name: str
    node_id: str
    endpoint: str
    previous: str


@dataclasses.dataclass(frozen=True, slots=True)
class EndpointClaim:
    """A beacon names a found node, its node id included, at another endpoint while that
    node is still heard at its own: not followed, since a node id is anyone's to say (the
    node would otherwise be dialed at whatever endpoint the last beacon gave)."""

    name: str
    node_id: str
    endpoint: str
    claimed: str


@dataclasses.dataclass(frozen=True, slots=True)
class Heard:
    """A node already found was heard again; `returned` if it had fallen silent."""

    name: str
    returned: bool


@dataclasses.dataclass(frozen=True, slots=True)
class Unauthorized:
    """Under --secure, a node whose name and key fingerprint are not in authorized_keys."""

    name: str
    node_id: str


@dataclasses.dataclass(frozen=True, slots=True)
class Silent:
    """A node not heard for `silent_s`."""

    name: str
    silent_s: float


Decision = Found | Moved | EndpointClaim | Heard | Clash | Unauthorized | Silent


@dataclasses.dataclass(slots=True)
class DiscoveryStats:
    beacons: int = 0
    garbage: int = 0
    other_mesh: int = 0
    other_version: int = 0
    unauthorized: int = 0
    clashes: int = 0
    #: Beacons naming a found node at another endpoint while it was heard at its own.
    endpoint_claims: int = 0


@dataclasses.dataclass(slots=True)
class _Heard:
    node_id: str
    endpoint: str
    last_heard: float
    silent: bool = False


class Directory:
    """Which node holds which name, as beacons tell it. Time comes in as `now` (seconds).

    The first node heard under a name keeps it while it is heard; another node id claiming
    it is a `Clash`, reported every `silence_s` at most, and never dialed. The endpoint a node
    is dialed at changes only once nothing came from the old one for `silence_s` (`Moved`):
    until then a beacon giving another endpoint is an `EndpointClaim`, reported as rarely.
    """

    def __init__(
        self, *, mesh: str, name: str, node_id: str, silence_s: float = DEFAULT_SILENCE_S,
        authorized: Callable[[str, str | None], bool] | None = None,
    ) -> None:
        self.mesh, self.name, self.node_id = mesh, name, node_id
        self.silence_s = silence_s
        self._authorized = authorized
        self.stats = DiscoveryStats()
        self._heard: dict[str, _Heard] = {}
        self._reported: dict[tuple[str, str], float] = {}

    def receive(self, data: bytes, source_ip: str, now: float) -> list[Decision]:
        try:
            beacon = decode_beacon(data)
        except BeaconError as exc:
            if "format" in str(exc):
                self.stats.other_version += 1
            else:
                self.stats.garbage += 1
            raise
        self.stats.beacons += 1
        if beacon.mesh != self.mesh:
            self.stats.other_mesh += 1
            return []
        if beacon.protocol != PROTOCOL_VERSION:
            self.stats.other_version += 1
            return []
        if not NAME_PATTERN.fullmatch(beacon.name):
            self.stats.garbage += 1
            return []
        endpoint = dial_endpoint(beacon.endpoint, source_ip)
        try:
            validate_endpoint(endpoint, for_bind=False)
        except InvalidEndpoint:
            self.stats.garbage += 1
            return []
        if beacon.node_id == self.node_id:
            return []  # our own beacon, looped back
        if beacon.name == self.name:
            return self._clash(beacon.name, self.node_id, beacon, endpoint, now, ours=True)
        if self._authorized is not None and not self._authorized(beacon.name, beacon.key):
            self.stats.unauthorized += 1
            if self._first_in_period(("unauthorized", beacon.node_id), now):
                return [Unauthorized(beacon.name, beacon.node_id)]
            return []
        heard = self._heard.get(beacon.name)
        if heard is not None and heard.node_id != beacon.node_id:
            # Even if the name's holder went silent it keeps the name: messages queued for it
            # are its own, and a newcomer must not receive them.
            return self._clash(beacon.name, heard.node_id, beacon, endpoint, now, ours=False)
        if heard is None:
            self._heard[beacon.name] = _Heard(beacon.node_id, endpoint, now)
            return [Found(beacon.name, beacon.node_id, endpoint)]
        if heard.endpoint != endpoint:
            if now - heard.last_heard < self.silence_s:
                # Still heard where it is: a beacon elsewhere proves nothing (it does not
                # keep the node heard either, or it could keep a node that moved unfollowed).
                self.stats.endpoint_claims += 1
                if self._first_in_period((beacon.name, endpoint), now):
                    return [EndpointClaim(beacon.name, beacon.node_id, heard.endpoint, endpoint)]
                return []
            previous, heard.endpoint = heard.endpoint, endpoint
            heard.silent, heard.last_heard = False, now
            return [Moved(beacon.name, beacon.node_id, endpoint, previous)]
        returned, heard.silent, heard.last_heard = heard.silent, False, now
        return [Heard(beacon.name, returned)]

    def _clash(self, name: str, known_id: str, beacon: Beacon, endpoint: str, now: float,
               *, ours: bool) -> list[Decision]:
        if not self._first_in_period((name, beacon.node_id), now):
            return []
        self.stats.clashes += 1
        return [Clash(name, known_id, beacon.node_id, endpoint, ours)]

    def _first_in_period(self, key: tuple[str, str], now: float) -> bool:
        """Whether to report `key` now: once per `silence_s`, so logs stay readable."""
        last = self._reported.get(key)
        if last is not None and now - last < self.silence_s:
            return False
        if len(self._reported) >= _REPORTS_REMEMBERED:
            self._reported.clear()
        self._reported[key] = now
        return True

    def expire(self, now: float) -> list[Decision]:
        """Nodes that fell silent since the last call."""
        decisions: list[Decision] = []
        for name, heard in self._heard.items():
            silent_s = now - heard.last_heard
            if not heard.silent and silent_s >= self.silence_s:
                heard.silent = True
                decisions.append(Silent(name, silent_s))
        return decisions


# -- I/O -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class DiscoveryConfig:
    """Where beacons are heard (`host`, `port`) and where ours go (`targets`; default: the
    LAN broadcast address on `port`)."""

    port: int = DEFAULT_DISCOVERY_PORT
    host: str = "0.0.0.0"
    targets: tuple[tuple[str, int], ...] = ()
    mesh: str = DEFAULT_MESH
    interval_s: float = DEFAULT_INTERVAL_S
    silence_s: float = DEFAULT_SILENCE_S

    @property
    def beacon_targets(self) -> tuple[tuple[str, int], ...]:
        return self.targets or (("255.255.255.255", self.port),)


def parse_target(text: str) -> tuple[str, int]:
    """`HOST:PORT` of `--beacon-to`."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise InvalidEndpoint(text, "expected HOST:PORT, e.g. 127.0.0.1:5671")
    return host.strip("[]"), int(port)


class Discovery:
    """Beacons of one node: announce it, dial what is heard. `async with Discovery(...)`."""

    def __init__(self, node: Node, config: DiscoveryConfig, *,
                 public_key: bytes | None = None,
                 authorized_keys: dict[str, bytes] | None = None) -> None:
        self.node = node
        self.config = config
        self._key = key_fingerprint(public_key) if public_key is not None else None
        authorized = None
        if authorized_keys is not None:
            prints = {name: key_fingerprint(k) for name, k in authorized_keys.items()}

            def authorized(name: str, key: str | None) -> bool:
                return key is not None and prints.get(name) == key

        self.directory = Directory(mesh=config.mesh, name=node.name, node_id=node.node_id,
                                   silence_s=config.silence_s, authorized=authorized)
        self._transport: asyncio.DatagramTransport | None = None
        self._task: asyncio.Task[None] | None = None
        self.address: tuple[str, int] | None = None

    @property
    def stats(self) -> DiscoveryStats:
        return self.directory.stats

    async def __aenter__(self) -> Discovery:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        cfg = self.config
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            # Several nodes of one machine hear one LAN port (broadcasts reach every socket
            # bound to it with SO_REUSEADDR/SO_REUSEPORT).
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if hasattr(socket, "SO_REUSEPORT"):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            sock.bind((cfg.host, cfg.port))
        except OSError as exc:
            sock.close()
            raise InvalidEndpoint(f"udp://{cfg.host}:{cfg.port}", str(exc)) from None
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: _BeaconProtocol(self),
                                                           sock=sock)
        self._transport = transport
        self.address = transport.get_extra_info("sockname")[:2]
        self._task = asyncio.create_task(self._announce(), name=f"{self.node.name}-beacons")
        log.info("[%s] discovery on udp %s:%d (mesh %r), beacons to %s", self.node.name,
                 *self.address, cfg.mesh,
                 ", ".join(f"{h}:{p}" for h, p in cfg.beacon_targets))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._transport is not None:
            self._transport.close()
        log.info("[%s] discovery closed: %s", self.node.name, self.stats)

    def beacon(self) -> bytes:
        endpoint = next((e for e in self.node.endpoints if e.startswith("tcp://")),
                        self.node.endpoints[0])
        return encode_beacon(Beacon(self.config.mesh, self.node.node_id, self.node.name,
                                    endpoint, PROTOCOL_VERSION, self._key))

    async def _announce(self) -> None:
        loop = asyncio.get_running_loop()
        data = self.beacon()
        while True:
            if self._transport is not None:
                for target in self.config.beacon_targets:
                    try:
                        self._transport.sendto(data, target)
                    except OSError as exc:
                        log.debug("[%s] beacon to %s: %s", self.node.name, target, exc)
            self._act(self.directory.expire(loop.time()))
            await asyncio.sleep(self.config.interval_s)

    def received(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            decisions = self.directory.receive(data, addr[0], asyncio.get_running_loop().time())
        except BeaconError as exc:
            log.debug("[%s] ignored datagram from %s: %s", self.node.name, addr, exc)
            return
        if any(isinstance(d, Found | Moved) for d in decisions) and self._transport is not None:
            # Answer a newcomer (or a node back elsewhere, maybe with a new memory) at once, so
            # it knows us before our Hello reaches it.
            self._transport.sendto(self.beacon(), addr)
        self._act(decisions)

    def _act(self, decisions: Sequence[Decision]) -> None:
        name = self.node.name
        for d in decisions:
            match d:
                case Found(name=peer, node_id=node_id, endpoint=endpoint):
                    try:
                        self.node.add_peer(peer, endpoint, node_id=node_id, found="beacon")
                    except MeshpostError as exc:
                        log.warning("[%s] cannot add discovered %s at %s: %s", name, peer,
                                    endpoint, exc)
                case Clash(name=peer, known_id=known, other_id=other, other_endpoint=where,
                           ours=True):
                    log.error("[%s] name clash: another node (id %s at %s) also calls itself "
                              "%r; this node is id %s. Rename one of them.", name, other,
                              where, peer, known)
                case Clash(name=peer, known_id=known, other_id=other, other_endpoint=where):
                    log.error("[%s] name clash: %r is node %s, and node %s at %s claims the "
                              "name too; keeping %s, ignoring the other", name, peer, known,
                              other, where, known)
                case Moved(name=peer, endpoint=endpoint, previous=previous):
                    log.warning("[%s] %s is heard at %s now, nothing from %s for %gs: "
                                "dialing it there", name, peer, endpoint, previous,
                                self.directory.silence_s)
                    self.node.move_peer(peer, endpoint)
                case EndpointClaim(name=peer, node_id=node_id, endpoint=endpoint,
                                   claimed=claimed):
                    log.warning("[%s] a beacon says %s (node %s) is at %s, but %s is heard at "
                                "%s: not followed (a node id is no proof; a node that moved is "
                                "followed once nothing came from its old endpoint for %gs)",
                                name, peer, node_id, claimed, peer, endpoint,
                                self.directory.silence_s)
                case Heard(name=peer, returned=returned):
                    if returned:
                        log.info("[%s] %s is heard again", name, peer)
                    self.node.peer_heard(peer)
                case Unauthorized(name=peer, node_id=node_id):
                    log.warning("[%s] ignoring %s (node %s): its name and key are not in "
                                "authorized_keys", name, peer, node_id)
                case Silent(name=peer, silent_s=silent):
                    log.info("[%s] no beacon from %s for %.1fs", name, peer, silent)


class _BeaconProtocol(asyncio.DatagramProtocol):
    def __init__(self, discovery: Discovery) -> None:
        self._discovery = discovery

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self._discovery.received(data, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("[%s] beacon socket: %s", self._discovery.node.name, exc)


__all__ = [
    "Beacon",
    "BeaconError",
    "Clash",
    "Directory",
    "Discovery",
    "DiscoveryConfig",
    "EndpointClaim",
    "Found",
    "Heard",
    "Moved",
    "Silent",
    "Unauthorized",
    "decode_beacon",
    "encode_beacon",
]

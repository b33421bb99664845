"""LAN discovery: nodes announce themselves in small UDP beacons and connect to what they hear.

Rule: a beacon is a claim, never proof. It only tells a node where to dial; who answers is
still decided by the handshake (and under --secure by the CURVE key in authorized_keys). The
beacon format and the `Directory` that judges beacons are pure; `Discovery` does the I/O.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import hashlib
import ipaddress
import logging
import math
import re
import socket
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import msgspec

from meshpost.config import NAME_PATTERN, RESERVED_NAMES, validate_endpoint
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
#: ids never makes the memory larger (and the log lines are paced: `_PacedLog`).
_REPORTS_REMEMBERED = 1024
#: At most this many nodes found by beacons: without --secure anyone on the LAN can make up
#: names, and each found one is a link (memory, a dial, a copy of every message to `all`).
DEFAULT_MAX_FOUND = 256
#: ... and at most this many from one source address (where it was first heard), so that one
#: host cannot take all of them: one that cannot forge its source (no raw sockets) leaves the
#: rest to the others. A machine of more discovering nodes needs --peer for the rest.
DEFAULT_MAX_FOUND_PER_SOURCE = 64
#: A beacon's node id and key are logged and kept: printable, short, no control characters.
NODE_ID_PATTERN = re.compile(r"[0-9A-Za-z_.-]{1,64}")
KEY_PATTERN = re.compile(r"[0-9a-f]{32}")
#: Log lines of one kind about others' beacons: this many at once, then one every
#: LOG_EVERY_S saying how many were left out (a flood of beacons was a line each).
LOG_BURST = 20
LOG_EVERY_S = 10.0


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
class Refused:
    """A beacon this node does not act on: `reason` says why (a reserved name, a name that is
    a group here, an endpoint not at the beacon's source, no room for another node)."""

    name: str
    node_id: str
    endpoint: str
    reason: str


@dataclasses.dataclass(frozen=True, slots=True)
class Silent:
    """A node not heard for `silent_s`."""

    name: str
    silent_s: float


Decision = Found | Moved | EndpointClaim | Heard | Clash | Unauthorized | Refused | Silent


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
    #: Beacons naming `all`, `me`, `*` or a group of this node.
    names_refused: int = 0
    #: Beacons whose endpoint is not at their source address (another host, a host name, an
    #: ipc path from another machine): a node is never sent to dial where a beacon points.
    endpoints_refused: int = 0
    #: New names not found because `max_found` nodes were already (`DEFAULT_MAX_FOUND`), or
    #: `max_found_per_source` from the beacon's source address.
    directory_full: int = 0
    #: Nodes found by beacons (at most `max_found`, `max_found_per_source` from one address).
    found: int = 0
    #: Log lines about beacons left out by the pacing (`LOG_BURST`, `LOG_EVERY_S`).
    lines_not_logged: int = 0


@dataclasses.dataclass(slots=True)
class _Heard:
    node_id: str
    endpoint: str
    last_heard: float
    silent: bool = False
    #: When it last moved (`Directory.follow` moves a name at most once per `silence_s`).
    moved_at: float = -math.inf


#: What the node whose beacon was refused for its endpoint's host should do.
_BIND_ADVICE = ("if it is a node of ours, bind it at tcp://0.0.0.0:PORT or at the address "
                "its beacons leave from")


def endpoint_problem(endpoint: str, source_ip: str) -> str | None:
    """Why a node must not dial `endpoint` (a beacon's, its wildcard host replaced) for a beacon
    from `source_ip`; None if it may. A beacon only says where its sender listens: a tcp
    endpoint must be at the beacon's own source address (a wildcard host is), an ipc path
    only in a beacon from this machine (loopback). Otherwise one datagram would have the node
    dial a third party, a host name (a DNS query), or a local service (tcp://127.0.0.1:6379,
    ipc:///run/...) for whoever sent it."""
    if not (endpoint.isascii() and endpoint.isprintable()) or " " in endpoint:
        return "an endpoint not in printable ASCII"
    try:
        validate_endpoint(endpoint, for_bind=False)
    except InvalidEndpoint as exc:
        return str(exc)
    host = endpoint[len("tcp://"):].rpartition(":")[0].strip("[]")
    if host == source_ip and endpoint.startswith("tcp://"):
        return None  # the usual case, decided without `ipaddress` (a few microseconds)
    try:
        source = ipaddress.ip_address(source_ip)
    except ValueError as exc:
        return str(exc)
    if endpoint.startswith("ipc://"):
        return None if source.is_loopback else "an ipc path in a beacon from another machine"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return (f"its host {host!r} is a name, not the beacon's source address {source_ip} "
                f"({_BIND_ADVICE})")
    if address != source:
        return f"its host is not the beacon's source address {source_ip} ({_BIND_ADVICE})"
    return None


class Directory:
    """Which node holds which name, as beacons tell it. Time comes in as `now` (seconds).

    The first node heard under a name keeps it while it is heard; another node id claiming
    it is a `Clash`, reported every `silence_s` at most, and never dialed. The endpoint a node
    is dialed at changes only once nothing came from the old one for `silence_s` (`Moved`):
    until then a beacon giving another endpoint is an `EndpointClaim`, reported as rarely.

    Under --secure (`authorized` given) a name's key proves who answers it, not the node id a
    beacon says (anyone can copy it, and the key's fingerprint, from the real node's beacon):
    another node id under a found name is the same node as far as dialing goes (the endpoint
    rules apply), so a beacon sent before the real node's cannot keep it out by its node id,
    and `follow` moves a node away from an endpoint where nothing answers.

    A beacon naming a configured peer (`configured`) only counts as hearing it: its endpoint
    is the configuration's, and a beacon's node id is not pinned for it. At most `max_found`
    names are found, `max_found_per_source` of them first heard from one source address; a
    beacon for another is `Refused` (`directory_full`).
    """

    def __init__(
        self, *, mesh: str, name: str, node_id: str, silence_s: float = DEFAULT_SILENCE_S,
        authorized: Callable[[str, str | None], bool] | None = None,
        max_found: int = DEFAULT_MAX_FOUND, configured: frozenset[str] = frozenset(),
        is_group: Callable[[str], bool] | None = None,
        max_found_per_source: int = DEFAULT_MAX_FOUND_PER_SOURCE,
    ) -> None:
        self.mesh, self.name, self.node_id = mesh, name, node_id
        self.silence_s = silence_s
        self.max_found = max_found
        self.max_found_per_source = max_found_per_source
        #: Names found, by the source address they were first heard from.
        self._found_from: collections.Counter[str] = collections.Counter()
        self.configured = configured
        self._authorized = authorized
        self._is_group = is_group
        self.stats = DiscoveryStats()
        self._heard: dict[str, _Heard] = {}
        self._reported: dict[tuple[str, str], float] = {}

    @property
    def secure(self) -> bool:
        return self._authorized is not None

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
            # Said (paced, as garbage is): a node of another version on the LAN, or someone
            # speaking for one, is worth an operator's look; ignored either way.
            self.stats.other_version += 1
            raise BeaconError(f"a beacon of protocol {beacon.protocol}; this node speaks "
                              f"{PROTOCOL_VERSION} (a node of another meshpost version?)")
        if (not NAME_PATTERN.fullmatch(beacon.name)
                or not NODE_ID_PATTERN.fullmatch(beacon.node_id)
                or (beacon.key is not None and not KEY_PATTERN.fullmatch(beacon.key))
                or not (beacon.endpoint.isascii() and beacon.endpoint.isprintable())):
            # Printable and short, as what is logged and kept must be (a node id or endpoint
            # of escape sequences or bidi controls reached the log raw in a clash line).
            self.stats.garbage += 1
            raise BeaconError("a name, node id, key or endpoint of the wrong form")
        if beacon.node_id == self.node_id:
            return []  # our own beacon, looped back
        endpoint = dial_endpoint(beacon.endpoint, source_ip)
        if beacon.name == self.name:
            return self._clash(beacon.name, self.node_id, beacon, endpoint, now, ours=True)
        if beacon.name.lower() in RESERVED_NAMES:
            self.stats.names_refused += 1
            return [Refused(beacon.name, beacon.node_id, endpoint,
                            "a reserved word, never a node's name")]
        if self._authorized is not None and not self._authorized(beacon.name, beacon.key):
            self.stats.unauthorized += 1
            if self._first_in_period(("unauthorized", beacon.node_id), now):
                return [Unauthorized(beacon.name, beacon.node_id)]
            return []
        if beacon.name in self.configured:
            # The configuration says where it is (a beacon never moves it) and check 6 of the
            # listener who it is; a beacon's node id pinned for it would refuse the real one.
            return [Heard(beacon.name, returned=False)]
        heard = self._heard.get(beacon.name)
        if heard is not None and heard.endpoint == endpoint and heard.node_id == beacon.node_id:
            # A found node again, where it was found (its endpoint checked then): the usual
            # beacon, every second from every node, so the cheapest path.
            returned, heard.silent, heard.last_heard = heard.silent, False, now
            return [Heard(beacon.name, returned)]
        problem = endpoint_problem(endpoint, source_ip)
        if problem is not None:
            self.stats.endpoints_refused += 1
            return [Refused(beacon.name, beacon.node_id, endpoint, problem)]
        if heard is not None and heard.node_id != beacon.node_id and not self.secure:
            # Even if the name's holder went silent it keeps the name: messages queued for it
            # are its own, and a newcomer must not receive them.
            return self._clash(beacon.name, heard.node_id, beacon, endpoint, now, ours=False)
        if heard is None:
            if self._is_group is not None and self._is_group(beacon.name):
                # Found, the name would be a peer's and no longer the group's: `send team`
                # would go to whoever beaconed "team".
                self.stats.names_refused += 1
                return [Refused(beacon.name, beacon.node_id, endpoint, "a group of this node")]
            if len(self._heard) >= self.max_found:
                self.stats.directory_full += 1
                return [Refused(beacon.name, beacon.node_id, endpoint,
                                f"{self.max_found} nodes found already (the most kept)")]
            if self._found_from[source_ip] >= self.max_found_per_source:
                self.stats.directory_full += 1
                return [Refused(beacon.name, beacon.node_id, endpoint,
                                f"{self.max_found_per_source} nodes found from {source_ip} "
                                "already (the most kept from one address)")]
            self._found_from[source_ip] += 1
            self._heard[beacon.name] = _Heard(beacon.node_id, endpoint, now)
            self.stats.found += 1
            return [Found(beacon.name, beacon.node_id, endpoint)]
        if heard.endpoint != endpoint:
            if now - heard.last_heard < self.silence_s:
                # Still heard where it is: a beacon elsewhere proves nothing (it does not
                # keep the node heard either, or it could keep a node that moved unfollowed).
                self.stats.endpoint_claims += 1
                if self._first_in_period((beacon.name, endpoint), now):
                    return [EndpointClaim(beacon.name, beacon.node_id, heard.endpoint, endpoint)]
                return []
            return [self._move(beacon.name, heard, beacon.node_id, endpoint, now)]
        returned, heard.silent, heard.last_heard = heard.silent, False, now
        return [Heard(beacon.name, returned)]

    def _move(self, name: str, heard: _Heard, node_id: str, endpoint: str,
              now: float) -> Moved:
        previous, heard.endpoint, heard.node_id = heard.endpoint, endpoint, node_id
        heard.silent, heard.last_heard, heard.moved_at = False, now, now
        return Moved(name, node_id, endpoint, previous)

    def follow(self, claim: EndpointClaim, now: float) -> Moved | None:
        """Under --secure, move `claim`'s node to the endpoint it claims, when the caller saw
        that nothing answers where it is dialed (the key proves who answers at the claimed
        one); at most once per `silence_s` a name, so two endpoints beaconing one name cost a
        redial per period, not one per beacon. None if not now."""
        heard = self._heard.get(claim.name)
        if (not self.secure or heard is None or heard.endpoint != claim.endpoint
                or now - heard.moved_at < self.silence_s):
            return None
        return self._move(claim.name, heard, claim.node_id, claim.claimed, now)

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


#: Link states (`PeerStatus.state`) in which nothing answers where the link dials: under
#: --secure a beacon giving the name another endpoint is followed from them (`follow`).
#: Not `ready` (answered), `idle` (no connection: may have answered before), `refused` (the
#: key holder answered, and refused).
_NO_ANSWER = frozenset({"connecting", "lost", "left"})


class _PacedLog:
    """Log lines of one kind about others' beacons: a token bucket of LOG_BURST lines, one
    more every LOG_EVERY_S. A line that goes out says how many were left out before it."""

    __slots__ = ("_tokens", "_unlogged", "_updated_at")

    def __init__(self) -> None:
        self._tokens = float(LOG_BURST)
        self._updated_at = -math.inf
        self._unlogged = 0

    def allow(self, now: float) -> str | None:
        """None if this line is left out; else what to add at its end."""
        self._tokens = min(float(LOG_BURST),
                           self._tokens + max(0.0, now - self._updated_at) / LOG_EVERY_S)
        self._updated_at = max(self._updated_at, now)
        if self._tokens < 1.0:
            self._unlogged += 1
            return None
        self._tokens -= 1.0
        tail = f" ({self._unlogged} such lines left out before this one)" if self._unlogged else ""
        self._unlogged = 0
        return tail


class Discovery:
    """Beacons of one node: announce it, dial what is heard. `async with Discovery(...)`."""

    def __init__(self, node: Node, config: DiscoveryConfig, *,
                 public_key: bytes | None = None,
                 authorized_keys: dict[str, bytes] | None = None,
                 max_found: int = DEFAULT_MAX_FOUND) -> None:
        self.node = node
        self.config = config
        self._key = key_fingerprint(public_key) if public_key is not None else None
        authorized = None
        if authorized_keys is not None:
            # The keys in force are the node's (`keys reload` and SIGHUP replace them while it
            # runs), those given here only until it has some: a key added by a reload is
            # found, a removed one is `Unauthorized`, as the handshake decides.
            in_force: Mapping[str, bytes] = authorized_keys
            prints = {name: key_fingerprint(k) for name, k in authorized_keys.items()}

            def authorized(name: str, key: str | None) -> bool:
                nonlocal in_force, prints
                current = node.authorized_keys
                if current is not None and current is not in_force:  # a reload: a new dict
                    in_force = current
                    prints = {n: key_fingerprint(k) for n, k in current.items()}
                return key is not None and prints.get(name) == key

        self.directory = Directory(mesh=config.mesh, name=node.name, node_id=node.node_id,
                                   silence_s=config.silence_s, authorized=authorized,
                                   max_found=max_found,
                                   configured=frozenset(p.name for p in node.config.peers),
                                   is_group=node.is_group)
        self._transport: asyncio.DatagramTransport | None = None
        self._task: asyncio.Task[None] | None = None
        self.address: tuple[str, int] | None = None
        self._paced: dict[str, _PacedLog] = {}
        #: Whether an early beacon went out since the last regular one (at most one does).
        self._answered = False
        #: When each name last made a refused link ask again (`Node.peer_heard`): at most once
        #: per beacon interval, whatever the number of beacons naming it.
        self._retried: dict[str, float] = {}

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
        # Seen while it runs (control `status` roles.discovery, `meshpost peers`), not only in
        # the line at close: what beacons it refused is counted where its user looks.
        self.node.add_role_counters("discovery", lambda: dataclasses.asdict(self.stats))
        log.info("[%s] discovery on udp %s:%d (mesh %r), beacons to %s", self.node.name,
                 *self.address, cfg.mesh,
                 ", ".join(f"{h}:{p}" for h, p in cfg.beacon_targets))

    async def close(self) -> None:
        self.node.remove_role_counters("discovery")
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

    def _send_beacon(self) -> None:
        """Our beacon to our targets (never elsewhere: a beacon's source can be forged)."""
        if self._transport is None:
            return
        data = self.beacon()
        for target in self.config.beacon_targets:
            try:
                self._transport.sendto(data, target)
            except OSError as exc:
                log.debug("[%s] beacon to %s: %s", self.node.name, target, exc)

    async def _announce(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._send_beacon()
            self._answered = False
            self._act(self.directory.expire(loop.time()), loop.time())
            await asyncio.sleep(self.config.interval_s)

    def received(self, data: bytes, addr: tuple[str, int]) -> None:
        now = asyncio.get_running_loop().time()
        try:
            decisions = self.directory.receive(data, addr[0], now)
        except BeaconError as exc:
            self._log(logging.INFO, "garbage", now, "[%s] ignored a datagram from %s: %s",
                      self.node.name, addr[0], exc)
            return
        if any(isinstance(d, Found | Moved) for d in decisions) and not self._answered:
            # Tell a newcomer (or a node back elsewhere, maybe with a new memory) about us at
            # once, so it knows us before our Hello reaches it: an early beacon to our usual
            # targets, at most one between two regular ones. Not to the datagram's source,
            # which anyone can forge: a beacon would make us send to a victim of its choice.
            self._answered = True
            self._send_beacon()
        self._act(decisions, now)

    def _log(self, level: int, kind: str, now: float, fmt: str, *args: object) -> None:
        """Log a line about others' beacons, paced per `kind` (`_PacedLog`)."""
        paced = self._paced.get(kind)
        if paced is None:
            paced = self._paced[kind] = _PacedLog()
        tail = paced.allow(now)
        if tail is None:
            self.stats.lines_not_logged += 1
            return
        log.log(level, fmt + "%s", *args, tail)

    def _act(self, decisions: Sequence[Decision], now: float) -> None:
        name = self.node.name
        for d in decisions:
            match d:
                case Found(name=peer, node_id=node_id, endpoint=endpoint):
                    try:
                        # Under --secure the key proves who answers; a beacon's node id,
                        # anyone's to copy, pinned for the name would refuse the real node.
                        self.node.add_peer(peer, endpoint, found="beacon",
                                           node_id=None if self.directory.secure else node_id)
                    except MeshpostError as exc:
                        self._log(logging.WARNING, "refused", now,
                                  "[%s] cannot add discovered %s at %s: %s", name, peer,
                                  endpoint, exc)
                case Clash(name=peer, known_id=known, other_id=other, other_endpoint=where,
                           ours=True):
                    self._log(logging.ERROR, "clash", now,
                              "[%s] name clash: another node (id %s at %s) also calls itself "
                              "%r; this node is id %s. Rename one of them.", name, other,
                              where, peer, known)
                case Clash(name=peer, known_id=known, other_id=other, other_endpoint=where):
                    self._log(logging.ERROR, "clash", now,
                              "[%s] name clash: %r is node %s, and node %s at %s claims the "
                              "name too; keeping %s, ignoring the other", name, peer, known,
                              other, where, known)
                case Moved(name=peer, endpoint=endpoint, previous=previous):
                    self._log(logging.WARNING, "moved", now,
                              "[%s] %s is heard at %s now, nothing from %s for %gs (or, under "
                              "--secure, no answer there): dialing it there", name, peer,
                              endpoint, previous, self.directory.silence_s)
                    self.node.move_peer(peer, endpoint)
                case EndpointClaim(name=peer, node_id=node_id, endpoint=endpoint,
                                   claimed=claimed):
                    if (self.directory.secure and self.node.peer_state(peer) in _NO_ANSWER
                            and (moved := self.directory.follow(d, now)) is not None):
                        # Under --secure, where it is dialed nothing answers now (a beacon
                        # that came before the real node's with its key's fingerprint, or
                        # one that took a silent node's name elsewhere): the key decides at
                        # the claimed endpoint.
                        self._act([moved], now)
                        continue
                    self._log(logging.WARNING, "claim", now,
                              "[%s] a beacon says %s (node %s) is at %s, but %s is heard at "
                              "%s: not followed (a node id is no proof; a node that moved is "
                              "followed once nothing came from its old endpoint for %gs)",
                              name, peer, node_id, claimed, peer, endpoint,
                              self.directory.silence_s)
                case Heard(name=peer, returned=returned):
                    if returned:
                        self._log(logging.INFO, "presence", now, "[%s] %s is heard again",
                                  name, peer)
                    if now - self._retried.get(peer, -math.inf) >= self.config.interval_s:
                        # A copy of a node's beacon can come as often as anyone sends it; a
                        # refused link asks again at most once a beacon interval for it.
                        self._retried[peer] = now
                        self.node.peer_heard(peer)
                case Unauthorized(name=peer, node_id=node_id):
                    self._log(logging.WARNING, "unauthorized", now,
                              "[%s] ignoring %s (node %s): its name and key are not in "
                              "authorized_keys", name, peer, node_id)
                case Refused(name=peer, node_id=node_id, endpoint=endpoint, reason=reason):
                    self._log(logging.WARNING, "refused", now,
                              "[%s] ignoring a beacon naming %s (node %s at %s): %s", name,
                              peer, node_id, endpoint, reason)
                case Silent(name=peer, silent_s=silent):
                    self._log(logging.INFO, "presence", now, "[%s] no beacon from %s for %.1fs",
                              name, peer, silent)


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
    "Refused",
    "Silent",
    "Unauthorized",
    "decode_beacon",
    "encode_beacon",
]

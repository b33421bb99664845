"""Configuration: TOML files and command-line flags become one frozen, validated object.

Rule: nothing else in meshpost reads files or environment variables to configure a node; the
node receives a `NodeConfig` and trusts it.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from meshpost.errors import ConfigError, InvalidEndpoint, InvalidName

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
#: What NAME_PATTERN allows, for a user who gave something else.
NAME_RULE = "use 1-63 letters A-Z a-z, digits, '_', '.', '-', starting with a letter or digit"
#: Names that mean something else on the console and the CLI.
RESERVED_NAMES = frozenset({"all", "me", "*"})

#: 64 KiB: large enough for any typed text, small enough that a batch of them fits in memory.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024
#: Messages, and their memory (body characters + 256 each), one link holds unacknowledged.
#: 32,768: measured against 16,384 (docs/benchmarks.md, "Constants and their figures").
DEFAULT_WINDOW = 32_768
DEFAULT_WINDOW_BYTES = 16 * 1024 * 1024
#: 60 s: long enough that a conversation (a message every few seconds) keeps its connection,
#: short enough that a 1,000-node mesh where each node talks to a few peers holds few sockets.
DEFAULT_LINK_IDLE_S = 60.0
#: 30 s: an attached console polls its `events` subscription every second, so a client that
#: has not polled for this long went away; its subscription's events are then freed.
DEFAULT_SUBSCRIBER_IDLE_S = 30.0
#: 4 s of silence from a peer with something pending (or a link used that recently) = lost.
DEFAULT_PEER_TIMEOUT_S = 4.0
#: 8: a console user of a small mesh sees who is up at start; a mesh config of hundreds of
#: nodes (every node every other's peer) would otherwise open n^2 connections at once.
DEFAULT_DIAL_AT_START = 8
#: Hard ceiling for the configurable limit; ZeroMQ frames above this are refused outright.
MAX_MESSAGE_BYTES_CEILING = 16 * 1024 * 1024
#: Largest `window`: 2**30 messages of at least 256 bytes each is 256 GiB held, far past any
#: `window_bytes` worth setting. Above 2**63 the store cannot even be asked for that many
#: rows: a node with `window = 1e20`'s integer ran, its link's reader failed at start, and
#: every message to that peer was stored and never sent.
WINDOW_CEILING = 1 << 30
#: Shortest duration: below this a timer's deadline can equal `now` (1e-300 s made a node spin
#: at start and ignore SIGTERM); no timer of the protocol means anything that short.
MIN_DURATION_S = 0.001

SyncLevel = Literal["full", "normal"]

#: A tcp host ZeroMQ can resolve without brackets: a DNS name, an IPv4 address or (to bind)
#: an interface name. Labels of letters, digits, '-' and '_', joined by dots.
_TCP_HOST_PATTERN = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*\.?$")


def validate_name(name: str, what: str = "node") -> str:
    """Return `name` if it can name a node (or a group, queue, mesh: `what`, which the error
    names), else raise `InvalidName`."""
    if name.lower() in RESERVED_NAMES:
        raise InvalidName(name, "reserved word", what)
    if not NAME_PATTERN.fullmatch(name):  # `match` would let "name\n" through `$`
        ascii_only = "" if name.isascii() else "ASCII only: "
        raise InvalidName(
            name,
            f"{ascii_only}{NAME_RULE}",
            what,
        )
    return name


def validate_endpoint(endpoint: str, *, for_bind: bool) -> str:
    """Check a ZeroMQ endpoint we support (`tcp://host:port`, `ipc://path`)."""
    if endpoint.startswith("ipc://"):
        path = endpoint[len("ipc://") :]
        if not path:
            raise InvalidEndpoint(endpoint, "ipc endpoint needs a path")
        # Linux unix sockets hold at most 107 bytes of path.
        if len(path.encode()) > 107:
            raise InvalidEndpoint(endpoint, "ipc path is longer than 107 bytes")
        return endpoint
    if endpoint.startswith("tcp://"):
        rest = endpoint[len("tcp://") :]
        host, sep, port = rest.rpartition(":")
        if not sep or not host:
            raise InvalidEndpoint(endpoint, "expected tcp://HOST:PORT")
        if not for_bind and host in ("*", "0.0.0.0", "[::]"):
            raise InvalidEndpoint(endpoint, "cannot connect to a wildcard address")
        _check_tcp_host(endpoint, host)
        if port == "*" and for_bind:
            return endpoint
        # isascii: str.isdigit() also accepts digits int() refuses ("²") or zmq would ("٣").
        if not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
            raise InvalidEndpoint(endpoint, f"port {port!r} is not a number from 1 to 65535")
        return endpoint
    raise InvalidEndpoint(endpoint, "supported transports are tcp:// and ipc://")


def _check_tcp_host(endpoint: str, host: str) -> None:
    """Refuse a host ZeroMQ would fail to resolve later, or read otherwise than the user
    meant: an IPv6 address without brackets (is `tcp://::1:7000` port 7000 of `::1`, or
    port 1:7000?), or text that is neither an address nor a name."""
    if host == "*":  # the wildcard of a bind (a connect to it was refused above)
        return
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise InvalidEndpoint(endpoint, f"{host} is not an IPv6 address") from None
        return
    if ":" in host:
        raise InvalidEndpoint(endpoint, "an IPv6 address goes in brackets: tcp://[::1]:PORT")
    if not _TCP_HOST_PATTERN.fullmatch(host):  # `match` would let "name\n" through `$`
        raise InvalidEndpoint(
            endpoint, f"host {host!r} is not an IPv4 address, a host name or an interface"
        )


def is_local_endpoint(endpoint: str) -> bool:
    """True for an endpoint only this machine can reach: ipc://, or tcp:// on a loopback
    address, `localhost` or the `lo` interface. Wildcards, other addresses, other names and
    interfaces are not."""
    if endpoint.startswith("ipc://"):
        return True
    host = endpoint[len("tcp://") :].rpartition(":")[0]
    if host in ("localhost", "lo"):
        return True
    try:
        return ipaddress.ip_address(host.removeprefix("[").removesuffix("]")).is_loopback
    except ValueError:
        return False


@dataclasses.dataclass(frozen=True, slots=True)
class PeerConfig:
    """A peer this node talks to: its name and the endpoint it listens on."""

    name: str
    endpoint: str

    def __post_init__(self) -> None:
        validate_name(self.name)
        validate_endpoint(self.endpoint, for_bind=False)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class NodeConfig:
    """Everything one node needs to run. Build it with `MeshConfig.node()` or directly."""

    name: str
    bind: tuple[str, ...]
    peers: tuple[PeerConfig, ...] = ()
    data_dir: Path
    groups: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    sync: SyncLevel = "full"
    #: Messages held in memory per peer (queued and in flight) before waiting for receipts,
    #: and the memory they may take (body characters + 256 bytes each): both bound a link.
    window: int = DEFAULT_WINDOW
    window_bytes: int = DEFAULT_WINDOW_BYTES
    #: First retransmission delay; doubles per silent round up to `retransmit_max_s`.
    retransmit_initial_s: float = 0.5
    retransmit_max_s: float = 5.0
    #: Application ping period and the silence after which a peer counts as gone.
    ping_interval_s: float = 1.0
    peer_timeout_s: float = DEFAULT_PEER_TIMEOUT_S
    #: A link with nothing to send for this long closes its connection (and reopens on the
    #: next message); 0: links stay open. An idle link then costs no socket, timer or frame.
    link_idle_s: float = DEFAULT_LINK_IDLE_S
    #: A node with at most this many peers dials them all at start (a small mesh shows who
    #: is up at once); with more, each link opens on its first message (or `Node.connect`).
    dial_at_start: int = DEFAULT_DIAL_AT_START
    #: The control server drops an `events` subscription whose client has not polled for
    #: this long (`meshpost attach`: a client that went away frees its events).
    subscriber_idle_s: float = DEFAULT_SUBSCRIBER_IDLE_S
    secure: bool = False
    #: Bind beyond loopback without CURVE anyway (`--insecure`): anyone who can reach the
    #: port can then read, send and claim any peer's name.
    insecure: bool = False
    #: Inbound connections kept at once; more are shut down as they are accepted, so idle
    #: ones cannot use up the descriptors the node needs. None: derived from the descriptor
    #: limit (`meshpost.transport.inbound.default_inbound_cap`).
    max_inbound_connections: int | None = None
    #: Accept exactly this one peer and refuse every other (`--exclusive PEER`, seed 000's
    #: PAIR); it must be the only peer listed. None: any listed peer.
    exclusive: str | None = None

    def __post_init__(self) -> None:
        validate_name(self.name)
        _check_types(self)
        if not self.bind:
            raise ConfigError(f"node {self.name!r} needs at least one --bind endpoint")
        for endpoint in self.bind:
            validate_endpoint(endpoint, for_bind=True)
        exposed = [e for e in self.bind if not is_local_endpoint(e)]
        if exposed and not self.secure and not self.insecure:
            # Mosquitto 2.0's rule: without authentication, listen on this machine only.
            raise ConfigError(
                f"node {self.name!r} would listen beyond this machine ({', '.join(exposed)}) "
                "without authentication: anyone who can reach the port could read, send and "
                "claim any peer's name. Use --secure (CURVE keys), or --insecure to accept that"
            )
        names = [p.name for p in self.peers]
        if len(set(names)) != len(names):
            raise ConfigError(f"node {self.name!r} lists a peer twice: {sorted(names)}")
        if self.name in names:
            raise ConfigError(f"node {self.name!r} lists itself as a peer")
        if self.exclusive is not None:
            validate_name(self.exclusive)
            if names != [self.exclusive]:
                raise ConfigError(
                    f"node {self.name!r} is exclusive to {self.exclusive!r}, which must then "
                    f"be its only peer (give --peer {self.exclusive}=ENDPOINT); it lists "
                    f"{names or 'none'}")
        if not 0 < self.max_message_bytes <= MAX_MESSAGE_BYTES_CEILING:
            raise ConfigError(
                f"max_message_bytes must be between 1 and {MAX_MESSAGE_BYTES_CEILING}"
            )
        if self.sync not in ("full", "normal"):
            raise ConfigError(f"sync must be 'full' or 'normal', not {self.sync!r}")
        if not 1 <= self.window <= WINDOW_CEILING:
            raise ConfigError(f"window must be between 1 and {WINDOW_CEILING} messages, "
                              f"not {self.window}")
        if self.window_bytes < 1:
            raise ConfigError("window_bytes must be at least 1")
        for group, members in self.groups.items():
            validate_name(group, "group")
            if group in names or group == self.name:
                raise ConfigError(
                    f"group {group!r} has the name of a node; `@{group}` would be ambiguous, "
                    "rename the group"
                )
            unknown = [m for m in members if m not in names and m != self.name]
            if unknown:
                raise ConfigError(f"group {group!r} names unknown nodes {unknown}")

    @property
    def peer_names(self) -> list[str]:
        return [p.name for p in self.peers]

    def peer(self, name: str) -> PeerConfig | None:
        for p in self.peers:
            if p.name == name:
                return p
        return None


_WHOLE_NUMBERS = ("max_message_bytes", "window", "window_bytes", "dial_at_start")
_DURATIONS = ("retransmit_initial_s", "retransmit_max_s", "ping_interval_s", "peer_timeout_s",
              "subscriber_idle_s")


def _check_types(cfg: NodeConfig) -> None:
    """Options may come from TOML or flags: a wrong type is a `ConfigError`, not a crash."""
    for field in _WHOLE_NUMBERS:
        value = getattr(cfg, field)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{field} must be a whole number, not {value!r}")
    for field in _DURATIONS:
        value = getattr(cfg, field)
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise ConfigError(f"{field} must be a positive number of seconds, not {value!r}")
        if value < MIN_DURATION_S:
            raise ConfigError(f"{field} must be at least {MIN_DURATION_S} s (a millisecond), "
                              f"not {value!r}")
    idle = cfg.link_idle_s
    if (isinstance(idle, bool) or not isinstance(idle, int | float) or not idle >= 0
            or 0 < idle < MIN_DURATION_S):
        raise ConfigError(f"link_idle_s must be a number of seconds (0: never idle; else at "
                          f"least {MIN_DURATION_S}), not {idle!r}")
    if cfg.dial_at_start < 0:
        raise ConfigError(f"dial_at_start must be 0 or more, not {cfg.dial_at_start}")
    if not isinstance(cfg.secure, bool):
        raise ConfigError(f"secure must be true or false, not {cfg.secure!r}")
    if not isinstance(cfg.insecure, bool):
        raise ConfigError(f"insecure must be true or false, not {cfg.insecure!r}")
    cap = cfg.max_inbound_connections
    if cap is not None and (not isinstance(cap, int) or isinstance(cap, bool) or cap < 1):
        raise ConfigError(f"max_inbound_connections must be a whole number of at least 1, "
                          f"not {cap!r}")


def select_names(order: Sequence[str], spec: str, *, flag: str = "--nodes",
                 where: str = "the mesh config") -> list[str]:
    """Names of `order` that `spec` means: `A,B,C`, a range `n001..n050` (both ends, in
    `order`), or a mix (`A,n001..n010`); each once. `ConfigError` for a name not in `order`
    (`flag` and `where` say which option and which list, for the message)."""
    index = {name: i for i, name in enumerate(order)}
    chosen: list[str] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        first, sep, last = part.partition("..")
        for end in (first, last) if sep else (first,):
            if end not in index:
                raise ConfigError(f"{flag} names {end!r}, which {where} does not "
                                  f"have (it has {order[0]}..{order[-1]})")
        if sep:
            a, b = index[first], index[last]
            if a > b:
                raise ConfigError(f"{flag} range {part!r} runs backwards in {where}")
            chosen += order[a : b + 1]
        else:
            chosen.append(first)
    if not chosen:
        raise ConfigError(f"{flag} names no node")
    return list(dict.fromkeys(chosen))


def default_data_dir(name: str) -> Path:
    """Per-node data folder under the user's data directory (honours XDG_DATA_HOME)."""
    import platformdirs

    base = os.environ.get("XDG_DATA_HOME")
    root = Path(base) / "meshpost" if base else Path(platformdirs.user_data_dir("meshpost"))
    return root / name


#: A node's roles in its `[nodes.NAME]` table, named as `meshpost node`'s flags: what
#: `meshpost.roles.roles_from_options` reads (its ROLE_OPTIONS give each one's type).
NODE_ROLE_KEYS = frozenset({"echo", "worker", "text_listen", "udp_listen", "text_idle_gap",
                            "discover", "discover_host", "beacon_to", "mesh",
                            "beacon_interval", "prefetch"})


@dataclasses.dataclass(frozen=True, slots=True)
class MeshNodeEntry:
    name: str
    bind: tuple[str, ...]
    connect: str
    data_dir: Path | None
    #: The nodes this one links to (`peers = [...]` in its table); None: every node.
    peers: tuple[str, ...] | None = None
    #: Its roles (`echo = true`, `worker = ["Q=HANDLER"]`, ...: NODE_ROLE_KEYS) as written;
    #: `meshpost.roles` checks and builds them, for `meshpost node` and `meshpost host`.
    roles: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True, slots=True)
class MeshConfig:
    """A whole mesh as described by a TOML file: every node, its endpoints, groups, options."""

    nodes: tuple[MeshNodeEntry, ...]
    groups: Mapping[str, tuple[str, ...]]
    options: Mapping[str, Any]
    #: Who each node with a `peers` list is listed by (built once: a 1,000-node file asks
    #: it for every node it hosts).
    _listed_by: Mapping[str, frozenset[str]] = dataclasses.field(
        default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        listed_by: dict[str, set[str]] = {}
        for n in self.nodes:
            for p in n.peers or ():
                listed_by.setdefault(p, set()).add(n.name)
        object.__setattr__(self, "_listed_by",
                           {k: frozenset(v) for k, v in listed_by.items()})

    def linked(self, name: str) -> list[str]:
        """The nodes `name` links to, in file order. A link is symmetric: A and B talk when
        A lists B, B lists A, or either has no `peers` list (which means every node), so a
        receiver always accepts the nodes that send to it."""
        me = next((n for n in self.nodes if n.name == name), None)
        mine = None if me is None or me.peers is None else set(me.peers)
        listed_by = self._listed_by.get(name, frozenset())
        return [n.name for n in self.nodes if n.name != name and (
            mine is None or n.peers is None or n.name in mine or n.name in listed_by)]

    @classmethod
    def load(cls, path: Path) -> MeshConfig:
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"mesh config {path} does not exist") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read mesh config {path}: {exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"mesh config {path} is not valid TOML: {exc}") from None
        return cls.from_dict(raw, base_dir=path.parent)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], *, base_dir: Path) -> MeshConfig:
        nodes_raw = raw.get("nodes")
        if not isinstance(nodes_raw, Mapping) or not nodes_raw:
            raise ConfigError("mesh config needs a [nodes.NAME] table for every node")
        nodes: list[MeshNodeEntry] = []
        for name, entry in nodes_raw.items():
            validate_name(name)
            if not isinstance(entry, Mapping):
                raise ConfigError(f"[nodes.{name}] must be a table")
            unknown = sorted(set(entry) - {"bind", "connect", "data", "peers"} - NODE_ROLE_KEYS)
            if unknown:
                raise ConfigError(
                    f"[nodes.{name}] has unknown keys {unknown}; known: bind, connect, data, "
                    f"peers, and the roles {', '.join(sorted(NODE_ROLE_KEYS))}"
                )
            bind = entry.get("bind")
            if isinstance(bind, str):
                bind = [bind]
            if not isinstance(bind, list) or not bind or not all(isinstance(b, str) for b in bind):
                raise ConfigError(f"[nodes.{name}] needs bind = [\"tcp://HOST:PORT\", ...]")
            connect = entry.get("connect", bind[0])
            if not isinstance(connect, str):
                raise ConfigError(f"[nodes.{name}] connect must be a string endpoint")
            data = entry.get("data")
            if data is not None and not isinstance(data, str):
                raise ConfigError(f"[nodes.{name}] data must be a directory path string")
            data_dir = (base_dir / data) if isinstance(data, str) else None
            peers = entry.get("peers")
            if peers is not None and (not isinstance(peers, list)
                                      or not all(isinstance(p, str) for p in peers)):
                raise ConfigError(f"[nodes.{name}] peers must be a list of node names")
            nodes.append(MeshNodeEntry(name, tuple(bind), connect, data_dir,
                                       None if peers is None else tuple(peers),
                                       {k: v for k, v in entry.items() if k in NODE_ROLE_KEYS}))
        known = {n.name for n in nodes}
        for n in nodes:
            strangers = sorted(set(n.peers or ()) - known)
            if strangers:
                raise ConfigError(f"[nodes.{n.name}] peers names nodes not in the file: "
                                  f"{strangers[:5]}")
        groups_raw = raw.get("groups", {})
        if not isinstance(groups_raw, Mapping):
            raise ConfigError("[groups] must map a group name to a list of node names")
        groups: dict[str, tuple[str, ...]] = {}
        for group, members in groups_raw.items():
            validate_name(group, "group")
            if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
                raise ConfigError(f"group {group!r} must be a list of node names")
            groups[group] = tuple(members)
        options_raw = raw.get("mesh", {})
        if not isinstance(options_raw, Mapping):
            raise ConfigError("[mesh] must be a table of options")
        options = dict(options_raw)
        return cls(tuple(nodes), groups, options)

    def roles(self, name: str) -> Mapping[str, Any]:
        """Node `name`'s role options as its table gives them (none: {})."""
        me = next((n for n in self.nodes if n.name == name), None)
        if me is None:
            raise ConfigError(f"node {name!r} is not in the mesh config")
        return me.roles

    def node(self, name: str, *, data_dir: Path | None = None, **overrides: Any) -> NodeConfig:
        """The `NodeConfig` for node `name`: every other node in the file it links to is its
        peer (`linked`: all of them unless `peers` lists are given; only the one named by
        `exclusive=`, when given, and groups keep only that pair). Groups keep the members
        this node links to."""
        me = next((n for n in self.nodes if n.name == name), None)
        if me is None:
            raise ConfigError(
                f"node {name!r} is not in the mesh config (it lists "
                f"{', '.join(n.name for n in self.nodes)})"
            )
        options = {**self.options, **overrides}
        allowed = {f.name for f in dataclasses.fields(NodeConfig)} - {
            "name", "bind", "peers", "data_dir", "groups"
        }
        unknown = set(options) - allowed
        if unknown:
            raise ConfigError(f"unknown mesh options {sorted(unknown)}; known: {sorted(allowed)}")
        linked = set(self.linked(name))
        peers = tuple(PeerConfig(n.name, n.connect) for n in self.nodes if n.name in linked)
        groups = dict(self.groups)
        if len(linked) < len(self.nodes) - 1:  # a partial mesh: groups keep reachable members
            groups = {g: tuple(m for m in ms if m in linked or m == name)
                      for g, ms in groups.items()}
        pair = options.get("exclusive")
        if pair is not None:
            peers = tuple(p for p in peers if p.name == pair)
            kept = {g: tuple(m for m in ms if m in (pair, name)) for g, ms in groups.items()}
            groups = {g: ms for g, ms in kept.items() if ms}
        return NodeConfig(
            name=name,
            bind=me.bind,
            peers=peers,
            data_dir=data_dir or me.data_dir or default_data_dir(name),
            groups=groups,
            **options,
        )


def parse_peer_flag(value: str) -> PeerConfig:
    """Parse `NAME=ENDPOINT` from `--peer`."""
    name, sep, endpoint = value.partition("=")
    if not sep:
        raise ConfigError(f"--peer expects NAME=ENDPOINT, got {value!r}")
    return PeerConfig(name.strip(), endpoint.strip())


def parse_group_flag(value: str) -> tuple[str, tuple[str, ...]]:
    """Parse `GROUP=A,B,C` from `--group`."""
    name, sep, members = value.partition("=")
    if not sep or not members:
        raise ConfigError(f"--group expects GROUP=NODE,NODE,..., got {value!r}")
    return name.strip(), tuple(m.strip() for m in members.split(",") if m.strip())


def unique(items: Sequence[str]) -> list[str]:
    """Items in order, each once."""
    return list(dict.fromkeys(items))

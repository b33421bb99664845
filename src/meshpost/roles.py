"""A node's roles beside messaging: an echo, workers serving queues, text gateways, discovery
beacons (docs/patterns.md). `meshpost node` and `meshpost host` both take them from here, so
a hosted node can take any role a lone one can.

Rule: `NodeRoles` is plain, validated data, built by one function (`roles_from_options`) from
`meshpost node`'s flags or from a node's table in the mesh file (the same names); `running`
starts them on a started node and stops them before it. Nothing here knows which command runs
the node.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from meshpost.config import NAME_RULE, validate_name
from meshpost.discovery import Discovery, DiscoveryConfig, parse_target
from meshpost.errors import ConfigError, InvalidName
from meshpost.gateway import Gateway, GatewayConfig, parse_listen
from meshpost.node import Message, Node
from meshpost.protocol.header import is_valid_name
from meshpost.protocol.workqueue import DEFAULT_MAX_INFLIGHT, MAX_PREFETCH, prefetch_ok

#: The built-in handlers of `--worker QUEUE=HANDLER` (seed 002 upper-cases).
BUILTIN_HANDLERS: dict[str, Callable[[str], str]] = {
    "upper": str.upper,
    "lower": str.lower,
    "reverse": lambda text: text[::-1],
    "echo": lambda text: text,
}
#: The role options, named as `meshpost node`'s flags (`--text-listen` is `text_listen`), with
#: the type a mesh file's `[nodes.NAME]` table must give each (a flag's type is argparse's).
ROLE_OPTIONS: dict[str, type | tuple[type, ...]] = {
    "echo": bool,
    "worker": list,
    "text_listen": str,
    "udp_listen": str,
    "text_idle_gap": (int, float),
    "discover": int,
    "discover_host": str,
    "beacon_to": list,
    "mesh": str,
    "beacon_interval": (int, float),
    "prefetch": int,
}
#: Where discovery listens unless told (every interface, as it always has for `--discover`).
DEFAULT_DISCOVER_HOST = "0.0.0.0"


def resolve_handler(spec: str) -> Callable[[str], object]:
    """A built-in handler's name, or `module:function` (imported here)."""
    if spec in BUILTIN_HANDLERS:
        return BUILTIN_HANDLERS[spec]
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"unknown handler {spec!r}: use one of "
                          f"{', '.join(BUILTIN_HANDLERS)} or module:function")
    try:
        handler = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot load handler {spec!r}: {exc}") from None
    if not callable(handler):
        raise ConfigError(f"handler {spec!r} is not callable")
    return handler  # type: ignore[no-any-return]


def parse_worker_flag(value: str) -> tuple[str, str]:
    """`QUEUE=HANDLER` as (queue, handler spec); the handler is loaded once to fail at start,
    not at the first task."""
    queue, sep, spec = value.partition("=")
    if not sep or not queue or not spec:
        raise ConfigError(f"--worker wants QUEUE=HANDLER, not {value!r}")
    if not is_valid_name(queue):  # the node's rule; it refused the name only once serving
        raise InvalidName(queue, NAME_RULE, "queue")
    resolve_handler(spec)
    return queue, spec


@dataclasses.dataclass(frozen=True, slots=True)
class NodeRoles:
    """What one node runs beside messaging (all off by default)."""

    #: Answer every request and plain message with its own text (seed 000's server).
    echo: bool = False
    #: (queue, handler spec) per queue served (`--worker QUEUE=HANDLER`).
    workers: tuple[tuple[str, str], ...] = ()
    #: Tasks each queue's handler runs at once, announced as the worker's prefetch: a
    #: ventilator gives it at most that many unfinished (`--prefetch N`; docs/patterns.md).
    prefetch: int = DEFAULT_MAX_INFLIGHT
    gateway: GatewayConfig = dataclasses.field(default_factory=GatewayConfig)
    discovery: DiscoveryConfig | None = None


def roles_from_options(options: Mapping[str, Any], *, where: str = "") -> NodeRoles:
    """`NodeRoles` from `meshpost node`'s flags (`vars(args)`: missing, None, False or []
    means not given) or a mesh file's `[nodes.NAME]` table; `where` names that table in
    errors. `ConfigError` (or `InvalidEndpoint`) naming the option for anything wrong."""
    given = {k: v for k, v in options.items()
             if k in ROLE_OPTIONS and v is not None and v is not False and v != []}
    prefix = f"{where}: " if where else ""
    for key, value in given.items():
        if not isinstance(value, ROLE_OPTIONS[key]) or (
                isinstance(value, bool) and ROLE_OPTIONS[key] is not bool):
            raise ConfigError(f"{prefix}{key} = {value!r} is not a {_type_name(key)}")
        if isinstance(value, list) and not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{prefix}{key} must be a list of strings, not {value!r}")
    return NodeRoles(
        echo=bool(given.get("echo", False)),
        workers=tuple(parse_worker_flag(w) for w in given.get("worker", ())),
        prefetch=_prefetch(given, prefix),
        gateway=_gateway(given),
        discovery=_discovery(given),
    )


def merged_options(file_table: Mapping[str, Any], flags: Mapping[str, Any]) -> dict[str, Any]:
    """A node's role options from its mesh-file table with the flags given on top (a flag
    given replaces the file's value of that option)."""
    return {**{k: v for k, v in file_table.items() if k in ROLE_OPTIONS},
            **{k: v for k, v in flags.items()
               if k in ROLE_OPTIONS and v is not None and v is not False and v != []}}


def _type_name(key: str) -> str:
    expected = ROLE_OPTIONS[key]
    types = expected if isinstance(expected, tuple) else (expected,)
    names = {bool: "boolean (true/false)", list: "list", str: "string", int: "whole number",
             float: "number"}
    return " or ".join(dict.fromkeys(names[t] for t in types))


def _prefetch(given: Mapping[str, Any], prefix: str) -> int:
    prefetch = given.get("prefetch")
    if prefetch is None:
        return DEFAULT_MAX_INFLIGHT
    if not given.get("worker"):
        raise ConfigError(f"{prefix}--prefetch sets how many tasks a worker takes at once: it "
                          "needs --worker QUEUE=HANDLER")
    if not prefetch_ok(prefetch):
        raise ConfigError(f"{prefix}--prefetch must be a whole number of tasks from 1 to "
                          f"{MAX_PREFETCH}, not {prefetch}")
    return int(prefetch)


def _gateway(given: Mapping[str, Any]) -> GatewayConfig:
    gap = given.get("text_idle_gap")
    if gap is not None and not gap > 0:
        raise ConfigError(f"--text-idle-gap must be a positive number of seconds, not {gap}")
    text, udp = given.get("text_listen"), given.get("udp_listen")
    gateway = GatewayConfig(tcp=parse_listen(text, "tcp") if text else None,
                            udp=parse_listen(udp, "udp") if udp else None)
    return dataclasses.replace(gateway, idle_gap_s=float(gap)) if gap else gateway


def _discovery(given: Mapping[str, Any]) -> DiscoveryConfig | None:
    port = given.get("discover")
    if port is None:
        if given.get("beacon_to") or given.get("mesh"):
            raise ConfigError("--beacon-to and --mesh need --discover [PORT]")
        return None
    if not 0 <= port < 65536:
        raise ConfigError(f"--discover port must be from 0 to 65535, not {port}")
    interval = given.get("beacon_interval")
    if interval is not None and not interval > 0:
        raise ConfigError("--beacon-interval must be a positive number of seconds")
    timing: dict[str, float] = {}
    if interval:
        timing = {"interval_s": float(interval), "silence_s": max(5 * float(interval), 1.0)}
    mesh = given.get("mesh")
    return DiscoveryConfig(
        port=port, host=given.get("discover_host") or DEFAULT_DISCOVER_HOST,
        targets=tuple(parse_target(t) for t in given.get("beacon_to", ())),
        mesh=validate_name(mesh, "mesh") if mesh else "meshpost", **timing,
    )


#: What `check_hosted_together` advises by default: the nodes of one `meshpost host`.
HOSTED_PORT_ADVICE = "each node in one host needs its own port (or port 0 for any free one)"


def check_hosted_together(roles: Mapping[str, NodeRoles], *,
                          advice: str = HOSTED_PORT_ADVICE) -> None:
    """Refuse roles that nodes of one process (or one machine: `advice` says what to do
    instead) cannot share: two gateways on one fixed TCP or UDP port (each node needs its
    own, or port 0). Discovery may share its port: a node's beacon socket takes
    SO_REUSEPORT so that several nodes of one machine hear it."""
    taken: dict[tuple[str, str, int], str] = {}
    for name, r in roles.items():
        for scheme, address in (("tcp", r.gateway.tcp), ("udp", r.gateway.udp)):
            if address is None or address[1] == 0:
                continue
            key = (scheme, *address)
            other = taken.setdefault(key, name)
            if other != name:
                raise ConfigError(
                    f"nodes {other} and {name} both want a text gateway on {scheme}://"
                    f"{address[0]}:{address[1]}: {advice}")


def _echo(msg: Message) -> str:
    return msg.body


@contextlib.asynccontextmanager
async def running(node: Node, roles: NodeRoles, *, public_key: bytes | None = None,
                  authorized_keys: dict[str, bytes] | None = None,
                  ) -> AsyncIterator[tuple[Gateway, Discovery | None]]:
    """Start `roles` on the started `node` (gateways, discovery, echo, workers); yield its
    gateway and discovery; stop them on exit (the node stays up: its caller closes it).
    `public_key` and `authorized_keys` (a secure node's) go into its beacons' checks."""
    async with Gateway(node, roles.gateway) as gateway, contextlib.AsyncExitStack() as stack:
        discovery = None
        if roles.discovery is not None:
            discovery = await stack.enter_async_context(Discovery(
                node, roles.discovery, public_key=public_key,
                authorized_keys=authorized_keys))
        if roles.echo:
            # Seed 000's server: every request and every plain message is answered with its
            # own text, as a reply linked to it.
            node.on_request(_echo, direct=True)
        for queue, spec in roles.workers:
            await node.serve_queue(queue, resolve_handler(spec), max_inflight=roles.prefetch)
        yield gateway, discovery

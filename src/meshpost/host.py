"""Many nodes in one process: `meshpost host`, `meshpost cluster up --per-process`, the bench.

Rule: a hosted node is a whole node (its own store, identity, ROUTER endpoint and control
socket, so every CLI command works on it as on a lone one, and the roles its mesh-file table
gives it, set up by `meshpost.roles` as `meshpost node` sets them up); hosted nodes share only
the event loop (and its default thread pool), one ZeroMQ context (a secure node has its own:
its own allowlist), the descriptor limit, the memory and the process's signals. A node that
fails, at start or later, is reported and counted, and the others go on serving; what ends
the process ends them all (docs/reliability.md, "Hostile peers against hosted nodes").
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import functools
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, cast

import msgspec
import zmq
import zmq.asyncio

from meshpost.config import MeshConfig, NodeConfig, select_names
from meshpost.control.server import (
    ControlServer,
    claim_socket_path,
    control_endpoint_for,
    write_endpoint_file,
)
from meshpost.errors import ConfigError, HostNotAnswering, MeshpostError
from meshpost.node import Node
from meshpost.roles import NodeRoles, check_hosted_together, roles_from_options, running
from meshpost.transport.inbound import FD_HEADROOM, default_inbound_cap
from meshpost.transport.zmq_transport import raise_fd_limit

log = logging.getLogger(__name__)

#: ZeroMQ sockets one node may open besides one DEALER (two with --secure) per peer: its
#: ROUTER, the inbound guard's monitor pair, its control socket, and some to spare. The shared
#: context's MAX_SOCKETS (libzmq's default 1,023) is raised to what the hosted nodes need.
SOCKETS_PER_NODE = 8
#: Descriptors a node holds besides 3 per peer (a DEALER's connection and mailbox, the peer's
#: inbound connection): store, WAL, shared memory, lock, readers, ROUTER, control, guard.
FDS_PER_NODE = 12
FDS_PER_PEER = 3
#: Nodes started at once: starting opens a store and reads it on a thread each.
START_CONCURRENCY = 8
#: How long `restart` waits for a node to stop and for it to serve again.
RESTART_TIMEOUT_S = 30.0
#: The host endpoint file in its folder: the endpoint and the host's pid, as a node's has.
HOST_ENDPOINT_FILE = "host.endpoint"


class HostedState(enum.Enum):
    """Where one hosted node is."""

    STARTING = "starting"
    SERVING = "serving"
    FAILED = "failed"
    STOPPED = "stopped"


# -- the host endpoint's typed records ----------------------------------------------------


class HostRequest(msgspec.Struct, frozen=True, tag_field="op", tag="host"):
    """Ask the host for its nodes' states, or to restart one of them."""

    action: Literal["status", "restart"]
    name: str = ""
    id: int = 0


class HostedNodeInfo(msgspec.Struct, frozen=True):
    name: str
    state: str
    error: str | None = None
    starts: int = 0


class HostReply(msgspec.Struct, frozen=True):
    id: int
    pid: int
    nodes: list[HostedNodeInfo]
    #: Nodes that failed since the host started (a restart that works does not undo it).
    failures: int = 0
    error: str | None = None


_request_decoder = msgspec.msgpack.Decoder(HostRequest)
_reply_decoder = msgspec.msgpack.Decoder(HostReply)
_encoder = msgspec.msgpack.Encoder()


# -- choosing the nodes -------------------------------------------------------------------


def select_nodes(mesh: MeshConfig, spec: str) -> list[str]:
    """Names for `--nodes`: `A,B,C`, a range `n001..n050` (both ends, in file order), or a
    mix (`A,n001..n010`). `ConfigError` for a name the file does not have."""
    return select_names([n.name for n in mesh.nodes], spec)


def host_endpoint(folder: Path) -> str:
    """The host's control endpoint for its folder (short paths inside it, as a node's). A long
    one's hashed name is `host.sock`'s: the folder may be one of its nodes' data dirs, and
    hashed from `control.sock`, as it was, it was that node's control socket, which took it
    over at the node's start."""
    return control_endpoint_for(folder, socket_name="host.sock")


# -- the host -----------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class HostedNode:
    """One node of a host: its config, its state, and the task that runs it."""

    config: NodeConfig
    state: HostedState = HostedState.STOPPED
    error: str | None = None
    #: Times it was started (1 after the host's start; more after restarts).
    starts: int = 0
    node: Node | None = None
    task: asyncio.Task[None] | None = None
    stop: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    settled: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)

    @property
    def name(self) -> str:
        return self.config.name

    def info(self) -> HostedNodeInfo:
        return HostedNodeInfo(self.name, self.state.value, self.error, self.starts)


class NodeHost:
    """Runs nodes on this event loop with one ZeroMQ context. Use as `async with`.

    `start()` starts every node (a node that fails is recorded, not raised); `serve(stop)`
    runs until `stop` is set; `restart(name)` restarts one node in place.
    """

    def __init__(self, configs: Sequence[NodeConfig], *, folder: Path | None = None,
                 curve_keys: dict[str, tuple[tuple[bytes, bytes], dict[str, bytes]]]
                 | None = None, roles: Mapping[str, NodeRoles] | None = None) -> None:
        """`folder`: where the host's control endpoint lives (None: no endpoint);
        `curve_keys`: per secure node, its key pair and its peers' public keys; `roles`: per
        node, what it runs beside messaging (echo, workers, gateways, discovery)."""
        names = [c.name for c in configs]
        if len(set(names)) != len(names):
            raise ConfigError(f"a host runs each node once; given {sorted(names)}")
        strangers = sorted(set(roles or {}) - set(names))
        if strangers:
            raise ConfigError(f"roles given for nodes this host does not run: {strangers}")
        # Two gateways on one port in one process: refused before anything starts.
        check_hosted_together(roles or {})
        self._roles: Mapping[str, NodeRoles] = roles or {}
        dirs = [c.data_dir.resolve() for c in configs]
        if len(set(dirs)) != len(dirs):
            raise ConfigError("two hosted nodes share a data dir: each needs its own store")
        fd_limit = raise_fd_limit()[1]
        need = sum(FDS_PER_NODE + FDS_PER_PEER * len(c.peers) for c in configs)
        if need > fd_limit:
            # A warning, not a refusal: links that open lazily need far fewer than this.
            log.warning("host: %d nodes with %d peers in all may need about %d descriptors "
                        "if every link is open at once, beyond this process's limit of %d; if "
                        "they run out, host fewer nodes per process or give each fewer peers "
                        "(`peers = [...]`, --peers-per-node)",
                        len(configs), sum(len(c.peers) for c in configs), need, fd_limit)
        # The nodes share the descriptor limit: each one's inbound cap gets its share.
        share = max(FD_HEADROOM, fd_limit // max(1, len(configs)))
        self.nodes: dict[str, HostedNode] = {
            c.name: HostedNode(c if c.max_inbound_connections is not None else
                               dataclasses.replace(
                                   c, max_inbound_connections=default_inbound_cap(share)))
            for c in configs
        }
        self.folder = folder
        self._keys = curve_keys or {}
        self.context = zmq.asyncio.Context()
        sockets = sum(SOCKETS_PER_NODE + 2 * len(c.peers) for c in configs)
        self.context.set(zmq.MAX_SOCKETS, max(self.context.get(zmq.MAX_SOCKETS), sockets))
        #: Nodes that failed (to start, or while serving) since the host started.
        self.failures = 0
        self._gate = asyncio.Semaphore(START_CONCURRENCY)
        self._endpoint_task: asyncio.Task[None] | None = None
        self._socket: zmq.Socket[bytes] | None = None

    def __repr__(self) -> str:
        states = [h.state for h in self.nodes.values()]
        return (f"<NodeHost {len(self.nodes)} nodes, "
                f"{states.count(HostedState.SERVING)} serving, {self.failures} failures>")

    @property
    def serving(self) -> list[str]:
        return [h.name for h in self.nodes.values() if h.state is HostedState.SERVING]

    async def __aenter__(self) -> NodeHost:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Start every node and wait until each serves or failed; open the host endpoint."""
        if self.folder is not None:
            self._open_endpoint(self.folder)
        for hosted in self.nodes.values():
            self._launch(hosted)
        await asyncio.gather(*(h.settled.wait() for h in self.nodes.values()))
        log.info("host: %d of %d nodes serving, %d failed", len(self.serving), len(self.nodes),
                 self.failures)

    def _launch(self, hosted: HostedNode) -> None:
        hosted.stop = asyncio.Event()
        hosted.settled = asyncio.Event()
        hosted.state, hosted.error = HostedState.STARTING, None
        hosted.starts += 1
        hosted.task = asyncio.create_task(self._run(hosted), name=f"host-{hosted.name}")

    async def _run(self, hosted: HostedNode) -> None:
        cfg = hosted.config
        try:
            if cfg.secure and hosted.starts > 1:
                # A restart reads the key files again, as a node process's start does (the
                # keys may have changed since, `keys reload` or not).
                self._keys.update(load_keys([cfg]))
            keys, peer_keys = self._keys.get(cfg.name, (None, None))
            async with contextlib.AsyncExitStack() as stack:
                async with self._gate:
                    # A secure node keeps a context of its own: ZAP's handler endpoint
                    # (inproc://zeromq.zap.01) exists once per context, one node's allowlist;
                    # a shared one would let a key any hosted node lists into all of them
                    # (test_hostile_hosted.py checks a key X lists is refused at Y).
                    node = await stack.enter_async_context(Node(
                        cfg, curve_keys=keys, peer_public_keys=peer_keys,
                        zmq_context=None if cfg.secure else self.context,
                        authorized_keys_loader=_authorized_loader(cfg)))
                    await stack.enter_async_context(ControlServer(node, context=self.context))
                # A role that cannot start (a gateway's port taken) fails this node only.
                await stack.enter_async_context(running(
                    node, self._roles.get(cfg.name, NodeRoles()),
                    public_key=keys[1] if keys else None,
                    authorized_keys=peer_keys if cfg.secure else None))
                hosted.node, hosted.state = node, HostedState.SERVING
                hosted.settled.set()
                await node.serve(hosted.stop)  # raises NodeFailed if its store breaks
            hosted.state = HostedState.STOPPED
        except MeshpostError as exc:
            self._failed(hosted, str(exc))
        except Exception as exc:  # a bug in one node: the others keep serving
            log.exception("[%s] hosted node failed", cfg.name)
            self._failed(hosted, f"{type(exc).__name__}: {exc}")
        finally:
            hosted.node = None
            hosted.settled.set()

    def _failed(self, hosted: HostedNode, why: str) -> None:
        hosted.state, hosted.error = HostedState.FAILED, why
        self.failures += 1
        log.error("[%s] hosted node failed: %s (the host's other nodes go on)", hosted.name,
                  why)

    async def serve(self, stop: asyncio.Event) -> None:
        """Run until `stop` is set; nodes that fail meanwhile are recorded, not raised."""
        await stop.wait()

    async def restart(self, name: str) -> HostedNodeInfo:
        """Stop node `name` (if it runs) and start it again in this host; its new state."""
        hosted = self.nodes.get(name)
        if hosted is None:
            raise ConfigError(f"this host does not run {name!r} (it runs "
                              f"{', '.join(self.nodes)})")
        await self._stop_one(hosted)
        self._launch(hosted)
        async with asyncio.timeout(RESTART_TIMEOUT_S):
            await hosted.settled.wait()
        return hosted.info()

    async def _stop_one(self, hosted: HostedNode) -> None:
        hosted.stop.set()
        if hosted.task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await hosted.task
            hosted.task = None

    async def close(self) -> None:
        """Stop every node (each commits what it has), then the endpoint and the context."""
        await asyncio.gather(*(self._stop_one(h) for h in self.nodes.values()))
        if self._endpoint_task is not None:
            self._endpoint_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._endpoint_task
        if self._socket is not None:
            self._socket.close(0)
            if self.folder is not None:
                with contextlib.suppress(OSError):
                    (self.folder / HOST_ENDPOINT_FILE).unlink()
        self.context.term()

    # -- the host endpoint ----------------------------------------------------------------

    def status(self, request_id: int = 0, error: str | None = None) -> HostReply:
        return HostReply(id=request_id, pid=os.getpid(),
                         nodes=[h.info() for h in self.nodes.values()],
                         failures=self.failures, error=error)

    def _open_endpoint(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        endpoint = host_endpoint(folder)
        claim_socket_path(endpoint)  # as a node's control socket's
        sock: zmq.Socket[bytes] = zmq.Socket(self.context, zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(endpoint)
        self._socket = sock
        write_endpoint_file(folder / HOST_ENDPOINT_FILE, f"{endpoint}\n{os.getpid()}\n")
        self._endpoint_task = asyncio.create_task(self._serve_endpoint(sock),
                                                  name="host-endpoint")

    async def _serve_endpoint(self, sock: zmq.Socket[bytes]) -> None:
        """Answer each request in turn (a restart takes a while; status waits for it)."""
        loop = asyncio.get_running_loop()
        readable = asyncio.Event()
        fd = sock.getsockopt(zmq.FD)
        assert isinstance(fd, int)
        loop.add_reader(fd, readable.set)
        try:
            while True:
                try:
                    identity, *parts = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    readable.clear()
                    if cast("int", sock.getsockopt(zmq.EVENTS)) & int(zmq.POLLIN):
                        continue  # ZMQ_FD is edge-triggered: look before sleeping
                    await readable.wait()
                    continue
                if len(parts) == 1:
                    reply = await self._answer(parts[0])
                else:  # answered, not dropped: its client would wait out its timeout
                    reply = self.status(error=f"bad host request: a host request is one "
                                              f"ZeroMQ message part, not {len(parts)}")
                with contextlib.suppress(zmq.ZMQError):
                    sock.send_multipart([identity, _encoder.encode(reply)], zmq.NOBLOCK)
        finally:
            loop.remove_reader(fd)

    async def _answer(self, data: bytes) -> HostReply:
        try:
            request = _request_decoder.decode(data)
        except msgspec.DecodeError as exc:
            return self.status(error=f"bad host request: {exc}")
        try:
            if request.action == "restart":
                await self.restart(request.name)
        except (MeshpostError, TimeoutError) as exc:
            return self.status(request.id, error=str(exc) or type(exc).__name__)
        return self.status(request.id)


class HostClient:
    """Synchronous client for a host's endpoint (`cluster status/restart`, tests)."""

    def __init__(self, folder: Path) -> None:
        try:
            endpoint = (folder / HOST_ENDPOINT_FILE).read_text(encoding="utf-8").split()[0]
        except (OSError, IndexError):
            raise HostNotAnswering(str(folder), f"no {HOST_ENDPOINT_FILE}") from None
        self.endpoint = endpoint
        self._context = zmq.Context()
        self._socket: zmq.Socket[bytes] = self._context.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.connect(endpoint)
        self._next_id = 0

    def __enter__(self) -> HostClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self._socket.close(0)
        self._context.term()

    def request(self, action: Literal["status", "restart"], name: str = "", *,
                timeout_s: float) -> HostReply:
        """The host's reply; `ControlTimeout` when it does not answer in `timeout_s`."""
        self._next_id += 1
        self._socket.send(_encoder.encode(HostRequest(action, name, self._next_id)))
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            if not self._socket.poll(int(left * 1000) + 1):
                break
            reply = _reply_decoder.decode(self._socket.recv())
            if reply.id == self._next_id:
                return reply
        raise HostNotAnswering(self.endpoint, f"no reply within {timeout_s:g}s")


def node_configs(mesh: MeshConfig, names: Iterable[str], **overrides: Any) -> list[NodeConfig]:
    """The `NodeConfig` of each named node of `mesh`, with the same overrides for each."""
    return [mesh.node(name, **overrides) for name in names]


def node_roles(mesh: MeshConfig, names: Iterable[str]) -> dict[str, NodeRoles]:
    """The roles each named node's `[nodes.NAME]` table gives it (`meshpost.roles`: what
    `meshpost node NAME --config FILE` would run); only the nodes with a role."""
    roles = {name: roles_from_options(mesh.roles(name), where=f"[nodes.{name}]")
             for name in names}
    return {name: r for name, r in roles.items() if r != NodeRoles()}


def reload_keys_on_hangup(loop: asyncio.AbstractEventLoop,
                          nodes: Callable[[], Iterable[Node]]) -> set[asyncio.Task[Any]]:
    """SIGHUP to this process: each node `nodes()` gives now reads its authorized_keys again
    (`Node.reload_authorized_keys`, as `meshpost keys reload` asks one node to). Each node
    logs what changed, or why it kept its keys. Returns the set holding the reloads under way
    (a reference, so that none is collected mid-way)."""
    import signal

    running: set[asyncio.Task[Any]] = set()

    async def reload(node: Node) -> None:
        with contextlib.suppress(MeshpostError):  # logged by the node, its keys kept
            await node.reload_authorized_keys()

    def on_hangup() -> None:
        for node in nodes():
            task = loop.create_task(reload(node), name=f"{node.name}-reload-keys")
            running.add(task)
            task.add_done_callback(running.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    return running


def load_keys(configs: Iterable[NodeConfig]) -> dict[str, tuple[tuple[bytes, bytes],
                                                                dict[str, bytes]]]:
    """Each secure node's CURVE key pair and authorized peer keys, from its data dir."""
    from meshpost import keys

    return {c.name: (keys.load_own(c.data_dir, name=c.name), keys.load_authorized(c.data_dir))
            for c in configs if c.secure}


def _authorized_loader(cfg: NodeConfig) -> Callable[[], dict[str, bytes]] | None:
    """What reads a secure node's authorized_keys again (`Node.reload_authorized_keys`)."""
    if not cfg.secure:
        return None
    from meshpost import keys

    return functools.partial(keys.load_authorized, cfg.data_dir)


async def run_host(configs: Sequence[NodeConfig], *, folder: Path | None,
                   roles: Mapping[str, NodeRoles] | None = None) -> None:
    """`meshpost host`: run the nodes until SIGINT or SIGTERM. Raises `NodeNotStarted` when
    not one of them could start (each with its reason); otherwise failures are logged and
    the others serve."""
    import signal

    from meshpost.errors import NodeNotStarted
    from meshpost.eventloop import loop_name

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    log.info("host: %d nodes, event loop: %s", len(configs), loop_name(loop))
    for sig in (signal.SIGINT, signal.SIGTERM):  # once for the process, not per node
        loop.add_signal_handler(sig, stop.set)
    async with NodeHost(configs, folder=folder, curve_keys=load_keys(configs),
                        roles=roles) as host:
        reload_keys_on_hangup(loop, lambda: [h.node for h in host.nodes.values()
                                             if h.node is not None and h.config.secure])
        if not host.serving:
            raise NodeNotStarted({h.name: h.error or h.state.value
                                  for h in host.nodes.values()})
        await host.serve(stop)
        log.info("host: shutting down %d nodes", len(host.serving))

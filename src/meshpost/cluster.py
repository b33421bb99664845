"""A local mesh: the `meshpost cluster` commands, and the demo, tests and benchmarks.

Rule: a cluster is one generated mesh config in one folder, with its nodes' processes (one
per node, or K per `meshpost host`: `processes`) and a state file that `cluster up` writes
and the other commands read; each command trusts a recorded pid only as far as `processes`
checks it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import random
import shlex
import shutil
import socket
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from meshpost.config import default_data_dir, select_names
from meshpost.control import ControlClient, StatusRequest
from meshpost.errors import (
    ClusterAlreadyRunning,
    ClusterError,
    ClusterNotRunning,
    ClusterTooBig,
    ConfigError,
    MeshpostError,
    NodeNotStarted,
    UnknownClusterNode,
)
from meshpost.gateway import parse_listen
from meshpost.processes import (
    STOP_S_PER_HOSTED_NODE,
    STOP_TIMEOUT_S,
    HostProcess,
    NodeProcess,
    is_host_process,
    is_node_process,
    stop_pid,
    stop_pids,
)
from meshpost.roles import check_hosted_together, roles_from_options
from meshpost.transport.zmq_transport import raise_fd_limit

STATE_FILE = "cluster.json"
CONFIG_FILE = "mesh.toml"
#: Subfolder of the cluster's folder for the hosts' endpoints and logs.
HOSTS_DIR = "hosts"
#: `cluster up`'s folder when no --data is given: beside, never inside, the per-name data dirs
#: of nodes started by hand (`meshpost node A` keeps its data in .../meshpost/A).
DEFAULT_CLUSTER_DIR = "cluster"


#: Open files `cluster up` holds per process it starts: that process's log, kept open until
#: every node is ready. Plus a headroom for Python itself and its control clients.
PARENT_FDS_PER_PROCESS = 1
FD_HEADROOM = 128


def check_descriptors(count: int, per_process: int | None) -> None:
    """`ClusterTooBig` when starting `count` nodes (K a process with `per_process`) needs more
    open files than RLIMIT_NOFILE allows, here (a log per process) or in a host (about
    `host.FDS_PER_NODE` per node): refused before anything starts, where it used to end in
    a "Too many open files" traceback with some nodes started."""
    from meshpost.host import FDS_PER_NODE

    limit = raise_fd_limit()[1]
    room = limit - FD_HEADROOM
    k = per_process or 1
    here = FD_HEADROOM + PARENT_FDS_PER_PROCESS * math.ceil(count / k)
    in_host = FD_HEADROOM + FDS_PER_NODE * min(k, count) if per_process else 0
    if here <= limit and in_host <= limit:
        return
    # The fewest nodes per host that fits here, if a host can take that many.
    fewest = max(2, math.ceil(count * PARENT_FDS_PER_PROCESS / max(1, room)))
    most = room // FDS_PER_NODE
    if fewest <= most:
        advice = (f"run them K to a process with --per-process K (from {fewest} to {most} "
                  "here), or raise the limit (`ulimit -n`)")
    else:
        advice = "that is more than this machine's limit allows in any split: raise it " \
                 "(`ulimit -n`, as root `ulimit -Hn`) or start fewer nodes"
    raise ClusterTooBig(count, max(here, in_host), limit, advice)


def default_cluster_root() -> Path:
    """Where `meshpost cluster` keeps its config, state, logs and node data by default."""
    return default_data_dir(DEFAULT_CLUSTER_DIR)


def meshpost_command() -> tuple[str, bool]:
    """(how to run `meshpost` from a shell, whether that is on PATH already)."""
    script = Path(sys.executable).parent / "meshpost"
    on_path = shutil.which("meshpost")
    if on_path and script.exists() and Path(on_path).resolve() == script.resolve():
        return "meshpost", True
    if script.exists():
        return shlex.quote(str(script)), False
    return f"{shlex.quote(sys.executable)} -m meshpost", False




def free_tcp_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """Ports the kernel says are free now (bind to port 0, read, release)."""
    sockets, ports = [], []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            sockets.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in sockets:
            s.close()
    return ports


#: Where `listen_ports` looks first: below the kernel's ephemeral range (a port there may be
#: handed to any outgoing connection between our check and the node's bind), above the
#: well-known and most registered ones.
LISTEN_PORTS_FROM = 10_000
#: `listen_ports` uses `free_tcp_ports` below this many ports: a few nodes rarely lose the
#: race, and a fixed range would make parallel test runs collide with each other instead.
LISTEN_PORTS_MIN_COUNT = 64


def ephemeral_port_range() -> tuple[int, int]:
    """The kernel's range for outgoing connections' local ports (Linux; a usual default)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def listen_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` ports that are free now and outside the ephemeral range when that can be had.

    A big local mesh makes thousands of outgoing connections while it starts: a listening
    port drawn from the ephemeral range (as port 0 gives) may be taken by one of them before
    its node binds it (seen: 1 of 1,000 nodes, 'address in use')."""
    low, _high = ephemeral_port_range()
    if count < LISTEN_PORTS_MIN_COUNT or low - LISTEN_PORTS_FROM < 2 * count:
        return free_tcp_ports(count, host)
    start = random.randrange(LISTEN_PORTS_FROM, low - count)
    ports: list[int] = []
    for port in itertools.chain(range(start, low), range(LISTEN_PORTS_FROM, start)):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        ports.append(port)
        if len(ports) == count:
            return ports
    return free_tcp_ports(count, host)


def node_names(count: int) -> list[str]:
    """Default names: A..Z for small meshes, n001.. for large ones."""
    if count <= 26:
        return [chr(ord("A") + i) for i in range(count)]
    width = len(str(count))
    return [f"n{i:0{width}d}" for i in range(1, count + 1)]


def write_mesh_config(
    path: Path,
    endpoints: Mapping[str, str],
    *,
    data_dirs: Mapping[str, Path] | None = None,
    groups: Mapping[str, Sequence[str]] | None = None,
    options: Mapping[str, Any] | None = None,
    peers: Mapping[str, Sequence[str]] | None = None,
    roles: Mapping[str, Mapping[str, Any]] | None = None,
) -> Path:
    """Write a TOML mesh config: one [nodes.NAME] table per node (with `peers`, the nodes
    each one lists: a partial mesh, `MeshConfig.linked`; with `roles`, each node's role
    keys, `echo = true`, `worker = [...]`: what `meshpost node` and `host` start)."""
    lines: list[str] = []
    if options:
        lines.append("[mesh]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in options.items()]
        lines.append("")
    for name, endpoint in endpoints.items():
        lines.append(f"[nodes.{name}]")
        lines.append(f"bind = [{json.dumps(endpoint)}]")
        if data_dirs and name in data_dirs:
            lines.append(f"data = {json.dumps(str(data_dirs[name]))}")
        if peers is not None and name in peers:
            lines.append(f"peers = {json.dumps(list(peers[name]))}")
        for key, value in (roles or {}).get(name, {}).items():
            lines.append(f"{key} = {json.dumps(value)}")  # JSON's scalars and lists are TOML's
        lines.append("")
    if groups:
        lines.append("[groups]")
        lines += [f"{g} = {json.dumps(list(m))}" for g, m in groups.items()]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def random_peers(names: Sequence[str], k: int, *, seed: int = 7) -> dict[str, list[str]]:
    """`k` other nodes for each node, drawn at random (the same for the same seed): the
    `peers` lists of a partial mesh. Links are symmetric, so a node also talks to those that
    drew it: about 2k links each."""
    rng = random.Random(seed)
    k = min(k, len(names) - 1)
    out: dict[str, list[str]] = {}
    for name in names:
        others = rng.sample(names, k + 1)
        out[name] = [n for n in others if n != name][:k]
    return out


def tcp_endpoints(names: Iterable[str], *, base_port: int | None = None) -> dict[str, str]:
    names = list(names)
    ports = (
        listen_ports(len(names)) if base_port is None
        else [base_port + i for i in range(len(names))]
    )
    return {n: f"tcp://127.0.0.1:{p}" for n, p in zip(names, ports, strict=True)}












#: What `cluster up` says when two of its nodes would take one fixed gateway port.
_CLUSTER_PORT_ADVICE = ("a cluster's nodes share this machine: give a fixed port to one node "
                        "(URL@NODE), or port 0 for any free one")


def cluster_roles(
    names: Sequence[str], *, echo: bool = False, worker: Sequence[str] = (),
    prefetch: Sequence[str] = (), text_listen: Sequence[str] = (),
    udp_listen: Sequence[str] = (),
) -> dict[str, dict[str, Any]]:
    """Each node's roles from `cluster up`'s role flags, as the keys of its `[nodes.NAME]`
    table (what `meshpost node` and `meshpost host` read; `meshpost.roles`): `echo` for
    every node; each `worker` (`QUEUE=HANDLER`), `prefetch` (`N`: how many tasks those
    workers take at once), `text_listen` and `udp_listen` value for the nodes its `@NODES`
    suffix names (`A,C`, a range `B..D`; none: every node).

    Checked as `meshpost node` checks its flags; `ConfigError` for a node that is not in
    the cluster, a queue served twice by one node, two gateways of one kind on a node, or a
    fixed gateway port given to more than one node (they all run on this machine)."""
    tables: dict[str, dict[str, Any]] = {}
    if echo:
        for name in names:
            tables.setdefault(name, {})["echo"] = True
    for value in worker:
        spec, chosen = _for_nodes(value, names, "--worker")
        queue = spec.partition("=")[0]
        for name in chosen:
            served = tables.setdefault(name, {}).setdefault("worker", [])
            if any(w.partition("=")[0] == queue for w in served):
                raise ConfigError(f"--worker gives node {name} queue {queue!r} twice; a node "
                                  "serves a queue with one handler")
            served.append(spec)
    for value in prefetch:
        spec, chosen = _for_nodes(value, names, "--prefetch")
        try:
            count = int(spec)
        except ValueError:
            raise ConfigError(f"--prefetch {value!r}: N must be a whole number of tasks "
                              "(1 to 1,024)") from None
        if "@" not in value:  # every node that serves a queue (a node named must serve one)
            chosen = [name for name in chosen if "worker" in tables.get(name, {})]
        for name in chosen:  # the range and --worker are checked with the node's roles
            tables.setdefault(name, {})["prefetch"] = count
    for flag, key, scheme, values in (("--text-listen", "text_listen", "tcp", text_listen),
                                      ("--udp-listen", "udp_listen", "udp", udp_listen)):
        for value in values:
            url, chosen = _for_nodes(value, names, flag)
            port = parse_listen(url, scheme)[1]
            if port != 0 and len(chosen) > 1:
                raise ConfigError(f"{flag} {value} gives {len(chosen)} nodes the same port "
                                  f"{port}, but they share this machine: give a fixed port "
                                  f"to one node ({url}@{chosen[0]}), or use port 0 for any "
                                  "free one")
            for name in chosen:
                table = tables.setdefault(name, {})
                if key in table:
                    raise ConfigError(f"{flag} gives node {name} a second gateway ({url}, "
                                      f"after {table[key]}); a node has one of each kind")
                table[key] = url
    roles = {name: roles_from_options(table, where=f"cluster up's flags for node {name}")
             for name, table in tables.items()}
    check_hosted_together(roles, advice=_CLUSTER_PORT_ADVICE)
    return tables


def _for_nodes(value: str, names: Sequence[str], flag: str) -> tuple[str, list[str]]:
    """`VALUE@NODES` -> (VALUE, the nodes NODES names); without `@`, every node."""
    what, sep, spec = value.rpartition("@")
    if not sep:
        return value, list(names)
    if not what:
        raise ConfigError(f"{flag} {value!r} gives nodes but nothing for them")
    return what, select_names(names, spec, flag=f"{flag} {value}", where="the cluster")


@dataclasses.dataclass
class LocalCluster:
    """N node processes on this machine sharing one generated mesh config."""

    root: Path
    names: list[str]
    endpoints: dict[str, str]
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    groups: Mapping[str, Sequence[str]] = dataclasses.field(default_factory=dict)
    extra_args: Sequence[str] = ()
    env: Mapping[str, str] | None = None
    nodes: dict[str, NodeProcess] = dataclasses.field(default_factory=dict)
    #: Nodes per `meshpost host` process (None: a process per node, in `nodes`).
    per_process: int | None = None
    #: Each node's `peers` list (None: a full mesh).
    peers: Mapping[str, Sequence[str]] | None = None
    #: Each node's roles, as keys of its `[nodes.NAME]` table (`cluster_roles`); none: {}.
    roles: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    hosts: dict[str, HostProcess] = dataclasses.field(default_factory=dict)

    @classmethod
    def create(
        cls,
        root: Path,
        count: int,
        *,
        transport: str = "tcp",
        base_port: int | None = None,
        options: Mapping[str, Any] | None = None,
        names: Sequence[str] | None = None,
        peers_per_node: int | None = None,
        seed: int = 7,
        **kwargs: Any,
    ) -> LocalCluster:
        """A cluster of `count` nodes in `root` (config written, nothing started). With
        `peers_per_node` k, each node lists k random others (`random_peers`): a partial
        mesh; with `per_process` K (a keyword), K nodes run in each `meshpost host`."""
        check_descriptors(len(names) if names else count, kwargs.get("per_process"))
        names = list(names) if names else node_names(count)
        options = dict(options or {})
        if peers_per_node is not None:
            kwargs["peers"] = random_peers(names, peers_per_node, seed=seed)
            # A random partial mesh is a big mesh cut down: its nodes open links on first use
            # whatever their own peer count (one with a few peers would otherwise dial them at
            # start and watch them for as long as it runs: pings on idle links).
            options.setdefault("dial_at_start", 0)
        root.mkdir(parents=True, exist_ok=True)
        if transport == "ipc":
            endpoints = {n: f"ipc://{root.resolve()}/{n}.sock" for n in names}
        else:
            endpoints = tcp_endpoints(names, base_port=base_port)
        cluster = cls(root, names, endpoints, options, **kwargs)
        cluster.write_config()
        return cluster

    @property
    def config_path(self) -> Path:
        return self.root / CONFIG_FILE

    def data_dir(self, name: str) -> Path:
        return self.root / name

    def write_config(self) -> None:
        write_mesh_config(
            self.config_path, self.endpoints,
            data_dirs={n: self.data_dir(n) for n in self.names},
            groups=self.groups, options=self.options, peers=self.peers, roles=self.roles,
        )

    def host_names(self) -> dict[str, list[str]]:
        """Host name -> the run of nodes it hosts (with `per_process`)."""
        k = self.per_process or 1
        runs = [self.names[i : i + k] for i in range(0, len(self.names), k)]
        width = len(str(len(runs)))
        return {f"h{i:0{width}d}": run for i, run in enumerate(runs, 1)}

    def host_of(self, name: str) -> HostProcess:
        """The host process of node `name` (a new handle if it is not running)."""
        hname = next(h for h, run in self.host_names().items() if name in run)
        return self.host(hname)

    def host(self, hname: str) -> HostProcess:
        host = self.hosts.get(hname)
        if host is None or not host.alive():
            if host is not None:
                host.stop()
            run = self.host_names()[hname]
            host = HostProcess(
                hname, self.config_path, self.root / HOSTS_DIR / hname,
                self.root / HOSTS_DIR / f"{hname}.log", extra_args=self.extra_args,
                env=self.env, names=run, node_dirs={n: self.data_dir(n) for n in run})
            self.hosts[hname] = host
        return host

    def process(self, name: str) -> NodeProcess:
        node = self.nodes.get(name)
        if node is None or not node.alive():
            if node is not None:
                node.stop()  # it died (killed or crashed): reap it and close its log
            node = NodeProcess(
                name, self.config_path, self.data_dir(name), self.root / "logs" / f"{name}.log",
                extra_args=self.extra_args, env=self.env,
            )
            self.nodes[name] = node
        return node

    def start(self, names: Iterable[str] | None = None, *, wait: bool = True) -> None:
        """Spawn the nodes; with `wait`, raise `NodeNotStarted` naming every node that did not
        become ready and why (the ones that did keep running: the caller decides). With
        `per_process`, the hosts of those nodes start (each with its whole run of nodes)."""
        if self.per_process:
            wanted = set(names or self.names)
            hosts = [self.host(h).start() for h, run in self.host_names().items()
                     if wanted & set(run)]
            if wait:
                failures: dict[str, str] = {}
                for host in hosts:
                    failures.update(host.node_failures())
                if failures:
                    raise NodeNotStarted(failures)
            return
        started = [self.process(n).start() for n in (names or self.names)]
        if wait:
            failures = {}
            for node in started:
                why = node.not_ready_reason()
                if why is not None:
                    failures[node.name] = why
            if failures:
                raise NodeNotStarted(failures)

    def restart(self, name: str) -> NodeProcess:
        """Stop node `name` and start it again; with `per_process`, inside its host if that
        runs, else its whole host process starts again. Returns the process it runs in."""
        if self.per_process:
            host = self.host_of(name)
            if host.process is not None:
                host.restart_node(name)
                return host
            failures = host.start().node_failures()
            if failures:
                raise NodeNotStarted(failures)
            return host
        old = self.nodes.pop(name, None)
        if old is not None:
            old.stop()
        node = self.process(name).start()
        node.wait_ready()
        return node

    def stop(self, names: Iterable[str] | None = None, *,
             timeout_s: float | None = None) -> dict[str, int | None]:
        """Stop the nodes (all by default); a host stops with all of its nodes. Each process
        is killed if it has not exited `timeout_s` after SIGTERM (default: `STOP_TIMEOUT_S`,
        and more for a host of many nodes)."""
        codes: dict[str, int | None] = {}
        wanted = set(names or self.names)
        hosts = [(h, run) for h, run in self.host_names().items()
                 if h in self.hosts and wanted & set(run)] if self.hosts else []
        nodes = [node for name in list(names or self.nodes)
                 if (node := self.nodes.get(name)) is not None]
        # All told at once, hosts and nodes, then each waited for (with its own timeout and
        # kill): each takes a while to close, and one after another added up at every stop.
        for hname, _ in hosts:
            self.hosts[hname].terminate()
        for node in nodes:
            node.terminate()
        for hname, run in hosts:
            codes.update(dict.fromkeys(run, self.hosts[hname].stop(timeout_s)))
        for node in nodes:
            codes[node.name] = (node.stop() if timeout_s is None else node.stop(timeout_s))
        return codes

    def save_state(self) -> Path:
        state: dict[str, Any] = {
            "config": str(self.config_path),
            "extra_args": list(self.extra_args),
            "nodes": {n: {"pid": p.pid, "endpoint": self.endpoints[n],
                          "data": str(self.data_dir(n)), "log": str(p.log_path)}
                      for n, p in self.nodes.items()},
        }
        if self.hosts:
            state["hosts"] = {h: {"pid": p.pid, "names": list(p.names),
                                  "folder": str(p.data_dir), "log": str(p.log_path)}
                              for h, p in self.hosts.items()}
            for h, p in self.hosts.items():
                for n in p.names:
                    state["nodes"][n] = {"pid": p.pid, "endpoint": self.endpoints[n],
                                         "data": str(self.data_dir(n)),
                                         "log": str(p.log_path), "host": h}
        path = self.root / STATE_FILE
        path.write_text(json.dumps(state, indent=2), encoding="utf-8")
        return path

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def read_state(root: Path) -> dict[str, Any]:
    """What `cluster up` recorded in `root`; `ClusterNotRunning` when nothing is."""
    try:
        state: dict[str, Any] = json.loads((root / STATE_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ClusterNotRunning(str(root)) from None
    except (OSError, ValueError) as exc:
        raise ClusterError(f"cannot read {root / STATE_FILE}: {exc}; move it aside") from None
    return state




def _runs(name: str, info: Mapping[str, Any]) -> bool:
    """True while the recorded process of node `name` (its own, or its host) still runs."""
    pid = int(info["pid"])
    return is_host_process(pid) if "host" in info else is_node_process(pid, name)


def running_nodes(root: Path) -> list[str]:
    """Names of the recorded nodes whose processes still run ([] when nothing is recorded)."""
    try:
        state = read_state(root)
    except ClusterNotRunning:
        return []
    return [name for name, info in state["nodes"].items() if _runs(name, info)]


def refuse_if_running(root: Path) -> None:
    """`ClusterAlreadyRunning` when a cluster recorded in `root` still has a node running."""
    alive = running_nodes(root)
    if alive:
        raise ClusterAlreadyRunning(str(root), alive)


@dataclasses.dataclass(frozen=True, slots=True)
class NodeState:
    """One recorded node as `cluster status` shows it."""

    name: str
    pid: int
    endpoint: str
    data: str
    log: str
    state: str  # "ready", "not answering" or "stopped"


def cluster_status(root: Path) -> list[NodeState]:
    """Each recorded node: running and answering its control endpoint, or not."""
    state = read_state(root)
    result = []
    for name, info in state["nodes"].items():
        pid = int(info["pid"])
        what = "stopped"
        if _runs(name, info):
            what = "not answering"
            with (
                contextlib.suppress(MeshpostError),
                ControlClient(Path(info["data"]), name=name) as client,
            ):
                if client.request(StatusRequest(), timeout_s=2.0).ok:
                    what = "ready"
        result.append(NodeState(name, pid, info["endpoint"], info["data"], info["log"], what))
    return result


def restart_from_state(root: Path, name: str, timeout_s: float = STOP_TIMEOUT_S) -> NodeState:
    """Stop node `name` of the cluster in `root` if it runs, start it again, wait until it is
    ready, and record its new pid."""
    state = read_state(root)
    info = state["nodes"].get(name)
    if info is None:
        raise UnknownClusterNode(str(root), name, list(state["nodes"]))
    if "host" in info:
        return _restart_hosted(root, state, name)
    pid = int(info["pid"])
    if is_node_process(pid, name):
        stop_pid(pid, timeout_s)
    node = NodeProcess(name, Path(state["config"]), Path(info["data"]), Path(info["log"]),
                       extra_args=state.get("extra_args", ())).start()
    why = node.not_ready_reason()
    if why is not None:
        node.stop()
        raise NodeNotStarted({name: why})
    node.detach()
    info["pid"] = node.pid
    (root / STATE_FILE).write_text(json.dumps(state, indent=2), encoding="utf-8")
    return NodeState(name, node.pid, info["endpoint"], info["data"], info["log"], "ready")


def _restart_hosted(root: Path, state: dict[str, Any], name: str) -> NodeState:
    """Restart hosted node `name` inside its host when that runs; otherwise start its whole
    host again (every node of that host restarts), and record the host's new pid."""
    info = state["nodes"][name]
    hname = info["host"]
    rec = state["hosts"][hname]
    host = HostProcess(hname, Path(state["config"]), Path(rec["folder"]), Path(rec["log"]),
                       extra_args=state.get("extra_args", ()), names=rec["names"],
                       node_dirs={n: Path(state["nodes"][n]["data"]) for n in rec["names"]})
    if is_host_process(int(rec["pid"])):
        host.restart_node(name)
        return NodeState(name, int(rec["pid"]), info["endpoint"], info["data"], info["log"],
                         "ready")
    failures = host.start().node_failures()
    if failures:
        host.stop()
        raise NodeNotStarted(failures)
    host.detach()
    rec["pid"] = host.pid
    for n in rec["names"]:
        state["nodes"][n]["pid"] = host.pid
    (root / STATE_FILE).write_text(json.dumps(state, indent=2), encoding="utf-8")
    return NodeState(name, host.pid, info["endpoint"], info["data"], info["log"], "ready")


def stop_from_state(root: Path, timeout_s: float = STOP_TIMEOUT_S) -> dict[str, str]:
    """Stop the nodes `cluster up` recorded in `root`; return what happened to each (a
    hosted node: what happened to its host)."""
    state = read_state(root)
    outcome: dict[str, str] = {}
    # Hosts first, all told at once: each takes a while to close its nodes.
    hosts = {int(info["pid"]) for name, info in state["nodes"].items()
             if "host" in info and _runs(name, info)}
    most = max((len(h["names"]) for h in state.get("hosts", {}).values()), default=0)
    stopped = stop_pids(hosts, timeout_s + STOP_S_PER_HOSTED_NODE * most)
    # Then the nodes of their own, also all told at once (one after another, each one's
    # close added up); they get as long as a host of as many nodes would.
    nodes = {int(info["pid"]) for name, info in state["nodes"].items()
             if "host" not in info and is_node_process(int(info["pid"]), name)}
    stopped.update(stop_pids(nodes, timeout_s + STOP_S_PER_HOSTED_NODE * len(nodes)))
    for name, info in state["nodes"].items():
        outcome[name] = stopped.get(int(info["pid"]), "not running")
    (root / STATE_FILE).unlink()
    return outcome


#: The process handles (from `processes`) stay importable from here, as they always were.
__all__ = [
    "CONFIG_FILE",
    "DEFAULT_CLUSTER_DIR",
    "HOSTS_DIR",
    "LISTEN_PORTS_FROM",
    "LISTEN_PORTS_MIN_COUNT",
    "STATE_FILE",
    "STOP_TIMEOUT_S",
    "ClusterError",
    "HostProcess",
    "LocalCluster",
    "NodeProcess",
    "NodeState",
    "cluster_status",
    "default_cluster_root",
    "ephemeral_port_range",
    "free_tcp_ports",
    "is_host_process",
    "is_node_process",
    "listen_ports",
    "meshpost_command",
    "node_names",
    "random_peers",
    "read_state",
    "refuse_if_running",
    "restart_from_state",
    "running_nodes",
    "stop_from_state",
    "tcp_endpoints",
    "write_mesh_config",
]

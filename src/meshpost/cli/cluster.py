"""`meshpost cluster up|down|status|restart`: N local node processes started in the background
from a folder's state file; what to print and which exit code. Starting, stopping and readiness
belong to `meshpost.cluster`. `meshpost host`: several nodes of a mesh file in one process
(`meshpost.host`), which `cluster up --per-process` starts."""

from __future__ import annotations

import argparse
import contextlib
import shlex
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meshpost.cli.common import SYNC_HELP, add_loop_option, at_least
from meshpost.errors import EXIT_NOT_RUNNING, EXIT_OK, ClusterNotRunning, MeshpostError

#: `cluster up` prints the commands for every node up to this many, for the first few beyond.
LISTED_NODES = 26

#: What `--data` is to every `cluster` command: the one folder of config, state, logs and data.
CLUSTER_DATA_HELP = "folder of the cluster (default: the user data dir's meshpost/cluster)"

if TYPE_CHECKING:
    from meshpost.cli.common import Subcommands


def _cluster_root(args: argparse.Namespace) -> Path:
    from meshpost.cluster import default_cluster_root

    return Path(args.data) if args.data else default_cluster_root()


def cmd_cluster(args: argparse.Namespace) -> int:
    from meshpost import cluster as local

    root = _cluster_root(args)
    if args.action == "status":
        return _cluster_status(root)
    if args.action == "restart":
        node = local.restart_from_state(root, args.name)
        print(f"restarted {node.name}: pid {node.pid}, {node.endpoint}, ready")
        return EXIT_OK
    if args.action == "down":
        for name, what in local.stop_from_state(root).items():
            print(f"  {name}: {what}")
        return EXIT_OK
    # The role flags are checked before anything else (and before --replace stops anything).
    roles = local.cluster_roles(local.node_names(args.count), echo=args.echo,
                                worker=args.worker, prefetch=args.prefetch,
                                text_listen=args.text_listen,
                                udp_listen=args.udp_listen)
    local.check_descriptors(args.count, args.per_process)  # before --replace stops anything
    from meshpost.eventloop import choose

    # uvloop asked for where it is missing, or a MESHPOST_LOOP the nodes inherit that names no
    # loop: said before anything stops (each node used to fail alone: exit 8, not 2).
    choose(args.loop)
    if args.replace:
        with contextlib.suppress(ClusterNotRunning):
            for name, what in local.stop_from_state(root).items():
                print(f"  old {name}: {what}")
    local.refuse_if_running(root)
    options = {"sync": args.sync} if args.sync else {}
    extra = ["--secure"] if args.secure else []
    if args.loop:  # recorded in the state file: `cluster restart` starts a node alike
        extra += ["--loop", args.loop]
    cluster = local.LocalCluster.create(root, args.count, base_port=args.base_port,
                                        transport=args.transport, options=options,
                                        extra_args=extra, per_process=args.per_process,
                                        peers_per_node=args.peers_per_node, roles=roles)
    if args.secure:
        from meshpost.keys import generate_mesh_keys

        generate_mesh_keys({n: cluster.data_dir(n) for n in cluster.names})
    try:
        cluster.start()
    except MeshpostError:
        cluster.stop()  # all or nothing: no half cluster left running without a state file
        raise
    state = cluster.save_state()
    for process in [*cluster.nodes.values(), *cluster.hosts.values()]:
        process.detach()
    mp, on_path = local.meshpost_command()
    hosted = f" in {len(cluster.hosts)} processes" if cluster.hosts else ""
    print(f"started {len(cluster.names)} nodes{hosted}, each ready; config "
          f"{cluster.config_path}; state {state}")
    if not on_path:
        print(f"(meshpost is not on your PATH: the commands below use its full path; or run "
              f"`export PATH={shlex.quote(str(Path(sys.executable).parent))}:$PATH`)")
    shown = cluster.names if len(cluster.names) <= LISTED_NODES else cluster.names[:3]
    for name in shown:
        data = shlex.quote(str(cluster.data_dir(name)))
        proc = cluster.host_of(name) if cluster.hosts else cluster.nodes[name]
        does = _roles_text(roles.get(name, {}))
        print(f"  {name}  {cluster.endpoints[name]}  pid {proc.pid}{does}")
        print(f"      send:    {mp} send --node {name} --data {data} --to all 'hello'")
        print(f"      attach:  {mp} attach --node {name} --data {data}")
        print(f"      history: {mp} history --node {name} --data {data}")
    if len(shown) < len(cluster.names):
        print(f"  ... and {len(cluster.names) - len(shown)} more, {cluster.names[3]} to "
              f"{cluster.names[-1]} (the same commands with their names)")
    for line in _role_hints(cluster.names, roles, mp, cluster.data_dir):
        print(line)
    where = shlex.quote(str(root))
    print(f"status: {mp} cluster status --data {where}   "
          f"restart one: {mp} cluster restart NAME --data {where}")
    print(f"stop with: {mp} cluster down --data {where}")
    return EXIT_OK


def _roles_text(table: Mapping[str, Any]) -> str:
    """A node's roles for its line of `cluster up`'s listing ("" for none)."""
    parts = ["echo"] if table.get("echo") else []
    parts += [f"worker {w}" for w in table.get("worker", ())]
    parts += [f"text gateway {table[k]}" for k in ("text_listen", "udp_listen") if k in table]
    return f"  ({', '.join(parts)})" if parts else ""


def _role_hints(names: list[str], roles: Mapping[str, Mapping[str, Any]], mp: str,
                data_dir: Callable[[str], Path]) -> list[str]:
    """Commands that use the roles `cluster up` gave: a request to an echo node, and tasks
    for each queue from a node that does not serve it to another that does not (the seeds'
    ventilator and sink), when there are such nodes."""
    lines = []
    echoes = [n for n in names if roles.get(n, {}).get("echo")]
    if echoes and len(names) > 1:
        asker = next(n for n in names if n != echoes[-1])
        lines.append(f"request: {mp} request --node {asker} --data "
                     f"{shlex.quote(str(data_dir(asker)))} --to {echoes[-1]} 'ping'")
    queues = dict.fromkeys(w.partition("=")[0] for n in names
                           for w in roles.get(n, {}).get("worker", ()))
    for queue in queues:
        others = [n for n in names if not any(w.partition("=")[0] == queue
                                              for w in roles.get(n, {}).get("worker", ()))]
        if others:
            ventilator, sink = others[0], others[-1]
            lines.append(f"tasks:   {mp} task --node {ventilator} --data "
                         f"{shlex.quote(str(data_dir(ventilator)))} "
                         f"--queue {shlex.quote(queue)} --sink {sink} 'hola' 'mundo'")
            lines.append(f"results: {mp} history --node {sink} --data "
                         f"{shlex.quote(str(data_dir(sink)))}")
    return lines


def cmd_host(args: argparse.Namespace) -> int:
    """Run several nodes of a mesh config in this one process (`meshpost.host`)."""
    from meshpost import eventloop
    from meshpost.cli.common import setup_logging
    from meshpost.config import MeshConfig
    from meshpost.host import node_configs, node_roles, run_host, select_nodes

    loop = eventloop.choose(args.loop)
    setup_logging(args.log_level)
    mesh = MeshConfig.load(Path(args.config))
    overrides: dict[str, object] = {"sync": args.sync} if args.sync else {}
    if args.secure:
        overrides["secure"] = True
    names = select_nodes(mesh, args.nodes)
    configs = node_configs(mesh, names, **overrides)
    # Each node's roles (echo, workers, gateways, discovery) from its [nodes.NAME] table.
    eventloop.run(run_host(configs, folder=Path(args.folder) if args.folder else None,
                           roles=node_roles(mesh, names)), loop)
    return EXIT_OK


def _cluster_status(root: Path) -> int:
    from rich.table import Table

    from meshpost.cluster import cluster_status
    from meshpost.text import render, terminal_width

    nodes = cluster_status(root)
    table = Table(title=f"cluster in {root}", title_justify="left")
    for col in ("node", "pid", "state", "endpoint", "log"):
        table.add_column(col, overflow="fold")
    for n in nodes:
        table.add_row(n.name, str(n.pid), n.state, n.endpoint, n.log)
    print(render(table, terminal_width()))
    down = [n.name for n in nodes if n.state != "ready"]
    if down:
        print(f"not ready: {', '.join(down)} (bring one back with `meshpost cluster restart "
              f"{down[0] if len(down) == 1 else 'NAME'} --data {shlex.quote(str(root))}`)",
              file=sys.stderr)
        return EXIT_NOT_RUNNING
    return EXIT_OK


def add_cluster(sub: Subcommands) -> None:
    """`meshpost cluster ...`."""
    p = sub.add_parser("cluster", help="start or stop N local node processes")
    csub = p.add_subparsers(dest="action", required=True)
    up = csub.add_parser("up", help="start N nodes in the background and wait until each "
                         "answers; exit 8 naming the ones that did not")
    up.add_argument("count", type=at_least(1))
    up.add_argument("--base-port", type=int)
    up.add_argument("--transport", choices=["tcp", "ipc"], default="tcp")
    up.add_argument("--data", help=CLUSTER_DATA_HELP + ", apart from nodes started by hand")
    up.add_argument("--sync", choices=["full", "normal"], help=SYNC_HELP)
    up.add_argument("--secure", action="store_true")
    up.add_argument("--replace", action="store_true",
                    help="stop a cluster already running in that folder first")
    up.add_argument("--per-process", type=at_least(1), metavar="K",
                    help="run K nodes in each process (`meshpost host`) instead of one")
    add_loop_option(up, "every node process (`cluster restart` keeps it)")
    up.add_argument("--peers-per-node", type=at_least(1), metavar="k",
                    help="each node lists k random others (a partial mesh; about 2k links "
                         "each) instead of every node")
    # Roles, named as `meshpost node`'s flags and written into each node's [nodes.NAME]
    # table; a value may end in @NODES (A,C or a range B..D) to give it to those nodes only.
    up.add_argument("--echo", action="store_true",
                    help="every node answers each message with its own text, as a reply "
                         "(`meshpost request` gets it back)")
    up.add_argument("--worker", action="append", default=[], metavar="QUEUE=HANDLER[@NODES]",
                    help="serve a work queue with a handler (upper, lower, reverse, echo or "
                         "module:function) on NODES (A,C or B..D; default every node); "
                         "repeat for more queues")
    up.add_argument("--prefetch", action="append", default=[], metavar="N[@NODES]",
                    help="the workers of NODES (default every node serving a queue) take at "
                         "most N tasks at once and say so to the ventilators (1..1024; "
                         "default 16)")
    up.add_argument("--text-listen", action="append", default=[],
                    metavar="tcp://HOST:PORT[@NODES]",
                    help="a plain TCP text gateway on NODES: a fixed port for one node only, "
                         "port 0 (any free one) for several")
    up.add_argument("--udp-listen", action="append", default=[],
                    metavar="udp://HOST:PORT[@NODES]",
                    help="a plain UDP text gateway on NODES, as --text-listen")
    down = csub.add_parser("down", help="stop the cluster's nodes")
    down.add_argument("--data", help=CLUSTER_DATA_HELP)
    status = csub.add_parser("status", help="each node: ready, not answering or stopped "
                             "(exit 4 unless all are ready)")
    status.add_argument("--data", help=CLUSTER_DATA_HELP)
    restart = csub.add_parser("restart", help="stop one node if it runs, start it again")
    restart.add_argument("name")
    restart.add_argument("--data", help=CLUSTER_DATA_HELP)
    p.set_defaults(func=cmd_cluster)


def add_host(sub: Subcommands) -> None:
    """`meshpost host ...`."""
    p = sub.add_parser("host", help="run several nodes of a mesh config in one process, each "
                       "with its own store, identity, endpoint and control socket")
    p.add_argument("--config", required=True,
                   help="TOML mesh config listing every node (each hosted node runs the roles "
                        "its [nodes.NAME] table gives: echo, worker, text_listen, discover ...)")
    p.add_argument("--nodes", required=True, metavar="SPEC",
                   help="which nodes: A,B,C or a range n001..n050 of the file's order")
    p.add_argument("--folder", help="folder for the host's endpoint (`cluster` uses it for "
                   "status and restart); none by default")
    p.add_argument("--sync", choices=["full", "normal"], help=SYNC_HELP)
    p.add_argument("--secure", action="store_true", help="CURVE encryption + authentication")
    add_loop_option(p, "the host process")
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=cmd_host)

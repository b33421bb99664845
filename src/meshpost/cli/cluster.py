"""`meshpost cluster up|down|status|restart`: N local node processes started in the background
from a folder's state file; what to print and which exit code. Starting, stopping and readiness
belong to `meshpost.cluster`. `meshpost host`: several nodes of a mesh file in one process
(`meshpost.host`), which `cluster up --per-process` starts."""

from __future__ import annotations

import argparse
import contextlib
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from meshpost.errors import EXIT_NOT_RUNNING, EXIT_OK, ClusterNotRunning, MeshpostError

#: `cluster up` prints the commands for every node up to this many, for the first few beyond.
LISTED_NODES = 26

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
    if args.replace:
        with contextlib.suppress(ClusterNotRunning):
            for name, what in local.stop_from_state(root).items():
                print(f"  old {name}: {what}")
    local.refuse_if_running(root)
    options = {"sync": args.sync} if args.sync else {}
    extra = ["--secure"] if args.secure else []
    cluster = local.LocalCluster.create(root, args.count, base_port=args.base_port,
                                        transport=args.transport, options=options,
                                        extra_args=extra, per_process=args.per_process,
                                        peers_per_node=args.peers_per_node)
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
        print(f"  {name}  {cluster.endpoints[name]}  pid {proc.pid}")
        print(f"      send:    {mp} send --node {name} --data {data} --to all 'hello'")
        print(f"      attach:  {mp} attach --node {name} --data {data}")
        print(f"      history: {mp} history --node {name} --data {data}")
    if len(shown) < len(cluster.names):
        print(f"  ... and {len(cluster.names) - len(shown)} more, {cluster.names[3]} to "
              f"{cluster.names[-1]} (the same commands with their names)")
    where = shlex.quote(str(root))
    print(f"status: {mp} cluster status --data {where}   "
          f"restart one: {mp} cluster restart NAME --data {where}")
    print(f"stop with: {mp} cluster down --data {where}")
    return EXIT_OK


def cmd_host(args: argparse.Namespace) -> int:
    """Run several nodes of a mesh config in this one process (`meshpost.host`)."""
    import asyncio

    from meshpost.cli.common import setup_logging
    from meshpost.config import MeshConfig
    from meshpost.host import node_configs, node_roles, run_host, select_nodes

    setup_logging(args.log_level)
    mesh = MeshConfig.load(Path(args.config))
    overrides: dict[str, object] = {"sync": args.sync} if args.sync else {}
    if args.secure:
        overrides["secure"] = True
    names = select_nodes(mesh, args.nodes)
    configs = node_configs(mesh, names, **overrides)
    # Each node's roles (echo, workers, gateways, discovery) from its [nodes.NAME] table.
    asyncio.run(run_host(configs, folder=Path(args.folder) if args.folder else None,
                         roles=node_roles(mesh, names)))
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
              f"NAME --data {shlex.quote(str(root))}`)", file=sys.stderr)
        return EXIT_NOT_RUNNING
    return EXIT_OK


def add_cluster(sub: Subcommands) -> None:
    """`meshpost cluster ...`."""
    p = sub.add_parser("cluster", help="start or stop N local node processes")
    csub = p.add_subparsers(dest="action", required=True)
    up = csub.add_parser("up", help="start N nodes in the background and wait until each "
                         "answers; exit 8 naming the ones that did not")
    up.add_argument("count", type=int)
    up.add_argument("--base-port", type=int)
    up.add_argument("--transport", choices=["tcp", "ipc"], default="tcp")
    up.add_argument("--data", help="folder for the cluster (default: the user data dir's "
                    "meshpost/cluster, apart from nodes started by hand)")
    up.add_argument("--sync", choices=["full", "normal"])
    up.add_argument("--secure", action="store_true")
    up.add_argument("--replace", action="store_true",
                    help="stop a cluster already running in that folder first")
    up.add_argument("--per-process", type=int, metavar="K",
                    help="run K nodes in each process (`meshpost host`) instead of one")
    up.add_argument("--peers-per-node", type=int, metavar="k",
                    help="each node lists k random others (a partial mesh; about 2k links "
                         "each) instead of every node")
    down = csub.add_parser("down", help="stop the cluster's nodes")
    down.add_argument("--data")
    status = csub.add_parser("status", help="each node: ready, not answering or stopped "
                             "(exit 4 unless all are ready)")
    status.add_argument("--data")
    restart = csub.add_parser("restart", help="stop one node if it runs, start it again")
    restart.add_argument("name")
    restart.add_argument("--data")
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
    p.add_argument("--sync", choices=["full", "normal"], help="SQLite synchronous level")
    p.add_argument("--secure", action="store_true", help="CURVE encryption + authentication")
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=cmd_host)

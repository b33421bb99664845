"""`meshpost node` runs one node in this process (with its control socket, gateways, discovery,
echo and workers) until a signal; `meshpost attach` opens a console on a running one, and
`meshpost stop` sends that signal to one. Flags
become a validated `NodeConfig` and `NodeRoles` here (the roles set up by `meshpost.roles`, as
a hosted node's are); the node itself is built from them and nothing else."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meshpost.cli.common import (
    DATA_HELP,
    NODE_HELP,
    SYNC_HELP,
    add_loop_option,
    data_dir,
    name_argument,
    setup_logging,
)
from meshpost.config import (
    MeshConfig,
    NodeConfig,
    default_data_dir,
    parse_group_flag,
    parse_peer_flag,
)
from meshpost.errors import EXIT_OK, EXIT_TIMEOUT, ConfigError

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from meshpost.cli.common import Subcommands
    from meshpost.roles import NodeRoles

#: Environment variable naming a `CrashPoint` for fault-injection tests (never set it in
#: production: the node exits with code 99 at that protocol step).
CRASH_ENV = "MESHPOST_DEBUG_CRASH_AT"

log = logging.getLogger("meshpost")


def build_node_config(args: argparse.Namespace) -> NodeConfig:
    overrides: dict[str, Any] = {}
    if args.sync:
        overrides["sync"] = args.sync
    if args.max_message_bytes:
        overrides["max_message_bytes"] = args.max_message_bytes
    if args.link_idle_s is not None:
        overrides["link_idle_s"] = args.link_idle_s
    if args.subscriber_idle_s is not None:
        overrides["subscriber_idle_s"] = args.subscriber_idle_s
    if args.secure:
        overrides["secure"] = True
    if args.insecure:
        overrides["insecure"] = True
    if args.exclusive:
        overrides["exclusive"] = args.exclusive
    folder = Path(args.data) if args.data else None
    if args.config:
        if given := [flag for flag, values in (("--peer", args.peer), ("--group", args.group))
                     if values]:
            # They used to be dropped without a word: the node ran without the peer asked for.
            raise ConfigError(
                f"{' and '.join(given)} cannot be combined with --config (the file says who the "
                f"nodes and groups are): add them to {args.config} (a [nodes.NAME] table for "
                "each node, [groups]), or run with --bind and --peer and no --config")
        mesh = MeshConfig.load(Path(args.config))
        cfg = mesh.node(args.name, data_dir=folder, **overrides)
        if args.bind:
            from dataclasses import replace

            cfg = replace(cfg, bind=tuple(args.bind))
        return cfg
    if not args.bind:
        raise ConfigError("give --bind ENDPOINT (and --peer NAME=ENDPOINT ...) or --config FILE")
    return NodeConfig(
        name=args.name,
        bind=tuple(args.bind),
        peers=tuple(parse_peer_flag(p) for p in args.peer),
        data_dir=folder or default_data_dir(args.name),
        groups=dict(parse_group_flag(g) for g in args.group),
        **overrides,
    )


async def _run_node(cfg: NodeConfig, *, interactive: bool,
                    roles: NodeRoles | None = None) -> None:
    import asyncio
    import signal

    from meshpost import roles as node_roles
    from meshpost.control import ControlServer
    from meshpost.eventloop import loop_name
    from meshpost.host import reload_keys_on_hangup
    from meshpost.node import CrashPoint, Node

    crash = os.environ.get(CRASH_ENV)
    crash_at = CrashPoint(crash) if crash else None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    log.info("[%s] event loop: %s", cfg.name, loop_name(loop))
    signalled: list[str] = []

    def on_signal(sig: signal.Signals) -> None:
        signalled.append(sig.name)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    curve_keys = peer_keys = None
    loader = None
    if cfg.secure:
        import functools

        from meshpost import keys

        curve_keys = keys.load_own(cfg.data_dir, name=cfg.name)
        peer_keys = keys.load_authorized(cfg.data_dir)
        loader = functools.partial(keys.load_authorized, cfg.data_dir)
    node = Node(cfg, crash_at=crash_at, curve_keys=curve_keys, peer_public_keys=peer_keys,
                authorized_keys_loader=loader)
    if interactive:
        # The console's terminal closed: stop as on SIGTERM (committed, peers told), not
        # the default action's abrupt end.
        loop.add_signal_handler(signal.SIGHUP, on_signal, signal.SIGHUP)
    else:
        # Headless (a daemon's convention): read authorized_keys again, as `meshpost keys
        # reload` asks (a node without --secure logs that it has none).
        reload_keys_on_hangup(loop, lambda: [node])
    async with (
        node,
        ControlServer(node),
        # Echo, workers, gateways, discovery: set up as `meshpost host` sets up its nodes'.
        node_roles.running(node, roles or node_roles.NodeRoles(),
                           public_key=curve_keys[1] if curve_keys else None,
                           authorized_keys=peer_keys if cfg.secure else None),
    ):
        if interactive:
            from meshpost.console import run_console

            console = asyncio.create_task(run_console(node))
            stopper = asyncio.create_task(stop.wait())
            await asyncio.wait({console, stopper}, return_when=asyncio.FIRST_COMPLETED)
            for task in (console, stopper):
                task.cancel()
            await asyncio.gather(console, stopper, return_exceptions=True)
        else:
            await node.serve(stop)  # raises NodeFailed (exit 6) if the node fails first
            log.info("[%s] shutting down", cfg.name)
    if interactive and signalled:
        # The console vanished with the signal (`meshpost stop` from another terminal, say):
        # its user is told why, once the node has committed what was pending and said Bye.
        # (Headless, the log says it.)
        print(f"node {cfg.name} stopped on {signalled[0]} (`meshpost stop`, `kill`): what was "
              f"pending is committed, and its peers were told", flush=True)


def build_roles(args: argparse.Namespace) -> NodeRoles:
    """The node's roles: its `[nodes.NAME]` table's (with `--config`), the flags given on
    top (`meshpost.roles`: the same rules as for a hosted node)."""
    from meshpost.roles import merged_options, roles_from_options

    table = MeshConfig.load(Path(args.config)).roles(args.name) if args.config else {}
    return roles_from_options(merged_options(table, vars(args)),
                              where=f"[nodes.{args.name}] or its flags")


def owns_terminal() -> bool:
    """Standard input and output are a terminal whose foreground this process is in: the
    console may run. A node started with `&` from a shell is in a background process group;
    its console's first write stopped it ("Stopped (tty output)") before it served anyone, so
    it runs headless instead, as `--headless` would."""
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        return False
    try:
        return os.tcgetpgrp(sys.stdin.fileno()) == os.getpgrp()
    except OSError:  # a terminal that is not this process's controlling one
        return False


def cmd_node(args: argparse.Namespace) -> int:
    from meshpost import eventloop

    loop = eventloop.choose(args.loop)  # a wrong --loop / MESHPOST_LOOP fails before anything
    cfg = build_node_config(args)
    interactive = not args.headless and owns_terminal()
    if interactive:  # node.log goes there: say so before mkdir's "File exists" does
        from meshpost.store.connection import check_data_dir

        check_data_dir(cfg.data_dir)
    setup_logging(args.log_level, log_file=cfg.data_dir / "node.log" if interactive else None)
    eventloop.run(_run_node(cfg, interactive=interactive, roles=build_roles(args)), loop)
    return EXIT_OK


async def _attach(folder: Path, name: str) -> None:
    from meshpost.console import run_console, run_script
    from meshpost.remote import RemoteNode

    async with RemoteNode(folder, name=name) as remote:
        if sys.stdin.isatty():
            await run_console(remote)
        else:
            # Commands from a pipe or a file: plain lines out, no prompt_toolkit screen
            # (which warned "Input is not a terminal" and echoed each line twice).
            await run_script(remote, _stdin_lines())


async def _stdin_lines() -> AsyncIterator[str]:
    """Standard input's lines as they come (a pipe may be slow), without blocking the loop."""
    import asyncio

    while line := await asyncio.to_thread(sys.stdin.readline):
        yield line


def cmd_attach(args: argparse.Namespace) -> int:
    setup_logging("warning")
    import asyncio

    asyncio.run(_attach(data_dir(args), args.node))
    return EXIT_OK


#: Seconds `meshpost stop` waits for the node to commit what is pending and exit.
STOP_WAIT_S = 30.0
STOP_WAIT_MAX_S = 86_400.0


def cmd_stop(args: argparse.Namespace) -> int:
    """`meshpost stop --node A`: the `meshpost node A` process that answers on A's control
    socket gets SIGTERM, as Ctrl-C would (it commits what is pending, says Bye to its peers
    and exits 0); wait until it is gone."""
    import signal
    import time

    from meshpost.control import ControlClient, StatusRequest, checked
    from meshpost.processes import is_node_process, pid_exists

    if not 0 < args.timeout <= STOP_WAIT_MAX_S:
        raise ConfigError(f"--timeout must be a number of seconds above 0, at most "
                          f"{STOP_WAIT_MAX_S:g}")
    with ControlClient(data_dir(args), name=args.node) as client:
        reply = checked(client.request(StatusRequest(), timeout_s=5))
    pid = int(reply.status["pid"])
    # Only a process of its own: a node hosted with others (`meshpost host`, `cluster up
    # --per-process`) or one inside a program (the library) shares its process with them.
    if not is_node_process(pid, args.node):
        raise ConfigError(
            f"{args.node!r} runs in process {pid}, which is not `meshpost node {args.node}` "
            f"(a `meshpost host` of several nodes, or a program using meshpost): stop that "
            f"process instead (`meshpost cluster down` for a cluster)")
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + args.timeout
    while pid_exists(pid):
        if time.monotonic() >= deadline:
            print(f"{args.node} (pid {pid}) is still stopping after {args.timeout:g} s",
                  file=sys.stderr)
            return EXIT_TIMEOUT
        time.sleep(0.05)
    print(f"{args.node} stopped (pid {pid})")
    return EXIT_OK


def add_stop(sub: Subcommands) -> None:
    """`meshpost stop --node NAME`."""
    p = sub.add_parser("stop", help="stop a running `meshpost node` (as Ctrl-C would): it "
                                    "commits what is pending and exits")
    p.add_argument("--node", required=True, help=NODE_HELP)
    p.add_argument("--data", help=DATA_HELP)
    p.add_argument("--timeout", type=float, default=STOP_WAIT_S, metavar="S",
                   help=f"seconds to wait for it to exit (default {STOP_WAIT_S:g}; exit 3 "
                        "if it is still running then)")
    p.set_defaults(func=cmd_stop)


def add_node(sub: Subcommands) -> None:
    """`meshpost node NAME ...`."""
    p = sub.add_parser("node", help="run one node (console on a terminal, headless otherwise)")
    p.add_argument("name", help="this node's name: 1-63 ASCII letters, digits, '_', '.', '-'")
    p.add_argument("--bind", action="append", default=[], help="endpoint to listen on (repeat)")
    p.add_argument("--peer", action="append", default=[], help="NAME=ENDPOINT (repeat)")
    p.add_argument("--group", action="append", default=[], help="GROUP=A,B,C (repeat)")
    p.add_argument("--config", help="TOML mesh config listing every node")
    p.add_argument("--data", help="data directory (default: per-name user data dir)")
    p.add_argument("--sync", choices=["full", "normal"], help=SYNC_HELP)
    p.add_argument("--max-message-bytes", type=int,
                   help="largest message accepted, in bytes (default 65536); give every node "
                        "of the mesh the same")
    p.add_argument("--link-idle-s", type=float, metavar="S",
                   help="close a link with nothing to send after S seconds (default 60; "
                        "0: never); it reopens on the next message")
    p.add_argument("--subscriber-idle-s", type=float, metavar="S",
                   help="drop an events subscription (meshpost attach) whose client has not "
                        "polled for S seconds (default 30)")
    p.add_argument("--secure", action="store_true", help="CURVE encryption + authentication")
    p.add_argument("--insecure", action="store_true",
                   help="allow binding beyond loopback without --secure (anyone who can reach "
                        "the port can read, send and claim any peer's name)")
    p.add_argument("--exclusive", metavar="PEER",
                   help="accept only PEER (an exclusive pair): any other node is refused, "
                        "told why, and noted here")
    p.add_argument("--headless", action="store_true", help="no console even on a terminal")
    p.add_argument("--text-listen", metavar="tcp://HOST:PORT",
                   help="plain TCP text gateway for nc/socket clients (off by default)")
    p.add_argument("--udp-listen", metavar="udp://HOST:PORT",
                   help="plain UDP text gateway: one datagram, one message (off by default)")
    p.add_argument("--discover", type=int, nargs="?", const=5671, metavar="PORT",
                   help="find and join nodes by UDP beacons (default port 5671)")
    p.add_argument("--discover-host", metavar="HOST",
                   help="address beacons are heard on (default all interfaces)")
    p.add_argument("--beacon-to", action="append", default=[], metavar="HOST:PORT",
                   help="where beacons go (repeat; default 255.255.255.255:PORT)")
    p.add_argument("--mesh", metavar="NAME", type=name_argument("mesh"),
                   help="only join nodes of this mesh name")
    p.add_argument("--beacon-interval", type=float, metavar="SECONDS",
                   help="seconds between beacons (default 1; silent after 5 of them)")
    p.add_argument("--text-idle-gap", type=float, metavar="SECONDS",
                   help="a TCP client's pause that ends unterminated text (default 0.2)")
    p.add_argument("--worker", action="append", default=[], metavar="QUEUE=HANDLER",
                   help="serve a work queue with a handler: upper, lower, reverse, echo or "
                        "module:function (repeat)")
    p.add_argument("--prefetch", type=int, metavar="N",
                   help="tasks each --worker queue runs at once, announced to ventilators, "
                        "which give it at most N unfinished (default 16, at most 1024; more "
                        "for instant handlers, fewer for slow ones)")
    p.add_argument("--echo", action="store_true",
                   help="answer every message with its own text, as a reply linked to it")
    add_loop_option(p, "the node's process")
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=cmd_node)


def add_attach(sub: Subcommands) -> None:
    """`meshpost attach --node NAME`."""
    p = sub.add_parser("attach", help="console for a running (e.g. headless) node; with "
                                      "standard input not a terminal, runs its commands "
                                      "(one a line) and prints plainly")
    p.add_argument("--node", required=True, help=NODE_HELP)
    p.add_argument("--data", help=DATA_HELP)
    p.set_defaults(func=cmd_attach)

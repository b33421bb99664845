"""The `meshpost` command line: arguments, logging, exit codes. No business logic here.

Exit codes (README's table lists the same, a test compares them): 0 success; 1 internal error;
2 usage or configuration error; 3 no receipt in time (the message stays queued and is delivered
later); 4 node or cluster not running, or no store (the node never ran there); 5 message
rejected by the receiver; 6 storage error; 7 an endpoint to bind is in use; 8 a node of
`cluster up`/`restart` did not start.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import logging
import math
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meshpost.config import (
    MeshConfig,
    NodeConfig,
    default_data_dir,
    parse_group_flag,
    parse_peer_flag,
)
from meshpost.errors import (
    EXIT_ADDRESS_IN_USE,
    EXIT_INTERNAL,
    EXIT_NODE_NOT_STARTED,
    EXIT_NOT_RUNNING,
    EXIT_OK,
    EXIT_REJECTED,
    EXIT_STORE,
    EXIT_TIMEOUT,
    EXIT_USAGE,
    ClusterNotRunning,
    ConfigError,
    InvalidMessage,
    MeshpostError,
)

if TYPE_CHECKING:
    from meshpost.discovery import DiscoveryConfig
    from meshpost.gateway import GatewayConfig

#: Every exit code and what it means, as README's table says it (tests compare the two).
EXIT_CODE_MEANINGS: dict[int, str] = {
    EXIT_OK: "success",
    EXIT_INTERNAL: "internal error (a bug: please report it with the log)",
    EXIT_USAGE: "usage or configuration error",
    EXIT_TIMEOUT: "no receipt in time; the message stays queued",
    EXIT_NOT_RUNNING: "node or cluster not running, or no store",
    EXIT_REJECTED: "rejected or refused by the receiver",
    EXIT_STORE: "storage error",
    EXIT_ADDRESS_IN_USE: "endpoint in use",
    EXIT_NODE_NOT_STARTED: "a cluster node did not start",
}

__all__ = ["EXIT_ADDRESS_IN_USE", "EXIT_CODE_MEANINGS", "EXIT_INTERNAL", "EXIT_NODE_NOT_STARTED",
           "EXIT_NOT_RUNNING", "EXIT_OK", "EXIT_REJECTED", "EXIT_STORE", "EXIT_TIMEOUT",
           "EXIT_USAGE", "build_parser", "main"]

#: Environment variable naming a `CrashPoint` for fault-injection tests (never set it in
#: production: the node exits with code 99 at that protocol step).
CRASH_ENV = "MESHPOST_DEBUG_CRASH_AT"
#: Upper bound of `send --timeout` (a day): larger values are a typo, not a wish.
MAX_TIMEOUT_S = 86_400.0

log = logging.getLogger("meshpost")


def setup_logging(level: str, *, log_file: Path | None = None) -> None:
    """Log to stderr, or to `log_file` (the console owns the terminal: a log line printed
    there would tear the line being typed)."""
    fmt = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
    target: dict[str, Any] = {"stream": sys.stderr}
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        target = {"filename": str(log_file), "encoding": "utf-8"}
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), format=fmt,
                        force=True, **target)


# -- node ---------------------------------------------------------------------------------


def build_node_config(args: argparse.Namespace) -> NodeConfig:
    overrides: dict[str, Any] = {}
    if args.sync:
        overrides["sync"] = args.sync
    if args.max_message_bytes:
        overrides["max_message_bytes"] = args.max_message_bytes
    if args.secure:
        overrides["secure"] = True
    if args.insecure:
        overrides["insecure"] = True
    if args.exclusive:
        overrides["exclusive"] = args.exclusive
    data_dir = Path(args.data) if args.data else None
    if args.config:
        mesh = MeshConfig.load(Path(args.config))
        cfg = mesh.node(args.name, data_dir=data_dir, **overrides)
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
        data_dir=data_dir or default_data_dir(args.name),
        groups=dict(parse_group_flag(g) for g in args.group),
        **overrides,
    )


async def _run_node(cfg: NodeConfig, *, interactive: bool,
                    gateway: GatewayConfig | None = None,
                    discovery: DiscoveryConfig | None = None, echo: bool = False,
                    workers: Sequence[tuple[str, str]] = ()) -> None:
    import asyncio
    import signal

    from meshpost.control import ControlServer
    from meshpost.gateway import Gateway, GatewayConfig
    from meshpost.node import CrashPoint, Node

    crash = os.environ.get(CRASH_ENV)
    crash_at = CrashPoint(crash) if crash else None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    curve_keys = peer_keys = None
    if cfg.secure:
        from meshpost import keys

        curve_keys = keys.load_own(cfg.data_dir)
        peer_keys = keys.load_authorized(cfg.data_dir)
    node = Node(cfg, crash_at=crash_at, curve_keys=curve_keys, peer_public_keys=peer_keys)
    async with (
        node,
        ControlServer(node),
        Gateway(node, gateway or GatewayConfig()),
        contextlib.AsyncExitStack() as stack,
    ):
        if discovery is not None:
            from meshpost.discovery import Discovery

            await stack.enter_async_context(Discovery(
                node, discovery, public_key=curve_keys[1] if curve_keys else None,
                authorized_keys=peer_keys if cfg.secure else None,
            ))
        if echo:
            # Seed 000's server: every request and every plain message is answered with its
            # own text, as a reply linked to it.
            node.on_request(_echo, direct=True)
        if workers:
            from meshpost.pipeline import resolve_handler

            for queue, spec in workers:
                await node.serve_queue(queue, resolve_handler(spec))
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


def _workers(args: argparse.Namespace) -> list[tuple[str, str]]:
    from meshpost.pipeline import parse_worker_flag

    return [parse_worker_flag(value) for value in args.worker]


def cmd_task(args: argparse.Namespace) -> int:
    """Queue tasks on a running node (the ventilator); print their ids."""
    from meshpost.control import ControlClient, SubmitRequest, checked

    bodies = [t for t in args.text if t.strip()]
    if not bodies:
        raise EmptyCommandText()
    with ControlClient(_data_dir(args), name=args.node) as client:
        reply = checked(client.request(SubmitRequest(queue=args.queue, sink=args.sink,
                                                     bodies=bodies, lease_s=args.lease),
                                       timeout_s=60))
    for task_id in reply.task_ids:
        print(task_id)
    return EXIT_OK


def cmd_pipeline(args: argparse.Namespace) -> int:
    from meshpost.pipeline import run_pipeline_demo

    setup_logging("warning")
    return run_pipeline_demo(args.tasks, keep=args.keep)


def _echo(msg: Any) -> str:
    return str(msg.body)


def cmd_node(args: argparse.Namespace) -> int:
    cfg = build_node_config(args)
    interactive = not args.headless and sys.stdin.isatty() and sys.stdout.isatty()
    setup_logging(args.log_level, log_file=cfg.data_dir / "node.log" if interactive else None)
    import asyncio

    asyncio.run(_run_node(cfg, interactive=interactive, gateway=build_gateway_config(args),
                          discovery=build_discovery_config(args), echo=args.echo,
                          workers=_workers(args)))
    return EXIT_OK


def build_discovery_config(args: argparse.Namespace) -> DiscoveryConfig | None:
    """`--discover [PORT]` and its companions as a `DiscoveryConfig` (None: off)."""
    from meshpost.config import validate_name
    from meshpost.discovery import DiscoveryConfig, parse_target

    if args.discover is None:
        if args.beacon_to or args.mesh:
            raise ConfigError("--beacon-to and --mesh need --discover [PORT]")
        return None
    if not 0 <= args.discover < 65536:
        raise ConfigError(f"--discover port must be from 0 to 65535, not {args.discover}")
    if args.beacon_interval is not None and not args.beacon_interval > 0:
        raise ConfigError("--beacon-interval must be a positive number of seconds")
    options: dict[str, Any] = {}
    if args.beacon_interval:
        options["interval_s"] = args.beacon_interval
        options["silence_s"] = max(5 * args.beacon_interval, 1.0)
    return DiscoveryConfig(
        port=args.discover, host=args.discover_host,
        targets=tuple(parse_target(t) for t in args.beacon_to),
        mesh=validate_name(args.mesh) if args.mesh else "meshpost", **options,
    )


def build_gateway_config(args: argparse.Namespace) -> GatewayConfig:
    """`--text-listen` / `--udp-listen` as a `GatewayConfig` (both off by default)."""
    from meshpost.gateway import GatewayConfig, parse_listen

    if args.text_idle_gap is not None and not args.text_idle_gap > 0:
        raise ConfigError(f"--text-idle-gap must be a positive number of seconds, "
                          f"not {args.text_idle_gap}")
    return GatewayConfig(
        tcp=parse_listen(args.text_listen, "tcp") if args.text_listen else None,
        udp=parse_listen(args.udp_listen, "udp") if args.udp_listen else None,
        **({"idle_gap_s": args.text_idle_gap} if args.text_idle_gap else {}),
    )


# -- send / peers / status ------------------------------------------------------------------


def _timeout(text: str) -> float:
    """argparse type of `--timeout`: a finite number of seconds, 0 to a day."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or not 0 <= value <= MAX_TIMEOUT_S:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not between 0 and {MAX_TIMEOUT_S:g} seconds")
    return value


def _data_dir(args: argparse.Namespace) -> Path:
    return Path(args.data) if args.data else default_data_dir(args.node)


def _fmt_time(ns: int | None) -> str:
    from meshpost.text import format_time

    return format_time(ns)


class EmptyCommandText(InvalidMessage):
    def __init__(self) -> None:
        super().__init__("the message text is empty; give it after the options, e.g. "
                         "`meshpost send --node A --to B hello`")


def _bodies(args: argparse.Namespace) -> list[str]:
    """The message(s) to send: TEXT, else `-f FILE`, else standard input; with `--lines`,
    one message per non-empty line."""
    if args.text and args.file:
        raise ConfigError("give the text either as arguments or with -f FILE, not both")
    if args.text:
        text = " ".join(args.text)
    elif args.file:
        path = Path(args.file)
        try:
            text = sys.stdin.read() if args.file == "-" else path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read {args.file}: {exc}") from None
    elif sys.stdin.isatty():
        raise ConfigError("no text: give it as arguments, with -f FILE, or on standard input "
                          "(echo hi | meshpost send ...)")
    else:
        text = sys.stdin.read()
    if args.lines:
        # Like `mosquitto_pub -l`: one message per line; empty lines carry nothing to send.
        return [line for line in text.splitlines() if line.strip()]
    # A trailing newline (echo, a file) is the line's end, not part of the message.
    return [text[:-1] if text.endswith("\n") else text]


def _result_json(r: Any) -> str:
    record = _struct_dict(r)
    record["status"] = "delivered" if r.delivered else ("rejected" if r.error else "queued")
    return json.dumps(record, ensure_ascii=False)


def cmd_send(args: argparse.Namespace) -> int:
    from meshpost.control import ControlClient, ErrorReply, SendReply, SendRequest, checked
    from meshpost.text import clean

    bodies = _bodies(args)
    if not any(body.strip() for body in bodies):
        raise EmptyCommandText()
    if len(bodies) == 1 and not args.json and _is_broadcast(args):
        return _send_broadcast(args, bodies[0])
    requests = (SendRequest(args.to, body, args.timeout) for body in bodies)
    queued: set[str] = set()
    code = EXIT_OK
    with ControlClient(_data_dir(args), name=args.node) as client:
        replies = client.stream(requests, timeout_s=args.timeout + 10, window=args.window)
        for index, reply in replies:
            if isinstance(reply, ErrorReply):
                if not args.lines:
                    checked(reply)  # raises: main() prints it and exits with its code
                if args.json:
                    print(json.dumps({"line": index + 1, "status": "error", "kind": reply.kind,
                                      "error": reply.message}, ensure_ascii=False))
                if not args.quiet:
                    print(f"meshpost send: line {index + 1}: {reply.message}", file=sys.stderr)
                code = max(code, reply.exit_code)
                continue
            assert isinstance(reply, SendReply)
            for r in reply.sent:
                outcome = _report_result(r, args, clean)
                if outcome == EXIT_TIMEOUT:
                    queued.add(r.to)
                code = max(code, outcome)
    if queued and not args.quiet:
        _why_unreachable(args, queued)
    return code


def cmd_request(args: argparse.Namespace) -> int:
    """Send a request through a running node and print the peer's reply."""
    from meshpost.control import AnswerReply, ControlClient, PeerRequest, checked
    from meshpost.text import clean

    body = " ".join(args.text)
    if not body.strip():
        raise EmptyCommandText()
    with ControlClient(_data_dir(args), name=args.node) as client:
        reply = checked(client.request(PeerRequest(to=args.to, body=body,
                                                   timeout_s=args.timeout),
                                       timeout_s=args.timeout + 10))
    assert isinstance(reply, AnswerReply)
    if args.json:
        print(json.dumps({"request_id": reply.request_id, "id": reply.reply_id,
                          "sender": reply.sender, "body": reply.body,
                          "sent_at_ns": reply.sent_at_ns, "stored_at_ns": reply.stored_at_ns},
                         ensure_ascii=False))
    else:
        print(clean(reply.body))
    return EXIT_OK


def _is_broadcast(args: argparse.Namespace) -> bool:
    """`--to all` or a group: anything but one of the node's peers."""
    if args.to == "all":
        return True
    from meshpost.control import ControlClient, StatusRequest, checked

    with ControlClient(_data_dir(args), name=args.node) as client:
        peers = checked(client.request(StatusRequest(), timeout_s=10)).peers
    return args.to not in {p.name for p in peers}


def _send_broadcast(args: argparse.Namespace, body: str) -> int:
    """One logical message to `all` or a group: `delivered k/n (pending: ...)` as receipts
    come, until all are in or `--timeout`; the pending keep their copy and are retried."""
    from meshpost.control import BroadcastRequest, BroadcastStatusRequest, ControlClient, checked
    from meshpost.text import clean, format_broadcast

    def say(text: str) -> None:
        if not args.quiet:
            print(text, flush=True)

    deadline = time.monotonic() + args.timeout
    shown: set[str] = set()
    with ControlClient(_data_dir(args), name=args.node) as client:
        status = checked(client.request(BroadcastRequest(args.to, body), timeout_s=30)).status
        say(f"… {args.node} → {clean(args.to)}: stored for {status.total} "
            f"(id {status.logical_id})")
        while True:
            for member in status.delivered:
                if member not in shown:
                    shown.add(member)
                    say(f"✓ delivered to {clean(member)}: {format_broadcast(status)}")
            for member, why in status.rejected:
                if member not in shown:
                    shown.add(member)
                    if not args.quiet:
                        print(f"✗ {clean(member)}: {clean(why)}", file=sys.stderr)
            left = deadline - time.monotonic()
            if status.settled or left <= 0:
                break
            request = BroadcastStatusRequest(status.logical_id, len(shown), min(left, 5.0))
            status = checked(client.request(request, timeout_s=left + 10)).status
    if status.pending:
        if not args.quiet:
            print(f"… {format_broadcast(status)} within {args.timeout:g}s; the pending keep "
                  "their copy, retried until they receipt", file=sys.stderr)
        return EXIT_TIMEOUT
    return EXIT_REJECTED if status.rejected else EXIT_OK


def _report_result(r: Any, args: argparse.Namespace, clean: Callable[[str], str]) -> int:
    if args.json:
        print(_result_json(r))
    if r.delivered:
        if not args.json and not args.quiet:
            print(f"✓ delivered to {r.to} at {_fmt_time(r.delivered_at_ns)} "
                  f"(id {r.id}, sync={clean(r.sync or '')})")
        return EXIT_OK
    if r.error:
        if not args.quiet:
            # The detail of a rejection is the receiver's text: escaped, like any peer's text.
            print(f"✗ {r.to}: {clean(r.error)}", file=sys.stderr)
        return EXIT_REJECTED
    if not args.quiet:
        print(f"… no receipt from {r.to} within {args.timeout:g}s; message {r.id} stays "
              "queued and will be delivered when the peer is reachable", file=sys.stderr)
    return EXIT_TIMEOUT


def _why_unreachable(args: argparse.Namespace, peers: set[str]) -> None:
    """After a timeout: what the node knows of why (a refusal, a failed secure handshake)."""
    from meshpost.control import ControlClient, StatusRequest, checked
    from meshpost.text import clean

    with contextlib.suppress(MeshpostError), ControlClient(_data_dir(args), name=args.node) as c:
        for p in checked(c.request(StatusRequest(), timeout_s=5)).peers:
            if p.name in peers and p.refusal:
                print(f"  {p.name}: {clean(p.refusal)}", file=sys.stderr)


def cmd_peers(args: argparse.Namespace) -> int:
    from meshpost.control import ControlClient, StatusRequest, checked
    from meshpost.node import NodeStats
    from meshpost.text import render_peers_table, render_stats, terminal_width

    with ControlClient(_data_dir(args), name=args.node) as client:
        reply = checked(client.request(StatusRequest(), timeout_s=5))
    if args.json:
        print(json.dumps({"status": reply.status,
                          "peers": [_struct_dict(p) for p in reply.peers]}, indent=2))
        return EXIT_OK
    print(render_peers_table(list(reply.peers), now_ns=time.time_ns(), width=terminal_width(),
                             title=f"{reply.status.get('name')} — peers"))
    print(f"pending in outbox: {reply.status.get('pending')}")
    known = NodeStats.__dataclass_fields__
    stats = reply.status.get("stats") or {}
    print(render_stats(NodeStats(**{k: v for k, v in stats.items() if k in known})))
    return EXIT_OK


def _struct_dict(obj: Any) -> dict[str, Any]:
    import msgspec

    result = msgspec.to_builtins(obj)
    assert isinstance(result, dict)
    return result


# -- history --------------------------------------------------------------------------------

HISTORY_FIELDS = (
    "id", "from", "to", "body", "sent_at_ns", "hlc", "direction", "state", "stored_at_ns",
    "delivered_at_ns", "receipt_received_at_ns", "receipt_recorded_at_ns", "receipt_sync",
    "kind", "ref",
)


def history_record(m: Any) -> dict[str, Any]:
    """One message as the stable `history --json` schema (see README)."""
    return {
        "id": m.id,
        "from": m.sender,
        "to": m.recipient,
        "body": m.body,
        "sent_at_ns": m.sent_at_ns,
        "hlc": m.hlc,
        "direction": m.direction,
        "state": m.state,
        "stored_at_ns": m.stored_at_ns,
        "delivered_at_ns": m.receipt_stored_at_ns,
        "receipt_received_at_ns": m.receipt_received_at_ns,
        "receipt_recorded_at_ns": m.receipt_arrived_at_ns,
        "receipt_sync": m.receipt_sync,
        "kind": getattr(m, "kind", None),
        "ref": getattr(m, "ref", None),
    }


def cmd_history(args: argparse.Namespace) -> int:
    from meshpost.store import StoreReader

    if args.n is not None and args.n < 1:
        raise ConfigError(f"-n wants a whole number of messages, 1 or more, not {args.n}")

    with StoreReader.for_data_dir(_data_dir(args)) as reader:
        rows = reader.history(peer=args.peer, limit=args.n)
        known = reader.peers() if args.peer and not rows else []
    if args.peer and not rows:
        # Not an error (a script may ask about any peer, and --json prints []), but a
        # mistyped name should not look like an empty conversation.
        others = ", ".join(known) or "none"
        print(f"meshpost history: no messages with {args.peer!r} in {args.node}'s store "
              f"(peers it has messages with: {others})", file=sys.stderr)
    records = [history_record(m) for m in rows]
    if args.json:
        json.dump(records, sys.stdout, ensure_ascii=False, indent=1)
        print()
    elif args.csv:
        writer = csv.DictWriter(sys.stdout, fieldnames=HISTORY_FIELDS)
        writer.writeheader()
        if sys.stdout.isatty():
            # On a terminal a body could rewrite the screen (ESC, BEL, bidi overrides): show
            # them escaped, as the table does. Files and pipes get the bytes as stored.
            from meshpost.text import clean

            records = [{k: clean(v) if isinstance(v, str) else v for k, v in r.items()}
                       for r in records]
        writer.writerows(records)
    else:
        from meshpost.text import render_history, terminal_width

        title = f"history of {args.node}" + (f" with {args.peer}" if args.peer else "")
        # Bodies are whatever a peer sent: plain text, never markup, control characters
        # escaped (as in the console), shortened unless -v.
        print(render_history(rows, me=args.node, width=terminal_width(), verbose=args.verbose,
                             title=title))
    return EXIT_OK


# -- groups ---------------------------------------------------------------------------------


def cmd_group(args: argparse.Namespace) -> int:
    from meshpost.control import ControlClient, GroupRequest, checked
    from meshpost.text import clean

    with ControlClient(_data_dir(args), name=args.node) as client:
        reply = checked(client.request(GroupRequest(args.action, args.group), timeout_s=30))
    members = ", ".join(clean(m) for m in reply.members) or "nobody"
    if args.action != "members":
        done = {"join": "joined", "leave": "left"}[args.action]
        state = {"join": "a member of", "leave": "not in"}[args.action]
        print(f"{args.node} {done} {clean(args.group)}" if reply.changed
              else f"{args.node} was {state} {clean(args.group)} already")
    print(f"{clean(args.group)}: {members}")
    return EXIT_OK


# -- tail -----------------------------------------------------------------------------------

#: How long one `tail` poll waits at the node for a first message.
TAIL_POLL_S = 5.0


def cmd_tail(args: argparse.Namespace) -> int:
    from meshpost.control import ControlClient, TailRequest, checked
    from meshpost.text import format_incoming

    if args.count is not None and args.count < 1:
        raise ConfigError(f"--count wants a whole number of messages, 1 or more, not "
                          f"{args.count}")
    shown = 0
    with ControlClient(_data_dir(args), name=args.node) as client:
        # The node's cursor of now: messages stored from here on are shown, none skipped,
        # however long a line takes to print (the next poll starts where this one ended).
        cursor = checked(client.request(TailRequest(), timeout_s=10)).cursor
        if not args.quiet:
            until = f" until {args.until!r}" if args.until is not None else ""
            print(f"meshpost tail: {args.node}'s incoming messages from now{until} "
                  "(Ctrl-C to stop)", file=sys.stderr, flush=True)
        while True:
            limit = 512 if args.count is None else min(512, args.count - shown)
            request = TailRequest(after=cursor, sender=args.sender, limit=limit,
                                  wait_s=TAIL_POLL_S)
            reply = checked(client.request(request, timeout_s=TAIL_POLL_S + 10))
            cursor = reply.cursor
            for m in reply.messages:
                if args.until is not None and m.body == args.until:
                    return EXIT_OK  # the end marker ends the stream; it is not printed
                if args.json:
                    print(json.dumps(history_record(m), ensure_ascii=False), flush=True)
                else:
                    print(format_incoming(m), flush=True)
                shown += 1
                if args.count is not None and shown >= args.count:
                    return EXIT_OK


# -- cluster ----------------------------------------------------------------------------


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
                                        extra_args=extra)
    if args.secure:
        from meshpost.keys import generate_mesh_keys

        generate_mesh_keys({n: cluster.data_dir(n) for n in cluster.names})
    try:
        cluster.start()
    except MeshpostError:
        cluster.stop()  # all or nothing: no half cluster left running without a state file
        raise
    state = cluster.save_state()
    for process in cluster.nodes.values():
        process.detach()
    mp, on_path = local.meshpost_command()
    print(f"started {len(cluster.names)} nodes, each ready; config {cluster.config_path}; "
          f"state {state}")
    if not on_path:
        print(f"(meshpost is not on your PATH: the commands below use its full path; or run "
              f"`export PATH={shlex.quote(str(Path(sys.executable).parent))}:$PATH`)")
    for name in cluster.names:
        data = shlex.quote(str(cluster.data_dir(name)))
        print(f"  {name}  {cluster.endpoints[name]}  pid {cluster.nodes[name].pid}")
        print(f"      send:    {mp} send --node {name} --data {data} --to all 'hello'")
        print(f"      attach:  {mp} attach --node {name} --data {data}")
        print(f"      history: {mp} history --node {name} --data {data}")
    where = shlex.quote(str(root))
    print(f"status: {mp} cluster status --data {where}   "
          f"restart one: {mp} cluster restart NAME --data {where}")
    print(f"stop with: {mp} cluster down --data {where}")
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


def cmd_keys(args: argparse.Namespace) -> int:
    from meshpost import keys

    data_dir = _data_dir(args)
    if args.action == "show":
        public = keys.load_public(data_dir)
    else:
        public = keys.generate(data_dir, overwrite=args.force)
    public_file, secret_file = keys.key_paths(data_dir)
    line = keys.authorized_line(args.node, public)
    print(line)
    if args.action == "generate":
        print(f"public key: {public_file}\nsecret key: {secret_file} (mode 0600)",
              file=sys.stderr)
    print(f"to trust {args.node}, add the line `{line}` (printed above on stdout) to every "
          f"peer's {keys.AUTHORIZED_KEYS} file, in that peer's data dir", file=sys.stderr)
    return EXIT_OK


async def _attach(data_dir: Path, name: str) -> None:
    from meshpost.console import run_console
    from meshpost.remote import RemoteNode

    async with RemoteNode(data_dir, name=name) as remote:
        await run_console(remote)


def cmd_attach(args: argparse.Namespace) -> int:
    setup_logging("warning")
    import asyncio

    asyncio.run(_attach(_data_dir(args), args.node))
    return EXIT_OK


def cmd_bench(args: argparse.Namespace) -> int:
    from meshpost.bench import options_from_args, run

    return run(options_from_args(args))


def cmd_demo(args: argparse.Namespace) -> int:
    from meshpost.demo import run_demo

    return run_demo(nodes=args.nodes, messages=args.messages,
                    root=Path(args.data) if args.data else None, secure=args.secure)


# -- parser -------------------------------------------------------------------------------


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("meshpost")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown (not installed)"



def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshpost",
        description="Brokerless messaging mesh: receipted, stored on both ends, clock-stamped.",
    )
    parser.add_argument("--version", action="version", version=f"meshpost {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("node", help="run one node (console on a terminal, headless otherwise)")
    p.add_argument("name")
    p.add_argument("--bind", action="append", default=[], help="endpoint to listen on (repeat)")
    p.add_argument("--peer", action="append", default=[], help="NAME=ENDPOINT (repeat)")
    p.add_argument("--group", action="append", default=[], help="GROUP=A,B,C (repeat)")
    p.add_argument("--config", help="TOML mesh config listing every node")
    p.add_argument("--data", help="data directory (default: per-name user data dir)")
    p.add_argument("--sync", choices=["full", "normal"], help="SQLite synchronous level")
    p.add_argument("--max-message-bytes", type=int)
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
    p.add_argument("--discover-host", default="0.0.0.0", metavar="HOST",
                   help="address beacons are heard on (default all interfaces)")
    p.add_argument("--beacon-to", action="append", default=[], metavar="HOST:PORT",
                   help="where beacons go (repeat; default 255.255.255.255:PORT)")
    p.add_argument("--mesh", metavar="NAME", help="only join nodes of this mesh name")
    p.add_argument("--beacon-interval", type=float, metavar="SECONDS",
                   help="seconds between beacons (default 1; silent after 5 of them)")
    p.add_argument("--text-idle-gap", type=float, metavar="SECONDS",
                   help="a TCP client's pause that ends unterminated text (default 0.2)")
    p.add_argument("--worker", action="append", default=[], metavar="QUEUE=HANDLER",
                   help="serve a work queue with a handler: upper, lower, reverse, echo or "
                        "module:function (repeat)")
    p.add_argument("--echo", action="store_true",
                   help="answer every message with its own text, as a reply linked to it")
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=cmd_node)

    p = sub.add_parser("send", help="send through a running node and wait for the receipt")
    p.add_argument("--node", required=True)
    p.add_argument("--to", required=True, help="peer name, group name, or 'all'")
    p.add_argument("--data")
    p.add_argument("--timeout", type=_timeout, default=10.0,
                   help="seconds to wait for each receipt (0 to not wait; at most a day)")
    p.add_argument("-l", "--lines", action="store_true",
                   help="one message per line of the input, streamed through one connection")
    p.add_argument("-f", "--file", help="read the text from FILE ('-': standard input)")
    p.add_argument("--json", action="store_true", help="one JSON object per receipt a line")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="print no receipts or notes; the exit code tells")
    p.add_argument("--window", type=int, default=1024, help=argparse.SUPPRESS)
    p.add_argument("text", nargs="*",
                   help="the message (default: -f FILE, else standard input)")
    p.set_defaults(func=cmd_send)

    p = sub.add_parser("request", help="send a request through a running node and print "
                                       "the peer's reply")
    p.add_argument("--node", required=True)
    p.add_argument("--to", required=True, help="the peer that answers")
    p.add_argument("--data")
    p.add_argument("--timeout", type=_timeout, default=10.0,
                   help="seconds to wait for the reply (exit 3 saying whether the peer had "
                        "the request)")
    p.add_argument("--json", action="store_true", help="the reply as one JSON object")
    p.add_argument("text", nargs="+", help="the request")
    p.set_defaults(func=cmd_request)

    p = sub.add_parser("task", help="queue tasks on a work queue through a running node "
                                    "(the ventilator)")
    p.add_argument("--node", required=True)
    p.add_argument("--queue", required=True)
    p.add_argument("--sink", required=True, help="the node that keeps each task's result")
    p.add_argument("--lease", type=float, default=30.0,
                   help="seconds a worker has per task before it is redelivered")
    p.add_argument("--data")
    p.add_argument("text", nargs="+", help="one task per argument")
    p.set_defaults(func=cmd_task)

    p = sub.add_parser("pipeline", help="seed 002 on the mesh: ventilator, workers, sink")
    psub = p.add_subparsers(dest="pipeline_command", required=True)
    demo = psub.add_parser("demo", help="run it with a worker killed mid-run; exit 0 only "
                                        "if every result arrived once")
    demo.add_argument("--tasks", type=int, default=200)
    demo.add_argument("--keep", action="store_true", help="keep the data directories")
    demo.set_defaults(func=cmd_pipeline)

    p = sub.add_parser("peers", help="peers of a running node: connected, RTT, clock offset")
    p.add_argument("--node", required=True)
    p.add_argument("--data")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_peers)

    p = sub.add_parser("history", help="messages stored by a node (works while it runs)")
    p.add_argument("--node", required=True)
    p.add_argument("--peer")
    p.add_argument("--data")
    p.add_argument("-n", type=int, default=None, help="only the last N messages")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true")
    fmt.add_argument("--csv", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="whole message texts and ids in the table (shortened otherwise)")
    p.set_defaults(func=cmd_history)

    p = sub.add_parser("group", help="join or leave a group at run time, or list its members")
    p.add_argument("action", choices=["join", "leave", "members"])
    p.add_argument("group")
    p.add_argument("--node", required=True)
    p.add_argument("--data")
    p.set_defaults(func=cmd_group)

    p = sub.add_parser("tail", help="print a running node's incoming messages as they arrive")
    p.add_argument("--node", required=True)
    p.add_argument("--data")
    p.add_argument("--from", dest="sender", metavar="PEER", help="only messages from PEER")
    p.add_argument("--count", "-C", type=int, metavar="N", help="exit 0 after N messages")
    p.add_argument("--until", metavar="TEXT",
                   help="exit 0 when a message's whole text is TEXT (that one not printed)")
    p.add_argument("--json", action="store_true",
                   help="one JSON object a line, with the `history --json` fields")
    p.add_argument("-q", "--quiet", action="store_true", help="no note on standard error")
    p.set_defaults(func=cmd_tail)

    p = sub.add_parser("attach", help="console for a running (e.g. headless) node")
    p.add_argument("--node", required=True)
    p.add_argument("--data")
    p.set_defaults(func=cmd_attach)

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
    down = csub.add_parser("down", help="stop the cluster's nodes")
    down.add_argument("--data")
    status = csub.add_parser("status", help="each node: ready, not answering or stopped "
                             "(exit 4 unless all are ready)")
    status.add_argument("--data")
    restart = csub.add_parser("restart", help="stop one node if it runs, start it again")
    restart.add_argument("name")
    restart.add_argument("--data")
    p.set_defaults(func=cmd_cluster)

    p = sub.add_parser("keys", help="CURVE keys for --secure")
    ksub = p.add_subparsers(dest="action", required=True)
    gen = ksub.add_parser("generate", help="create this node's key pair in its data dir")
    gen.add_argument("--node", required=True)
    gen.add_argument("--data")
    gen.add_argument("--force", action="store_true", help="replace an existing key pair")
    show = ksub.add_parser("show", help="print this node's authorized_keys line again")
    show.add_argument("--node", required=True)
    show.add_argument("--data")
    p.set_defaults(func=cmd_keys)

    p = sub.add_parser("demo", help="run a local mesh, send, verify both stores, exit")
    p.add_argument("--nodes", type=int, default=5)
    p.add_argument("--messages", type=int, default=20)
    p.add_argument("--data", help="keep the demo's files here (default: a temp dir)")
    p.add_argument("--secure", action="store_true")
    p.set_defaults(func=cmd_demo)

    from meshpost.bench.options import scenario_epilog

    p = sub.add_parser("bench", help="benchmark against raw pyzmq (and brokers); see --help",
                       epilog=scenario_epilog(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scenarios", nargs="*", metavar="SCENARIO",
                   help="scenarios to run (listed below; default: all)")
    p.add_argument("--messages", type=int, default=200_000,
                   help="throughput messages (mesh-saturated: split over its nodes)")
    p.add_argument("--size", type=int, default=100, help="body size in bytes")
    p.add_argument("--nodes", type=int, default=20, help="nodes of both mesh scenarios")
    p.add_argument("--mesh-messages", type=int, default=2_000, help="messages per mesh node")
    p.add_argument("--latency-messages", type=int, default=20_000)
    p.add_argument("--backlog-messages", type=int, default=1_000_000)
    p.add_argument("--sync", choices=["full", "normal"], default="full")
    p.add_argument("--transport", choices=["tcp", "ipc"], default="tcp")
    p.add_argument("--json", metavar="FILE", help="JSON results (default: OUT/latest.json)")
    p.add_argument("--plot", metavar="DIR", help="PNG plots (default: OUT)")
    p.add_argument("--out", help="results folder (default: benchmarks/results for every "
                   "scenario, benchmarks/results/SCENARIO[+SCENARIO...] for chosen ones)")
    p.add_argument("--uvloop", action="store_true", help="uvloop for in-process/driver nodes")
    p.add_argument("--window", type=int, help="NodeConfig.window for the pair scenarios")
    p.add_argument("--repeat", type=int, default=3,
                   help="runs of ceiling and pair-throughput; the best of each counts")
    p.add_argument("--hog", type=int, default=0, metavar="N",
                   help="pair-throughput and mesh-saturated beside N busy-looping processes (a "
                   "CPU hog, stopped after each run): retransmissions per message under load")
    p.add_argument("--keep", action="store_true", help="keep the nodes' work files")
    p.add_argument("--seed", type=int, default=7)
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result: int = args.func(args)
        return result
    except MeshpostError as exc:
        print(f"meshpost {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader of our output went away (`meshpost history --json | head`): not an error
        # of ours. Point stdout at /dev/null so that the interpreter's final flush stays quiet.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_OK

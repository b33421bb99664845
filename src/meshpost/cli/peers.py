"""`meshpost peers` and `group`: a running node's peers (links, RTT, clock offset, counters;
with `--probe`, each asked for a sign of life now) and its groups (join, leave, members),
asked over its control socket and printed."""

from __future__ import annotations

import argparse
import json
import time
from typing import TYPE_CHECKING

from meshpost.cli.common import DATA_HELP, NODE_HELP, data_dir, name_argument, struct_dict
from meshpost.errors import EXIT_OK

if TYPE_CHECKING:
    from meshpost.cli.common import Subcommands


#: Seconds `--probe` waits for answers unless `--wait` says.
PROBE_WAIT_S = 2.0
#: What the control request may take beyond the probe's own wait (a busy node's reply).
PROBE_REPLY_MARGIN_S = 10.0


def cmd_peers(args: argparse.Namespace) -> int:
    if args.probe is not None:
        return probe_peers(args)
    from meshpost.control import ControlClient, StatusRequest, checked
    from meshpost.node import NodeStats
    from meshpost.text import render_counters, render_peers_table, render_stats, terminal_width

    with ControlClient(data_dir(args), name=args.node) as client:
        reply = checked(client.request(StatusRequest(), timeout_s=5))
    if args.json:
        print(json.dumps({"status": reply.status,
                          "peers": [struct_dict(p) for p in reply.peers]}, indent=2))
        return EXIT_OK
    print(render_peers_table(list(reply.peers), now_ns=time.time_ns(), width=terminal_width(),
                             title=f"{reply.status.get('name')} — peers"))
    print(f"pending in outbox: {reply.status.get('pending')}")
    if "loop" in reply.status:  # a node older than the field does not say
        print(f"process: pid {reply.status.get('pid')}, event loop {reply.status['loop']}")
    known = NodeStats.__dataclass_fields__
    stats = reply.status.get("stats") or {}
    print(render_stats(NodeStats(**{k: v for k, v in stats.items() if k in known})))
    for role, counters in (reply.status.get("roles") or {}).items():
        print(render_counters(f"{role}:", counters))
    return EXIT_OK


def probe_peers(args: argparse.Namespace) -> int:
    """`meshpost peers --node A --probe [PEER ...] [--wait S]`: the node asks each peer (idle
    links included) for a sign of life and reports live (round trip), lost or refused."""
    from meshpost.control import ControlClient, ProbeRequest, checked
    from meshpost.control.messages import PROBE_WAIT_MAX_S
    from meshpost.errors import ConfigError
    from meshpost.text import render_probes, terminal_width

    if not 0 < args.wait <= PROBE_WAIT_MAX_S:
        raise ConfigError(f"--wait must be a number of seconds above 0, at most "
                          f"{PROBE_WAIT_MAX_S:g}")
    with ControlClient(data_dir(args), name=args.node) as client:
        reply = checked(client.request(ProbeRequest(peers=args.probe, wait_s=args.wait),
                                       timeout_s=args.wait + PROBE_REPLY_MARGIN_S))
    if args.json:
        print(json.dumps([struct_dict(p) for p in reply.probes], indent=2))
        return EXIT_OK
    print(render_probes(list(reply.probes), width=terminal_width(),
                        title=f"{args.node} — probe (waited up to {args.wait:g}s)"))
    return EXIT_OK


def cmd_group(args: argparse.Namespace) -> int:
    from meshpost.control import ControlClient, GroupRequest, checked
    from meshpost.text import clean

    with ControlClient(data_dir(args), name=args.node) as client:
        reply = checked(client.request(GroupRequest(args.action, args.group), timeout_s=30))
    members = ", ".join(clean(m) for m in reply.members) or "nobody"
    if args.action != "members":
        done = {"join": "joined", "leave": "left"}[args.action]
        state = {"join": "a member of", "leave": "not in"}[args.action]
        print(f"{args.node} {done} {clean(args.group)}" if reply.changed
              else f"{args.node} was {state} {clean(args.group)} already")
    print(f"{clean(args.group)}: {members}")
    return EXIT_OK


def add_peers(sub: Subcommands) -> None:
    """`meshpost peers --node A`."""
    p = sub.add_parser("peers", help="peers of a running node: connected, RTT, clock offset")
    p.add_argument("--node", required=True, help=NODE_HELP)
    p.add_argument("--data", help=DATA_HELP)
    p.add_argument("--json", action="store_true")
    p.add_argument("--probe", nargs="*", metavar="PEER",
                   help="ask each peer (or the PEERs named) for a sign of life now, idle "
                        "links included, and report live (round trip), lost or refused")
    p.add_argument("--wait", type=float, default=PROBE_WAIT_S, metavar="S",
                   help=f"--probe: seconds to wait for answers (default {PROBE_WAIT_S:g})")
    p.set_defaults(func=cmd_peers)


def add_group(sub: Subcommands) -> None:
    """`meshpost group join|leave|members G --node A`."""
    p = sub.add_parser("group", help="join or leave a group at run time, or list its members")
    p.add_argument("action", choices=["join", "leave", "members"])
    p.add_argument("group", type=name_argument("group"))
    p.add_argument("--node", required=True, help=NODE_HELP)
    p.add_argument("--data", help=DATA_HELP)
    p.set_defaults(func=cmd_group)

"""`meshpost queue status` and `meshpost broadcast status`: what became of a running node's
work queues (workers, tasks waiting, in flight, done, redelivered) and of one of its messages
to many (delivered k/n), asked over its control socket; both survive a restart of the node,
since the node reads them from its store."""

from __future__ import annotations

import argparse
import json
import time
from typing import TYPE_CHECKING

from meshpost.cli.common import (
    DATA_HELP,
    NODE_HELP,
    data_dir,
    name_argument,
    struct_dict,
    timeout_seconds,
)
from meshpost.errors import EXIT_OK

if TYPE_CHECKING:
    from meshpost.cli.common import Subcommands


def cmd_queue_status(args: argparse.Namespace) -> int:
    from meshpost.control import ControlClient, QueueStatusRequest, checked
    from meshpost.text import render_queues

    with ControlClient(data_dir(args), name=args.node) as client:
        queues = checked(client.request(QueueStatusRequest(args.queue), timeout_s=10)).queues
    if args.json:
        print(json.dumps([struct_dict(q) for q in queues], ensure_ascii=False))
    else:
        print(render_queues(queues))
    return EXIT_OK


def cmd_broadcast_status(args: argparse.Namespace) -> int:
    from meshpost.cli.send import follow_broadcast
    from meshpost.control import BroadcastStatusRequest, ControlClient, checked
    from meshpost.text import clean, format_broadcast

    deadline = time.monotonic() + args.timeout
    with ControlClient(data_dir(args), name=args.node) as client:
        status = checked(client.request(BroadcastStatusRequest(args.id), timeout_s=10)).status
        if not args.quiet:
            print(f"… {args.node} → {clean(status.target)} (id {status.logical_id}): "
                  f"{format_broadcast(status)}", flush=True)
        return follow_broadcast(client, status, args, deadline)


def add_queue(sub: Subcommands) -> None:
    """`meshpost queue status [Q] --node A [--json]`."""
    p = sub.add_parser("queue", help="work queues of a running node: workers and task counts")
    qsub = p.add_subparsers(dest="queue_command", required=True)
    status = qsub.add_parser("status", help="workers (live, suspect, in flight) and tasks "
                                            "waiting, in flight, leased, done, redelivered")
    status.add_argument("queue", nargs="?", type=name_argument("queue"),
                        help="only this queue (default: every one known)")
    status.add_argument("--node", required=True, help=NODE_HELP)
    status.add_argument("--data", help=DATA_HELP)
    status.add_argument("--json", action="store_true", help="one JSON array of QueueStatus")
    status.set_defaults(func=cmd_queue_status)


def add_broadcast(sub: Subcommands) -> None:
    """`meshpost broadcast status ID --node A [--timeout S]`."""
    p = sub.add_parser("broadcast", help="a message to many sent by a running node: "
                                         "delivered k/n, also after the node restarted")
    bsub = p.add_subparsers(dest="broadcast_command", required=True)
    status = bsub.add_parser("status", help="delivered k/n of broadcast ID (the id `send "
                                            "--to all|G` printed), waiting for the pending")
    status.add_argument("id")
    status.add_argument("--node", required=True, help=NODE_HELP)
    status.add_argument("--data", help=DATA_HELP)
    status.add_argument("--timeout", type=timeout_seconds, default=0.0,
                        help="wait up to S seconds for the pending members (default: none)")
    status.add_argument("-q", "--quiet", action="store_true")
    status.set_defaults(func=cmd_broadcast_status)

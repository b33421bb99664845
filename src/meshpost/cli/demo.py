"""`meshpost demo` and `meshpost pipeline demo`: self-contained runs that start their own
local nodes, check the outcome and exit 0 only if it holds. The runs themselves live in
`meshpost.demo` and `meshpost.pipeline`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from meshpost.cli.common import add_loop_option, at_least, setup_logging

#: Fewest tasks of `pipeline demo`: W1 is killed once a third of the results are in, and
#: with 5 tasks the two workers had finished them all before the demo looked, so the run
#: said "W1 was not killed mid-run ... FAILED" and exited 1. With 30, twenty are left then:
#: two seconds of W2's work at the demo's 0.1 s a task, twenty of its 0.1 s polls.
PIPELINE_MIN_TASKS = 30

if TYPE_CHECKING:
    from meshpost.cli.common import Subcommands


def cmd_pipeline(args: argparse.Namespace) -> int:
    from meshpost.pipeline import run_pipeline_demo

    setup_logging("warning")
    return run_pipeline_demo(args.tasks, keep=args.keep)


def cmd_demo(args: argparse.Namespace) -> int:
    from meshpost.demo import run_demo
    from meshpost.eventloop import choose

    # uvloop asked for where it is missing, or a MESHPOST_LOOP (which the nodes inherit) that
    # names no loop: said before any node starts (each node used to fail alone: exit 8).
    choose(args.loop)
    return run_demo(nodes=args.nodes, messages=args.messages,
                    root=Path(args.data) if args.data else None, secure=args.secure,
                    loop=args.loop)


def add_pipeline(sub: Subcommands) -> None:
    """`meshpost pipeline demo`."""
    p = sub.add_parser("pipeline", help="seed 002 on the mesh: ventilator, workers, sink")
    psub = p.add_subparsers(dest="pipeline_command", required=True)
    demo = psub.add_parser("demo", help="run it with a worker killed mid-run; exit 0 only "
                                        "if every result arrived once")
    demo.add_argument("--tasks", type=at_least(PIPELINE_MIN_TASKS), default=200,
                      help=f"tasks to queue (default 200, at least {PIPELINE_MIN_TASKS}: "
                           "enough left when W1 is killed, after a third of the results)")
    demo.add_argument("--keep", action="store_true", help="keep the data directories")
    demo.set_defaults(func=cmd_pipeline)


def add_demo(sub: Subcommands) -> None:
    """`meshpost demo`."""
    p = sub.add_parser("demo", help="run a local mesh, send, verify both stores, exit")
    p.add_argument("--nodes", type=at_least(2), default=5)
    p.add_argument("--messages", type=at_least(0), default=20)
    p.add_argument("--data", help="keep the demo's files here (default: a temp dir)")
    p.add_argument("--secure", action="store_true")
    add_loop_option(p, "the demo's node processes")
    p.set_defaults(func=cmd_demo)

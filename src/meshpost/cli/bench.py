"""`meshpost bench`: its flags and the hand-over to `meshpost.bench`. Only the scenario
registry (`bench.options`, standard library only) is read to build `--help`, so that
`meshpost bench --help` loads no ZeroMQ, SQLite or asyncio."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from meshpost.cli.common import add_loop_option, at_least

if TYPE_CHECKING:
    from meshpost.cli.common import Subcommands


def _scenario(name: str) -> str:
    """argparse type of a SCENARIO: a registered name or alias (an unknown one used to end
    the run with exit 1, the code of an internal error)."""
    from meshpost.bench.options import ALIASES, SCENARIOS

    if ALIASES.get(name, name) not in SCENARIOS:
        raise argparse.ArgumentTypeError(
            f"unknown scenario {name!r}; choose from {', '.join(SCENARIOS)} (see --help)")
    return name


def cmd_bench(args: argparse.Namespace) -> int:
    from meshpost.bench import options_from_args, run

    return run(options_from_args(args))


def add_bench(sub: Subcommands) -> None:
    """`meshpost bench [SCENARIO...]`."""
    from meshpost.bench.options import DEFAULT_TASKS, scenario_epilog

    p = sub.add_parser("bench", help="benchmark against raw pyzmq (and brokers); see --help",
                       epilog=scenario_epilog(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scenarios", nargs="*", metavar="SCENARIO", type=_scenario,
                   help="scenarios to run (listed below; default: all)")
    p.add_argument("--messages", type=at_least(1), default=200_000,
                   help="throughput messages (mesh-saturated: split over its nodes)")
    p.add_argument("--size", type=at_least(1), default=100, help="body size in bytes")
    p.add_argument("--nodes", type=at_least(2), default=20, help="nodes of both mesh scenarios")
    p.add_argument("--mesh-messages", type=at_least(1), default=2_000,
                   help="messages per mesh node")
    p.add_argument("--latency-messages", type=at_least(1), default=20_000)
    p.add_argument("--backlog-messages", type=at_least(1), default=1_000_000)
    p.add_argument("--tasks", type=at_least(1), default=DEFAULT_TASKS,
                   help="tasks of work-queue (and of its raw PUSH/PULL pipeline)")
    p.add_argument("--sync", choices=["full", "normal"], default="full",
                   help="SQLite synchronous level of every node (default full)")
    p.add_argument("--transport", choices=["tcp", "ipc"], default="tcp")
    p.add_argument("--json", metavar="FILE", help="JSON results (default: OUT/latest.json)")
    p.add_argument("--plot", metavar="DIR", help="PNG plots (default: OUT)")
    p.add_argument("--out", help="results folder (default: benchmarks/results for every "
                   "scenario, benchmarks/results/SCENARIO[+SCENARIO...] for chosen ones)")
    add_loop_option(p, "every node and helper process of the run (the loop ping-pong of "
                       "pair-latency's floor too)")
    # Before uvloop became the default it ran only the in-process and driver nodes.
    p.add_argument("--uvloop", action="store_const", const="uvloop", dest="loop",
                   help=argparse.SUPPRESS)
    p.add_argument("--window", type=int, help="NodeConfig.window for the pair scenarios")
    p.add_argument("--repeat", type=at_least(1), default=3,
                   help="runs of ceiling and pair-throughput; the best of each counts")
    p.add_argument("--hog", type=at_least(0), default=0, metavar="N",
                   help="pair-throughput and mesh-saturated beside N busy-looping processes (a "
                   "CPU hog, stopped after each run): retransmissions per message under load")
    p.add_argument("--keep", action="store_true", help="keep the nodes' work files")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--per-process", type=at_least(1), metavar="K",
                   help="mesh: K nodes in each helper process (many nodes on few cores)")
    p.add_argument("--fanout", type=at_least(1), metavar="k",
                   help="mesh: each node sends to k random peers (a partial mesh, default "
                   "timers) instead of all")
    p.add_argument("--idle-seconds", type=float, metavar="S",
                   help="mesh: measure the whole mesh's CPU over S seconds with nothing to "
                   "send (default 20 with --per-process)")
    p.set_defaults(func=cmd_bench)

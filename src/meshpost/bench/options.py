"""What a bench run is asked to do: the scenario registry, the options, the shared limits.

Rule: standard library only, so that `meshpost --help` and `meshpost bench --help` can read the
registry without loading a node, ZeroMQ or rich. A scenario exists once, here: the CLI's help,
the run order and the results folder names are all derived from `REGISTRY`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class Scenario:
    """One scenario: its CLI name, the module under `meshpost.bench.scenarios` that runs it
    (a `run(bench) -> ScenarioResult` function), and one line for `--help`."""

    name: str
    module: str
    summary: str


#: Every scenario, in the order a run performs them.
REGISTRY: tuple[Scenario, ...] = (
    Scenario("ceiling", "ceiling", "raw pyzmq one-way, no receipts, no storage (the 1.0x)"),
    Scenario("pair-throughput", "pair_throughput",
             "two nodes, A posts to B as fast as the window allows"),
    Scenario("pair-latency", "pair_latency",
             "one send at a time, against a raw pyzmq ping-pong and the commit floor"),
    Scenario("send-timeline", "send_timeline",
             "pair-latency at sync=normal with probes: where a send's time goes"),
    Scenario("mesh", "mesh",
             "latency-bound: N nodes post to random peers with a small window each"),
    Scenario("mesh-saturated", "mesh_saturated",
             "N nodes post to every other node as fast as the link windows allow"),
    Scenario("offline-backlog", "offline_backlog",
             "queue M messages for a stopped peer, then time the drain"),
    Scenario("work-queue", "work_queue",
             "seed 002: ventilator → 2 workers → sink, every hop receipted, checked exactly "
             "once, beside raw PUSH/PULL"),
    Scenario("broker-anchors", "broker_anchors",
             "Mosquitto QoS 1 and NATS JetStream on loopback (skipped when missing)"),
)
SCENARIOS: tuple[str, ...] = tuple(s.name for s in REGISTRY)
#: Other names for a scenario: `mesh` is the latency-bound one of the two mesh scenarios.
ALIASES: dict[str, str] = {"mesh-latency": "mesh"}
#: What a run without scenario names performs.
DEFAULT_SCENARIOS: tuple[str, ...] = SCENARIOS

DEFAULT_RESULTS_DIR = Path("benchmarks/results")
#: Tasks of `work-queue` unless `--tasks` says (its raw pipeline gets as many). The meshpost
#: pipeline does about 100 a second at sync=full on 2 cores (each task is several commits at
#: the ventilator), so this keeps the scenario under a minute; the raw run is then short
#: (tens of ms) and noisy, the best of `--repeat` counts.
DEFAULT_TASKS = 5_000
#: Unreceipted messages the whole latency-bound mesh allows (split evenly over its nodes, at
#: least 8 and at most 256 each): small enough that latency measures the mesh rather than a
#: queue of the whole run, and that receipts come back within the initial retransmission
#: timeout; large enough to batch.
MESH_IN_FLIGHT = 2048
#: Unacknowledged QoS 1 publishes the MQTT anchor allows (paho's in-flight limit too): paho
#: scans its in-flight list per acknowledgement, so larger windows are slower, not faster.
MQTT_WINDOW = 100
WARMUP_MESSAGES = 1000
#: pair-throughput's warm-up: four full batch frames (protocol MAX_BATCH_MESSAGES, 2,048), so
#: that both stores prepare their full-batch multi-row INSERTs (SQLite: ~19M instructions,
#: ~6 ms, for 2,048 rows; once per process) before the clock starts. With WARMUP_MESSAGES
#: the warm-up used statements of at most 512 rows, and four preparations fell into the
#: timed phase: 9-11% of each side's instructions in a 30,000-message run.
PAIR_WARMUP_MESSAGES = 4 * 2048
LATENCY_WARMUP = 200
#: Sends timed for the commit floor of pair-latency (at sync=full each costs three fsyncs).
FLOOR_SENDS = 2000
#: Sends the timeline follows (each leaves about 40 stamps in the two processes' memory):
#: enough for 10 sends in its slowest 0.1%.
TIMELINE_SENDS = 10_000
READY_TIMEOUT_S = 60.0
#: A run with no receipt at all for this long has failed (progress, not total time, is judged).
STALL_S = 60.0
#: Seconds allowed per 1,000 messages on top of a fixed allowance before a run is declared stuck.
SLOW_S_PER_1000 = 2.0


class BenchError(Exception):
    """A scenario could not run or its verification failed."""


@dataclasses.dataclass
class BenchOptions:
    scenarios: list[str]
    messages: int = 200_000
    size: int = 100
    nodes: int = 20
    mesh_messages: int = 2_000
    latency_messages: int = 20_000
    backlog_messages: int = 1_000_000
    #: Tasks of the work-queue scenario (the raw pipeline of the same run gets as many).
    tasks: int = DEFAULT_TASKS
    sync: str = "full"
    transport: str = "tcp"
    json_path: Path | None = None
    plot_dir: Path | None = None
    out_dir: Path = DEFAULT_RESULTS_DIR
    #: The event loop of every node and helper process (`meshpost.eventloop`: uvloop or
    #: asyncio); None until `runner.run` resolves the default.
    loop: str | None = None
    #: `NodeConfig.window` for the pair scenarios (None: the node's default).
    window: int | None = None
    #: Runs of `ceiling` and `pair-throughput`; the best of each is reported (both alike).
    repeat: int = 3
    #: Busy-looping processes pair-throughput runs beside (0: none).
    hog: int = 0
    keep: bool = False
    seed: int = 7
    command: str = ""
    #: mesh: nodes per helper process (a `NodeHost` each); None: a process per node.
    per_process: int | None = None
    #: mesh: each node lists and sends to this many random peers (a partial mesh with the
    #: node's default timers); None: every node, timers stretched above 20 nodes.
    fanout: int | None = None
    #: mesh: seconds the whole mesh's CPU is measured with nothing to send, after the run
    #: (None: 20 with `per_process`, else none).
    idle_s: float | None = None


def allowance(messages: int) -> float:
    """Seconds a step moving `messages` may take before it counts as stuck."""
    return 60.0 + messages / 1000 * SLOW_S_PER_1000


def scenario_epilog() -> str:
    """`meshpost bench --help`'s list of scenarios: every registered one, one line each."""
    width = max(len(s.name) for s in REGISTRY)
    lines = [f"  {s.name:<{width}}  {s.summary}" for s in REGISTRY]
    aliases = ", ".join(f"{old} = {new}" for old, new in ALIASES.items())
    return "\n".join(["scenarios (default: all, in this order):", *lines,
                      f"other names: {aliases}"])


def resolve(names: Sequence[str]) -> list[str]:
    """Registered names for `names` (aliases followed, duplicates dropped, order kept);
    `SystemExit` with the choices for an unknown one."""
    resolved = [ALIASES.get(n, n) for n in names]
    unknown = [n for n, r in zip(names, resolved, strict=True) if r not in SCENARIOS]
    if unknown:
        raise SystemExit(f"meshpost bench: unknown scenario(s) {unknown}; choose from "
                         f"{', '.join(SCENARIOS)}")
    return list(dict.fromkeys(resolved))


def default_out_dir(scenarios: Sequence[str]) -> Path:
    """Where results go without `--out`: `benchmarks/results` for a run of every scenario,
    a folder named after the chosen ones otherwise, so that `meshpost bench pair-latency`
    never replaces the full run's table that the README quotes."""
    if set(scenarios) >= set(DEFAULT_SCENARIOS):
        return DEFAULT_RESULTS_DIR
    return DEFAULT_RESULTS_DIR / "+".join(s for s in SCENARIOS if s in scenarios)


def options_from_args(args: argparse.Namespace) -> BenchOptions:
    scenarios = resolve(list(args.scenarios)) if args.scenarios else list(DEFAULT_SCENARIOS)
    out_dir = Path(args.out) if args.out else default_out_dir(scenarios)
    return BenchOptions(
        scenarios=scenarios, messages=args.messages, size=args.size, nodes=args.nodes,
        mesh_messages=args.mesh_messages, latency_messages=args.latency_messages,
        backlog_messages=args.backlog_messages,
        tasks=getattr(args, "tasks", None) or DEFAULT_TASKS, sync=args.sync,
        transport=args.transport,
        json_path=Path(args.json) if args.json else None,
        plot_dir=Path(args.plot) if args.plot else None, out_dir=out_dir,
        loop=args.loop, keep=args.keep, seed=args.seed,
        window=getattr(args, "window", None), repeat=max(1, getattr(args, "repeat", 3)),
        hog=max(0, getattr(args, "hog", 0)),
        per_process=getattr(args, "per_process", None), fanout=getattr(args, "fanout", None),
        idle_s=getattr(args, "idle_seconds", None),
        command=" ".join(["meshpost bench", *sys.argv[2:]]),
    )

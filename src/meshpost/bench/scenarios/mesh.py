"""`mesh` (also `mesh-latency`): N driver processes (`python -m meshpost.bench driver`),
each a full node of one generated mesh config, each posting to random peers with a small
window. Latency per message is read back from the sender's store: receipt arrival minus
`sent_at_ns`. With `--per-process K` the nodes run K to a process (`host-driver`), and with
`--fanout k` each one sends to k random peers of a partial mesh (issue 20: 1,000 nodes on
two cores); the run then also reports CPU per message, RSS per node and the idle mesh's CPU.

Rule: latency-bound by design (a small window per node); `mesh-saturated` is the throughput
one. Shares its drivers and verification with it.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from meshpost.bench.children import Child
from meshpost.bench.options import MESH_IN_FLIGHT, READY_TIMEOUT_S, STALL_S
from meshpost.bench.results import ScenarioResult, percentiles, rounded
from meshpost.bench.support import mesh_timers, verify_all
from meshpost.cluster import LocalCluster
from meshpost.config import DEFAULT_PEER_TIMEOUT_S
from meshpost.verify import VerifyReport, load_rows

#: Seconds the idle mesh's CPU is measured by default with `--per-process`.
IDLE_S = 20.0
#: Seconds after the last message before the idle measurement: a link's recent window
#: (`peer_timeout_s`, during which it still pings) and one more.
QUIET_AFTER_S = DEFAULT_PEER_TIMEOUT_S + 1.0
#: Start-up allowance per node of the whole mesh (hosts start theirs a few at a time, on
#: two cores shared by every host).
HOST_READY_S_PER_NODE = 0.2
#: Seconds a host driver has to answer a CPU-time request (a read of a clock and /proc).
CPU_REPLY_S = 30.0

if TYPE_CHECKING:
    from meshpost.bench.runner import Bench


def run(bench: Bench) -> ScenarioResult:
    if bench.o.per_process or bench.o.fanout:
        return run_hosted(bench)
    nodes, per_node = bench.o.nodes, bench.o.mesh_messages
    total = nodes * per_node
    window = max(8, min(256, MESH_IN_FLIGHT // nodes))
    timers = mesh_timers(nodes)
    cluster = bench.cluster("mesh", nodes, options=timers)
    task = bench.task(f"mesh: {nodes} nodes → random peers", total)
    drivers: dict[str, Child] = {}
    try:
        drivers = start_drivers(bench, "mesh", cluster)
        for d in drivers.values():
            d.send(op="mesh", count=per_node, size=bench.o.size, seed=bench.o.seed,
                   window=window, stall=STALL_S * 2)
        replies = bench.collect(drivers, task, STALL_S * 2 + 30)
    finally:
        for d in drivers.values():
            d.stop()
    t0, t1, report, latencies = _outcome(cluster, replies, total)
    rate = total / (t1 - t0)
    return ScenarioResult(
        "mesh",
        figures={"nodes": nodes, "messages": total, "msgs_per_s": round(rate),
                 "seconds": round(t1 - t0, 3), "sync": bench.o.sync, "window": window,
                 **timers,
                 "retransmissions": sum(r["retransmissions"] for r in replies.values()),
                 "store_commits": sum(r["store_commits"] for r in replies.values()),
                 "latency_us": rounded(percentiles(latencies)), "size": bench.o.size},
        samples={f"mesh {nodes} nodes (accept→receipt)": latencies},
        verify=f"verified: {report.summary()}",
    )


def start_drivers(bench: Bench, scenario: str, cluster: LocalCluster) -> dict[str, Child]:
    """A driver process per node of `cluster`, each connected to every peer. On a failure the
    drivers started so far are stopped before the error goes on."""
    nodes = len(cluster.names)
    drivers: dict[str, Child] = {}
    try:
        for name in cluster.names:
            drivers[name] = bench.child(scenario, bench.driver_args(cluster, name), name)
        for d in drivers.values():
            d.reply(READY_TIMEOUT_S + nodes)
        for d in drivers.values():
            d.send(op="connect", timeout=READY_TIMEOUT_S + nodes)
        for d in drivers.values():
            d.reply(READY_TIMEOUT_S * 2 + nodes)
    except BaseException:
        for d in drivers.values():
            d.stop()
        raise
    return drivers


def run_hosted(bench: Bench) -> ScenarioResult:
    """The mesh with K nodes per process and, with `fanout`, k random peers per node at the
    node's default timers; every message verified, CPU, RSS and the idle CPU reported."""
    o = bench.o
    nodes, per_node = o.nodes, o.mesh_messages
    per_process = o.per_process or 1
    total = nodes * per_node
    window = max(8, min(256, MESH_IN_FLIGHT // nodes))
    timers = {} if o.fanout else mesh_timers(nodes)
    idle_s = o.idle_s if o.idle_s is not None else (IDLE_S if o.per_process else 0.0)
    cluster = LocalCluster.create(
        bench.root / "mesh", nodes, transport=o.transport,
        options={"sync": o.sync, **timers}, peers_per_node=o.fanout, seed=o.seed,
        per_process=per_process, env=bench.loop_env)
    hosts = cluster.host_names()
    task = bench.task(f"mesh: {nodes} nodes, {per_process} per process → "
                      f"{o.fanout or 'all'} peers", total)
    drivers: dict[str, Child] = {}
    try:
        started = time.monotonic()
        for h, run_ in hosts.items():
            role = ["host-driver", str(cluster.config_path), f"{run_[0]}..{run_[-1]}"]
            drivers[h] = bench.child("mesh", role, h)
        for d in drivers.values():
            d.reply(READY_TIMEOUT_S + HOST_READY_S_PER_NODE * nodes)
        start_s = time.monotonic() - started
        for d in drivers.values():
            d.send(op="connect", timeout=READY_TIMEOUT_S + HOST_READY_S_PER_NODE * nodes)
        for d in drivers.values():
            d.reply(READY_TIMEOUT_S * 2 + HOST_READY_S_PER_NODE * nodes)
        before = _cpu(drivers)
        for d in drivers.values():
            d.send(op="mesh", count=per_node, size=o.size, seed=o.seed, window=window,
                   stall=STALL_S * 2)
        replies = bench.collect(drivers, task, STALL_S * 2 + 30)
        after = _cpu(drivers)
        idle_cpu = None
        if idle_s > 0:
            # A link stays watched (pings) for its recent window after its last message;
            # the idle mesh is the one after that window (docs/protocol.md 2.1).
            time.sleep(QUIET_AFTER_S)
            quiet = _cpu(drivers)
            time.sleep(idle_s)
            idle_cpu = (sum(r["cpu_s"] for r in _cpu(drivers).values())
                        - sum(r["cpu_s"] for r in quiet.values())) / idle_s
    finally:
        for d in drivers.values():
            d.stop(timeout_s=30.0 + per_process)
    t0, t1, report, latencies = _outcome(cluster, replies, total)
    cpu_s = sum(after[h]["cpu_s"] - before[h]["cpu_s"] for h in drivers)
    rss = sum(r["rss"] for r in after.values())
    figures: dict[str, Any] = {
        "nodes": nodes, "per_process": per_process, "processes": len(drivers),
        "fanout": o.fanout or nodes - 1, "messages": total,
        "msgs_per_s": round(total / (t1 - t0)), "seconds": round(t1 - t0, 3),
        "start_s": round(start_s, 1), "sync": o.sync, "window": window, **timers,
        "cpu_us_per_msg": round(cpu_s * 1e6 / total, 1),
        "rss_mb_per_node": round(rss / nodes / 2**20, 2),
        "retransmissions": sum(r["retransmissions"] for r in replies.values()),
        "store_commits": sum(r["store_commits"] for r in replies.values()),
        "latency_us": rounded(percentiles(latencies)), "size": o.size,
    }
    if idle_cpu is not None:
        figures["idle_s"] = idle_s
        figures["idle_after_s"] = QUIET_AFTER_S
        figures["idle_cpu_pct_of_core"] = round(idle_cpu * 100, 2)
    return ScenarioResult(
        "mesh", figures=figures,
        samples={f"mesh {nodes} nodes, {per_process}/process (accept→receipt)": latencies},
        verify=f"verified: {report.summary()}",
    )


def _outcome(cluster: LocalCluster, replies: dict[str, dict[str, Any]],
             total: int) -> tuple[float, float, VerifyReport, list[float]]:
    """The run's span (first driver's start, last one's end), every store verified against
    `total` messages sent, and each receipted message's latency in µs (receipt arrival
    minus `sent_at_ns`, read back from the senders' stores)."""
    t0 = min(r["t0"] for r in replies.values())
    t1 = max(r["t1"] for r in replies.values())
    dirs = {n: cluster.data_dir(n) for n in cluster.names}
    report = verify_all(dirs, expect_sent=total)
    latencies = [
        (m.receipt_arrived_at_ns - m.sent_at_ns) / 1000
        for path in dirs.values() for m in load_rows(path)
        if m.direction == "out" and m.receipt_arrived_at_ns is not None
    ]
    return t0, t1, report, latencies


def _cpu(drivers: dict[str, Child]) -> dict[str, dict[str, Any]]:
    return {h: d.request(CPU_REPLY_S, op="cpu") for h, d in drivers.items()}

"""`mesh` (also `mesh-latency`): N driver processes (`python -m meshpost.bench driver`),
each a full node of one generated mesh config, each posting to random peers with a small
window. Latency per message is read back from the sender's store: receipt arrival minus
`sent_at_ns`.

Rule: latency-bound by design (a small window per node); `mesh-saturated` is the throughput
one. Shares its drivers and verification with it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from meshpost.bench.children import Child
from meshpost.bench.options import MESH_IN_FLIGHT, READY_TIMEOUT_S, STALL_S
from meshpost.bench.results import ScenarioResult, percentiles, rounded
from meshpost.bench.support import mesh_timers, verify_all
from meshpost.verify import load_rows

if TYPE_CHECKING:
    from meshpost.bench.runner import Bench
    from meshpost.cluster import LocalCluster


def run(bench: Bench) -> ScenarioResult:
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
    t0 = min(r["t0"] for r in replies.values())
    t1 = max(r["t1"] for r in replies.values())
    dirs = {n: cluster.data_dir(n) for n in cluster.names}
    report = verify_all(dirs, expect_sent=total)
    latencies = [
        (m.receipt_arrived_at_ns - m.sent_at_ns) / 1000
        for path in dirs.values() for m in load_rows(path)
        if m.direction == "out" and m.receipt_arrived_at_ns is not None
    ]
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

"""`mesh-saturated`: the mesh as a throughput test. N driver processes, each a full node of one
generated mesh config, each posting its share of `--messages` split evenly over every other
node, as fast as the link windows allow (every link of the mesh busy at once).

Rule: the figure is the aggregate rate from the first post to the last recorded receipt,
read beside pair-throughput of the same run (the ratio) and with the CPU time of every node
process per message; every message must verify as stored exactly once on both ends.
With `--hog N`, N busy-looping processes run beside the mesh (retransmissions under load).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from meshpost.bench.children import Child
from meshpost.bench.options import STALL_S
from meshpost.bench.results import ScenarioResult
from meshpost.bench.scenarios.mesh import start_drivers
from meshpost.bench.support import cpu_hog, mesh_timers, verify_all

if TYPE_CHECKING:
    from meshpost.bench.runner import Bench

#: Seconds a driver has to answer a CPU-time request (it is a read of a clock).
CPU_REPLY_S = 30.0


def run(bench: Bench) -> ScenarioResult:
    nodes = bench.o.nodes
    per_node = max(1, bench.o.messages // nodes)
    total = nodes * per_node
    timers = mesh_timers(nodes)
    cluster = bench.cluster("mesh-saturated", nodes, options=timers)
    task = bench.task(f"mesh-saturated: {nodes} nodes → every other node", total)
    drivers: dict[str, Child] = {}
    try:
        drivers = start_drivers(bench, "mesh-saturated", cluster)
        cpu_before = _cpu_seconds(drivers)
        with cpu_hog(bench.o.hog, STALL_S * 2 + 30):
            for d in drivers.values():
                d.send(op="saturate", count=per_node, size=bench.o.size, stall=STALL_S * 2)
            replies = bench.collect(drivers, task, STALL_S * 2 + 30)
        # Every node still works for others after its own last receipt: CPU is read once all
        # are done, so it covers the whole phase of every process.
        cpu_s = sum(_cpu_seconds(drivers).values()) - sum(cpu_before.values())
        counts = [d.request(CPU_REPLY_S, op="counters") for d in drivers.values()]
    finally:
        for d in drivers.values():
            d.stop()
    t0 = min(r["t0"] for r in replies.values())
    t1 = max(r["t1"] for r in replies.values())
    report = verify_all({n: cluster.data_dir(n) for n in cluster.names}, expect_sent=total)
    rate = total / (t1 - t0)
    figures: dict[str, Any] = {
        "nodes": nodes, "messages": total, "per_link": per_node // max(1, nodes - 1),
        "msgs_per_s": round(rate), "seconds": round(t1 - t0, 3), "sync": bench.o.sync,
        "size": bench.o.size, **timers,
        "cpu_us_per_msg": round(cpu_s * 1e6 / total, 2),
        "retransmissions": sum(r["retransmissions"] for r in replies.values()),
        # Resends whose first copy was receipted after all, and copies that reached a
        # receiver which had the message already (both 0 when no resend was needed).
        "spurious_retransmissions": sum(int(c["spurious_retransmissions"]) for c in counts),
        "duplicates_received": sum(int(c["duplicates"]) for c in counts),
        "store_commits": sum(r["store_commits"] for r in replies.values()),
    }
    if bench.o.hog:
        figures["hog"] = bench.o.hog
    pair = bench.results.get("pair-throughput")
    if pair is not None and pair.status == "ok":
        figures["pair_msgs_per_s"] = pair.figures["msgs_per_s"]
        figures["ratio_to_pair"] = round(rate / pair.figures["msgs_per_s"], 3)
    return ScenarioResult("mesh-saturated", figures=figures,
                          verify=f"verified: {report.summary()}")


def _cpu_seconds(drivers: dict[str, Child]) -> dict[str, float]:
    return {name: float(d.request(CPU_REPLY_S, op="cpu")["cpu_s"])
            for name, d in drivers.items()}

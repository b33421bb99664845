"""`offline-backlog`: a driver process queues M messages for a peer that is not running; its
RSS is sampled (psutil, of the `bench` extra) before, during and after; then B starts as a
real `meshpost node` process and the drain is timed until A has recorded every receipt.

Rule: memory must not grow with the backlog (it lives on disk); without psutil the scenario
is skipped with the reason.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from meshpost.bench.meters import RssSampler
from meshpost.bench.options import READY_TIMEOUT_S, allowance
from meshpost.bench.results import ScenarioResult
from meshpost.bench.support import optional, verify_all

if TYPE_CHECKING:
    from meshpost.bench.runner import Bench


def run(bench: Bench) -> ScenarioResult:
    try:
        psutil = optional("psutil")
    except ImportError:
        return ScenarioResult("offline-backlog", "skipped",
                              note="psutil is not installed (pip install -e '.[bench]')")
    m = bench.o.backlog_messages
    cluster = bench.cluster("offline-backlog", 2)
    driver = bench.child("offline-backlog", bench.driver_args(cluster, "A"), "A")
    sampler: RssSampler | None = None
    figures: dict[str, Any] = {"messages": m, "size": bench.o.size, "sync": bench.o.sync}
    try:
        pid = int(driver.reply(READY_TIMEOUT_S)["pid"])
        proc = psutil.Process(pid)
        time.sleep(0.5)
        before = proc.memory_info().rss
        sampler = RssSampler(proc)
        task = bench.task("offline-backlog: queue for a stopped peer", m)
        driver.send(op="queue", peer="B", count=m, size=bench.o.size)
        queued = bench.wait_one(driver, task, allowance(m))
        after_queue = proc.memory_info().rss
        peak_queue = sampler.take_peak()
        task = bench.task("offline-backlog: drain after the peer starts", m)
        t_start = time.monotonic()
        cluster.start(["B"])
        t_ready = time.monotonic()
        driver.send(op="drain", count=m, timeout=allowance(m))
        drained = bench.wait_one(driver, task, allowance(m) + 30)
        peak_drain = sampler.take_peak()
        after_drain = proc.memory_info().rss
    finally:
        if sampler is not None:
            sampler.stop()
        driver.stop()
        cluster.stop()
    report = verify_all({"A": cluster.data_dir("A"), "B": cluster.data_dir("B")},
                         expect_sent=m)
    mb = 1024 * 1024
    figures.update({
        "queue_seconds": round(queued["seconds"], 3),
        "queued_pending": queued["pending"],
        "rss_before_mb": round(before / mb, 1),
        "rss_after_queue_mb": round(after_queue / mb, 1),
        "rss_peak_queue_mb": round(peak_queue / mb, 1),
        "rss_peak_drain_mb": round(peak_drain / mb, 1),
        "rss_after_drain_mb": round(after_drain / mb, 1),
        "rss_growth_mb": round((max(after_queue, peak_queue) - before) / mb, 1),
        "drain_seconds": round(drained["t_done"] - t_ready, 3),
        "drain_seconds_incl_start": round(drained["t_done"] - t_start, 3),
        "drain_msgs_per_s": round(m / (drained["t_done"] - t_ready)),
    })
    return ScenarioResult("offline-backlog", figures=figures,
                          verify=f"verified: {report.summary()}")

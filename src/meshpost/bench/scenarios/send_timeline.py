"""`send-timeline`: pair-latency's workload at sync=normal with probes on both nodes: where a
send's time goes, step by step (see `meshpost.timeline`).

Rule: the timeline explains pair-latency; it is read beside it, never in place of it.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from meshpost.bench.options import LATENCY_WARMUP, READY_TIMEOUT_S, TIMELINE_SENDS
from meshpost.bench.results import ScenarioResult
from meshpost.bench.scenarios.pair_latency import send_one_at_a_time
from meshpost.bench.support import verify_all
from meshpost.config import MeshConfig
from meshpost.timeline import SEND_BEGINS, SEND_ENDS, Mark, MarkRecorder, summarise

if TYPE_CHECKING:
    from meshpost.bench.runner import Bench


def run(bench: Bench) -> ScenarioResult:
    """pair-latency's workload at sync=normal with probes on both nodes: where a send's
    time goes, step by step (see `meshpost.timeline`)."""
    sends, sync = min(bench.o.latency_messages, TIMELINE_SENDS), "normal"
    cluster = bench.cluster("send-timeline", 2, sync, bench.window_option())
    marks_path = cluster.root / "B-marks.json"
    role = ["timeline-peer", str(cluster.config_path), "B", str(cluster.data_dir("B")),
            str(marks_path)]
    peer = bench.child("send-timeline", role, "B")
    task = bench.task(f"send-timeline {sync}: one send at a time, probes on", sends)
    marks: list[Mark] = []
    try:
        peer.reply(READY_TIMEOUT_S)
        cfg = MeshConfig.load(cluster.config_path).node("A", data_dir=cluster.data_dir("A"))
        recorder = MarkRecorder(marks)
        untrack_gc = recorder.track_gc()
        try:
            send_one_at_a_time(
                bench, cfg, sends, task, started=marks.clear,
                sent=lambda begin, end: marks.extend([(SEND_BEGINS, begin), (SEND_ENDS, end)]),
                probe=recorder,
            )
        finally:
            untrack_gc()
    finally:
        peer.stop()
    # Both sides' stamps stay with the work files (`--keep`) for a closer look.
    (cluster.root / "A-marks.json").write_text(json.dumps(marks), encoding="utf-8")
    receiver: list[Mark] = [(str(label), int(t)) for label, t in
                            json.loads(marks_path.read_text(encoding="utf-8"))]
    timeline = summarise(marks, receiver)
    report = verify_all({"A": cluster.data_dir("A"), "B": cluster.data_dir("B")},
                         expect_sent=sends + LATENCY_WARMUP)
    result = ScenarioResult("send-timeline")
    result.figures = {"sync": sync, "messages": sends, **timeline.to_json()}
    result.verify = "verified: " + report.summary()
    return result

"""`meshpost bench` runs end to end with tiny counts and its own verification passes.

No timing thresholds here: the figures are checked by reading the report, never in tests.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def test_bench_runs_every_scenario_and_verifies_its_stores(short_tmp: Path) -> None:
    out = short_tmp / "results"
    result_file = out / "run.json"
    proc = subprocess.run(
        [sys.executable, "-m", "meshpost", "bench",
         "ceiling", "pair-throughput", "pair-latency", "send-timeline", "mesh",
         "mesh-saturated", "offline-backlog", "--messages", "2000", "--latency-messages", "100",
         "--nodes", "3", "--mesh-messages", "300", "--backlog-messages", "5000", "--repeat", "1",
         "--out", str(out), "--json", str(result_file)],
        capture_output=True, text=True, timeout=110,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(result_file.read_text(encoding="utf-8"))
    scenarios = doc["scenarios"]
    assert set(scenarios) == {"ceiling", "pair-throughput", "pair-latency", "send-timeline",
                              "mesh", "mesh-saturated", "offline-backlog"}
    for name, scenario in scenarios.items():
        assert scenario["status"] == "ok", (name, scenario)
    for name in ("pair-throughput", "pair-latency", "send-timeline", "mesh", "mesh-saturated",
                 "offline-backlog"):
        assert scenarios[name]["verify"].startswith("verified:"), scenarios[name]
        assert "lost=0 duplicated=0 phantom=0 mismatched=0" in scenarios[name]["verify"]
    pair = scenarios["pair-throughput"]["figures"]
    assert pair["messages"] == 2000 and pair["msgs_per_s"] > 0 and pair["ratio_to_ceiling"] > 0
    cpu = pair["cpu_us_per_msg"]  # both processes did work for the messages
    assert cpu["A"] > 0 and cpu["B"] > 0 and cpu["total"] == pytest.approx(cpu["A"] + cpu["B"],
                                                                            abs=0.02)
    wal = pair["wal_peak_mb"]  # both WAL files were written, and stayed far below the limit
    assert set(wal) == {"A", "B"} and all(0 < mb < 96 for mb in wal.values()), wal
    ceiling_runs = scenarios["ceiling"]["figures"]["runs_msgs_per_s"]
    assert len(ceiling_runs) == 2 * len(pair["runs_msgs_per_s"])  # one more before each pair run
    latency = scenarios["pair-latency"]["figures"]
    assert set(latency["meshpost_full_us"]) >= {"p50", "p90", "p99", "p99.9"}
    assert "meshpost_normal_us" in latency and "raw_pingpong_us" in latency
    assert set(latency["loop_pingpong_us"]) >= {"p50", "p99"}
    assert latency["ratio_loop"]["p50"] > 0
    # CPU a round trip of both ping-pongs, both processes (the floors of item 2).
    raw_cpu = latency["raw_cpu_us_per_round_trip"]
    _assert_cpu(raw_cpu)
    _assert_cpu(latency["loop_cpu_us_per_round_trip"])
    for sync in ("full", "normal"):
        # Each floor sample is a loop round trip plus one send's two commits, so every
        # percentile of the floor lies above the same percentile of the commits alone.
        floor, commits = latency[f"floor_{sync}_us"], latency[f"commits_{sync}_us"]
        assert all(floor[k] > commits[k] > 0 for k in ("p50", "p90", "p99", "p99.9"))
        assert latency[f"over_floor_{sync}"]["p50"] > 0
        cpu_send = latency[f"cpu_us_per_send_{sync}"]  # both processes work for every send
        assert cpu_send["A"] > 0 and cpu_send["B"] > 0
        assert cpu_send["total"] == pytest.approx(cpu_send["A"] + cpu_send["B"], abs=0.02)
        loaded = latency[f"cpu_us_per_send_{sync}_loaded"]  # the same from 16 senders at once
        assert loaded["A"] > 0 and loaded["B"] > 0
        assert set(latency[f"commits_per_send_{sync}"]) == {"idle", "loaded"}
        # The reference design (issue 20): its latency and CPU a send, both processes, and
        # each ratio equal to the figures it divides, all of this run.
        ref = latency[f"reference_{sync}_us"]
        ref_cpu = latency[f"reference_cpu_us_per_send_{sync}"]
        assert all(ref[k] > 0 for k in PERCENTILES)
        _assert_cpu(ref_cpu)
        for k in PERCENTILES:
            assert latency[f"ratio_reference_{sync}"][k] == pytest.approx(
                ref[k] / latency["raw_pingpong_us"][k], abs=0.005)
            assert latency[f"over_reference_{sync}"][k] == pytest.approx(
                latency[f"meshpost_{sync}_us"][k] / ref[k], abs=0.005)
        for key, num, den in ((f"cpu_over_raw_{sync}", cpu_send, raw_cpu),
                              (f"cpu_over_reference_{sync}", cpu_send, ref_cpu),
                              (f"reference_cpu_over_raw_{sync}", ref_cpu, raw_cpu)):
            assert latency[key] > 0
            assert latency[key] == pytest.approx(num["total"] / den["total"], abs=0.005), key
    # 100 timed sends after a warm-up of 200, each in both reference stores once, receipted
    # and recorded (the scenario reads both stores back: `reference_problems`).
    assert latency["reference_sends"] == 100
    assert scenarios["pair-latency"]["verify"].count(
        "reference 300 sent, receipted and recorded, stored once at the receiver") == 2
    timeline = scenarios["send-timeline"]["figures"]
    assert timeline["messages"] == 100 and timeline["sends"] == 100
    assert 0 < timeline["usual"] <= 100
    kinds = timeline["kinds_p50_us"]
    # Each send waits for two commits (its row on A, its row on B; A records the receipt with
    # its next commit, off the path) and two frames queued, on two nodes in turn. A queued
    # frame's `zmq send` step is on the path only while the other node's next stamp comes
    # after the send returns: when the other node already stamps its read before the sender
    # returns from `send` (its I/O thread ran first, likelier on a loaded machine), the most
    # common order hands over at `zmq send<` and the time counts as `between processes`
    # (`timeline.critical_path`): that kind may then be 0 (seen once in a full-suite run).
    assert all(kinds[k] > 0 for k in ("commit", "between processes", "meshpost code"))
    assert kinds["zmq send"] >= 0
    # Which stamps interleave, and so which of them lie on the most common order's critical
    # path, depends on the machine's load (A's receipt record commits beside B's work; either
    # node's link may ping in between), so the path's shape is pinned by the timeline's unit
    # tests on fixed stamps, not here; here: the path crosses both nodes and has commit time.
    assert {s["start"].split(":")[0] for s in timeline["steps"]} == {"A", "B"}
    mesh = scenarios["mesh"]["figures"]
    assert mesh["nodes"] == 3 and mesh["messages"] == 900
    # The saturated mesh: --messages split over its nodes, each share over every other node;
    # its rate is read beside the pair's of the same run, and every node's CPU counted.
    saturated = scenarios["mesh-saturated"]["figures"]
    assert saturated["nodes"] == 3 and saturated["messages"] == 3 * (2000 // 3)
    assert saturated["pair_msgs_per_s"] == pair["msgs_per_s"]
    assert saturated["ratio_to_pair"] == pytest.approx(
        saturated["msgs_per_s"] / pair["msgs_per_s"], rel=0.01)
    assert saturated["cpu_us_per_msg"] > 0
    backlog = scenarios["offline-backlog"]["figures"]
    assert backlog["messages"] == 5000 and backlog["queued_pending"] == 5000
    assert backlog["rss_before_mb"] > 0 and backlog["drain_seconds"] > 0
    summary = (out / "latest.md").read_text(encoding="utf-8")
    assert summary.startswith("# meshpost bench")
    assert "| pair-latency floor normal |" in summary
    assert "| pair-latency reference normal |" in summary
    assert "| pair-latency reference full |" in summary
    assert "µs/round trip (A " in summary and "× the reference's" in summary
    assert "| mesh 3 nodes, saturated |" in summary and "× pair-throughput; CPU" in summary
    assert "| send-timeline normal |" in summary and "| A:commit< | A:commit> | commit |" in summary
    assert f"CPU {cpu['total']:.1f} µs/msg (A {cpu['A']:.1f}, B {cpu['B']:.1f})" in summary
    cpu_send = latency["cpu_us_per_send_normal"]
    assert (f"CPU {cpu_send['total']:,.0f} µs/send (A {cpu_send['A']:,.0f}, "
            f"B {cpu_send['B']:,.0f})") in summary


PERCENTILES = ("p50", "p90", "p99", "p99.9")


def _assert_cpu(cpu: dict[str, float]) -> None:
    """Both processes worked; the total and each side's user/system split add up."""
    assert cpu["A"] > 0 and cpu["B"] > 0, cpu
    assert cpu["total"] == pytest.approx(cpu["A"] + cpu["B"], abs=0.02)
    for side in ("A", "B"):
        assert cpu[f"{side}_user"] >= 0 and cpu[f"{side}_sys"] >= 0
        assert cpu[f"{side}_user"] + cpu[f"{side}_sys"] == pytest.approx(cpu[side], abs=0.02)


@pytest.mark.parametrize(("statement", "says"), [
    ("_REF_RECORD", "sender: 20 rows without their receipt recorded"),
    ("_REF_SEND", "sender: 0 rows, 20 sent"),
], ids=["no-receipt-record", "no-sender-row"])
def test_the_reference_design_cannot_skip_a_commit_unnoticed(
    monkeypatch: pytest.MonkeyPatch, statement: str, says: str,
) -> None:
    """The reference design's stores are read back after its run: a sender that skipped
    its message's row or its receipt's record (a cheaper, dishonest reference) fails the
    scenario, as a meshpost store would fail `verify_stores`. Real processes and stores."""
    import io

    from rich.console import Console

    from meshpost import eventloop
    from meshpost.bench import Bench, BenchOptions
    from meshpost.bench.options import BenchError
    from meshpost.bench.scenarios import pair_latency

    bench = Bench(BenchOptions(scenarios=["pair-latency"], transport="ipc",
                               loop=eventloop.choose(None)), Console(file=io.StringIO()))
    try:
        monkeypatch.setattr(pair_latency, "LATENCY_WARMUP", 10)
        samples, cpu, check = pair_latency._reference(bench, 10, "normal")
        assert len(samples) == 10 and cpu["A"] > 0 and cpu["B"] > 0
        assert check.startswith("reference 20 sent")
        # The same with one of the sender's statements doing nothing (binding its values).
        skipped = "SELECT " + ", ".join("?" * getattr(pair_latency, statement).count("?"))
        monkeypatch.setattr(pair_latency, statement, skipped)
        with pytest.raises(BenchError, match=says):
            pair_latency._reference(bench, 10, "normal")
    finally:
        bench.stop_processes()
        bench.cleanup()


def test_bench_mesh_hosts_nodes_per_process_sends_to_k_peers_and_measures_the_idle_mesh(
    short_tmp: Path,
) -> None:
    out = short_tmp / "results"
    result_file = out / "run.json"
    proc = subprocess.run(
        [sys.executable, "-m", "meshpost", "bench", "mesh", "--nodes", "12",
         "--per-process", "5", "--fanout", "2", "--mesh-messages", "40", "--idle-seconds", "1",
         "--transport", "ipc", "--out", str(out), "--json", str(result_file)],
        capture_output=True, text=True, timeout=110,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    mesh = json.loads(result_file.read_text(encoding="utf-8"))["scenarios"]["mesh"]
    assert mesh["status"] == "ok", mesh
    assert "sent=480 delivered=480 pending=0" in mesh["verify"]
    assert "received=480 lost=0 duplicated=0 phantom=0 mismatched=0" in mesh["verify"]
    f = mesh["figures"]
    # 12 nodes, 5 to a process: 3 processes; k peers each, at the node's default timers.
    assert (f["nodes"], f["per_process"], f["processes"], f["fanout"]) == (12, 5, 3, 2)
    assert "ping_interval_s" not in f and f["messages"] == 480
    assert f["cpu_us_per_msg"] > 0 and f["rss_mb_per_node"] > 0
    assert f["idle_s"] == 1 and f["idle_cpu_pct_of_core"] >= 0 and f["idle_after_s"] > 4
    summary = (out / "latest.md").read_text(encoding="utf-8")
    assert "| mesh 12 nodes, 5/process, 2 peers each |" in summary
    assert "MB/node; idle" in summary


def test_bench_work_queue_checks_exactly_once_and_reports_the_raw_ratio(short_tmp: Path) -> None:
    out = short_tmp / "results"
    result_file = out / "run.json"
    proc = subprocess.run(
        [sys.executable, "-m", "meshpost", "bench", "work-queue", "--tasks", "60", "--repeat",
         "1", "--sync", "normal", "--out", str(out), "--json", str(result_file)],
        capture_output=True, text=True, timeout=110,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    scenario = json.loads(result_file.read_text(encoding="utf-8"))["scenarios"]["work-queue"]
    assert scenario["status"] == "ok", scenario
    # The exactly-once check of the four stores ran (and passed), then verify_stores.
    assert scenario["verify"].startswith("verified: 60 tasks, each stored once at V and at the "
                                         "worker that did it, each result kept once at S")
    assert "lost=0 duplicated=0 phantom=0 mismatched=0" in scenario["verify"]
    f = scenario["figures"]
    assert f["tasks"] == 60 and f["checked"]["results_kept"] == 60
    assert f["checked"]["deliveries"] >= 60 and sum(f["checked"]["kept_by_worker"].values()) == 60
    assert f["tasks_per_s"] > 0 and f["raw_tasks_per_s"] > 0
    assert f["ratio_to_raw"] == pytest.approx(f["tasks_per_s"] / f["raw_tasks_per_s"], rel=0.01)
    cpu = f["cpu_us_per_task"]  # every node process worked for the tasks
    assert all(cpu[name] > 0 for name in ("V", "W1", "W2", "S")) and f["raw_cpu_us_per_task"] > 0
    summary = (out / "latest.md").read_text(encoding="utf-8")
    assert "| work-queue 60 tasks |" in summary and "× raw PUSH/PULL" in summary


@pytest.mark.parametrize(("stage", "messages", "pause_s"),
                         [("raw-echo", 200_000, 2.0), ("meshpost node", 20_000, 0.0)],
                         ids=["helper", "node"])
def test_sigterm_stops_the_bench_processes_and_removes_its_work_folder(
    short_tmp: Path, stage: str, messages: int, pause_s: float,
) -> None:
    """Audit: `timeout 60 meshpost bench pair-latency` left a node process running and its
    /tmp/mpbench-* folder. SIGTERM once a process of `stage` runs (the raw ping-pong's echo
    helper, `pause_s` into its long ping-pong, whose open socket blocked the scenario's
    `ctx.term()` for ever; then the node of the measured pair): every process the bench
    started is gone, and so is its work folder."""
    import re
    import shutil
    import signal
    import time

    import psutil

    bench = subprocess.Popen(
        [sys.executable, "-m", "meshpost", "bench", "pair-latency", "--transport", "ipc",
         "--latency-messages", str(messages), "--out", str(short_tmp / "results")],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    started: dict[int, str] = {}
    try:
        deadline = time.monotonic() + 180
        while not any(stage in line for line in started.values()):
            assert bench.poll() is None, f"the bench ended before a {stage} process ran"
            assert time.monotonic() < deadline, f"no {stage} process within 180 s"
            with contextlib.suppress(psutil.Error):
                for proc in psutil.Process(bench.pid).children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        started.setdefault(proc.pid, " ".join(proc.cmdline()))
            time.sleep(0.05)
        roots = {m.group(0) for line in started.values()
                 for m in re.finditer(r"/tmp/mpbench-[A-Za-z0-9_]+", line)}
        assert len(roots) == 1, started
        time.sleep(pause_s)  # not a threshold: any moment of the stage must end cleanly
        bench.send_signal(signal.SIGTERM)
        _, err = bench.communicate(timeout=90)
        assert bench.returncode == 128 + signal.SIGTERM, err
        assert "Traceback" not in err
        left = time.monotonic() + 20
        while any(psutil.pid_exists(pid) for pid in started) and time.monotonic() < left:
            time.sleep(0.05)
        assert not [(pid, started[pid]) for pid in started if psutil.pid_exists(pid)]
        assert not Path(roots.pop()).exists(), "the work folder is removed"
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait(30)
        for pid in started:  # only what this bench started, by pid
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).kill()
        for line in started.values():
            for m in re.finditer(r"/tmp/mpbench-[A-Za-z0-9_]+", line):
                shutil.rmtree(m.group(0), ignore_errors=True)

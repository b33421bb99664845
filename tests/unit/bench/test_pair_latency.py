"""pair-latency's floors of issue 20 items 1 and 2: the reference design's store check, the
ratios of the same run, and the CPU readings they divide (pure parts; the real run is in
tests/integration/test_bench.py)."""

from __future__ import annotations

import threading
import time

import pytest

from meshpost.bench.meters import (
    BENCH_THREAD_PREFIX,
    CpuTimes,
    cpu_us_per,
    own_cpu,
    process_cpu,
    thread_cpu,
)
from meshpost.bench.scenarios.pair_latency import reference_figures, reference_problems

BODY = "x" * 10
SENT = ["id-a", "id-b", "id-c"]


def _outbox(ids: list[str] = SENT) -> list[tuple[object, ...]]:
    return [(mid, seq, BODY, "delivered") for seq, mid in enumerate(ids, 1)]


def _inbox(ids: list[str] = SENT) -> list[tuple[object, ...]]:
    return [(mid, seq, BODY) for seq, mid in enumerate(ids, 1)]


def test_stores_holding_exactly_the_rows_sent_pass() -> None:
    assert reference_problems(SENT, BODY, _outbox(), _inbox()) == []


@pytest.mark.parametrize(("outbox", "inbox", "says"), [
    (_outbox(), _inbox(SENT[:2]), "receiver: 2 rows, 3 sent"),
    (_outbox(), _inbox(SENT[:2]), "receiver: 1 sent ids missing"),
    (_outbox(), [*_inbox(), ("id-c", 3, BODY)], "receiver: 1 ids stored twice"),
    (_outbox(), [*_inbox(SENT[:2]), ("id-z", 3, BODY)], "receiver: 1 ids never sent"),
    (_outbox(), [*_inbox(SENT[:2]), ("id-c", 3, "y")], "receiver: 1 rows with another seq"),
    (_outbox(), [*_inbox(SENT[:2]), ("id-c", 7, BODY)], "receiver: 1 rows with another seq"),
    (_outbox(SENT[:2]), _inbox(), "sender: 2 rows, 3 sent"),
    ([*_outbox(SENT[:2]), ("id-c", 3, BODY, "pending")], _inbox(),
     "sender: 1 rows without their receipt recorded"),
], ids=["receiver-short", "receiver-missing", "receiver-twice", "receiver-phantom",
        "receiver-body", "receiver-seq", "sender-short", "sender-unrecorded"])
def test_each_way_a_reference_store_could_cheat_is_named(
    outbox: list[tuple[object, ...]], inbox: list[tuple[object, ...]], says: str,
) -> None:
    problems = reference_problems(SENT, BODY, outbox, inbox)
    assert any(p.startswith(says) for p in problems), problems


def test_an_id_sent_twice_is_named() -> None:
    ids = ["id-a", "id-a"]
    assert "1 ids sent twice" in reference_problems(ids, BODY, _outbox(ids), _inbox(ids))


def test_the_reference_ratios_divide_the_figures_stored_beside_them() -> None:
    us = {"p50": 200.0, "p90": 300.0, "p99": 600.0, "p99.9": 900.0}
    figures = {
        "raw_pingpong_us": {k: v / 2 for k, v in us.items()},
        "raw_cpu_us_per_round_trip": {"A": 60.0, "B": 90.0, "total": 150.0},
        "meshpost_normal_us": {k: v * 3 for k, v in us.items()},
        "cpu_us_per_send_normal": {"A": 400.0, "B": 200.0, "total": 600.0},
    }
    ref_cpu = {"A": 100.0, "B": 100.0, "total": 200.0}
    out = reference_figures(figures, "normal", us, ref_cpu)
    assert out["reference_normal_us"] == us
    assert out["reference_cpu_us_per_send_normal"] == ref_cpu
    assert out["ratio_reference_normal"] == dict.fromkeys(us, 2.0)
    assert out["over_reference_normal"] == dict.fromkeys(us, 3.0)
    assert out["reference_cpu_over_raw_normal"] == pytest.approx(200 / 150, abs=0.005)
    assert out["cpu_over_raw_normal"] == 4.0
    assert out["cpu_over_reference_normal"] == 3.0


def test_cpu_times_travel_as_text_and_divide_per_operation() -> None:
    cpu = CpuTimes(1.25, 0.5)
    assert CpuTimes.decode(cpu.encode()) == cpu
    assert (cpu - CpuTimes(0.25, 0.25)).total == pytest.approx(1.25)
    per = cpu_us_per(CpuTimes(0.02, 0.01), CpuTimes(0.03, 0.04), 1000)
    assert per == {"A": 30.0, "B": 70.0, "total": 100.0, "A_user": 20.0, "A_sys": 10.0,
                   "B_user": 30.0, "B_sys": 40.0}


def _burner(name: str, burned: threading.Event, stop: threading.Event) -> threading.Thread:
    """A thread that uses 20 ms of CPU, says so, then waits (alive, idle) until `stop`."""

    def run() -> None:
        while time.thread_time() < 0.02:
            pass
        burned.set()
        stop.wait(30)

    return threading.Thread(target=run, name=name, daemon=True)


@pytest.mark.parametrize("name", [f"{BENCH_THREAD_PREFIX}spin", "node-thread"])
def test_own_cpu_leaves_out_the_bench_threads_and_counts_the_others(name: str) -> None:
    burned, stop = threading.Event(), threading.Event()
    thread = _burner(name, burned, stop)
    thread.start()
    try:
        assert burned.wait(30)
        own, process, spent = own_cpu(), process_cpu(), thread_cpu(thread)
        assert spent.total >= 0.02
        # process - own: the thread's CPU if it is the bench's, else only what this thread
        # spent between the two readings (microseconds, far below the thread's 20 ms).
        if name.startswith(BENCH_THREAD_PREFIX):
            assert process.total - own.total >= spent.total - 1e-6  # float rounding
        else:
            assert process.total - own.total < spent.total
    finally:
        stop.set()
        thread.join(30)

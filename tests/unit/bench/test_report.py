"""The bench's report and display: notes as written (they quote commands, never rich markup),
readable progress, results that a partial run does not overwrite."""

from __future__ import annotations

import io

from rich.console import Console

from meshpost.bench import (
    DEFAULT_RESULTS_DIR,
    SCENARIOS,
    Bench,
    BenchOptions,
    ScenarioResult,
    default_out_dir,
    print_table,
    summary_rows,
)


def test_a_note_quoting_an_install_command_is_printed_whole() -> None:
    note = "paho-mqtt is not installed (pip install -e '.[bench]')"
    console = Console(record=True, width=200)
    print_table(console, {"broker-anchors": ScenarioResult("broker-anchors", "skipped",
                                                           note=note)})
    assert note in console.export_text()


def test_a_run_of_chosen_scenarios_keeps_out_of_the_full_runs_results() -> None:
    assert default_out_dir(list(SCENARIOS)) == DEFAULT_RESULTS_DIR
    assert default_out_dir(["pair-latency"]) == DEFAULT_RESULTS_DIR / "pair-latency"
    # Named in the benchmark's own order, whatever the order asked.
    assert default_out_dir(["mesh", "ceiling"]) == DEFAULT_RESULTS_DIR / "ceiling+mesh"


def _bench(console: Console) -> Bench:
    bench = Bench(BenchOptions(scenarios=["ceiling"]), console)
    bench.cleanup()  # only its display is used: its work folder goes at once
    return bench


def test_progress_on_a_narrow_terminal_cuts_the_step_name_not_the_counts() -> None:
    console = Console(record=True, width=80, force_terminal=True, color_system=None)
    bench = _bench(console)
    bench.progress.add_task("ceiling before pair-throughput run 3: raw pyzmq DEALER→ROUTER "
                            "one-way, a step name far longer than the terminal", total=200_000)
    console.print(bench.progress.get_renderable())
    line = console.export_text().strip()
    assert "0/200000" in line and "0:00:00" in line
    assert "…" in line  # the name, cut


def test_no_live_progress_without_a_terminal() -> None:
    assert _bench(Console(file=io.StringIO())).progress.disable


def test_the_loop_ping_pong_rows_name_the_loop_the_nodes_ran_on() -> None:
    """The floor's loop ping-pong runs on the run's loop; its rows say which (results from
    before the field: asyncio, the only loop the floor ran on then)."""
    figures = {"raw_pingpong_us": {"p50": 60.0, "p90": 70.0, "p99": 90.0, "p99.9": 120.0},
               "loop_pingpong_us": {"p50": 80.0, "p90": 90.0, "p99": 110.0, "p99.9": 150.0},
               "ratio_loop": {"p50": 1.3, "p90": 1.3, "p99": 1.2, "p99.9": 1.3},
               "meshpost_normal_us": {"p50": 400.0, "p90": 500.0, "p99": 900.0, "p99.9": 2e3},
               "ratio_normal": {"p50": 6.7, "p90": 7.1, "p99": 10.0, "p99.9": 16.7},
               "floor_normal_us": {"p50": 200.0, "p90": 250.0, "p99": 400.0, "p99.9": 900.0},
               "ratio_floor_normal": {"p50": 3.3, "p90": 3.6, "p99": 4.4, "p99.9": 7.5},
               "over_floor_normal": {"p50": 2.0, "p90": 2.0, "p99": 2.3, "p99.9": 2.2}}
    for loop, says in (("uvloop", "uvloop"), (None, "asyncio")):
        f = {**figures, **({"loop": loop} if loop else {})}
        rows = {name: comparison
                for name, _, comparison in summary_rows({"pair-latency": ScenarioResult(
                    "pair-latency", figures=f)})}
        assert rows["pair-latency loop"].endswith(f"on the nodes' event loop ({says})")
        assert f"loop ping-pong ({says}) + the 2 commits" in rows["pair-latency floor normal"]


def test_the_floor_rows_show_cpu_and_the_reference_design_with_meshpost_against_it() -> None:
    """Issue 20 items 1 and 2 read off the table: CPU a round trip of both ping-pongs, the
    reference design's row, and meshpost's CPU a send against both; results from before
    the figures still render."""
    lat = {"p50": 100.0, "p90": 120.0, "p99": 200.0, "p99.9": 300.0}
    old = {"raw_pingpong_us": lat, "loop_pingpong_us": lat,
           "ratio_loop": dict.fromkeys(lat, 1.0), "meshpost_normal_us": lat,
           "ratio_normal": dict.fromkeys(lat, 1.0),
           "cpu_us_per_send_normal": {"A": 400.0, "B": 262.0, "total": 662.0}}
    new = {**old,
           "raw_cpu_us_per_round_trip": {"A": 84.0, "B": 111.0, "total": 195.0},
           "loop_cpu_us_per_round_trip": {"A": 120.0, "B": 111.0, "total": 231.0},
           "reference_normal_us": lat, "ratio_reference_normal": dict.fromkeys(lat, 1.5),
           "over_reference_normal": dict.fromkeys(lat, 2.0),
           "reference_cpu_us_per_send_normal": {"A": 170.0, "B": 150.0, "total": 320.0},
           "reference_cpu_over_raw_normal": 1.64, "cpu_over_raw_normal": 3.39,
           "cpu_over_reference_normal": 2.07}
    rows = {name: comparison for name, _, comparison in summary_rows(
        {"pair-latency": ScenarioResult("pair-latency", figures=new)})}
    assert rows["pair-latency raw"].endswith("; CPU 195 µs/round trip (A 84, B 111)")
    assert rows["pair-latency loop"].endswith("; CPU 231 µs/round trip (A 120, B 111)")
    assert "CPU 662 µs/send (A 400, B 262) = 3.4× raw's, 2.1× the reference's" in rows[
        "pair-latency normal"]
    assert rows["pair-latency reference normal"] == (
        "1.5× / 1.5× / 1.5× / 1.5× raw: blocking pyzmq + sqlite3 WAL, the same 3 commits, one "
        "at a time; CPU 320 µs/send (A 170, B 150) = 1.6× raw's; meshpost is 2.0× / 2.0× / "
        "2.0× / 2.0× of it")
    rows = {name: comparison for name, _, comparison in summary_rows(
        {"pair-latency": ScenarioResult("pair-latency", figures=old)})}
    assert rows["pair-latency raw"] == "pyzmq ping-pong p50/p90/p99/p99.9"
    assert "pair-latency reference normal" not in rows
    assert "the reference's" not in rows["pair-latency normal"]

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

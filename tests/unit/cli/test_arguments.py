"""Bad values on the command line are refused by the parser (exit 2, naming the option and
what it takes) before any node is asked: no traceback, no internal error, no odd state."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from meshpost.cli import build_parser


@pytest.mark.parametrize("lease", ["nan", "inf", "-3", "0", "86401", "1e12", "soon"])
def test_a_task_lease_that_is_no_number_of_seconds_up_to_a_day_is_a_usage_error(
    lease: str, capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["task", "--node", "A", "--queue", "q", "--sink", "S",
                                   "--lease", lease, "hola"])
    assert exited.value.code == 2
    assert "argument --lease" in capsys.readouterr().err


@pytest.mark.parametrize(("lease", "seconds"), [("0.5", 0.5), ("30", 30.0), ("86400", 86400.0)])
def test_a_task_lease_above_zero_and_at_most_a_day_is_taken(lease: str, seconds: float) -> None:
    args = build_parser().parse_args(["task", "--node", "A", "--queue", "q", "--sink", "S",
                                      "--lease", lease, "hola"])
    assert args.lease == seconds


@pytest.mark.parametrize("argv", [
    ["demo", "--nodes", "1"],  # used to end in a ValueError traceback from random.sample
    ["demo", "--messages", "-1"],
    ["pipeline", "demo", "--tasks", "0"],
    ["cluster", "up", "0"],  # used to start nothing and exit 0
    ["cluster", "up", "-1"],
    ["cluster", "up", "3", "--per-process", "0"],
    ["cluster", "up", "3", "--peers-per-node", "0"],
    ["bench", "--messages", "-5"],  # used to run the benchmark with its default count
    ["bench", "--size", "0"],
    ["bench", "--nodes", "1"],
    ["bench", "--repeat", "0"],
    ["keys", "generate", "--node", "bad name"],  # used to write an unusable key line
    ["keys", "show", "--node", "ñ"],
    ["group", "join", "bad name!", "--node", "A"],  # used to be called an invalid node name
    ["queue", "status", "x y", "--node", "A"],  # used to report on a queue nobody can have
    ["node", "D", "--bind", "ipc:///tmp/d.sock", "--mesh", "bad name"],  # "node name"
])
def test_counts_and_names_out_of_range_are_usage_errors_naming_the_option(
    argv: list[str], capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "error: argument" in err
    assert "too few" in err or "name" in err


def test_tail_until_an_empty_text_is_refused_before_waiting_for_ever(tmp_path: Path) -> None:
    from meshpost.cli import main

    assert main(["tail", "--node", "A", "--data", str(tmp_path), "--until", ""]) == 2


@pytest.mark.parametrize("command", ["send", "request"])
def test_sending_to_the_sending_node_itself_says_so(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    from meshpost.cli import main

    assert main([command, "--node", "A", "--data", str(tmp_path), "--to", "A", "hi"]) == 2
    assert "A is the node that sends" in capsys.readouterr().err


def test_an_unknown_bench_scenario_is_a_usage_error_listing_the_scenarios(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["bench", "pair-latency", "nosuch"])
    assert exited.value.code == 2  # it was 1, the code of an internal error
    assert "unknown scenario 'nosuch'; choose from ceiling, pair-throughput" in (
        capsys.readouterr().err)
    assert build_parser().parse_args(["bench", "pair-latency"]).scenarios == ["pair-latency"]


def _all_parsers() -> list[tuple[str, argparse.ArgumentParser]]:
    """Every (sub)command's parser, named as it is typed (`queue status`)."""
    found: list[tuple[str, argparse.ArgumentParser]] = []

    def walk(prefix: str, parser: argparse.ArgumentParser) -> None:
        found.append((prefix, parser))
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    walk(f"{prefix} {name}".strip(), child)

    walk("", build_parser())
    return found


def test_every_option_a_newcomer_types_says_what_it_is_in_help() -> None:
    """`meshpost send --help` showed `--node NODE` and `--data DATA` with no word on them,
    `meshpost node --help` its name, --sync and --max-message-bytes bare: nothing said what
    --data is for or what the defaults are."""
    bare = []
    for command, parser in _all_parsers():
        for action in parser._actions:
            names = action.option_strings or [action.dest]
            asked = {"--node", "--data", "--sync", "--max-message-bytes"} & set(names) or (
                command == "node" and action.dest == "name")
            if asked and not action.help:
                bare.append(f"{command} {names[0]}")
    assert bare == []


@pytest.mark.parametrize("tasks", ["1", "5", "29"])
def test_a_pipeline_demo_too_short_to_kill_a_worker_mid_run_is_a_usage_error(
    tasks: str, capsys: pytest.CaptureFixture[str],
) -> None:
    """`pipeline demo --tasks 5` was taken, finished before W1 could be killed and exited 1
    ("W1 was not killed mid-run ... FAILED"), which says "a bug"."""
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["pipeline", "demo", "--tasks", tasks])
    assert exited.value.code == 2
    assert "argument --tasks" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["demo", "--nodes", "2"], ["cluster", "up", "2"]])
def test_a_meshpost_loop_naming_no_loop_is_a_usage_error_before_any_node_starts(
    command: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`MESHPOST_LOOP=bogus meshpost demo` started its nodes, each failed on the variable, and
    the run exited 8 ("a cluster node did not start")."""
    from meshpost.cli import main

    monkeypatch.setenv("MESHPOST_LOOP", "bogus")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert main(command) == 2
    err = capsys.readouterr().err
    assert "MESHPOST_LOOP must be uvloop or asyncio, not 'bogus'" in err
    assert not (tmp_path / "meshpost" / "cluster").exists()  # nothing was started

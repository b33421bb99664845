"""The scenario registry is the one list of scenarios: the CLI's help, the runner and the
scenario modules all follow it, so none of them can drift from the others."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

import pytest

from meshpost.bench.options import (
    ALIASES,
    REGISTRY,
    SCENARIOS,
    default_out_dir,
    options_from_args,
    resolve,
)
from meshpost.cli import build_parser

SCENARIO_DIR = Path(importlib.import_module("meshpost.bench.scenarios").__file__ or "").parent


def _bench_help(capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["bench", "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_bench_help_lists_every_registered_scenario(capsys: pytest.CaptureFixture[str]) -> None:
    text = _bench_help(capsys)
    listed = [line.split()[0] for line in text.splitlines() if line.startswith("  ")
              and line.split()[0] in SCENARIOS]
    assert listed == list(SCENARIOS)  # all of them, in the order a run performs them
    assert "send-timeline" in listed and "mesh-saturated" in listed
    for alias, name in ALIASES.items():
        assert f"{alias} = {name}" in text


def test_every_registered_scenario_has_a_module_with_run() -> None:
    for scenario in REGISTRY:
        module = importlib.import_module(f"meshpost.bench.scenarios.{scenario.module}")
        assert callable(getattr(module, "run", None)), scenario


def test_every_scenario_module_is_registered() -> None:
    modules = {p.stem for p in SCENARIO_DIR.glob("*.py") if p.stem != "__init__"}
    assert modules == {s.module for s in REGISTRY}


def test_names_are_unique_and_aliases_point_at_registered_scenarios() -> None:
    assert len(set(SCENARIOS)) == len(SCENARIOS)
    assert set(ALIASES.values()) <= set(SCENARIOS)
    assert not set(ALIASES) & set(SCENARIOS)


def _args(*scenarios: str) -> argparse.Namespace:
    return build_parser().parse_args(["bench", *scenarios])


def test_an_alias_runs_its_scenario_under_the_registered_name() -> None:
    options = options_from_args(_args("mesh-latency", "mesh", "ceiling"))
    assert options.scenarios == ["mesh", "ceiling"]
    assert options.out_dir == default_out_dir(["ceiling", "mesh"])


def test_no_scenario_named_means_every_scenario() -> None:
    assert options_from_args(_args()).scenarios == list(SCENARIOS)


def test_an_unknown_scenario_is_refused_with_the_choices() -> None:
    with pytest.raises(SystemExit, match="mesh-saturated"):
        resolve(["mesh-saturate"])


def test_loop_option_and_the_old_uvloop_flag() -> None:
    """`--loop` chooses every node's and helper's loop; `--uvloop` (before uvloop became the
    default it ran only the in-process and driver nodes) still parses, as `--loop uvloop`."""
    assert options_from_args(_args()).loop is None  # the default: `runner.run` resolves it
    assert options_from_args(_args("--loop", "asyncio")).loop == "asyncio"
    assert options_from_args(_args("--uvloop")).loop == "uvloop"
    with pytest.raises(SystemExit):
        _args("--loop", "tokio")

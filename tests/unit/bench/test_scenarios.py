"""Scenarios that cannot run on this machine say why and are skipped, never failed."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from meshpost.bench import Bench, BenchOptions
from meshpost.bench.scenarios import offline_backlog


def test_offline_backlog_without_psutil_is_skipped_naming_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def missing(module: str) -> None:
        raise ImportError(f"No module named {module!r}")

    monkeypatch.setattr(offline_backlog, "optional", missing)
    bench = Bench(BenchOptions(scenarios=["offline-backlog"]), Console(file=io.StringIO()))
    try:
        result = offline_backlog.run(bench)
    finally:
        bench.cleanup()
    assert result.status == "skipped"
    assert "psutil" in result.note and ".[bench]" in result.note

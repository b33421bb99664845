"""Settings for the whole suite."""

from __future__ import annotations

import os
from typing import Any

import pytest
from hypothesis import settings

# Property tests draw the same examples on every run (derived from each test, no saved
# database), so that `make test` passes or fails the same way on every machine: a random
# draw once found a host the endpoint check let through, on one run in eight. To explore
# with fresh random examples: HYPOTHESIS_PROFILE=explore make test.
settings.register_profile("ci", derandomize=True, database=None)
settings.register_profile("explore", max_examples=1000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


#: Where a pytest-xdist worker leaves the fault battery's counts lines for the controller.
FAULT_COUNTS_KEY = "meshpost_fault_counts"
_fault_counts: list[str] = []


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    """Controller side of pytest-xdist: collect each worker's fault battery counts."""
    _fault_counts.extend(getattr(node, "workeroutput", {}).get(FAULT_COUNTS_KEY, []))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    # A run without workers prints its counts from tests/integration/faults/conftest.py.
    if _fault_counts:
        terminalreporter.section("fault battery counts")
        for line in _fault_counts:
            terminalreporter.write_line(line)

"""`meshpost.processes` without a node: why a node stopped (from its log), and which recorded
pid still counts as a meshpost node or host (read from /proc), then stopped."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshpost.processes import failure_reason, is_host_process, is_node_process, stop_pid


def test_failure_reason_prefers_the_cli_line_then_an_error_line_then_the_last_line() -> None:
    log = "INFO start\nERROR store locked\nmeshpost node: data dir in use\nINFO bye\n"
    assert failure_reason(log) == "data dir in use"
    assert failure_reason("INFO start\nx ERROR y\nINFO bye\n") == "x ERROR y"
    assert failure_reason("INFO start\n\nINFO bye\n  \n") == "INFO bye"
    assert failure_reason("") == "it wrote nothing to its log"


@pytest.fixture
def lookalike() -> Iterator[subprocess.Popen[bytes]]:
    """A process whose argv reads like `meshpost node A` (it only sleeps)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                             "meshpost", "node", "A"])
    try:
        # Until the child has exec'd, /proc shows the parent's argv (pytest's): on a loaded
        # machine the checks below ran before that and saw no node.
        cmdline = Path(f"/proc/{proc.pid}/cmdline")
        deadline = time.monotonic() + 30.0
        while b"meshpost\0node\0A" not in cmdline.read_bytes():
            assert time.monotonic() < deadline, "the look-alike process never exec'd"
            time.sleep(0.01)
        yield proc
    finally:
        proc.kill()
        proc.wait(10)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_recorded_pid_counts_only_while_its_argv_names_that_node(
    lookalike: subprocess.Popen[bytes],
) -> None:
    assert is_node_process(lookalike.pid, "A")
    assert not is_node_process(lookalike.pid, "B")
    assert not is_host_process(lookalike.pid)  # a node, not a host
    assert stop_pid(lookalike.pid, timeout_s=10.0) == "stopped"
    assert not is_node_process(lookalike.pid, "A")
    assert stop_pid(lookalike.pid, timeout_s=10.0) == "not running"

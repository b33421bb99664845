"""examples/ runs: the two-node chat in its non-interactive mode."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: Two nodes, six messages; past this the example hangs, which is a failure.
EXAMPLE_TIMEOUT_S = 60


def test_the_chat_example_carries_every_line_both_ways() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "chat.py"), "--demo"],
                          capture_output=True, text=True, timeout=EXAMPLE_TIMEOUT_S,
                          check=False)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert sorted(line for line in lines if " > " in line) == sorted(
        [*(f"A > hello B, this is line {i}" for i in range(3)),
         *(f"B > hello A, and this is answer {i}" for i in range(3))])
    assert lines.count("  ✓ stored by B") == 3
    assert lines.count("  ✓ stored by A") == 3

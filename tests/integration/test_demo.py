"""`meshpost demo` (what `make demo` runs), plain and secured, proves itself and exits 0."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("secure", [False, True], ids=["plain", "curve"])
def test_demo_verifies_every_message_on_both_ends(short_tmp: Path, secure: bool) -> None:
    args = ["demo", "--nodes", "3", "--messages", "6", "--data", str(short_tmp / "demo")]
    done = subprocess.run(
        [sys.executable, "-m", "meshpost", *args, *(["--secure"] if secure else [])],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "OK: 8 messages receipted and stored exactly once on both ends" in done.stdout
    assert "lost=0" in done.stdout
    if secure:
        keys = sorted(p.name for p in (short_tmp / "demo" / "A" / "keys").iterdir())
        assert keys == ["node.key", "node.key_secret"]
        mode = (short_tmp / "demo" / "A" / "keys" / "node.key_secret").stat().st_mode & 0o777
        assert mode == 0o600

"""`meshpost node --secure` that cannot start says what to run, with exit 2 (a configuration
error), before it opens anything to the network: a newcomer following README's secure mode by
hand met `--node NAME` with no folder, and a listed peer without a key ended in exit 1 (which
says "a bug, please report it")."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from meshpost import keys
from meshpost.errors import EXIT_USAGE

pytestmark = pytest.mark.integration

#: A node that fails its checks exits at once; past this it is hanging, which is a failure.
EXIT_WAIT_S = 60


def node(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meshpost", "node", *args, "--headless"],
                          capture_output=True, text=True, timeout=EXIT_WAIT_S, check=False,
                          stdin=subprocess.DEVNULL)


def test_a_secure_node_without_keys_names_the_command_that_makes_them(short_tmp: Path) -> None:
    data = short_tmp / "A"
    done = node("A", "--data", str(data), "--bind", f"ipc://{short_tmp}/a.sock",
                "--peer", f"B=ipc://{short_tmp}/b.sock", "--secure")
    assert done.returncode == EXIT_USAGE, done.stderr
    assert f"`meshpost keys generate --node A --data {data}`" in done.stderr


def test_a_secure_node_missing_a_peers_key_says_which_and_where_with_exit_2(
    short_tmp: Path,
) -> None:
    data = short_tmp / "A"
    keys.generate(data)
    keys.write_authorized(data, {"B": keys.generate(short_tmp / "B")})
    done = node("A", "--data", str(data), "--bind", f"ipc://{short_tmp}/a.sock",
                "--peer", f"B=ipc://{short_tmp}/b.sock", "--peer", f"C=ipc://{short_tmp}/c.sock",
                "--secure")
    assert done.returncode == EXIT_USAGE, done.stderr
    assert "no public key for peer(s) C" in done.stderr
    assert f"authorized_keys in {data}" in done.stderr

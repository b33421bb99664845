"""A headless node whose store fails unexpectedly says so and exits 6 (issue 15 bug 1).

The node runs in a child process whose `Store.apply` starts raising `RuntimeError` (a bug, not
a store condition) once a flag file exists; a `meshpost send` through it must then get an
answer, and the node must log the failure and exit with the storage code instead of hanging.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import wait_until

pytestmark = pytest.mark.integration

#: Upper bound of every wait here; reaching it means the node hangs, which is the bug.
PATIENCE_S = 60
EXIT_STORE = 6

CHILD = """
import sys
from pathlib import Path

from meshpost import cli
from meshpost.store import Store

flag, original = Path(sys.argv[1]), Store.apply


def apply(self, *args, **kwargs):
    if flag.exists():
        raise RuntimeError("injected store bug")
    return original(self, *args, **kwargs)


Store.apply = apply
sys.exit(cli.main(sys.argv[2:]))
"""


def test_a_headless_node_whose_store_breaks_fails_the_send_and_exits_6(short_tmp: Path) -> None:
    script, flag, data = short_tmp / "child.py", short_tmp / "break-now", short_tmp / "A"
    script.write_text(CHILD, encoding="utf-8")
    node = subprocess.Popen(
        [sys.executable, str(script), str(flag), "node", "A", "--headless",
         "--bind", f"ipc://{short_tmp}/A.sock", "--peer", f"B=ipc://{short_tmp}/B.sock",
         "--data", str(data), "--sync", "normal"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_until(lambda: (data / "control.endpoint").exists() or node.poll() is not None,
                   PATIENCE_S, "node A to start")
        assert node.poll() is None, node.communicate()[1]
        flag.touch()
        send = subprocess.run(
            [sys.executable, "-m", "meshpost", "send", "--node", "A", "--data", str(data),
             "--to", "B", "--timeout", "5", "hello"],
            capture_output=True, text=True, timeout=PATIENCE_S, stdin=subprocess.DEVNULL,
            env=dict(os.environ),
        )
        assert send.returncode != 0
        _out, err = node.communicate(timeout=PATIENCE_S)
        assert node.returncode == EXIT_STORE, err
        assert "injected store bug" in err
        assert "stopped accepting messages" in err
    finally:
        if node.poll() is None:
            node.kill()
            node.wait(timeout=PATIENCE_S)

"""Every ```python block of README.md runs, as written, in a fresh interpreter.

A snippet that talks to the text gateway on 127.0.0.1:7070 (the "Plain sockets" client) runs
against a real node started with `--text-listen` on a free port, with a line on its stdin."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from meshpost.cluster import LocalCluster, NodeProcess, free_tcp_ports

ROOT = Path(__file__).resolve().parents[2]
#: A snippet runs two nodes at most; past this it hangs, which is a failure.
SNIPPET_TIMEOUT_S = 60


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)


SNIPPETS = python_blocks((ROOT / "README.md").read_text(encoding="utf-8"))


def test_the_readme_has_python_snippets() -> None:
    assert SNIPPETS


#: The address README's plain-socket client dials: the node's text gateway.
GATEWAY_ADDRESS = '("127.0.0.1", 7070)'


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[f"snippet-{i}" for i in range(len(SNIPPETS))])
def test_a_readme_snippet_runs(snippet: str, tmp_path: Path, short_tmp: Path) -> None:
    if GATEWAY_ADDRESS in snippet:
        _run_gateway_client(snippet, tmp_path, short_tmp)
        return
    script = tmp_path / "snippet.py"
    script.write_text(snippet, encoding="utf-8")
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=SNIPPET_TIMEOUT_S, check=False)
    assert done.returncode == 0, done.stderr
    if "asyncio.run(main())" in snippet and "print(" in snippet:
        assert done.stdout.strip(), "the snippet printed nothing"


def test_python_blocks_are_found_whole() -> None:
    text = "x\n```python\na = 1\nb = 2\n```\n```sh\nls\n```\n```python\nc = 3\n```\n"
    assert python_blocks(text) == ["a = 1\nb = 2\n", "c = 3\n"]


def _run_gateway_client(snippet: str, tmp_path: Path, root: Path) -> None:
    """Node A serves the gateway on a free port; the client sends one line and must be told
    that A stored it."""
    cluster = LocalCluster.create(root, 2, transport="ipc")
    port = free_tcp_ports(1)[0]
    node = NodeProcess("A", cluster.config_path, cluster.data_dir("A"), root / "logs" / "A.log",
                       extra_args=["--text-listen", f"tcp://127.0.0.1:{port}"])
    cluster.nodes["A"] = node
    try:
        node.start()
        node.wait_ready()
        script = tmp_path / "client.py"
        script.write_text(snippet.replace(GATEWAY_ADDRESS, f'("127.0.0.1", {port})'),
                          encoding="utf-8")
        done = subprocess.run([sys.executable, str(script)], input="hello from a socket\n",
                              cwd=tmp_path, capture_output=True, text=True,
                              timeout=SNIPPET_TIMEOUT_S, check=False)
    finally:
        cluster.stop()
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("received "), done.stdout

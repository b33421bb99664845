"""Issue 17 (a newcomer's first hour), the parts that need real nodes: refusals reach both
consoles' event streams."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from meshpost import Node, NodeConfig, PeerConfig
from meshpost.node import PeerChanged, PeerRefused

pytestmark = pytest.mark.integration

WAIT_S = 20.0


def test_a_node_refusing_an_unknown_sender_tells_its_subscribers_whom_and_why(
    short_tmp: Path,
) -> None:
    a_ep, c_ep = f"ipc://{short_tmp}/a.sock", f"ipc://{short_tmp}/c.sock"
    # A knows nobody called C; C believes A is its peer.
    a_cfg = NodeConfig(name="A", bind=(a_ep,), peers=(PeerConfig("B", f"ipc://{short_tmp}/b"),),
                       data_dir=short_tmp / "A")
    c_cfg = NodeConfig(name="C", bind=(c_ep,), peers=(PeerConfig("A", a_ep),),
                       data_dir=short_tmp / "C")

    async def scenario() -> tuple[PeerRefused, PeerChanged, str | None]:
        async with Node(a_cfg) as a:
            a_events = a.subscribe()
            async with Node(c_cfg) as c:
                c_events = c.subscribe()

                async def first(queue: asyncio.Queue, kind: type) -> object:  # type: ignore[type-arg]
                    while True:
                        event = await queue.get()
                        if isinstance(event, kind):
                            return event

                refused = await asyncio.wait_for(first(a_events, PeerRefused), WAIT_S)
                told = await asyncio.wait_for(first(c_events, PeerChanged), WAIT_S)
                refusal = next(p.refusal for p in c.peers() if p.name == "A")
                assert isinstance(refused, PeerRefused)
                assert isinstance(told, PeerChanged)
                return refused, told, refusal

    refused, told, refusal = asyncio.run(asyncio.wait_for(scenario(), WAIT_S * 3))
    assert refused.who == "C"
    assert "'C' is not a peer of 'A'" in refused.detail
    assert told.peer == "A" and not told.connected and told.detail.startswith("refused")
    # What the console of C checks before it says "queued": the link knows it was refused.
    assert refusal is not None and "not a peer" in refusal


def test_ctrl_c_during_demo_says_it_stopped_stops_the_nodes_and_removes_its_temp_folder(
    short_tmp: Path,
) -> None:
    """Issue 17 item 12 (demo part): SIGINT, as Ctrl-C sends it, while messages are sent."""
    import signal

    from meshpost.cluster import is_node_process

    # The demo puts its ipc:// sockets under TMPDIR: a short one keeps their paths within
    # 107 bytes (pytest's tmp_path under a pytest-xdist worker is too long).
    temp = short_tmp / "tmp"
    temp.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshpost", "demo", "--nodes", "2", "--messages", "100000"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "TMPDIR": str(temp), "COLUMNS": "200"},
    )
    assert proc.stdout is not None
    seen: list[str] = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if "sending 100000 messages" in line:
                break
        else:
            pytest.fail(f"the demo never started sending: {''.join(seen)}")
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        proc.stdout.close()
    output = "".join(seen) + rest
    assert proc.returncode == 130, output
    assert "demo stopped (Ctrl-C)" in output and "Traceback" not in output
    assert list(temp.iterdir()) == [], "the demo's temporary folder is removed"
    for name, pid in re.findall(r"node (\w+) pid (\d+)", output):
        assert not is_node_process(int(pid), name), f"node {name} still runs"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meshpost", *args], capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL,
                          env={**os.environ, "COLUMNS": "200"})


def test_version_and_cli_words_for_small_mistakes(tmp_path: Path) -> None:
    """Issue 17 items 7, 10, 16: --version; history -n 0 and of a node that never ran; the
    empty-text error in CLI words."""
    from importlib.metadata import version

    shown = _cli("--version")
    assert shown.returncode == 0 and shown.stdout.strip() == f"meshpost {version('meshpost')}"
    zero = _cli("history", "--node", "A", "--data", str(tmp_path), "-n", "0")
    assert zero.returncode == 2 and "-n wants a whole number" in zero.stderr
    never = _cli("history", "--node", "Q", "--data", str(tmp_path / "Q"))
    assert never.returncode == 4, never.stderr
    assert "no meshpost database" in never.stderr and "has this node ever run" in never.stderr
    empty = _cli("send", "--node", "A", "--data", str(tmp_path), "--to", "B", " ")
    assert empty.returncode == 2
    assert "the message text is empty; give it after the options" in empty.stderr


def test_peers_prints_tables_not_python_dicts(short_tmp: Path) -> None:
    from meshpost.cluster import LocalCluster

    cluster = LocalCluster.create(short_tmp, 2, transport="ipc")
    cluster.start()
    try:
        out = _cli("peers", "--node", "A", "--data", str(cluster.data_dir("A")))
    finally:
        cluster.stop()
    assert out.returncode == 0, out.stderr
    assert "{" not in out.stdout and "}" not in out.stdout
    assert re.search(r"^sent\s+0$", out.stdout, re.M)
    assert "A — peers" in out.stdout


def test_send_does_not_load_prompt_toolkit(tmp_path: Path) -> None:
    """Issue 15's "one of each": the CLI's text comes from meshpost.text, which needs rich
    only; the console's terminal library stays out of one-shot commands."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "meshpost", "send", "--node", "A",
         "--data", str(tmp_path), "--to", "B", "hi"],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 4, done.stderr  # no node runs there: it got as far as that
    assert "meshpost.text" in done.stderr
    assert "prompt_toolkit" not in done.stderr

"""Node processes run on uvloop by default (where installed) and on the standard library's
loop when asked (`--loop asyncio`, `MESHPOST_LOOP=asyncio`); a node says which in its status,
its log and `meshpost peers`; nodes on different loops exchange receipted messages; a
cluster's nodes keep their loop across `cluster restart`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from meshpost.cluster import LocalCluster
from meshpost.control import ControlClient, ErrorReply, SendRequest, StatusRequest
from meshpost.eventloop import LOOP_ENV, uvloop_available
from meshpost.processes import NodeProcess

pytestmark = pytest.mark.integration

CLI_TIMEOUT_S = 90
RECEIPT_TIMEOUT_S = 30.0
#: Where uvloop is installed (the default install on Linux) it is every node's default.
DEFAULT_LOOP = "uvloop" if uvloop_available() else "asyncio"


def meshpost(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshpost", *args], capture_output=True, text=True,
        timeout=CLI_TIMEOUT_S, stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})},
    )


def loop_of(data_dir: Path, name: str) -> str:
    with ControlClient(data_dir, name=name) as client:
        reply = client.request(StatusRequest(), timeout_s=10)
    assert not isinstance(reply, ErrorReply), reply
    return str(reply.status["loop"])


def test_nodes_on_either_loop_exchange_receipted_messages(short_tmp: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(LOOP_ENV, raising=False)  # A: the default
    cluster = LocalCluster.create(short_tmp, 3, transport="ipc")
    asked: dict[str, dict[str, Any]] = {
        "A": {}, "B": {"extra_args": ("--loop", "asyncio")}, "C": {"env": {LOOP_ENV: "asyncio"}}}
    with cluster:
        for name, how in asked.items():
            cluster.nodes[name] = NodeProcess(name, cluster.config_path, cluster.data_dir(name),
                                              short_tmp / "logs" / f"{name}.log",
                                              **how).start()
        for node in cluster.nodes.values():
            node.wait_ready()
        assert {n: loop_of(cluster.data_dir(n), n) for n in cluster.names} == {
            "A": DEFAULT_LOOP, "B": "asyncio", "C": "asyncio"}
        for sender, to in (("A", "B"), ("B", "A"), ("C", "A")):
            with ControlClient(cluster.data_dir(sender), name=sender) as client:
                reply = client.request(SendRequest(to, f"{sender} to {to}", RECEIPT_TIMEOUT_S),
                                       timeout_s=RECEIPT_TIMEOUT_S + 10)
            assert not isinstance(reply, ErrorReply), reply
            assert [r.to for r in reply.sent] == [to]
        peers = meshpost("peers", "--node", "B", "--data", str(cluster.data_dir("B")))
        assert peers.returncode == 0, peers.stderr
        assert f"pid {cluster.nodes['B'].pid}, event loop asyncio" in peers.stdout
    assert f"event loop: {DEFAULT_LOOP}" in (short_tmp / "logs" / "A.log").read_text()
    assert "event loop: asyncio" in (short_tmp / "logs" / "B.log").read_text()


def test_cluster_up_loop_asyncio_holds_across_restart(short_tmp: Path) -> None:
    root = str(short_tmp)
    up = meshpost("cluster", "up", "2", "--transport", "ipc", "--data", root,
                  "--loop", "asyncio")
    try:
        assert up.returncode == 0, up.stderr
        assert [loop_of(short_tmp / n, n) for n in ("A", "B")] == ["asyncio", "asyncio"]
        restart = meshpost("cluster", "restart", "B", "--data", root)
        assert restart.returncode == 0, restart.stderr
        assert loop_of(short_tmp / "B", "B") == "asyncio"
    finally:
        meshpost("cluster", "down", "--data", root)


@pytest.mark.parametrize("how", ["option", "env"])
def test_asking_for_uvloop_where_it_is_missing_is_a_usage_error(short_tmp: Path,
                                                                how: str) -> None:
    """Exit 2 with what to do, before the node touches its data dir."""
    code = ("import sys; sys.modules['uvloop'] = None; from meshpost.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    args = ["node", "A", "--bind", f"ipc://{short_tmp}/A.sock", "--data", str(short_tmp / "A"),
            "--headless"]
    env = {**os.environ, LOOP_ENV: "uvloop"} if how == "env" else dict(os.environ)
    proc = subprocess.run([sys.executable, "-c", code, *args,
                           *(["--loop", "uvloop"] if how == "option" else [])],
                          capture_output=True, text=True, timeout=CLI_TIMEOUT_S,
                          stdin=subprocess.DEVNULL, env=env)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    where = "--loop" if how == "option" else LOOP_ENV
    assert f"{where} asks for uvloop, which is not installed here" in proc.stderr
    assert not (short_tmp / "A").exists()

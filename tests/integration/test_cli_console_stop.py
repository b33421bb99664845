"""`meshpost node` with its console, ended by a signal from elsewhere (`meshpost stop`)."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

import meshpost.console
from meshpost.cli.node import _run_node
from meshpost.config import NodeConfig, PeerConfig

pytestmark = pytest.mark.integration


def test_a_console_node_stopped_by_a_signal_says_why(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`meshpost stop` (SIGTERM) from another terminal ended a console node's session without
    a word: the console just vanished. Now the node says why once it has stopped."""
    console_up = asyncio.Event()

    async def console(_node: object) -> None:
        console_up.set()
        await asyncio.Event().wait()

    monkeypatch.setattr(meshpost.console, "run_console", console)

    async def scenario() -> None:
        node = asyncio.create_task(_run_node(NodeConfig(
            name="A", bind=(f"ipc://{short_tmp}/a.sock",),
            peers=(PeerConfig("B", f"ipc://{short_tmp}/b.sock"),), data_dir=short_tmp / "A"),
            interactive=True))
        await asyncio.wait_for(console_up.wait(), 30)  # the node's signal handlers are set
        os.kill(os.getpid(), signal.SIGTERM)
        await node

    asyncio.run(asyncio.wait_for(scenario(), 60))
    assert "node A stopped on SIGTERM (`meshpost stop`, `kill`)" in capsys.readouterr().out

"""`meshpost attach`: the console drives a headless node process through its control socket."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput

from meshpost.cluster import LocalCluster
from meshpost.control import ControlClient, SendRequest
from meshpost.remote import RemoteNode
from meshpost.store import StoreReader

pytestmark = pytest.mark.integration


def test_attached_console_sends_sees_the_receipt_and_incoming_messages(short_tmp: Path) -> None:
    cluster = LocalCluster.create(short_tmp, 2, transport="ipc")
    lines: list[str] = []

    async def until(text: str) -> None:
        while not any(text in line for line in lines):
            await asyncio.sleep(0.02)

    async def scenario() -> None:
        from meshpost.console import run_console

        with create_pipe_input() as pipe:
            async with RemoteNode(cluster.data_dir("A"), name="A") as remote:
                console = asyncio.create_task(run_console(
                    remote, input=pipe, output=DummyOutput(), printer=lines.append))
                pipe.send_text("@B hi from an attached console\n")
                await asyncio.wait_for(until("delivered to B"), 20)
                with ControlClient(cluster.data_dir("B"), name="B") as client:
                    assert client.request(SendRequest("A", "back at you", 10), timeout_s=20).ok
                await asyncio.wait_for(until("back at you"), 20)
                pipe.send_text("/quit\n")
                await asyncio.wait_for(console, 10)

    try:
        cluster.start()
        asyncio.run(scenario())
    finally:
        cluster.stop()
    with StoreReader.for_data_dir(cluster.data_dir("B")) as reader:
        assert [m.body for m in reader.history(direction="in")] == ["hi from an attached console"]

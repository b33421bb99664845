"""`meshpost attach`: the console drives a headless node process through its control socket."""

from __future__ import annotations

import asyncio
import re
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


def test_attached_console_notices_that_its_node_died(short_tmp: Path) -> None:
    """kill -9 of the node under an attached console: a pending send fails, the console says
    once that the node stopped, and `/peers` no longer draws the last cached table."""
    from meshpost.console import run_console
    from meshpost.errors import NodeStopped

    cluster = LocalCluster.create(short_tmp, 2, transport="ipc")
    lines: list[str] = []

    async def until(text: str) -> None:
        while not any(text in line for line in lines):
            await asyncio.sleep(0.02)

    async def scenario() -> None:
        with create_pipe_input() as pipe:
            async with RemoteNode(cluster.data_dir("A"), name="A") as remote:
                console = asyncio.create_task(run_console(
                    remote, input=pipe, output=DummyOutput(), printer=lines.append,
                    receipt_wait_s=0.2))
                pipe.send_text("@B waits for a receipt\n")
                await asyncio.wait_for(until("queued"), 20)
                cluster.nodes["A"].kill()
                # The next request finds the process gone at once (not after a 10 s timeout).
                with pytest.raises(NodeStopped):
                    await asyncio.wait_for(remote.post("B", "after the crash"), 5)
                await asyncio.wait_for(until("stopped"), 10)
                assert remote.stopped
                pipe.send_text("/peers\n")
                pipe.send_text("@B another\n")
                pipe.send_text("/help\n")
                await asyncio.wait_for(until("/quit"), 10)  # the help text: all done
                pipe.send_text("/quit\n")
                await asyncio.wait_for(console, 10)

    try:
        cluster.start()
        cluster.nodes["B"].stop()  # nothing receipts A's message: it stays pending
        asyncio.run(scenario())
    finally:
        cluster.stop()
    # One line says the node stopped, whatever failed with it (the pending send, the poll);
    # each command typed afterwards is answered with it too, never with the cached table.
    help_at = next(i for i, line in enumerate(lines) if "/quit" in line)
    stopped = [line for line in lines[:help_at] if "stopped" in line]
    assert len(stopped) == 3, lines
    assert all("node 'A' stopped" in line for line in stopped)
    first = lines.index(stopped[0])
    assert lines[first + 1:help_at] == stopped[1:], lines


def test_attach_with_commands_on_a_pipe_runs_them_and_prints_plain_lines(
    short_tmp: Path,
) -> None:
    """`printf '@B hi\\n/peers\\n' | meshpost attach --node A`: prompt_toolkit used to warn
    "Input is not a terminal", echo each line twice behind escape codes, and exit before the
    receipt came. Now each command and its answer are plain lines, the receipt included."""
    import subprocess
    import sys

    cluster = LocalCluster.create(short_tmp, 2, transport="ipc")
    try:
        cluster.start()
        done = subprocess.run(
            [sys.executable, "-m", "meshpost", "attach", "--node", "A", "--data",
             str(cluster.data_dir("A"))],
            input="@B hi from a script\n/peers\n/bogus\n", capture_output=True, text=True,
            timeout=60)
    finally:
        cluster.stop()
    assert done.returncode == 0, done.stderr
    assert "not a terminal" not in done.stderr
    assert "\x1b" not in done.stdout
    lines = done.stdout.splitlines()
    assert "A> @B hi from a script" in lines
    assert "… A → B: hi from a script (pending)" in lines
    assert any(line.startswith("✓ delivered to B at ") for line in lines), lines
    assert "✗ unknown command `/bogus`; type /help for the list" in lines
    with StoreReader.for_data_dir(cluster.data_dir("B")) as reader:
        assert [m.body for m in reader.history(direction="in")] == ["hi from a script"]


def test_stats_in_an_attached_console_are_fetched_fresh(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Audit: `/stats` showed the last status poll's counters (`sent 1` after two sends).
    With the poll held off, only a fresh request can show both sends."""
    import meshpost.remote as remote_module
    from meshpost.console import run_console

    monkeypatch.setattr(remote_module, "STATUS_REFRESH_S", 3600.0)
    cluster = LocalCluster.create(short_tmp, 2, transport="ipc")
    lines: list[str] = []

    async def until(predicate: object) -> None:
        while not predicate():  # type: ignore[operator]
            await asyncio.sleep(0.02)

    async def scenario() -> None:
        with create_pipe_input() as pipe:
            async with RemoteNode(cluster.data_dir("A"), name="A") as remote:
                console = asyncio.create_task(run_console(
                    remote, input=pipe, output=DummyOutput(), printer=lines.append))
                for body in ("one", "two"):
                    pipe.send_text(f"@B {body}\n")
                await asyncio.wait_for(until(
                    lambda: sum("delivered to B" in line for line in lines) == 2), 20)
                pipe.send_text("/stats\n")
                await asyncio.wait_for(until(lambda: any("sent " in line for line in lines)),
                                       20)
                pipe.send_text("/quit\n")
                await asyncio.wait_for(console, 10)

    try:
        cluster.start()
        asyncio.run(scenario())
    finally:
        cluster.stop()
    stats = "\n".join(line for line in lines if "sent " in line)
    assert re.search(r"^sent\s+2$", stats, re.MULTILINE), stats

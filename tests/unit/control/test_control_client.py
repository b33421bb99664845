"""The control client takes only the reply to its own request: a late reply is dropped.

A fake node (a ROUTER in a thread, advertised through `control.endpoint` with this process's
pid) answers the first request only after the client gave up on it, then answers the second.
Before request ids, the second request returned the first one's stale reply.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from meshpost.control import (
    ENDPOINT_FILE,
    AsyncControlClient,
    ControlClient,
    SendReply,
    SendRequest,
    SendResult,
    StatusReply,
    StatusRequest,
    process_alive,
)
from meshpost.control.messages import encoder, request_decoder
from meshpost.errors import ControlTimeout, ControlUnavailable, NodeExited

THREAD_TIMEOUT_S = 20


class LateNode:
    """Holds the reply to the first request until the second one arrives."""

    def __init__(self, data_dir: Path) -> None:
        self.endpoint = f"ipc://{data_dir}/ctl.sock"
        (data_dir / ENDPOINT_FILE).write_text(f"{self.endpoint}\n{os.getpid()}\n")
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(self.endpoint)
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            identity, first = self.socket.recv_multipart()
            identity2, second = self.socket.recv_multipart()
            one, two = request_decoder.decode(first), request_decoder.decode(second)
            stale = SendReply(sent=[SendResult("B", "m-1", 1, 1, True)], id=one.id)
            fresh = StatusReply(status={"name": "the second reply"}, id=two.id)
            self.socket.send_multipart([identity, encoder.encode(stale)])
            self.socket.send_multipart([identity2, encoder.encode(fresh)])
        except BaseException as exc:  # reported by the test
            self.error = exc

    def close(self) -> None:
        self.thread.join(THREAD_TIMEOUT_S)
        self.socket.close(0)
        self.context.term()
        assert self.error is None, self.error


@pytest.fixture
def late_node(tmp_path: Path) -> Iterator[LateNode]:
    node = LateNode(tmp_path)
    node.thread.start()
    try:
        yield node
    finally:
        node.close()


def test_sync_client_drops_the_stale_reply_after_a_timeout(
    late_node: LateNode, tmp_path: Path
) -> None:
    with ControlClient(tmp_path, name="A") as client:
        with pytest.raises(ControlTimeout, match="running but did not answer"):
            client.request(SendRequest("B", "hi", 0.0), timeout_s=0.2)
        reply = client.request(StatusRequest(), timeout_s=THREAD_TIMEOUT_S)
        assert isinstance(reply, StatusReply)
        assert reply.status == {"name": "the second reply"}
        assert client.stale == 1


def test_async_client_drops_the_stale_reply_after_a_timeout(
    late_node: LateNode, tmp_path: Path
) -> None:
    async def scenario() -> StatusReply:
        async with AsyncControlClient(tmp_path, name="A") as client:
            with pytest.raises(ControlTimeout):
                await client.request(SendRequest("B", "hi", 0.0), timeout_s=0.2)
            reply = await client.request(StatusRequest(), timeout_s=THREAD_TIMEOUT_S)
            assert client.stale == 1
            assert isinstance(reply, StatusReply)
            return reply

    reply = asyncio.run(scenario())
    assert reply.status == {"name": "the second reply"}


def test_a_node_whose_process_is_gone_is_not_running(tmp_path: Path) -> None:
    (tmp_path / ENDPOINT_FILE).write_text(f"ipc://{tmp_path}/x.sock\n{2**22 + 12345}\n")
    with pytest.raises(ControlUnavailable, match="is gone"):
        ControlClient(tmp_path, name="A")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_node_that_exited_but_was_not_reaped_counts_as_gone() -> None:
    # A node started by a script that has not waited for it yet is a zombie: `kill 0` still
    # succeeds, and a client used to wait out its whole timeout for a dead node.
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    exited = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        stat = Path(f"/proc/{exited.pid}/stat")
        deadline = time.monotonic() + 30.0
        while b") Z " not in stat.read_bytes():
            assert time.monotonic() < deadline, "the child never exited"
            time.sleep(0.01)
        assert process_alive(running.pid)
        assert not process_alive(exited.pid)
        assert process_alive(os.getpid())
    finally:
        running.kill()
        running.wait(10)
        exited.wait(10)
    assert not process_alive(exited.pid)  # reaped: gone from /proc as well


def test_a_node_that_exits_while_a_request_waits_is_reported_as_stopped_not_as_never_running(
    tmp_path: Path,
) -> None:
    # A node stopped (Ctrl-C, kill) while `meshpost send` waited for a receipt: it may have
    # stored the message first, so "is not running ... start it" (as for a node that never
    # ran) sent users to send it again; the error now says it stopped and where to look.
    node = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.5)"])
    try:
        (tmp_path / ENDPOINT_FILE).write_text(f"ipc://{tmp_path}/x.sock\n{node.pid}\n")
        with ControlClient(tmp_path, name="A") as client, \
                pytest.raises(NodeExited) as stopped:
            client.request(SendRequest("B", "hi", 0.0), timeout_s=THREAD_TIMEOUT_S)
    finally:
        node.kill()
        node.wait(10)
    assert stopped.value.exit_code == 4
    assert f"stopped (process {node.pid} exited) before it answered" in str(stopped.value)
    assert "meshpost history --node A" in str(stopped.value)

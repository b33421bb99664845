"""The ROUTER's drain: it reads at once when woken (no ZMQ_EVENTS look first), so a wake-up
with nothing waiting must end quietly, and frames that come later must still be read; a
reply sent from the drain makes it look again; a message of more than two parts is dropped
whole (its payload's `more` comes from the `zmq.Frame`, not from asking the socket)."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Callable
from pathlib import Path

import zmq

from meshpost.transport.zmq_transport import ZmqTransport

PATIENCE_S = 10.0


async def _until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(PATIENCE_S):
        while not condition():
            await asyncio.sleep(0.005)


def test_an_empty_wake_up_reads_nothing_and_later_frames_still_arrive() -> None:
    async def scenario(folder: Path) -> None:
        transport = ZmqTransport(name="R", max_frame_bytes=1 << 16)
        ctx = zmq.Context()
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        try:
            [endpoint] = transport.bind([f"ipc://{folder}/r.sock"])
            got: list[bytes] = []
            drained: list[int] = []

            def on_inbound(identity: bytes, payload: bytes, _user: str | None) -> None:
                got.append(payload)
                transport.reply(identity, b"re:" + payload)

            transport.start(on_inbound, lambda _peer, _data: None,
                            lambda: drained.append(len(got)))
            await asyncio.sleep(0.05)  # the start's own drain: nothing waits yet
            assert (got, drained) == ([], [])
            # A wake-up with nothing waiting (here: resuming reads schedules a drain): its
            # read finds nothing, no handler and no `on_drained` run.
            transport.pause_inbound()
            transport.resume_inbound()
            await asyncio.sleep(0.05)
            assert (got, drained) == ([], [])
            dealer.connect(endpoint)

            async def exchange(payload: bytes) -> None:
                """One frame in, read, `on_drained` told, and its reply out."""
                dealer.send(payload)
                await _until(lambda: len(got) == len(drained) and got[-1:] == [payload])
                assert dealer.poll(int(PATIENCE_S * 1000))
                assert dealer.recv() == b"re:" + payload

            for payload in (b"one", b"two", b"three"):
                await exchange(payload)
            # More than two parts: dropped whole, counted; the next message still arrives.
            dealer.send_multipart([b"a", b"b", b"c"])
            dealer.send(b"four")
            await _until(lambda: got[-1:] == [b"four"])
            assert got == [b"one", b"two", b"three", b"four"]
            assert transport.multipart_dropped == 1
        finally:
            dealer.close(0)
            ctx.term()
            transport.close()

    with tempfile.TemporaryDirectory(prefix="mp-drain-", dir="/tmp") as folder:
        asyncio.run(asyncio.wait_for(scenario(Path(folder)), PATIENCE_S * 2))

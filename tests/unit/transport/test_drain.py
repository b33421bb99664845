"""The drains. The ROUTER's: it reads at once when woken (no ZMQ_EVENTS look first), so a wake-up
with nothing waiting must end quietly, and frames that come later must still be read; a
reply sent from the drain makes it look again; a message of more than two parts is dropped
whole (its payload's `more` comes from the `zmq.Frame`, not from asking the socket). A
DEALER's: a handler that drops its peer ends the drain without touching the closed socket."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import zmq
import zmq.asyncio

from meshpost.transport.zmq_transport import DRAIN_BYTES_BUDGET, ZmqTransport

PATIENCE_S = 10.0


async def _until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(PATIENCE_S):
        while not condition():
            await asyncio.sleep(0.005)


@contextlib.contextmanager
def _router_and_dealer(folder: Path) -> Iterator[tuple[ZmqTransport, zmq.Socket[bytes], str]]:
    """A transport "R" bound in `folder`, a plain DEALER not yet connected, and the endpoint;
    all closed after."""
    transport = ZmqTransport(name="R", max_frame_bytes=1 << 16)
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    try:
        [endpoint] = transport.bind([f"ipc://{folder}/r.sock"])
        yield transport, dealer, endpoint
    finally:
        dealer.close(0)
        ctx.term()
        transport.close()


def test_an_empty_wake_up_reads_nothing_and_later_frames_still_arrive() -> None:
    async def scenario(folder: Path) -> None:
        with _router_and_dealer(folder) as (transport, dealer, endpoint):
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

    with tempfile.TemporaryDirectory(prefix="mp-drain-", dir="/tmp") as folder:
        asyncio.run(asyncio.wait_for(scenario(Path(folder)), PATIENCE_S * 2))


def test_a_handler_that_drops_its_peer_ends_the_drain_quietly(
        caplog: pytest.LogCaptureFixture) -> None:
    """A peer's frame handler may drop that peer (an idle link closing): the socket being
    drained is closed under the drain, which must then stop without reading or asking it
    again (ZMQ_EVENTS is read straight from libzmq, which a closed socket's freed memory
    would crash; pyzmq's own check logged "receiving failed" here before). The peer added
    again is read as before."""
    async def scenario(folder: Path) -> None:
        transport = ZmqTransport(name="A", max_frame_bytes=1 << 16)
        ctx = zmq.Context()
        router = ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        endpoint = f"ipc://{folder}/b.sock"
        router.bind(endpoint)
        try:
            got: list[bytes] = []

            def on_peer_frame(peer: str, data: bytes) -> None:
                got.append(data)
                if data.startswith(b"drop"):
                    transport.drop_peer(peer)

            transport.add_peer("B", endpoint)
            transport.start(lambda _i, _p, _u: None, on_peer_frame)
            assert transport.send_to_peer("B", b"hello")
            assert router.poll(int(PATIENCE_S * 1000))
            identity, hello = router.recv_multipart()
            assert hello == b"hello"
            # Both frames wait before A's drain runs: the first one's handler drops B.
            router.send_multipart([identity, b"drop-1"])
            router.send_multipart([identity, b"drop-2"])
            await _until(lambda: got != [])
            await asyncio.sleep(0.1)  # a further read, had there been one
            assert got == [b"drop-1"]
            # Added again: a new connection, read as before.
            transport.add_peer("B", endpoint)
            assert transport.send_to_peer("B", b"again")
            assert router.poll(int(PATIENCE_S * 1000))
            identity, again = router.recv_multipart()
            assert again == b"again"
            router.send_multipart([identity, b"back"])
            await _until(lambda: got[-1:] == [b"back"])
        finally:
            router.close(0)
            ctx.term()
            transport.close()

    with (caplog.at_level(logging.WARNING, logger="meshpost.transport.zmq_transport"),
          tempfile.TemporaryDirectory(prefix="mp-drain-", dir="/tmp") as folder):
        asyncio.run(asyncio.wait_for(scenario(Path(folder)), PATIENCE_S * 2))
    assert [r.getMessage() for r in caplog.records] == []


def test_the_routers_first_frame_is_drained_before_the_next_is_read() -> None:
    """`on_drained` (the node's commit, whose receipt goes back on the ROUTER) runs after a
    drain's first frame, before the socket is looked at for more: a frame that waits by
    then is read after it, and shares the next `on_drained` with those after it. The reply
    sent from there does not cost the later frames their wake-up."""
    async def scenario(folder: Path) -> None:
        with _router_and_dealer(folder) as (transport, dealer, endpoint):
            seen: list[bytes] = []
            last: list[bytes] = []

            def on_inbound(identity: bytes, payload: bytes, _user: str | None) -> None:
                seen.append(payload)
                last[:] = [identity]
                if payload == b"one":
                    # The next frame waits on the ROUTER before this drain looks again.
                    dealer.send(b"two")
                    assert transport._router.poll(int(PATIENCE_S * 1000))

            def on_drained() -> None:
                seen.append(b"drained")
                transport.reply(last[0], b"re:" + seen[-2])

            transport.start(on_inbound, lambda _peer, _data: None, on_drained)
            dealer.connect(endpoint)
            dealer.send(b"one")
            await _until(lambda: seen[-1:] == [b"drained"] and b"two" in seen)
            assert seen == [b"one", b"drained", b"two", b"drained"]
            for answer in (b"re:one", b"re:two"):
                assert dealer.poll(int(PATIENCE_S * 1000))
                assert dealer.recv() == answer
            dealer.send(b"three")  # the replies took no wake-up from it
            await _until(lambda: seen[-1:] == [b"drained"] and b"three" in seen)

    with tempfile.TemporaryDirectory(prefix="mp-drain-", dir="/tmp") as folder:
        asyncio.run(asyncio.wait_for(scenario(Path(folder)), PATIENCE_S * 2))


def test_a_drain_of_large_frames_gives_the_other_callbacks_their_turn() -> None:
    """The ROUTER's drain stops once DRAIN_BYTES_BUDGET of payload is handled, not only
    after DRAIN_BUDGET frames: 64 frames of a node's largest size (3 MiB) held the event loop
    for 192 MiB of copying and decoding between two turns of every other socket and timer,
    which in a host process are the other nodes' (test_hostile_hosted.py, flood). Over
    inproc, every frame waits in the pipe before the transport starts."""
    async def scenario() -> None:
        ctx = zmq.asyncio.Context()
        transport = ZmqTransport(name="R", max_frame_bytes=4 << 20, context=ctx)
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        try:
            transport.bind(["inproc://mp-drain-large"])
            dealer.connect("inproc://mp-drain-large")
            frame = b"\xff" * DRAIN_BYTES_BUDGET
            frames = 10
            for _ in range(frames):
                dealer.send(frame, copy=False)
            got: list[int] = []
            between: list[int] = []  # frames handled before each other callback ran

            def other_callback() -> None:
                between.append(len(got))
                if len(got) < frames:
                    asyncio.get_running_loop().call_soon(other_callback)

            transport.start(lambda _i, payload, _u: got.append(len(payload)),
                            lambda _peer, _data: None)
            asyncio.get_running_loop().call_soon(other_callback)
            await _until(lambda: len(got) == frames and between[-1:] == [frames])
            assert got == [DRAIN_BYTES_BUDGET] * frames
            # One frame of this size per drain; a loop turn runs at most two (the one it
            # scheduled and the descriptor's), and every other callback between two turns.
            steps = [b - a for a, b in zip([0, *between], between, strict=False)]
            assert max(steps) <= 2, between
        finally:
            dealer.close(0)
            transport.close()
            ctx.term()

    asyncio.run(asyncio.wait_for(scenario(), PATIENCE_S * 2))

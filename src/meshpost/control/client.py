"""The client side of the control endpoint: one implementation of framing and request ids, used
synchronously by the CLI (`ControlClient`) and from asyncio by the attached console
(`AsyncControlClient`).

Rule: a client accepts only the reply whose id is its request's; a reply that comes after its
request timed out (or for an id it never sent) is dropped, never handed to the next request.
While a request waits, the node's process is watched: a node that died fails it at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import overload

import msgspec
import zmq
import zmq.asyncio

from meshpost.control.messages import (
    ENDPOINT_FILE,
    AnswerReply,
    BroadcastReply,
    BroadcastRequest,
    BroadcastStatusRequest,
    ErrorReply,
    EventsReply,
    EventsRequest,
    GroupHistoryReply,
    GroupHistoryRequest,
    GroupReply,
    GroupRequest,
    KeysReloadedReply,
    PeerRequest,
    PeersReply,
    PeersRequest,
    ProbeReply,
    ProbeRequest,
    QueueStatusReply,
    QueueStatusRequest,
    ReloadKeysRequest,
    Reply,
    Request,
    SendReply,
    SendRequest,
    StatusReply,
    StatusRequest,
    SubmitReply,
    SubmitRequest,
    TailReply,
    TailRequest,
    encoder,
    reply_decoder,
)
from meshpost.errors import ControlTimeout, ControlUnavailable, NodeExited

log = logging.getLogger(__name__)

#: How often a waiting client checks that the node's process still exists.
LIVENESS_CHECK_S = 0.2
#: Requests a stream keeps in flight by default (`meshpost send --lines`).
STREAM_WINDOW = 1024


def process_alive(pid: int) -> bool:
    """True while process `pid` runs. A zombie (exited, not yet reaped by its parent, say a
    node started by a script or a test that has not waited for it) still answers `kill 0`:
    read its state from /proc, so a client stops waiting as soon as the node has exited."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except FileNotFoundError:
        return not Path("/proc/self").is_dir()  # gone since `kill 0`; or no /proc to ask
    except OSError:
        return True
    # The state follows the command name, which is in parentheses and may hold spaces.
    after_name = stat.rfind(b")")
    return stat[after_name + 2:after_name + 3] != b"Z"


class _Framing:
    """What both clients share: where the node is, request ids, encoding, reply matching."""

    def __init__(self, data_dir: Path, name: str) -> None:
        self.name = name
        file = data_dir / ENDPOINT_FILE
        try:
            endpoint, pid = file.read_text(encoding="utf-8").split()[:2]
            self.pid = int(pid)
        except (OSError, ValueError):
            raise ControlUnavailable(name, str(file)) from None
        if not process_alive(self.pid):
            # The node died without cleaning up (kill -9): do not wait for an answer.
            raise ControlUnavailable(name, f"{file} (process {pid} is gone)")
        self.endpoint = endpoint
        self._ids = itertools.count(1)
        #: Replies dropped because no request of ours waited for them (late or unknown id).
        self.stale = 0

    def encode(self, request: Request) -> tuple[int, bytes]:
        request_id = next(self._ids)
        return request_id, encoder.encode(msgspec.structs.replace(request, id=request_id))

    def decode(self, data: bytes, waiting: Iterable[int] | dict[int, object]) -> Reply | None:
        """The reply in `data` if its id is one we wait for; None (counted) otherwise."""
        try:
            reply = reply_decoder.decode(data)
        except msgspec.DecodeError as exc:
            log.warning("undecodable control reply from %s dropped: %s", self.name, exc)
            self.stale += 1
            return None
        if reply.id not in waiting:
            log.debug("stale control reply %d from %s dropped", reply.id, self.name)
            self.stale += 1
            return None
        return reply

    def gone(self) -> NodeExited:
        """The node exited while a request of ours waited: it may have acted on it."""
        return NodeExited(self.name, self.pid)

    def no_answer(self, timeout_s: float) -> ControlUnavailable:
        if not process_alive(self.pid):
            return self.gone()
        return ControlTimeout(self.name, timeout_s)


class ControlClient:
    """Synchronous client for a node's control endpoint (the CLI, cluster, tests)."""

    def __init__(self, data_dir: Path, *, name: str) -> None:
        self._framing = _Framing(data_dir, name)
        self.name = name
        self.endpoint = self._framing.endpoint
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.connect(self.endpoint)

    @property
    def stale(self) -> int:
        """Replies dropped because they answered no request in flight."""
        return self._framing.stale

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._socket.close(0)
        self._context.term()

    @overload
    def request(self, request: SendRequest, *, timeout_s: float) -> SendReply | ErrorReply: ...
    @overload
    def request(self, request: PeersRequest, *, timeout_s: float) -> PeersReply | ErrorReply: ...
    @overload
    def request(self, request: StatusRequest, *,
                timeout_s: float) -> StatusReply | ErrorReply: ...
    @overload
    def request(self, request: EventsRequest, *,
                timeout_s: float) -> EventsReply | ErrorReply: ...
    @overload
    def request(self, request: PeerRequest, *,
                timeout_s: float) -> AnswerReply | ErrorReply: ...
    @overload
    def request(self, request: SubmitRequest, *,
                timeout_s: float) -> SubmitReply | ErrorReply: ...
    @overload
    def request(self, request: TailRequest, *, timeout_s: float) -> TailReply | ErrorReply: ...
    @overload
    def request(self, request: BroadcastRequest | BroadcastStatusRequest, *,
                timeout_s: float) -> BroadcastReply | ErrorReply: ...
    @overload
    def request(self, request: GroupRequest, *, timeout_s: float) -> GroupReply | ErrorReply: ...
    @overload
    def request(self, request: QueueStatusRequest, *,
                timeout_s: float) -> QueueStatusReply | ErrorReply: ...
    @overload
    def request(self, request: GroupHistoryRequest, *,
                timeout_s: float) -> GroupHistoryReply | ErrorReply: ...
    @overload
    def request(self, request: ProbeRequest, *, timeout_s: float) -> ProbeReply | ErrorReply: ...
    @overload
    def request(self, request: ReloadKeysRequest, *,
                timeout_s: float) -> KeysReloadedReply | ErrorReply: ...

    def request(self, request: Request, *, timeout_s: float) -> Reply:
        """Send `request`, return its reply (an `ErrorReply` when the node refused it).

        Raises `ControlUnavailable` when the node is not running, `NodeExited` (one of those)
        when it exits while the request waits, `ControlTimeout` when it is alive but silent
        for `timeout_s`.
        """
        for _, reply in self.stream([request], timeout_s=timeout_s, window=1):
            return reply
        raise AssertionError("unreachable: a stream of one request yields one reply")

    def stream(self, requests: Iterable[Request], *, timeout_s: float,
               window: int = STREAM_WINDOW) -> Iterator[tuple[int, Reply]]:
        """Pipeline `requests` (at most `window` in flight); yield `(index, reply)` in the
        order of `requests`. `timeout_s` bounds each request from its sending."""
        pending = iter(requests)
        sent: dict[int, tuple[int, float]] = {}  # request id -> (index, deadline)
        done: dict[int, Reply] = {}  # index -> reply, held until its turn
        index = next_out = 0
        exhausted = False
        framing = self._framing
        while True:
            while not exhausted and len(sent) + len(done) < window:
                request = next(pending, None)
                if request is None:
                    exhausted = True
                    break
                request_id, data = framing.encode(request)
                self._socket.send(data)
                sent[request_id] = (index, time.monotonic() + timeout_s)
                index += 1
            while next_out in done:
                yield next_out, done.pop(next_out)
                next_out += 1
            if not sent:
                if exhausted and not done:
                    return
                continue
            # Deadlines grow in sending order and a dict keeps that order: the first is the
            # soonest (a scan of the whole window per reply cost a fifth of a stream's time).
            oldest = next(iter(sent.values()))[1]
            wait = max(0.0, min(oldest - time.monotonic(), LIVENESS_CHECK_S))
            if self._socket.poll(int(wait * 1000) + 1):
                while self._socket.poll(0):
                    reply = framing.decode(self._socket.recv(), sent)
                    if reply is not None:
                        done[sent.pop(reply.id)[0]] = reply
            elif not process_alive(framing.pid):
                raise framing.gone()
            elif time.monotonic() >= oldest:
                raise framing.no_answer(timeout_s)


class AsyncControlClient:
    """Asyncio client: any number of concurrent requests on one socket, matched by id."""

    def __init__(self, data_dir: Path, *, name: str) -> None:
        self._framing = _Framing(data_dir, name)
        self.name = name
        self.pid = self._framing.pid
        self.endpoint = self._framing.endpoint
        self._context = zmq.asyncio.Context()
        self._socket = self._context.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.connect(self.endpoint)
        self._waiting: dict[int, asyncio.Future[Reply]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._closed: ControlUnavailable | None = None

    @property
    def stale(self) -> int:
        return self._framing.stale

    async def __aenter__(self) -> AsyncControlClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        self._fail_all(self._closed or ControlUnavailable(self.name, "a closed client"))
        self._socket.close(0)
        self._context.term()

    def alive(self) -> bool:
        return self._closed is None and process_alive(self.pid)

    @overload
    async def request(self, request: SendRequest, *,
                      timeout_s: float) -> SendReply | ErrorReply: ...
    @overload
    async def request(self, request: PeersRequest, *,
                      timeout_s: float) -> PeersReply | ErrorReply: ...
    @overload
    async def request(self, request: StatusRequest, *,
                      timeout_s: float) -> StatusReply | ErrorReply: ...
    @overload
    async def request(self, request: EventsRequest, *,
                      timeout_s: float) -> EventsReply | ErrorReply: ...
    @overload
    async def request(self, request: PeerRequest, *,
                      timeout_s: float) -> AnswerReply | ErrorReply: ...
    @overload
    async def request(self, request: SubmitRequest, *,
                      timeout_s: float) -> SubmitReply | ErrorReply: ...
    @overload
    async def request(self, request: TailRequest, *,
                      timeout_s: float) -> TailReply | ErrorReply: ...
    @overload
    async def request(self, request: BroadcastRequest | BroadcastStatusRequest, *,
                      timeout_s: float) -> BroadcastReply | ErrorReply: ...
    @overload
    async def request(self, request: GroupRequest, *,
                      timeout_s: float) -> GroupReply | ErrorReply: ...
    @overload
    async def request(self, request: QueueStatusRequest, *,
                      timeout_s: float) -> QueueStatusReply | ErrorReply: ...
    @overload
    async def request(self, request: GroupHistoryRequest, *,
                      timeout_s: float) -> GroupHistoryReply | ErrorReply: ...
    @overload
    async def request(self, request: ProbeRequest, *,
                      timeout_s: float) -> ProbeReply | ErrorReply: ...
    @overload
    async def request(self, request: ReloadKeysRequest, *,
                      timeout_s: float) -> KeysReloadedReply | ErrorReply: ...

    async def request(self, request: Request, *, timeout_s: float) -> Reply:
        """Send `request` and wait for its reply; errors as `ControlClient.request`."""
        if self._closed is not None:
            raise self._closed
        if self._reader is None:
            self._reader = asyncio.create_task(self._read(), name=f"control-client-{self.name}")
        request_id, data = self._framing.encode(request)
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future
        try:
            await self._socket.send(data)
            async with asyncio.timeout(timeout_s):
                return await future
        except TimeoutError:
            raise self._framing.no_answer(timeout_s) from None
        finally:
            # Its reply, if it still comes, finds no one waiting and is dropped as stale.
            self._waiting.pop(request_id, None)

    async def _read(self) -> None:
        while True:
            if not await self._socket.poll(int(LIVENESS_CHECK_S * 1000)):
                if self._waiting and not process_alive(self.pid):
                    self._closed = self._framing.gone()
                    self._fail_all(self._closed)
                    return
                continue
            reply = self._framing.decode(await self._socket.recv(), self._waiting)
            if reply is not None:
                future = self._waiting.pop(reply.id)
                if not future.done():
                    future.set_result(reply)

    def _fail_all(self, exc: ControlUnavailable) -> None:
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(exc)
        self._waiting.clear()

"""`meshpost attach`: the interactive console for a node that runs elsewhere (headless,
started by `meshpost cluster up`), driven through its local control endpoint.

Rule: `RemoteNode` offers the console the same surface a `Node` does (`ConsoleNode`), built
only from control requests; it holds no protocol or storage state of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from meshpost.clock import SystemClock
from meshpost.config import NodeConfig, PeerConfig
from meshpost.control import (
    ENDPOINT_FILE,
    EventsRequest,
    Reply,
    Request,
    SendRequest,
    StatusRequest,
)
from meshpost.errors import ControlUnavailable, MeshpostError
from meshpost.node import (
    MessageReceived,
    NodeEvent,
    NodeStats,
    Outgoing,
    PeerChanged,
    PeerStatus,
    Receipt,
)
from meshpost.protocol import Envelope
from meshpost.rules import resolve_target, validate_body

#: How often the cached peer table is refreshed, and how long one event long-poll waits.
STATUS_REFRESH_S = 1.0
EVENTS_WAIT_S = 1.0
REQUEST_TIMEOUT_S = 10.0

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Reply)


class _Channel:
    """One DEALER to the control endpoint; one request at a time."""

    def __init__(self, context: zmq.asyncio.Context, endpoint: str, name: str) -> None:
        self._socket = context.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.connect(endpoint)
        self._lock = asyncio.Lock()
        self._name, self._endpoint = name, endpoint

    async def request(self, request: Request, timeout_s: float) -> Reply:
        async with self._lock:
            await self._socket.send(_encoder.encode(request))
            try:
                data = await asyncio.wait_for(self._socket.recv(), timeout_s)
            except TimeoutError:
                raise ControlUnavailable(self._name, self._endpoint) from None
        return _decoder.decode(data)

    def close(self) -> None:
        self._socket.close(0)


class RemoteNode:
    """A running node seen through its control endpoint, shaped like `Node` for the console."""

    def __init__(self, data_dir: Path, *, name: str) -> None:
        file = data_dir / ENDPOINT_FILE
        try:
            endpoint = file.read_text(encoding="utf-8").split()[0]
        except (OSError, IndexError):
            raise ControlUnavailable(name, str(file)) from None
        self.name = name
        self.clock = SystemClock()
        self._data_dir = data_dir
        self._context = zmq.asyncio.Context()
        self._commands = _Channel(self._context, endpoint, name)
        self._events = _Channel(self._context, endpoint, name)
        self._status: dict[str, Any] = {}
        self._peers: list[PeerStatus] = []
        self._handles: dict[tuple[str, int], Outgoing] = {}
        self._queues: list[asyncio.Queue[NodeEvent]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self.config: NodeConfig

    async def __aenter__(self) -> RemoteNode:
        await self._refresh()
        status = self._status
        self.config = NodeConfig(
            name=self.name,
            bind=tuple(status["endpoints"]),
            peers=tuple(PeerConfig(p.name, p.endpoint) for p in self._peers),
            data_dir=Path(status.get("data_dir", self._data_dir)),
            groups={g: tuple(m) for g, m in status.get("groups", {}).items()},
            max_message_bytes=int(status.get("max_message_bytes", 65536)),
        )
        self._tasks = [asyncio.create_task(self._poll_status()),
                       asyncio.create_task(self._poll_events())]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, MeshpostError):
                await task
        self._commands.close()
        self._events.close()
        self._context.term()

    async def _refresh(self) -> None:
        reply = await self._commands.request(StatusRequest(), REQUEST_TIMEOUT_S)
        self._status = reply.status
        self._peers = list(reply.peers)

    async def _poll_status(self) -> None:
        while True:
            await asyncio.sleep(STATUS_REFRESH_S)
            with contextlib.suppress(ControlUnavailable):
                await self._refresh()

    async def _poll_events(self) -> None:
        while True:
            try:
                reply = await self._events.request(EventsRequest(EVENTS_WAIT_S),
                                                   EVENTS_WAIT_S + REQUEST_TIMEOUT_S)
            except ControlUnavailable:
                await asyncio.sleep(STATUS_REFRESH_S)
                continue
            for m in reply.incoming:
                envelope = Envelope(m.id, 0, m.sender, self.name, m.body, m.sent_at_ns, m.hlc)
                self._publish(MessageReceived(envelope, m.stored_at_ns))
            for change in reply.peer_changes:
                self._publish(PeerChanged.from_detail(change.peer, change.connected,
                                                      change.detail))
            for d in reply.deliveries:
                for seq in d.seqs:
                    handle = self._handles.pop((d.peer, seq), None)
                    if handle is not None and not handle.receipt.done():
                        handle.receipt.set_result(Receipt(
                            handle.id, d.peer, seq, handle.sent_at_ns, d.delivered_at_ns,
                            d.delivered_at_ns, self.clock.wall_ns(), "?"))

    def _publish(self, event: NodeEvent) -> None:
        for queue in self._queues:
            if not queue.full():
                queue.put_nowait(event)

    # -- the ConsoleNode surface ------------------------------------------------------------

    async def post(self, target: str, body: str) -> list[Outgoing]:
        reply = await self._commands.request(SendRequest(target, body, 0.0), REQUEST_TIMEOUT_S)
        if not reply.ok:
            raise MeshpostError(reply.error or "the node refused the message")
        loop = asyncio.get_running_loop()
        handles = []
        for r in reply.sent:
            handle = Outgoing(r.id, r.to, r.seq, body, r.sent_at_ns, 0, loop.create_future())
            self._handles[(r.to, r.seq)] = handle
            handles.append(handle)
        return handles

    def resolve(self, target: str) -> list[str]:
        return resolve_target(target, local_name=self.name, peers=self.config.peer_names,
                              groups=self.config.groups)

    def validate_body(self, body: str) -> None:
        validate_body(body, self.config.max_message_bytes)

    def peers(self) -> list[PeerStatus]:
        return list(self._peers)

    def subscribe(self) -> asyncio.Queue[NodeEvent]:
        queue: asyncio.Queue[NodeEvent] = asyncio.Queue(10_000)
        self._queues.append(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[NodeEvent]) -> None:
        with contextlib.suppress(ValueError):
            self._queues.remove(queue)

    def snapshot_stats(self) -> NodeStats:
        stats = self._status.get("stats", {})
        known = NodeStats.__dataclass_fields__
        return NodeStats(**{k: v for k, v in stats.items() if k in known})

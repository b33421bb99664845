"""The local control endpoint: how `meshpost send/peers/status/attach` talk to a running node.

Rule: a node's control socket is an `ipc://` socket reachable only from this machine; its
address is written to `control.endpoint` in the node's data dir, so a client needs only the
data dir. Requests and replies are msgspec structs over a ROUTER (node) / DEALER (client) pair.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from meshpost.errors import ControlUnavailable, MeshpostError, ReceiptTimeout
from meshpost.node import (
    DeliveryRecorded,
    MessageReceived,
    Node,
    PeerChanged,
    PeerStatus,
    describe_error,
    wait_receipt,
)

log = logging.getLogger(__name__)

ENDPOINT_FILE = "control.endpoint"
#: A subscriber that has not polled for this long is dropped (its client went away).
SUBSCRIBER_IDLE_S = 30.0
_IPC_PATH_MAX = 100


class SendRequest(msgspec.Struct, tag="send", frozen=True):
    target: str
    body: str
    timeout_s: float


class PeersRequest(msgspec.Struct, tag="peers", frozen=True):
    pass


class StatusRequest(msgspec.Struct, tag="status", frozen=True):
    pass


class EventsRequest(msgspec.Struct, tag="events", frozen=True):
    """Long-poll: return events since the last call (waits up to `wait_s` for the first)."""

    wait_s: float


Request = SendRequest | PeersRequest | StatusRequest | EventsRequest


class SendResult(msgspec.Struct, frozen=True):
    to: str
    id: str
    seq: int
    sent_at_ns: int
    delivered: bool
    delivered_at_ns: int | None = None
    received_at_ns: int | None = None
    sync: str | None = None
    error: str | None = None


class IncomingInfo(msgspec.Struct, frozen=True):
    id: str
    sender: str
    body: str
    sent_at_ns: int
    hlc: int
    stored_at_ns: int


class PeerChangeInfo(msgspec.Struct, frozen=True):
    peer: str
    connected: bool
    detail: str


class DeliveryInfo(msgspec.Struct, frozen=True):
    peer: str
    seqs: list[int]
    delivered_at_ns: int


class Reply(msgspec.Struct, frozen=True):
    ok: bool
    error: str | None = None
    error_kind: str | None = None
    sent: list[SendResult] = []
    peers: list[PeerStatus] = []
    status: dict[str, Any] = {}
    incoming: list[IncomingInfo] = []
    peer_changes: list[PeerChangeInfo] = []
    deliveries: list[DeliveryInfo] = []


_encoder = msgspec.msgpack.Encoder()
_request_decoder = msgspec.msgpack.Decoder(Request)
_reply_decoder = msgspec.msgpack.Decoder(Reply)


def control_endpoint_for(data_dir: Path) -> str:
    """The ipc endpoint for a data dir: inside it when the path is short enough."""
    path = (data_dir / "control.sock").resolve()
    if len(str(path)) <= _IPC_PATH_MAX:
        return f"ipc://{path}"
    # Unix socket paths are limited to ~107 bytes: fall back to a hashed name in /tmp.
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:16]
    return f"ipc://{tempfile.gettempdir()}/meshpost-{digest}.sock"


def peer_info(node: Node) -> list[PeerStatus]:
    return node.peers()


class ControlServer:
    """Serves control requests for one node until cancelled."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.endpoint = control_endpoint_for(node.config.data_dir)
        self._context = zmq.asyncio.Context()
        self._socket = self._context.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 100)
        self._tasks: set[asyncio.Task[None]] = set()
        self._subscriptions: dict[bytes, asyncio.Queue[Any]] = {}
        self._file = node.config.data_dir / ENDPOINT_FILE

    async def __aenter__(self) -> ControlServer:
        path = self.endpoint[len("ipc://") :]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a stale socket from a killed node; the data dir lock is ours
        self._socket.bind(self.endpoint)
        self._file.write_text(f"{self.endpoint}\n{os.getpid()}\n", encoding="utf-8")
        self._serve_task = asyncio.create_task(self._serve(), name="control")
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._serve_task.cancel()
        for task in [self._serve_task, *self._tasks]:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for queue in self._subscriptions.values():
            self.node.unsubscribe(queue)
        with contextlib.suppress(OSError):
            self._file.unlink()
        self._socket.close(0)
        self._context.term()
        with contextlib.suppress(OSError):
            os.unlink(self.endpoint[len("ipc://") :])

    async def _serve(self) -> None:
        while True:
            parts = await self._socket.recv_multipart()
            if len(parts) != 2:
                continue
            identity, data = parts
            task = asyncio.create_task(self._handle(identity, data))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _handle(self, identity: bytes, data: bytes) -> None:
        try:
            request = _request_decoder.decode(data)
            reply = await self._dispatch(identity, request)
        except msgspec.DecodeError as exc:
            reply = Reply(ok=False, error=f"bad control request: {exc}", error_kind="usage")
        except MeshpostError as exc:
            reply = Reply(ok=False, error=str(exc), error_kind=type(exc).__name__)
        except Exception as exc:  # a bug: report it to the client, keep serving
            log.exception("[%s] control request failed", self.node.name)
            reply = Reply(ok=False, error=describe_error(exc), error_kind="internal")
        with contextlib.suppress(zmq.ZMQError):
            await self._socket.send_multipart([identity, _encoder.encode(reply)])

    async def _dispatch(self, identity: bytes, request: Request) -> Reply:
        node = self.node
        match request:
            case SendRequest(target=target, body=body, timeout_s=timeout_s):
                handles = await node.post(target, body)
                results = await asyncio.gather(
                    *(self._await_receipt(h, timeout_s) for h in handles)
                )
                return Reply(ok=True, sent=list(results))
            case PeersRequest():
                return Reply(ok=True, peers=peer_info(node))
            case StatusRequest():
                stats = dataclasses.asdict(node.snapshot_stats())
                return Reply(
                    ok=True,
                    status={
                        "name": node.name,
                        "node_id": node.node_id,
                        "endpoints": node.endpoints,
                        "pid": os.getpid(),
                        # All threads, nanosecond resolution: psutil's ticks are 10 ms, too
                        # coarse for a short benchmark phase.
                        "cpu_s": time.process_time(),
                        "pending": await node.pending_count(),
                        "stats": stats,
                        "groups": {g: list(m) for g, m in node.config.groups.items()},
                        "max_message_bytes": node.config.max_message_bytes,
                        "data_dir": str(node.config.data_dir),
                    },
                    peers=peer_info(node),
                )
            case EventsRequest(wait_s=wait_s):
                return await self._events(identity, wait_s)

    async def _await_receipt(self, handle: Any, timeout_s: float) -> SendResult:
        base = {"to": handle.to, "id": handle.id, "seq": handle.seq,
                "sent_at_ns": handle.sent_at_ns}
        try:
            receipt = await wait_receipt(handle, timeout_s)
        except ReceiptTimeout:
            return SendResult(delivered=False, **base)
        except MeshpostError as exc:
            return SendResult(delivered=False, error=str(exc), **base)
        return SendResult(
            delivered=True,
            delivered_at_ns=receipt.delivered_at_ns,
            received_at_ns=receipt.received_at_ns,
            sync=receipt.sync,
            **base,
        )

    async def _events(self, identity: bytes, wait_s: float) -> Reply:
        queue = self._subscriptions.get(identity)
        if queue is None:
            queue = self.node.subscribe()
            self._subscriptions[identity] = queue
        incoming: list[IncomingInfo] = []
        changes: list[PeerChangeInfo] = []
        deliveries: list[DeliveryInfo] = []
        with contextlib.suppress(TimeoutError):
            first = await asyncio.wait_for(queue.get(), wait_s)
            events = [first]
            while not queue.empty() and len(events) < 1000:
                events.append(queue.get_nowait())
            for event in events:
                match event:
                    case MessageReceived(message=m, stored_at_ns=stored_at):
                        incoming.append(IncomingInfo(m.id, m.sender, m.body, m.sent_at_ns, m.hlc,
                                                     stored_at))
                    case PeerChanged(peer=peer, connected=connected, detail=detail):
                        changes.append(PeerChangeInfo(peer, connected, detail))
                    case DeliveryRecorded(peer=peer, seqs=seqs, delivered_at_ns=at):
                        deliveries.append(DeliveryInfo(peer, seqs, at))
        return Reply(ok=True, incoming=incoming, peer_changes=changes, deliveries=deliveries)


class ControlClient:
    """Synchronous client for a node's control endpoint (used by the CLI)."""

    def __init__(self, data_dir: Path, *, name: str) -> None:
        self.name = name
        file = data_dir / ENDPOINT_FILE
        try:
            endpoint, pid = file.read_text(encoding="utf-8").split()[:2]
        except (OSError, ValueError):
            raise ControlUnavailable(name, str(file)) from None
        if not _process_alive(int(pid)):
            # The node died without cleaning up (kill -9): do not wait for an answer.
            raise ControlUnavailable(name, f"{file} (process {pid} is gone)")
        self.endpoint = endpoint
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.connect(self.endpoint)

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._socket.close(0)
        self._context.term()

    def request(self, request: Request, *, timeout_s: float) -> Reply:
        """Send `request`; raise `ControlUnavailable` if the node does not answer in time."""
        self._socket.send(_encoder.encode(request))
        if not self._socket.poll(int(timeout_s * 1000)):
            raise ControlUnavailable(self.name, self.endpoint)
        return _reply_decoder.decode(self._socket.recv())


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

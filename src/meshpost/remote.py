"""`meshpost attach`: the interactive console for a node that runs elsewhere (headless,
started by `meshpost cluster up`), driven through its local control endpoint.

Rule: `RemoteNode` offers the console the same surface a `Node` does (`ConsoleNode`), built
only from control requests; it holds no protocol or storage state of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Any

from meshpost.clock import SystemClock
from meshpost.config import NodeConfig, PeerConfig
from meshpost.control import (
    AsyncControlClient,
    EventsDropped,
    EventsReply,
    EventsRequest,
    GroupHistoryReply,
    GroupHistoryRequest,
    GroupReply,
    GroupRequest,
    NodeGone,
    ProbeReply,
    ProbeRequest,
    QueueStatusReply,
    QueueStatusRequest,
    SendReply,
    SendRequest,
    StatusReply,
    StatusRequest,
    checked,
)
from meshpost.errors import ControlUnavailable, NodeStopped
from meshpost.node import (
    BroadcastProgress,
    GroupHistory,
    MessageReceived,
    NodeEvent,
    NodeStats,
    Outgoing,
    PeerChanged,
    PeerProbe,
    PeerRefused,
    PeerStatus,
    Receipt,
)
from meshpost.protocol import Envelope
from meshpost.protocol.workqueue import QueueStatus
from meshpost.rules import resolve_target, validate_body

log = logging.getLogger(__name__)

#: How often the cached peer table is refreshed, and how long one event long-poll waits.
STATUS_REFRESH_S = 1.0
EVENTS_WAIT_S = 1.0
REQUEST_TIMEOUT_S = 10.0

ConsoleEvent = NodeEvent | NodeGone | EventsDropped


def console_events(reply: EventsReply, name: str) -> list[ConsoleEvent]:
    """The events of one `events` reply as the console shows a local node's (`name`: the
    node's), in the order the console prints them; deliveries settle this console's own
    sends instead (`RemoteNode` matches them to its handles)."""
    events: list[ConsoleEvent] = []
    if reply.dropped:
        events.append(EventsDropped(reply.dropped))
    for m in reply.incoming:
        envelope = Envelope(m.id, 0, m.sender, name, m.body, m.sent_at_ns, m.hlc)
        events.append(MessageReceived(envelope, m.stored_at_ns))
    for change in reply.peer_changes:
        events.append(PeerChanged.from_detail(change.peer, change.connected, change.detail))
    for refused in reply.refused:
        events.append(PeerRefused(refused.who, refused.code, refused.detail))
    for progress in reply.broadcasts:
        events.append(BroadcastProgress(progress.status))
    return events


class RemoteNode:
    """A running node seen through its control endpoint, shaped like `Node` for the console.

    Requests share one `AsyncControlClient` (replies are matched by id, so the status poll,
    the event long-poll and a send never take each other's answers). When the node's process
    goes away, pending sends fail with `NodeStopped`, subscribers get one `NodeGone`, and the
    cached peer table is no longer shown.
    """

    def __init__(self, data_dir: Path, *, name: str) -> None:
        self.name = name
        self.clock = SystemClock()
        self._data_dir = data_dir
        self._client = AsyncControlClient(data_dir, name=name)
        self._status: dict[str, Any] = {}
        self._peers: list[PeerStatus] = []
        self._handles: dict[tuple[str, int], Outgoing] = {}
        self._queues: list[asyncio.Queue[ConsoleEvent]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._stopped = False
        #: Group members as the node said at this console's last join or leave.
        self._members: dict[str, list[str]] = {}
        self.config: NodeConfig

    @property
    def stopped(self) -> bool:
        """True once the node went away (the console then says so, once)."""
        return self._stopped

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
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self._client.close()

    async def _call(self, request: Any, timeout_s: float = REQUEST_TIMEOUT_S) -> Any:
        """One request; `NodeStopped` (and the node marked stopped) when the node is gone."""
        if self._stopped:
            raise NodeStopped(self.name)
        try:
            return await self._client.request(request, timeout_s=timeout_s)
        except ControlUnavailable:
            if not self._client.alive():
                self._node_gone()
                raise NodeStopped(self.name) from None
            raise

    def _node_gone(self) -> None:
        """Say once that the node went away; fail every send still waiting for a receipt."""
        if self._stopped:
            return
        self._stopped = True
        self._peers = []
        handles, self._handles = list(self._handles.values()), {}
        for handle in handles:
            if not handle.receipt.done():
                handle.receipt.set_exception(NodeStopped(self.name))
        self._publish(NodeGone(self.name))

    async def _refresh(self) -> None:
        reply: StatusReply = checked(await self._call(StatusRequest()))
        self._status = reply.status
        self._peers = list(reply.peers)

    async def refresh_status(self) -> None:
        """Ask the node for its status and peers now (`/stats` shows fresh counters, not the
        last poll's: after two sends an attached console printed `sent 1`)."""
        await self._refresh()

    async def _poll_status(self) -> None:
        while not self._stopped:
            await asyncio.sleep(STATUS_REFRESH_S)
            if not self._client.alive():
                self._node_gone()
                return
            with contextlib.suppress(ControlUnavailable, NodeStopped):
                await self._refresh()

    async def _poll_events(self) -> None:
        while not self._stopped:
            try:
                reply: EventsReply = checked(await self._call(
                    EventsRequest(EVENTS_WAIT_S), EVENTS_WAIT_S + REQUEST_TIMEOUT_S))
            except NodeStopped:
                return
            except ControlUnavailable:
                await asyncio.sleep(STATUS_REFRESH_S)
                continue
            for event in console_events(reply, self.name):
                self._publish(event)
            for d in reply.deliveries:
                for seq in d.seqs:
                    handle = self._handles.pop((d.peer, seq), None)
                    if handle is not None and not handle.receipt.done():
                        handle.receipt.set_result(Receipt(
                            handle.id, d.peer, seq, handle.sent_at_ns, d.delivered_at_ns,
                            d.delivered_at_ns, self.clock.wall_ns(), "?"))

    def _publish(self, event: ConsoleEvent) -> None:
        for queue in self._queues:
            if not queue.full():
                queue.put_nowait(event)

    # -- the ConsoleNode surface ------------------------------------------------------------

    async def post(self, target: str, body: str) -> list[Outgoing]:
        reply: SendReply = checked(await self._call(SendRequest(target, body, 0.0)))
        loop = asyncio.get_running_loop()
        handles = []
        for r in reply.sent:
            handle = Outgoing(r.id, r.to, r.seq, body, r.sent_at_ns, 0, loop.create_future())
            self._handles[(r.to, r.seq)] = handle
            handles.append(handle)
        return handles

    async def join(self, group: str) -> bool:
        reply: GroupReply = checked(await self._call(GroupRequest("join", group)))
        self._members[group] = list(reply.members)
        return reply.changed

    async def leave(self, group: str) -> bool:
        reply: GroupReply = checked(await self._call(GroupRequest("leave", group)))
        self._members[group] = list(reply.members)
        return reply.changed

    async def queue_status(self, queue: str | None = None) -> list[QueueStatus]:
        reply: QueueStatusReply = checked(await self._call(QueueStatusRequest(queue)))
        return list(reply.queues)

    async def fetch_group_history(self, group: str, *, limit: int = 50, before_hlc: int = 0,
                                  timeout_s: float | None = 5.0) -> GroupHistory:
        """`Node.fetch_group_history` in the running node (it waits up to `timeout_s`)."""
        wait_s = 5.0 if timeout_s is None else timeout_s
        reply: GroupHistoryReply = checked(await self._call(
            GroupHistoryRequest(group, limit, before_hlc, wait_s),
            timeout_s=wait_s + REQUEST_TIMEOUT_S))
        return reply.history

    async def probe_peers(self, *peers: str, wait_s: float) -> list[PeerProbe]:
        """`Node.probe_peers` in the running node (it waits up to `wait_s`)."""
        reply: ProbeReply = checked(await self._call(
            ProbeRequest(peers=list(peers), wait_s=wait_s), timeout_s=wait_s + REQUEST_TIMEOUT_S))
        return list(reply.probes)

    def members(self, group: str) -> list[str]:
        """As of this console's last join or leave of `group`, else the configuration's."""
        return self._members.get(group, list(self.config.groups.get(group, ())))

    def resolve(self, target: str) -> list[str]:
        return resolve_target(target, local_name=self.name, peers=self.config.peer_names,
                              groups=self.config.groups)

    def validate_body(self, body: str) -> None:
        validate_body(body, self.config.max_message_bytes)

    def peers(self) -> list[PeerStatus]:
        """The peer table of the last status poll; `NodeStopped` once the node is gone (a
        stale table would look like a live one)."""
        if self._stopped:
            raise NodeStopped(self.name)
        return list(self._peers)

    def subscribe(self) -> asyncio.Queue[ConsoleEvent]:
        queue: asyncio.Queue[ConsoleEvent] = asyncio.Queue(10_000)
        self._queues.append(queue)
        if self._stopped:
            queue.put_nowait(NodeGone(self.name))
        return queue

    def unsubscribe(self, queue: asyncio.Queue[ConsoleEvent]) -> None:
        with contextlib.suppress(ValueError):
            self._queues.remove(queue)

    def snapshot_stats(self) -> NodeStats:
        if self._stopped:
            raise NodeStopped(self.name)
        stats = self._status.get("stats", {})
        known = NodeStats.__dataclass_fields__
        return NodeStats(**{k: v for k, v in stats.items() if k in known})

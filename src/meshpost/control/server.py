"""The node side of the control endpoint: serves `meshpost send/peers/attach` for one node.

Rule: a node's control socket is an `ipc://` socket reachable only from this machine, named in
`control.endpoint` (written atomically) in the node's data dir. Every request gets exactly one
reply carrying its id; subscriptions (`events`) expire when idle and share one memory bound.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import errno
import hashlib
import logging
import os
import stat
import tempfile
import time
from pathlib import Path
from typing import Any, cast

import msgspec
import zmq

from meshpost.config import DEFAULT_SUBSCRIBER_IDLE_S
from meshpost.control.messages import (
    ENDPOINT_FILE,
    PROBE_WAIT_MAX_S,
    AnswerReply,
    BroadcastProgressInfo,
    BroadcastReply,
    BroadcastRequest,
    BroadcastStatusRequest,
    DeliveryInfo,
    ErrorReply,
    EventsReply,
    EventsRequest,
    GroupHistoryReply,
    GroupHistoryRequest,
    GroupReply,
    GroupRequest,
    IncomingInfo,
    KeysReloadedReply,
    PeerChangeInfo,
    PeerRequest,
    PeersReply,
    PeersRequest,
    ProbeReply,
    ProbeRequest,
    QueueStatusReply,
    QueueStatusRequest,
    RefusedInfo,
    ReloadKeysRequest,
    Reply,
    Request,
    SendReply,
    SendRequest,
    SendResult,
    StatusReply,
    StatusRequest,
    SubmitReply,
    SubmitRequest,
    TailReply,
    TailRequest,
    encoder,
    request_decoder,
)
from meshpost.errors import (
    BadControlRequest,
    ConfigError,
    DataDirNotWritable,
    MeshpostError,
    NotStored,
    ReceiptTimeout,
    StoreFull,
    UnknownBroadcast,
    describe_error,
)
from meshpost.eventloop import loop_name
from meshpost.node import (
    BroadcastHandle,
    BroadcastProgress,
    DeliveryRecorded,
    MessageReceived,
    Node,
    NodeEvent,
    Outgoing,
    PeerChanged,
    PeerRefused,
    wait_receipt,
)
from meshpost.protocol.groups import BroadcastStatus

log = logging.getLogger(__name__)

#: A subscriber that has not polled for this long is dropped (its client went away); a node's
#: `subscriber_idle_s` setting (`--subscriber-idle-s`) chooses another.
SUBSCRIBER_IDLE_S = DEFAULT_SUBSCRIBER_IDLE_S
#: Memory all subscriptions of one node may hold together (bodies plus a fixed overhead per
#: event); each subscriber gets an equal share, and loses its oldest events beyond it.
SUBSCRIBERS_MAX_BYTES = 32 * 1024 * 1024
#: Events one subscriber may hold, however small they are.
SUBSCRIBER_MAX_EVENTS = 10_000
#: Events one `events` reply carries at most.
EVENTS_PER_REPLY = 1_000
#: Bytes counted per event beside its body (ids, names, stamps, the Python objects).
EVENT_OVERHEAD_BYTES = 200
#: Broadcast handles the server keeps for `broadcast-status` polls.
BROADCASTS_KEPT = 4096
#: Rows one `tail` reply carries at most, and the longest a `tail` poll waits.
TAIL_ROWS_PER_REPLY, TAIL_WAIT_MAX_S = 512, 30.0
#: How often pending sends look at the store's error counter (disk full: answer, not hang).
STORE_CHECK_S = 0.25
_IPC_PATH_MAX = 100
_NOBLOCK, _POLLIN = int(zmq.NOBLOCK), int(zmq.POLLIN)
#: A reply waits this long (attempts x retry) for room in its client's queue, then is dropped.
SEND_ATTEMPTS, SEND_RETRY_S = 100, 0.05

Event = IncomingInfo | PeerChangeInfo | DeliveryInfo | RefusedInfo | BroadcastProgressInfo


def _salvaged_id(data: bytes) -> int:
    """The `id` of a request that failed validation (a NaN wait, an unknown type), so that
    its client can match the `bad_request` reply; 0 when there is none to read."""
    try:
        raw = msgspec.msgpack.decode(data)
    except msgspec.DecodeError:
        return 0
    rid = raw.get("id") if isinstance(raw, dict) else None
    return rid if type(rid) is int and 0 <= rid < 2**64 else 0


def control_endpoint_for(data_dir: Path, *, socket_name: str = "control.sock") -> str:
    """The ipc endpoint for a data dir: inside it when the path is short enough. (A host's
    endpoint is its folder's `host.sock`: `socket_name`.)"""
    path = (data_dir / socket_name).resolve()
    if len(str(path)) <= _IPC_PATH_MAX:
        return f"ipc://{path}"
    # Unix socket paths are limited to ~107 bytes: fall back to a hashed name in a 0700
    # folder of this user's under /tmp (never /tmp itself: anyone could connect).
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:16]
    return f"ipc://{tempfile.gettempdir()}/meshpost-{os.getuid()}/{digest}.sock"


def _private_folder(folder: str) -> None:
    """Make `folder` (the control socket's) 0700 and ours, whatever the umask; refuse one
    that another user owns, since whoever controls the folder can swap the socket."""
    os.makedirs(folder, mode=0o700, exist_ok=True)
    st = os.lstat(folder)
    if st.st_uid != os.getuid() or not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{folder} is not a folder of this user's; the control socket "
                          "cannot be kept private there")
    if st.st_mode & 0o777 != 0o700:
        os.chmod(folder, 0o700)


def claim_socket_path(endpoint: str) -> None:
    """Ready an `ipc://` endpoint to bind: its folder private (`_private_folder`: refused if
    another user owns it) and a stale socket there removed (a killed process's; the caller
    holds the lock that makes the path its own: a node's data dir, a host's folder)."""
    path = endpoint.removeprefix("ipc://")
    _private_folder(os.path.dirname(path))
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def write_endpoint_file(path: Path, text: str) -> None:
    """Write `path` atomically (temp file, fsync, rename): a client never reads half of it.

    A full disk raises `StoreFull`, another OS error `DataDirNotWritable`; no temp file stays.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            _write_all(fd, text.encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StoreFull(str(path)) from None
        raise DataDirNotWritable(str(path.parent), exc.strerror or str(exc)) from None


def _size(event: Event) -> int:
    if isinstance(event, IncomingInfo):
        return EVENT_OVERHEAD_BYTES + len(event.body) + len(event.id) + len(event.sender)
    if isinstance(event, DeliveryInfo):
        return EVENT_OVERHEAD_BYTES + 8 * len(event.seqs)
    if isinstance(event, RefusedInfo):
        return EVENT_OVERHEAD_BYTES + len(event.who) + len(event.detail)
    if isinstance(event, BroadcastProgressInfo):
        status = event.status
        return EVENT_OVERHEAD_BYTES + len(status.logical_id) + len(status.target) + sum(
            len(m) for m in (*status.delivered, *status.pending)) + sum(
            len(m) + len(reason) for m, reason in status.rejected)
    return EVENT_OVERHEAD_BYTES + len(event.detail)


def _info(event: NodeEvent) -> Event | None:
    match event:
        case MessageReceived(message=m, stored_at_ns=stored_at):
            return IncomingInfo(m.id, m.sender, m.body, m.sent_at_ns, m.hlc, stored_at)
        case PeerChanged(peer=peer, connected=connected, detail=detail):
            return PeerChangeInfo(peer, connected, detail)
        case DeliveryRecorded(peer=peer, seqs=seqs, delivered_at_ns=at):
            return DeliveryInfo(peer, list(seqs), at)
        case PeerRefused(who=who, code=code, detail=detail):
            return RefusedInfo(who, code, detail)
        case BroadcastProgress(status=status):
            return BroadcastProgressInfo(status)
    return None  # a kind of event the control protocol does not carry (yet)


@dataclasses.dataclass(eq=False)
class _Subscription:
    """One `events` client: its undelivered events, their bytes, what it lost, when it polled."""

    last_poll: float
    events: collections.deque[tuple[Event, int]] = dataclasses.field(
        default_factory=collections.deque)
    bytes: int = 0
    dropped: int = 0
    polling: int = 0
    wakeup: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)

    def add(self, event: Event, size: int, max_bytes: int) -> int:
        """Queue `event`; drop the oldest beyond the limits. Returns the bytes it now holds
        more (negative when drops freed more than the event takes)."""
        before = self.bytes
        self.events.append((event, size))
        self.bytes += size
        while self.events and (self.bytes > max_bytes
                               or len(self.events) > SUBSCRIBER_MAX_EVENTS):
            _, old = self.events.popleft()
            self.bytes -= old
            self.dropped += 1
        self.wakeup.set()
        return self.bytes - before

    def take(self, limit: int) -> tuple[list[Event], int]:
        events: list[Event] = []
        while self.events and len(events) < limit:
            event, size = self.events.popleft()
            self.bytes -= size
            events.append(event)
        dropped, self.dropped = self.dropped, 0
        if not self.events:
            self.wakeup.clear()
        return events, dropped


class ControlServer:
    """Serves control requests for one node until its context exits."""

    def __init__(self, node: Node, *, subscriber_idle_s: float | None = None,
                 subscribers_max_bytes: int = SUBSCRIBERS_MAX_BYTES,
                 context: zmq.Context[Any] | None = None) -> None:
        """`subscriber_idle_s`: how long an `events` subscription may go unpolled (None: the
        node's `config.subscriber_idle_s`). `context`: a ZeroMQ context shared with other
        sockets of this process (a host of many nodes); by default the server makes its own
        and terminates it on exit."""
        self.node = node
        self.endpoint = control_endpoint_for(node.config.data_dir)
        self.subscriber_idle_s = (node.config.subscriber_idle_s if subscriber_idle_s is None
                                  else subscriber_idle_s)
        self.subscribers_max_bytes = subscribers_max_bytes
        # A plain socket read when its FD says so (as the transport does): requests already
        # waiting are taken in one go and replies sent at once, without asyncio's per-call
        # futures, which cost more than the rest of a pipelined `send --lines` request.
        self._own_context = context is None
        self._context: zmq.Context[Any] = context if context is not None else zmq.Context()
        self._socket: zmq.Socket[bytes] = zmq.Socket(self._context, zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 100)
        # A reply to a client whose queue is full must wait, not vanish (a ROUTER drops it
        # silently otherwise): with ROUTER_MANDATORY the send says EAGAIN.
        self._socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._readable = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._subscriptions: dict[bytes, _Subscription] = {}
        self._subscription_bytes = 0
        self._node_events: asyncio.Queue[NodeEvent] | None = None
        self._fanout_task: asyncio.Task[None] | None = None
        self._store_trouble: asyncio.Future[int] | None = None
        # Timers run only while there is something to watch: an idle node's control socket
        # costs no wake-ups (a host keeps hundreds of them).
        self._posts_waiting = 0
        self._post_started = asyncio.Event()
        self._subscribed = asyncio.Event()
        self._file = node.config.data_dir / ENDPOINT_FILE
        #: Broadcasts sent through this socket, by logical id (the newest BROADCASTS_KEPT).
        self._broadcasts: dict[str, BroadcastHandle] = {}
        #: Subscriptions dropped because their client stopped polling.
        self.expired = 0

    @property
    def subscriber_count(self) -> int:
        return len(self._subscriptions)

    @property
    def subscription_bytes(self) -> int:
        """Bytes (as counted for the bound) that all subscriptions hold now."""
        return self._subscription_bytes

    async def __aenter__(self) -> ControlServer:
        claim_socket_path(self.endpoint)
        self._socket.bind(self.endpoint)
        try:
            write_endpoint_file(self._file, f"{self.endpoint}\n{os.getpid()}\n")
        except MeshpostError:
            self._close_socket()
            raise
        self._spawn(self._serve(), name="control")
        self._spawn(self._watch_store(), name="control-store-watch")
        self._spawn(self._expire_idle(), name="control-expire")
        return self

    async def __aexit__(self, *exc: object) -> None:
        tasks = [*self._tasks, *([self._fanout_task] if self._fanout_task else [])]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._node_events is not None:
            self.node.unsubscribe(self._node_events)
        with contextlib.suppress(OSError):
            self._file.unlink()
        self._close_socket()

    def _close_socket(self) -> None:
        self._socket.close(0)
        if self._own_context:
            self._context.term()
        path = self.endpoint[len("ipc://") :]
        with contextlib.suppress(OSError):
            os.unlink(path)
        if Path(path).parent != self.node.config.data_dir.resolve():
            with contextlib.suppress(OSError):  # the shared /tmp folder: gone once empty
                os.rmdir(os.path.dirname(path))

    def _spawn(self, coro: Any, *, name: str | None = None) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _check_readable(self) -> None:
        # ZMQ_FD is edge-triggered and any operation on the socket may consume the edge:
        # look at the socket's own state after each one.
        with contextlib.suppress(zmq.ZMQError):
            if cast("int", self._socket.getsockopt(zmq.EVENTS)) & _POLLIN:
                self._readable.set()

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        fd = cast("int", self._socket.getsockopt(zmq.FD))
        loop.add_reader(fd, self._readable.set)
        try:
            while True:
                self._readable.clear()
                self._check_readable()
                await self._readable.wait()
                self._take_requests()
                await asyncio.sleep(0)  # let the handlers (and everyone else) run
        finally:
            loop.remove_reader(fd)

    def _take_requests(self) -> None:
        batch: list[list[bytes]] = []
        with contextlib.suppress(zmq.Again):
            while len(batch) < EVENTS_PER_REPLY:
                batch.append(self._socket.recv_multipart(_NOBLOCK))
        if len(batch) == EVENTS_PER_REPLY:
            self._readable.set()  # more may wait: come back after the others had a turn
        for parts in batch:
            if len(parts) != 2:
                # A request is one part: say so rather than leave the client to time out.
                self._spawn(self._refuse_parts(parts))
                continue
            identity, data = parts
            # One task per request, created in arrival order: a client's pipelined sends
            # are posted in the order it sent them.
            self._spawn(self._handle(identity, data))

    async def _refuse_parts(self, parts: list[bytes]) -> None:
        """Answer a request of `len(parts) - 1` parts (ROUTER's first part is the client's
        routing id) `bad_request`, with its first part's `id` if it has one."""
        error = BadControlRequest(f"a control request is one ZeroMQ message part, not "
                                  f"{len(parts) - 1} (docs/protocol.md 14.2)")
        await self._reply(parts[0], ErrorReply.of(
            error, _salvaged_id(parts[1]) if len(parts) > 1 else 0))

    async def _handle(self, identity: bytes, data: bytes) -> None:
        request_id = 0
        try:
            request = request_decoder.decode(data)
            request_id = request.id
            reply = await self._dispatch(identity, request)
        except msgspec.DecodeError as exc:
            reply = ErrorReply.of(BadControlRequest(str(exc)), _salvaged_id(data))
        except MeshpostError as exc:
            reply = ErrorReply.of(exc, request_id)
        except Exception as exc:  # a bug: report it to the client, keep serving
            log.exception("[%s] control request failed", self.node.name)
            reply = ErrorReply(kind="internal", message=describe_error(exc), exit_code=1,
                               id=request_id)
        await self._reply(identity, reply)

    async def _reply(self, identity: bytes, reply: Reply) -> None:
        """Send `reply` to the client `identity`, waiting while its queue is full."""
        request_id = reply.id
        frames = [identity, encoder.encode(reply)]
        for _ in range(SEND_ATTEMPTS):
            try:
                self._socket.send_multipart(frames, _NOBLOCK)
                break
            except zmq.Again:  # the client's queue is full: give it time to read
                await asyncio.sleep(SEND_RETRY_S)
            except zmq.ZMQError:  # closed under us (shutting down)
                break
        else:
            log.warning("[%s] control reply %d dropped: its client reads nothing",
                        self.node.name, request_id)
        self._check_readable()

    async def _dispatch(self, identity: bytes, request: Request) -> Reply:
        node = self.node
        match request:
            case SendRequest(target=target, body=body, timeout_s=timeout_s):
                handles = await self._post(target, body)
                if len(handles) == 1:  # the common case, without gather's extra task
                    results = [await self._await_receipt(handles[0], timeout_s)]
                else:
                    results = list(await asyncio.gather(
                        *(self._await_receipt(h, timeout_s) for h in handles)))
                return SendReply(sent=results, id=request.id)
            case PeersRequest():
                return PeersReply(peers=node.peers(), id=request.id)
            case ProbeRequest(peers=peers, wait_s=wait_s):
                if not 0 <= wait_s <= PROBE_WAIT_MAX_S:
                    raise BadControlRequest(f"probe wants 0 <= wait_s <= {PROBE_WAIT_MAX_S:g}, "
                                            f"not {wait_s!r}")
                probes = await node.probe_peers(*peers, wait_s=wait_s)
                return ProbeReply(probes=probes, id=request.id)
            case StatusRequest():
                return StatusReply(status=await self._status(), peers=node.peers(),
                                   id=request.id)
            case EventsRequest(wait_s=wait_s):
                return await self._events(identity, request.id, wait_s)
            case PeerRequest(to=to, body=body, timeout_s=timeout_s):
                r = await node.request(to, body, timeout_s=timeout_s)
                return AnswerReply(request_id=r.request_id, reply_id=r.id, sender=r.sender,
                                   body=r.body, sent_at_ns=r.sent_at_ns,
                                   stored_at_ns=r.stored_at_ns, id=request.id)
            case SubmitRequest(queue=queue, sink=sink, bodies=bodies, lease_s=lease_s):
                ids = await node.submit(queue, bodies, sink=sink, lease_s=lease_s)
                return SubmitReply(task_ids=ids, id=request.id)
            case TailRequest():
                return await self._tail(request)
            case GroupRequest(action=action, group=group):
                changed = False
                if action == "join":
                    changed = await node.join(group)
                elif action == "leave":
                    changed = await node.leave(group)
                return GroupReply(group=group, members=node.members(group), changed=changed,
                                  id=request.id)
            case BroadcastRequest(target=target, body=body):
                handle = await self.node.broadcast(target, body)
                self._remember(handle)
                return BroadcastReply(status=handle.status, id=request.id)
            case QueueStatusRequest(queue=queue):
                return QueueStatusReply(queues=await node.queue_status(queue), id=request.id)
            case GroupHistoryRequest(group=group, limit=limit, before_hlc=before_hlc,
                                     wait_s=wait_s):
                history = await node.fetch_group_history(group, limit=limit,
                                                         before_hlc=before_hlc,
                                                         timeout_s=wait_s)
                return GroupHistoryReply(history=history, id=request.id)
            case BroadcastStatusRequest(logical_id=logical_id, seen=seen, wait_s=wait_s):
                return BroadcastReply(status=await self._broadcast_status(logical_id, seen,
                                                                          wait_s),
                                      id=request.id)
            case ReloadKeysRequest():
                changes = await node.reload_authorized_keys()
                return KeysReloadedReply(added=list(changes.added),
                                         removed=list(changes.removed),
                                         changed=list(changes.changed), id=request.id)
        raise AssertionError(f"unhandled control request {request!r}")

    async def _status(self) -> dict[str, Any]:
        node = self.node
        return {
            "name": node.name,
            "node_id": node.node_id,
            "endpoints": node.endpoints,
            "pid": os.getpid(),
            "loop": loop_name(),  # uvloop or asyncio: `meshpost peers` shows it
            # All threads, nanosecond resolution: psutil's ticks are 10 ms, too coarse for a
            # short benchmark phase.
            "cpu_s": time.process_time(),
            "pending": await node.pending_count(),
            "stats": dataclasses.asdict(node.snapshot_stats()),
            "groups": {g: list(m) for g, m in node.groups().items()},
            "max_message_bytes": node.config.max_message_bytes,
            "data_dir": str(node.config.data_dir),
            "control": {"subscribers": self.subscriber_count,
                        "subscription_bytes": self.subscription_bytes,
                        "expired": self.expired},
            # Only while a role that counts runs (a text gateway): {role: {counter: n}}.
            **({"roles": roles} if (roles := node.role_counters()) else {}),
        }

    # -- sending ------------------------------------------------------------------------------

    async def _post(self, target: str, body: str) -> list[Outgoing]:
        """`node.post`, but a store that keeps failing is answered (`NotStored`), not waited
        for: the node retries the write, and the client must know the message is not stored."""
        post: asyncio.Task[list[Outgoing]] = asyncio.ensure_future(self.node.post(target, body))
        if self._store_trouble is None or self._store_trouble.done():
            self._store_trouble = asyncio.get_running_loop().create_future()
        trouble = self._store_trouble
        waiting: set[asyncio.Future[Any]] = {post, trouble}
        self._posts_waiting += 1
        self._post_started.set()
        try:
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._posts_waiting -= 1
        if post.done():
            return post.result()
        # The post stays with the writer (it is stored and sent once the store recovers):
        # keep its task referenced, and log how it ends.
        self._tasks.add(post)
        post.add_done_callback(self._post_finished)
        raise NotStored(self.node.name,
                        f"the store failed {trouble.result()} time(s) while the message waited "
                        "(disk full or not writable? see node.log)")

    def _post_finished(self, post: asyncio.Task[list[Outgoing]]) -> None:
        self._tasks.discard(post)
        if not post.cancelled() and post.exception() is None:
            for handle in post.result():
                log.warning("[%s] message %s to %s stored after a store error (its sender "
                            "was told it was not stored)", self.node.name, handle.id, handle.to)

    async def _watch_store(self) -> None:
        errors = self.node.snapshot_stats().store_errors
        while True:
            if not self._posts_waiting:  # nothing waits for the store: sleep until a post does
                self._post_started.clear()
                await self._post_started.wait()
                errors = self.node.snapshot_stats().store_errors
            await asyncio.sleep(STORE_CHECK_S)
            now = self.node.snapshot_stats().store_errors
            trouble = self._store_trouble
            if now > errors and trouble is not None and not trouble.done():
                trouble.set_result(now - errors)
            errors = now

    async def _await_receipt(self, handle: Outgoing, timeout_s: float) -> SendResult:
        def result(**outcome: Any) -> SendResult:
            return SendResult(handle.to, handle.id, handle.seq, handle.sent_at_ns, **outcome)

        try:
            receipt = await wait_receipt(handle, timeout_s)
        except ReceiptTimeout:
            return result(delivered=False)
        except MeshpostError as exc:
            return result(delivered=False, error=str(exc))
        return result(delivered=True, delivered_at_ns=receipt.delivered_at_ns,
                      received_at_ns=receipt.received_at_ns, sync=receipt.sync)

    # -- broadcasts ---------------------------------------------------------------------------

    def _remember(self, handle: BroadcastHandle) -> None:
        self._broadcasts[handle.logical_id] = handle
        while len(self._broadcasts) > BROADCASTS_KEPT:  # the oldest go first
            self._broadcasts.pop(next(iter(self._broadcasts)))

    async def _broadcast_status(self, logical_id: str, seen: int,
                                wait_s: float) -> BroadcastStatus:
        # A broadcast sent through this socket, else any this node sent, before a restart
        # too (its status from the store's copies and receipts).
        handle = self._broadcasts.get(logical_id) or await self.node.broadcast_handle(logical_id)
        if handle is None:
            raise UnknownBroadcast(self.node.name, logical_id)
        deadline = time.monotonic() + min(max(wait_s, 0.0), TAIL_WAIT_MAX_S)
        status = handle.status
        while (len(status.delivered) + len(status.rejected) <= seen and not status.settled
               and (left := deadline - time.monotonic()) > 0):
            status = await handle.changed(left)
        return status

    # -- tail ---------------------------------------------------------------------------------

    async def _tail(self, request: TailRequest) -> TailReply:
        if request.limit < 1 or request.wait_s < 0 or (
                request.after is not None and request.after < 0):
            raise BadControlRequest(f"tail wants limit >= 1, wait_s >= 0 and a cursor >= 0, "
                                    f"not {request.limit}, {request.wait_s}, {request.after}")
        limit = min(request.limit, TAIL_ROWS_PER_REPLY)
        wait_s = min(request.wait_s, TAIL_WAIT_MAX_S)
        deadline = time.monotonic() + wait_s
        cursor, rows = await self.node.incoming_after(request.after, limit=limit, wait_s=wait_s)
        while request.after is not None:
            # Membership records are the mesh's bookkeeping, not messages to show.
            rows = [row for row in rows if row.kind != "member"
                    and (request.sender is None or row.sender == request.sender)]
            left = deadline - time.monotonic()
            if rows or left <= 0:
                break
            # Only other senders' messages came: keep waiting (past them) for this one's.
            cursor, rows = await self.node.incoming_after(cursor, limit=limit, wait_s=left)
        return TailReply(cursor=cursor, messages=rows, id=request.id)

    # -- subscriptions ------------------------------------------------------------------------

    async def _events(self, identity: bytes, request_id: int, wait_s: float) -> EventsReply:
        sub = self._subscriptions.get(identity)
        if sub is None:
            sub = self._subscriptions[identity] = _Subscription(time.monotonic())
            self._subscribed.set()
            self._ensure_fanout()
        sub.polling += 1
        try:
            if not sub.events and not sub.dropped:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(sub.wakeup.wait(), wait_s)
            before = sub.bytes
            events, dropped = sub.take(EVENTS_PER_REPLY)
            self._subscription_bytes -= before - sub.bytes
        finally:
            sub.polling -= 1
            sub.last_poll = time.monotonic()
        return EventsReply(
            id=request_id,
            incoming=[e for e in events if isinstance(e, IncomingInfo)],
            peer_changes=[e for e in events if isinstance(e, PeerChangeInfo)],
            deliveries=[e for e in events if isinstance(e, DeliveryInfo)],
            refused=[e for e in events if isinstance(e, RefusedInfo)],
            broadcasts=[e for e in events if isinstance(e, BroadcastProgressInfo)],
            dropped=dropped,
        )

    def _ensure_fanout(self) -> None:
        # The node publishes to the server only while someone subscribes: no cost otherwise.
        if self._fanout_task is None or self._fanout_task.done():
            self._node_events = self.node.subscribe()
            self._fanout_task = asyncio.create_task(self._fanout(self._node_events),
                                                    name="control-fanout")

    async def _fanout(self, queue: asyncio.Queue[NodeEvent]) -> None:
        while True:
            event = await queue.get()
            info = _info(event)
            if info is None:
                continue
            size = _size(info)
            subs = list(self._subscriptions.values())
            if not subs:
                continue
            share = self.subscribers_max_bytes // len(subs)
            for sub in subs:
                self._subscription_bytes += sub.add(info, size, share)

    async def _expire_idle(self) -> None:
        while True:
            if not self._subscriptions:
                self._subscribed.clear()
                await self._subscribed.wait()
            await asyncio.sleep(max(0.05, self.subscriber_idle_s / 4))
            self.expire_idle(time.monotonic())

    def expire_idle(self, now: float) -> int:
        """Drop subscriptions whose client has not polled for `subscriber_idle_s`."""
        idle = [identity for identity, sub in self._subscriptions.items()
                if not sub.polling and now - sub.last_poll > self.subscriber_idle_s]
        for identity in idle:
            sub = self._subscriptions.pop(identity)
            self._subscription_bytes -= sub.bytes
            log.info("[%s] control subscriber expired after %.0fs idle (%d events dropped)",
                     self.node.name, self.subscriber_idle_s, len(sub.events) + sub.dropped)
        self.expired += len(idle)
        if not self._subscriptions and self._node_events is not None:
            self.node.unsubscribe(self._node_events)
            self._node_events = None
            if self._fanout_task is not None:
                self._fanout_task.cancel()
                self._fanout_task = None
        return len(idle)

"""The Node: clock, protocol, store and transport composed under one event loop.

Rule: decide, then perform. Protocol objects decide what to send and what happened; this
module performs it (sockets, group commit) and never acknowledges a message before the store
has committed it. Lower layers never import this module. Transport, store and clock are
injected (the real ones by default), so tests run a node on fakes in virtual time. The
links to the peers (with their timers), the inbound path (what peers send our ROUTER, stored
then receipted), the receipts of our messages (their waiters and their record), the events
(what the links and the listener report, performed; the subscribers), the readers (what
callers read of the store) and the patterns (groups, requests, work queues) are components in
their own modules.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import itertools
import logging
import os
import secrets
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import meshpost.probes as probes
import meshpost.rules as rules
from meshpost.clock import (
    HLC_LOGICAL_MASK,
    Clock,
    HybridLogicalClock,
    SystemClock,
)
from meshpost.config import NodeConfig
from meshpost.errors import (
    ConfigError,
    InvalidMessage,
    NodeClosed,
    NodeFailed,
    RowRefused,
    StoreCorrupt,
)
from meshpost.node.events import Events
from meshpost.node.groups import Groups
from meshpost.node.inbound import Inbound
from meshpost.node.links import Links
from meshpost.node.readers import MESSAGES_BATCH, MESSAGES_POLL_S, Readers
from meshpost.node.receipts import Receipts, wait_receipt
from meshpost.node.records import (
    BroadcastHandle,
    CrashPoint,
    DeliveryRecorded,
    GroupHistory,
    Message,
    MessageReceived,
    NodeEvent,
    NodeStats,
    Outgoing,
    PeerChange,
    PeerChanged,
    PeerProbe,
    PeerRefused,
    PeerStatus,
    Receipt,
    Reply,
    RequestHandler,
    TaskHandler,
)
from meshpost.node.requests import Requests
from meshpost.node.workqueue import DEFAULT_LEASE_S, WorkQueues
from meshpost.protocol import Envelope, Listener
from meshpost.protocol.groups import (
    BroadcastStatus,
)
from meshpost.protocol.header import (
    PatternHeader,
    header_problem,
)
from meshpost.protocol.history import DEFAULT_HISTORY_ITEMS
from meshpost.protocol.requests import (
    PendingRequest,
)
from meshpost.protocol.workqueue import (
    DEFAULT_MAX_INFLIGHT,
    QueueStatus,
)
from meshpost.store import (
    GroupCommitWriter,
    IncomingResult,
    Store,
    StoredMessage,
    Verifier,
)
from meshpost.transport import Transport, ZmqTransport

if TYPE_CHECKING:
    import zmq.asyncio

    from meshpost.transport.security import KeyChanges

log = logging.getLogger(__name__)



#: How long `close()` waits for the last batch to commit.
CLOSE_FLUSH_TIMEOUT_S = 10.0


_HEX3 = [f"{i:03x}" for i in range(4096)]


#: Random 64-bit id tails drawn from the OS at once (`_IdFactory`): one getrandom call per
#: this many single ids, not one each.
_ID_POOL = 256
#: Factories whose drawn randomness a forked child must not reuse (its parent uses it too).
_ID_FACTORIES: weakref.WeakSet[_IdFactory] = weakref.WeakSet()


class _IdFactory:
    """Message ids: 12 hex digits of milliseconds, then 64 bits that are random for each id
    (or each run of ids made together, which then count up from a random start).

    Time-ordered (index appends, not random inserts), unique without coordination, and not
    guessable from the ids a peer has seen (issue 16: a counter anyone could read off one
    message let a peer pre-claim another's next ids). A single id's 64 bits are cut from
    `_ID_POOL` draws of the OS's randomness made at once, as hex: a slice per id, not a
    syscall and a `randbits` (a forked child draws its own: `_forget_ids_after_fork`).
    """

    def __init__(self) -> None:
        self._pool = ""
        self._at = 0
        _ID_FACTORIES.add(self)

    def __call__(self, wall_ns: int) -> str:
        at = self._at
        if at >= len(self._pool):
            self._pool, at = os.urandom(8 * _ID_POOL).hex(), 0
        self._at = at + 16
        return f"{wall_ns // 1_000_000:012x}{self._pool[at:at + 16]}"

    def forget(self) -> None:
        """Drop the randomness drawn so far (a forked child's copy of its parent's)."""
        self._pool, self._at = "", 0

    def many(self, wall_ns: int, count: int) -> list[str]:
        """`count` ids for one instant, consecutive from a random start, built in C."""
        start = secrets.randbits(64)
        prefix = f"{wall_ns // 1_000_000:012x}"
        end = start + count
        if end > 1 << 64:  # the 64-bit counter wraps inside this run: slow path
            mask = 0xFFFF_FFFF_FFFF_FFFF
            return [f"{prefix}{n & mask:016x}" for n in range(start, end)]
        # The last 3 hex digits come from a table; the 25 before them change once per 4096.
        ids: list[str] = []
        n = start
        while n < end:
            block_end = min(end, (n | 0xFFF) + 1)
            head = f"{prefix}{n >> 12:013x}"
            ids += map(head.__add__, _HEX3[n & 0xFFF : (n & 0xFFF) + block_end - n])
            n = block_end
        return ids


def _forget_ids_after_fork() -> None:
    for factory in list(_ID_FACTORIES):
        factory.forget()


os.register_at_fork(after_in_child=_forget_ids_after_fork)


class Node:
    """One meshpost node. Use as `async with Node(config) as node:`.

    Its parts are injected, with the real ones as defaults: `clock` (`SystemClock`),
    `transport` (a `ZmqTransport` built from the config and `curve_keys`/`peer_public_keys`),
    `store` (an open `Store`, else `Store.open` of `config.data_dir`; the node closes it) and
    `probe` (trace points, see `meshpost.probes`; none by default).
    """

    def __init__(
        self,
        config: NodeConfig,
        *,
        clock: Clock | None = None,
        transport: Transport | None = None,
        store: Store | None = None,
        probe: probes.Probe | None = None,
        crash_at: CrashPoint | None = None,
        curve_keys: tuple[bytes, bytes] | None = None,
        peer_public_keys: dict[str, bytes] | None = None,
        zmq_context: zmq.asyncio.Context | None = None,
        authorized_keys_loader: Callable[[], dict[str, bytes]] | None = None,
    ) -> None:
        self.config = config
        #: Secure mode: reads authorized_keys again, checked as at start (`keys.load_
        #: authorized` of the data dir, given by whoever read it at start): see
        #: `reload_authorized_keys`.
        self._keys_loader = authorized_keys_loader
        #: The configured peers' names, made once (`config.peer_names` builds a list).
        self._configured_peers = frozenset(config.peer_names)
        #: The ZeroMQ context of the default transport (None: its own); a host of many
        #: nodes shares one (one I/O thread, one socket table).
        self._zmq_context = zmq_context
        self.name = config.name
        self.clock: Clock = clock or SystemClock()
        self.hlc = HybridLogicalClock(self.clock)
        self.stats = NodeStats()
        #: Counters of what runs beside the node (a text gateway's), by role: control
        #: `status` shows them (`roles`) while the role runs, so a flood it counts is seen.
        self._role_counters: dict[str, Callable[[], dict[str, int]]] = {}
        self._crash_at = crash_at
        self._curve_keys = curve_keys
        self._peer_public_keys = peer_public_keys
        self._probe = probe
        self._new_id = _IdFactory()
        self._given_store = store
        self._given_transport = transport
        self._store: Store | None = None
        self._writer: GroupCommitWriter | None = None
        self._transport: Transport | None = None
        self._listener: Listener | None = None
        #: The links to the peers, their connections and timers (a mapping by peer name).
        self._links = Links(self)
        self._next_seq: dict[str, int] = {}
        #: The receipt futures of our messages, `send()` timeouts, receipts recorded.
        self._receipts = Receipts(self)
        #: What peers send our ROUTER: the listener's frames, arrived messages stored and
        #: receipted, then handed on (readers, subscribers, the patterns).
        self._inbound = Inbound(self)
        self._tasks: list[asyncio.Task[None]] = []
        #: What the links and the listener report, performed; the subscribers' queues. The
        #: components call `_on_event` and `_publish` and test `_subscribers` (the events'
        #: own list, never rebound) through the node, as before the events had a module.
        self._events = Events(self)
        self._subscribers = self._events.subscribers
        self._publish = self._events.publish
        self._on_event = self._events.on_event
        #: What callers read of the store (`messages()`, `incoming_after`, `pending_count`).
        #: Its wake-ups (one per waiting reader, never rebound) are at hand as
        #: `_message_readers`: `Inbound` sets them after each commit, `close()` at the end.
        self._readers = Readers(self)
        self._message_readers = self._readers.wakeups
        self._closed = False
        self._started = False
        #: Why the node stopped accepting work (an unexpected store failure), once it did.
        self.failure: NodeFailed | None = None
        self._failed = asyncio.Event()
        self.endpoints: list[str] = []
        # The patterns (docs/protocol.md 19), each a component that owns its state; the node
        # runs the tasks their handlers need (`_spawn_handler`), cancelled at close.
        self._groups = Groups(self)
        self._requests = Requests(self)
        self._queues = WorkQueues(self)
        self._handler_tasks: set[asyncio.Task[None]] = set()

    # -- lifecycle ------------------------------------------------------------------------

    @property
    def node_id(self) -> str:
        assert self._store is not None, "node not started"
        return self._store.node_id

    async def __aenter__(self) -> Node:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Open the store, bind, connect to peers and start serving. Raises on bad setup."""
        cfg = self.config
        store = self._given_store
        if store is None:
            store = await asyncio.to_thread(Store.open, cfg.data_dir, name=cfg.name,
                                            sync=cfg.sync)
        self._store = store
        try:
            self._writer = GroupCommitWriter(store, self.clock, node=self.name,
                                             on_failure=self._store_failed, probe=self._probe,
                                             on_committed=self._links.pump_offered)
            self._next_seq = await self._writer.call(store.last_seqs)
            # Start the HLC above every stamp already stored, since the wall clock may have
            # gone back while the node was down: our own stamps as they are, our peers'
            # through `observe`, which ignores an absurdly early clock as it did on arrival.
            own, issued_at = await self._writer.call(store.max_hlc_issued)
            self.hlc, refused = HybridLogicalClock.restored(self.clock, own, issued_at)
            if refused is not None:
                log.warning("[%s] the highest stored stamp (%d) is beyond the wall clock + the "
                            "HLC bound, now and when it was issued; the clock resumes from the "
                            "wall clock", self.name, refused)
            self.hlc.observe(await self._writer.call(store.max_hlc, "in"))
            # Requests sent before a restart wait (without a caller) for their late replies.
            self._requests.restore(
                PendingRequest(i, p, d)
                for i, p, d in await self._writer.call(store.unanswered_requests))
            self._queues.restore(await self._writer.call(store.task_results),
                                 await self._writer.call(store.members, "queue"))
            # A ventilator goes on with its unfinished tasks (`tasks` rows, leases anew).
            self._queues.restore_dispatchers(await self._writer.call(store.unfinished_tasks))
            # Groups: the configuration's as version-0 joins, then every stored record; the
            # broadcasts not settled before, from their copies and receipts.
            self._groups.restore(await self._writer.call(store.member_records),
                                 await self._writer.call(store.unsettled_broadcasts))
            self._listener = Listener(
                local_name=cfg.name,
                local_node_id=store.node_id,
                # Under --secure a listed key proves its name: that name's Hello is a
                # peer's, configured or not (its messages are stored and receipted).
                known_peers=[*cfg.peer_names, *(self._peer_public_keys or {})]
                if cfg.secure else cfg.peer_names,
                max_message_bytes=cfg.max_message_bytes,
                sync=cfg.sync,
                exclusive=cfg.exclusive,
            )
            if cfg.secure and (self._curve_keys is None or self._peer_public_keys is None):
                raise ConfigError(
                    f"node {cfg.name!r} is secure but has no CURVE keys; run "
                    "`meshpost keys generate` and list peers in authorized_keys"
                )
            if cfg.secure and (keyless := [p.name for p in cfg.peers
                                           if p.name not in (self._peer_public_keys or {})]):
                # Checked here, not when a link first dials (which, for a lazy link, is at
                # its first message): that raised a TransportError, exit 1 as if a bug.
                raise ConfigError(
                    f"node {cfg.name!r} is secure but has no public key for peer(s) "
                    f"{', '.join(keyless)}: add each one's line (`meshpost keys show --node "
                    f"NAME`, run where that node keeps its data) to authorized_keys in "
                    f"{cfg.data_dir}"
                )
            secret, public = self._curve_keys if cfg.secure and self._curve_keys else (None, None)
            self._transport = self._given_transport or ZmqTransport(
                name=cfg.name,
                max_frame_bytes=self._listener.max_frame_bytes,
                curve_secret_key=secret,
                curve_public_key=public,
                peer_public_keys=self._peer_public_keys,
                probe=self._probe,
                max_inbound_connections=cfg.max_inbound_connections,
                context=self._zmq_context,
            )
            self.endpoints = self._transport.bind(cfg.bind)
            self._links.add_configured()
            # What a big store's open left unchecked is verified after start (`_verify_store`).
            verifier = await asyncio.to_thread(store.open_verifier)
        except BaseException:
            await self._teardown()
            raise
        self._tasks = [
            asyncio.create_task(self._queues.run(), name=f"{self.name}-workqueues"),
            asyncio.create_task(self._writer.run(), name=f"{self.name}-writer"),
            asyncio.create_task(self._links.run_timers(), name=f"{self.name}-timers"),
            asyncio.create_task(self._links.run_feeder(), name=f"{self.name}-feeder"),
        ]
        if verifier is not None:
            self._tasks.append(asyncio.create_task(self._verify_store(verifier),
                                                   name=f"{self.name}-verifier"))
        self._transport.start(self._inbound.on_frame, self._links.on_peer_frame,
                              self._writer.submit_now)
        for task in self._tasks:
            task.add_done_callback(self._task_died)
        self._started = True
        self._links.wake_feeder()
        self._requests.start()
        log.info("[%s] node %s listening on %s", self.name, self.node_id, ", ".join(self.endpoints))

    def add_peer(self, name: str, endpoint: str, *, node_id: str | None = None,
                 found: str = "beacon") -> bool:
        """Start talking to a peer found while running (discovery); False if already known.

        With `node_id`, a Hello naming `name` is accepted only from that node: a second node
        claiming the name is refused, so it can never take the first one's messages. Messages
        stored for `name` in an earlier run are sent once it answers.
        """
        return self._links.add_peer(name, endpoint, node_id=node_id, found=found)

    def move_peer(self, name: str, endpoint: str) -> bool:
        """A peer found while running (discovery) is at `endpoint` now: its link dials it
        there, and what is queued for it goes there. False for a configured peer (its
        configuration says where it is), an unknown one, or the endpoint it already has."""
        return self._links.move_peer(name, endpoint)

    def connect(self, *peers: str) -> None:
        """Open the links to `peers` (all peers if none is named) now rather than on their
        first message, as a probe: `peers()` shows who answers. Links with nothing to send
        close again after `link_idle_s`. Raises `UnknownPeer` for a name that is no peer."""
        self._links.connect(*peers)

    async def probe_peers(self, *peers: str, wait_s: float) -> list[PeerProbe]:
        """Ask `peers` (every peer if none is named) for a sign of life now, idle links
        included (an idle link dials, a ready one pings at once), and say what each did within
        `wait_s` (event-loop time): `live` with its answer's round trip, `lost` if nothing
        came from it, `refused` if it refused us. A peer that crashed while its link was idle
        shows as `lost` here, not `idle`. Raises `UnknownPeer` for a name that is no peer."""
        return await self._links.probe(*peers, wait_s=wait_s)

    @property
    def next_timer(self) -> float:
        """The monotonic time (`clock`) the timer loop next wakes for a link; `math.inf`
        when no link has anything to time (all idle or quiet)."""
        return self._links.next_timer

    def watch_peers(self, names: set[str]) -> None:
        """Keep the links to `names` open and their liveness watched (pings, silence) even
        with nothing to send, and stop watching the others watched before: what a
        ventilator needs of its workers, whose loss takes their tasks back."""
        self._links.watch_peers(names)

    def peer_heard(self, name: str) -> None:
        """Discovery heard `name` again. A link it refused as unknown (it had not heard us
        yet when we dialed: a start-up race) asks again now instead of in 10 s."""
        self._links.peer_heard(name)

    def _store_failed(self, error: BaseException) -> None:
        """The writer broke (called once, on the loop): like h11's connection after an error,
        the node refuses new work from now on. Every pending write already failed with it."""
        self.failure = NodeFailed(self.name, error)
        if isinstance(error, StoreCorrupt):
            self.stats.store_corrupt += 1
        log.critical("[%s] %s", self.name, self.failure)
        self._failed.set()
        # Receipts still expected can no longer be recorded: their waiters hear why now
        # rather than at their timeout. (The messages are stored; a restart delivers them.)
        self._receipts.fail(self.failure)

    async def _verify_store(self, verifier: Verifier) -> None:
        """Check, off the loop, the rows and pages `Store.open` left unchecked (a big store).
        On the first corrupt one the writer fails with it, so the node fails as a broken
        store makes it (`serve` raises, `meshpost node` exits 6), as it would have at open."""
        stop = threading.Event()

        def run() -> None:
            try:
                while not stop.is_set() and not verifier.step():
                    pass
            finally:
                verifier.close()  # on this thread: the connection is never used by two

        # A thread of its own, not the loop's default executor (`asyncio.to_thread`): the pass
        # takes seconds to minutes (about 2.5 s a million rows), and that executor's few
        # threads (min(32, CPUs + 4)) are every node's of a host process. Nine nodes of big
        # stores in one host held them all: the later ones never opened their stores (on that
        # executor) and no control socket of the host answered until the passes ended.
        thread = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"meshpost-{self.name}-verify")
        try:
            await asyncio.get_running_loop().run_in_executor(thread, run)
        except StoreCorrupt as exc:
            if self._writer is not None:
                self._writer.fail(exc)
        else:
            log.info("[%s] store verified: %d more rows checked since start", self.name,
                     verifier.rows_verified)
        finally:
            stop.set()
            thread.shutdown(wait=False)  # `stop` ends it at its next step

    async def serve(self, stop: asyncio.Event) -> None:
        """Run until `stop` is set. Raises `NodeFailed` if the node fails first (the caller
        then closes it and exits with the store error's code)."""
        stopped = asyncio.ensure_future(stop.wait())
        failed = asyncio.ensure_future(self._failed.wait())
        try:
            await asyncio.wait({stopped, failed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            failed.cancel()
        if self.failure is not None:
            raise self.failure

    def _task_died(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or self._closed:
            return
        exc = task.exception()
        if exc is not None:
            log.error("[%s] internal task %s failed: %r", self.name, task.get_name(), exc,
                      exc_info=exc)

    async def close(self) -> None:
        """Commit what is pending, close sockets and the store. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for wakeup in self._message_readers:  # `messages()` readers end
            wakeup.set()
        if self._writer is not None and self._started:
            try:
                await asyncio.wait_for(self._writer.flush(), CLOSE_FLUSH_TIMEOUT_S)
            except TimeoutError:
                log.warning("[%s] last batch did not commit in time; it is not acknowledged",
                            self.name)
        self._links.say_goodbye()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._receipts.close()
        for handler_task in list(self._handler_tasks):
            handler_task.cancel()
        self._requests.close()
        await self._teardown()
        log.info("[%s] node closed", self.name)

    async def _teardown(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        if self._writer is not None:
            await asyncio.to_thread(self._writer.close)
            self._writer = None
        elif self._store is not None:
            await asyncio.to_thread(self._store.close)
        self._store = None
        await self._readers.close()

    # -- public API -----------------------------------------------------------------------

    def resolve(self, target: str) -> list[str]:
        """Peer names a target means: a peer, a group, or `all` (`rules.resolve_target`);
        `all` and a peer name include peers found while running."""
        if target in self._links and target.lower() != rules.ALL:
            return [target]  # the usual target, one peer: no group table to build per send
        return self._groups.resolve(target)

    def groups(self) -> dict[str, tuple[str, ...]]:
        """Every group this node knows of and its current members (this node included when
        it is one; a group everyone left is empty): the configuration's, changed by `member`
        records."""
        return self._groups.groups()

    def members(self, group: str) -> list[str]:
        """The current members of `group` (this node included if it is one)."""
        return self._groups.members(group)

    async def reload_authorized_keys(self) -> KeyChanges:
        """Secure mode: read authorized_keys again, checked exactly as at start, and put it
        in force at once (docs/protocol.md 2.3, "Changing keys under a running node"):
        added keys are admitted, removed or changed ones admit no new connection and their
        open connections' frames are dropped, a peer whose key went is no longer dialled
        (what is queued for it stays queued) and one whose key changed is redialled with
        it. Returns what changed. Raises `ConfigError` (naming the lines) for a file that
        would not start the node, or for a node without --secure; the keys in force stay."""
        self._check_open()
        if not self.config.secure or self._keys_loader is None:
            log.warning("[%s] asked to reload authorized_keys, but it runs without --secure",
                        self.name)
            raise ConfigError(f"node {self.name} runs without --secure: it has no "
                              "authorized_keys to reload")
        try:
            keys = await asyncio.to_thread(self._keys_loader)
        except ConfigError as exc:
            log.error("[%s] authorized_keys not reloaded (the %d keys in force stay): %s",
                      self.name, len(self._peer_public_keys or {}), exc)
            raise
        self._check_open()
        transport, listener = self._transport, self._listener
        assert transport is not None
        assert listener is not None
        changes = transport.set_peer_keys(keys)
        self._peer_public_keys = keys
        listener.known_peers = listener.known_peers | set(keys)
        log.info("[%s] authorized_keys reloaded: %s (%d keys in force)", self.name,
                 changes.describe(), len(keys))
        return changes

    @property
    def authorized_keys(self) -> Mapping[str, bytes] | None:
        """Secure mode: the peers' public keys in force (name to Z85 key), which
        `reload_authorized_keys` replaces (with a new mapping); None without --secure."""
        return self._peer_public_keys

    def peer_state(self, name: str) -> str | None:
        """The state of the link to `name` (`PeerStatus.state`: idle, connecting, ready,
        lost, left, refused), None for no peer: what `peers()` says of one, without the
        others (discovery asks it for a beacon, so it must not cost a walk of every link)."""
        link = self._links.get(name)
        return None if link is None else link.state.value

    def is_group(self, name: str) -> bool:
        """Whether `name` is a group here (configured or named by a record), not a node:
        discovery finds no node under it, or `send NAME` would go to whoever beaconed it."""
        return self._groups.is_group(name)

    async def join(self, group: str) -> bool:
        """Join `group` from now on: a durable record, sent to every peer (retried until each
        receipts it), so `@group` reaches this node. False if already a member. Messages sent
        to the group before are not delivered here."""
        return await self._groups.change_membership(group, joined=True)

    async def leave(self, group: str) -> bool:
        """Leave `group`: peers stop sending its messages here (copies already posted still
        come). False if not a member."""
        return await self._groups.change_membership(group, joined=False)

    def validate_body(self, body: str) -> None:
        """Raise the `InvalidMessage` that `post` would raise for `body`."""
        rules.validate_body(body, self.config.max_message_bytes)

    async def post(
        self, target: str, body: str, *, header: PatternHeader | None = None
    ) -> list[Outgoing]:
        """Accept `body` for every peer `target` names; return once it is durably stored.

        The returned handles' `receipt` futures complete when each receiver has committed it.
        `header` says what the message is for (a task, a reply, ...: docs/protocol.md);
        None, the default, sends a direct message; to `all` or a group, one logical message
        (as `broadcast`, whose k/n it counts).
        """
        if header is None and target not in self._links and self.resolve(target):
            return (await self.broadcast(target, body)).copies
        return await self._post(target, body, held=False, header=header)

    async def broadcast(self, target: str, body: str) -> BroadcastHandle:
        """Post `body` to every member of `target` (`all`, a group, or one peer) as one
        logical message; return once every copy is stored, with a handle whose `status` counts
        receipts (`delivered k/n`, the members pending) as they arrive."""
        return await self._groups.broadcast(target, body)

    def broadcasts(self) -> list[BroadcastStatus]:
        """Logical messages to many still waiting for receipts, oldest first."""
        return self._groups.active()

    async def broadcast_handle(self, logical_id: str) -> BroadcastHandle | None:
        """The handle of broadcast `logical_id` this node sent, even before a restart: its
        `status` (delivered k/n from the store's copies and receipts) and `changed()`;
        None if this node sent no such broadcast."""
        self._check_open()
        return await self._groups.handle(logical_id)

    async def _post(
        self, target: str, body: str, *, held: bool, header: PatternHeader | None = None,
        message_id: str | None = None,
    ) -> list[Outgoing]:
        """`post`; with `held`, the caller itself keeps the futures until they are done.
        `message_id`: the id to use (a request's, chosen before; a reply's, derived) instead
        of a fresh one; for a single peer only."""
        self._check_open()
        if header is not None and (problem := header_problem(header)) is not None:
            raise InvalidMessage(f"invalid pattern header: {problem}")
        peers = self.resolve(target)
        if message_id is not None and len(peers) != 1:
            raise ValueError(f"one message id for {len(peers)} peers ({target!r})")
        self.validate_body(body)
        if not peers:
            return []  # a group of this node alone: an empty batch would never be answered
        await self._wait_for_room()
        stored: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        def failed(error: BaseException) -> None:
            if not stored.done():
                stored.set_exception(error)

        handles = self._add_outgoing(
            peers, body, held=held, header=header, message_id=message_id,
            stored=lambda at: None if stored.done() else stored.set_result(at), failed=failed)
        await stored
        return handles

    async def _wait_for_room(self) -> None:
        """Back-pressure: wait while the writer's pending batch is full (no wait, and no
        coroutine, when it has room: every send passes here)."""
        writer = self._writer
        assert writer is not None
        if not writer.has_room:
            await writer.wait_for_room()
            self._check_open()

    def _add_outgoing(
        self, peers: list[str], body: str, *, held: bool, header: PatternHeader | None,
        message_id: str | None, stored: Callable[[int], None] | None,
        failed: Callable[[BaseException], None] | None = None, owned: bool = False,
    ) -> list[Outgoing]:
        """Hand `body` for each of `peers` (checked already) to the writer; return the
        handles. `stored(at)` once committed; if nothing can be stored, every handle's receipt
        fails (and `failed(error)` is told) with the node's failure. `held` and `owned`: as
        `Receipts.expect` takes them."""
        writer = self._writer
        assert writer is not None
        wall = self.clock.wall_ns()
        expect = self._receipts.expect
        handles: list[Outgoing] = []
        envelopes: list[Envelope] = []
        for peer in peers:
            seq = self._next_seq.get(peer, 0) + 1
            self._next_seq[peer] = seq
            # (Positional: a msgspec struct takes them for less than keywords, every send.)
            envelope = Envelope(message_id or self._new_id(wall), seq, self.name, peer, body,
                                wall, self.hlc.now(), header)
            future = expect((peer, seq), envelope.id, wall, held=held, owned=owned)
            handle = Outgoing(envelope.id, peer, seq, body, wall, envelope.hlc, future)
            envelopes.append(envelope)
            handles.append(handle)

        def not_stored(error: BaseException) -> None:
            # Nothing was stored: the handles' receipts can never come. A refused row
            # costs only itself: the node goes on (`RowRefused` says so).
            failure = self.failure or (error if isinstance(error, RowRefused)
                                       else NodeFailed(self.name, error))
            self._receipts.not_stored(handles, failure)
            if failed is not None:
                failed(failure)

        # One peer (every send): its link takes them as they are, no grouping by recipient.
        one = peers[0] if len(peers) == 1 else None
        # (A partial, not a lambda: one Python frame less when the commit calls it; its
        # arguments positional: a partial with keywords merges a dict at each call.)
        writer.add_outgoing(envelopes,
                            functools.partial(self._outgoing_stored, envelopes, stored, one),
                            not_stored)
        return handles

    async def request(self, peer: str, body: str, *, timeout_s: float | None = None) -> Reply:
        """Send `body` to `peer` as a request and return its reply (a `Reply`).

        After `timeout_s` raises `RequestTimeout`, whose `outcome` says whether `peer` had
        the request ("delivered-unanswered": it receipted it) or not ("not-delivered"). The
        request stays in the outbox either way, and a reply that comes later is stored and
        linked to it in history (the reply's `ref`), across restarts of either side.
        """
        return await self._requests.request(peer, body, timeout_s=timeout_s)

    async def reply(self, msg: Message, body: str) -> Outgoing | None:
        """Answer the request (or message) `msg` with `body`, linked to it (header `reply`,
        ref = its id). The reply's id is derived from the request's, so answering twice (a
        handler that ran again after a restart) stores one reply: None if it exists."""
        return await self._requests.reply(msg, body)

    async def fetch_group_history(
        self, group: str, *, limit: int = DEFAULT_HISTORY_ITEMS, before_hlc: int = 0,
        timeout_s: float | None = 5.0,
    ) -> GroupHistory:
        """Ask each other current member of `group` for its OWN messages to the group (at most
        `limit` each, newest first, below `before_hlc` if not 0) and return them merged by HLC,
        each labelled with the member that answered on its own link (docs/protocol.md 19.6).
        A member that does not reply within `timeout_s` is listed in `unanswered`; its request
        stays queued and a later reply is stored and linked like any reply. Nothing fetched
        goes into this node's received messages: it is in the reply rows."""
        return await self._requests.fetch_group_history(group, limit=limit,
                                                        before_hlc=before_hlc,
                                                        timeout_s=timeout_s)

    def on_request(self, handler: RequestHandler, *, direct: bool = False) -> None:
        """Answer every request peers send with `handler` (sync or async): a str it returns
        is sent as the reply (`reply`). With `direct`, plain messages are answered too (the
        echo server). Requests stored but unanswered before a restart are handled again."""
        self._requests.on_request(handler, direct=direct)

    # -- work queues (docs/protocol.md 19.4) ----------------------------------------------

    async def serve_queue(self, queue: str, handler: TaskHandler, *,
                          max_inflight: int = DEFAULT_MAX_INFLIGHT) -> None:
        """Work for `queue` (`serve` already names running the node): every task sent to
        it here runs `handler(body)` (sync, run in a thread, or async), and the result goes
        to the task's sink, once per task message. Announced to every peer with a `serve`
        record (stored and retried) that carries `max_inflight` as this worker's prefetch:
        it runs at most that many tasks at once, and a ventilator gives it at most that many
        unfinished (1 to MAX_PREFETCH, 1,024; else `InvalidPrefetch`). The default, 16,
        keeps slow tasks spread over the workers; an instant handler does more with more
        (docs/benchmarks.md, work-queue)."""
        await self._queues.serve_queue(queue, handler, max_inflight=max_inflight)

    async def submit(self, queue: str, bodies: Sequence[str], *, sink: str,
                     lease_s: float = DEFAULT_LEASE_S) -> list[str]:
        """Queue one task per body on `queue`, results to `sink`; returns the task ids.
        Each goes to exactly one live worker at a time (fewest in flight), is redelivered
        after its lease or its worker's loss, and its result is kept once at the sink."""
        return await self._queues.submit(queue, bodies, sink=sink, lease_s=lease_s)

    def queue_workers(self, queue: str) -> list[str]:
        """The peers serving `queue` (by their latest `serve` record) that this node can
        reach now, i.e. those a task submitted here may go to at once; sorted."""
        return self._queues.workers(queue)

    async def queue_status(self, queue: str | None = None) -> list[QueueStatus]:
        """Each queue this node knows (or only `queue`): workers, tasks waiting, in flight
        and leased (as its ventilator), done, abandoned and redelivered (from the store,
        across restarts), results kept (as its sink)."""
        self._check_open()
        assert self._writer is not None
        assert self._store is not None
        counts = await self._writer.call(self._store.queue_counts)
        names = [queue] if queue is not None else sorted({*self._queues.queues(), *counts})
        return [self._queues.status(q, counts.get(q)) for q in names]

    @property
    def completed_tasks(self) -> list[tuple[str, str | None]]:
        """Completed tasks as (task id, worker), in order (ventilator)."""
        return self._queues.completed_tasks

    # -- what the patterns share: handler tasks -----------------------------------------------

    def _spawn_handler(self, coro: Coroutine[Any, Any, None], what: str) -> None:
        task = asyncio.create_task(coro, name=f"{self.name}-handler-{what}")
        self._handler_tasks.add(task)
        task.add_done_callback(self._handler_tasks.discard)

    async def post_many(self, peer: str, bodies: Iterable[str]) -> int:
        """Accept many messages for one peer without receipt futures (bulk and benchmarks).

        Returns the number accepted; they are committed with the next batch. Follow
        `stats.delivered` or `wait_delivered()` for receipts.
        """
        self._check_open()
        rules.resolve_peer(peer, peers=self.config.peer_names)
        writer = self._writer
        assert writer is not None
        await writer.wait_for_room()
        bodies = bodies if isinstance(bodies, list) else list(bodies)
        count = len(bodies)
        rules.validate_bodies(bodies, self.config.max_message_bytes)
        wall = self.clock.wall_ns()
        seq = self._next_seq.get(peer, 0)
        # No per-message Python loop: ids, seqs, stamps and envelopes are built by map().
        envelopes = list(map(
            Envelope, self._new_id.many(wall, count), range(seq + 1, seq + count + 1),
            itertools.repeat(self.name), itertools.repeat(peer), bodies, itertools.repeat(wall),
            self._hlc_many(count),
        ))
        self._next_seq[peer] = seq + count
        writer.add_outgoing(envelopes, lambda at: self._outgoing_stored(envelopes, None, peer, at))
        return count

    def _hlc_many(self, count: int) -> Iterable[int]:
        """`count` increasing HLC stamps, as `count` calls of `hlc.now()` would give them."""
        if count < 2:
            return [self.hlc.now() for _ in range(count)]
        first = self.hlc.now()
        if (first & HLC_LOGICAL_MASK) + count - 1 > HLC_LOGICAL_MASK:
            return [first, *(self.hlc.now() for _ in range(count - 1))]
        # Consecutive logical ticks of one millisecond; merging the last one moves the clock
        # past every stamp handed out here.
        self.hlc.advance(first + count - 1)
        return range(first, first + count)

    async def store_guest_message(self, guest: str, seq: int, body: str) -> tuple[str, int]:
        """Store `body` from a gateway guest (`tcp:IP:PORT`, `udp:IP:PORT`) as received by
        this node; return (message id, stored_at_ns) once it is committed.

        A guest is no mesh peer: its row is incoming, `peer` = `sender` = the guest's label,
        with no link and no receipt. The id is ours, so the row is stored exactly once.
        """
        self._check_open()
        self.validate_body(body)
        writer = self._writer
        assert writer is not None
        await writer.wait_for_room()
        self._check_open()
        wall = self.clock.wall_ns()
        envelope = Envelope(id=self._new_id(wall), seq=seq, sender=guest, recipient=self.name,
                            body=body, sent_at_ns=wall, hlc=self.hlc.now())
        stored: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        def done(result: IncomingResult, stored_at: int) -> None:
            if result.refused:
                if not stored.done():
                    stored.set_exception(result.refused[0][1])
                return
            self.stats.received += 1
            if not stored.done():
                stored.set_result(stored_at)
            self._publish(MessageReceived(envelope, stored_at))

        writer.add_incoming([envelope], done)
        return envelope.id, await stored

    async def send(self, to: str, body: str, *, timeout_s: float | None = None) -> Receipt:
        """Send `body` to one peer and wait for its receipt.

        On timeout raises `ReceiptTimeout`; the message stays queued and is still delivered.
        """
        if to not in self._configured_peers:
            rules.resolve_peer(to, peers=self.config.peer_names)  # raises UnknownPeer
        if self.failure is not None or self._closed or not self._started:
            self._check_open()  # raises (its test here: a call less a send)
        rules.validate_body(body, self.config.max_message_bytes)
        writer = self._writer
        assert writer is not None
        if not writer.has_room:  # (tested here: a coroutine to await costs every send)
            await self._wait_for_room()
        # The commit is not awaited on its own (a future and a loop turn less per send): the
        # receipt's future fails if the message cannot be stored. The handle is this call's
        # alone, so its future is awaited without a shield, which costs a loop turn on the way
        # back. A timeout fails the future, which harms no one (the receipt is still recorded
        # when it comes). This frame holds the future while it waits, and tells the node to
        # forget it if it stops waiting without its receipt (`owned`): the node holds it
        # without a weak reference.
        if timeout_s is None:
            (handle,) = self._add_outgoing([to], body, held=True, owned=True, header=None,
                                           message_id=None, stored=None)
            try:
                return await handle.receipt
            except BaseException:
                self._receipts.forget(handle.to, handle.seq)
                raise
        waiting: list[tuple[asyncio.Future[Receipt], str]] = []

        def stored(_at: int) -> None:
            # The timeout starts once the message is stored, as it always did: a
            # `ReceiptTimeout` means queued, never lost. No timer per send: one node timer
            # serves every waiting send (`Receipts.start_timeout`).
            if waiting:
                (future, message_id), = waiting
                self._receipts.start_timeout(future, message_id, to, timeout_s)

        (handle,) = self._add_outgoing([to], body, held=True, owned=True, header=None,
                                       message_id=None, stored=stored)
        future = handle.receipt
        waiting.append((future, handle.id))
        try:
            return await future
        except BaseException:
            self._receipts.forget(handle.to, handle.seq)
            raise
        finally:
            waiting.clear()
            self._receipts.stop_timeout(future)

    async def wait_receipt(self, handle: Outgoing, timeout_s: float | None) -> Receipt:
        """Wait for `handle`'s receipt; a timeout leaves the handle's future untouched."""
        return await wait_receipt(handle, timeout_s)

    async def wait_delivered(self, count: int, timeout_s: float) -> bool:
        """Wait until `stats.delivered >= count`; False on timeout."""
        return await self._receipts.wait_delivered(count, timeout_s)

    async def flush(self) -> None:
        """Wait until everything handed to the store so far is committed."""
        assert self._writer is not None
        await self._writer.flush()

    def messages(self, *, poll_s: float = MESSAGES_POLL_S) -> AsyncIterator[Message]:
        """Messages peers send this node from this call on, in the order they were stored.

        `async for msg in node.messages(): ...` Nothing is lost however slowly you read: the
        iterator reads the node's own store (each message is committed there before its
        sender gets the receipt), at most `MESSAGES_BATCH` rows at a time, so a slow reader
        holds up no one and costs no memory; a bounded queue would instead have had to stop
        the node reading from the network (and receipting) for every peer. Several readers
        each see every message. The iterator ends when the node closes; `aclose()` it (or
        leave the `async for`) to stop earlier.
        """
        return self._readers.messages(poll_s=poll_s)

    async def incoming_after(
        self, cursor: int | None, *, limit: int = MESSAGES_BATCH, wait_s: float = 0.0
    ) -> tuple[int, list[StoredMessage]]:
        """Received messages committed after `cursor` (None: after everything stored now), in
        commit order, at most `limit`; waits up to `wait_s` for a first one. Returns the
        cursor to pass next time with the rows.

        What `meshpost tail` polls through the control socket: a cursor into the store, so a
        message committed between two polls is in the next one (the event queue, which drops
        the oldest for a slow reader, would lose it).
        """
        return await self._readers.incoming_after(cursor, limit=limit, wait_s=wait_s)

    def subscribe(self) -> asyncio.Queue[NodeEvent]:
        """A queue of `NodeEvent`s from now on; slow readers lose the oldest events."""
        return self._events.subscribe()

    def unsubscribe(self, queue: asyncio.Queue[NodeEvent]) -> None:
        self._events.unsubscribe(queue)

    def peers(self) -> list[PeerStatus]:
        """Status of every peer, configured or discovered."""
        return self._links.statuses()

    def add_role_counters(self, role: str, read: Callable[[], dict[str, int]]) -> None:
        """Show `read()` as `role`'s counters in control `status` (`roles`) from now on,
        until `remove_role_counters(role)`."""
        self._role_counters[role] = read

    def remove_role_counters(self, role: str) -> None:
        self._role_counters.pop(role, None)

    def role_counters(self) -> dict[str, dict[str, int]]:
        """Each running role's counters (`add_role_counters`), read now."""
        return {role: read() for role, read in self._role_counters.items()}

    def snapshot_stats(self) -> NodeStats:
        if self._writer is not None:
            self.stats.store_errors = self._writer.errors
            self.stats.store_commits = self._writer.commits
            self.stats.store_refused = self._writer.items_failed
            self.stats.note_store_retry(self._writer.retrying)
        if self._transport is not None:
            self.stats.dropped_sends = self._transport.dropped_sends
            self.stats.inbound_refused = self._transport.inbound_refused
            self.stats.inbound_dropped = self._transport.inbound_dropped
            self.stats.denied_connections = self._transport.denied_connections
            self.stats.handshakes_failed = self._transport.handshakes_failed
            self.stats.frames_from_revoked = self._transport.frames_from_revoked
        self.stats.retransmissions = sum(link.retransmissions for link in self._links.values())
        self.stats.spurious_retransmissions = sum(
            link.spurious_retransmissions for link in self._links.values())
        return dataclasses.replace(self.stats)

    async def pending_count(self) -> int:
        """Messages in the durable outbox still waiting for a receipt (committed state).

        Counting scans the outbox, so it runs on a read-only connection of its own (WAL lets it
        run beside the writer) instead of holding up commits on the writer's thread.
        """
        return await self._readers.pending_count()

    def _check_open(self) -> None:
        if self.failure is not None:
            raise self.failure
        if self._closed or not self._started:
            raise NodeClosed(self.name)

    def _crash(self, point: CrashPoint) -> None:
        if self._crash_at is point:
            log.critical("[%s] crash hook %s: exiting now", self.name, point.value)
            os._exit(99)

    # -- outgoing path --------------------------------------------------------------------

    def _outgoing_stored(
        self, envelopes: list[Envelope], stored: Callable[[int], None] | None,
        peer: str | None, at: int,
    ) -> None:
        """`envelopes` are committed; with `peer`, all of them are for that one peer. They
        leave when the commit's callbacks are done (`Links.pump_offered`, the writer's
        `on_committed`): what all of them offered goes together, in full batch frames,
        however many `post` calls it came from (a frame per call cost both sides its
        encoding, decoding, checks and receipt), before any caller resumes."""
        if self._probe is not None:
            self._probe.mark(probes.OUTGOING_STORED)
        self.stats.sent += len(envelopes)
        if stored is not None:
            stored(at)
        if self._crash_at is not None:
            self._crash(CrashPoint.AFTER_SENDER_STORE)
        if peer is not None:
            self._links.offer(peer, envelopes)
            return
        by_peer: dict[str, list[Envelope]] = {}
        for e in envelopes:
            by_peer.setdefault(e.recipient, []).append(e)
        for peer, group in by_peer.items():
            self._links.offer(peer, group)

    # -- I/O loops ------------------------------------------------------------------------

    def poll_timers(self) -> None:
        """Give every link its timer now (retransmission, pings, liveness), as the timer loop
        does; for tests that move a fake clock and want its effects without waiting."""
        self._links.poll_timers()

    def __repr__(self) -> str:
        state = ("failed" if self.failure is not None else "closed" if self._closed
                 else "running" if self._started else "new")
        return (
            f"Node({self.name!r}, {state}, endpoints={self.endpoints}, "
            f"peers={list(self._links)})"
        )


__all__ = [
    "BroadcastHandle",
    "CrashPoint",
    "DeliveryRecorded",
    "Message",
    "MessageReceived",
    "Node",
    "NodeEvent",
    "NodeStats",
    "Outgoing",
    "PeerChange",
    "PeerChanged",
    "PeerRefused",
    "PeerStatus",
    "Receipt",
    "StoredMessage",  # what `incoming_after` returns (the store's row type)
    "wait_receipt",
]


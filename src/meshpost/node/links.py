"""A node's links to its peers: each peer's `DialerLink`, its connection and its timers.

Rule: this component owns the links (sans-IO, protocol.dialer) and performs what they decide:
it opens a link's transport connection when the link needs one (a lazy link's first message)
and closes it when the link idles, sends its frames, polls each at its deadline (one timer
heap for them all) and refills them from the outbox on disk. What a link reports goes to the
node (`_on_event`); transport, store and writer are reached through the node.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import math
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

import meshpost.probes as probes
from meshpost.config import PeerConfig
from meshpost.errors import ConfigError, StoreCorrupt, UnknownPeer
from meshpost.node.records import CrashPoint, PeerChange, PeerChanged, PeerProbe, PeerStatus
from meshpost.protocol import (
    Batch,
    Bye,
    DialerLink,
    Envelope,
    Frame,
    LinkState,
    MessagesDelivered,
    RedialWanted,
    RefuseCode,
    ViolationDetected,
    encode,
)
from meshpost.protocol.ratelimit import (
    INPUT_WARNINGS_BURST,
    INPUT_WARNINGS_PER_S,
    Allowed,
    RateLimiter,
)

if TYPE_CHECKING:
    from meshpost.node.core import Node

log = logging.getLogger(__name__)

#: The timer loop never sleeps less than this (a deadline a hair away is polled a hair late).
_MIN_TICK_S = 0.002
#: A module global: `LinkState.IDLE` is a lookup through `EnumType.__getattr__` in 3.11.
_IDLE = LinkState.IDLE


class Links(Mapping[str, DialerLink]):
    """A node's links, by peer name (a read-only mapping): `add_peer`, `connect`,
    `watch_peers`, the timer and feed loops, and what the node hands them (`offer`, a frame
    from the peer, a peer that left or dialed us)."""

    def __init__(self, node: Node) -> None:
        self._node = node
        self._links: dict[str, DialerLink] = {}
        #: Every peer's endpoint and how it was found ("config" or "beacon").
        self._found: dict[str, tuple[str, str]] = {}
        #: Peers whose link holds a connection (a transport socket); an idle link has none.
        self._connected: set[str] = set()
        #: Links watched by something above them (work-queue workers): kept open and pinged.
        self._watched: set[str] = set()
        #: One event per `probe` waiting: every frame a peer sends on our links sets them all.
        self._probes: set[asyncio.Event] = set()
        #: The timer loop's agenda: each link's next deadline (`DialerLink.next_timer`) as
        #: scheduled, and a heap of (deadline, peer) holding them (and stale ones, skipped).
        self._due: dict[str, float] = {}
        self._timer_heap: list[tuple[float, str]] = []
        self._timer_wake_at = math.inf
        self._timer_wakeup = asyncio.Event()
        #: Links that committed messages were offered to since the last pump (an ordered set).
        self._links_to_pump: dict[str, DialerLink] = {}
        self._feed_wakeup = asyncio.Event()
        #: Undecodable answers are logged at the rate the listener's bad input is (Inbound),
        #: per peer: each is counted (`undecodable`), a flood is not one line a frame.
        self._bad_frame_warnings = RateLimiter(rate_per_s=INPUT_WARNINGS_PER_S,
                                               burst=INPUT_WARNINGS_BURST)

    # -- the mapping: peer name -> its link ----------------------------------------------

    def __getitem__(self, peer: str) -> DialerLink:
        return self._links[peer]

    def __iter__(self) -> Iterator[str]:
        return iter(self._links)

    def __len__(self) -> int:
        return len(self._links)

    def __contains__(self, peer: object) -> bool:
        return peer in self._links

    def __repr__(self) -> str:
        return (f"Links({self._node.name!r}, peers={list(self._links)}, "
                f"connected={sorted(self._connected)})")

    # -- lifecycle -----------------------------------------------------------------------

    def add_configured(self) -> None:
        """At start: a link to each configured peer."""
        cfg = self._node.config
        # A small mesh dials every peer at once (who is up shows at start); a big one
        # opens each link on its first message (docs/protocol.md 2.1).
        lazy = len(cfg.peers) > cfg.dial_at_start
        for peer in cfg.peers:
            self._new_link(peer.name, peer.endpoint, "config", lazy=lazy)

    def wake_feeder(self) -> None:
        """Have the feed loop look at every link's disk request again."""
        self._feed_wakeup.set()

    def _new_link(self, peer: str, endpoint: str, found: str, *, lazy: bool) -> None:
        node = self._node
        assert node._store is not None
        assert node._listener is not None
        cfg = node.config
        self._links[peer] = link = DialerLink(
            local_name=cfg.name,
            local_node_id=node._store.node_id,
            peer=peer,
            window=cfg.window,
            window_bytes=cfg.window_bytes,
            retransmit_initial_s=cfg.retransmit_initial_s,
            retransmit_max_s=cfg.retransmit_max_s,
            ping_interval_s=cfg.ping_interval_s,
            peer_timeout_s=cfg.peer_timeout_s,
            max_frame_bytes=node._listener.max_frame_bytes,
            link_idle_s=cfg.link_idle_s,
            lazy=lazy,
            # A small mesh (links dialed at start) watches a link for as long as it is open,
            # so a crashed peer shows as lost; a big one only while the link is in use.
            recent_s=None if lazy else math.inf,
            now=node.clock.monotonic(),
        )
        self._found[peer] = (endpoint, found)
        self._perform(link)  # a link dialed at once gets its socket and its first timer

    def add_peer(self, name: str, endpoint: str, *, node_id: str | None = None,
                 found: str = "beacon") -> bool:
        node = self._node
        node._check_open()
        PeerConfig(name, endpoint)  # validates both
        if name == node.name:
            raise ConfigError(f"{name!r} is this node's own name")
        if node.config.exclusive is not None and name != node.config.exclusive:
            return False  # one end of an exclusive pair talks to no one else
        transport, listener = node._transport, node._listener
        assert transport is not None
        assert listener is not None
        if name in self._links:
            # Known already (configured, or found before): nothing changes, its node id
            # least of all. Pinned here, one beacon naming a configured peer with a made-up
            # node id had that peer's own Hellos refused as a name clash.
            return False
        if node_id is not None:
            listener.expected_node_ids[name] = node_id
        self._new_link(name, endpoint, found,
                       lazy=len(self._links) >= node.config.dial_at_start)
        listener.known_peers = listener.known_peers | {name}
        self._feed_wakeup.set()
        log.info("[%s] %s joined (%s, %s)", node.name, name, found, endpoint)
        node._publish(PeerChanged(name, False, PeerChange.JOINED, f"via {found} at {endpoint}"))
        return True

    def move_peer(self, name: str, endpoint: str) -> bool:
        node = self._node
        node._check_open()
        known = self._found.get(name)
        if known is None or known[1] != "beacon" or known[0] == endpoint:
            return False
        PeerConfig(name, endpoint)  # validates it
        self._found[name] = (endpoint, known[1])
        transport = node._transport
        if transport is not None and name in self._connected:
            # A new connection there: the link's next Hello goes on it (its session, if it
            # thought it had one, is refused there as unknown and said again).
            transport.drop_peer(name)
            transport.add_peer(name, endpoint)
        log.info("[%s] %s moved: %s -> %s", node.name, name, known[0], endpoint)
        return True

    def connect(self, *peers: str) -> None:
        node = self._node
        node._check_open()
        for name in peers:
            if name not in self._links:
                raise UnknownPeer(name, sorted(self._links))
        now = node.clock.monotonic()
        for name in peers or list(self._links):
            link = self._links[name]
            link.open(now)
            self._perform(link)

    async def probe(self, *peers: str, wait_s: float) -> list[PeerProbe]:
        """`Node.probe_peers`: each link asked at once (`DialerLink.probe`); what each did
        within `wait_s` (event-loop time)."""
        node = self._node
        node._check_open()
        for name in peers:
            if name not in self._links:
                raise UnknownPeer(name, sorted(self._links))
        names = list(peers) or list(self._links)
        now = node.clock.monotonic()
        # What each link had heard before: a probe counts only what comes after it.
        before = {n: (self._links[n].frames_heard, self._links[n].answers) for n in names}
        for name in names:
            link = self._links[name]
            link.probe(now)
            self._perform(link)

        def outcome(name: str) -> str | None:
            link, (heard, answers) = self._links[name], before[name]
            if link.answers > answers:  # a Welcome or a Pong since: alive, whatever came after
                return "live"
            return ("refused" if link.frames_heard > heard and link.state is LinkState.REFUSED
                    else None)

        frame_back = asyncio.Event()
        self._probes.add(frame_back)
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait_s):
                    while any(outcome(n) is None for n in names):
                        frame_back.clear()
                        await frame_back.wait()
        finally:
            self._probes.discard(frame_back)
        result = []
        for name in names:
            link, (heard, answers) = self._links[name], before[name]
            found = outcome(name)
            if found is None:  # heard but not answered (a Welcome to a retried Hello), or not
                found = "live" if link.frames_heard > heard and link.reachable else "lost"
            rtt = link.last_answer_rtt_s if link.answers > answers else None
            result.append(PeerProbe(
                name=name, result=found, rtt_ns=None if rtt is None else round(rtt * 1e9),
                state=link.state.value,
                detail=link.refusal if found == "refused" else
                (f"no answer within {wait_s:g}s" if found == "lost" else None)))
        return result

    @property
    def next_timer(self) -> float:
        return min(self._due.values(), default=math.inf)

    def watch_peers(self, names: set[str]) -> None:
        node = self._node
        if names == self._watched:
            return
        now = node.clock.monotonic()
        for name in names ^ self._watched:
            link = self._links.get(name)
            if link is None:
                continue
            link.watched = name in names
            if link.watched:
                link.open(now)
            self._perform(link)
        self._watched = set(names)

    def peer_dialed_us(self, peer: str | None) -> None:
        """`peer` opened a session with us (a Hello we welcomed). In a small mesh, whose links
        are dialed at start, our idle link to it dials back, so a peer that returns after its
        link to us idled out (a restart, a first message) shows up as connected again. A big
        mesh does not: answering n peers' Hellos with n connections is what lazy links avoid.
        (The name is the peer's word; the worst it can do is have us dial that name's
        configured endpoint once.)"""
        node = self._node
        link = self._links.get(peer) if peer is not None else None
        if link is None or link.needs_connection or len(self._links) > node.config.dial_at_start:
            return
        link.open(node.clock.monotonic())
        self._perform(link)

    def peer_heard(self, name: str) -> None:
        node = self._node
        link = self._links.get(name)
        if link is None or not (link.refusal or "").startswith(RefuseCode.UNKNOWN_PEER):
            return
        now = node.clock.monotonic()
        link.retry_soon(now)
        link.poll(now, node.clock.wall_ns(), node.hlc.now())
        self._perform(link)

    def say_goodbye(self) -> None:
        """Tell every reachable peer we are leaving, so it shows us gone now rather than after
        `peer_timeout_s` of silence. (The sockets' LINGER lets these frames leave.)"""
        node = self._node
        transport = node._transport
        if transport is None:
            return
        bye = encode(Bye("shutting down"))
        for peer, link in self._links.items():
            if link.reachable:
                transport.send_to_peer(peer, bye)

    def statuses(self) -> list[PeerStatus]:
        node = self._node
        now = node.clock.monotonic()
        wall = node.clock.wall_ns()
        result = []
        for name, (endpoint, found) in self._found.items():
            link = self._links.get(name)
            if link is None:
                continue
            last_seen = None
            if link.last_heard is not None:
                last_seen = wall - int((now - link.last_heard) * 1e9)
            result.append(
                PeerStatus(
                    name=name,
                    endpoint=endpoint,
                    connected=link.reachable,
                    state=link.state.value,
                    last_seen_ns=last_seen,
                    rtt_ns=link.offset.rtt_ns,
                    offset_ns=link.offset.offset_ns,
                    unacknowledged=link.unacknowledged,
                    refusal=link.refusal or self._handshake_failure(name),
                    found=found,
                )
            )
        return result

    def _handshake_failure(self, peer: str) -> str | None:
        node = self._node
        transport = node._transport
        return transport.handshake_failure(peer) if transport is not None else None

    # -- what the node hands the links ---------------------------------------------------

    def offer(self, peer: str, envelopes: list[Envelope]) -> None:
        """Committed `envelopes` for `peer`: its link takes them, and they leave with the
        others offered before the commit's callbacks are done (`pump_offered`)."""
        link = self._links[peer]
        link.offer(envelopes)
        self._links_to_pump[peer] = link

    def on_peer_frame(self, peer: str, data: bytes) -> None:
        """A frame a peer sent back on our link to it (called from the transport)."""
        node = self._node
        probe = node._probe
        if probe is not None:
            probe.mark(probes.PEER_FRAME)
        link, clock = self._links[peer], node.clock
        if probe is not None:
            probe.mark(probes.DIALER_RECEIVE[0])
        link.receive(data, clock.monotonic(), clock.wall_ns(), node.hlc.last)
        if probe is not None:
            probe.mark(probes.DIALER_RECEIVE[1])
        self._perform(link)
        if self._probes:  # a `probe` waits for answers
            for frame_back in self._probes:
                frame_back.set()

    def peer_left(self, peer: str, reason: str) -> None:
        """`peer` said it is shutting down (its Bye reached our listener): our link to it
        counts it gone now."""
        link = self._links[peer]
        link.peer_left(self._node.clock.monotonic(), reason)
        self._perform(link)

    def pump_offered(self) -> None:
        """Send what the links were offered since the last pump (after each commit)."""
        node = self._node
        if not self._links_to_pump:
            return
        links, self._links_to_pump = self._links_to_pump, {}
        now, wall = node.clock.monotonic(), node.clock.wall_ns()
        for link in links.values():
            link.pump(now, wall)
            self._perform(link)

    async def run_feeder(self) -> None:
        """Read from the outbox on disk what links ask for (`DialerLink.disk_request`)."""
        node = self._node
        assert node._writer is not None
        assert node._store is not None
        writer, store = node._writer, node._store
        while True:
            await self._feed_wakeup.wait()
            self._feed_wakeup.clear()
            # A copy: discovery may add a link while this loop awaits the store.
            for peer, link in list(self._links.items()):
                request = link.disk_request()
                if request is None:
                    continue
                after_seq, limit = request
                try:
                    rows = await writer.call(store.load_pending, peer, after_seq, limit)
                except StoreCorrupt as exc:  # a rotted row is never (re)transmitted
                    writer.fail(exc)
                    return
                link.refill(rows)
                link.pump(node.clock.monotonic(), node.clock.wall_ns())
                self._perform(link)

    # -- the timer loop -------------------------------------------------------------------

    def poll_timers(self) -> None:
        node = self._node
        now, wall, hlc = node.clock.monotonic(), node.clock.wall_ns(), node.hlc.now()
        for link in self._links.values():
            link.poll(now, wall, hlc)
            self._due.pop(link.peer, None)  # polled: its agenda entry is replaced, not kept
            self._perform(link)

    async def run_timers(self) -> None:
        """The node's timer task: each link polled at its deadline."""
        # Polls only the links whose deadline is due, and sleeps until the next deadline
        # however far: no periodic scan, so a node whose links are quiet wakes for nothing.
        # Every input that may move a deadline earlier goes through `_perform`, which
        # reschedules the link (`_schedule`) and wakes this loop if needed.
        node = self._node
        clock, heap, due = node.clock, self._timer_heap, self._due
        wakeup = self._timer_wakeup
        while True:
            now = clock.monotonic()
            if heap and heap[0][0] <= now:
                wall, hlc = clock.wall_ns(), node.hlc.now()
                while heap and heap[0][0] <= now:
                    deadline, name = heapq.heappop(heap)
                    if due.get(name) != deadline:
                        continue  # superseded by an earlier entry, already polled
                    del due[name]
                    link = self._links.get(name)
                    if link is not None:
                        link.poll(now, wall, hlc)
                        self._perform(link)
            wakeup.clear()
            self._timer_wake_at = wake_at = heap[0][0] if heap else math.inf
            # (A deadline already due again cannot come from polling: a link's poll at its
            # deadline moves it. The floor only bounds the loop if that ever broke.)
            timeout = None if wake_at == math.inf else max(wake_at - now, _MIN_TICK_S)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await wakeup.wait()

    # -- performing what a link decided ---------------------------------------------------

    def _perform(self, link: DialerLink) -> None:
        frames, events = link.output()
        peer = link.peer
        # `link.needs_connection`, inline (a property call, twice a single send; a test pins
        # that it is this).
        needs = link.state is not _IDLE
        if needs and peer not in self._connected:
            self._set_connection(peer, True)
        # (`in map(type, ...)`: the test in C, no generator per frame in or out.)
        elif events and peer in self._connected and RedialWanted in map(type, events):
            # Still lost a peer timeout after its loss, its Hellos unanswered: the connection
            # is dead or half-open. A new one, before this poll's Hello goes, on it. (Not at
            # the loss itself: a peer merely stopped reads the old one, and the frames still
            # queued on it, once it runs.)
            transport = self._node._transport
            if transport is not None:
                transport.redial(peer)
        if frames:
            self._transmit(peer, frames)
        if not needs and peer in self._connected:
            self._set_connection(peer, False)  # after its Close: the socket lingers for it
        self._schedule(link)
        for event in events:
            if type(event) is MessagesDelivered:
                # Nearly every event a link reports (one per receipt): to the receipts
                # without `Events.on_event`'s dispatch, a frame less (it does the same).
                self._node._receipts.record_delivery(event)
            elif isinstance(event, ViolationDetected):  # the peer's answer did not decode
                self._node.stats.undecodable += 1
                self._warn_bad_frame(link.peer, event)
            elif type(event) is not RedialWanted:  # (performed above)
                self._node._on_event(event)
        if link.wants_disk:
            self._feed_wakeup.set()

    def _warn_bad_frame(self, peer: str, event: ViolationDetected) -> None:
        node = self._node
        decision = self._bad_frame_warnings.check(peer, node.clock.monotonic())
        if isinstance(decision, Allowed):
            log.warning("[%s] bad frame from %s: %s", node.name, peer, event.error)
        elif decision.burst_started:
            log.warning("[%s] bad frames from %s come faster than %d warnings at once and %g "
                        "a second: each is counted (`undecodable`), and logged at that rate "
                        "until they slow down", node.name, peer, INPUT_WARNINGS_BURST,
                        INPUT_WARNINGS_PER_S)

    def _set_connection(self, peer: str, connect: bool) -> None:
        """Open (a lazy link's first message, a reopened idle link) or close (an idle link)
        the transport's socket to `peer`."""
        node = self._node
        transport = node._transport
        if transport is None:
            return
        if connect:
            transport.add_peer(peer, self._found[peer][0])
            self._connected.add(peer)
            log.debug("[%s] link to %s opened", node.name, peer)
        else:
            transport.drop_peer(peer)
            self._connected.discard(peer)
            log.info("[%s] link to %s idle: connection closed", node.name, peer)

    def _schedule(self, link: DialerLink) -> None:
        """Put `link`'s next deadline on the timer loop's agenda, waking the loop if it is
        earlier than its sleep. A later deadline leaves the earlier entry: polling early is
        harmless and reschedules (so a busy link does not push an entry per receipt)."""
        deadline = link.next_timer()
        peer = link.peer
        if deadline == math.inf:
            self._due.pop(peer, None)  # nothing to time: its heap entries are stale now
            return
        scheduled = self._due.get(peer)
        if scheduled is not None and scheduled <= deadline:
            return
        self._due[peer] = deadline
        heapq.heappush(self._timer_heap, (deadline, peer))
        if deadline < self._timer_wake_at:
            self._timer_wake_at = deadline
            self._timer_wakeup.set()

    def _transmit(self, peer: str, frames: list[Frame]) -> None:
        node = self._node
        transport = node._transport
        if transport is None:
            return
        for frame in frames:
            if not transport.send_to_peer(peer, encode(frame)) and type(frame) is Batch:
                self._links[peer].batch_dropped(frame)  # a later Pong proves nothing of it
        if node._crash_at is not None:  # a test's crash hook
            node._crash(CrashPoint.AFTER_TRANSMIT)


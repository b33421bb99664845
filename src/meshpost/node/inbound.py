"""A node's inbound path: what happens to the frames peers send to our ROUTER.

Rule: this component hands each frame to the node's `Listener` (sans-IO) and performs what it
decides: its answers go back on the connection the frame came on, arrived messages go to the
writer, and only once they are committed do their receipts leave, readers wake, subscribers
hear of them and each fresh message with a pattern header reaches the component of its kind.
Listener, transport, writer and the other components are reached through the node.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import operator
from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING

import meshpost.probes as probes
from meshpost.clock import HLC_MAX_FORWARD_DRIFT_MS
from meshpost.errors import ProtocolError
from meshpost.node.records import CrashPoint, MessageReceived, PeerRefused
from meshpost.protocol import (
    Envelope,
    Hello,
    MessagesArrived,
    PeerLeft,
    Refuse,
    RefuseCode,
    Welcome,
    decode,
    encode,
)
from meshpost.protocol.header import Kind
from meshpost.transport.routing_ids import connection_label

if TYPE_CHECKING:
    from meshpost.node.core import Node
    from meshpost.store import IncomingResult

log = logging.getLogger(__name__)

#: A connection we refuse is told to subscribers at most this often per routing id: a refused
#: dialer asks again every 10 s, and a peer's Hellos must not cost the console a line each.
REFUSAL_NOTICE_INTERVAL_S = 60.0
#: Routing ids whose last refusal notice is remembered (bounded: ids are the peer's choice).
REFUSAL_NOTICE_MEMORY = 256

_HEADER = operator.attrgetter("header")


def _fresh(messages: list[Envelope], result: IncomingResult) -> list[Envelope]:
    """The messages of a stored batch that its commit stored first, in arrival order: not
    retransmissions, not the later copies of a message the batch repeats.

    The result's lists hold one seq per copy: of the copies carrying a seq, as many are fresh
    as it is committed and not a duplicate, the first ones (the store's rule: a message is new
    in its first copy). Only a batch that reuses one seq for two different messages (which
    no dialer sends: its receipt could settle only one of them) can make this ambiguous."""
    if not (result.duplicates or result.conflicts or result.refused):
        return messages  # every copy committed, none a duplicate: the usual batch
    left = Counter(result.committed)
    left.subtract(result.duplicates)
    fresh: list[Envelope] = []
    for m in messages:
        if left[m.seq] > 0:
            left[m.seq] -= 1
            fresh.append(m)
    return fresh


class Inbound:
    """A node's inbound path: `on_frame` (the transport's callback for each frame sent to our
    ROUTER), the storing of arrived messages and, once committed, their receipts and what
    else follows (readers, subscribers, the patterns' components)."""

    def __init__(self, node: Node) -> None:
        self._node = node
        #: The last refusal notice's monotonic time, by the name the refused one claimed.
        self._refusal_notices: dict[str, float] = {}

    def __repr__(self) -> str:
        return f"Inbound({self._node.name!r}, refusals noticed={len(self._refusal_notices)})"

    # -- a frame arrives ------------------------------------------------------------------

    def on_frame(self, identity: bytes, data: bytes, user_id: str | None) -> None:
        """A frame sent to our ROUTER (called from the transport)."""
        node = self._node
        if node._probe is not None:
            node._probe.mark(probes.INBOUND_FRAME)
        transport, listener, writer = node._transport, node._listener, node._writer
        assert transport is not None
        assert listener is not None
        assert writer is not None
        # The transport calls `on_drained` (the writer's `submit_now`) after this frame and
        # the others of its drain: what they add commits then, with no submit of its own.
        writer.hold_submits()
        # The routing id names the connection (our ROUTER chose it); who is behind it is what
        # its Hello said, and under --secure only the CURVE key's name may be said.
        who = identity.hex()
        authenticated = (user_id or "") if transport.secure else None
        probe = node._probe
        if probe is not None:
            probe.mark(probes.LISTENER_RECEIVE[0])
        listener.receive(who, data, node.clock.wall_ns(), node.hlc.last, authenticated)
        if probe is not None:
            probe.mark(probes.LISTENER_RECEIVE[1])
        frames, events = listener.output()
        for _to, frame in frames:  # all for this connection
            transport.reply(identity, encode(frame))
            if type(frame) is Refuse and frame.code != RefuseCode.HELLO_REQUIRED:
                self._notice_refusal(self._claimed_name(data, who), frame)
            elif type(frame) is Welcome:
                node._links.peer_dialed_us(listener.session_peer(who))
        for event in events:
            match event:
                case MessagesArrived():
                    self._store_incoming(identity, event)
                case PeerLeft(peer=peer, reason=reason) if peer in node._links:
                    node._links.peer_left(peer, reason)
                case _:
                    node._on_event(event)
        if not writer.has_room and not transport.inbound_paused:
            # Back-pressure: stop reading until the store catches up; ZeroMQ holds the rest,
            # as much as the senders' windows let them send (no receive high-water mark).
            transport.pause_inbound()
            node._tasks.append(asyncio.create_task(self._resume_when_room(),
                                                   name=f"{node.name}-inbound-room"))

    def _claimed_name(self, data: bytes, connection: str) -> str:
        """The name a refused frame's Hello claimed (unproven, for the notice), else the
        connection's label. Refusals are rare: decoding the frame again costs nothing."""
        assert self._node._listener is not None
        with contextlib.suppress(ProtocolError):
            frame = decode(data, max_bytes=self._node._listener.max_frame_bytes)
            if isinstance(frame, Hello):
                return frame.name
        return connection_label(connection)  # (a routing id never goes into the log)

    def _notice_refusal(self, who: str, frame: Refuse) -> None:
        """Tell subscribers whom we refused and why, once per REFUSAL_NOTICE_INTERVAL_S."""
        node = self._node
        now = node.clock.monotonic()
        last = self._refusal_notices.get(who)
        if last is not None and now - last < REFUSAL_NOTICE_INTERVAL_S:
            return
        if last is None and len(self._refusal_notices) >= REFUSAL_NOTICE_MEMORY:
            self._refusal_notices.pop(next(iter(self._refusal_notices)))
        self._refusal_notices[who] = now
        log.warning("[%s] refused a connection from %r (%s): %s", node.name, who, frame.code,
                    frame.detail)
        node._publish(PeerRefused(who, frame.code, frame.detail))

    async def _resume_when_room(self) -> None:
        node = self._node
        assert node._writer is not None
        await node._writer.wait_for_room()
        if node._transport is not None:
            node._transport.resume_inbound()
        with contextlib.suppress(ValueError):
            task = asyncio.current_task()
            if task is not None:
                node._tasks.remove(task)

    # -- arrived messages: stored, then receipted ------------------------------------------

    def _store_incoming(self, identity: bytes, arrived: MessagesArrived) -> None:
        node = self._node
        assert node._writer is not None
        hlc = node.hlc
        rejected = hlc.rejected
        messages = arrived.messages
        # One message (a single send) without a list and a max() (3,000 instructions); more:
        # a list, cheaper than a generator.
        hlc.observe(messages[0].hlc if len(messages) == 1 else max([m.hlc for m in messages]))
        if hlc.rejected != rejected:
            node.stats.hlc_rejected += 1
            if node.stats.hlc_rejected % 1000 == 1:  # a flood must not flood the log
                log.warning("[%s] %s sent a stamp beyond our wall clock + %d s; not merged "
                            "(%d so far)", node.name, arrived.peer,
                            HLC_MAX_FORWARD_DRIFT_MS // 1000, node.stats.hlc_rejected)
        # (A partial, not a closure: one Python frame less when the commit calls it.)
        node._writer.add_incoming(messages,
                                  functools.partial(self._incoming_stored, identity, arrived))

    def _incoming_stored(
        self, identity: bytes, arrived: MessagesArrived, result: IncomingResult, stored_at: int
    ) -> None:
        node = self._node
        probe = node._probe
        if probe is not None:
            probe.mark(probes.INCOMING_STORED)
        crash_at = node._crash_at  # a test's crash hook; None in use
        if crash_at is not None:
            node._crash(CrashPoint.AFTER_RECEIVER_COMMIT)
        listener, transport = node._listener, node._transport
        if listener is None or transport is None:
            return
        new = len(result.committed) - len(result.duplicates)
        node.stats.duplicates += len(result.duplicates)
        if result.conflicts:
            node.stats.conflicts += len(result.conflicts)
            log.warning("[%s] %d message(s) from %s reuse a stored id with other content",
                        node.name, len(result.conflicts), arrived.peer)
        if probe is not None:
            probe.mark(probes.LISTENER_STORED[0])
        listener.stored(
            arrived,
            committed=result.committed,
            conflicts=result.conflicts,
            refused=result.refusals() if result.refused else [],
            stored_at_ns=stored_at,
            replied_at_ns=node.clock.wall_ns(),
            hlc=node.hlc.now(),
        )
        if probe is not None:
            probe.mark(probes.LISTENER_STORED[1])
        if crash_at is not None:
            node._crash(CrashPoint.BEFORE_ACK_SEND)
        # Queued for `arrived.connection`, the connection the batch came on: `identity`.
        # (No list of them first: a comprehension is a call in 3.11.)
        for _to, frame in listener.frames_to_send():
            transport.reply(identity, encode(frame))
        node.stats.received += new
        if new and node._message_readers:
            for wakeup in node._message_readers:
                wakeup.set()
        # A retransmission is receipted again but was acted on when it first arrived.
        messages = arrived.messages
        patterns = bool(new) and (
            node._requests.handler is not None
            # (One message: its header read, not any(map(...)), 1,500 instructions.)
            or (messages[0].header is not None if len(messages) == 1
                else any(map(_HEADER, messages))))
        if not (node._subscribers or patterns):
            return  # the bulk path: no set of fresh seqs to build
        fresh = _fresh(arrived.messages, result)
        if node._subscribers:
            for m in fresh:
                node._publish(MessageReceived(m, stored_at))
        if patterns:
            self._on_patterns(fresh, stored_at)

    def _on_patterns(self, messages: Iterable[Envelope], stored_at: int) -> None:
        """Fresh (first stored) messages, each to the component its kind belongs to:
        requests, replies and plain messages (an echo) to `_requests`, tasks, results,
        `done` and `serve` records to `_queues`, `member` records to `_groups`."""
        node = self._node
        for m in messages:
            h = m.header
            if h is None or h.kind in (Kind.REQUEST, Kind.GROUP, Kind.REPLY):
                node._requests.on_stored(m, stored_at)
            elif h.kind is Kind.MEMBER:
                node._groups.merge_member(m.sender, m)
            else:
                node._queues.on_stored(m)

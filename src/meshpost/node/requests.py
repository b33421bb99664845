"""Request/reply: requests this node sent and their callers, and the handler that answers.

Rule: this component owns the request tracker (sans-IO, protocol.requests), the callers
waiting on it and the request handler; it stores and posts only through its node.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from typing import TYPE_CHECKING

import meshpost.rules as rules
from meshpost.errors import InvalidMessage, MeshpostError, NodeClosed, RequestTimeout
from meshpost.node.records import (
    FetchedMessage,
    GroupHistory,
    Message,
    Outgoing,
    Reply,
    RequestHandler,
    _message_of,
)
from meshpost.protocol import Envelope
from meshpost.protocol.header import Kind, PatternHeader, is_valid_name, reply_id
from meshpost.protocol.history import (
    HISTORY_REQUESTS_BURST,
    HISTORY_REQUESTS_PER_S,
    MAX_HISTORY_ITEMS,
    HistoryItem,
    HistoryQuery,
    HistoryRefused,
    HistoryReplyInvalid,
    decode_query,
    decode_reply,
    encode_query,
    encode_refusal,
    encode_reply,
    history_group,
    history_header,
)
from meshpost.protocol.ratelimit import RateLimiter, Refused
from meshpost.protocol.requests import (
    PendingRequest,
    ReplyUnmatched,
    RequestAnswered,
    RequestTimedOut,
    RequestTracker,
)

if TYPE_CHECKING:
    from collections.abc import Iterable

    from meshpost.node.core import Node

log = logging.getLogger(__name__)

#: How many unanswered requests from before a restart are read per batch (handler re-runs).
UNANSWERED_BATCH = 500


class Requests:
    """A node's requests (`request`, `reply`) and its answering of peers' (`on_request`)."""

    def __init__(self, node: Node) -> None:
        self._node = node
        # What became of our requests, the callers waiting on them, and the handler that
        # answers peers' requests (docs/protocol.md "Patterns").
        self.tracker = RequestTracker()
        self._waiters: dict[str, asyncio.Future[Reply]] = {}
        self._timeouts: dict[str, float] = {}
        self.handler: RequestHandler | None = None
        self._answers_direct = False
        self._replying: set[str] = set()
        #: How often each peer may have a history request answered (19.6.1).
        self.history_limit = RateLimiter(rate_per_s=HISTORY_REQUESTS_PER_S,
                                         burst=HISTORY_REQUESTS_BURST)

    def restore(self, pending: Iterable[PendingRequest]) -> None:
        """At start: requests sent before a restart wait (without a caller) for late replies."""
        self.tracker = RequestTracker.restore(pending)

    def close(self) -> None:
        """The node closed: every caller still waiting hears it."""
        for waiter in self._waiters.values():
            if not waiter.done():
                waiter.set_exception(NodeClosed(self._node.name))
                waiter.exception()
        self._waiters.clear()

    async def request(self, peer: str, body: str, *, timeout_s: float | None = None,
                      header: PatternHeader | None = None) -> Reply:
        node = self._node
        node._check_open()
        rules.resolve_peer(peer, peers=node.config.peer_names)
        loop = asyncio.get_running_loop()
        # The id is chosen first so that the tracker knows the request before any reply
        # to it can arrive.
        request_id = node._new_id(node.clock.wall_ns())
        start = node.clock.monotonic()
        self.tracker.sent(request_id, peer, start, timeout_s)
        waiter: asyncio.Future[Reply] = loop.create_future()
        self._waiters[request_id] = waiter
        if timeout_s is not None:
            self._timeouts[request_id] = timeout_s
        try:
            (handle,) = await node._post(peer, body, held=True,
                                         header=header or PatternHeader(Kind.REQUEST),
                                         message_id=request_id)
        except BaseException:
            self._waiters.pop(request_id, None)
            # Nothing was stored: forget it (expire it now; its event goes nowhere).
            self.tracker.on_timer(float("inf"))
            self._drain()
            raise
        handle.receipt.add_done_callback(
            lambda f: None if f.cancelled() or f.exception() is not None
            else self.tracker.delivered(request_id))
        try:
            async with asyncio.timeout(timeout_s):
                return await asyncio.shield(waiter)
        except TimeoutError:
            if waiter.done():
                return waiter.result()
            assert timeout_s is not None
            self.tracker.on_timer(start + timeout_s)
            self._drain()
            return waiter.result()  # raises the RequestTimeout the tracker decided
        finally:
            self._waiters.pop(request_id, None)
            self._timeouts.pop(request_id, None)

    async def reply(self, msg: Message, body: str) -> Outgoing | None:
        node = self._node
        node._check_open()
        rid = reply_id(msg.id)
        if rid in self._replying:
            return None
        self._replying.add(rid)
        try:
            writer, store = node._writer, node._store
            assert writer is not None
            assert store is not None
            if await writer.call(store.has_outgoing, rid, node.name):
                return None
            (handle,) = await node._post(msg.sender, body, held=False,
                                         header=PatternHeader(Kind.REPLY, msg.id),
                                         message_id=rid)
            return handle
        finally:
            self._replying.discard(rid)

    def on_request(self, handler: RequestHandler, *, direct: bool = False) -> None:
        node = self._node
        node._check_open()
        self.handler = handler
        self._answers_direct = direct
        node._spawn_handler(self._answer_unanswered(), "unanswered")

    def start(self) -> None:
        """At start: history requests stored but unanswered before a restart are answered
        (the node answers them itself, with or without a request handler)."""
        self._node._spawn_handler(self._answer_unanswered(history_only=True), "history")

    async def _answer_unanswered(self, *, history_only: bool = False) -> None:
        node = self._node
        writer, store = node._writer, node._store
        assert writer is not None
        assert store is not None
        seen: set[str] = set()
        while True:
            envelopes = await writer.call(store.unanswered_incoming_requests, UNANSWERED_BATCH,
                                          history_only)
            envelopes = [e for e in envelopes if e.id not in seen]
            if not envelopes:
                return
            for e in envelopes:
                seen.add(e.id)
                if history_group(e.header) is not None:
                    await self._answer_history(e, node.clock.wall_ns())
                elif self.handler is not None:
                    await self._run_handler(_message_of(e, node.clock.wall_ns()))

    async def _run_handler(self, msg: Message) -> None:
        handler = self.handler
        if handler is None:
            return
        node = self._node
        try:
            result = handler(msg)
            if inspect.isawaitable(result):
                result = await result
            if result is not None:
                await node.reply(msg, str(result))
        except MeshpostError as exc:
            if not node._closed:
                log.warning("[%s] could not answer %s from %s: %s", node.name, msg.id,
                            msg.sender, exc)
        except Exception:
            node.stats.handler_errors += 1
            log.exception("[%s] request handler failed on %s from %s", node.name, msg.id,
                          msg.sender)

    def on_stored(self, m: Envelope, stored_at: int) -> None:
        """A fresh message with no header, or a request, a group copy or a reply: answer it
        (requests; plain messages and group copies too for an echo), or link the reply."""
        h = m.header
        if history_group(h) is not None:
            # Answered by the node itself, never by the application's handler.
            self._node._spawn_handler(self._answer_history(m, stored_at), "history")
            return
        if h is not None and h.kind is Kind.REPLY:
            self.tracker.answered(h.ref, m.id, m.sender)
            self._drain(m, stored_at)
            return
        # A copy of a message to all or a group is a plain message to this node too:
        # an echo answers it as it answers a direct one.
        direct = h is None or h.kind is Kind.GROUP
        if self.handler is not None and (not direct or self._answers_direct):
            self._node._spawn_handler(self._run_handler(_message_of(m, stored_at)), "run")

    async def _answer_history(self, m: Envelope, stored_at: int) -> None:
        """Answer a history request with this node's OWN messages to the group, bounded by the
        query and the message size; with none when this node or the asker is not a member
        now (nothing leaks to non-members), or the query is unreadable; with a refusal when
        the asker is over its rate (no store query: a flood costs the flooder only)."""
        node = self._node
        group = history_group(m.header)
        assert group is not None
        decision = self.history_limit.check(m.sender, node.clock.monotonic())
        if isinstance(decision, Refused):
            node.stats.history_requests_refused += 1
            if decision.burst_started:  # once per burst: a flood must not flood the log
                log.warning("[%s] %s asks for group history faster than %d at once and one "
                            "per %.0f s: refusing its requests until it slows down (%d "
                            "refused so far)", node.name, m.sender, HISTORY_REQUESTS_BURST,
                            1 / HISTORY_REQUESTS_PER_S, node.stats.history_requests_refused)
            await self._send_history_reply(m, stored_at, encode_refusal(decision.retry_after_s))
            return
        query = decode_query(m.body)
        members = node.members(group)
        items: list[HistoryItem] = []
        if query is None:
            node.stats.history_requests_invalid += 1
            log.warning("[%s] history request %s from %s has an unreadable query: answered "
                        "with nothing", node.name, m.id, m.sender)
        elif node.name in members and m.sender in members:
            writer, store = node._writer, node._store
            assert writer is not None
            assert store is not None
            rows = await writer.call(store.own_group_messages, node.name, group, query.limit,
                                     query.before_hlc)
            items = [HistoryItem(*row) for row in rows]
        limit = query.limit if query is not None else 0
        body = encode_reply(items, limit=limit, max_bytes=node.config.max_message_bytes)
        await self._send_history_reply(m, stored_at, body)

    async def _send_history_reply(self, m: Envelope, stored_at: int, body: str) -> None:
        node = self._node
        try:
            await self.reply(_message_of(m, stored_at), body)
        except MeshpostError as exc:
            if not node._closed:
                log.warning("[%s] could not answer history request %s from %s: %s",
                            node.name, m.id, m.sender, exc)

    async def fetch_group_history(self, group: str, *, limit: int, before_hlc: int,
                                  timeout_s: float | None) -> GroupHistory:
        node = self._node
        node._check_open()
        if not is_valid_name(group) or group == "all":
            raise InvalidMessage(f"history is fetched from a named group, not {group!r}")
        if not 1 <= limit <= MAX_HISTORY_ITEMS:
            raise InvalidMessage(f"limit must be from 1 to {MAX_HISTORY_ITEMS}, not {limit}")
        known = set(node.config.peer_names) | {p.name for p in node.peers()}
        members = [m for m in node.members(group) if m != node.name and m in known]
        body = encode_query(HistoryQuery(limit, before_hlc))
        header = history_header(group)
        results = await asyncio.gather(
            *(self.request(member, body, timeout_s=timeout_s, header=header)
              for member in members), return_exceptions=True)
        fetched: list[FetchedMessage] = []
        answered: list[str] = []
        unanswered: dict[str, str] = {}
        for member, result in zip(members, results, strict=True):
            if isinstance(result, RequestTimeout):
                unanswered[member] = result.outcome
            elif isinstance(result, MeshpostError) and not isinstance(result, NodeClosed):
                # One member that cannot be asked (e.g. found while running, not configured:
                # `request` takes configured peers) does not cost the others' answers.
                unanswered[member] = f"not asked: {result}"
            elif isinstance(result, BaseException):
                raise result
            else:
                try:
                    items = decode_reply(result.body, limit=limit)
                except HistoryRefused as exc:
                    log.info("[%s] %s refused history request %s: %s", node.name, member,
                             result.request_id, exc)
                    unanswered[member] = f"refused: {exc}"
                    continue
                except HistoryReplyInvalid as exc:
                    node.stats.history_replies_invalid += 1
                    log.warning("[%s] history reply %s from %s: %s", node.name, result.id,
                                member, exc)
                    unanswered[member] = f"unreadable reply: {exc}"
                    continue
                answered.append(member)
                # The sender is the member whose link the reply came on: the only sender
                # a fetched message is labelled with.
                fetched.extend(FetchedMessage(result.sender, group, i.id, i.sent_at_ns, i.hlc,
                                              i.body) for i in items)
        fetched.sort(key=lambda f: (f.hlc, f.sender, f.id))
        return GroupHistory(group, tuple(fetched), tuple(answered), unanswered)

    def _drain(self, reply: Envelope | None = None, stored_at: int = 0) -> None:
        node = self._node
        for event in self.tracker.events():
            match event:
                case RequestAnswered(request_id=request_id, late=late):
                    waiter = self._waiters.get(request_id)
                    if waiter is not None and not waiter.done() and reply is not None:
                        waiter.set_result(Reply(request_id, reply.id, reply.sender, reply.body,
                                                reply.sent_at_ns, reply.hlc, stored_at))
                    elif late:
                        log.info("[%s] late reply %s to request %s from %s (linked in "
                                 "history)", node.name, event.reply_id, request_id, event.peer)
                case RequestTimedOut(request_id=request_id, peer=peer, outcome=outcome):
                    waiter = self._waiters.get(request_id)
                    if waiter is not None and not waiter.done():
                        timeout = self._timeouts.get(request_id, 0.0)
                        waiter.set_exception(RequestTimeout(request_id, peer, timeout,
                                                            outcome.value))
                case ReplyUnmatched(reply_id=rid, request_id=request_id, sender=sender,
                                    reason=reason):
                    node.stats.replies_unmatched += 1
                    # A reply to a plain message (an echo) answers no request: that is normal.
                    # A reply from a peer the request did not go to is worth a warning.
                    level = logging.WARNING if "went to" in reason else logging.DEBUG
                    log.log(level, "[%s] reply %s from %s to %s not linked to a waiting "
                            "request: %s", node.name, rid, sender, request_id, reason)

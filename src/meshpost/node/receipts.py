"""The receipts of our outgoing messages: who waits for them, and their record.

Rule: this component owns the receipt futures of posted and sent messages (held weakly, so a
dropped handle costs nothing), the one timer of `send()` timeouts, and what a receipt or a
rejection does once it arrives: settle its future at once, record it with the next commit,
then count it and tell whoever follows deliveries. It stores only through its node's writer.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import weakref
from typing import TYPE_CHECKING

import meshpost.probes as probes
from meshpost.errors import MessageRejected, NodeClosed, ReceiptTimeout
from meshpost.node.records import (
    CrashPoint,
    DeliveryRecorded,
    Outgoing,
    Receipt,
    ReceiptFuture,
    _MessageKey,
)
from meshpost.store import Delivery, Rejection

if TYPE_CHECKING:
    from meshpost.node.core import Node
    from meshpost.protocol import MessagesDelivered

log = logging.getLogger(__name__)

#: A receipt future, held weakly (or, for its `owned` callers, the future itself), with the
#: message id and send time its receipt reports.
_Waiter = tuple[
    "weakref.KeyedRef[_MessageKey, asyncio.Future[Receipt]] | asyncio.Future[Receipt]", str, int]


def _future_of(
    ref: weakref.KeyedRef[_MessageKey, asyncio.Future[Receipt]] | asyncio.Future[Receipt],
) -> asyncio.Future[Receipt] | None:
    """The future a waiter holds (None: it was held weakly, and is gone)."""
    return ref if isinstance(ref, asyncio.Future) else ref()



class Receipts:
    """A node's receipt futures (`expect`), `send()` timeouts (`start_timeout`), and the
    recording of receipts and rejections (`record_delivery`, `record_rejection`)."""

    def __init__(self, node: Node) -> None:
        self._node = node
        # Receipt futures of post()/send() messages not yet settled: weakly (a future its
        # caller dropped is forgotten), and strongly in _held once someone waits for one.
        self._waiters: dict[_MessageKey, _Waiter] = {}
        self._held: dict[_MessageKey, ReceiptFuture] = {}
        #: `send()` calls waiting with a timeout: (deadline in loop time, id, peer, timeout).
        self._send_deadlines: dict[asyncio.Future[Receipt], tuple[float, str, str, float]] = {}
        self._send_timer: asyncio.TimerHandle | None = None
        #: Set after each commit of receipts while a `wait_delivered` follows
        #: `stats.delivered` (they count in `_following`): no one looks at it otherwise (a
        #: waiter clears it first), and a set is a Python call at every receipt.
        self._delivered_changed = asyncio.Event()
        self._following = 0
        #: When `_send_timer` fires (loop time): compared per send, with no call.
        self._send_timer_at = 0.0

    # -- the futures ------------------------------------------------------------------------

    def expect(
        self, key: _MessageKey, message_id: str, sent_at_ns: int, *, held: bool,
        owned: bool = False,
    ) -> asyncio.Future[Receipt]:
        """The receipt future of the message `key` (peer, seq), settled by its receipt, its
        rejection or the node's failure; with `held`, the caller keeps it while it waits.
        With `owned` (and `held`), the caller also calls `forget(key)` if it stops waiting
        before the future is settled (`send`): the node then holds the future itself rather
        than a weak reference (a `KeyedRef` is two Python calls to make, per send)."""
        loop = asyncio.get_running_loop()
        # A caller that holds the future while it waits (send) gets a plain one: the
        # node need not hold it, and awaiting a plain future is cheaper.
        future = loop.create_future() if held else ReceiptFuture(loop, self._held, key)
        if owned:
            self._waiters[key] = (future, message_id, sent_at_ns)
        else:
            self._waiters[key] = (weakref.KeyedRef(future, self._forget_waiter, key),
                                  message_id, sent_at_ns)
        return future

    def forget(self, peer: str, seq: int) -> None:
        """The `owned` caller of (peer, seq)'s future stopped waiting (a timeout, a
        cancellation, a failure): forget the future, as a weak reference would have."""
        self._waiters.pop((peer, seq), None)

    def not_stored(self, handles: list[Outgoing], failure: BaseException) -> None:
        """Nothing of `handles` was stored: their receipts can never come, they fail."""
        for handle in handles:
            self._waiters.pop((handle.to, handle.seq), None)
            if not handle.receipt.done():
                handle.receipt.set_exception(failure)
                handle.receipt.exception()  # retrieved: nobody else may ever look

    def fail(self, failure: BaseException) -> None:
        """Fail every receipt future still waiting with `failure` (the node's)."""
        for key in list(self._waiters):
            waiter = self._take_waiter(*key)
            if waiter is not None:
                waiter[0].set_exception(failure)
                waiter[0].exception()  # retrieved: a handle nobody awaits is not an error

    def close(self) -> None:
        """The node closes: every future still waiting fails with `NodeClosed`."""
        for future in [_future_of(ref) for ref, _id, _sent_at in self._waiters.values()]:
            if future is not None and not future.done():
                future.set_exception(NodeClosed(self._node.name))
                future.exception()  # nobody may be awaiting it: mark as retrieved
        self._waiters.clear()
        self._held.clear()
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None

    def _take_waiter(
        self, peer: str, seq: int
    ) -> tuple[asyncio.Future[Receipt], str, int] | None:
        """The unsettled receipt future of (peer, seq) with its message id and send time, if
        anyone can still observe it."""
        waiter = self._waiters.pop((peer, seq), None)
        if waiter is None:
            return None
        ref, message_id, sent_at_ns = waiter
        future = ref if isinstance(ref, asyncio.Future) else ref()  # (`_future_of`, inline)
        if future is None or future.done():
            return None
        return future, message_id, sent_at_ns

    def _forget_waiter(self, ref: weakref.KeyedRef[_MessageKey, asyncio.Future[Receipt]]) -> None:
        """A receipt future was garbage-collected: its caller dropped it unobserved."""
        waiter = self._waiters.get(ref.key)
        if waiter is not None and waiter[0] is ref:
            del self._waiters[ref.key]

    # -- send() timeouts ----------------------------------------------------------------------

    def start_timeout(
        self, future: asyncio.Future[Receipt], message_id: str, to: str, timeout_s: float
    ) -> None:
        """Fail `future` with `ReceiptTimeout` in `timeout_s` unless settled (or
        `stop_timeout`) by then. No timer per send: one timer serves every waiting send
        (`_expire_sends`)."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        self._send_deadlines[future] = (deadline, message_id, to, timeout_s)
        self._arm_send_timer(deadline)

    def stop_timeout(self, future: asyncio.Future[Receipt]) -> None:
        """`future`'s send stopped waiting: forget its deadline."""
        self._send_deadlines.pop(future, None)

    def _arm_send_timer(self, deadline: float) -> None:
        timer = self._send_timer
        if timer is not None and self._send_timer_at <= deadline:
            return  # it fires first, and re-arms itself for what is left
        if timer is not None:
            timer.cancel()
        self._send_timer = asyncio.get_running_loop().call_at(deadline, self._expire_sends)
        self._send_timer_at = deadline

    def _expire_sends(self) -> None:
        """Fail the sends whose receipt is overdue with `ReceiptTimeout`; re-arm for the next."""
        self._send_timer = None
        now = asyncio.get_running_loop().time()
        later = None
        for future, (deadline, message_id, to, timeout_s) in list(self._send_deadlines.items()):
            if future.done():
                continue
            if deadline <= now:
                # The message stays queued and is still delivered (its waiter is skipped).
                future.set_exception(ReceiptTimeout(message_id, to, timeout_s))
            elif later is None or deadline < later:
                later = deadline
        if later is not None:
            self._arm_send_timer(later)

    async def wait_delivered(self, count: int, timeout_s: float) -> bool:
        """Wait until `stats.delivered >= count`; False on timeout."""
        async def _wait() -> None:
            while self._node.stats.delivered < count:
                self._delivered_changed.clear()
                await self._delivered_changed.wait()

        self._following += 1
        try:
            await asyncio.wait_for(_wait(), timeout_s)
        except TimeoutError:
            return False
        finally:
            self._following -= 1
        return True

    # -- receipts and rejections arriving ---------------------------------------------------

    def record_delivery(self, event: MessagesDelivered) -> None:
        """A valid receipt arrived: report it now, record it with the next commit.

        The receipt is already backed by the receiver's commit, so its waiters are told at
        once and our own record of it stays off the reply path: a `send()` resumes first and
        its next message shares the commit that records this one. If we crash before that
        commit, the message is pending again after restart, is resent, and the receiver
        receipts the duplicate again from the row it already stored: the record is restored,
        nothing is stored twice (docs/protocol.md, section 7.3).
        """
        node = self._node
        assert node._writer is not None
        crash_at = node._crash_at  # a test's crash hook; None in use
        if crash_at is not None:
            node._crash(CrashPoint.AFTER_ACK_RECEIVE)
        peer, r = event.peer, event.receipt
        if self._waiters:
            for seq in event.seqs:
                waiter = self._take_waiter(peer, seq)
                if waiter is not None:
                    future, message_id, sent_at_ns = waiter
                    future.set_result(
                        Receipt(
                            message_id=message_id, to=peer, seq=seq, sent_at_ns=sent_at_ns,
                            delivered_at_ns=r.stored_at_ns, received_at_ns=r.received_at_ns,
                            recorded_at_ns=event.arrived_at_ns, sync=r.sync,
                        )
                    )
        if crash_at is not None and crash_at is CrashPoint.AFTER_RECEIPT_REPORTED:
            # Queued before the record's commit, after the waiters' wake-ups: the caller has
            # seen its receipt and the record is not committed when the node dies.
            asyncio.get_running_loop().call_soon(node._crash, CrashPoint.AFTER_RECEIPT_REPORTED)
        delivery = Delivery(peer, event.seqs, r, event.arrived_at_ns)
        # (A partial, not a lambda: one Python frame less when the commit calls it.)
        node._writer.add_delivery(delivery, functools.partial(self._delivery_stored, delivery))

    def _delivery_stored(self, delivery: Delivery) -> None:
        """The receipt is recorded: count it, wake whoever follows deliveries. (The outbox
        needs no wake here: the receipt freed the window on arrival, and `Links._perform` woke the
        disk reader then if the link wanted rows.)"""
        node = self._node
        if node._probe is not None:
            node._probe.mark(probes.DELIVERY_STORED)
        peer = delivery.peer
        node.stats.delivered += len(delivery.seqs)
        if self._following:
            self._delivered_changed.set()
        if node._groups.restored_copies:  # copies of broadcasts posted before a restart
            node._groups.copies_settled(peer, delivery.seqs)
        if node._queues.follows_seqs:  # messages posted before a restart: 19.4
            node._queues.receipted(peer, delivery.seqs)
        if node._subscribers:
            node._publish(DeliveryRecorded(peer, delivery.seqs, delivery.receipt.stored_at_ns))

    def record_rejection(self, peer: str, seqs: list[int], code: str, detail: str) -> None:
        """The peer rejected these messages: record it, then fail their futures."""
        node = self._node
        assert node._writer is not None
        node.stats.rejected += len(seqs)
        log.warning("[%s] %s rejected %d message(s) (%s): %s", node.name, peer, len(seqs), code,
                    detail)

        def done() -> None:
            if node._groups.restored_copies:
                node._groups.copies_settled(peer, seqs, rejected=f"{code}: {detail}")
            if node._queues.follows_seqs:
                node._queues.refused(peer, seqs)
            for seq in seqs:
                waiter = self._take_waiter(peer, seq)
                if waiter is not None:
                    future, message_id, _sent_at = waiter
                    future.set_exception(MessageRejected(message_id, peer, code, detail))

        node._writer.add_rejection(Rejection(peer, seqs, f"{code}: {detail}"), done)


async def wait_receipt(
    handle: Outgoing, timeout_s: float | None, *, shield: bool = True
) -> Receipt:
    """Wait up to `timeout_s` (None: for ever) for `handle`'s receipt.

    Raises `ReceiptTimeout` (the message stays queued and is still delivered),
    `MessageRejected` or `NodeFailed`. With `shield` (the default) a timeout leaves the
    handle's future untouched for other waiters; without, it is cancelled (cheaper, for a
    caller that owns the handle alone).
    """
    future = handle.receipt
    try:
        async with asyncio.timeout(timeout_s):
            return await (asyncio.shield(future) if shield else future)
    except TimeoutError:
        raise ReceiptTimeout(handle.id, handle.to, timeout_s or 0.0) from None

"""Groups and broadcast: who is in which group, and one logical message to many.

Rule: this component owns the membership table and the broadcast tracker (both sans-IO, in
protocol.groups); it stores and posts only through its node.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import TYPE_CHECKING, Any

import meshpost.rules as rules
from meshpost.config import validate_name
from meshpost.errors import ConfigError, MessageRejected, NoRecipients
from meshpost.node.records import BroadcastHandle, Receipt
from meshpost.protocol import Envelope
from meshpost.protocol.groups import (
    BroadcastStatus,
    BroadcastTracker,
    GroupMembership,
    MemberJoined,
    MemberRecord,
    MembershipRejected,
)
from meshpost.protocol.header import Kind, PatternHeader

if TYPE_CHECKING:
    from collections.abc import Iterable

    from meshpost.node.core import Node

log = logging.getLogger(__name__)


def _log_failure(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("membership record not stored: %s", task.exception())


class Groups:
    """A node's groups (`resolve`, `join`, `leave`, `members`) and broadcasts (k/n)."""

    def __init__(self, node: Node) -> None:
        self._node = node
        #: Who is in which group (config groups, then `member` records, own and peers').
        self.membership = GroupMembership(node.name, static=node.config.groups)
        #: Logical messages to many whose copies are not all receipted (k/n, `broadcast`).
        self.broadcasts = BroadcastTracker()

    def restore(self, records: Iterable[MemberRecord]) -> None:
        """At start: the configuration's groups as version-0 joins, then every stored record."""
        node = self._node
        self.membership = GroupMembership.restore(node.name, records, static=node.config.groups)

    def resolve(self, target: str) -> list[str]:
        links = self._node._links
        names = rules.resolve_target(target, local_name=self._node.name, peers=list(links),
                                     groups=self.groups())
        # A member that is no peer of ours (it joined through another node) is not reachable.
        return [n for n in names if n in links]

    def groups(self) -> dict[str, tuple[str, ...]]:
        membership = self.membership
        names = {*self._node.config.groups, *(r.group for r in membership.snapshot())}
        return {g: tuple(membership.members(g)) for g in sorted(names)}

    def members(self, group: str) -> list[str]:
        return self.membership.members(group)

    async def change_membership(self, group: str, *, joined: bool) -> bool:
        node = self._node
        node._check_open()
        validate_name(group)
        if group == node.name or group in node._links or group.lower() == rules.ALL:
            raise ConfigError(f"{group!r} names a node (or all), not a group")
        change = self.membership.join if joined else self.membership.leave
        record = change(group, node.hlc.now())
        if record is None:
            return False
        assert node._writer is not None
        assert node._store is not None
        await node._writer.call(node._store.save_member, record)
        await node._post(rules.ALL, "join" if joined else "leave", held=False,
                         header=PatternHeader(Kind.MEMBER, queue=group,
                                              version=record.version))
        log.info("[%s] %s group %s (version %d)", node.name,
                 "joined" if joined else "left", group, record.version)
        return True

    def merge_member(self, sender: str, m: Envelope) -> None:
        """A peer's `member` record arrived (stored already): merge it, keep the winner."""
        node = self._node
        header = m.header
        assert header is not None
        record = MemberRecord(header.queue, m.sender, m.body == "join", header.version, m.hlc)
        outcome = self.membership.merge(record, sender=sender)
        if isinstance(outcome, MembershipRejected):
            log.warning("[%s] membership record from %s ignored: %s", node.name, sender,
                        outcome.reason)
            return
        if outcome is not None:
            log.info("[%s] %s %s group %s", node.name, sender,
                     "joined" if isinstance(outcome, MemberJoined) else "left", record.group)
        if node._writer is not None and node._store is not None:
            task = asyncio.ensure_future(node._writer.call(node._store.save_member, record))
            task.add_done_callback(_log_failure)

    async def broadcast(self, target: str, body: str) -> BroadcastHandle:
        node = self._node
        if not self.resolve(target):
            raise NoRecipients(target)
        # Each copy says which logical message it is (header kind `group`, ref): receivers
        # and both histories can tell one message to many from n direct ones.
        logical_id = node._new_id(node.clock.wall_ns())
        # queue: the group's name ("" for all), so a receiver can say "A → team".
        group = "" if target.lower() == rules.ALL else target
        copies = await node._post(target, body, held=False,
                                  header=PatternHeader(Kind.GROUP, ref=logical_id, queue=group))
        if not copies:
            raise NoRecipients(target)
        status = self.broadcasts.start(logical_id, target, [c.to for c in copies])
        handle = BroadcastHandle(logical_id, target, copies, status)
        for copy in copies:
            copy.receipt.add_done_callback(
                functools.partial(self._copy_done, handle, copy.to))
        return handle

    def _copy_done(self, handle: BroadcastHandle, member: str,
                   receipt: asyncio.Future[Receipt]) -> None:
        if receipt.cancelled():
            return
        error = receipt.exception()
        if error is None:
            progressed = self.broadcasts.delivered(handle.logical_id, member)
        elif isinstance(error, MessageRejected):
            progressed = self.broadcasts.rejected(handle.logical_id, member, str(error))
        else:
            return  # the node closed or failed: the copy stays in the store, not settled
        if progressed is not None:
            handle._update(progressed.status)

    def active(self) -> list[BroadcastStatus]:
        return self.broadcasts.active()

"""Groups and broadcast: who is in which group, and one logical message to many.

Rule: this component owns the membership table and the broadcast tracker (both sans-IO, in
protocol.groups); it stores and posts only through its node. A group name that is a node's
name (this node's, a peer's) or `all` is never a group here, whoever's record says it is.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

import meshpost.rules as rules
from meshpost.config import validate_name
from meshpost.errors import ConfigError, MessageRejected, NoRecipients
from meshpost.node.records import BroadcastHandle, BroadcastProgress, Receipt
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
from meshpost.store import StoredBroadcast

if TYPE_CHECKING:
    from collections.abc import Iterable

    from meshpost.node.core import Node

log = logging.getLogger(__name__)


class Groups:
    """A node's groups (`resolve`, `join`, `leave`, `members`) and broadcasts (k/n)."""

    def __init__(self, node: Node) -> None:
        self._node = node
        #: Who is in which group (config groups, then `member` records, own and peers').
        self.membership = GroupMembership(node.name, static=node.config.groups)
        #: Logical messages to many whose copies are not all receipted (k/n, `broadcast`).
        self.broadcasts = BroadcastTracker()
        #: Their handles (the settled ones are read from the store: `handle`).
        self._handles: dict[str, BroadcastHandle] = {}
        #: Copies posted before a restart and not settled then, (peer, seq) -> logical id:
        #: no receipt future waits for them, so the node reports their receipts here.
        self.restored_copies: dict[tuple[str, int], str] = {}

    def restore(self, records: Iterable[MemberRecord],
                broadcasts: Iterable[StoredBroadcast] = ()) -> None:
        """At start: the configuration's groups as version-0 joins, then every stored record;
        the broadcasts not settled before, from their copies and receipts."""
        node = self._node
        self.membership = GroupMembership.restore(node.name, records, static=node.config.groups)
        unsettled = [b for b in broadcasts if not b.status.settled]
        self.broadcasts = BroadcastTracker.restore(b.status for b in unsettled)
        for b in unsettled:
            self._handles[b.status.logical_id] = BroadcastHandle(
                b.status.logical_id, b.status.target, [], b.status)
            for peer, seq in b.pending:
                self.restored_copies[(peer, seq)] = b.status.logical_id

    def copies_settled(self, peer: str, seqs: Iterable[int], rejected: str | None = None
                       ) -> None:
        """Receipts (or a rejection) for `peer`'s `seqs`: those that are copies of a broadcast
        posted before a restart move its k/n on."""
        for seq in seqs:
            logical_id = self.restored_copies.pop((peer, seq), None)
            if logical_id is None:
                continue
            progressed = (self.broadcasts.delivered(logical_id, peer) if rejected is None
                          else self.broadcasts.rejected(logical_id, peer, rejected))
            handle = self._handles.get(logical_id)
            if progressed is not None and handle is not None:
                self._progress(handle, progressed.status)

    async def handle(self, logical_id: str) -> BroadcastHandle | None:
        """The handle of broadcast `logical_id` sent from this node, before or after a
        restart: the live one while unsettled, else one holding its status from the store
        (its copies and their receipts); None if this node sent no such broadcast."""
        handle = self._handles.get(logical_id)
        if handle is not None:
            return handle
        node = self._node
        assert node._writer is not None
        assert node._store is not None
        stored = await node._writer.call(node._store.broadcasts, logical_id)
        if not stored:
            return None
        return BroadcastHandle(logical_id, stored[0].status.target, [], stored[0].status)

    def _progress(self, handle: BroadcastHandle, status: BroadcastStatus) -> None:
        handle._update(status)
        if status.settled:
            self._handles.pop(handle.logical_id, None)
        if not handle.copies:
            # Posted before a restart: no one here holds its copies' receipts, so whoever
            # watches the node (the console) hears its k/n from here.
            self._node._publish(BroadcastProgress(status))

    def resolve(self, target: str) -> list[str]:
        links = self._node._links
        # The group table is read lazily (`_GroupTable`): a send to `all` or to one group
        # costs that group's members, not a table of every group a peer ever named.
        names = rules.resolve_target(target, local_name=self._node.name, peers=list(links),
                                     groups=_GroupTable(self))
        # A member that is no peer of ours (it joined through another node) is not reachable.
        return [n for n in names if n in links]

    def names_a_node(self, group: str) -> bool:
        """Whether `group` is this node's name, a peer's (configured or found while
        running) or `all`: a name a peer's record cannot make a group. Without it a peer
        that joined a group named after this node received what this node sent to its own
        name (`send V` at V went to the peer, where it is an unknown target otherwise), and
        one named after a peer found later would take that peer's messages until found."""
        node = self._node
        return group == node.name or group in node._links or group.lower() == rules.ALL

    def is_group(self, name: str) -> bool:
        """Whether `name` is a group here: configured or named by a record, not a node."""
        return ((name in self._node.config.groups or self.membership.knows(name))
                and not self.names_a_node(name))

    def groups(self) -> dict[str, tuple[str, ...]]:
        membership = self.membership
        names = {*self._node.config.groups, *membership.known()}
        # Records naming a node stay stored (they are their senders' messages) but make no
        # group: checked here, when names are read, so a peer found after the record came
        # (or a record restored from the store) is covered too.
        return {g: tuple(membership.members(g)) for g in sorted(names)
                if not self.names_a_node(g)}

    def members(self, group: str) -> list[str]:
        return [] if self.names_a_node(group) else self.membership.members(group)

    async def change_membership(self, group: str, *, joined: bool) -> bool:
        node = self._node
        node._check_open()
        validate_name(group, "group")
        if group == node.name or group in node._links or group.lower() == rules.ALL:
            raise ConfigError(f"{group!r} names a node (or all), not a group")
        change = self.membership.join if joined else self.membership.leave
        record = change(group, node.hlc.now())
        if record is None:
            return False
        # The record is stored with its messages, in their transaction (store: derived
        # writes); with no peer to tell, on its own.
        copies = await node._post(rules.ALL, "join" if joined else "leave", held=False,
                                  header=PatternHeader(Kind.MEMBER, queue=group,
                                                       version=record.version))
        if not copies:
            assert node._writer is not None
            assert node._store is not None
            await node._writer.call(node._store.save_member, record)
        log.info("[%s] %s group %s (version %d)", node.name,
                 "joined" if joined else "left", group, record.version)
        return True

    def merge_member(self, sender: str, m: Envelope) -> None:
        """A peer's `member` record arrived (stored already): merge it, keep the winner."""
        node = self._node
        header = m.header
        assert header is not None
        record = MemberRecord(header.queue, m.sender, m.body == "join", header.version, m.hlc)
        if self.names_a_node(record.group):
            node.stats.memberships_refused += 1
            log.warning("[%s] membership record from %s for group %r ignored: that is a "
                        "node's name (or all), never a group", node.name, sender, record.group)
            return
        outcome = self.membership.merge(record, sender=sender)
        if isinstance(outcome, MembershipRejected):
            node.stats.memberships_refused += 1
            log.warning("[%s] membership record from %s ignored: %s", node.name, sender,
                        outcome.reason)
            return
        if outcome is not None:
            log.info("[%s] %s %s group %s", node.name, sender,
                     "joined" if isinstance(outcome, MemberJoined) else "left", record.group)
        # Its `members` row was written in the message's own transaction (store: derived
        # writes), by the same rank rule, so a crash cannot keep one without the other.

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
        self._handles[logical_id] = handle
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
            self._progress(handle, progressed.status)

    def active(self) -> list[BroadcastStatus]:
        return self.broadcasts.active()


class _GroupTable(Mapping[str, tuple[str, ...]]):
    """The node's groups as `rules.resolve_target` reads them: one group's members on a
    lookup; the whole table only when iterated (the error that lists every target)."""

    def __init__(self, groups: Groups) -> None:
        self._groups = groups

    def __getitem__(self, name: str) -> tuple[str, ...]:
        if not self._groups.is_group(name):
            raise KeyError(name)
        return tuple(self._groups.membership.members(name))

    def __iter__(self) -> Iterator[str]:
        return iter(self._groups.groups())

    def __len__(self) -> int:
        return len(self._groups.groups())

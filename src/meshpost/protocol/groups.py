"""Live groups and broadcast: who is in which group (`GroupMembership`, a last-writer-wins
register per (group, member)) and how far one message to many has got (`BroadcastTracker`).

Rule: pure state, no I/O; records and statuses are plain msgspec data the node stores and
sends. A member speaks only for itself: a record about anyone but the peer that sent it is
rejected, because a name a peer chooses is never proof of who it is.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

import msgspec

from meshpost.protocol.header import is_valid_name


class MemberRecord(msgspec.Struct, array_like=True, frozen=True):
    """`member` joined (or left) `group`; `version` orders one member's records.

    The member makes its versions: each is above every version it made before (its store
    keeps its own records) and at least its HLC at the change, so a member whose data
    directory was wiped still outranks what it said before (unless its wall clock went back
    further than that). On the wire: a message with header kind `member`, queue = group,
    version = version, body "join" or "leave"; the record's `hlc` is the message's."""

    group: str
    member: str
    joined: bool
    version: int
    hlc: int

    def rank(self) -> tuple[int, int]:
        """Total order of one (group, member)'s records: the higher version wins; at equal
        versions (which a member never makes twice) a leave wins, so every node picks the
        same record."""
        return self.version, 0 if self.joined else 1


@dataclasses.dataclass(frozen=True, slots=True)
class MemberJoined:
    record: MemberRecord


@dataclasses.dataclass(frozen=True, slots=True)
class MemberLeft:
    record: MemberRecord


@dataclasses.dataclass(frozen=True, slots=True)
class MembershipRejected:
    """A peer's record was not merged (count it, log it, keep going)."""

    sender: str
    record: MemberRecord
    reason: str


MembershipChange = MemberJoined | MemberLeft


class GroupMembership:
    """Every group's members as this node knows them, from its own and its peers' records.

    Groups in the configuration are version-0 joins: any record a member makes outranks
    them. Merging is commutative, associative and idempotent (a record's rank decides), so
    nodes that have seen the same records agree whatever order they came in."""

    def __init__(self, local: str, *, static: Mapping[str, Iterable[str]] | None = None) -> None:
        self.local = local
        #: group -> member -> the winning record. By group, so that a group's members cost
        #: what that group holds: with one flat table each `members(g)` walked every record,
        #: and the node's table of all groups (built at each send to `all` or a group) took
        #: groups x records steps: 10,000 records a peer sent in 10,000 messages stalled the
        #: node 8 s at each such send.
        self._records: dict[str, dict[str, MemberRecord]] = {}
        self._own_version = 0
        for group, members in (static or {}).items():
            for member in members:
                self._records.setdefault(group, {})[member] = MemberRecord(
                    group, member, True, 0, 0)

    # -- local changes ---------------------------------------------------------------------

    def join(self, group: str, hlc: int) -> MemberRecord | None:
        """This node joins `group`: the record to store and send to every peer, or None if
        it is a member already."""
        return self._change(group, True, hlc)

    def leave(self, group: str, hlc: int) -> MemberRecord | None:
        """This node leaves `group`: the record to store and send, or None if not a member."""
        return self._change(group, False, hlc)

    def _change(self, group: str, joined: bool, hlc: int) -> MemberRecord | None:
        if not is_valid_name(group):
            raise ValueError(f"invalid group name {group!r}")
        current = self._records.get(group, {}).get(self.local)
        if (current is not None and current.joined) == joined:
            return None
        self._own_version = max(self._own_version + 1, hlc)
        record = MemberRecord(group, self.local, joined, self._own_version, hlc)
        self._records.setdefault(group, {})[self.local] = record
        return record

    # -- peers' records --------------------------------------------------------------------

    def merge(
        self, record: MemberRecord, *, sender: str
    ) -> MembershipChange | MembershipRejected | None:
        """A record that arrived from `sender` (the link's peer, authenticated by the
        handshake). Returns the change it made, None if it changed nothing (stale or
        known), or why it was rejected."""
        if record.member != sender:
            return MembershipRejected(sender, record, "a member may only speak for itself")
        if record.member == self.local:
            return MembershipRejected(sender, record, "a record about this node itself")
        if not is_valid_name(record.group):
            return MembershipRejected(sender, record, f"invalid group name {record.group!r}")
        if record.version < 1:
            return MembershipRejected(sender, record, "a record's version starts at 1")
        records = self._records.setdefault(record.group, {})
        current = records.get(record.member)
        if current is not None and current.rank() >= record.rank():
            return None
        records[record.member] = record
        if current is not None and current.joined == record.joined:
            return None  # a newer record that says the same thing
        return MemberJoined(record) if record.joined else MemberLeft(record)

    # -- views -----------------------------------------------------------------------------

    def members(self, group: str) -> list[str]:
        """The current members of `group` (this node included if it is one), sorted."""
        return sorted(m for m, r in self._records.get(group, {}).items() if r.joined)

    def groups(self) -> list[str]:
        """Groups with at least one member, sorted."""
        return sorted(g for g, records in self._records.items()
                      if any(r.joined for r in records.values()))

    def known(self) -> list[str]:
        """Every group some record names (members or not, configured or not), sorted."""
        return sorted(self._records)

    def knows(self, group: str) -> bool:
        """Whether some record names `group` (it may have no member now)."""
        return group in self._records

    def groups_of(self, member: str) -> list[str]:
        return sorted(g for g, records in self._records.items()
                      if (r := records.get(member)) is not None and r.joined)

    def is_member(self, group: str, member: str) -> bool:
        record = self._records.get(group, {}).get(member)
        return record is not None and record.joined

    def own_records(self) -> list[MemberRecord]:
        """This node's latest record per group (what to send a peer that has not got them)."""
        return sorted((r for records in self._records.values()
                       if (r := records.get(self.local)) is not None and r.version > 0),
                      key=lambda r: r.group)

    def snapshot(self) -> list[MemberRecord]:
        """Every winning record that came from a member (not the configuration), sorted."""
        return sorted((r for records in self._records.values() for r in records.values()
                       if r.version > 0), key=lambda r: (r.group, r.member))

    @classmethod
    def restore(
        cls,
        local: str,
        records: Iterable[MemberRecord],
        *,
        static: Mapping[str, Iterable[str]] | None = None,
    ) -> GroupMembership:
        """Membership after a restart: the configuration, then the stored records (this
        node's own and its peers', in any order)."""
        membership = cls(local, static=static)
        for record in records:
            group = membership._records.setdefault(record.group, {})
            current = group.get(record.member)
            if current is None or record.rank() > current.rank():
                group[record.member] = record
            if record.member == local:
                membership._own_version = max(membership._own_version, record.version)
        return membership

    def __repr__(self) -> str:
        return f"<GroupMembership {self.local!r} groups={len(self.groups())}>"


class BroadcastStatus(msgspec.Struct, frozen=True):
    """How far one message to many has got: `delivered` k of `total` n, who is `pending`."""

    logical_id: str
    target: str
    total: int
    delivered: tuple[str, ...]
    pending: tuple[str, ...]
    rejected: tuple[tuple[str, str], ...] = ()

    @property
    def settled(self) -> bool:
        """Every member receipted or rejected its copy: nothing more will change."""
        return not self.pending


@dataclasses.dataclass(frozen=True, slots=True)
class BroadcastProgressed:
    """A member's receipt or rejection changed `status` (`status.settled` once all have)."""

    status: BroadcastStatus


@dataclasses.dataclass(slots=True)
class _Broadcast:
    target: str
    members: tuple[str, ...]
    delivered: set[str]
    rejected: dict[str, str]


class BroadcastTracker:
    """k/n receipt tracking for messages to `all` or a group: one logical message, one copy
    per member (header kind `group`, ref = the logical id).

    Members are fixed when the message is posted: one that joins later does not get it, one
    that leaves meanwhile still does (its copy is in the outbox and is retried until it
    receipts). Retrying is the links' job; this only counts. Settled broadcasts are
    forgotten here (the store keeps each copy and its receipt)."""

    def __init__(self) -> None:
        self._active: dict[str, _Broadcast] = {}

    def start(self, logical_id: str, target: str, members: Iterable[str]) -> BroadcastStatus:
        """A broadcast was stored (one copy per member). Starting a known id is a bug."""
        if logical_id in self._active:
            raise ValueError(f"broadcast {logical_id!r} is already tracked")
        ordered = tuple(sorted(set(members)))
        if not ordered:
            raise ValueError(f"broadcast {logical_id!r} has no members")
        self._active[logical_id] = _Broadcast(target, ordered, set(), {})
        return self.status(logical_id)

    def delivered(self, logical_id: str, member: str) -> BroadcastProgressed | None:
        """`member` receipted its copy; None if that changes nothing (unknown, repeated)."""
        broadcast = self._active.get(logical_id)
        if (broadcast is None or member not in broadcast.members
                or member in broadcast.delivered or member in broadcast.rejected):
            return None
        broadcast.delivered.add(member)
        return self._progressed(logical_id)

    def rejected(self, logical_id: str, member: str, reason: str) -> BroadcastProgressed | None:
        """`member` rejected its copy (it will not be retried)."""
        broadcast = self._active.get(logical_id)
        if (broadcast is None or member not in broadcast.members
                or member in broadcast.delivered or member in broadcast.rejected):
            return None
        broadcast.rejected[member] = reason
        return self._progressed(logical_id)

    def _progressed(self, logical_id: str) -> BroadcastProgressed:
        status = self.status(logical_id)
        if status.settled:
            del self._active[logical_id]
        return BroadcastProgressed(status)

    def status(self, logical_id: str) -> BroadcastStatus:
        """The broadcast's current status; KeyError once settled (read the store then)."""
        b = self._active[logical_id]
        delivered = tuple(m for m in b.members if m in b.delivered)
        pending = tuple(m for m in b.members if m not in b.delivered and m not in b.rejected)
        rejected = tuple((m, b.rejected[m]) for m in b.members if m in b.rejected)
        return BroadcastStatus(logical_id, b.target, len(b.members), delivered, pending,
                               rejected)

    def active(self) -> list[BroadcastStatus]:
        """Every unsettled broadcast, oldest first."""
        return [self.status(logical_id) for logical_id in self._active]

    @classmethod
    def restore(cls, statuses: Iterable[BroadcastStatus]) -> BroadcastTracker:
        """Unsettled broadcasts after a restart, from the store's copies and receipts."""
        tracker = cls()
        for s in statuses:
            if s.settled:
                continue
            members = (*s.delivered, *s.pending, *(m for m, _ in s.rejected))
            tracker._active[s.logical_id] = _Broadcast(
                s.target, tuple(sorted(members)), set(s.delivered), dict(s.rejected))
        return tracker

    def __len__(self) -> int:
        return len(self._active)

    def __repr__(self) -> str:
        return f"<BroadcastTracker active={len(self._active)}>"

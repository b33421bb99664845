"""Live group membership (last-writer-wins per group and member, a member speaks only for
itself) and k/n broadcast tracking."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshpost.protocol.groups import (
    BroadcastProgressed,
    BroadcastStatus,
    BroadcastTracker,
    GroupMembership,
    MemberJoined,
    MemberLeft,
    MemberRecord,
    MembershipRejected,
)

HLC = 111411200008060928


def test_joining_and_leaving_make_records_with_rising_versions() -> None:
    a = GroupMembership("A")
    joined = a.join("ops", HLC)
    assert joined == MemberRecord("ops", "A", True, HLC, HLC)
    assert a.join("ops", HLC + 1) is None  # already a member: nothing to send
    left = a.leave("ops", HLC - 5)  # an HLC that went back does not make an older version
    assert left is not None and left.version == HLC + 1 and not left.joined
    assert a.leave("ops", HLC + 9) is None
    assert a.members("ops") == [] and a.own_records() == [left]


def test_a_peers_join_and_leave_spread_and_a_stale_leave_cannot_undo_a_newer_join() -> None:
    b = GroupMembership("B")
    leave_v1 = MemberRecord("ops", "A", False, 1, HLC)
    join_v2 = MemberRecord("ops", "A", True, 2, HLC + 1)
    assert b.merge(join_v2, sender="A") == MemberJoined(join_v2)
    assert b.merge(leave_v1, sender="A") is None  # arrived late: older than what B has
    assert b.merge(join_v2, sender="A") is None  # a retransmission changes nothing
    assert b.members("ops") == ["A"] and b.groups_of("A") == ["ops"] and b.groups() == ["ops"]
    leave_v3 = MemberRecord("ops", "A", False, 3, HLC + 2)
    assert b.merge(leave_v3, sender="A") == MemberLeft(leave_v3)
    assert not b.is_member("ops", "A")


@pytest.mark.parametrize(
    ("record", "sender", "reason"),
    [
        (MemberRecord("ops", "C", True, 5, HLC), "A", "only speak for itself"),
        (MemberRecord("ops", "B", False, 5, HLC), "B", "this node itself"),
        (MemberRecord("-ops", "A", True, 5, HLC), "A", "invalid group name"),
        (MemberRecord("ops", "A", True, 0, HLC), "A", "version starts at 1"),
    ],
)
def test_a_record_a_peer_may_not_send_is_rejected_and_changes_nothing(
    record: MemberRecord, sender: str, reason: str
) -> None:
    b = GroupMembership("B", static={"ops": ["B", "C"]})
    outcome = b.merge(record, sender=sender)
    assert isinstance(outcome, MembershipRejected) and reason in outcome.reason
    assert b.members("ops") == ["B", "C"]


def test_configured_groups_are_version_zero_joins_that_any_record_outranks() -> None:
    b = GroupMembership("B", static={"ops": ("A", "B")})
    assert b.members("ops") == ["A", "B"] and b.snapshot() == [] and b.own_records() == []
    leave = MemberRecord("ops", "A", False, 1, HLC)
    assert b.merge(leave, sender="A") == MemberLeft(leave)
    own = b.leave("ops", HLC)
    assert own is not None and b.members("ops") == []


def test_restore_brings_back_every_record_and_the_own_version_counter() -> None:
    records = [MemberRecord("ops", "A", True, 7, HLC), MemberRecord("ops", "A", False, 6, HLC),
               MemberRecord("dev", "B", True, 40, HLC), MemberRecord("ops", "B", True, 3, HLC)]
    b = GroupMembership.restore("B", records, static={"qa": ["A"]})
    assert b.members("ops") == ["A", "B"] and b.members("qa") == ["A"]
    left = b.leave("ops", 1)  # a clock far behind: the version still rises above 40
    assert left is not None and left.version == 41


members = st.sampled_from(["A", "C", "D"])
groups = st.sampled_from(["ops", "dev"])


@st.composite
def histories(draw: st.DrawFn) -> list[MemberRecord]:
    """Each member's own changes, in the order it made them (versions rising)."""
    records = []
    for member in ("A", "C", "D"):
        version = 0
        for group, joined in draw(st.lists(st.tuples(groups, st.booleans()), max_size=6)):
            version += draw(st.integers(1, 3))
            records.append(MemberRecord(group, member, joined, version, HLC + version))
    return records


@settings(max_examples=200, deadline=None)
@given(histories(), st.randoms(use_true_random=False), st.randoms(use_true_random=False))
def test_any_order_and_duplication_of_records_converges_on_each_members_last_word(
    records: list[MemberRecord], first: random.Random, second: random.Random
) -> None:
    views = []
    for rng in (first, second):
        shuffled = records + rng.sample(records, k=len(records) // 2)  # some arrive twice
        rng.shuffle(shuffled)
        b = GroupMembership("B")
        for record in shuffled:
            assert not isinstance(b.merge(record, sender=record.member), MembershipRejected)
        views.append(b)
    last_word: dict[tuple[str, str], bool] = {}
    for r in records:  # in each member's own order: its last record per group decides
        last_word[(r.group, r.member)] = r.joined
    for group in ("ops", "dev"):
        expected = sorted(m for (g, m), joined in last_word.items() if g == group and joined)
        assert views[0].members(group) == views[1].members(group) == expected
    assert views[0].snapshot() == views[1].snapshot()
    # Restoring what was merged gives the same view.
    assert GroupMembership.restore("B", views[0].snapshot()).snapshot() == views[0].snapshot()


# -- broadcast k/n ------------------------------------------------------------------------


def test_a_broadcast_counts_receipts_and_names_who_is_still_pending() -> None:
    t = BroadcastTracker()
    start = t.start("m1", "all", ["C", "B", "D", "E"])
    assert (start.total, start.delivered, start.pending) == (4, (), ("B", "C", "D", "E"))
    progressed = t.delivered("m1", "C")
    assert progressed is not None
    assert progressed.status.delivered == ("C",) and progressed.status.pending == ("B", "D", "E")
    assert t.delivered("m1", "C") is None  # a second receipt of the same copy
    assert t.delivered("m1", "Z") is None  # not a member of this broadcast
    assert t.delivered("nope", "C") is None
    t.delivered("m1", "B")
    rejected = t.rejected("m1", "D", "too-large: 70000 bytes")
    assert rejected is not None
    assert rejected.status.rejected == (("D", "too-large: 70000 bytes"),)
    assert [s.pending for s in t.active()] == [("E",)]
    last = t.delivered("m1", "E")
    assert last == BroadcastProgressed(BroadcastStatus(
        "m1", "all", 4, ("B", "C", "E"), (), (("D", "too-large: 70000 bytes"),)))
    assert last.status.settled and len(t) == 0  # settled ones are the store's to show
    with pytest.raises(KeyError):
        t.status("m1")


def test_restore_tracks_unsettled_broadcasts_only() -> None:
    unsettled = BroadcastStatus("m1", "ops", 3, ("A",), ("B", "C"))
    settled = BroadcastStatus("m2", "ops", 1, ("A",), ())
    t = BroadcastTracker.restore([unsettled, settled])
    assert t.active() == [unsettled]
    t.delivered("m1", "B")
    progressed = t.delivered("m1", "C")
    assert progressed is not None and progressed.status.delivered == ("A", "B", "C")


def test_broadcast_misuse_raises() -> None:
    t = BroadcastTracker()
    t.start("m1", "all", ["A"])
    with pytest.raises(ValueError, match="already tracked"):
        t.start("m1", "all", ["A"])
    with pytest.raises(ValueError, match="no members"):
        t.start("m2", "ops", [])
    with pytest.raises(ValueError, match="invalid group name"):
        GroupMembership("A").join("bad name", HLC)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["A", "B", "C", "D", "E", "Z"]), st.booleans()),
                max_size=30))
def test_a_broadcast_partitions_its_members_and_settles_once(
    settlements: list[tuple[str, bool]]
) -> None:
    members = ("A", "B", "C", "D", "E")
    t = BroadcastTracker()
    t.start("m1", "all", members)
    settled_at: list[int] = []
    outcome: dict[str, bool] = {}  # member -> delivered (True) or rejected (False), first wins
    for i, (member, receipt) in enumerate(settlements):
        progressed = (t.delivered("m1", member) if receipt
                      else t.rejected("m1", member, "invalid: test"))
        changes = member in members and member not in outcome and not settled_at
        assert (progressed is not None) == changes
        if progressed is None:
            continue
        outcome[member] = receipt
        s = progressed.status
        assert s.total == len(members)
        assert sorted((*s.delivered, *s.pending, *(m for m, _ in s.rejected))) == list(members)
        assert set(s.delivered) == {m for m, ok in outcome.items() if ok}
        assert s.settled == (len(outcome) == len(members))
        if s.settled:
            settled_at.append(i)
    assert len(settled_at) <= 1
    assert (len(t) == 0) == bool(settled_at)

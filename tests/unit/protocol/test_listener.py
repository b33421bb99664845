"""The Listener: handshakes, validation of what arrives, receipts only after storage."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any
from unittest import mock

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshpost.errors import IdentityMismatch, MalformedFrame, UnsupportedVersion
from meshpost.protocol import (
    PROTOCOL_VERSION,
    Batch,
    Bye,
    Envelope,
    Frame,
    Hello,
    Listener,
    MessagesArrived,
    PeerLeft,
    Ping,
    Pong,
    ReceiptFrame,
    Refuse,
    RefuseCode,
    Reject,
    RejectCode,
    SessionClaimed,
    SessionInput,
    SessionState,
    ViolationDetected,
    Welcome,
    encode,
    to_ranges,
)
from meshpost.protocol import listener as listener_module
from meshpost.protocol.frames import (
    ENVELOPE_OVERHEAD_BYTES,
    FRAME_OVERHEAD_BYTES,
    MAX_BATCH_BODY_BYTES,
    MAX_BATCH_MESSAGES,
    MAX_ID_LENGTH,
    RESUME_TOKEN_BYTES,
)
from meshpost.protocol.header import Kind, PatternHeader
from meshpost.protocol.listener import (
    LIVE_SESSION_NS,
    MAX_FORWARDED_ANSWERS,
    MAX_SESSIONS_PER_PEER,
)

WALL = 1_700_000_000_000_000_000
LIMIT = 512


def make_listener(max_message_bytes: int = LIMIT) -> Listener:
    return Listener(
        local_name="bob", local_node_id="node-b", known_peers=["alice", "carol"],
        max_message_bytes=max_message_bytes, sync="normal",
    )


def hello(name: str = "alice", version: int = PROTOCOL_VERSION, resume: bytes = b"") -> Hello:
    return Hello(version=version, node_id=f"node-{name}", name=name, sent_at_ns=WALL, hlc=1,
                 resume=resume)


def msg(
    seq: int, body: str = "hi", *, sender: str = "alice", recipient: str = "bob",
    id: str | None = None,
) -> Envelope:
    return Envelope(id if id is not None else f"m{seq}", seq, sender, recipient, body, WALL, seq)


def answers(listener: Listener, identity: str = "alice") -> list[Frame]:
    """The frames the listener queued, all of which must be for `identity`."""
    queued = listener.frames_to_send()
    assert {to for to, _ in queued} <= {identity}
    return [frame for _, frame in queued]


def receive(listener: Listener, identity: str, data: bytes, wall_ns: int = WALL) -> list[Frame]:
    listener.receive(identity, data, wall_ns, 0)
    return answers(listener, identity)


def send(
    listener: Listener, frame: Frame, identity: str = "alice", wall_ns: int = WALL + 5,
    authenticated: str | None = None,
) -> list[Frame]:
    listener.receive(identity, encode(frame), wall_ns, 77, authenticated)
    return answers(listener, identity)


def stored(listener: Listener, arrived: MessagesArrived, **kwargs: Any) -> list[Frame]:
    listener.stored(arrived, **kwargs)
    return answers(listener, arrived.connection)


def connected(max_message_bytes: int = LIMIT) -> Listener:
    return connected_with_token(max_message_bytes)[0]


def connected_with_token(max_message_bytes: int = LIMIT) -> tuple[Listener, bytes]:
    """A listener with alice welcomed on connection "alice", and her session's resume token."""
    listener = make_listener(max_message_bytes)
    [welcome] = send(listener, hello())
    assert isinstance(welcome, Welcome)
    assert listener.events() == []
    return listener, welcome.resume


def resumed(listener: Listener, identity: str, token: bytes) -> bytes:
    """alice redials on `identity`, her Hello carrying `token`; returns the new session's."""
    [welcome] = send(listener, hello(resume=token), identity=identity)
    assert isinstance(welcome, Welcome)
    return welcome.resume


def refusal(frames: list[Frame]) -> Refuse:
    [frame] = frames
    assert isinstance(frame, Refuse)
    return frame


def violations(listener: Listener) -> list[ViolationDetected]:
    return [e for e in listener.events() if isinstance(e, ViolationDetected)]


def arrivals(listener: Listener) -> list[MessagesArrived]:
    return [e for e in listener.events() if isinstance(e, MessagesArrived)]


# -- handshake --------------------------------------------------------------------------------


def test_a_known_peer_is_welcomed() -> None:
    listener = make_listener()
    [welcome] = send(listener, hello())
    assert isinstance(welcome, Welcome)
    assert len(welcome.resume) == RESUME_TOKEN_BYTES  # a fresh token for this session
    assert welcome == Welcome(PROTOCOL_VERSION, "node-b", "bob", WALL + 5, 77, "normal",
                              welcome.resume)
    assert listener.session_state("alice") is SessionState.OPEN


def test_an_unknown_peer_is_refused_and_counted() -> None:
    listener = make_listener()
    refused = refusal(send(listener, hello("mallory"), identity="mallory"))
    assert refused.code == RefuseCode.UNKNOWN_PEER
    [violation] = violations(listener)
    assert violation.who == "mallory"
    assert isinstance(violation.error, IdentityMismatch)
    assert listener.session_state("mallory") is SessionState.NEW


def test_an_exclusive_listener_welcomes_its_one_peer_and_refuses_any_other() -> None:
    listener = Listener(local_name="bob", local_node_id="node-b", known_peers=["alice", "carol"],
                        max_message_bytes=LIMIT, sync="normal", exclusive="alice")
    # carol is a known peer, yet refused: the pair is bob and alice alone.
    refused = refusal(send(listener, hello("carol"), identity="carol"))
    assert refused.code == RefuseCode.EXCLUSIVE
    assert refused.detail == "'bob' is in an exclusive pair with 'alice' and accepts no other peer"
    assert listener.session_state("carol") is SessionState.NEW
    assert violations(listener) == []  # carol may be configured for a mesh: not its fault
    [welcome] = send(listener, hello("alice"))
    assert isinstance(welcome, Welcome)
    assert listener.session_state("alice") is SessionState.OPEN


def test_a_second_node_under_a_discovered_name_is_refused_as_a_name_clash() -> None:
    listener = make_listener()
    listener.expected_node_ids["alice"] = "node-alice"
    clash = Hello(PROTOCOL_VERSION, "node-other-alice", "alice", WALL, 1)
    refused = refusal(send(listener, clash))
    assert refused.code == RefuseCode.IDENTITY
    assert "name clash" in refused.detail
    assert listener.session_state("alice") is SessionState.NEW
    [welcome] = send(listener, hello())
    assert isinstance(welcome, Welcome)


def test_a_hello_claiming_another_identity_is_refused() -> None:
    listener = make_listener()
    # The connection's key proves "alice" (secure mode); its Hello claims carol.
    refused = refusal(send(listener, hello("carol"), "alice", authenticated="alice"))
    assert refused.code == RefuseCode.IDENTITY
    assert "claims to be 'carol'" in refused.detail
    assert isinstance(violations(listener)[0].error, IdentityMismatch)
    assert listener.session_state("alice") is SessionState.NEW


@pytest.mark.parametrize("version", [0, PROTOCOL_VERSION + 1])
def test_a_hello_of_another_version_is_refused_with_the_version_code(version: int) -> None:
    listener = make_listener()
    refused = refusal(send(listener, hello(version=version)))
    assert refused.code == RefuseCode.VERSION
    assert f"version {version}" in refused.detail
    assert isinstance(violations(listener)[0].error, UnsupportedVersion)
    assert listener.session_state("alice") is SessionState.NEW


def test_a_second_hello_replaces_the_session() -> None:
    listener = connected()
    [welcome] = send(listener, Hello(PROTOCOL_VERSION, "node-alice-2", "alice", WALL, 1))
    assert isinstance(welcome, Welcome)
    assert listener.session_state("alice") is SessionState.OPEN


@pytest.mark.parametrize("claimed", ["mallory", "carol"])
def test_a_refused_hello_does_not_rebind_an_open_session(claimed: str) -> None:
    """A connection welcomed as alice that then says Hello as a name it is refused (unknown,
    or not the name its key authenticates) stays alice's: its messages as `claimed` are
    rejected, never stored under that name. (Found by fault test 11: a raw peer welcomed as K
    sent Hello as "Zed", was refused, and its next batch as "Zed" was stored.)"""
    listener = make_listener()
    [welcome] = send(listener, hello(), authenticated="alice")
    assert isinstance(welcome, Welcome)
    refused = refusal(send(listener, hello(claimed), authenticated="alice"))
    assert refused.code in (RefuseCode.UNKNOWN_PEER, RefuseCode.IDENTITY)
    assert listener.session_peer("alice") == "alice"
    listener.events()
    [reject] = send(listener, Batch(WALL, [msg(1, sender=claimed)]), authenticated="alice")
    assert isinstance(reject, Reject) and reject.code == RejectCode.INVALID
    assert arrivals(listener) == []


def test_a_batch_before_hello_is_refused_with_hello_required() -> None:
    listener = make_listener()
    refused = refusal(send(listener, Batch(WALL, [msg(1)])))
    assert refused.code == RefuseCode.HELLO_REQUIRED
    assert listener.events() == []


def test_a_bye_ends_the_session_and_reports_the_peer_left() -> None:
    listener = connected()
    assert send(listener, Bye("shutting down")) == []  # no reply
    assert listener.events() == [PeerLeft("alice", "shutting down")]
    assert listener.session_state("alice") is SessionState.LEFT
    assert refusal(send(listener, Batch(WALL, [msg(1)]))).code == RefuseCode.HELLO_REQUIRED
    assert refusal(send(listener, Ping(1))).code == RefuseCode.HELLO_REQUIRED
    assert send(listener, Bye("again")) == []
    assert listener.events() == []  # reported once
    [welcome] = send(listener, hello())  # back after a restart
    assert isinstance(welcome, Welcome)
    assert listener.session_state("alice") is SessionState.OPEN


def test_a_bye_without_a_session_changes_nothing() -> None:
    listener = make_listener()
    assert send(listener, Bye("shutting down"), identity="carol") == []
    assert listener.events() == []


# -- pings ------------------------------------------------------------------------------------


def test_a_ping_is_answered_with_a_pong_carrying_both_clocks() -> None:
    listener = connected()
    [pong] = send(listener, Ping(sent_at_ns=123))
    assert pong == Pong(echo_sent_at_ns=123, received_at_ns=WALL + 5, replied_at_ns=WALL + 5,
                        pending=0)


def test_a_ping_before_hello_is_refused_with_hello_required() -> None:
    assert refusal(send(make_listener(), Ping(1))).code == RefuseCode.HELLO_REQUIRED


# -- malformed input --------------------------------------------------------------------------


@pytest.mark.parametrize("data", [b"", b"\xc1\xc1", b"\x92\xa5hello\x01", b"\x91" * 5000])
def test_undecodable_bytes_are_refused_as_malformed(data: bytes) -> None:
    listener = connected()
    assert refusal(receive(listener, "alice", data)).code == RefuseCode.MALFORMED
    [violation] = violations(listener)
    assert isinstance(violation.error, MalformedFrame)


@pytest.mark.parametrize(
    "frame",
    [
        Welcome(PROTOCOL_VERSION, "n", "alice", 0, 0, "full"),
        Refuse("x", "y"),
        ReceiptFrame([(1, 1)], 0, 0, 0, 0, 0, "full"),
        Reject([1], "c", "d"),
        Pong(1, 2, 3),
    ],
    ids=lambda f: type(f).__name__,
)
def test_frames_meant_for_a_dialer_are_refused(frame: Frame) -> None:
    listener = connected()
    assert refusal(send(listener, frame)).code == RefuseCode.MALFORMED
    assert len(violations(listener)) == 1


def test_a_frame_over_the_size_limit_is_refused_without_decoding() -> None:
    listener = connected(max_message_bytes=16)
    data = b"\xc1" * (listener.max_frame_bytes + 1)
    refused = refusal(receive(listener, "alice", data))
    assert refused.code == RefuseCode.MALFORMED
    assert "exceeds" in refused.detail


def test_the_frame_limit_fits_a_full_batch_of_maximal_messages() -> None:
    listener = connected(max_message_bytes=1_000)
    # As many messages as a batch holds, with as many body characters as it allows, each
    # character (and the ids') 4 bytes long.
    body = "\U0001d11e" * (MAX_BATCH_BODY_BYTES // MAX_BATCH_MESSAGES)
    big = [msg(s, body, id=f"{s:04d}" + "\U0001d11e" * (MAX_ID_LENGTH - 4))
           for s in range(1, MAX_BATCH_MESSAGES + 1)]
    assert len(encode(Batch(WALL, big))) <= listener.max_frame_bytes
    assert send(listener, Batch(WALL, big)) == []
    [arrived] = arrivals(listener)
    assert len(arrived.messages) == MAX_BATCH_MESSAGES


@pytest.mark.parametrize("max_message_bytes", [1, 64 * 1024, 16 * 1024 * 1024])
def test_the_frame_limit_is_the_largest_batch_and_not_a_batch_of_the_largest_messages(
    max_message_bytes: int,
) -> None:
    # A batch of several messages holds at most MAX_BATCH_BODY_BYTES characters, so the limit
    # grows with the message limit only once a lone message outgrows that budget: 2.1 MB at
    # the default 64 KiB (3.1 MB since envelopes may carry a pattern header), not the 33.7 MB
    # (8 GiB at 16 MiB) a full batch of maximal ones took.
    limit = connected(max_message_bytes=max_message_bytes).max_frame_bytes
    overheads = MAX_BATCH_MESSAGES * ENVELOPE_OVERHEAD_BYTES + FRAME_OVERHEAD_BYTES
    assert limit == max(max_message_bytes, 4 * MAX_BATCH_BODY_BYTES) + overheads
    assert limit <= max_message_bytes + 3 * 1024 * 1024 + MAX_BATCH_MESSAGES * 512


# -- validating messages ----------------------------------------------------------------------


def test_valid_messages_arrive_with_the_batch_timestamps() -> None:
    listener = connected()
    assert send(listener, Batch(WALL - 3, [msg(1), msg(2)])) == []
    [arrived] = arrivals(listener)
    assert arrived == MessagesArrived("alice", [msg(1), msg(2)], WALL - 3, WALL + 5, "alice")


def test_an_empty_batch_is_harmless() -> None:
    listener = connected()
    assert send(listener, Batch(WALL, [])) == []
    assert listener.events() == []


@pytest.mark.parametrize(
    ("bad", "code", "why"),
    [
        (msg(1, sender="carol"), RejectCode.INVALID, "sender"),
        (msg(1, recipient="dave"), RejectCode.INVALID, "recipient"),
        (msg(1, ""), RejectCode.INVALID, "empty body"),
        (msg(0), RejectCode.INVALID, "seq must be positive"),
        (msg(-5), RejectCode.INVALID, "seq must be positive"),
        (msg(1, id=""), RejectCode.INVALID, "message id"),
        (msg(1, id="x" * (MAX_ID_LENGTH + 1)), RejectCode.INVALID, "message id"),
        (msg(1, "x" * (LIMIT + 1)), RejectCode.TOO_LARGE, "exceeds"),
        (msg(1, "é" * (LIMIT // 2 + 1)), RejectCode.TOO_LARGE, "exceeds"),
        (msg(1, "😀" * (LIMIT // 4 + 1)), RejectCode.TOO_LARGE, "exceeds"),
    ],
    ids=[
        "impersonated-sender", "wrong-recipient", "empty-body", "zero-seq", "negative-seq",
        "empty-id", "long-id", "ascii-too-large", "two-byte-too-large", "four-byte-too-large",
    ],
)
def test_invalid_messages_are_rejected_and_never_arrive(
    bad: Envelope, code: str, why: str
) -> None:
    listener = connected()
    [reject] = send(listener, Batch(WALL, [bad]))
    assert isinstance(reject, Reject)
    assert (reject.seqs, reject.code) == ([bad.seq], code)
    assert why in reject.detail
    events = listener.events()
    assert [type(e) for e in events] == [ViolationDetected]
    assert events[0].who == "alice"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "bad",
    [
        Envelope("m1", 2**63, "alice", "bob", "hi", WALL, 1),
        Envelope("m1", 1, "alice", "bob", "hi", 2**63, 1),
        Envelope("m1", 1, "alice", "bob", "hi", 2**64 - 1, 1),
        Envelope("m1", 1, "alice", "bob", "hi", WALL, 2**64 - 1),
    ],
    ids=["seq", "sent-at", "max-unsigned-sent-at", "hlc"],
)
def test_numbers_a_database_cannot_hold_are_rejected(bad: Envelope) -> None:
    listener = connected()
    [reject] = send(listener, Batch(WALL, [bad]))
    assert isinstance(reject, Reject)
    assert (reject.seqs, reject.code) == ([bad.seq], RejectCode.INVALID)
    assert "64-bit" in reject.detail
    assert arrivals(listener) == []


def test_the_extremes_of_64_bit_numbers_are_accepted() -> None:
    listener = connected()
    edge = Envelope("m1", 2**63 - 1, "alice", "bob", "hi", -(2**63), 2**63 - 1)
    assert send(listener, Batch(WALL, [edge])) == []
    assert arrivals(listener)[0].messages == [edge]


@pytest.mark.parametrize("body", ["x" * LIMIT, "é" * (LIMIT // 2), "😀" * (LIMIT // 4), "€" * 170])
def test_bodies_up_to_the_byte_limit_are_accepted(body: str) -> None:
    listener = connected()
    assert send(listener, Batch(WALL, [msg(1, body)])) == []
    assert arrivals(listener)[0].messages == [msg(1, body)]


def test_a_mixed_batch_delivers_the_good_and_groups_rejections_by_code() -> None:
    listener = connected()
    batch = Batch(
        WALL,
        [msg(1), msg(2, sender="carol"), msg(3), msg(4, "x" * 600), msg(5, ""), msg(6, "y" * 999)],
    )
    replies = send(listener, batch)
    rejects = {r.code: r.seqs for r in replies if isinstance(r, Reject)}
    assert rejects == {RejectCode.INVALID: [2, 5], RejectCode.TOO_LARGE: [4, 6]}
    [arrived] = arrivals(listener)
    assert [m.seq for m in arrived.messages] == [1, 3]


@pytest.mark.parametrize(
    ("bad", "code"),
    [
        (msg(9, sender="carol"), RejectCode.INVALID),
        (msg(9, recipient="dave"), RejectCode.INVALID),
        (msg(9, "x" * (LIMIT + 1)), RejectCode.TOO_LARGE),
        (Envelope("m9", 9, "alice", "bob", "hi", WALL, 1, PatternHeader(Kind.TASK, "", "q")),
         RejectCode.INVALID),
    ],
    ids=["impersonated-sender", "wrong-recipient", "too-large", "bad-header"],
)
def test_one_bad_message_after_many_good_ones_is_found_and_rejected_alone(
    bad: Envelope, code: str
) -> None:
    """The fast check of a decoded batch looks at every message, not the first only."""
    listener = connected()
    replies = send(listener, Batch(WALL, [msg(s) for s in range(1, 9)] + [bad]))
    assert [(r.seqs, r.code) for r in replies if isinstance(r, Reject)] == [([9], code)]
    [arrived] = arrivals(listener)
    assert [m.seq for m in arrived.messages] == list(range(1, 9))


def test_a_mixed_batch_reports_the_good_messages_as_arrived() -> None:
    listener = connected()
    send(listener, Batch(WALL, [msg(1), msg(2, sender="carol"), msg(3)]))
    events = listener.events()
    assert [type(e) for e in events] == [ViolationDetected, MessagesArrived]
    arrived = events[1]
    assert isinstance(arrived, MessagesArrived)
    assert [m.seq for m in arrived.messages] == [1, 3]


def test_sessions_are_per_connection() -> None:
    listener = connected()
    send(listener, hello("carol"), identity="carol")
    listener.events()
    [reject] = send(listener, Batch(WALL, [msg(1, sender="alice")]), identity="carol")
    assert isinstance(reject, Reject)
    assert reject.code == RejectCode.INVALID
    send(listener, Batch(WALL, [msg(1, sender="carol")]), identity="carol")
    assert arrivals(listener)[0].peer == "carol"


# -- receipts ---------------------------------------------------------------------------------


def arrived_batch(*seqs: int) -> MessagesArrived:
    return MessagesArrived("alice", [msg(s) for s in seqs], echo_tx_at_ns=11, received_at_ns=22,
                           connection="alice")


def test_stored_builds_a_receipt_with_ranges_and_all_four_timestamps() -> None:
    listener = connected()
    frames = stored(
        listener, arrived_batch(1, 2, 3, 7), committed=[7, 1, 3, 2], conflicts=[],
        stored_at_ns=33, replied_at_ns=44, hlc=55,
    )
    assert frames == [ReceiptFrame([(1, 3), (7, 7)], 11, 22, 33, 44, 55, "normal")]


def test_stored_rejects_conflicts_and_receipts_the_rest() -> None:
    listener = connected()
    frames = stored(
        listener, arrived_batch(1, 2, 3, 4), committed=[1, 4], conflicts=[3, 2],
        stored_at_ns=33, replied_at_ns=44, hlc=55,
    )
    assert len(frames) == 2
    assert isinstance(frames[0], ReceiptFrame)
    assert frames[0].ranges == [(1, 1), (4, 4)]
    assert isinstance(frames[1], Reject)
    assert (frames[1].seqs, frames[1].code) == ([2, 3], RejectCode.CONFLICT)


def test_stored_rejects_what_the_store_refused_once_per_cause_after_the_receipt() -> None:
    listener = connected()
    frames = stored(
        listener, arrived_batch(1, 2, 3, 4, 5), committed=[1, 3], conflicts=[],
        refused=[(5, "NOT NULL"), (2, "too big"), (4, "NOT NULL")],
        stored_at_ns=33, replied_at_ns=44, hlc=55,
    )
    assert isinstance(frames[0], ReceiptFrame)
    assert frames[0].ranges == [(1, 1), (3, 3)]
    assert frames[1:] == [Reject([4, 5], RejectCode.UNSTORABLE, "NOT NULL"),
                          Reject([2], RejectCode.UNSTORABLE, "too big")]


def test_stored_with_nothing_committed_sends_nothing() -> None:
    listener = connected()
    assert stored(
        listener, arrived_batch(1), committed=[], conflicts=[], stored_at_ns=1,
        replied_at_ns=2, hlc=3,
    ) == []


def test_to_ranges_collapses_runs() -> None:
    assert to_ranges([]) == []
    assert to_ranges([5]) == [(5, 5)]
    assert to_ranges([1, 2, 3, 7]) == [(1, 3), (7, 7)]
    assert to_ranges([9, 8, 1, 9, 2, 10]) == [(1, 2), (8, 10)]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(-1_000, 1_000), max_size=200))
def test_to_ranges_covers_exactly_the_seqs_in_sorted_disjoint_runs(seqs: list[int]) -> None:
    ranges = to_ranges(seqs)
    covered = [s for lo, hi in ranges for s in range(lo, hi + 1)]
    assert covered == sorted(set(seqs))
    assert all(lo <= hi for lo, hi in ranges)
    # Runs are maximal: a gap of at least one seq separates neighbours.
    assert all(a[1] + 1 < b[0] for a, b in itertools.pairwise(ranges))


def test_the_repr_lists_sessions() -> None:
    assert "alice" in repr(connected())


# -- sessions are per connection (issue 16, item 1) -------------------------------------------


def test_a_second_connection_claiming_a_name_in_session_is_reported_and_both_are_answered() -> None:
    listener = connected()  # connection "alice" said Hello as alice
    [welcome] = send(listener, hello(), identity="c2")  # another connection, the same name
    assert isinstance(welcome, Welcome)
    [claimed] = [e for e in listener.events() if isinstance(e, SessionClaimed)]
    assert (claimed.peer, claimed.connection, claimed.sessions) == ("alice", "c2", 2)
    # The first connection keeps its session: its batches still arrive as alice's.
    assert send(listener, Batch(WALL, [msg(1)])) == []
    assert [a.peer for a in arrivals(listener)] == ["alice"]
    assert listener.session_peer("alice") == listener.session_peer("c2") == "alice"


def test_a_borrower_cannot_evict_a_session_that_is_sending() -> None:
    listener = connected()
    for i in range(10):
        send(listener, hello(), identity=f"x{i}")
        send(listener, Batch(WALL, [msg(i + 1)]))  # the real alice keeps sending
    assert listener.session_peer("alice") == "alice"
    sessions = [c for c in ["alice", *(f"x{i}" for i in range(10))] if listener.session_peer(c)]
    assert len(sessions) == MAX_SESSIONS_PER_PEER


def test_without_a_key_a_hello_is_not_tied_to_the_connection_id() -> None:
    listener = make_listener()
    [welcome] = send(listener, hello("alice"), identity="00deadbeef")
    assert isinstance(welcome, Welcome)
    assert listener.session_peer("00deadbeef") == "alice"


def test_without_a_key_a_live_peers_name_is_refused_to_another_node_id() -> None:
    listener = connected()
    borrowed = Hello(PROTOCOL_VERSION, "intruder", "alice", WALL, 1)
    refused = refusal(send(listener, borrowed, "c2"))
    assert refused.code == RefuseCode.IDENTITY
    [claimed] = [e for e in listener.events() if isinstance(e, SessionClaimed)]
    assert claimed.refused and claimed.peer == "alice"
    assert listener.session_peer("c2") is None
    # Once alice's session has been silent long enough, another node may take the name.
    later = WALL + 5 + LIVE_SESSION_NS
    [welcome] = send(listener, borrowed, "c3", wall_ns=later)
    assert isinstance(welcome, Welcome)


def test_a_receipt_goes_to_the_connection_the_batch_came_on_not_to_the_name() -> None:
    listener = connected()  # connection "alice" said Hello as alice
    send(listener, hello(), identity="c2")  # alice again, on another connection (a restart)
    listener.events()
    assert send(listener, Batch(WALL, [msg(1)]), identity="c2") == []
    [arrived] = arrivals(listener)
    assert (arrived.peer, arrived.connection) == ("alice", "c2")
    listener.stored(arrived, committed=[1], conflicts=[], stored_at_ns=1, replied_at_ns=2, hlc=3)
    [(to, receipt)] = listener.frames_to_send()
    assert to == "c2"
    assert isinstance(receipt, ReceiptFrame)


# -- a session superseded by a redial (issue 20 item 5) ---------------------------------------


def taken_on(listener: Listener, identity: str, *seqs: int) -> list[MessagesArrived]:
    """alice's batches, one per seq, taken on connection `identity` (not yet stored)."""
    for seq in seqs:
        assert send(listener, Batch(WALL, [msg(seq)]), identity=identity) == []
    return arrivals(listener)


def pong(frames: list[Frame]) -> Pong:
    assert isinstance(frames[-1], Pong)
    return frames[-1]


def test_a_pong_counts_the_pending_batches_of_the_sessions_it_superseded() -> None:
    listener, token = connected_with_token()  # connection "alice"
    taken_on(listener, "alice", 1, 2)
    resumed(listener, "c2", token)  # alice redialled: same name, node id, and her token
    assert pong(send(listener, Ping(WALL), identity="c2")).pending == 2
    assert pong(send(listener, Ping(WALL))).pending == 2  # the old session's own count


def test_answers_to_a_superseded_session_go_to_its_successor_with_its_next_answer() -> None:
    listener, token = connected_with_token()
    [first, second] = taken_on(listener, "alice", 1, 2)
    resumed(listener, "c2", token)
    listener.events()
    [receipt] = stored(listener, first, committed=[1], conflicts=[], stored_at_ns=1,
                       replied_at_ns=2, hlc=3)  # still sent on the old connection
    assert isinstance(receipt, ReceiptFrame)
    frames = send(listener, Ping(WALL), identity="c2")
    assert frames[:-1] == [receipt]  # ahead of the Pong
    assert pong(frames).pending == 1
    assert send(listener, Ping(WALL), identity="c2")[:-1] == []  # sent once
    stored(listener, second, committed=[], conflicts=[2], stored_at_ns=1, replied_at_ns=2,
           hlc=3)
    [reject] = send(listener, Batch(WALL, [msg(3)]), identity="c2")  # with a Batch's answer
    assert isinstance(reject, Reject)
    assert reject.code == RejectCode.CONFLICT


def test_a_session_of_another_node_id_supersedes_nothing() -> None:
    listener = connected()
    [first] = taken_on(listener, "alice", 1)
    later = WALL + 5 + LIVE_SESSION_NS  # alice silent long enough for another node to take it
    other = Hello(PROTOCOL_VERSION, "node-other", "alice", WALL, 1)
    [welcome] = send(listener, other, identity="c2", wall_ns=later)
    assert isinstance(welcome, Welcome)
    stored(listener, first, committed=[1], conflicts=[], stored_at_ns=1, replied_at_ns=2, hlc=3)
    frames = send(listener, Ping(WALL), identity="c2", wall_ns=later)
    assert [type(f) for f in frames] == [Pong]
    assert pong(frames).pending == 0


def test_answers_kept_for_a_successor_are_bounded() -> None:
    listener, token = connected_with_token()
    arrived = taken_on(listener, "alice", *range(1, MAX_FORWARDED_ANSWERS + 11))
    resumed(listener, "c2", token)
    for a in arrived:
        stored(listener, a, committed=[a.messages[0].seq], conflicts=[], stored_at_ns=1,
               replied_at_ns=2, hlc=3)
    frames = send(listener, Ping(WALL), identity="c2")
    receipts = [f for f in frames if isinstance(f, ReceiptFrame)]
    assert len(receipts) == MAX_FORWARDED_ANSWERS
    assert receipts[0].ranges == [(11, 11)]  # the oldest went


def test_a_hello_repeated_on_its_own_connection_keeps_what_is_pending_and_forwarded() -> None:
    listener, token = connected_with_token()
    [first] = taken_on(listener, "alice", 1)
    resumed(listener, "c2", token)
    taken_on(listener, "c2", 2)
    stored(listener, first, committed=[1], conflicts=[], stored_at_ns=1, replied_at_ns=2, hlc=3)
    send(listener, hello(resume=token), identity="c2")  # the dialer retried its Hello
    frames = send(listener, Ping(WALL), identity="c2")
    assert [type(f) for f in frames] == [ReceiptFrame, Pong]
    assert pong(frames).pending == 1


# -- pattern headers --------------------------------------------------------------------------


def headed(seq: int, header: PatternHeader) -> Envelope:
    return Envelope(f"m{seq}", seq, "alice", "bob", "hi", WALL, seq, header)


def test_a_batch_with_good_and_bad_headers_rejects_only_the_bad_ones() -> None:
    listener = connected()
    good = headed(2, PatternHeader(Kind.REPLY, "m0"))
    # One header fails header_problem (a reply needs a ref); one fails decoding (no such kind)
    # and arrives through the unchecked path; the plain and the good headed message arrive.
    no_ref = headed(3, PatternHeader(Kind.REPLY))
    wire = msgspec.msgpack.encode(
        ["batch", WALL, [msgspec.structs.astuple(msg(1)), msgspec.structs.astuple(good),
                         msgspec.structs.astuple(no_ref),
                         [*msgspec.structs.astuple(msg(4))[:7], ["bogus", "x"]]]])
    [reject] = receive(listener, "alice", wire, WALL + 5)
    assert isinstance(reject, Reject)
    assert (reject.code, reject.seqs) == (RejectCode.INVALID, [3, 4])
    assert "ref" in reject.detail
    [arrived] = arrivals(listener)
    assert arrived.messages == [msg(1), good]


def test_serve_records_with_a_prefetch_that_is_no_count_are_rejected_alone() -> None:
    """0, a negative, beyond int64, a string, a float: each such `serve` record is refused
    `invalid` by itself (a string in the header used to be a type the unchecked path could
    not hold: the whole batch, the good messages too, would have been malformed); the plain
    message and the good record beside them arrive."""
    listener = connected()
    serve = ["serve", "", "work", "", 0, 0, 7]
    good = headed(2, PatternHeader(Kind.SERVE, "", "work", version=7, prefetch=64))
    bad = [0, -1, 2**64 - 1, "many", 1.5]
    wire = msgspec.msgpack.encode(
        ["batch", WALL, [msgspec.structs.astuple(msg(1)), msgspec.structs.astuple(good),
                         *([*msgspec.structs.astuple(msg(seq))[:7], [*serve, value]]
                           for seq, value in enumerate(bad, start=3))]])
    [reject] = receive(listener, "alice", wire, WALL + 5)
    assert isinstance(reject, Reject)
    assert (reject.code, reject.seqs) == (RejectCode.INVALID, [3, 4, 5, 6, 7])
    assert "prefetch" in reject.detail
    [arrived] = arrivals(listener)
    assert arrived.messages == [msg(1), good]
    assert arrived.messages[1].header is not None
    assert arrived.messages[1].header.prefetch == 64


def test_a_seven_field_envelope_from_an_older_node_arrives_without_header() -> None:
    listener = connected()
    wire = msgspec.msgpack.encode(["batch", WALL, [msgspec.structs.astuple(msg(1))[:7]]])
    assert wire != encode(Batch(WALL, [msg(1)]))  # today's envelope has 8 elements
    assert receive(listener, "alice", wire, WALL + 5) == []
    [arrived] = arrivals(listener)
    assert arrived.messages == [msg(1)] and arrived.messages[0].header is None


def test_a_batch_on_an_open_session_keeps_it_open_and_arrives_as_the_table_says() -> None:
    """`receive` takes a batch on an open session ahead of the table (the usual frame): it
    does what `TRANSITIONS` says for it, and nothing else."""
    assert listener_module.TRANSITIONS[SessionState.OPEN, SessionInput.BATCH] == (
        listener_module.Step(SessionState.OPEN, listener_module.Answer.ARRIVED))


_FRAMES = st.one_of(
    st.builds(
        lambda tx, specs: Batch(tx, [
            Envelope(f"m{seq}", seq, sender, recipient, "x" * size, WALL, seq)
            for seq, sender, recipient, size in specs]),
        st.integers(0, 3),
        st.lists(st.tuples(st.integers(0, 4), st.sampled_from(["alice", "carol"]),
                           st.sampled_from(["bob", "eve"]),
                           st.sampled_from([0, 1, 40, LIMIT, LIMIT + 1])), max_size=4)),
    st.builds(Ping, st.integers(0, 3)),
    st.just(hello()),
    st.just(Bye("going")),
)


@given(st.lists(st.tuples(st.sampled_from(["alice", "other"]), _FRAMES), max_size=12))
def test_the_fast_path_of_a_batch_does_what_the_general_path_does(
    frames: list[tuple[str, Frame]],
) -> None:
    """Frames (batches of good and bad messages, on open sessions or not, pings, Hellos and
    Byes) to two listeners, one of which never takes the fast path: both answer, report
    and keep the same."""
    def tokens() -> Callable[[], bytes]:
        count = itertools.count()
        return lambda: next(count).to_bytes(RESUME_TOKEN_BYTES, "big")

    def seen(listener: Listener) -> tuple[Any, ...]:
        frames, events = listener.output()
        return (frames,
                [(type(e), e.who, type(e.error), str(e.error)) if isinstance(e, ViolationDetected)
                 else e for e in events],
                {c: (s.state, s.pending, s.last_active, s.last_active_ns)
                 for c, s in listener._sessions.items()})

    fast, general = (Listener(local_name="bob", local_node_id="node-b",
                              known_peers=["alice", "carol"], max_message_bytes=LIMIT,
                              sync="normal", new_token=tokens()) for _ in range(2))
    for i, (connection, frame) in enumerate(frames):
        data = encode(frame)
        fast.receive(connection, data, WALL + i, 7)
        with mock.patch.object(listener_module, "_OPEN", object()):  # never an open state
            general.receive(connection, data, WALL + i, 7)
        assert seen(fast) == seen(general)


def test_output_is_the_frames_and_the_events_at_once() -> None:
    listener = connected()
    listener.receive("alice", encode(Batch(3, [msg(1), msg(2, "")])), WALL, 0)
    frames, events = listener.output()
    assert [type(f) for _to, f in frames] == [Reject]
    assert [type(e) for e in events] == [ViolationDetected, MessagesArrived]
    assert listener.output() == ([], [])

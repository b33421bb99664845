"""Request/reply tracking in virtual time: a timeout says whether the request was delivered,
a late reply is still linked, a reply from the wrong peer is not."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshpost.protocol import requests
from meshpost.protocol.requests import (
    PendingRequest,
    ReplyUnmatched,
    RequestAnswered,
    RequestOutcome,
    RequestTimedOut,
    RequestTracker,
)


def test_a_reply_in_time_answers_its_request() -> None:
    t = RequestTracker()
    t.sent("q1", "B", now=0.0, timeout_s=5.0)
    assert t.outcome("q1") is RequestOutcome.NOT_DELIVERED and t.next_timer() == 5.0
    t.delivered("q1")
    assert t.outcome("q1") is RequestOutcome.DELIVERED_UNANSWERED
    t.answered("q1", "q1.r", "B")
    assert t.events() == [RequestAnswered("q1", "B", "q1.r", late=False)]
    assert t.outcome("q1") is None and t.waiting() == 0 and t.next_timer() is None
    t.on_timer(10.0)
    assert t.events() == []


@pytest.mark.parametrize(
    ("receipted", "outcome"),
    [(False, RequestOutcome.NOT_DELIVERED), (True, RequestOutcome.DELIVERED_UNANSWERED)],
)
def test_a_timeout_says_whether_the_peer_had_the_request(receipted: bool,
                                                          outcome: RequestOutcome) -> None:
    t = RequestTracker()
    t.sent("q1", "B", 0.0, 5.0)
    if receipted:
        t.delivered("q1")
    t.on_timer(4.999)
    assert t.events() == []
    t.on_timer(5.0)
    assert t.events() == [RequestTimedOut("q1", "B", outcome)]
    assert t.waiting() == 0 and t.outcome("q1") is outcome


def test_a_reply_after_the_timeout_is_linked_and_reported_late() -> None:
    t = RequestTracker()
    t.sent("q1", "B", 0.0, 5.0)
    t.on_timer(6.0)
    t.delivered("q1")  # the receipt came late as well
    assert t.outcome("q1") is RequestOutcome.DELIVERED_UNANSWERED
    t.events()
    t.answered("q1", "q1.r", "B")
    assert t.events() == [RequestAnswered("q1", "B", "q1.r", late=True)]


def test_a_reply_from_another_peer_or_to_no_request_is_not_linked() -> None:
    t = RequestTracker()
    t.sent("q1", "B", 0.0, None)
    t.answered("q1", "x.r", "C")
    t.answered("q9", "y.r", "B")
    events = t.events()
    assert [type(e) for e in events] == [ReplyUnmatched, ReplyUnmatched]
    assert "went to 'B'" in events[0].reason and "no such request" in events[1].reason
    assert t.outcome("q1") is RequestOutcome.NOT_DELIVERED  # still waits for B
    assert t.next_timer() is None  # no timeout: it waits until answered


def test_after_a_restart_unanswered_requests_are_linked_when_their_reply_comes() -> None:
    t = RequestTracker.restore([PendingRequest("q1", "B", delivered=True),
                                PendingRequest("q2", "C", delivered=False)])
    assert t.outcome("q1") is RequestOutcome.DELIVERED_UNANSWERED
    assert t.outcome("q2") is RequestOutcome.NOT_DELIVERED
    assert t.waiting() == 0 and t.next_timer() is None
    t.answered("q2", "q2.r", "C")
    assert t.events() == [RequestAnswered("q2", "C", "q2.r", late=True)]


def test_expired_requests_are_remembered_up_to_a_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(requests, "MAX_EXPIRED_REMEMBERED", 2)
    t = RequestTracker()
    for i in range(3):
        t.sent(f"q{i}", "B", 0.0, 1.0)
    t.on_timer(1.0)
    assert len(t.events()) == 3
    assert t.outcome("q0") is None and t.outcome("q2") is RequestOutcome.NOT_DELIVERED
    t.answered("q0", "q0.r", "B")
    assert isinstance(t.events()[0], ReplyUnmatched)  # the store still links it by ref


def test_a_request_id_is_tracked_once() -> None:
    t = RequestTracker()
    t.sent("q1", "B", 0.0, 1.0)
    with pytest.raises(ValueError, match="already tracked"):
        t.sent("q1", "B", 0.0, 1.0)
    assert repr(t) == "<RequestTracker waiting=1 expired=0>"


request_ops = st.lists(st.one_of(
    st.tuples(st.just("send"), st.sampled_from(["B", "C"]),
              st.one_of(st.none(), st.floats(0.5, 10.0))),
    st.tuples(st.just("receipt"), st.integers(0, 20)),
    st.tuples(st.just("reply"), st.integers(0, 20), st.sampled_from(["B", "C"])),
    st.tuples(st.just("tick"), st.floats(0.1, 5.0)),
), max_size=60)


@settings(max_examples=300, deadline=None)
@given(request_ops)
def test_each_request_is_answered_once_or_timed_out_with_the_receipts_truth(
    ops: list[tuple[object, ...]]
) -> None:
    t = RequestTracker()
    now = 0.0
    sent: list[tuple[str, str, float | None]] = []  # (id, peer, deadline)
    receipted: dict[str, float] = {}  # id -> when its receipt came
    events: list[object] = []
    for op in ops:
        match op:
            case ("send", str(peer), timeout):
                request_id = f"q{len(sent)}"
                assert timeout is None or isinstance(timeout, float)
                t.sent(request_id, peer, now, timeout)
                sent.append((request_id, peer, None if timeout is None else now + timeout))
            case ("receipt", int(index)) if sent:
                request_id = sent[index % len(sent)][0]
                receipted.setdefault(request_id, now)
                t.delivered(request_id)
            case ("reply", int(index), str(sender)) if sent:
                request_id = sent[index % len(sent)][0]
                t.answered(request_id, f"{request_id}.r.{sender}", sender)
            case ("tick", float(seconds)):
                now += seconds
                t.on_timer(now)
        events.extend(t.events())
    peers = {request_id: peer for request_id, peer, _ in sent}
    deadlines = {request_id: deadline for request_id, _, deadline in sent}
    answered = [e for e in events if isinstance(e, RequestAnswered)]
    timed_out = [e for e in events if isinstance(e, RequestTimedOut)]
    # Answered at most once, only by the peer it went to; timed out at most once.
    assert len({e.request_id for e in answered}) == len(answered)
    assert all(e.reply_id == f"{e.request_id}.r.{peers[e.request_id]}" for e in answered)
    assert len({e.request_id for e in timed_out}) == len(timed_out)
    late = {e.request_id for e in timed_out}
    for e in answered:
        assert e.late == (e.request_id in late)
    for e in timed_out:
        deadline = deadlines[e.request_id]
        assert deadline is not None and deadline <= now
        # The outcome is the receipt's truth at the deadline.
        had_receipt = e.request_id in receipted and receipted[e.request_id] <= deadline
        assert (e.outcome is RequestOutcome.DELIVERED_UNANSWERED) == had_receipt
    for e in events:
        if isinstance(e, ReplyUnmatched):
            assert peers.get(e.request_id) != e.sender or e.request_id in {
                a.request_id for a in answered}

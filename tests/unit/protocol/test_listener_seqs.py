"""Seqs within one Batch: a seq names one envelope (receipts and rejects name messages by seq),
so a batch whose seqs repeat is refused for those seqs, clearly, and nothing else of it or of
the link is lost (docs/protocol.md 4.4 and 8.2)."""

from __future__ import annotations

import pytest
from tests.unit.protocol.test_listener import (
    WALL,
    arrivals,
    connected,
    msg,
    pong,
    send,
    stored,
)

from meshpost.errors import MalformedFrame
from meshpost.protocol import (
    Batch,
    Envelope,
    Frame,
    MessagesArrived,
    Ping,
    ReceiptFrame,
    Reject,
    RejectCode,
    ViolationDetected,
)


def rejects(frames: list[Frame]) -> list[tuple[list[int], str, str]]:
    return [(f.seqs, f.code, f.detail) for f in frames if isinstance(f, Reject)]


@pytest.mark.parametrize(
    "copies",
    [
        [msg(2, id="a"), msg(2, id="b")],  # two messages under one seq
        [msg(2), msg(2)],  # the same envelope twice
        [msg(2, id="a"), msg(2, id="b", recipient="dave")],  # one copy invalid on its own too
    ],
    ids=["two-ids", "same-envelope", "one-copy-also-invalid"],
)
def test_a_seq_repeated_in_a_batch_is_rejected_once_and_the_rest_arrives(
    copies: list[Envelope],
) -> None:
    """Before: every copy arrived (two messages stored under seq 2, one Receipt naming 2 for
    both, or a Receipt and a Reject both naming 2), so the sender could not know which of its
    messages the answer was about."""
    listener = connected()
    replies = send(listener, Batch(WALL, [msg(1), *copies, msg(3)]))
    [(seqs, code, detail)] = rejects(replies)
    assert (seqs, code) == ([2], RejectCode.INVALID)
    assert detail == "seq 2 appears 2 times in one batch: a seq names one message"
    events = listener.events()
    [violation] = [e for e in events if isinstance(e, ViolationDetected)]
    assert violation.who == "alice"
    assert isinstance(violation.error, MalformedFrame)
    assert "seq 2 appears 2 times" in str(violation.error)
    [arrived] = [e for e in events if isinstance(e, MessagesArrived)]
    assert [m.seq for m in arrived.messages] == [1, 3]


def test_every_repeated_seq_is_named_in_one_reject() -> None:
    listener = connected()
    batch = Batch(WALL, [msg(5), msg(1, id="x"), msg(5, id="y"), msg(1), msg(5, id="z"), msg(2)])
    [(seqs, code, detail)] = rejects(send(listener, batch))
    assert (seqs, code) == ([1, 5], RejectCode.INVALID)
    assert detail == ("seq 1 appears 2 times in one batch (and 1 more seq repeats): a seq "
                      "names one message")
    [arrived] = arrivals(listener)
    assert [m.seq for m in arrived.messages] == [2]


def test_a_batch_made_only_of_repeated_seqs_stores_nothing_and_the_link_goes_on() -> None:
    listener = connected()
    replies = send(listener, Batch(WALL, [msg(4, id="a"), msg(4, id="b")]))
    assert [r[:2] for r in rejects(replies)] == [([4], RejectCode.INVALID)]
    assert arrivals(listener) == []
    assert pong(send(listener, Ping(WALL))).pending == 0  # nothing waits to be stored
    # The session goes on: the next batch is taken and receipted as usual.
    assert send(listener, Batch(WALL, [msg(4, id="c"), msg(5)])) == []
    [arrived] = arrivals(listener)
    [receipt] = stored(listener, arrived, committed=[4, 5], conflicts=[], stored_at_ns=1,
                       replied_at_ns=2, hlc=3)
    assert isinstance(receipt, ReceiptFrame)
    assert receipt.ranges == [(4, 5)]


@pytest.mark.parametrize(
    "seqs", [[3, 1, 2], [1, 5, 9], [7]], ids=["out-of-order", "gaps", "one"]
)
def test_seqs_out_of_order_or_with_gaps_are_accepted(seqs: list[int]) -> None:
    """Only a repeat is malformed: a retransmission has gaps (what was settled between), and
    the listener neither tracks seqs nor needs their order (section 5.4)."""
    listener = connected()
    assert send(listener, Batch(WALL, [msg(s) for s in seqs])) == []
    [arrived] = arrivals(listener)
    assert [m.seq for m in arrived.messages] == seqs

"""`meshpost send --to all|G` and `broadcast status` print one line per member's receipt; each
line's `delivered k/n` counts the receipts up to that member, also when the node's answer
brings several at once (a newcomer saw `✓ delivered to B: delivered 5/5` and then
`✓ delivered to C: delivered 5/5`)."""

from __future__ import annotations

import argparse
import time

import pytest

from meshpost.cli.send import follow_broadcast
from meshpost.control.messages import BroadcastReply, BroadcastStatusRequest
from meshpost.errors import EXIT_OK, EXIT_TIMEOUT
from meshpost.protocol.groups import BroadcastStatus


class FakeClient:
    """Answers each long poll with the next status of a script (a node's control socket)."""

    def __init__(self, *statuses: BroadcastStatus) -> None:
        self.statuses = list(statuses)
        self.polls: list[BroadcastStatusRequest] = []

    def request(self, request: BroadcastStatusRequest, *, timeout_s: float) -> BroadcastReply:
        self.polls.append(request)
        return BroadcastReply(status=self.statuses.pop(0))


def _args(timeout_s: float = 5.0) -> argparse.Namespace:
    return argparse.Namespace(quiet=False, timeout=timeout_s)


def _status(delivered: tuple[str, ...], pending: tuple[str, ...]) -> BroadcastStatus:
    return BroadcastStatus("m-1", "all", 5, delivered, pending)


def test_receipts_that_come_together_are_each_counted_in_their_turn(
    capsys: pytest.CaptureFixture[str],
) -> None:
    first = _status(("D", "E", "F"), ("B", "C"))
    client = FakeClient(_status(("D", "E", "F", "B", "C"), ()))
    code = follow_broadcast(client, first, _args(), time.monotonic() + 5)  # type: ignore[arg-type]
    out = capsys.readouterr().out.splitlines()
    assert code == EXIT_OK
    assert out == [
        "✓ delivered to D: delivered 1/5 (pending: E, F, B, C)",
        "✓ delivered to E: delivered 2/5 (pending: F, B, C)",
        "✓ delivered to F: delivered 3/5 (pending: B, C)",
        "✓ delivered to B: delivered 4/5 (pending: C)",
        "✓ delivered to C: delivered 5/5",
    ]
    assert [p.seen for p in client.polls] == [3]


def test_the_final_note_counts_every_receipt_when_members_stay_pending(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = follow_broadcast(FakeClient(), _status(("B", "C"), ("D", "E", "F")),  # type: ignore[arg-type]
                            _args(timeout_s=0), time.monotonic())
    out, err = capsys.readouterr()
    assert code == EXIT_TIMEOUT
    assert out.splitlines()[-1] == "✓ delivered to C: delivered 2/5 (pending: D, E, F)"
    assert "delivered 2/5 (pending: D, E, F) within 0s" in err

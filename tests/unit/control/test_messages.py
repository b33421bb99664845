"""The control records: a tagged union each way, ids echoed, errors with kind and exit code."""

from __future__ import annotations

import msgspec
import pytest

from meshpost.control.messages import (
    BroadcastProgressInfo,
    BroadcastReply,
    BroadcastRequest,
    BroadcastStatusRequest,
    ErrorReply,
    EventsReply,
    EventsRequest,
    PeersReply,
    PeersRequest,
    QueueStatusReply,
    QueueStatusRequest,
    SendReply,
    SendRequest,
    SendResult,
    StatusReply,
    StatusRequest,
    TailReply,
    TailRequest,
    checked,
    encoder,
    reply_decoder,
    request_decoder,
)
from meshpost.errors import NotStored, RemoteError, UnknownPeer
from meshpost.protocol.groups import BroadcastStatus
from meshpost.protocol.workqueue import QueueStatus, WorkerStatus
from meshpost.store import StoredMessage


@pytest.mark.parametrize("request_", [
    SendRequest("B", "hi", 1.5, id=7), PeersRequest(id=8), StatusRequest(id=9),
    EventsRequest(0.5, id=10), TailRequest(id=11),
    TailRequest(after=5, sender="A", limit=3, wait_s=1.0, id=12),
    BroadcastRequest("team", "hi", id=13), BroadcastStatusRequest("lid", 2, 1.5, id=14),
    QueueStatusRequest(id=15), QueueStatusRequest("work", id=16),
])
def test_every_request_round_trips_with_its_id(request_: object) -> None:
    assert request_decoder.decode(encoder.encode(request_)) == request_


@pytest.mark.parametrize("reply", [
    SendReply(sent=[SendResult("B", "x", 1, 2, True)], id=1), PeersReply(id=2),
    StatusReply(status={"name": "A"}, id=3), EventsReply(dropped=4, id=4),
    ErrorReply.of(UnknownPeer("Z", ["B"]), 5), TailReply(cursor=9, id=6),
    TailReply(cursor=3, messages=[StoredMessage(
        "id1", "in", "A", "A", "B", 1, "hi", 2, 3, "received", 4, None, None, None, None, None,
        None)], id=7),
    BroadcastReply(status=BroadcastStatus("lid", "team", 3, ("B",), ("C",), (("D", "no"),)),
                   id=8),
    QueueStatusReply(queues=[QueueStatus("work", (WorkerStatus("W1", True, False, 3),),
                                         waiting=1, in_flight=3, leased=2, done=9,
                                         redelivered=1, results=4)], id=9),
])
def test_every_reply_round_trips_with_its_id(reply: object) -> None:
    assert reply_decoder.decode(encoder.encode(reply)) == reply


def test_an_earlier_broadcasts_progress_is_an_event_an_attached_console_receives() -> None:
    """The node's `BroadcastProgress` (k/n of a broadcast posted before it restarted) goes
    out on the `events` stream as a typed record and comes back as the same event."""
    from meshpost.control.server import _info
    from meshpost.node import BroadcastProgress
    from meshpost.remote import console_events

    status = BroadcastStatus("lid", "team", 3, ("B",), ("C",), (("D", "no"),))
    info = _info(BroadcastProgress(status))
    assert info == BroadcastProgressInfo(status)
    reply = EventsReply(broadcasts=[info], id=5)
    wire = encoder.encode(reply)
    assert reply_decoder.decode(wire) == reply
    assert msgspec.msgpack.decode(wire)["broadcasts"] == [{
        "status": {"logical_id": "lid", "target": "team", "total": 3, "delivered": ["B"],
                   "pending": ["C"], "rejected": [["D", "no"]]}}]
    assert console_events(reply_decoder.decode(wire), "A") == [BroadcastProgress(status)]


def test_a_request_of_unknown_type_or_shape_fails_to_decode() -> None:
    with pytest.raises(msgspec.ValidationError):
        request_decoder.decode(encoder.encode({"type": "reboot", "id": 1}))
    with pytest.raises(msgspec.ValidationError):
        request_decoder.decode(encoder.encode({"type": "send", "id": 1, "target": "B"}))


def test_an_error_reply_says_kind_and_exit_code_and_checked_raises_it() -> None:
    reply = ErrorReply.of(NotStored("A", "disk full"), 3)
    assert (reply.ok, reply.kind, reply.exit_code, reply.id) == (False, "not_stored", 6, 3)
    assert "NOT stored" in reply.message
    with pytest.raises(RemoteError) as caught:
        checked(reply)
    assert (caught.value.kind, caught.value.exit_code) == ("not_stored", 6)
    ok = SendReply(id=4)
    assert checked(ok) is ok and ok.ok


def test_protocol_md_lists_every_request_and_reply_type() -> None:
    """docs/protocol.md 14.3 and 14.4 name every tag of the two unions (a new request, such
    as `queue-status`, is documented with its fields where a client author looks)."""
    import typing
    from pathlib import Path

    from meshpost.control.messages import Reply, Request

    doc = (Path(__file__).resolve().parents[3] / "docs" / "protocol.md").read_text("utf-8")
    requests = doc.split("### 14.3")[1].split("### 14.4")[0]
    replies = doc.split("### 14.4")[1].split("### 14.5")[0]
    for union, table in ((Request, requests), (Reply, replies)):
        for record in typing.get_args(union):
            tag = record.__struct_config__.tag
            assert f'| `"{tag}"` |' in table, f"{tag!r} is not in docs/protocol.md's table"
    # Every kind of event the `events` reply carries, and its record's fields.
    events_row = next(line for line in replies.splitlines() if line.startswith('| `"events"`'))
    for field, info in EventsReply.__annotations__.items():
        if field != "dropped":
            assert f"`{field}`" in events_row, f"events field {field!r} is not documented"
            record = info.removeprefix("list[").removesuffix("]")
            assert f"| `{record}` |" in replies, f"{record} is not in docs/protocol.md's table"


@pytest.mark.parametrize("fields", [
    {"type": "send", "target": "B", "body": "hi", "timeout_s": float("nan")},
    {"type": "send", "target": "B", "body": "hi", "timeout_s": -1.0},
    {"type": "request", "to": "B", "body": "hi", "timeout_s": float("inf")},
    {"type": "events", "wait_s": float("nan")},
    {"type": "tail", "after": 0, "wait_s": float("nan")},
    {"type": "tail", "after": 2**63},
    {"type": "tail", "after": 0, "limit": 2**64 - 1},
    {"type": "broadcast-status", "logical_id": "x", "seen": 2**63, "wait_s": 1.0},
    {"type": "group-history", "group": "g", "wait_s": 1e300},
    {"type": "group-history", "group": "g", "before_hlc": 2**64 - 1},
])
def test_a_wait_that_is_not_a_number_of_seconds_or_an_integer_beyond_64_bits_fails_to_decode(
    fields: dict[str, object],
) -> None:
    """Found by the adversarial audit: a `tail` or `request` waiting NaN seconds was never
    answered (and a NaN in asyncio's timer heap misorders the node's other timers); a `tail`
    after 2**63 failed inside the store as an internal error. Both are `bad_request` now."""
    with pytest.raises(msgspec.ValidationError):
        request_decoder.decode(encoder.encode({**fields, "id": 1}))

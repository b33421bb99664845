"""The history request and reply bodies (docs/protocol.md 19.6): encoding, decoding, bounds."""

from __future__ import annotations

import pytest

from meshpost.protocol.header import Kind, PatternHeader, header_problem
from meshpost.protocol.history import (
    MAX_HISTORY_ITEMS,
    HistoryItem,
    HistoryQuery,
    HistoryRefusal,
    HistoryRefused,
    HistoryReplyInvalid,
    decode_query,
    decode_reply,
    encode_query,
    encode_refusal,
    encode_reply,
    history_group,
    history_header,
)


def items(n: int, body: str = "x") -> list[HistoryItem]:
    return [HistoryItem(f"id-{i:04d}", 1_000 + i, 10 + i, f"{body}{i}") for i in range(n)]


def test_the_header_names_the_group_and_marks_a_history_request() -> None:
    header = history_header("team")
    assert header == PatternHeader(Kind.REQUEST, queue="team")
    assert header_problem(header) is None
    assert history_group(header) == "team"
    assert history_group(PatternHeader(Kind.REQUEST)) is None  # a plain request
    assert history_group(PatternHeader(Kind.GROUP, ref="x", queue="team")) is None
    assert history_group(None) is None


def test_a_query_round_trips_and_a_bad_one_is_none() -> None:
    query = HistoryQuery(limit=7, before_hlc=99)
    assert decode_query(encode_query(query)) == query
    assert decode_query("{}") == HistoryQuery()
    assert decode_query("not json") is None
    assert decode_query('{"limit": 0}') is None
    assert decode_query(f'{{"limit": {MAX_HISTORY_ITEMS + 1}}}') is None
    assert decode_query('{"limit": 5, "before_hlc": -1}') is None


def test_a_reply_round_trips_newest_first_and_keeps_the_newest_limit() -> None:
    body = encode_reply(items(5), limit=3, max_bytes=10_000)
    decoded = decode_reply(body)
    assert [i.body for i in decoded] == ["x4", "x3", "x2"]
    assert decoded[0] == HistoryItem("id-0004", 1_004, 14, "x4")
    assert encode_reply([], limit=0, max_bytes=10) == "[]"


def test_a_reply_leaves_out_the_oldest_to_fit_the_message_size() -> None:
    many = items(200, body="y" * 100)
    body = encode_reply(many, limit=200, max_bytes=4_096)
    assert len(body.encode()) <= 4_096
    decoded = decode_reply(body)
    assert 0 < len(decoded) < 200
    assert [i.id for i in decoded] == [i.id for i in reversed(many)][:len(decoded)]
    # Nothing fits: an empty list, never an over-size body.
    assert encode_reply(items(1, body="z" * 500), limit=1, max_bytes=100) == "[]"


@pytest.mark.parametrize("body", [
    "nope", "{}", '[["id", 1, 2]]', '[["", 1, 2, "b"]]', '[["i", -1, 2, "b"]]',
    '[["i", 1, 2, "b"], ["i", 3, 4, "c"]]',
])
def test_a_bad_reply_raises(body: str) -> None:
    with pytest.raises(HistoryReplyInvalid):
        decode_reply(body)


def test_a_reply_with_more_than_asked_raises() -> None:
    with pytest.raises(HistoryReplyInvalid, match="more than"):
        decode_reply(encode_reply(items(3), limit=3, max_bytes=10_000), limit=2)


def test_a_refusal_is_a_small_object_the_asker_reads_as_refused() -> None:
    body = encode_refusal(1.2345)
    assert body == '{"refused":"rate-limited","retry_after_ms":1235}'
    with pytest.raises(HistoryRefused, match=r"rate-limited, ask again in 1\.2 s") as caught:
        decode_reply(body)
    assert caught.value.refusal == HistoryRefusal("rate-limited", 1235)
    assert encode_refusal(0.0) == '{"refused":"rate-limited","retry_after_ms":1}'
    # An object that is no refusal is as unreadable as any other bad body.
    for bad in ('{"refused": ""}', '{"retry_after_ms": 5}', '{"refused": 3}'):
        with pytest.raises(HistoryReplyInvalid):
            decode_reply(bad)

"""Group history on request: a member asks each other member of group G for that member's OWN
messages to G, and each answers for itself only (docs/protocol.md 19.6).

Rule: plain typed data and pure functions (no I/O). The request is a `request` whose header
names the group (`queue`); its body is a `HistoryQuery`; the reply's body is a JSON array of
`HistoryItem`, newest first, bounded in number (`MAX_HISTORY_ITEMS`) and in bytes, or a
`HistoryRefusal` when the asker is over its rate (`HISTORY_REQUESTS_BURST`, `_PER_S`).
"""

from __future__ import annotations

import math
from typing import Annotated

import msgspec

from meshpost.protocol.header import Kind, PatternHeader
from meshpost.protocol.limits import INT64_MAX, MAX_ID_LENGTH

#: The most messages one member sends back for one history request.
MAX_HISTORY_ITEMS = 1_000
#: What a history request asks for unless told.
DEFAULT_HISTORY_ITEMS = 50
#: Each history request costs the answering node a store query and a reply of up to the
#: maximum message size, so a peer may ask it this many at once (a fetch asks each member
#: once; paging back with `before_hlc` asks a few times in a row) ...
HISTORY_REQUESTS_BURST = 10
#: ... then one every 2 s on average: a flood costs at most that many queries and large
#: replies; every request over it gets a small refusal instead (docs/protocol.md 19.6.1).
HISTORY_REQUESTS_PER_S = 0.5
#: The one reason a history request is refused (the asker may ask again later).
REFUSED_RATE_LIMITED = "rate-limited"


class HistoryQuery(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    """The body of a history request: at most `limit` of the member's own messages to the
    group, newest first, only those with an HLC below `before_hlc` (0: no bound)."""

    limit: Annotated[int, msgspec.Meta(ge=1, le=MAX_HISTORY_ITEMS)] = DEFAULT_HISTORY_ITEMS
    before_hlc: Annotated[int, msgspec.Meta(ge=0, le=INT64_MAX)] = 0


class HistoryItem(msgspec.Struct, array_like=True, frozen=True):
    """`[id, sent_at_ns, hlc, body]`: one of the answering member's own messages to the group
    (`id` is its logical message id, the same for every copy)."""

    id: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID_LENGTH)]
    sent_at_ns: Annotated[int, msgspec.Meta(ge=0, le=INT64_MAX)]
    hlc: Annotated[int, msgspec.Meta(ge=0, le=INT64_MAX)]
    body: str


class HistoryRefusal(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    """The reply body `{"refused": "rate-limited", "retry_after_ms": N}`: the member did not
    answer this request (its asker asked too often) and would answer one sent after N ms."""

    refused: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    retry_after_ms: Annotated[int, msgspec.Meta(ge=0, le=INT64_MAX)] = 0


class HistoryReplyInvalid(ValueError):
    """A history reply's body is not a list of `HistoryItem` within the bounds."""


class HistoryRefused(Exception):
    """The member refused the request (`refusal`: why, and when to ask again)."""

    def __init__(self, refusal: HistoryRefusal) -> None:
        self.refusal = refusal
        super().__init__(f"{refusal.refused}, ask again in "
                         f"{refusal.retry_after_ms / 1000:.1f} s")


_ENCODER = msgspec.json.Encoder()
_QUERY_DECODER = msgspec.json.Decoder(HistoryQuery)
_ITEMS_DECODER = msgspec.json.Decoder(list[HistoryItem])
_REFUSAL_DECODER = msgspec.json.Decoder(HistoryRefusal)


def history_header(group: str) -> PatternHeader:
    """The header of a history request for `group`: a `request` that names the group."""
    return PatternHeader(Kind.REQUEST, queue=group)


def history_group(header: PatternHeader | None) -> str | None:
    """The group a history request asks about, or None for any other message."""
    if header is None or header.kind is not Kind.REQUEST or not header.queue:
        return None
    return header.queue


def encode_query(query: HistoryQuery) -> str:
    return _ENCODER.encode(query).decode("utf-8")


def decode_query(body: str) -> HistoryQuery | None:
    """The query, or None if the body is not one (the member then answers with nothing)."""
    try:
        return _QUERY_DECODER.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


def encode_reply(items: list[HistoryItem], *, limit: int, max_bytes: int) -> str:
    """The reply body for `items` (newest first): the first `limit` of them, fewer if needed so
    that the body fits in `max_bytes` UTF-8 bytes (the oldest are left out; an empty list always
    fits). The asker can ask again with `before_hlc` for older ones."""
    kept = sorted(items, key=lambda i: (i.hlc, i.id), reverse=True)[:limit]
    while True:
        body = _ENCODER.encode(kept)
        if len(body) <= max_bytes or not kept:
            return body.decode("utf-8")
        # Cut by the share of bytes over, at least one: a few encodes, not one per item.
        over = (len(body) - max_bytes) / len(body)
        kept = kept[:len(kept) - max(1, int(len(kept) * over))]


def encode_refusal(retry_after_s: float, reason: str = REFUSED_RATE_LIMITED) -> str:
    """The reply body refusing a history request; a new request after `retry_after_s` would
    be answered (a whole millisecond at least, rounded up)."""
    retry_after_ms = max(1, math.ceil(retry_after_s * 1000))
    return _ENCODER.encode(HistoryRefusal(reason, retry_after_ms)).decode("utf-8")


def decode_reply(body: str, *, limit: int = MAX_HISTORY_ITEMS) -> list[HistoryItem]:
    """The items of a history reply, newest first; raise `HistoryRefused` if the member
    refused the request, `HistoryReplyInvalid` if the body is not a list of items or holds
    more than `limit` or repeats an id."""
    try:
        items = _ITEMS_DECODER.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        try:
            refusal = _REFUSAL_DECODER.decode(body)
        except (msgspec.DecodeError, msgspec.ValidationError):
            raise HistoryReplyInvalid(f"not a history reply: {exc}") from exc
        raise HistoryRefused(refusal) from None
    if len(items) > limit:
        raise HistoryReplyInvalid(f"{len(items)} messages, more than the {limit} asked for")
    if len({i.id for i in items}) != len(items):
        raise HistoryReplyInvalid("the same message id twice")
    return sorted(items, key=lambda i: (i.hlc, i.id), reverse=True)

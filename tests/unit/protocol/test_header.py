"""The pattern header, and the msgspec behaviour its backward compatibility rests on: an
array-like struct with a trailing defaulted field decodes the older, shorter arrays, and an
older struct decodes the newer, longer ones. Checked on the real Envelope (with its trailing
`header` field) against a local copy of the seven-field Envelope older nodes have."""

from __future__ import annotations

import zlib
from typing import Annotated

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshpost.protocol import Batch, Envelope, decode, encode
from meshpost.protocol.frames import INT64_MAX, INT64_MIN, MAX_ID_LENGTH
from meshpost.protocol.header import (
    HEADER_MAX_BYTES,
    MAX_LEASE_MS,
    Kind,
    PatternHeader,
    header_problem,
    is_valid_name,
    reply_id,
    result_id,
)


class OldEnvelope(msgspec.Struct, array_like=True, frozen=True):
    """The Envelope of a node from before headers: the seven fields, no header."""

    id: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID_LENGTH)]
    seq: Annotated[int, msgspec.Meta(ge=1, le=INT64_MAX)]
    sender: str
    recipient: str
    body: Annotated[str, msgspec.Meta(min_length=1)]
    sent_at_ns: Annotated[int, msgspec.Meta(ge=INT64_MIN, le=INT64_MAX)]
    hlc: Annotated[int, msgspec.Meta(ge=INT64_MIN, le=INT64_MAX)]


class OldBatch(msgspec.Struct, tag="batch", array_like=True, frozen=True):
    tx_at_ns: int
    messages: list[OldEnvelope]


OLD = OldEnvelope("018bcfe5687b5a17c0ffee000001", 1, "A", "B", "hi", 1_700_000_000_123_456_789,
               111411200008060928)
TASK = PatternHeader(Kind.TASK, "task-1", "upper", "C", 30_000, 1)


def _headed(envelope: OldEnvelope, header: PatternHeader | None) -> Envelope:
    return Envelope(*msgspec.structs.astuple(envelope), header=header)


def test_a_message_from_an_older_node_decodes_with_no_header() -> None:
    old_wire = msgspec.msgpack.encode(OldBatch(5, [OLD]))
    new = decode(old_wire, max_bytes=1 << 20)
    assert isinstance(new, Batch)
    assert new.messages[0].header is None
    assert msgspec.structs.astuple(new.messages[0])[:7] == msgspec.structs.astuple(OLD)


def test_an_older_node_decodes_a_task_as_the_plain_message_it_was() -> None:
    new_wire = encode(Batch(5, [_headed(OLD, TASK)]))
    frame = msgspec.msgpack.decode(new_wire, type=OldBatch)
    assert frame == OldBatch(5, [OLD])


def test_a_header_survives_the_round_trip() -> None:
    wire = encode(Batch(5, [_headed(OLD, TASK)]))
    frame = decode(wire, max_bytes=1 << 20)
    assert isinstance(frame, Batch) and frame.messages[0].header == TASK


def test_a_direct_message_costs_one_byte_more_and_its_checksum_bytes_are_recoverable() -> None:
    """msgspec 0.23 does not omit a trailing default from an array (even with omit_defaults),
    so a headerless Envelope encodes as `98 ... c0`. The store's checksum stays the CRC-32
    of the seven-element array: `97` + the same bytes without the last one."""
    old_bytes = msgspec.msgpack.encode(OLD)
    new_bytes = msgspec.msgpack.encode(_headed(OLD, None))
    assert len(new_bytes) == len(old_bytes) + 1
    assert new_bytes[0] == 0x98 and new_bytes[-1] == 0xC0
    assert b"\x97" + new_bytes[1:-1] == old_bytes
    # ... and its CRC-32 chains over the slice without copying it (zlib-ng, which the store
    # uses, gives the standard library's values).
    core_crc = zlib.crc32(memoryview(new_bytes)[1:-1], zlib.crc32(b"\x97"))
    assert core_crc == zlib.crc32(old_bytes)


def test_a_shorter_header_from_an_older_version_fills_its_defaults() -> None:
    wire = msgspec.msgpack.encode(["reply", "018bcfe5687b5a17c0ffee000001"])
    header = msgspec.msgpack.decode(wire, type=PatternHeader)
    assert header == PatternHeader(Kind.REPLY, "018bcfe5687b5a17c0ffee000001")
    assert header_problem(header) is None


def test_a_longer_header_from_a_newer_version_decodes_without_its_extra_fields() -> None:
    wire = msgspec.msgpack.encode([*msgspec.structs.astuple(TASK), "a field of 2030", 7])
    assert msgspec.msgpack.decode(wire, type=PatternHeader) == TASK


class SevenFieldHeader(msgspec.Struct, array_like=True, frozen=True):
    """The header of a node from before `prefetch` (its seven fields, their checks)."""

    kind: Kind
    ref: str = ""
    queue: str = ""
    sink: str = ""
    lease_ms: Annotated[int, msgspec.Meta(ge=0, le=MAX_LEASE_MS)] = 0
    attempt: Annotated[int, msgspec.Meta(ge=0, le=INT64_MAX)] = 0
    version: Annotated[int, msgspec.Meta(ge=0, le=INT64_MAX)] = 0


SERVE = PatternHeader(Kind.SERVE, "", "upper", version=5, prefetch=128)


def test_an_older_node_reads_a_serve_record_with_a_prefetch_as_the_record_it_knows() -> None:
    """Its eighth element is ignored: the older ventilator gives the worker its default."""
    old = msgspec.msgpack.decode(msgspec.msgpack.encode(SERVE), type=SevenFieldHeader)
    assert old == SevenFieldHeader(Kind.SERVE, "", "upper", version=5)


def test_a_serve_record_from_an_older_worker_states_no_prefetch() -> None:
    wire = msgspec.msgpack.encode(SevenFieldHeader(Kind.SERVE, "", "upper", version=5))
    header = msgspec.msgpack.decode(wire, type=PatternHeader)
    assert header == PatternHeader(Kind.SERVE, "", "upper", version=5)
    assert header.prefetch is None and header_problem(header) is None


def test_a_header_without_prefetch_is_nil_in_its_eighth_place() -> None:
    assert msgspec.msgpack.encode(TASK)[0] == 0x98
    assert msgspec.msgpack.encode(TASK)[-1] == 0xC0
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(SERVE), type=PatternHeader) == SERVE


@pytest.mark.parametrize(
    "bad",
    [
        ["bogus"],  # unknown kind
        [],  # no kind at all
        ["task", "x" * (MAX_ID_LENGTH + 1)],  # ref too long
        ["task", "t", "q" * 64],  # queue too long
        ["task", "t", "ñ"],  # a queue name that is not ASCII
        ["task", "t", "q", "-C"],  # a sink that is not a node name
        ["task", "t", "q", "C", MAX_LEASE_MS + 1, 1],  # lease over a day
        ["task", "t", "q", "C", -1, 1],  # negative lease
        ["task", "t", "q", "C", 1, -1],  # negative attempt
        ["member", "", "g", "", 0, 0, 2**64 - 1],  # version beyond SQLite's INTEGER
        ["task", 5],  # wrong type
        ["serve", "", "q", "", 0, 0, 1, 0],  # a prefetch of 0
        ["serve", "", "q", "", 0, 0, 1, -3],  # a negative prefetch
        ["serve", "", "q", "", 0, 0, 1, 2**64 - 1],  # a prefetch beyond int64
        ["serve", "", "q", "", 0, 0, 1, "128"],  # a prefetch that is a string
        ["serve", "", "q", "", 0, 0, 1, 1.5],  # ... or a float
        ["serve", "", "q", "", 0, 0, 1, True],  # ... or a boolean
    ],
)
def test_a_header_out_of_range_fails_while_decoding(bad: list[object]) -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.msgpack.decode(msgspec.msgpack.encode(bad), type=PatternHeader)


@pytest.mark.parametrize(
    ("header", "problem"),
    [
        (PatternHeader(Kind.REPLY), "needs the id it refers to"),
        (PatternHeader(Kind.GROUP), "needs the id it refers to"),
        (PatternHeader(Kind.RESULT, "t"), "needs a queue or group name"),
        (PatternHeader(Kind.TASK, "t", "q", "", 1, 1), "sink"),
        (PatternHeader(Kind.TASK, "t", "q", "C", 0, 1), "lease"),
        (PatternHeader(Kind.TASK, "t", "q", "C", 1, 0), "attempt"),
        (PatternHeader(Kind.MEMBER, "", "g"), "version from 1"),
        (PatternHeader(Kind.SERVE, "", "", version=1), "queue or group name"),
        (PatternHeader(Kind.SERVE, "", "upper"), "version from 1"),
    ],
)
def test_a_header_missing_what_its_kind_needs_is_named(header: PatternHeader,
                                                       problem: str) -> None:
    found = header_problem(header)
    assert found is not None and problem in found


@pytest.mark.parametrize(
    "header",
    [
        PatternHeader(Kind.REQUEST),
        PatternHeader(Kind.REPLY, "r1"),
        PatternHeader(Kind.TASK, "t1", "upper", "C", 30_000, 1),
        PatternHeader(Kind.RESULT, "t1", "upper"),
        PatternHeader(Kind.DONE, "t1", "upper"),
        PatternHeader(Kind.GROUP, "m1", "ops"),
        PatternHeader(Kind.MEMBER, "", "ops", version=3),
        PatternHeader(Kind.SERVE, "", "upper", version=3),
    ],
)
def test_a_well_formed_header_of_each_kind_has_no_problem(header: PatternHeader) -> None:
    assert header_problem(header) is None


def test_the_largest_header_is_header_max_bytes() -> None:
    largest = PatternHeader(Kind.REQUEST, "\U0001f600" * MAX_ID_LENGTH, "q" * 63, "s" * 63,
                            MAX_LEASE_MS, INT64_MAX, INT64_MAX, INT64_MAX)
    wire = msgspec.msgpack.encode(largest)
    assert len(wire) == HEADER_MAX_BYTES
    assert msgspec.msgpack.decode(wire, type=PatternHeader) == largest


def test_names_follow_the_node_name_rule() -> None:
    assert is_valid_name("upper") and is_valid_name("a.b-c_9") and is_valid_name("x" * 63)
    assert not is_valid_name("") and not is_valid_name("x" * 64)
    assert not is_valid_name("-a") and not is_valid_name("a b") and not is_valid_name("ñ")


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1, max_size=MAX_ID_LENGTH), st.text(min_size=1, max_size=MAX_ID_LENGTH))
def test_derived_ids_are_valid_deterministic_and_distinct(a: str, b: str) -> None:
    for derive in (reply_id, result_id):
        assert derive(a) == derive(a)
        assert 1 <= len(derive(a)) <= MAX_ID_LENGTH
        assert (derive(a) == derive(b)) == (a == b)
    assert reply_id(a) != result_id(a)

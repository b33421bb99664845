"""Frames round-trip through the codec; anything else is a `ProtocolError`, never a crash."""

from __future__ import annotations

import ast
import gc
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import meshpost.protocol
from meshpost.errors import MalformedFrame, ProtocolError, UnsupportedVersion
from meshpost.protocol import (
    PROTOCOL_VERSION,
    Batch,
    Bye,
    Envelope,
    Frame,
    Hello,
    Ping,
    Pong,
    ReceiptFrame,
    Refuse,
    Reject,
    Welcome,
    decode,
    encode,
)
from meshpost.protocol.frames import INT64_MAX, INT64_MIN, MAX_ID_LENGTH, UncheckedBatch
from meshpost.protocol.header import Kind, PatternHeader

FAST = settings(max_examples=200, deadline=None)
LIMIT = 1 << 20

# msgpack integers span int64 and uint64; text is any valid Unicode (no lone surrogates).
ints = st.integers(min_value=-(2**63), max_value=2**64 - 1)
texts = st.text(st.characters(codec="utf-8"), max_size=40)

envelopes = st.builds(
    Envelope, id=texts, seq=ints, sender=texts, recipient=texts, body=texts,
    sent_at_ns=ints, hlc=ints,
)
i64 = st.integers(min_value=INT64_MIN, max_value=INT64_MAX)
syncs = st.sampled_from(["full", "normal"])
tokens = st.binary(max_size=32)


def frame_strategy(ints: st.SearchStrategy[int], syncs: st.SearchStrategy[str]
                   ) -> st.SearchStrategy[Frame]:
    """Every frame type, its own integers drawn from `ints` (envelopes': from any msgpack
    integer) and its durability levels from `syncs`."""
    return st.one_of(
        st.builds(Hello, version=st.just(PROTOCOL_VERSION), node_id=texts, name=texts,
                  sent_at_ns=ints, hlc=ints, resume=tokens),
        st.builds(Welcome, version=ints, node_id=texts, name=texts, sent_at_ns=ints, hlc=ints,
                  sync=syncs, resume=tokens),
        st.builds(Refuse, code=texts, detail=texts),
        st.builds(Batch, tx_at_ns=ints, messages=st.lists(envelopes, max_size=5)),
        st.builds(ReceiptFrame, ranges=st.lists(st.tuples(ints, ints), max_size=5),
                  echo_tx_at_ns=ints, received_at_ns=ints, stored_at_ns=ints,
                  replied_at_ns=ints, hlc=ints, sync=syncs),
        st.builds(Reject, seqs=st.lists(ints, max_size=5), code=texts, detail=texts),
        st.builds(Ping, sent_at_ns=ints),
        st.builds(Pong, echo_sent_at_ns=ints, received_at_ns=ints, replied_at_ns=ints),
        st.builds(Bye, reason=texts),
    )


#: Frames whose own fields are all valid, and frames with any msgpack integer and any text.
frames = frame_strategy(i64, syncs)
any_frames = frame_strategy(ints, st.one_of(syncs, texts))


def raw(*items: object) -> bytes:
    return msgspec.msgpack.encode(list(items))


def nested_arrays(depth: int) -> bytes:
    """msgpack for [[[...[nil]...]]]: `depth` one-element arrays."""
    return b"\x91" * depth + b"\xc0"


# -- round trips ------------------------------------------------------------------------------


def passes_envelope_checks(m: Envelope) -> bool:
    """What decoding an `Envelope` checks, written out plainly."""
    return (0 < len(m.id) <= MAX_ID_LENGTH and 1 <= m.seq <= INT64_MAX and m.body != ""
            and INT64_MIN <= m.sent_at_ns <= INT64_MAX and INT64_MIN <= m.hlc <= INT64_MAX)


def as_frame(decoded: Frame | UncheckedBatch) -> Frame:
    return decoded.batch() if isinstance(decoded, UncheckedBatch) else decoded


def frame_fields_in_range(frame: Frame) -> bool:
    """What decoding checks of a frame's own fields (not its envelopes'), written out plainly:
    every integer signed 64-bit, every `sync` a durability level."""
    values: list[object] = []
    for name in frame.__struct_fields__:
        value = getattr(frame, name)
        if name == "messages":
            continue
        if name == "sync" and value not in ("full", "normal"):
            return False
        values.extend(v for pair in value for v in pair) if name == "ranges" else (
            values.extend(value) if isinstance(value, list) else values.append(value))
    return all(INT64_MIN <= v <= INT64_MAX for v in values if isinstance(v, int))


@FAST
@given(any_frames)
def test_every_frame_type_survives_a_round_trip(frame: Frame) -> None:
    # A frame with a field out of range is malformed as a whole: it never reaches a caller.
    if not frame_fields_in_range(frame):
        with pytest.raises(MalformedFrame):
            decode(encode(frame), max_bytes=LIMIT)
        return
    decoded = decode(encode(frame), max_bytes=LIMIT)
    assert as_frame(decoded) == frame
    # A batch comes back unchecked exactly when one of its messages fails the checks.
    unchecked = isinstance(frame, Batch) and not all(map(passes_envelope_checks, frame.messages))
    assert isinstance(decoded, UncheckedBatch) == unchecked


@pytest.mark.parametrize(
    "frame",
    [
        Hello(PROTOCOL_VERSION, "n1", "alice", 1, 2),
        Welcome(PROTOCOL_VERSION, "n2", "bob", 3, 4, "full"),
        Refuse("hello-required", "send Hello first"),
        Batch(5, [Envelope("id1", 1, "alice", "bob", "hi ✓", 6, 7)]),
        ReceiptFrame([(1, 3), (7, 7)], 1, 2, 3, 4, 5, "normal"),
        Reject([1, 2], "conflict", "different"),
        Ping(8),
        Pong(8, 9, 10),
        Bye("shutting down"),
    ],
    ids=lambda f: type(f).__name__,
)
def test_each_frame_type_decodes_to_its_own_class(frame: Frame) -> None:
    decoded = decode(encode(frame), max_bytes=LIMIT)
    assert type(decoded) is type(frame)
    assert decoded == frame


def test_receipt_ranges_come_back_as_tuples() -> None:
    decoded = decode(encode(ReceiptFrame([(1, 2)], 0, 0, 0, 0, 0, "full")), max_bytes=LIMIT)
    assert isinstance(decoded, ReceiptFrame)
    assert decoded.ranges == [(1, 2)]
    assert isinstance(decoded.ranges[0], tuple)


# -- rejection ----------------------------------------------------------------------------------


@FAST
@given(st.binary(max_size=300))
def test_random_bytes_decode_to_a_frame_or_raise_a_protocol_error(data: bytes) -> None:
    try:
        frame = decode(data, max_bytes=LIMIT)
    except ProtocolError:
        return
    assert isinstance(
        frame, Hello | Welcome | Refuse | Batch | ReceiptFrame | Reject | Ping | Pong | Bye
    )


@FAST
@given(frames, st.data())
def test_truncated_frames_are_malformed(frame: Frame, data: st.DataObject) -> None:
    encoded = encode(frame)
    cut = data.draw(st.integers(0, len(encoded) - 1))
    with pytest.raises(MalformedFrame):
        decode(encoded[:cut], max_bytes=LIMIT)


@FAST
@given(frames, st.binary(min_size=1, max_size=20))
def test_trailing_garbage_after_a_frame_is_malformed(frame: Frame, tail: bytes) -> None:
    with pytest.raises(MalformedFrame):
        decode(encode(frame) + tail, max_bytes=LIMIT)


@FAST
@given(frames, st.integers(0, 64))
def test_frames_over_the_size_limit_are_malformed_even_when_valid(frame: Frame, less: int) -> None:
    encoded = encode(frame)
    limit = len(encoded) - 1 - less
    if limit < 0:
        return
    with pytest.raises(MalformedFrame, match="exceeds"):
        decode(encoded, max_bytes=limit)
    assert as_frame(decode(encoded, max_bytes=len(encoded))) == frame


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",  # a byte msgpack never uses
        raw("nonsense", 1, 2),
        raw("HELLO", PROTOCOL_VERSION, "n", "a", 1, 2),
        raw(),
        raw(1, 2, 3),
        msgspec.msgpack.encode({"hello": 1}),
        msgspec.msgpack.encode("ping"),
        msgspec.msgpack.encode(42),
        raw("ping"),
        raw("ping", "not a number"),
        raw("ping", 1.5),
        raw("ping", None),
        raw("hello", "1", "n", "a", 1, 2),
        raw("hello", PROTOCOL_VERSION, 7, "a", 1, 2),
        raw("batch", 1, "not a list"),
        raw("batch", 1, [["id", "seq", "a", "b", "body", 1, 2]]),
        raw("receipt", [[1, 2, 3]], 1, 2, 3, 4, 5, "full"),
        raw("reject", [1, "two"], "c", "d"),
        b"\xdd\xff\xff\xff\xff",  # an array claiming four billion items
        b"\xdb\xff\xff\xff\xff",  # a string claiming four gigabytes
        raw("batch", 1, [["id", 1, "a", "b", b"\xff\xfe", 1, 2]]),
        b"\x92\xa4ping\xa2\xff\xfe",  # a str with invalid UTF-8
    ],
)
def test_malformed_frames_raise_malformed_frame(data: bytes) -> None:
    with pytest.raises(MalformedFrame):
        decode(data, max_bytes=LIMIT)


@pytest.mark.parametrize("depth", [10, 1_000, 100_000])
def test_deeply_nested_msgpack_is_malformed(depth: int) -> None:
    for data in (
        nested_arrays(depth),
        b"\x93\xa5batch\x01" + nested_arrays(depth),
        b"\x93\xa5hello\x01" + nested_arrays(depth),
        b"\x92\xa4ping" + b"\x81\xc0" * depth + b"\xc0",  # nested maps
    ):
        with pytest.raises(MalformedFrame):
            decode(data, max_bytes=10 * LIMIT)


def test_an_oversized_frame_is_refused_before_it_is_parsed() -> None:
    with pytest.raises(MalformedFrame, match="exceeds the 10-byte limit"):
        decode(b"\xc1" * 11, max_bytes=10)


@pytest.mark.parametrize("version", [0, 2, PROTOCOL_VERSION + 100, -1, 2**40])
def test_a_hello_of_another_version_raises_unsupported_version(version: int) -> None:
    with pytest.raises(UnsupportedVersion) as info:
        decode(encode(Hello(version, "n", "alice", 1, 2)), max_bytes=LIMIT)
    assert info.value.theirs == version
    assert info.value.ours == PROTOCOL_VERSION
    assert isinstance(info.value, ProtocolError)


def test_a_future_hello_with_another_layout_raises_unsupported_version() -> None:
    future = raw("hello", PROTOCOL_VERSION + 1, {"node": "x"}, ["new", "fields"])
    with pytest.raises(UnsupportedVersion):
        decode(future, max_bytes=LIMIT)


def test_a_malformed_hello_of_our_version_is_only_malformed() -> None:
    with pytest.raises(MalformedFrame) as info:
        decode(raw("hello", PROTOCOL_VERSION, {"node": "x"}), max_bytes=LIMIT)
    assert not isinstance(info.value, UnsupportedVersion)


@pytest.mark.parametrize("version", [True, False])
def test_a_boolean_version_is_malformed_not_another_version(version: bool) -> None:
    with pytest.raises(MalformedFrame) as info:
        decode(raw("hello", version, "n", "a", 1, 2), max_bytes=LIMIT)
    assert not isinstance(info.value, UnsupportedVersion)


def test_errors_are_protocol_errors_with_codes() -> None:
    assert issubclass(MalformedFrame, ProtocolError)
    assert MalformedFrame.code == "malformed"
    assert UnsupportedVersion.code == "version"


# -- the sans-IO rule -----------------------------------------------------------------------

FORBIDDEN = {"asyncio", "zmq", "sqlite3", "socket", "time", "threading"}
PROTOCOL_DIR = Path(meshpost.protocol.__file__).parent


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name | ast.Attribute)
            and getattr(node.func, "id", getattr(node.func, "attr", "")) in {
                "__import__", "import_module"
            }
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            found.add(str(node.args[0].value))
    return found


def protocol_modules() -> list[Path]:
    modules = sorted(PROTOCOL_DIR.rglob("*.py"))
    assert len(modules) >= 6  # __init__, codec, dialer, events, frames, listener
    return modules


@pytest.mark.parametrize("path", protocol_modules(), ids=lambda p: p.name)
def test_protocol_modules_do_no_io(path: Path) -> None:
    top_level = {name.split(".")[0] for name in imported_modules(path)}
    assert not top_level & FORBIDDEN, f"{path.name} imports {sorted(top_level & FORBIDDEN)}"


def test_the_import_checker_catches_forbidden_imports(tmp_path: Path) -> None:
    sample = tmp_path / "bad.py"
    sample.write_text(
        "import os\nimport asyncio.events\nfrom zmq import Socket\n"
        "import importlib\nimportlib.import_module('socket')\n"
    )
    assert {"asyncio.events", "zmq", "socket"} <= imported_modules(sample)


# -- 64-bit range of every integer ----------------------------------------------------------------

#: One valid frame of each type with integers, and where its integers are.
_VALID_WITH_INTS: list[Frame] = [
    Hello(PROTOCOL_VERSION, "n1", "alice", 1, 2),
    Welcome(PROTOCOL_VERSION, "n2", "bob", 3, 4, "full"),
    Batch(5, [Envelope("id1", 1, "alice", "bob", "hi", 6, 7)]),
    ReceiptFrame([(1, 3)], 1, 2, 3, 4, 5, "normal"),
    Reject([1, 2], "conflict", "different"),
    Ping(8),
    Pong(8, 9, 10),
]


def _int_fields(frame: Frame) -> list[str]:
    return [name for name in frame.__struct_fields__
            if isinstance(getattr(frame, name), int | list) and name != "messages"]


def _with(frame: Frame, name: str, value: int) -> Frame:
    old = getattr(frame, name)
    if name == "ranges":
        new: object = [(1, value)]
    elif isinstance(old, list):
        new = [*old, value]
    else:
        new = value
    return msgspec.structs.replace(frame, **{name: new})


@pytest.mark.parametrize("value", [2**64 - 1, 2**63])
@pytest.mark.parametrize(
    ("frame", "field"),
    [(f, name) for f in _VALID_WITH_INTS for name in _int_fields(f)
     if not (isinstance(f, Hello) and name == "version")],
    ids=lambda x: x if isinstance(x, str) else type(x).__name__,
)
def test_an_integer_outside_signed_64_bits_makes_any_frame_malformed(
    frame: Frame, field: str, value: int
) -> None:
    with pytest.raises(MalformedFrame):
        decode(encode(_with(frame, field, value)), max_bytes=LIMIT)


def test_the_64_bit_bounds_themselves_decode() -> None:
    for frame in _VALID_WITH_INTS:
        for field in _int_fields(frame):
            if isinstance(frame, Hello) and field == "version":
                continue
            for value in (INT64_MIN, INT64_MAX):
                decoded = as_frame(decode(encode(_with(frame, field, value)), max_bytes=LIMIT))
                assert decoded == _with(frame, field, value)


def test_a_hostile_receipt_of_2_64_minus_1_is_malformed_not_a_receipt() -> None:
    hostile = ReceiptFrame([(1, 1)], 1, 2, 2**64 - 1, 4, 2**64 - 1, "full")
    with pytest.raises(MalformedFrame, match=r"<= 9223372036854775807"):
        decode(encode(hostile), max_bytes=LIMIT)


def test_a_sync_level_other_than_full_or_normal_is_malformed() -> None:
    with pytest.raises(MalformedFrame):
        decode(encode(ReceiptFrame([(1, 1)], 1, 2, 3, 4, 5, "fsync")), max_bytes=LIMIT)
    for sync in ("", "full\n", "Full"):
        with pytest.raises(MalformedFrame):
            decode(encode(Welcome(PROTOCOL_VERSION, "n", "b", 1, 2, sync)), max_bytes=LIMIT)


def test_envelopes_made_or_decoded_in_bulk_do_not_set_off_the_garbage_collector() -> None:
    """Envelopes (and their headers) hold scalars only and are untracked (`gc=False`): the
    thousands a batch frame carries do not count toward the collector's next pass."""
    header = PatternHeader(Kind.TASK, "t1", "q")
    frame = Batch(1, [Envelope(f"m{i}", i, "a", "b", "x", 1, 2, header if i % 2 else None)
                      for i in range(1, 2049)])
    data = encode(frame)
    gc.collect()
    gc.disable()  # the count keeps growing, and no pass resets it meanwhile
    try:
        before = gc.get_count()[0]
        made = [Envelope(f"n{i}", i, "a", "b", "x", 1, 2) for i in range(1, 2049)]
        decoded = decode(data, max_bytes=len(data))
        allocated = gc.get_count()[0] - before
    finally:
        gc.enable()
    assert allocated < 50  # a few lists and frames, not 4,096 envelopes
    assert isinstance(decoded, Batch)
    assert len(made) == len(decoded.messages) == 2048
    assert not gc.is_tracked(decoded.messages[1]) and not gc.is_tracked(header)


# -- resume tokens: a trailing field older peers neither send nor read ----------------------


def test_an_older_peers_hello_and_welcome_decode_as_carrying_no_token() -> None:
    """msgspec fills a trailing array_like field left out with its default."""
    hello = decode(raw("hello", PROTOCOL_VERSION, "node-a", "alice", 1, 2), max_bytes=LIMIT)
    assert hello == Hello(PROTOCOL_VERSION, "node-a", "alice", 1, 2, resume=b"")
    welcome = decode(raw("welcome", PROTOCOL_VERSION, "node-b", "bob", 1, 2, "full"),
                     max_bytes=LIMIT)
    assert welcome == Welcome(PROTOCOL_VERSION, "node-b", "bob", 1, 2, "full", resume=b"")


def test_an_older_peer_reads_a_welcome_with_a_token_as_it_always_did() -> None:
    """The layout before tokens (a copy of it here) ignores the extra trailing element."""

    class OldWelcome(msgspec.Struct, tag="welcome", array_like=True, frozen=True):
        version: int
        node_id: str
        name: str
        sent_at_ns: int
        hlc: int
        sync: str

    new = Welcome(PROTOCOL_VERSION, "node-b", "bob", 1, 2, "full", resume=b"12345678")
    old = msgspec.msgpack.decode(encode(new), type=OldWelcome)
    assert old == OldWelcome(PROTOCOL_VERSION, "node-b", "bob", 1, 2, "full")


@pytest.mark.parametrize("token", ["a str", 7, b"x" * 33])
def test_a_hello_whose_token_is_not_up_to_32_bytes_is_malformed(token: object) -> None:
    with pytest.raises(MalformedFrame):
        decode(raw("hello", PROTOCOL_VERSION, "node-a", "alice", 1, 2, token), max_bytes=LIMIT)

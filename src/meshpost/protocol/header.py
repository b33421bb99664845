"""The pattern header: what a message is for (a task, its result, a request, its reply, a group
message, a membership record) and what it refers to: the Envelope's trailing field
(`frames.Envelope.header`).

Rule: plain typed data, checked at decode like every frame field (docs/protocol.md 4.4.1, 19.2);
no state and no I/O. A message without a header is a direct message, exactly as today.
"""

from __future__ import annotations

import enum
import hashlib
from typing import Annotated

import msgspec

from meshpost.protocol.limits import INT64_MAX, MAX_ID_LENGTH

#: Queue and group names follow the node-name rule (config.NAME_PATTERN), repeated here because
#: the protocol package may not import config.
NAME_REGEX = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
#: The most a task's lease may be: a day. A longer one would keep a dead worker's task hidden
#: for longer than anyone waits; a task that needs more renews nothing (there is no renewal),
#: so it should be split.
MAX_LEASE_MS = 24 * 3600 * 1000
#: The most a header adds to an envelope on the wire: the array header (1), the longest kind
#: (8), a ref of MAX_ID_LENGTH four-byte characters (3 + 256), two 63-character ASCII names
#: (2 x 65), a lease up to a day (5) and three 9-byte integers (27) come to 430 (421 before
#: `prefetch`). ENVELOPE_OVERHEAD_BYTES went from 512 to 1,024 for it (docs/protocol.md 8.3).
HEADER_MAX_BYTES = 430
#: A worker's prefetch as the wire may carry it: a whole number from 1 (0, a negative, a
#: string fail decoding: that message alone is rejected `invalid`). The ventilator caps what
#: it honours (`protocol.workqueue.MAX_PREFETCH`), not the wire: a later version may raise
#: that cap without its records being refused here.
Prefetch = Annotated[int, msgspec.Meta(ge=1, le=INT64_MAX)]


class Kind(enum.StrEnum):
    """What a message with a header is; the wire carries the value."""

    REQUEST = "request"  # expects a reply; ref = "" (the request is its own message id)
    REPLY = "reply"  # ref = the request's message id
    TASK = "task"  # ref = task id; queue, sink, lease_ms, attempt set
    RESULT = "result"  # ref = task id; queue set; goes to the task's sink
    DONE = "done"  # worker -> ventilator: the result is receipted by the sink; ref = task id
    GROUP = "group"  # one copy of a group/all message; ref = the logical message id
    MEMBER = "member"  # a group membership record; queue = group, body "join"/"leave", version
    SERVE = "serve"  # a worker starts/stops serving queue; body "serve"/"stop", version set;
    # prefetch: how many unfinished tasks it takes at once (nil: not stated, 16)


_Ref = Annotated[str, msgspec.Meta(max_length=MAX_ID_LENGTH)]
#: Empty, or a name: ASCII, so that a header's size is bounded in bytes (HEADER_MAX_BYTES).
_OptName = Annotated[str, msgspec.Meta(pattern=r"^(?:[A-Za-z0-9][A-Za-z0-9_.-]{0,62})?$")]


class PatternHeader(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """`[kind, ref, queue, sink, lease_ms, attempt, version, prefetch]`: the trailing field
    of an Envelope (`header: PatternHeader | None = None`).

    Fields after `kind` have defaults, so a later version may append more and an older
    decoder still reads the array (msgspec ignores extra trailing elements of an array-like
    struct and fills missing trailing ones from their defaults; tests/unit/protocol/
    test_header.py holds both). Every field is range-checked while decoding. Scalars only,
    so, like `Envelope`, it is not tracked by the garbage collector (`gc=False`).
    """

    kind: Kind
    ref: _Ref = ""
    queue: _OptName = ""
    sink: _OptName = ""
    lease_ms: Annotated[int, msgspec.Meta(ge=0, le=MAX_LEASE_MS)] = 0
    attempt: Annotated[int, msgspec.Meta(ge=0, le=INT64_MAX)] = 0
    version: Annotated[int, msgspec.Meta(ge=0, le=INT64_MAX)] = 0
    #: A `serve` record's: how many unfinished tasks the worker takes at once (its handler's
    #: concurrency). None (nil; absent in a header from before it, which has seven fields):
    #: not stated, the ventilator's default. Other kinds carry nil; a receiver ignores it.
    prefetch: Prefetch | None = None


class UncheckedHeader(msgspec.Struct, array_like=True, frozen=True):
    """A `PatternHeader`'s layout and types without its checks: how a header that fails
    them still decodes, so that its message alone is rejected (frames.UncheckedBatch)."""

    kind: str
    ref: str = ""
    queue: str = ""
    sink: str = ""
    lease_ms: int = 0
    attempt: int = 0
    version: int = 0
    #: Any value: a string or a float here must not fail its whole batch's decoding, only
    #: this message's check (`checked`), like a number out of range.
    prefetch: object = None

    def checked(self) -> PatternHeader | UncheckedHeader:
        """The same header as a `PatternHeader` if it passes the checks, else itself."""
        try:
            return msgspec.convert(msgspec.structs.astuple(self), PatternHeader)
        except msgspec.ValidationError:
            return self


_NEEDS_REF = frozenset({Kind.REPLY, Kind.TASK, Kind.RESULT, Kind.DONE, Kind.GROUP})
_NEEDS_QUEUE = frozenset({Kind.TASK, Kind.RESULT, Kind.DONE, Kind.MEMBER, Kind.SERVE})


def header_problem(header: PatternHeader | UncheckedHeader) -> str | None:
    """Why a decoded header cannot be acted on (fields its kind needs are missing), or None.

    Decoding already checked each field's range; this checks the fields against each other,
    as `Listener._check` does for envelopes: the node rejects that message alone. An
    `UncheckedHeader` (a field out of range) is itself the problem."""
    if not isinstance(header, PatternHeader):
        return (f"pattern header {list(msgspec.structs.astuple(header))!r:.200} has a field "
                "out of range (kind, a name, an id, a number, or a prefetch that is not a "
                "whole number from 1)")
    kind = header.kind
    if kind in _NEEDS_REF and not header.ref:
        return f"a {kind} needs the id it refers to (ref)"
    if kind in _NEEDS_QUEUE and not is_valid_name(header.queue):
        return f"a {kind} needs a queue or group name, got {header.queue!r}"
    if kind is Kind.TASK:
        if not is_valid_name(header.sink):
            return f"a task needs the node that takes its result (sink), got {header.sink!r}"
        if header.lease_ms <= 0 or header.attempt < 1:
            return "a task needs a lease (lease_ms > 0) and an attempt number from 1"
    if kind in (Kind.MEMBER, Kind.SERVE) and header.version < 1:
        return "a membership record needs a version from 1"
    return None


def is_valid_name(value: str) -> bool:
    """A queue or group name: the node-name rule (1-63 of [A-Za-z0-9_.-], first alphanumeric)."""
    # Same rule as NAME_REGEX, without compiling a regex in a module that is imported by the
    # node's hot path: names are short ASCII.
    if not 1 <= len(value) <= 63 or not value.isascii():
        return False
    if not value[0].isalnum():
        return False
    return all(c.isalnum() or c in "_.-" for c in value)


def reply_id(request_id: str) -> str:
    """The message id of the reply to `request_id`: derived, so a handler that runs twice
    (the replier crashed after storing the request, before its reply) produces one reply.

    `<request id>.r` when that fits in MAX_ID_LENGTH (it keeps the request's time-ordered
    prefix), else `r.` and 40 hex digits of its BLAKE2b."""
    candidate = f"{request_id}.r"
    if len(candidate) <= MAX_ID_LENGTH:
        return candidate
    return "r." + hashlib.blake2b(request_id.encode("utf-8"), digest_size=20).hexdigest()


def result_id(task_message_id: str) -> str:
    """The message id of a worker's result for the task message `task_message_id`: one
    result per task message however often the handler runs. Two workers (or two attempts)
    get different task messages, so their results are two messages; the sink keeps one
    (`ResultSink`)."""
    candidate = f"{task_message_id}.t"
    if len(candidate) <= MAX_ID_LENGTH:
        return candidate
    return "t." + hashlib.blake2b(task_message_id.encode("utf-8"), digest_size=20).hexdigest()

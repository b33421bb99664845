"""Encode and decode frames; every decoding failure is a `ProtocolError`, never `None`."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import msgspec

from meshpost.errors import MalformedFrame, UnsupportedVersion
from meshpost.protocol.frames import PROTOCOL_VERSION, Frame, Hello, UncheckedBatch

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Frame)
_unchecked_batch_decoder = msgspec.msgpack.Decoder(UncheckedBatch)
_loose_decoder = msgspec.msgpack.Decoder(list[Any])

#: A Hello of another version is decoded loosely to tell the peer why it was refused; only
#: small frames get that courtesy, so a hostile frame cannot make us parse megabytes twice.
_LOOSE_DECODE_LIMIT = 4096
#: Everything msgspec raises for bad input (invalid UTF-8 in a str is a UnicodeDecodeError).
_DECODE_ERRORS = (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError)


#: A frame's bytes: the encoder's own (C) method, not a function calling it (a Python frame
#: each, two a single send).
encode: Callable[[Frame], bytes] = _encoder.encode


def decode(data: bytes, *, max_bytes: int) -> Frame | UncheckedBatch:
    """Decode one frame of at most `max_bytes`; raise `MalformedFrame` or `UnsupportedVersion`.

    A batch some message of which fails the `Envelope` checks comes back as an
    `UncheckedBatch` (decoded a second time, without them)."""
    if len(data) > max_bytes:
        raise MalformedFrame(f"frame of {len(data)} bytes exceeds the {max_bytes}-byte limit")
    try:
        frame: Frame = _decoder.decode(data)
    except _DECODE_ERRORS as exc:
        if isinstance(exc, msgspec.ValidationError):
            with contextlib.suppress(*_DECODE_ERRORS, RecursionError):
                return _unchecked_batch_decoder.decode(data)
        _raise_if_other_version(data)
        raise MalformedFrame(f"cannot decode frame: {exc}") from None
    except RecursionError:
        raise MalformedFrame("frame nests too deeply") from None
    if isinstance(frame, Hello) and frame.version != PROTOCOL_VERSION:
        # Extra trailing fields decode fine, so a newer Hello may look like ours.
        raise UnsupportedVersion(frame.version, PROTOCOL_VERSION)
    return frame


def _raise_if_other_version(data: bytes) -> None:
    if len(data) > _LOOSE_DECODE_LIMIT:
        return
    try:
        loose = _loose_decoder.decode(data)
    except (*_DECODE_ERRORS, RecursionError):
        return
    version = loose[1] if len(loose) >= 2 and loose[0] == "hello" else None
    if (
        isinstance(version, int)
        and not isinstance(version, bool)
        and version != PROTOCOL_VERSION
    ):
        raise UnsupportedVersion(version, PROTOCOL_VERSION)

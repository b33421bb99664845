"""The content checksum stored beside every message row: its one definition.

Rule: `sqlite.py` computes it as rows are written (and registers it as SQL `mp_checksum`),
`verifier.py` recomputes it as rows are read back; both take these functions from here.
"""

from __future__ import annotations

import msgspec
from zlib_ng import zlib_ng

from meshpost.protocol import Envelope
from meshpost.protocol.header import PatternHeader

_ENCODER = msgspec.msgpack.Encoder()
envelope_bytes = _ENCODER.encode
#: `envelope_bytes` into a caller's bytearray (truncated to the encoding): no new object.
envelope_encode_into = _ENCODER.encode_into
#: zlib's CRC-32, from zlib-ng: the same values as the standard library's `zlib.crc32` (so
#: every checksum already stored stays valid), computed with SIMD instructions: about a
#: fifth of the system zlib's time, which was most of the writer's per-row Python work
#: (`_row_values`; figures in docs/benchmarks.md).
crc32 = zlib_ng.crc32


#: The checksum is the CRC-32 of the seven-field envelope array (`97` then its fields), as
#: it was before envelopes had a trailing header, so every stored checksum stays valid; a
#: header's msgpack bytes are chained after it. From an eight-field encoding `b` (`98`, the
#: seven fields, then the header, or `c0` for none) that is crc32(b[1:-1]) resp. crc32(b[1:])
#: started from the CRC of `97`: CRC-32 chains, and a memoryview slice copies nothing.
ARRAY7 = 0x97
CRC_OF_ARRAY7 = crc32(bytes([ARRAY7]))
header_bytes = msgspec.msgpack.Encoder().encode
header_decode = msgspec.msgpack.Decoder(PatternHeader).decode


def envelope_checksum(m: Envelope) -> int:
    """CRC-32 of the message's seven-field msgpack encoding, then of its header's, if any
    (deterministic, C-fast, and the same as before headers for a direct message)."""
    b = envelope_bytes(m)
    return crc32(memoryview(b)[1:] if m.header is not None else memoryview(b)[1:-1],
                  CRC_OF_ARRAY7)


def content_checksum(
    id: str, sender: str, recipient: str, seq: int, body: str, sent_at_ns: int, hlc: int,
    header: bytes | None = None,
) -> int:
    """`envelope_checksum` from a row's columns (`header`: the stored msgpack header):
    stored beside the row, checked at open."""
    crc = envelope_checksum(Envelope(id, seq, sender, recipient, body, sent_at_ns, hlc))
    return crc if header is None else crc32(header, crc)

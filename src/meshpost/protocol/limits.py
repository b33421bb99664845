"""Numeric limits every frame field shares (ids, 64-bit stamps).

Rule: constants only, importing nothing: both `frames` and `header` need them, and `frames`
imports `header` (the Envelope's trailing field), so they cannot live in either.
"""

from __future__ import annotations

#: Message ids are opaque strings of this many characters at most.
MAX_ID_LENGTH = 64
#: SQLite's INTEGER is a signed 64-bit number; msgpack also carries unsigned ones up to
#: 2**64 - 1, which the store could not bind.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

"""Routing ids no peer can predict, for every ROUTER a peer may connect to.

Rule: call `unpredictable_routing_ids()` right before making such a ROUTER: the transport's,
the one peers reach. (The control socket's and a host's are ipc:// sockets in folders only
their user can open.) It reseeds the C library's `rand()`, nothing else.

Why (libzmq 4.3.5, the one pyzmq bundles): a ROUTER names each connection that brings no
routing id of its own `0x00` + a 32-bit counter, and the counter starts at the C library's
`rand()`, which libzmq never seeds: the first ROUTER of every process starts at `006b8b4567`,
the next at `00e43c9869`. It also takes a routing id a peer chooses for its own connection
(any DEALER can set ZMQ_ROUTING_ID), and it never checks a generated id against those: a
peer that names its connection after the counter's next value makes the next ordinary
connection fail libzmq's assertion (`socket_base.cpp`, "ok") and abort the whole process.
Seeded from the OS's randomness, the counter starts at one of 2^32 values that never leave
the node (routing ids are not on the wire), so a peer can only guess, one connection per
guess, against `max_inbound_connections`. (Refusing peer-chosen ids would close it for good;
libzmq has no option for that. Under --secure only key holders connect at all.) Nor does the
node's log give them away: it names a connection by `connection_label`, a keyed digest.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
from collections.abc import Callable

__all__ = ["connection_label", "unpredictable_routing_ids"]

#: The key of `connection_label`'s digests, this process's own.
_LABEL_KEY = os.urandom(16)


def _c_srand() -> Callable[[int], None] | None:
    """The C library's `srand`, which the libzmq loaded in this process shares (None where
    the process's symbols cannot be opened, e.g. on Windows)."""
    try:
        srand = ctypes.CDLL(None).srand
    except (OSError, AttributeError, TypeError):
        return None
    srand.argtypes, srand.restype = [ctypes.c_uint], None
    return srand


_SRAND = _c_srand()


def unpredictable_routing_ids() -> bool:
    """Seed the C library's `rand()` from the OS's randomness, so that the next ROUTER made
    starts its generated routing ids where no peer can tell; False where that cannot be done
    here (the ids then start where libzmq's unseeded `rand()` puts them)."""
    if _SRAND is None:
        return False
    _SRAND(int.from_bytes(os.urandom(4), "little"))
    return True


def connection_label(connection: str) -> str:
    """How the log names a connection (its routing id, as the listener keys it): 10 hex digits
    of a digest keyed for this process, the same for the process's life (lines about one
    connection still go together) but no clue to the routing ids the ROUTER generates: with
    one of them a log reader could name its own connection after the next (module doc)."""
    return hashlib.blake2b(connection.encode(), key=_LABEL_KEY, digest_size=5).hexdigest()

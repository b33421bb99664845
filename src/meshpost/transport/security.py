"""CURVE authentication: ZAP through pyzmq's asyncio authenticator, failing closed.

Rule: only keys on the allowlist get in, and each key maps to exactly one node name. A
connection's `User-Id` is the authorized_keys line it was admitted by (`NAME Z85KEY`), and
every frame's line is looked up in the list in force when the frame is read: its NAME is who
sent it while that line is in force, and a line no longer there (its key removed, changed or
given to another name by a reload, `MeshAuthenticator.replace`) sends nothing more. Without a
running authenticator no connection is accepted (`ZAP_ENFORCE_DOMAIN`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping

import zmq
import zmq.asyncio
from zmq.auth.asyncio import AsyncioAuthenticator
from zmq.utils import z85

log = logging.getLogger(__name__)

ZAP_DOMAIN = "meshpost"


@dataclasses.dataclass(frozen=True, slots=True)
class KeyChanges:
    """What a new authorized-keys list changes against the one in force, by name (sorted):
    names `added`, names `removed`, names whose key `changed`."""

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()

    @classmethod
    def between(cls, old: Mapping[str, bytes], new: Mapping[str, bytes]) -> KeyChanges:
        return cls(added=tuple(sorted(new.keys() - old.keys())),
                   removed=tuple(sorted(old.keys() - new.keys())),
                   changed=tuple(sorted(n for n in old.keys() & new.keys() if old[n] != new[n])))

    @property
    def cut(self) -> frozenset[str]:
        """The names whose old key stops working: removed or changed."""
        return frozenset(self.removed) | frozenset(self.changed)

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed)

    def describe(self) -> str:
        """`added C; removed B; changed P`, or `no change`."""
        parts = [f"{what} {', '.join(names)}" for what, names in
                 (("added", self.added), ("removed", self.removed), ("changed", self.changed))
                 if names]
        return "; ".join(parts) or "no change"


class _Allowlist:
    def __init__(self, names_by_key: Mapping[bytes, str],
                 on_denied: Callable[[str], None]) -> None:
        self.names_by_key = dict(names_by_key)
        self.on_denied = on_denied

    def callback(self, domain: str, z85_key: bytes) -> bool:
        allowed = z85_key in self.names_by_key
        if not allowed:
            self.on_denied(z85_key.decode("ascii"))
        return allowed


def user_id(name: str, key: bytes) -> str:
    """The `User-Id` of a connection admitted as `name` with `key` (Z85): the line itself."""
    return f"{name} {key.decode('ascii', 'replace')}"


def names_by_key(peer_keys: Mapping[str, bytes]) -> dict[bytes, str]:
    """{Z85 key: name} of `peer_keys` ({name: Z85 key})."""
    return {key: name for name, key in peer_keys.items()}


class MeshAuthenticator(AsyncioAuthenticator):
    """ZAP handler that admits the mesh's peers; each connection's `User-Id` is the line
    (`NAME Z85KEY`) that admitted it."""

    def __init__(self, context: zmq.asyncio.Context, peer_keys: Mapping[str, bytes], *,
                 on_denied: Callable[[str], None]) -> None:
        """`context` must be the node's alone: ZAP has one handler per context, so nodes
        sharing one would share this allowlist (a host gives each secure node its own).
        `on_denied(key)` is told each client key refused (Z85): the caller counts and logs."""
        super().__init__(context)
        # Keys arrive Z85-encoded (as in key files); ZAP hands the callback Z85 too.
        self.allowlist = _Allowlist(names_by_key(peer_keys), on_denied)
        self.configure_curve_callback(ZAP_DOMAIN, credentials_provider=self.allowlist)

    def replace(self, peer_keys: Mapping[str, bytes]) -> None:
        """Admit exactly `peer_keys` from the next handshake on (the ZAP handler runs on this
        event loop: no handshake sees half of the change)."""
        self.allowlist.names_by_key = names_by_key(peer_keys)

    def curve_user_id(self, client_public_key: bytes) -> str:
        # The name and the key, not the name alone: a name's key may change under a
        # connection, or a key go to another name (a reload), and the transport must tell
        # that connection's frames from those of the line in force.
        key = z85.encode(client_public_key)
        return user_id(self.allowlist.names_by_key[key], key)

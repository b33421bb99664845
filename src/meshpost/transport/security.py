"""CURVE authentication: ZAP through pyzmq's asyncio authenticator, failing closed.

Rule: only keys on the allowlist get in, and each key maps to exactly one node name, which
becomes the connection's `User-Id`; the node then checks that every frame's claimed sender is
that name. Without a running authenticator no connection is accepted (`ZAP_ENFORCE_DOMAIN`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import zmq
import zmq.asyncio
from zmq.auth.asyncio import AsyncioAuthenticator
from zmq.utils import z85

log = logging.getLogger(__name__)

ZAP_DOMAIN = "meshpost"


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


class MeshAuthenticator(AsyncioAuthenticator):
    """ZAP handler that admits the mesh's peers and names each connection after its key."""

    def __init__(self, context: zmq.asyncio.Context, peer_keys: Mapping[str, bytes], *,
                 on_denied: Callable[[str], None]) -> None:
        """`context` must be the node's alone: ZAP has one handler per context, so nodes
        sharing one would share this allowlist (a host gives each secure node its own).
        `on_denied(key)` is told each client key refused (Z85): the caller counts and logs."""
        super().__init__(context)
        # Keys arrive Z85-encoded (as in key files); ZAP hands the callback Z85 too.
        self.allowlist = _Allowlist({key: name for name, key in peer_keys.items()}, on_denied)
        self.configure_curve_callback(ZAP_DOMAIN, credentials_provider=self.allowlist)

    def curve_user_id(self, client_public_key: bytes) -> str:
        return self.allowlist.names_by_key[z85.encode(client_public_key)]

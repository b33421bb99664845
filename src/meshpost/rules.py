"""What a local user may send, and to whom: the one copy every entry point uses.

Rule: pure functions of the body, the limits and the configured names; no I/O. The node, the
control server and the remote console all check through here, so they refuse alike. The size
rule itself is the wire's (`protocol.frames.oversize`), which the listener applies to peers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from meshpost.errors import EmptyMessage, InvalidMessage, MessageTooLarge, UnknownPeer
from meshpost.protocol.frames import oversize

#: The target that means every configured peer.
ALL = "all"


def validate_body(body: str, max_bytes: int) -> None:
    """Raise `EmptyMessage`, `MessageTooLarge` or `InvalidMessage` for a body that cannot be
    sent; return quietly otherwise."""
    if not body or not body.strip():
        raise EmptyMessage()
    size = oversize(body, max_bytes)
    if size is not None:
        raise MessageTooLarge(size, max_bytes)
    try:
        body.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidMessage("message body is not valid Unicode text (lone surrogate)") from None


def validate_bodies(bodies: Sequence[str], max_bytes: int) -> None:
    """`validate_body` for many bodies at C speed: each body is checked alone only when the
    whole list's cheap checks say it may fail."""
    if not bodies:
        return
    if not all(bodies) or max(map(len, bodies)) * 4 > max_bytes:
        for body in bodies:
            if not body or len(body) * 4 > max_bytes:
                validate_body(body, max_bytes)
    try:
        # Lone surrogates cannot be stored or sent; one join finds them for the batch.
        "".join(bodies).encode("utf-8")
    except UnicodeEncodeError:
        for body in bodies:
            validate_body(body, max_bytes)


def resolve_target(
    target: str, *, local_name: str, peers: Sequence[str],
    groups: Mapping[str, Iterable[str]],
) -> list[str]:
    """Peer names a target means: a peer, a group (without ourselves), or `all`.
    Raises `UnknownPeer` naming every valid target."""
    if target.lower() == ALL:
        return list(peers)
    if target in peers:
        return [target]
    group = groups.get(target)
    if group is not None:
        return [m for m in group if m != local_name]
    raise UnknownPeer(target, [*peers, *groups, ALL])


def resolve_peer(target: str, *, peers: Sequence[str]) -> str:
    """The one peer `target` names (no group, not `all`), or `UnknownPeer`."""
    if target not in peers:
        raise UnknownPeer(target, list(peers))
    return target


__all__ = ["ALL", "resolve_peer", "resolve_target", "validate_bodies", "validate_body"]

"""The one body validation and target resolution every entry point uses."""

from __future__ import annotations

import pytest

from meshpost.errors import EmptyMessage, InvalidMessage, MessageTooLarge, UnknownPeer
from meshpost.protocol.frames import oversize
from meshpost.rules import resolve_peer, resolve_target, validate_bodies, validate_body

PEERS = ["B", "C"]
GROUPS = {"team": ("A", "B")}


@pytest.mark.parametrize(
    ("body", "error"),
    [("", EmptyMessage), ("   \n", EmptyMessage), ("é" * 6, MessageTooLarge),
     ("a\ud800b", InvalidMessage)],
)
def test_a_body_that_cannot_be_sent_is_refused_with_its_reason(
    body: str, error: type[Exception]
) -> None:
    with pytest.raises(error):
        validate_body(body, 10)
    with pytest.raises(error):
        validate_bodies(["fine", body], 10)


def test_a_body_at_the_limit_passes_and_one_byte_more_does_not() -> None:
    validate_body("é" * 5, 10)
    validate_bodies(["é" * 5, "ok"], 10)
    with pytest.raises(MessageTooLarge, match="11 bytes"):
        validate_body("é" * 5 + "x", 10)


def test_targets_resolve_to_peers_groups_without_ourselves_and_all() -> None:
    def resolve(target: str) -> list[str]:
        return resolve_target(target, local_name="A", peers=PEERS, groups=GROUPS)

    assert resolve("B") == ["B"]
    assert resolve("team") == ["B"]
    assert resolve("ALL") == PEERS
    with pytest.raises(UnknownPeer, match="known peers: B, C, all, team"):
        resolve("Z")


def test_a_single_peer_target_refuses_groups_and_all() -> None:
    assert resolve_peer("C", peers=PEERS) == "C"
    for target in ("team", "all", "Z"):
        with pytest.raises(UnknownPeer):
            resolve_peer(target, peers=PEERS)


def test_oversize_gives_the_utf8_size_only_past_the_limit() -> None:
    # The one size rule: local sends (validate_body) and the listener (a peer's messages).
    assert oversize("é" * 3, 6) is None  # 6 bytes: at the limit
    assert oversize("é" * 4, 6) == 8
    assert oversize("abc", 2) == 3
    with pytest.raises(MessageTooLarge) as info:
        validate_body("é" * 4, 6)
    assert (info.value.size, info.value.limit) == (8, 6)

"""The node's events (node/events.py): what the links and the listener report becomes a logged,
counted and published change; subscribers' queues are bounded and lose their oldest events."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from tests.unit.node.support import config

import meshpost.node.events as events
from meshpost.errors import MalformedFrame
from meshpost.node import Node, PeerChange, PeerChanged
from meshpost.protocol import LinkRefused, PeerLeft, PeerLost, SessionClaimed, ViolationDetected
from meshpost.transport.routing_ids import connection_label


def peer_changes(node: Node) -> list[object]:
    """What a new subscriber hears of a lost, a departed and a refusing peer."""
    queue = node.subscribe()
    node._on_event(PeerLost("B", 3.5))
    node._on_event(PeerLeft("B", "shutting down"))
    node._on_event(LinkRefused("B", "unknown-peer", "who are you"))
    out = []
    while not queue.empty():
        out.append(queue.get_nowait())
    return out


def test_peer_changes_are_published_to_every_subscriber_in_order(tmp_path: Path) -> None:
    node = Node(config("A", "B", tmp_path))
    other = node.subscribe()
    assert peer_changes(node) == [
        PeerChanged("B", False, PeerChange.LOST, "silent for 3.5s"),
        PeerChanged("B", False, PeerChange.LEFT, "shutting down"),
        PeerChanged("B", False, PeerChange.REFUSED, "who are you"),
    ]
    assert other.qsize() == 3


def test_an_unsubscribed_queue_hears_nothing_more_and_a_second_unsubscribe_is_harmless(
    tmp_path: Path,
) -> None:
    node = Node(config("A", "B", tmp_path))
    queue = node.subscribe()
    node.unsubscribe(queue)
    node.unsubscribe(queue)
    node._on_event(PeerLost("B", 1.0))
    assert queue.empty()


def test_a_full_subscriber_queue_loses_its_oldest_events(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(events, "SUBSCRIBER_QUEUE", 2)
    node = Node(config("A", "B", tmp_path))
    queue = node.subscribe()
    for silent in (1.0, 2.0, 3.0):
        node._on_event(PeerLost("B", silent))
    assert [queue.get_nowait(), queue.get_nowait()] == [
        PeerChanged("B", False, PeerChange.LOST, "silent for 2.0s"),
        PeerChanged("B", False, PeerChange.LOST, "silent for 3.0s"),
    ]


def test_violations_and_name_claims_are_counted_and_logged_not_published(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    node = Node(config("A", "B", tmp_path))
    queue = node.subscribe()
    with caplog.at_level(logging.WARNING, logger="meshpost.node.events"):
        node._on_event(ViolationDetected("B", MalformedFrame("bad bytes")))
        node._on_event(SessionClaimed("B", "conn-2", 2))
        node._on_event(SessionClaimed("B", "conn-3", 2, refused=True))
    assert node.stats.violations == 1
    assert node.stats.name_claims == 2
    assert queue.empty()
    # Connections are named by a keyed digest of their routing id, never by the id itself.
    assert f"protocol violation by connection {connection_label('B')}: bad bytes" in caplog.text
    assert f"refused connection {connection_label('conn-3')} saying Hello as B" in caplog.text
    assert "conn-3" not in caplog.text

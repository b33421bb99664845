"""What a refused Hello is told: the reason as the listener decided it, in words a user of the
refused node can act on (kept apart from test_listener.py, which another change owns now)."""

from __future__ import annotations

from tests.unit.protocol.test_listener import WALL, connected, refusal, send

from meshpost.protocol import PROTOCOL_VERSION, Hello, RefuseCode


def test_a_live_peers_name_from_another_node_id_is_refused_saying_whose_name_it_is() -> None:
    """Audit: a second node named 'alice' (another data dir) was told "'alice' is connected
    already", which read as false when bob's own link to alice was idle and closed: what
    decides is alice's session, her connection to bob, active within LIVE_SESSION_NS."""
    listener = connected()  # alice (node-alice) said Hello on connection "alice"
    borrowed = Hello(PROTOCOL_VERSION, "node-other", "alice", WALL, 1)
    refused = refusal(send(listener, borrowed, "c2"))
    assert refused.code == RefuseCode.IDENTITY
    assert refused.detail.startswith(
        "'bob' knows 'alice' as node node-alice, which sent on another connection within the "
        "last 30 s; this Hello is from node node-other.")
    assert "give this node a name of its own" in refused.detail
    assert "connected already" not in refused.detail

"""`text.format_fetched_history`: who answered, and for each member who did not, why; the
"a later reply" hint only where a reply can still come."""

from __future__ import annotations

from meshpost.node import GroupHistory
from meshpost.text import format_fetched_history


def test_a_refused_or_unreadable_member_gets_no_later_reply_hint() -> None:
    history = GroupHistory("team", (), ("A",), {
        "B": "not-delivered", "C": "refused: rate-limited, ask again in 1.5 s",
        "D": "unreadable reply: not a history reply"})
    assert format_fetched_history(history)[-4:] == [
        "answered: A (1/4)",
        "no answer from B: not-delivered (a later reply is stored and linked to its request)",
        "no answer from C: refused: rate-limited, ask again in 1.5 s",
        "no answer from D: unreadable reply: not a history reply",
    ]

"""`/stats` and `meshpost peers` say when the store keeps failing: how long, how often, when
the next try is and why (docs/reliability.md, "Store errors: retried or refused")."""

from __future__ import annotations

from meshpost.node import NodeStats
from meshpost.text import format_store_retry, render_stats


def test_a_node_whose_writes_commit_shows_no_retry_line() -> None:
    stats = NodeStats(sent=4)
    assert format_store_retry(stats) is None
    lines = render_stats(stats).splitlines()
    assert lines[0].split() == ["sent", "4"]
    assert [line.split()[0] for line in lines if line.startswith("store_retry")] == [
        "store_retry_attempts", "store_retry_delay_s", "store_retry_for_s", "store_retry_error"]


def test_a_node_retrying_its_writes_says_so_first_with_the_reason() -> None:
    stats = NodeStats(store_errors=9, store_retry_attempts=5, store_retry_delay_s=0.8,
                      store_retry_for_s=12.34,
                      store_retry_error="store_full: database or disk is full")
    line = format_store_retry(stats)
    assert line == ("store: writes failing for 12.3 s (5 attempts), next try in 0.80 s; "
                    "nothing new is stored or receipted until one commits: store_full: "
                    "database or disk is full")
    rendered = render_stats(stats).splitlines()
    assert rendered[0] == line
    assert any(r.split() == ["store_retry_delay_s", "0.80"] for r in rendered)

"""The transition tables: as data they are complete where they must be, `reachable` follows the
state, and docs/protocol.md prints exactly what the data says."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshpost.protocol import LinkInput, LinkState, SessionInput, SessionState, tables
from meshpost.protocol import dialer as dialer_module
from meshpost.protocol import listener as listener_module

DOC = Path(__file__).resolve().parents[3] / "docs" / "protocol.md"


@pytest.mark.parametrize(
    ("mark", "table"),
    [(tables.DIALER_MARK, tables.dialer_table()),
     (tables.LISTENER_MARK, tables.listener_table())],
)
def test_the_protocol_document_prints_each_table_as_the_data_has_it(
    mark: str, table: str
) -> None:
    assert tables.generated_section(mark, table) in DOC.read_text(encoding="utf-8"), (
        f"docs/protocol.md's {mark} table differs from the data: paste "
        f"meshpost.protocol.tables.generated_section({mark!r}, ...) into it"
    )


def test_every_dialer_state_can_be_reached_and_left() -> None:
    reached = {LinkState.CONNECTING}
    frontier = [LinkState.CONNECTING]
    while frontier:
        state = frontier.pop()
        for (source, _kind), after in dialer_module.TRANSITIONS.items():
            if source is state and after not in reached:
                reached.add(after)
                frontier.append(after)
    assert reached == set(LinkState)
    for state in LinkState:
        assert any(s is state and a is not state for (s, _), a in dialer_module.TRANSITIONS.items())


def test_a_welcome_makes_every_state_ready_and_only_ready_is_reachable() -> None:
    for state in LinkState:
        if state is LinkState.IDLE:  # no connection: a Welcome reaching it is stale
            assert (state, LinkInput.WELCOME) not in dialer_module.TRANSITIONS
        else:
            assert dialer_module.TRANSITIONS[state, LinkInput.WELCOME] is LinkState.READY
    link = dialer_module.DialerLink(
        local_name="a", local_node_id="n", peer="b", window=4, window_bytes=1 << 20,
        retransmit_initial_s=0.5, retransmit_max_s=5.0, ping_interval_s=1.0, peer_timeout_s=4.0,
    )
    for state in LinkState:
        link.state = state
        assert link.reachable is (state is LinkState.READY)


def test_the_listener_table_covers_every_state_and_input() -> None:
    assert set(listener_module.TRANSITIONS) == {(s, i) for s in SessionState for i in SessionInput}

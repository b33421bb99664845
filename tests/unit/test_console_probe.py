"""`/peers --probe [PEER ...]` in the console: sent to the node's `probe_peers`, and its answer
shown as the probe table (live with a round trip, lost with why). How the line is parsed is
tested with the command language, in tests/unit/console/test_commands.py."""

from __future__ import annotations

from pathlib import Path

from tests.unit.test_console import Driver, FakeNode, drive

from meshpost.console import CONSOLE_PROBE_WAIT_S
from meshpost.node import PeerProbe


class ProbedNode(FakeNode):
    """B answers a probe in 1.5 ms; C is gone."""

    def __init__(self, data_dir: Path) -> None:
        super().__init__(data_dir)
        self.probed: list[tuple[tuple[str, ...], float]] = []

    async def probe_peers(self, *peers: str, wait_s: float) -> list[PeerProbe]:
        self.probed.append((peers, wait_s))
        found = {"B": PeerProbe("B", "live", 1_500_000, "ready"),
                 "C": PeerProbe("C", "lost", None, "connecting", "no answer within 2s")}
        return [found[p] for p in peers or ("B", "C")]


def test_peers_probe_shows_who_answered_and_who_is_lost(tmp_path: Path) -> None:
    node = ProbedNode(tmp_path)

    async def scenario(d: Driver) -> None:
        d.type("/peers --probe\n")
        table = await d.printed(r"no answer within 2s")
        assert "live" in table
        assert "1.50" in table
        assert "connected" in table and "ready" not in table  # the peers table's word
        d.type("/peers --probe B\n")
        await d.printed(r"asking B")
        d.type("/quit\n")

    drive(node, scenario)
    assert node.probed == [((), CONSOLE_PROBE_WAIT_S), (("B",), CONSOLE_PROBE_WAIT_S)]

"""The bench's report shows notes as written: they quote commands, never rich markup."""

from __future__ import annotations

from rich.console import Console

from meshpost.bench import ScenarioResult, print_table


def test_a_note_quoting_an_install_command_is_printed_whole() -> None:
    note = "paho-mqtt is not installed (pip install -e '.[bench]')"
    console = Console(record=True, width=200)
    print_table(console, {"broker-anchors": ScenarioResult("broker-anchors", "skipped",
                                                           note=note)})
    assert note in console.export_text()

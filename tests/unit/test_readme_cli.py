"""README's CLI facts are the code's: the exit-code table matches `cli.EXIT_CODE_MEANINGS`, and
the TOML example loads and runs on one machine (loopback and ipc only)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from meshpost.cli import EXIT_CODE_MEANINGS, build_parser
from meshpost.config import MeshConfig

README = Path(__file__).resolve().parents[2] / "README.md"


def readme() -> str:
    return README.read_text(encoding="utf-8")


def test_readme_exit_code_table_matches_the_code() -> None:
    rows = re.findall(r"^\| `(\d+)` \| ([^|]+?) \|", readme(), re.M)
    assert {int(code): meaning for code, meaning in rows} == EXIT_CODE_MEANINGS


def test_readme_toml_example_loads_and_stays_on_this_machine(tmp_path: Path) -> None:
    (block,) = re.findall(r"```toml\n(.*?)```", readme(), re.S)
    path = tmp_path / "mesh.toml"
    path.write_text(block, encoding="utf-8")
    mesh = MeshConfig.load(path)
    names = [n.name for n in mesh.nodes]
    assert names == ["A", "B", "C"]
    for name in names:
        node = mesh.node(name, data_dir=tmp_path / name)
        for endpoint in (*node.bind, *(p.endpoint for p in node.peers)):
            assert endpoint.startswith(("tcp://127.0.0.1:", "ipc://")), endpoint
    assert mesh.node("A", data_dir=tmp_path / "A").groups == {"team": ("B", "C")}


def test_every_cli_command_in_the_readme_parses() -> None:
    """Each `meshpost ...` line of README's shell blocks is a command the parser takes."""
    parser = build_parser()
    blocks = re.findall(r"```sh\n(.*?)```", readme(), re.S)
    commands = [line.split("#", 1)[0].strip() for block in blocks for line in block.splitlines()]
    commands = [c for c in commands if c.startswith("meshpost ") and "--version" not in c]
    assert len(commands) >= 8
    for command in commands:
        parser.parse_args(command.split()[1:])


def _cli_reference() -> str:
    text = readme()
    start = text.index("## CLI reference")
    return text[start:text.index("\nExit codes:", start)]


def test_the_cli_reference_has_a_row_for_every_command() -> None:
    """`meshpost request`, `task` and `pipeline` were missing from the table a newcomer reads."""
    parser = build_parser()
    (subcommands,) = [a for a in parser._actions if a.dest == "command"]
    rows = re.findall(r"^\| `meshpost (\w+)", _cli_reference(), re.M)
    assert set(subcommands.choices) - set(rows) == set()


def test_the_history_json_schema_lists_every_field_history_prints() -> None:
    """`kind` and `ref` (what a pattern message is, what it refers to) were printed but not
    documented in the schema README calls stable."""
    from meshpost.cli.history import HISTORY_FIELDS

    text = readme()
    section = text[text.index("### `history --json` schema"):]
    section = section[:section.index("\n## ")]
    documented = []
    for first_cell in re.findall(r"^\| (`[^|]+`) \|", section, re.M):
        documented += re.findall(r"`(\w+)`", first_cell)
    assert sorted(documented) == sorted(HISTORY_FIELDS)


def test_every_node_command_in_the_readme_gets_past_its_configuration_checks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A newcomer runs README's lines as written. The LAN example bound `tcp://0.0.0.0:7000`
    with neither --secure nor --insecure, which the node refuses (exit 2) before it starts;
    each `meshpost node` line builds its configuration here (`--config mesh.toml`: README's
    TOML example)."""
    from meshpost.cli.node import build_node_config

    (block,) = re.findall(r"```toml\n(.*?)```", readme(), re.S)
    (tmp_path / "mesh.toml").write_text(block, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    parser = build_parser()
    blocks = re.findall(r"```sh\n(.*?)```", readme(), re.S)
    lines = [line.split("#", 1)[0].strip() for block in blocks for line in block.splitlines()]
    commands = [line for line in lines if line.startswith("meshpost node ")]
    assert len(commands) >= 5
    for command in commands:
        build_node_config(parser.parse_args(command.split()[1:]))


def test_the_console_table_has_every_command_and_option_of_help() -> None:
    """`/peers --probe` was in /help but not in README's table of console commands."""
    from meshpost.console import HELP_TEXT

    text = readme()
    section = text[text.index("## The console"):text.index("## CLI reference")]
    table = "\n".join(line for line in section.splitlines() if line.startswith("| `"))
    words = set(re.findall(r"(?<![\w/])(/\w+|--\w+)", HELP_TEXT))
    assert words
    assert sorted(w for w in words if w not in table) == []

"""`meshpost node NAME --config FILE` with flags: those the file cannot take with it are refused
with a usage error, not dropped (`--peer X=...` beside `--config` ran the node without X)."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshpost.cli import build_parser
from meshpost.cli.node import build_node_config
from meshpost.errors import ConfigError

MESH = """
[nodes.A]
bind = ["tcp://127.0.0.1:5555"]
[nodes.B]
bind = ["tcp://127.0.0.1:5556"]
"""


@pytest.fixture
def mesh_file(tmp_path: Path) -> Path:
    path = tmp_path / "mesh.toml"
    path.write_text(MESH, encoding="utf-8")
    return path


@pytest.mark.parametrize(("flags", "named"), [
    (["--peer", "X=tcp://127.0.0.1:5999"], "--peer"),
    (["--group", "g=B"], "--group"),
    (["--peer", "X=tcp://127.0.0.1:5999", "--group", "g=B"], "--peer and --group"),
])
def test_peer_or_group_flags_beside_a_config_file_are_refused(
    mesh_file: Path, tmp_path: Path, flags: list[str], named: str,
) -> None:
    args = build_parser().parse_args(["node", "A", "--config", str(mesh_file), "--data",
                                      str(tmp_path / "A"), *flags])
    with pytest.raises(ConfigError, match=f"^{named} cannot be combined with --config"):
        build_node_config(args)


def test_a_config_file_alone_gives_its_peers(mesh_file: Path, tmp_path: Path) -> None:
    args = build_parser().parse_args(["node", "A", "--config", str(mesh_file), "--data",
                                      str(tmp_path / "A")])
    assert [p.name for p in build_node_config(args).peers] == ["B"]


class _Tty:
    """A standard stream on a terminal (file descriptor 0)."""

    def isatty(self) -> bool:
        return True

    def fileno(self) -> int:
        return 0


@pytest.mark.parametrize(("terminal_group", "ours", "console"), [
    (4242, 4242, True),  # in the foreground: the console
    (4242, 5151, False),  # started with `&`: headless, not stopped at its first write
])
def test_a_node_in_the_terminals_background_runs_headless(
    monkeypatch: pytest.MonkeyPatch, terminal_group: int, ours: int, console: bool,
) -> None:
    """`meshpost node A ... &` from a shell opened its console anyway and the shell stopped it
    ("Stopped (tty output)"): it served nobody until brought to the foreground."""
    from meshpost.cli import node as node_cli

    monkeypatch.setattr(node_cli.sys, "stdin", _Tty())
    monkeypatch.setattr(node_cli.sys, "stdout", _Tty())
    monkeypatch.setattr(node_cli.os, "tcgetpgrp", lambda fd: terminal_group)
    monkeypatch.setattr(node_cli.os, "getpgrp", lambda: ours)
    assert node_cli.owns_terminal() is console

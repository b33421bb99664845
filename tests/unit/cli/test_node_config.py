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

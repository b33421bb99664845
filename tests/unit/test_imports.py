"""Importing meshpost is cheap: the sans-IO protocol and `meshpost --help` load no ZeroMQ,
SQLite or asyncio (each import runs in a fresh interpreter, the only honest way to see what
an import loads), and the package's public names still import the usual way."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import meshpost

#: Modules that mean I/O machinery, which only a running node needs.
HEAVY = ("zmq", "sqlite3", "asyncio")
TIMEOUT_S = 60


def _python(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          timeout=TIMEOUT_S, check=True)


def test_importing_the_protocol_loads_no_zmq_sqlite_or_asyncio() -> None:
    code = ("import meshpost.protocol, sys; "
            f"print(sorted(m for m in sys.modules if m in {set(HEAVY)!r}))")
    assert _python("-c", code).stdout.strip() == "[]"


def _modules_loaded_by(*cli_args: str, exit_code: int = 0) -> set[str]:
    """Every module `python -m meshpost ARGS` imports (read from -X importtime)."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "meshpost", *cli_args],
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == exit_code, proc.stderr[-2000:]
    names = set()
    for line in proc.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip())
    assert "meshpost.cli" in names  # the parser saw the real import path
    return names


@pytest.mark.parametrize("cli_args", [("--help",), ("bench", "--help")])
def test_help_loads_no_zmq_sqlite_or_asyncio(cli_args: tuple[str, ...]) -> None:
    loaded = _modules_loaded_by(*cli_args)
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))
    assert "meshpost.node" not in loaded


@pytest.mark.parametrize("command", [("peers",), ("send", "--to", "B", "hi"),
                                     ("group", "members", "g")])
def test_a_command_for_a_running_node_loads_neither_the_store_nor_the_node(
    command: tuple[str, ...], tmp_path: Path,
) -> None:
    """It talks to the node's control endpoint: importing the node's store (SQLite, the
    writer), its core and transport only slowed every such command's start."""
    from meshpost.errors import EXIT_NOT_RUNNING

    loaded = _modules_loaded_by(*command, "--node", "A", "--data", str(tmp_path),
                                exit_code=EXIT_NOT_RUNNING)  # no node runs there: the error
    assert "meshpost.control.client" in loaded  # it got as far as asking the node
    unwanted = {"meshpost.store.sqlite", "meshpost.store.writer", "meshpost.node.core",
                "meshpost.transport", "meshpost.control.server"}
    assert not loaded & unwanted, sorted(loaded & unwanted)


def test_public_names_import_from_the_package() -> None:
    from meshpost import MeshpostError, Node, NodeConfig
    from meshpost.config import NodeConfig as ConfigNodeConfig
    from meshpost.errors import MeshpostError as ErrorsMeshpostError
    from meshpost.node import Node as NodeNode

    assert (Node, NodeConfig, MeshpostError) == (NodeNode, ConfigNodeConfig,
                                                 ErrorsMeshpostError)
    assert all(getattr(meshpost, name) is not None for name in meshpost.__all__)
    assert set(meshpost.__all__) <= set(dir(meshpost))


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'Nodes'"):
        _ = meshpost.Nodes  # type: ignore[attr-defined]

"""Private by default (issue 16, item 7): a store and its control socket are this user's only,
whatever the umask, and a node does not listen beyond loopback without authentication unless
told to (`--insecure`)."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshpost.config import NodeConfig
from meshpost.control import ControlServer
from meshpost.node import Node
from meshpost.store.sqlite import DB_FILENAME

pytestmark = pytest.mark.integration


@pytest.fixture
def umask_000() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path | str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("deep", [False, True], ids=["socket-in-data-dir", "socket-in-tmp"])
def test_store_files_and_control_socket_are_private_under_umask_000(
    short_tmp: Path, umask_000: None, deep: bool
) -> None:
    # A data dir path too long for a unix socket puts the control socket under /tmp.
    data_dir = short_tmp / ("d" * 110 if deep else "d") / "node"
    cfg = NodeConfig(name="alice", bind=(f"ipc://{short_tmp}/a.sock",), data_dir=data_dir)

    async def scenario() -> dict[str, int]:
        async with Node(cfg) as node, ControlServer(node) as control:
            await node.flush()
            db = data_dir / DB_FILENAME
            sock = control.endpoint[len("ipc://") :]
            return {
                "data_dir": mode(data_dir),
                "db": mode(db),
                "wal": mode(f"{db}-wal"),
                "shm": mode(f"{db}-shm"),
                "socket_dir": mode(os.path.dirname(sock)),
            }

    modes = asyncio.run(scenario())
    assert modes == {"data_dir": 0o700, "db": 0o600, "wal": 0o600, "shm": 0o600,
                     "socket_dir": 0o700}


def test_an_existing_loose_store_is_tightened(short_tmp: Path, umask_000: None) -> None:
    data_dir = short_tmp / "old"
    data_dir.mkdir(mode=0o755)
    (data_dir / DB_FILENAME).touch(mode=0o644)
    cfg = NodeConfig(name="alice", bind=(f"ipc://{short_tmp}/a.sock",), data_dir=data_dir)

    async def scenario() -> None:
        async with Node(cfg):
            pass

    asyncio.run(scenario())
    assert (mode(data_dir), mode(data_dir / DB_FILENAME)) == (0o700, 0o600)


def test_binding_beyond_loopback_without_secure_is_refused_before_any_socket(
    short_tmp: Path,
) -> None:
    data_dir = short_tmp / "exposed"
    result = subprocess.run(
        [sys.executable, "-m", "meshpost", "node", "alice", "--headless", "--bind",
         "tcp://0.0.0.0:7901", "--data", str(data_dir)],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 2, result.stderr
    assert "--secure" in result.stderr and "--insecure" in result.stderr
    assert not data_dir.exists()  # refused before the store, let alone a socket

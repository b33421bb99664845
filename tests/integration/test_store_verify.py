"""A big store opens without verifying every row; a corrupt older row found after start fails
the node (and `meshpost node` exits 6, as it would have at open) before it is ever served."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from meshpost import Node, NodeConfig, PeerConfig
from meshpost.errors import NodeFailed, StoreCorrupt
from meshpost.protocol import Envelope
from meshpost.store import DB_FILENAME, Store, WriteBatch
from meshpost.store import sqlite as store_sqlite

pytestmark = pytest.mark.integration

T = 1_700_000_000_000_000_000


def _config(tmp: Path) -> NodeConfig:
    return NodeConfig(name="A", bind=(f"ipc://{tmp}/a.sock",),
                      peers=(PeerConfig("B", f"ipc://{tmp}/b.sock"),), data_dir=tmp / "A")


def _big_store_with_a_rotten_old_row(
    config: NodeConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """50 received messages, the 3rd one altered on disk; open verifies only the newest 5."""
    store = Store.open(config.data_dir, name="A")
    store.apply(WriteBatch(incoming=[[
        Envelope(f"in-{s:03d}", s, "B", "A", f"body {s}", T + s, T + s) for s in range(1, 51)
    ]]), T)
    store.close()
    conn = sqlite3.connect(config.data_dir / DB_FILENAME, isolation_level=None)
    conn.execute("UPDATE messages SET body = 'body 3!' WHERE id = 'in-003'")
    conn.close()
    monkeypatch.setattr(store_sqlite, "OPEN_VERIFY_ROWS", 5)


def test_a_corrupt_row_found_after_start_fails_the_node(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _config(short_tmp)
    _big_store_with_a_rotten_old_row(config, monkeypatch)

    async def scenario() -> None:
        async with Node(config) as node:  # open checked only the newest rows: it starts
            with pytest.raises(NodeFailed) as raised:
                await asyncio.wait_for(node.serve(asyncio.Event()), 30)
            assert isinstance(raised.value.cause, StoreCorrupt)
            assert "in-003" in str(raised.value)
            assert node.failure is raised.value
            assert node.snapshot_stats().store_corrupt == 1
            with pytest.raises(NodeFailed):
                await node.post("B", "after the corruption was found")

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_meshpost_node_exits_with_the_corrupt_store_error_found_after_start(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from meshpost.cli import EXIT_STORE
    from meshpost.cli.node import _run_node

    config = _config(short_tmp)
    _big_store_with_a_rotten_old_row(config, monkeypatch)
    with pytest.raises(NodeFailed, match=r"is corrupt.*restore it from a copy") as raised:
        asyncio.run(asyncio.wait_for(_run_node(config, interactive=False), 60))
    assert raised.value.exit_code == EXIT_STORE


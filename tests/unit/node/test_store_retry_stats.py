"""A node whose store keeps failing says so in its stats: how many attempts failed since the
last commit, the delay before the next, for how long, and why (`store_retry_*`), and all of it
goes back to nothing once a commit goes through (docs/reliability.md, "Store errors")."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.unit.node.support import PATIENCE_S, node_pair, run, until

from meshpost.errors import StoreFull
from meshpost.node import wait_receipt
from meshpost.store.sqlite import WriteBatch


def test_a_receiver_whose_disk_is_full_shows_it_is_retrying_and_why(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with node_pair(tmp_path) as (a, b, _net, _clock):
            writer = b._writer
            assert writer is not None
            apply, full = writer._apply, [True]

            def failing(batch: WriteBatch, **kwargs: Any) -> Any:
                if full[0]:
                    raise StoreFull(str(writer.store.path))
                return apply(batch, **kwargs)

            writer._apply = failing  # type: ignore[method-assign]
            assert b.snapshot_stats().store_retry_attempts == 0
            (handle,) = await a.post("B", "while the disk is full")
            await until(lambda: b.snapshot_stats().store_retry_attempts >= 2)
            stats = b.snapshot_stats()
            assert stats.store_retry_error.startswith("store_full: ")
            assert stats.store_retry_delay_s > 0
            assert stats.store_retry_for_s >= 0
            assert stats.store_errors >= stats.store_retry_attempts
            assert not handle.receipt.done()  # nothing receipted meanwhile
            full[0] = False  # space freed: the next attempt commits
            await wait_receipt(handle, PATIENCE_S)
            await until(lambda: b.snapshot_stats().store_retry_attempts == 0)
            stats = b.snapshot_stats()
            assert (stats.store_retry_delay_s, stats.store_retry_for_s,
                    stats.store_retry_error) == (0.0, 0.0, "")

    run(scenario)

"""A message the receiver's store refuses on its own (a constraint its row breaks) is
rejected to its sender with code `unstorable`, counted and logged; it costs no other message
and is never retried (docs/reliability.md, "Store errors: retried or refused")."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from tests.unit.node.support import PATIENCE_S, node_pair, run

import meshpost.store.sqlite as sqlite_module
from meshpost.errors import MessageRejected, RowRefused
from meshpost.node import wait_receipt
from meshpost.protocol import Envelope, RejectCode
from meshpost.store import StoreReader
from meshpost.store.sqlite import DB_FILENAME

#: A row the receiver's store can never accept: what a constraint of the schema does to a
#: row breaking it (SQLITE_CONSTRAINT), made by a trigger so that a valid envelope reaches it.
POISON_TRIGGER = (
    "CREATE TRIGGER poison BEFORE INSERT ON messages WHEN NEW.body = 'poison'"
    " BEGIN SELECT RAISE(ABORT, 'poisoned row'); END"
)


def test_a_message_the_receivers_store_refuses_is_rejected_and_costs_no_other(
    tmp_path: Path,
) -> None:
    """On the old code the receiver retried the failing batch every 2 s for ever: neither
    the poisoned message nor any later one was ever receipted."""

    async def scenario() -> None:
        async with node_pair(tmp_path) as (a, b, _net, _clock):
            with contextlib.closing(sqlite3.connect(b.config.data_dir / DB_FILENAME)) as db:
                db.execute(POISON_TRIGGER)
            before = [h for body in ("one", "two") for h in await a.post("B", body)]
            (poisoned,) = await a.post("B", "poison")
            after = [h for body in ("three", "four") for h in await a.post("B", body)]
            for handle in [*before, *after]:
                await wait_receipt(handle, PATIENCE_S)
            with pytest.raises(MessageRejected) as rejected:
                await wait_receipt(poisoned, PATIENCE_S)
            assert rejected.value.code == RejectCode.UNSTORABLE
            assert "poisoned row" in str(rejected.value)
            assert b.snapshot_stats().store_refused == 1
            assert b.snapshot_stats().store_errors == 0  # refused, not retried
            # The writer carries on: the next message is stored as usual.
            (later,) = await a.post("B", "five")
            await wait_receipt(later, PATIENCE_S)
            with StoreReader.for_data_dir(b.config.data_dir) as reader:
                assert [m.body for m in reader.history(direction="in")] == [
                    "one", "two", "three", "four", "five"]
            await a.flush()
            with StoreReader.for_data_dir(a.config.data_dir) as reader:
                states = {m.body: m.state for m in reader.history(direction="out")}
            assert states["poison"] == "rejected"
            assert await asyncio.wait_for(a.pending_count(), PATIENCE_S) == 0

    run(scenario)


def test_an_own_message_the_store_refuses_fails_alone_and_the_link_goes_on(
    tmp_path: Path,
) -> None:
    """Our own message refused by our store fails its caller with `RowRefused` (not
    `NodeFailed`: the node goes on); its seq stays unused, and the link delivers the
    messages after it as usual."""

    async def scenario() -> None:
        async with node_pair(tmp_path) as (a, b, _net, _clock):
            with contextlib.closing(sqlite3.connect(a.config.data_dir / DB_FILENAME)) as db:
                db.execute(POISON_TRIGGER)
            (first,) = await a.post("B", "one")
            with pytest.raises(RowRefused, match="poisoned row"):
                await asyncio.wait_for(a.post("B", "poison"), PATIENCE_S)
            assert a.failure is None
            (after,) = await a.post("B", "two")
            assert (first.seq, after.seq) == (1, 3)  # 2 was the refused one's
            for handle in (first, after):
                await wait_receipt(handle, PATIENCE_S)
            receipt = await asyncio.wait_for(a.send("B", "three"), PATIENCE_S)
            assert receipt.seq == 4
            assert a.snapshot_stats().store_refused == 1
            with StoreReader.for_data_dir(b.config.data_dir) as reader:
                assert [m.body for m in reader.history(direction="in")] == [
                    "one", "two", "three"]

    run(scenario)


def test_an_own_message_whose_write_fails_unexpectedly_fails_alone_and_the_node_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Not a constraint but anything else raised while our store writes one of our own
    messages (here a bug that one body sets off) used to break the writer: that send and
    every later one failed with `NodeFailed`. Now only that send fails, with a `RowRefused`
    naming the exception; the node goes on (docs/reliability.md, "Store errors")."""
    real_row_values = sqlite_module._row_values

    def buggy(messages: Sequence[Envelope], scratch: bytearray | None = None) -> list[Any] | None:
        if any(m.body == "bug" for m in messages):
            raise RuntimeError("a bug of ours")
        return real_row_values(messages, scratch)

    async def scenario() -> None:
        async with node_pair(tmp_path) as (a, b, _net, _clock):
            monkeypatch.setattr(sqlite_module, "_row_values", buggy)
            (first,) = await a.post("B", "one")
            with pytest.raises(RowRefused, match="RuntimeError: a bug of ours"):
                await asyncio.wait_for(a.post("B", "bug"), PATIENCE_S)
            assert a.failure is None
            (after,) = await a.post("B", "two")
            assert (first.seq, after.seq) == (1, 3)  # 2 was the refused one's
            for handle in (first, after):
                await wait_receipt(handle, PATIENCE_S)
            assert a.snapshot_stats().store_refused == 1
            assert a.snapshot_stats().store_errors == 0
            with StoreReader.for_data_dir(b.config.data_dir) as reader:
                assert [m.body for m in reader.history(direction="in")] == ["one", "two"]

    run(scenario)

"""22. A ventilator killed -9 mid-run and restarted goes on from its `tasks` rows
(docs/protocol.md 19.4): V, two workers, sink S, real processes; V dies with tasks queued, in
flight and done. The checker's pattern rules then find every task's result kept once at S (the
right one), every task done at V, and every message stored once on both ends.

Before the fix a restarted ventilator rebuilt no dispatcher: its queued tasks were never sent
and its assigned ones never completed (`tasks` rows stayed 'queued'/'assigned').
"""

from __future__ import annotations

import asyncio
from functools import partial

import pytest

from .checker import read_rows
from .conftest import MeshFactory, until_true
from .patterns import read_tables, results_kept_at

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.timeout(300)]

TASKS = 120
WORKER = ("--worker", "work=meshpost.pipeline:slow_upper")
PATIENCE_S = 90.0
until = partial(until_true, timeout_s=PATIENCE_S)




def test_a_ventilator_killed_mid_run_goes_on_after_restart(mesh_factory: MeshFactory) -> None:
    mesh = mesh_factory(["V", "W1", "W2", "S"], node_args={"W1": WORKER, "W2": WORKER},
                        seed=21)
    mesh.ledger.expect_result = str.upper

    def kept() -> int:
        return results_kept_at(mesh.data_dir("S"))

    async def scenario() -> None:
        await mesh.start()
        await until("V has both serve records", lambda: {"W1", "W2"} <= {
            r.sender for r in read_rows(mesh.data_dir("V"), "WHERE kind = 'serve'")})
        await mesh.submit("V", "work", "S", [f"task {i}" for i in range(TASKS)], lease_s=3.0)
        await until("a fifth of the results", lambda: kept() >= TASKS // 5)
        assert await asyncio.to_thread(mesh.kill, "V") == -9
        mesh.extra["kept_at_kill"] = await asyncio.to_thread(kept)
        await asyncio.to_thread(mesh.start_real, ["V"])
        await until("every result kept at S", lambda: kept() >= TASKS)
        await until("every task done at V", lambda: all(
            t.state == "done" for t in read_tables(mesh.data_dir("V")).tasks.values()))
        counts = await mesh.finish()
        assert counts.patterns["tasks"] == counts.patterns["results_kept"] == TASKS
        assert counts.patterns["tasks_done"] == TASKS
        assert mesh.extra["kept_at_kill"] < TASKS

    mesh.run(scenario, timeout_s=240)

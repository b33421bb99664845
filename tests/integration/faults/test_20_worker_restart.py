"""20. A worker killed -9 with tasks in hand and restarted before its ventilator notices runs
those tasks again (docs/patterns.md 4.6: "if it comes back, its stored, unanswered tasks run
again"). V, one worker W, sink S; V's peer timeout and the lease are far longer than the test,
so nothing but W itself can finish the tasks it had stored when it died.

Before the fix a restarted worker never looked at the tasks it had stored: they waited for
their lease (30 s by default; here longer than the test) while V, which had seen no loss,
gave W nothing else in their place.
"""

from __future__ import annotations

import asyncio
from functools import partial

import pytest

from .checker import Mesh, read_rows
from .conftest import MeshFactory, until_true
from .patterns import results_kept_at

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.timeout(300)]

TASKS = 60
WORKER = ("--worker", "work=meshpost.pipeline:slow_upper")
#: Far beyond the test's own bound: only W can finish what it holds.
LEASE_S = 3600.0
PATIENCE_S = 60.0
until = partial(until_true, timeout_s=PATIENCE_S)




def _held_by_w(mesh: Mesh) -> int:
    """Task messages W has stored and not answered with a result."""
    rows = read_rows(mesh.data_dir("W"), "WHERE kind IN ('task', 'result')")
    answered = {r.ref for r in rows if r.kind == "result"}
    return sum(1 for r in rows if r.kind == "task" and r.ref not in answered)


def test_a_restarted_worker_runs_the_tasks_it_had_stored(mesh_factory: MeshFactory) -> None:
    mesh = mesh_factory(["V", "W", "S"], node_args={"W": WORKER}, seed=20,
                        options={"peer_timeout_s": 3600.0})
    mesh.ledger.expect_result = str.upper

    def kept() -> int:
        return results_kept_at(mesh.data_dir("S"))

    async def scenario() -> None:
        await mesh.start()
        await until("V has W's serve record", lambda: any(
            r.sender == "W" for r in read_rows(mesh.data_dir("V"), "WHERE kind = 'serve'")))
        bodies = [f"task {i} for W" for i in range(TASKS)]
        await mesh.submit("V", "work", "S", bodies, lease_s=LEASE_S)
        await until("W holding tasks with some results in", lambda: kept() >= 5
                     and _held_by_w(mesh) > 0)
        assert await asyncio.to_thread(mesh.kill, "W") == -9
        held = await asyncio.to_thread(_held_by_w, mesh)
        await asyncio.to_thread(mesh.start_real, ["W"])
        await until("every result kept at S", lambda: kept() >= TASKS)
        mesh.extra["held_at_kill"] = held
        counts = await mesh.finish()
        assert held > 0
        assert counts.patterns["results_kept"] == TASKS
        assert counts.patterns.get("redelivered", 0) == 0  # V took no task back: W did them

    mesh.run(scenario, timeout_s=150)

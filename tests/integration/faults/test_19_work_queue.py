"""19. A work queue under faults (seed 002, issue 18): ventilator V, workers W1 and W2
(`--worker work=meshpost.pipeline:slow_upper`, 0.1 s a task) and sink S as real processes.
Mid-run W1 is killed -9 and W2 is stopped (SIGSTOP) past the peer timeout, so that for a while
no worker runs; W1 is restarted meanwhile, W2 resumed later with tasks in hand that V has
given to W1 since. The checker's pattern rules judge the stores.
"""

from __future__ import annotations

import asyncio
from functools import partial

import pytest

from .checker import Mesh, read_rows
from .conftest import MeshFactory, until_true
from .patterns import read_tables, results_kept_at

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.timeout(300)]

TASKS = 200
#: Short, so that the stalled worker's tasks also come back by lease (V takes them back at
#: once when it loses the worker: peer_timeout_s 1.5 s of the battery's fast options).
LEASE_S = 3.0
WORKER = ("--worker", "work=meshpost.pipeline:slow_upper")
PATIENCE_S = 60.0
until = partial(until_true, timeout_s=PATIENCE_S)




def _all_done(mesh: Mesh) -> bool:
    tasks = read_tables(mesh.data_dir("V")).tasks.values()
    return len(tasks) == TASKS and all(t.state == "done" for t in tasks)


def _answered_all(mesh: Mesh, worker: str) -> bool:
    """`worker` sent a `done` for every task message it stored. A worker resumed with tasks
    in hand that V gave to another since still runs them, and each `done` is sent only once
    the sink receipted its result: until then its outbox can be empty between a result's
    receipt and its `done`, and the drain's check may pass while a `done` is still to come,
    which the stop then leaves pending."""
    data = mesh.data_dir(worker)
    tasks = {r.ref for r in read_rows(data, "WHERE direction = 'in' AND kind = 'task'")}
    dones = {r.ref for r in read_rows(data, "WHERE direction = 'out' AND kind = 'done'")}
    return tasks <= dones


def test_work_queue_with_a_killed_and_a_stalled_worker(mesh_factory: MeshFactory) -> None:
    mesh = mesh_factory(["V", "W1", "W2", "S"], node_args={"W1": WORKER, "W2": WORKER}, seed=19)
    mesh.ledger.expect_result = str.upper

    def kept() -> int:
        return results_kept_at(mesh.data_dir("S"))

    async def scenario() -> None:
        await mesh.start()
        await until("V has both workers' serve records", lambda: {
            r.sender for r in read_rows(mesh.data_dir("V"), "WHERE kind = 'serve'")
        } >= {"W1", "W2"})
        bodies = [f"task {i} from the ventilator" for i in range(TASKS)]
        submit = mesh.spawn_task(mesh.submit("V", "work", "S", bodies, lease_s=LEASE_S))
        await until("a fifth of the results", lambda: kept() >= TASKS // 5)
        assert await asyncio.to_thread(mesh.kill, "W1") == -9
        kept_at_kill = await asyncio.to_thread(kept)
        mesh.assert_no_receipt_without_commit("after kill -9 of W1")
        await asyncio.sleep(0.3)
        mesh.sigstop("W2")  # now no worker runs: W1 dead, W2 stalled with tasks in hand
        await asyncio.sleep(1.0)
        await asyncio.to_thread(mesh.start_real, ["W1"])
        await asyncio.sleep(1.5)  # W2 stopped 2.5 s in all: past the peer timeout
        mesh.assert_no_receipt_without_commit("while W2 is stopped")
        mesh.sigcont("W2")
        await submit
        await until("every result kept at S", lambda: kept() >= TASKS)
        await until("every task done at V", lambda: _all_done(mesh))
        await until("each worker's done sent for every task it stored",
                    lambda: _answered_all(mesh, "W1") and _answered_all(mesh, "W2"))
        mesh.extra["kept_at_kill"] = kept_at_kill
        counts = await mesh.finish()
        assert kept_at_kill < TASKS, "W1 was not killed mid-run"
        assert all(t.outcome == "accepted" for t in mesh.ledger.tasks)
        assert counts.patterns["tasks"] == counts.patterns["results_kept"] == TASKS
        assert counts.patterns["tasks_done"] == TASKS
        # The faults made V send some tasks again (W1's and W2's in hand).
        assert counts.patterns["redelivered"] > 0, counts.line()

    mesh.run(scenario, timeout_s=240)

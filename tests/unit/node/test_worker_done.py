"""A worker's `done` across its own restart (docs/protocol.md 19.4): a worker that died after
its sink receipted a result and before it stored the `done` sends that `done` at its next
start (or, if the sink had not receipted the result yet, once it does), once per task, so
the ventilator completes the task without its lease and without running it twice.

V (ventilator), W (worker) and S (sink) on an in-memory network with one fake clock: no
peer timeout and no lease ever runs out unless a test advances the clock, so only W's
`done` can complete a task. W "dies" by being partitioned from V (no Bye reaches V, as
after a kill -9) and closed with its `done` never sent."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

from tests.unit.node.support import PATIENCE_S, connected, run, until

from meshpost.clock import FakeClock
from meshpost.config import NodeConfig, PeerConfig
from meshpost.node import Node
from meshpost.store import StoredMessage, StoreReader
from meshpost.transport import MemoryNetwork

NAMES = ("V", "W", "S")
#: Far beyond any test: only W's `done` can complete a task.
LEASE_S = 3600.0


def mesh_config(name: str, tmp_path: Path) -> NodeConfig:
    return NodeConfig(
        name=name, bind=(f"ipc://{tmp_path}/{name}.sock",),
        peers=tuple(PeerConfig(o, f"ipc://{tmp_path}/{o}.sock") for o in NAMES if o != name),
        data_dir=tmp_path / name, sync="normal",
    )


def rows(node_or_dir: Node | Path, kind: str) -> list[StoredMessage]:
    folder = node_or_dir.config.data_dir if isinstance(node_or_dir, Node) else node_or_dir
    with StoreReader.for_data_dir(folder) as reader:
        return [r for r in reader.history() if r.kind == kind]


def task_rows(v: Node) -> list[tuple[str, str, int]]:
    with StoreReader.for_data_dir(v.config.data_dir) as reader:
        return [(str(t), str(s), int(a)) for t, s, a in reader._conn.execute(
            "SELECT task_id, state, attempts FROM tasks ORDER BY task_id")]


class Mesh:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.net, self.clock = MemoryNetwork(), FakeClock()

    def node(self, name: str) -> Node:
        return Node(mesh_config(name, self.tmp_path), clock=self.clock,
                    transport=self.net.transport(name))

    async def connect(self, *nodes: Node) -> None:
        """Until `nodes` are all connected: a link that dialed a node not up yet retries on
        its (fake) clock, moved on here in steps far below any peer timeout or lease."""
        async with asyncio.timeout(PATIENCE_S):
            while not all(connected(n) for n in nodes):
                self.clock.advance(0.2)
                await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def ventilator_and_sink(mesh: Mesh) -> AsyncIterator[tuple[Node, Node]]:
    v, s = mesh.node("V"), mesh.node("S")
    async with v, s:
        yield v, s


async def work_then_die(mesh: Mesh, v: Node, *, sink_receipts: bool) -> tuple[str, list[str]]:
    """W serves `work`, V submits one task (sink S); W dies after the result left and before
    its `done` was stored: after S's receipt was recorded (`sink_receipts`), or with S cut
    off so the result is still in W's outbox. Returns the task id and the handler's runs."""
    runs: list[str] = []

    def upper(body: str) -> str:
        runs.append(body)
        return body.upper()

    w = mesh.node("W")
    async with w:
        await mesh.connect(v, w)
        dying = asyncio.Event()

        async def die(*_args: object) -> None:  # where the `done` would be stored
            dying.set()
            await asyncio.Event().wait()

        w._queues._send_done = die  # type: ignore[method-assign]
        if not sink_receipts:
            mesh.net.partition("W", "S")
        await w.serve_queue("work", upper)
        await until(lambda: v.queue_workers("work") == ["W"])
        [task_id] = await v.submit("work", ["hola"], sink="S", lease_s=LEASE_S)
        if sink_receipts:
            await until(dying.is_set)
            await w.flush()  # S's receipt of the result recorded at W
            [result] = rows(w, "result")
            assert result.state == "delivered"
        else:
            await until(lambda: len(rows(w, "result")) == 1)
            [result] = rows(w, "result")
            assert result.state == "pending" and not dying.is_set()
        mesh.net.partition("V", "W")  # no Bye reaches V: to V, W just went quiet
    mesh.net.heal("V", "W")
    mesh.net.heal("W", "S")
    assert rows(w, "done") == []
    assert v.completed_tasks == []
    return task_id, runs


def test_a_worker_sends_at_start_the_done_of_a_result_its_sink_receipted(
    tmp_path: Path,
) -> None:
    """Before the fix W never sent it: V waited for the lease and ran the task twice."""
    async def scenario() -> None:
        mesh = Mesh(tmp_path)
        async with ventilator_and_sink(mesh) as (v, _s):
            task_id, runs = await work_then_die(mesh, v, sink_receipts=True)
            w = mesh.node("W")
            async with w:  # back, without even serving the queue: the `done` needs no handler
                await until(lambda: v.completed_tasks == [(task_id, "W")])
                await w.flush()
            # Once per task: started again, W owes nothing and sends nothing more.
            w = mesh.node("W")
            async with w:
                await mesh.connect(v, w)
                await until(lambda: w._queues._early is None)
                await w.flush()
            assert runs == ["hola"]
            assert task_rows(v) == [(task_id, "done", 1)]
            [done] = rows(w, "done")
            assert (done.ref, done.recipient, done.state) == (task_id, "V", "delivered")
            assert [r.ref for r in rows(v, "done")] == [task_id]

    run(scenario)


def test_a_worker_sends_the_done_once_its_sink_receipts_a_result_resent_after_a_restart(
    tmp_path: Path,
) -> None:
    """The result had not reached S when W died: W's outbox resends it after the restart and
    S's receipt, recorded, makes the `done` due."""
    async def scenario() -> None:
        mesh = Mesh(tmp_path)
        async with ventilator_and_sink(mesh) as (v, s):
            task_id, runs = await work_then_die(mesh, v, sink_receipts=False)
            assert rows(s, "result") == []
            w = mesh.node("W")
            async with w:
                await until(lambda: v.completed_tasks == [(task_id, "W")])
                await w.flush()
            assert runs == ["hola"]
            assert task_rows(v) == [(task_id, "done", 1)]
            assert [r.ref for r in rows(w, "done")] == [task_id]
            with StoreReader.for_data_dir(s.config.data_dir) as reader:
                assert [(t, w_, b) for t, w_, _m, b in reader.task_results()] == [
                    (task_id, "W", "HOLA")]

    run(scenario)


def test_a_result_the_sink_rejects_after_a_restart_owes_no_done(tmp_path: Path) -> None:
    """S refuses the resent result (here: S came back accepting less than its size): there
    is nothing for a `done` to vouch for, so none is sent (the lease gives the task to
    another worker), and W forgets what it owed."""
    async def scenario() -> None:
        mesh = Mesh(tmp_path)
        async with ventilator_and_sink(mesh) as (v, _s):
            task_id, _runs = await work_then_die(mesh, v, sink_receipts=False)
        small_s = Node(dataclasses.replace(mesh_config("S", tmp_path), max_message_bytes=3),
                       clock=mesh.clock, transport=mesh.net.transport("S"))
        v = mesh.node("V")
        async with v, small_s:
            w = mesh.node("W")
            async with w:
                await until(lambda: [r.state for r in rows(w, "result")] == ["rejected"])
                await until(lambda: not w._queues.follows_seqs)
                await w.flush()
            assert rows(w, "done") == []
            assert task_rows(v) == [(task_id, "assigned", 1)]

    run(scenario)

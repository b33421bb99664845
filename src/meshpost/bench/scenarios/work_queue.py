"""`work-queue`: seed 002 on the mesh. Ventilator V, workers W1 and W2 (`--worker
work=upper --prefetch 128`) and sink S are real `meshpost node` processes; this process
submits N tasks to V through its control endpoint (`SubmitRequest`, as `meshpost task`
does). Every hop is a receipted, stored message: the task V→W, the result W→S, the `done`
W→V. The clock runs from the submit to S's commit of the last task's first result (its
`stored_at_ns`); CPU is every node's, over the same span, per task. Then the outboxes drain
and the four stores are read: each task stored once at V and once at the worker that did
it, each task's result kept once at S (the right one), no task without a result; anything
else fails the scenario.

In the same run, seed 002 itself on raw pyzmq: a ventilator PUSH, two workers PULL →
upper-case → PUSH, a sink PULL, four processes, the same tasks, body size and transport; no
receipt, no storage, nothing survives a crash. Its rate is the ceiling of the ratio.

Rule: a figure only after the exactly-once check passed; the raw run is the best of
`--repeat` (it takes well under a second), the meshpost run is one.
"""

from __future__ import annotations

import collections
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meshpost.bench.children import Child
from meshpost.bench.meters import CpuMeter
from meshpost.bench.options import READY_TIMEOUT_S, STALL_S, BenchError, allowance
from meshpost.bench.results import ScenarioResult
from meshpost.bench.support import endpoint_for, task_body
from meshpost.cluster import LocalCluster, NodeProcess
from meshpost.control import ControlClient, SubmitRequest, checked
from meshpost.protocol.header import result_id
from meshpost.store import StoredMessage, StoreReader
from meshpost.verify import verify_stores

if TYPE_CHECKING:
    from meshpost.bench.runner import Bench

QUEUE = "work"
WORKERS = ("W1", "W2")
#: The workers' prefetch (`--prefetch`): their handler is instant, so deep prefetch fills the
#: cycle V -> W -> S -> W -> V and each hop's messages share batches (at the default 16 each
#: message left nearly alone: docs/benchmarks.md, work-queue). Seed 002's sleeping workers
#: (`meshpost pipeline demo`) keep the default, for balance.
PREFETCH = 128
#: A lease far above any task's time here: with no fault injected, a redelivery would only
#: measure the machine's load, not the queue (the fault battery covers redelivery).
LEASE_S = 120.0
#: How often S's results are counted while the tasks run: each count reads them all, on
#: the same two cores as the nodes; the time itself comes from S's commit times, not this.
POLL_S = 0.2
#: Seconds to wait, after the last result, for every outbox (done, receipts) to drain.
DRAIN_S = 60.0


def run(bench: Bench) -> ScenarioResult:
    n = bench.o.tasks
    raw_runs = [_raw_once(bench, index) for index in range(1, bench.o.repeat + 1)]
    raw = max(raw_runs, key=lambda r: r["tasks_per_s"])
    mesh = _meshpost_once(bench)
    summary = mesh.pop("verify_summary")
    rate = mesh["tasks_per_s"]
    figures: dict[str, Any] = {
        **mesh, "tasks": n, "size": bench.o.size, "sync": bench.o.sync,
        "transport": bench.o.transport, "raw_tasks_per_s": raw["tasks_per_s"],
        "raw_cpu_us_per_task": raw["cpu_us_per_task"],
        "raw_runs_tasks_per_s": [r["tasks_per_s"] for r in raw_runs],
        # Three significant digits: the ratio is far below 1 (each task is several commits).
        "ratio_to_raw": float(f"{rate / raw['tasks_per_s']:.3g}"),
    }
    check = mesh["checked"]
    return ScenarioResult(
        "work-queue", figures=figures,
        verify=(f"verified: {n} tasks, each stored once at V and at the worker that did it, "
                f"each result kept once at S ({check['deliveries']} deliveries, "
                f"{check['results_stored']} results stored, {check['results_kept']} kept); "
                f"{summary}"),
    )


# -- meshpost ---------------------------------------------------------------------------------


def _meshpost_once(bench: Bench) -> dict[str, Any]:
    n = bench.o.tasks
    root = bench.root / "work-queue"
    cluster = LocalCluster.create(root, 4, names=["V", *WORKERS, "S"],
                                  transport=bench.o.transport, options={"sync": bench.o.sync},
                                  env=bench.loop_env)
    bodies = [task_body(i, bench.o.size) for i in range(n)]
    task = bench.task(f"work-queue: V → {' + '.join(WORKERS)} → S, sync={bench.o.sync}", n)
    try:
        cluster.start(["V", "S"])
        for worker in WORKERS:
            node = NodeProcess(worker, cluster.config_path, cluster.data_dir(worker),
                               root / "logs" / f"{worker}.log",
                               extra_args=("--worker", f"{QUEUE}=upper",
                                           "--prefetch", str(PREFETCH)), env=bench.loop_env)
            cluster.nodes[worker] = node.start()
        for worker in WORKERS:
            cluster.nodes[worker].wait_ready(READY_TIMEOUT_S)
        _wait_workers_known(cluster)
        cpu = CpuMeter({name: cluster.nodes[name].cpu_seconds for name in cluster.names})
        cpu.start()
        t0_ns = time.time_ns()
        with ControlClient(cluster.data_dir("V"), name="V") as client:
            reply = checked(client.request(
                SubmitRequest(queue=QUEUE, sink="S", bodies=bodies, lease_s=LEASE_S),
                timeout_s=allowance(n)))
        submit_s = (time.time_ns() - t0_ns) / 1e9
        _wait_results(bench, cluster.data_dir("S"), n, task)
        cpu_us = cpu.us_per_message(n)
        _wait_drained(cluster)
    finally:
        cluster.stop()
    dirs = {name: cluster.data_dir(name) for name in cluster.names}
    checked_figures, last_ns = check_exactly_once(dirs, dict(zip(reply.task_ids, bodies,
                                                                   strict=True)))
    report = verify_stores(dirs)
    if not report.ok or report.pending or report.delivered != report.sent:
        raise BenchError(f"verification failed: {'; '.join(report.problems[:5])} "
                         f"({report.summary()})")
    seconds = (last_ns - t0_ns) / 1e9
    return {"tasks_per_s": round(n / seconds, 1), "seconds": round(seconds, 3),
            "submit_seconds": round(submit_s, 3), "cpu_us_per_task": cpu_us,
            "checked": checked_figures, "verify_summary": report.summary()}


def _wait_workers_known(cluster: LocalCluster) -> None:
    """Until V has stored both workers' `serve` records (else the first tasks would all go to
    whichever worker V heard of first)."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        with StoreReader.for_data_dir(cluster.data_dir("V")) as reader:
            senders = {m.sender for m in reader.history(direction="in") if m.kind == "serve"}
        if senders >= set(WORKERS):
            return
        if time.monotonic() > deadline:
            raise BenchError(f"V heard from {sorted(senders)} only of the workers after "
                             f"{READY_TIMEOUT_S:.0f}s")
        time.sleep(0.05)


def _wait_results(bench: Bench, sink_dir: Path, n: int, task: Any) -> None:
    """Until S keeps a result for each of `n` tasks; fails on no progress for STALL_S."""
    kept, since = -1, time.monotonic()
    while kept < n:
        with StoreReader.for_data_dir(sink_dir) as reader:
            now_kept = len(reader.task_results())
        bench.progress.update(task, completed=now_kept)
        if now_kept != kept:
            kept, since = now_kept, time.monotonic()
        elif time.monotonic() - since > STALL_S:
            raise BenchError(f"S kept {kept} of {n} results and no more for {STALL_S:.0f}s")
        time.sleep(POLL_S)


def _wait_drained(cluster: LocalCluster) -> None:
    """Until no store has an unreceipted outgoing message (the `done`s and the last
    receipts), bounded."""
    deadline = time.monotonic() + DRAIN_S
    while True:
        pending = {}
        for name in cluster.names:
            with StoreReader.for_data_dir(cluster.data_dir(name)) as reader:
                pending[name] = reader.pending_count()
        if not any(pending.values()):
            return
        if time.monotonic() > deadline:
            raise BenchError(f"outboxes not drained after {DRAIN_S:.0f}s: {pending}")
        time.sleep(0.05)


def check_exactly_once(dirs: dict[str, Path],
                        expected: dict[str, str]) -> tuple[dict[str, Any], int]:
    """Read the four stores and check the work queue's promise for every task in `expected`
    (task id -> body); `BenchError` naming the first problems otherwise. Returns the counts
    and S's commit time (wall ns) of the last task's first result."""
    rows: dict[str, list[StoredMessage]] = {}
    for name, data_dir in dirs.items():
        with StoreReader.for_data_dir(data_dir) as reader:
            rows[name] = reader.history()  # each row's checksum checked as it is read
            if name == "S":
                kept = reader.task_results()
    problems: list[str] = []
    # The ventilator's task messages: one per delivery, each to one worker.
    sent_tasks: dict[str, list[StoredMessage]] = collections.defaultdict(list)
    for m in rows["V"]:
        if m.direction == "out" and m.kind == "task":
            sent_tasks[str(m.ref)].append(m)
    stored_at: dict[str, dict[str, StoredMessage]] = {
        w: {m.id: m for m in rows[w] if m.direction == "in" and m.kind == "task"}
        for w in WORKERS}
    for task_id in expected:
        if not sent_tasks.get(task_id):
            problems.append(f"task {task_id}: never sent by V")
    for task_id, messages in sent_tasks.items():
        if task_id not in expected:
            problems.append(f"task message for unknown task {task_id}")
        for m in messages:
            copy = stored_at.get(m.recipient, {}).get(m.id)
            if copy is None:
                problems.append(f"task {task_id} message {m.id}: not stored at {m.recipient}")
            elif (copy.body, copy.sent_at_ns, copy.hlc, copy.ref) != (m.body, m.sent_at_ns,
                                                                      m.hlc, m.ref):
                problems.append(f"task {task_id} message {m.id}: copies differ")
            if m.body != expected.get(task_id, m.body):
                problems.append(f"task {task_id} message {m.id}: body is not the task's")
    # The sink: one kept result per task, the right one, from a worker that had the task.
    results_in = {(m.sender, m.id): m for m in rows["S"]
                  if m.direction == "in" and m.kind == "result"}
    kept_by_task = {t: (w, i, b) for t, w, i, b in kept}
    if len(kept_by_task) != len(kept):
        problems.append("a task has two kept results at S")
    for task_id, body in expected.items():
        found = kept_by_task.get(task_id)
        if found is None:
            problems.append(f"task {task_id}: no result at S")
            continue
        worker, message_id, result = found
        if result != body.upper():
            problems.append(f"task {task_id}: result {result[:30]!r} is not its upper-case")
        # The derived result id names the task message it answers: the kept result came
        # from a worker that stored this task (a delivery of it).
        had = {result_id(m.id) for m in stored_at.get(worker, {}).values() if m.ref == task_id}
        if message_id not in had:
            problems.append(f"task {task_id}: kept result {message_id} answers none of the "
                            f"{len(had)} task message(s) {worker} stored for it")
        if (worker, message_id) not in results_in:
            problems.append(f"task {task_id}: kept result {message_id} is not a stored message")
    for task_id in set(kept_by_task) - set(expected):
        problems.append(f"S kept a result for unknown task {task_id}")
    if problems:
        raise BenchError(f"work queue not exactly once ({len(problems)} problem(s)): "
                         + "; ".join(problems[:5]))
    first_results = [m for m in results_in.values()
                     if kept_by_task.get(str(m.ref), ("", "", ""))[1] == m.id]
    by_worker = collections.Counter(w for w, _i, _b in kept_by_task.values())
    return ({"deliveries": sum(map(len, sent_tasks.values())),
             "redelivered": sum(len(v) - 1 for v in sent_tasks.values()),
             "results_stored": len(results_in), "results_kept": len(kept_by_task),
             "kept_by_worker": dict(sorted(by_worker.items()))},
            max(m.stored_at_ns for m in first_results))


# -- raw pyzmq: seed 002 as the tutorial wrote it ----------------------------------------------


def _raw_once(bench: Bench, index: int) -> dict[str, Any]:
    n, size, transport = bench.o.tasks, bench.o.size, bench.o.transport
    task = bench.task(f"work-queue raw run {index}: PUSH → 2 × PULL/PUSH → PULL", n)
    scenario = "work-queue-raw"
    children: list[Child] = []
    cpu_start: list[float] = []
    try:
        sink = bench.child(scenario, ["raw-collector",
                                      endpoint_for(transport, bench.root, f"rawsink{index}")],
                           f"sink{index}")
        children.append(sink)
        ventilator = bench.child(scenario, ["raw-ventilator",
                                            endpoint_for(transport, bench.root,
                                                         f"rawvent{index}")],
                                 f"ventilator{index}")
        children.append(ventilator)
        ready = [sink.reply(30), ventilator.reply(30)]
        workers = [bench.child(scenario, ["raw-worker", ready[1]["ready"], ready[0]["ready"]],
                               f"worker{w}-{index}") for w in (1, 2)]
        children.extend(workers)
        ready += [worker.reply(30) for worker in workers]
        cpu_start = [float(r["cpu_s"]) for r in ready]
        sink.send(n=n, size=size)
        ventilator.send(n=n, size=size, workers=len(workers))
        t0 = float(ventilator.reply(allowance(n))["t0"])
        done = sink.reply(allowance(n))
        bench.progress.update(task, completed=n)
        cpu_end = [float(child.request(10, op="stop")["cpu_s"]) for child in children]
    finally:
        for child in children:
            child.stop(5)
    if (done["count"], done["distinct"], done["wrong"]) != (n, n, 0):
        raise BenchError(f"raw pipeline: {done['count']} results, {done['distinct']} distinct, "
                         f"{done['wrong']} not a task's upper-case (expected {n}, {n}, 0)")
    cpu_s = sum(end - start for start, end in zip(cpu_start, cpu_end, strict=True))
    return {"tasks_per_s": round(n / (float(done["last"]) - t0), 1),
            "cpu_us_per_task": round(cpu_s * 1e6 / n, 2)}

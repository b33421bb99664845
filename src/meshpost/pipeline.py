"""`meshpost pipeline demo`: seed 002 (ventilator -> two workers -> sink) on the mesh, with a
worker killed -9 mid-run, proving every result is kept once at the sink.

Rule: like `meshpost demo`, only public surfaces a user has: node processes started with
`--worker`, the ventilator's control endpoint (`submit`), the sink's store read-only.
"""

from __future__ import annotations

import collections
import shutil
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from meshpost.cluster import LocalCluster, NodeProcess
from meshpost.control import ControlClient, SubmitRequest, checked
from meshpost.store import StoreReader

#: Failure detection fast enough for a demo (seconds): a killed worker is lost after 1 s.
DEMO_OPTIONS = {"ping_interval_s": 0.2, "peer_timeout_s": 1.0, "retransmit_initial_s": 0.2,
                "retransmit_max_s": 1.0}
DEMO_LEASE_S = 5.0
DEMO_TIMEOUT_S = 120.0


#: Seconds each demo task takes (seed 002's workers are instant): long enough that W1 is
#: killed with tasks in hand, whatever the machine.
DEMO_TASK_S = 0.1


def slow_upper(text: str) -> str:
    """The demo's handler: seed 002's upper-casing, taking DEMO_TASK_S (in a thread)."""
    time.sleep(DEMO_TASK_S)
    return text.upper()


def run_pipeline_demo(tasks: int = 200, *, keep: bool = False,
                      console: Console | None = None) -> int:
    """Ventilator V, workers W1 and W2 (upper-casing, DEMO_TASK_S a task), sink S as
    processes; W1 is killed -9 once a third of the results are in. Exit 0 only if the kill
    came mid-run and every task has exactly one result at S, the right one."""
    out = console or Console(highlight=False)
    root = Path(tempfile.mkdtemp(prefix="meshpost-pipeline-"))
    names = ["V", "W1", "W2", "S"]
    cluster = LocalCluster.create(root, 4, transport="ipc", names=names, options=DEMO_OPTIONS)
    try:
        cluster.start(["V", "S"])
        for worker in ("W1", "W2"):
            node = NodeProcess(worker, cluster.config_path, cluster.data_dir(worker),
                               root / "logs" / f"{worker}.log",
                               extra_args=("--worker", "work=meshpost.pipeline:slow_upper"))
            cluster.nodes[worker] = node.start()
            node.wait_ready()
        bodies = [f"task {i} from the ventilator" for i in range(tasks)]
        with ControlClient(cluster.data_dir("V"), name="V") as client:
            reply = checked(client.request(
                SubmitRequest(queue="work", sink="S", bodies=bodies, lease_s=DEMO_LEASE_S),
                timeout_s=60))
        expected = dict(zip(reply.task_ids, bodies, strict=True))
        out.print(f"V submitted {tasks} tasks to queue [bold]work[/]; results go to S")
        killed_at = None
        deadline = time.monotonic() + DEMO_TIMEOUT_S
        results: list[tuple[str, str, str, str]] = []
        while time.monotonic() < deadline:
            with StoreReader.for_data_dir(cluster.data_dir("S")) as reader:
                results = reader.task_results()
            if killed_at is None and len(results) >= tasks // 3:
                cluster.nodes["W1"].kill()
                killed_at = len(results)
                out.print(f"killed W1 (kill -9) with {killed_at} results in")
            if len(results) >= tasks:
                break
            time.sleep(0.1)
        by_worker = collections.Counter(worker for _t, worker, _m, _b in results)
        table = Table(title="who did what (results kept at S)")
        table.add_column("worker")
        table.add_column("results", justify="right")
        for worker in ("W1", "W2"):
            table.add_row(worker + (" (killed)" if worker == "W1" else ""),
                          str(by_worker.get(worker, 0)))
        out.print(table)
        kept = {task_id: body for task_id, _w, _m, body in results}
        wrong = [t for t, body in kept.items() if expected.get(t, "").upper() != body]
        missing = sorted(set(expected) - set(kept))
        mid_run = killed_at is not None and killed_at < tasks
        if not mid_run:
            out.print("[red]W1 was not killed mid-run[/]: the run proves nothing")
        ok = mid_run and not missing and not wrong and len(results) == len(kept) == tasks
        if ok:
            out.print(f"[green]every result arrived once[/]: {tasks} tasks, {len(results)} "
                      "results kept at S, none lost, none twice")
        else:
            out.print(f"[red]FAILED[/]: {len(missing)} task(s) without a result, "
                      f"{len(wrong)} wrong result(s)")
        return 0 if ok else 1
    finally:
        cluster.stop()
        if keep:
            out.print(f"data kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)

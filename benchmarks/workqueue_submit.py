"""The ventilator's submit path, end to end (not part of `make test`).

V -> W1, W2 (`--worker work=upper`) -> S as node processes on ipc, sync=full; N tasks in one
`SubmitRequest` (as `meshpost task` and `bench work-queue` send them). Prints how long the
submit took, tasks/s until S keeps N results, and V's CPU per task. For an A/B, run it on
another tree's sources (the node processes inherit PYTHONPATH):

    .venv/bin/python benchmarks/workqueue_submit.py --tasks 2000
    PYTHONPATH=/path/to/old/src .venv/bin/python benchmarks/workqueue_submit.py --tasks 2000
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import meshpost
from meshpost.cluster import LocalCluster, NodeProcess
from meshpost.control import ControlClient, SubmitRequest, checked
from meshpost.store import StoreReader

#: Bound on every wait: reaching it means a bug, not a slow machine.
PATIENCE_S = 600.0


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + PATIENCE_S
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"gave up waiting for {what}")
        time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=2000)
    n = parser.parse_args().tasks
    root = Path(tempfile.mkdtemp(prefix="meshpost-wq-submit-"))
    cluster = LocalCluster.create(root, 4, names=["V", "W1", "W2", "S"], transport="ipc")

    def serve_records() -> set[str]:
        with StoreReader.for_data_dir(cluster.data_dir("V")) as reader:
            return {m.sender for m in reader.history(direction="in") if m.kind == "serve"}

    def results() -> int:
        with StoreReader.for_data_dir(cluster.data_dir("S")) as reader:
            return len(reader.task_results())

    try:
        cluster.start(["V", "S"])
        for worker in ("W1", "W2"):
            node = NodeProcess(worker, cluster.config_path, cluster.data_dir(worker),
                               root / f"{worker}.log", extra_args=("--worker", "work=upper"))
            cluster.nodes[worker] = node.start()
        for worker in ("W1", "W2"):
            cluster.nodes[worker].wait_ready()
        wait_for(lambda: serve_records() >= {"W1", "W2"}, "both workers' serve records")
        cpu_before = cluster.nodes["V"].cpu_seconds()
        start = time.monotonic()
        with ControlClient(cluster.data_dir("V"), name="V") as client:
            checked(client.request(SubmitRequest(
                queue="work", sink="S", bodies=[f"task {i}" for i in range(n)], lease_s=60.0),
                timeout_s=PATIENCE_S))
        submit_s = time.monotonic() - start
        wait_for(lambda: results() >= n, "every result at S")
        total_s = time.monotonic() - start
        cpu_s = cluster.nodes["V"].cpu_seconds() - cpu_before
    finally:
        cluster.stop()
    print(f"{meshpost.__file__}: {n} tasks: submit {submit_s:.2f} s, every result at S after "
          f"{total_s:.2f} s = {n / total_s:.0f} tasks/s, V CPU {cpu_s * 1e6 / n:.0f} us/task")


if __name__ == "__main__":
    main()

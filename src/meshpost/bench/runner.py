"""One bench run: its work folder, progress display, helper processes, and its results.

Rule: scenarios come from the registry (`meshpost.bench.options.REGISTRY`), each one module
under `meshpost.bench.scenarios` with a `run(bench)`; a scenario that raises is reported as
failed and the run goes on; work files go unless asked to stay or something failed.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Column

from meshpost import eventloop
from meshpost.bench.children import Child, Interrupted, interruptible
from meshpost.bench.options import REGISTRY, BenchError, BenchOptions
from meshpost.bench.report import machine_info, print_table, write_markdown, write_plots
from meshpost.bench.results import ScenarioResult
from meshpost.bench.support import body
from meshpost.cluster import LocalCluster
from meshpost.eventloop import LOOP_ENV


class Bench:
    """One benchmark run: its options, work dir, progress display and results."""

    def __init__(self, options: BenchOptions, console: Console) -> None:
        self.o = options
        self.console = console
        self.root = Path(tempfile.mkdtemp(prefix="mpbench-", dir="/tmp"))
        self.results: dict[str, ScenarioResult] = {}
        self._children: list[Child] = []
        self._clusters: list[LocalCluster] = []
        # Long step names are cut with an ellipsis, never the bar and counts: on an 80-column
        # terminal the names took the whole line (counts showed as "2…"). Without a terminal
        # (a log, a pipe, CI) there is no live display: each scenario's status line says it.
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}",
                       table_column=Column(ratio=3, no_wrap=True, overflow="ellipsis")),
            BarColumn(bar_width=None, table_column=Column(ratio=1, min_width=10)),
            MofNCompleteColumn(), TimeElapsedColumn(),
            console=console, refresh_per_second=4, expand=True,
            disable=not console.is_terminal,
        )
        self.body = body(options.size)

    # -- plumbing --

    def task(self, description: str, total: int) -> TaskID:
        return self.progress.add_task(description, total=total)

    @property
    def loop(self) -> str:
        """The run's event loop (`runner.run` resolved the default)."""
        assert self.o.loop is not None
        return self.o.loop

    @property
    def loop_env(self) -> dict[str, str]:
        """The environment that puts a node or helper process on the run's event loop."""
        return {LOOP_ENV: self.loop}

    def cluster(self, scenario: str, count: int, sync: str | None = None,
                options: dict[str, float] | None = None) -> LocalCluster:
        cluster = LocalCluster.create(self.root / scenario, count, transport=self.o.transport,
                                      options={"sync": sync or self.o.sync, **(options or {})},
                                      env=self.loop_env)
        self._clusters.append(cluster)
        return cluster

    def window_option(self) -> dict[str, float]:
        return {"window": self.o.window} if self.o.window else {}

    def child(self, scenario: str, role: Sequence[str], log_name: str) -> Child:
        child = Child(role, self.root / scenario / "logs" / f"{log_name}.log",
                      env=self.loop_env)
        self._children.append(child)
        return child

    def stop_processes(self) -> None:
        """Stop every helper and cluster this run started that still runs (a scenario's own
        `finally` normally has; this is the net under an interrupted one)."""
        for child in self._children:
            if child.proc.poll() is None:
                child.stop(timeout_s=5.0)
        for cluster in self._clusters:
            cluster.stop()  # quick for nodes that stopped already
        self._children.clear()
        self._clusters.clear()

    def run(self) -> dict[str, ScenarioResult]:
        """Every chosen scenario in the registry's order; a failure is reported, not raised."""
        wanted = set(self.o.scenarios)
        if "pair-throughput" in wanted:
            wanted.add("ceiling")  # the ratio needs the ceiling of this run
        with self.progress:
            for scenario in REGISTRY:
                if scenario.name not in wanted:
                    continue
                try:
                    module = importlib.import_module(
                        f"meshpost.bench.scenarios.{scenario.module}")
                    result: ScenarioResult = module.run(self)
                except Exception as exc:
                    result = ScenarioResult(scenario.name, "failed",
                                            note=f"{type(exc).__name__}: {exc}")
                self.results[scenario.name] = result
                # A finished scenario's bars give way to its status line.
                for task_id in list(self.progress.task_ids):
                    self.progress.remove_task(task_id)
                style = {"ok": "green", "failed": "bold red", "skipped": "yellow"}[result.status]
                self.progress.console.print(
                    f"[{style}]{result.status:>7}[/] {scenario.name}  "
                    + escape(result.note or result.verify)
                )
        return self.results

    def cleanup(self, *, interrupted: bool = False) -> None:
        """Remove the work folder unless asked to keep it or (a run that ended, not one
        stopped by a signal) a scenario failed and its files explain why."""
        failed = any(r.status == "failed" for r in self.results.values())
        if self.o.keep or (failed and not interrupted):
            self.console.print(f"work files kept in {self.root}")
        else:
            shutil.rmtree(self.root, ignore_errors=True)

    # -- helper processes --

    def driver_args(self, cluster: LocalCluster, name: str) -> list[str]:
        return ["driver", str(cluster.config_path), name, str(cluster.data_dir(name))]

    def collect(self, drivers: dict[str, Child], task: TaskID,
                stall_s: float) -> dict[str, dict[str, Any]]:
        """Every driver's reply; fails only if the mesh makes no progress for `stall_s`."""
        replies: dict[str, dict[str, Any]] = {}
        last, since = -1, time.monotonic()
        while len(replies) < len(drivers):
            for name, d in drivers.items():
                if name not in replies:
                    msg = d.poll_reply()
                    if msg is not None:
                        replies[name] = msg
            done = sum(d.progress for d in drivers.values()) + len(replies)
            self.progress.update(task, completed=done - len(replies))
            if done != last:
                last, since = done, time.monotonic()
            elif time.monotonic() - since > stall_s:
                raise BenchError(f"{len(drivers) - len(replies)} driver(s) made no progress "
                                 f"for {stall_s:.0f}s")
            time.sleep(0.1)
        return replies

    def wait_one(self, child: Child, task: TaskID, timeout_s: float) -> dict[str, Any]:
        """`child`'s reply, its progress shown meanwhile; fails after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while True:
            msg = child.poll_reply()
            self.progress.update(task, completed=child.progress)
            if msg is not None:
                return msg
            if time.monotonic() > deadline:
                raise BenchError(f"helper {child.pid} did not finish in {timeout_s:.0f}s")
            time.sleep(0.1)


def run(options: BenchOptions, console: Console | None = None) -> int:
    """Run the benchmark; write JSON, markdown and plots; return 0 if every scenario passed."""
    console = console or Console()
    # Every node and helper runs on this loop, and so does the loop ping-pong of the floor.
    options.loop = eventloop.choose(options.loop)
    bench = Bench(options, console)
    info = machine_info()
    started = time.time()
    stopped: Interrupted | None = None
    with interruptible():
        try:
            results = bench.run()
        except Interrupted as exc:
            stopped = exc
        finally:
            bench.stop_processes()
            bench.cleanup(interrupted=stopped is not None)
    if stopped is not None:
        console.print(f"bench {stopped}: its processes are stopped"
                      + ("" if bench.o.keep else " and its work files removed"), markup=False)
        return 128 + stopped.signum  # as a shell reports a process a signal ended
    print_table(console, results)
    doc = {
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "seconds": round(time.time() - started, 1),
        "command": options.command,
        "machine": info,
        "options": {k: (str(v) if isinstance(v, Path) else v)
                    for k, v in dataclasses.asdict(options).items()},
        "scenarios": {name: r.to_json() for name, r in results.items()},
    }
    json_path = options.json_path or options.out_dir / "latest.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    md_path = options.out_dir / "latest.md"
    write_markdown(md_path, results, info, options)
    plots = write_plots(options.plot_dir or options.out_dir, results)
    if plots is None:
        console.print("no plots: matplotlib is not installed (pip install -e '.[bench]')",
                      markup=False)
    console.print("results: " + ", ".join(str(p) for p in [json_path, md_path, *(plots or [])]),
                  markup=False)
    return 1 if any(r.status == "failed" for r in results.values()) else 0


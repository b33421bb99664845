"""Small helpers shared by the scenarios and the helper processes.

Rule: nothing scenario-specific; what two or more modules of the bench need, once.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import subprocess
import sys
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

from meshpost import eventloop
from meshpost.bench.options import BenchError
from meshpost.cluster import free_tcp_ports
from meshpost.verify import VerifyReport, verify_stores

T = TypeVar("T")


def body(size: int) -> str:
    return "x" * max(1, size)


def task_body(index: int, size: int) -> str:
    """Task `index` of a work-queue run: unique, lower-case (so that upper-casing changes
    it), `size` characters (more if the index needs them); the raw and the meshpost pipeline
    send the same ones."""
    head = f"task {index} "
    return (head + "abcdefghijklmnopqrstuvwxyz" * (size // 26 + 1))[:max(size, len(head))]


def run_async(coro: Coroutine[Any, Any, T], loop: str | None) -> T:
    """Run `coro` in this process on event loop `loop` (the bench's, resolved by then)."""
    return eventloop.run(coro, eventloop.choose(loop))


def optional(module: str) -> Any:
    """Import a module of the `bench` extra (or one without type stubs) by name."""
    return importlib.import_module(module)


def endpoint_for(transport: str, root: Path, name: str) -> str:
    if transport == "ipc":
        return f"ipc://{root.resolve()}/{name}.sock"
    return f"tcp://127.0.0.1:{free_tcp_ports(1)[0]}"


def emit(msg: dict[str, Any]) -> None:
    """One JSON line to the parent (a helper process's only way to answer)."""
    sys.stdout.write(json.dumps(msg) + "\n")
    sys.stdout.flush()


def verify_all(data_dirs: dict[str, Path], *, expect_sent: int) -> VerifyReport:
    """Cross-check every store; raise `BenchError` unless each of `expect_sent` messages is
    delivered, stored once at its receiver, and nothing is lost, doubled or altered."""
    report = verify_stores(data_dirs)
    problems = []
    if not report.ok:
        problems.append("; ".join(report.problems[:5]) or "verification failed")
    if report.sent != expect_sent:
        problems.append(f"{report.sent} messages in outboxes, expected {expect_sent}")
    if report.delivered != expect_sent or report.pending:
        problems.append(f"{report.delivered} delivered, {report.pending} pending")
    if report.received != expect_sent:
        problems.append(f"{report.received} stored at receivers, expected {expect_sent}")
    if problems:
        raise BenchError(f"verification failed: {' | '.join(problems)} ({report.summary()})")
    return report


def mesh_timers(nodes: int) -> dict[str, float]:
    """Liveness and retransmission timers for an N-node mesh on this machine: the node's
    defaults, whatever N. (A full mesh of 100 nodes used to need them stretched: its 9,900
    links pinged every second whether in use or not, which saturated two cores. Links now
    ping only while something waits on them or just did, and idle ones close: issue 20.)
    """
    del nodes
    return {}


@contextlib.contextmanager
def cpu_hog(processes: int, limit_s: float) -> Iterator[None]:
    """`processes` busy loops for the duration of the block, each also ending by itself after
    `limit_s` (so that none outlives a bench that was killed), killed when the block ends."""
    loop = f"import time\nend = time.monotonic() + {limit_s}\nwhile time.monotonic() < end: pass"
    hogs = [subprocess.Popen([sys.executable, "-c", loop]) for _ in range(processes)]
    try:
        yield
    finally:
        for hog in hogs:
            hog.kill()
        for hog in hogs:
            hog.wait()

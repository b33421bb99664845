"""pair-throughput's saturated pair, for CPU and instruction counts (not part of `make test`).

A (this process) posts N messages to B (a `meshpost node` child) exactly as `meshpost bench
pair-throughput` does (`post_in_process`: chunks of one full batch, at most one window
unreceipted, until A has recorded the last receipt), and reports CPU µs per message of each
process and thread (/proc) with the rate. Under `--callgrind`, both processes run under
valgrind with instrumentation on for the timed phase only, and instructions per message are
printed: they do not depend on the machine's load, so an A/B comparison needs one run per
side, not many (use fewer messages: valgrind runs ~50x slower). `--profile DIR` writes
cProfile output of both sides (A's timed phase, B's whole life), `--pyinstrument DIR` the
same sampled, `--perf FILE` a `perf record` of both processes' timed phase.

    .venv/bin/python benchmarks/pair_cpu.py --messages 200000
    .venv/bin/python benchmarks/pair_cpu.py --messages 30000 --callgrind
    .venv/bin/python benchmarks/pair_cpu.py --messages 100000 --profile /tmp/prof

An old tree runs through PYTHONPATH (`PYTHONPATH=/tmp/old/src .venv/bin/python ...`): the
node child inherits it. Repeats of `--callgrind --messages 30000` agree within 0.5%.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from single_send import (  # type: ignore[import-not-found]  # a sibling script
    _Prefixed,
    callgrind,
    instructions,
    process_cpu_ns,
    thread_cpu,
    use_loop,
)

import meshpost.bench.options as bench_options
import meshpost.probes as probes
from meshpost.bench.drive import post_in_process, wait_connected_or_fail
from meshpost.cluster import LocalCluster
from meshpost.config import MeshConfig, NodeConfig
from meshpost.node import Node

_A_CG_DIR = "/tmp/pair-cpu-A-cg"
#: Both processes run under callgrind with one output file per thread (`-NN` suffixes).
_CALLGRIND = ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--separate-threads=yes"]


def per_thread_instructions(prefix: Path) -> dict[str, int]:
    """Instructions of each thread of one callgrind run (files `prefix*-NN`), by role: the
    first thread is the event loop's; the store writer is the one that inserted B-tree rows;
    libzmq's I/O thread runs its epoll loop. Thread names are not in callgrind's output."""
    roles: dict[str, int] = {}
    for path in sorted(prefix.parent.glob(prefix.name + "*-*")):
        text = path.read_text(errors="replace")
        total = next((int(line.split()[1]) for line in text.splitlines()
                      if line.startswith("totals:")), 0)
        if not total:
            continue
        if path.name.endswith("-01"):
            role = "loop"
        elif "sqlite3BtreeInsert" in text:
            role = "store writer"
        elif "epoll_t::loop" in text:
            role = "zmq io"
        else:
            role = "other"
        roles[role] = roles.get(role, 0) + total
    return roles
#: pair-throughput's warm-up (an older tree, run through PYTHONPATH, may not define it).
DEFAULT_WARMUP: int = getattr(bench_options, "PAIR_WARMUP_MESSAGES", 4 * 2048)


class CommitTimer:
    """A probe that sums the wall time of A's commits (`probes.COMMIT`, on the writer thread or
    inline on the loop) while `on`: the writer's busy fraction, GIL waits included."""

    def __init__(self) -> None:
        self.on = False
        self.busy_ns = 0
        self.cpu_ns = 0
        self.runqueue_ns = 0
        self.commits = 0
        self._started = self._cpu_started = self._queued = 0

    @staticmethod
    def _runqueue_ns() -> int:
        """ns the calling thread has waited for a CPU while runnable (schedstat's 2nd field):
        what is neither its CPU nor a sleep (a GIL wait, an fsync) in a commit's wall time."""
        with open(f"/proc/self/task/{threading.get_native_id()}/schedstat") as f:
            return int(f.read().split()[1])

    def mark(self, label: str) -> None:
        if label == probes.COMMIT[0]:
            self._started = time.perf_counter_ns()
            self._cpu_started = time.thread_time_ns()  # the committing thread's own CPU
            self._queued = self._runqueue_ns()
        elif label == probes.COMMIT[1] and self.on:
            self.busy_ns += time.perf_counter_ns() - self._started
            self.cpu_ns += time.thread_time_ns() - self._cpu_started
            self.runqueue_ns += self._runqueue_ns() - self._queued
            self.commits += 1


async def drive(cfg_a: NodeConfig, n: int, size: int, b_pid: int, use_cg: bool,
                warmup: int,
                profile: Path | None, perf_out: Path | None = None,
                sampler: Path | None = None) -> dict[str, Any]:
    body = "x" * size
    timer = CommitTimer()
    async with Node(cfg_a, probe=timer) as a:
        await wait_connected_or_fail(a)
        window = cfg_a.window
        await post_in_process(a, "B", warmup, body, window, lambda _d: None)
        me = os.getpid()
        if use_cg:
            for pid in (me, b_pid):
                callgrind(pid, "-z")
                callgrind(pid, "-i", "on")
        a0, b0 = thread_cpu(me), thread_cpu(b_pid)
        an0, bn0 = process_cpu_ns(me), process_cpu_ns(b_pid)
        perf = None
        if perf_out is not None:
            perf = subprocess.Popen(  # noqa: ASYNC220 - started before the timed phase
                ["perf", "record", "-F", "4000", "-o", str(perf_out), "-p", f"{me},{b_pid}"],
                stderr=subprocess.DEVNULL)
            await asyncio.sleep(1.0)  # perf attaches
        profiler: Any = None
        if sampler is not None:
            from pyinstrument import Profiler
            profiler = Profiler(interval=0.0002)
            profiler.start()
        elif profile is not None:
            import cProfile
            profiler = cProfile.Profile()
            profiler.enable()
        writer = a._writer
        assert writer is not None
        inline0 = writer.inline_commits
        timer.on = True
        t0 = time.perf_counter()
        await post_in_process(a, "B", n, body, window, lambda _d: None)
        elapsed = time.perf_counter() - t0
        timer.on = False
        if sampler is not None:
            profiler.stop()
            (sampler / "A.txt").write_text(profiler.output_text(show_all=False))
        elif profiler is not None:
            profiler.disable()
            assert profile is not None
            profiler.dump_stats(profile / "A.prof")
        an1, bn1 = process_cpu_ns(me), process_cpu_ns(b_pid)
        if perf is not None:
            perf.send_signal(signal.SIGINT)
            perf.wait()
        a1, b1 = thread_cpu(me), thread_cpu(b_pid)
        if use_cg:
            for pid in (me, b_pid):
                callgrind(pid, "-i", "off")
                callgrind(pid, "-d")
        stats = a.snapshot_stats()
        inline = writer.inline_commits - inline0
    cpu_s = {f"A:{k}": a1[k] - a0.get(k, 0) for k in a1}
    cpu_s.update({f"B:{k}": b1[k] - b0.get(k, 0) for k in b1})
    per = {k: v * 1e6 / n for k, v in cpu_s.items()}
    # Each thread's CPU (user + sys) as a fraction of one core over the timed phase: a thread
    # near 1.0 is the bound. (Thread names: the OS names, see store/checkpoints.py name_os_thread.)
    roles: dict[str, float] = {}
    for k, v in cpu_s.items():
        role = k.rsplit(" ", 1)[0]
        roles[role] = roles.get(role, 0.0) + v
    return {
        "messages": n, "elapsed_s": elapsed, "msgs_per_s": round(n / elapsed),
        "cpu_A_us": (an1 - an0) / 1e3 / n, "cpu_B_us": (bn1 - bn0) / 1e3 / n,
        "cpu_us": (an1 - an0 + bn1 - bn0) / 1e3 / n,
        "threads": {k: round(v, 2) for k, v in sorted(per.items()) if v > 0.01},
        "thread_core_fraction": {k: round(v / elapsed, 2) for k, v in sorted(roles.items())
                                 if v / elapsed > 0.005},
        # A's commits in the timed phase: their wall time (GIL waits included) over the run's.
        "commits_A": timer.commits, "inline_commits_A": inline,
        "rows_per_commit_A": round(n * 2 / max(timer.commits, 1), 1),
        "writer_busy_A": round(timer.busy_ns / 1e9 / elapsed, 3),
        "commit_ms_A": round(timer.busy_ns / 1e6 / max(timer.commits, 1), 3),
        # Of that wall time, the committing thread's CPU (the rest: fsync, GIL, run queue).
        "commit_cpu_fraction_A": round(timer.cpu_ns / max(timer.busy_ns, 1), 3),
        # ... waiting for a CPU (a busy machine), and the rest: asleep (the GIL, an fsync).
        "commit_runqueue_fraction_A": round(timer.runqueue_ns / max(timer.busy_ns, 1), 3),
        "commit_asleep_fraction_A": round(
            1 - (timer.cpu_ns + timer.runqueue_ns) / max(timer.busy_ns, 1), 3),
        "retransmissions": stats.retransmissions,
        "load": os.getloadavg()[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--size", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=DEFAULT_WARMUP,
                        help="messages before the timed phase (pair-throughput's by default; "
                        "1000 until 2026-12-06)")
    parser.add_argument("--window", type=int)
    parser.add_argument("--sync", default="full")
    parser.add_argument("--transport", default="tcp")
    parser.add_argument("--callgrind", action="store_true")
    parser.add_argument("--profile", type=Path, help="cProfile both sides into this folder")
    parser.add_argument("--pyinstrument", type=Path, help="pyinstrument (bench extra) both "
                        "sides' main threads into this folder (A: timed phase; B: its life)")
    parser.add_argument("--perf", type=Path, help="`perf record` both processes' timed phase "
                        "into this file (`perf report --sort pid,dso,sym`; pid is the thread)")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"),
                        help="event loop of both processes (default: meshpost's own)")
    args = parser.parse_args()
    run_a = use_loop(args.loop)  # before B starts: it inherits the choice
    root = Path(tempfile.mkdtemp(prefix="pair-cpu-", dir="/tmp"))
    options: dict[str, Any] = {"sync": args.sync}
    if args.window:
        options["window"] = args.window
    cluster = LocalCluster.create(root, 2, transport=args.transport, options=options)
    cg_dir = root / "cg" if args.callgrind else None
    if cg_dir is not None:
        cg_dir.mkdir()
        _Prefixed.prefix = [*_CALLGRIND, f"--callgrind-out-file={cg_dir}/B.%p"]
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
        _Prefixed.python_args = ["-m", "cProfile", "-o", str(args.profile / "B.prof")]
    if args.pyinstrument is not None:
        args.pyinstrument.mkdir(parents=True, exist_ok=True)
        _Prefixed.python_args = ["-m", "pyinstrument", "-i", "0.0002", "-r", "text", "-o",
                                 str(args.pyinstrument / "B.txt")]
    if cg_dir is not None or args.profile is not None or args.pyinstrument is not None:
        cluster.nodes["B"] = _Prefixed("B", cluster.config_path, cluster.data_dir("B"),
                                       root / "logs" / "B.log")
    try:
        b = cluster.nodes["B"].start() if "B" in cluster.nodes else cluster.process("B").start()
        b.wait_ready(300)
        cfg_a = MeshConfig.load(cluster.config_path).node("A", data_dir=cluster.data_dir("A"))
        result = run_a(drive(cfg_a, args.messages, args.size, b.pid, args.callgrind,
                             args.warmup, args.profile, args.perf, args.pyinstrument))
    finally:
        cluster.stop()
    if cg_dir is not None:
        n = result["messages"]
        result["instr_A_per_msg"] = round(instructions(Path(f"{_A_CG_DIR}/A.{os.getpid()}")) / n)
        result["instr_B_per_msg"] = round(instructions(cg_dir / "B.") / n)
        for side, prefix in (("A", Path(f"{_A_CG_DIR}/A.{os.getpid()}")), ("B", cg_dir / "B.")):
            result[f"instr_{side}_per_msg_by_thread"] = {
                role: round(count / n) for role, count in per_thread_instructions(prefix).items()}
        # B's files (one per thread) are kept beside A's, named after this run's A.
        keep = Path(_A_CG_DIR) / f"B-of-A.{os.getpid()}"
        for path in cg_dir.glob("B.*"):
            shutil.copy(path, f"{keep}.{path.name}")
        print(f"callgrind files: {_A_CG_DIR}/A.{os.getpid()}* and {keep}.*")
    for k, v in result.items():
        print(f"{k}: {round(v, 2) if isinstance(v, float) else v}")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    if "--callgrind" in sys.argv and os.environ.get("PAIR_CPU_UNDER_VALGRIND") != "1":
        os.makedirs(_A_CG_DIR, exist_ok=True)
        env = {**os.environ, "PAIR_CPU_UNDER_VALGRIND": "1"}
        sys.exit(subprocess.call([*_CALLGRIND, f"--callgrind-out-file={_A_CG_DIR}/A.%p",
                                  sys.executable,
                                  *sys.argv], env=env))
    main()

"""One send at a time between two node processes: CPU per send, per process and thread (not
part of `make test`).

A (this process) awaits `send()` to B (a `meshpost node` child) N times, as pair-latency
does, and reports CPU µs per send of each thread of both processes (/proc), with wall p50.
Under `--callgrind`, both processes run under valgrind with instrumentation switched on only
for the timed phase, and the instruction counts per send are printed: they do not depend on
the machine's load, so an A/B comparison needs one run per side, not many.

    .venv/bin/python benchmarks/single_send.py --sends 5000
    .venv/bin/python benchmarks/single_send.py --sends 400 --callgrind
    .venv/bin/python benchmarks/single_send.py --sends 5000 --concurrent 16   # loaded writer

The callgrind dumps (A.<pid>.1, B.<pid>.1) are kept in `--cg-out` (default: a new folder under
/tmp, printed) for `callgrind_annotate --inclusive=yes`.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from meshpost.bench.drive import wait_connected_or_fail
from meshpost.cluster import LocalCluster, NodeProcess
from meshpost.config import MeshConfig
from meshpost.node import Node

_TICK = os.sysconf("SC_CLK_TCK")
WARMUP = 200
T = TypeVar("T")


def use_loop(requested: str | None) -> Callable[[Coroutine[Any, Any, T]], T]:
    """Choose meshpost's event loop (`--loop`, else its default) and put it in the
    environment, so that the `meshpost node` child (start it after this) runs on it too;
    returns the runner of this process's side on it. An older tree on PYTHONPATH (an A/B)
    has no `meshpost.eventloop`: asyncio on both sides, as it ran."""
    try:
        from meshpost import eventloop
    except ImportError:
        return asyncio.run
    loop = eventloop.choose(requested)
    os.environ[eventloop.LOOP_ENV] = loop
    print(f"event loop of both processes: {loop}")
    return lambda coro: eventloop.run(coro, loop)


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of each thread of `pid`, summed by thread name (utime + stime)."""
    out: dict[str, float] = collections.defaultdict(float)
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        # Thread pools number their threads; a name is a role.
        role = re.sub(r"[_-]?\d+$", "", name)
        out[role + " user"] += int(fields[11]) / _TICK
        out[role + " sys"] += int(fields[12]) / _TICK
    return out


def process_cpu_ns(pid: int) -> int:
    """CPU ns of a whole process at scheduler resolution (schedstat of every thread)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except OSError:
            continue
    return total


class _Prefixed(NodeProcess):
    prefix: ClassVar[list[str]] = []
    python_args: ClassVar[list[str]] = []

    def command(self) -> list[str]:
        python, *rest = super().command()
        return [*self.prefix, python, *self.python_args, *rest]


def callgrind(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def instructions(out_prefix: Path) -> int:
    total = 0
    for path in out_prefix.parent.glob(out_prefix.name + "*"):
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("totals:"):
                total += int(line.split()[1])
                break
    return total


async def drive(cfg_a, sends: int, concurrent: int, b_pid: int, use_cg: bool,
                cg_dir: Path | None, profile: Path | None) -> dict[str, object]:
    body = "x" * 100
    samples: list[float] = []
    async with Node(cfg_a) as a:
        await wait_connected_or_fail(a)
        for _ in range(WARMUP):
            await a.send("B", body, timeout_s=60)
        me = os.getpid()
        if use_cg:
            callgrind(me, "-z")
            callgrind(b_pid, "-z")
            callgrind(me, "-i", "on")
            callgrind(b_pid, "-i", "on")
        a0, b0 = thread_cpu(me), thread_cpu(b_pid)
        an0, bn0 = process_cpu_ns(me), process_cpu_ns(b_pid)
        clock = time.perf_counter_ns
        profiler = None
        if profile is not None:
            import cProfile
            profiler = cProfile.Profile()
            profiler.enable()
        t0 = clock()

        async def one_sender(count: int) -> None:
            for _ in range(count):
                begin = clock()
                await a.send("B", body, timeout_s=60)
                samples.append((clock() - begin) / 1000)

        await asyncio.gather(*(one_sender(sends // concurrent) for _ in range(concurrent)))
        elapsed = (clock() - t0) / 1e9
        if profiler is not None:
            profiler.disable()
            assert profile is not None
            profiler.dump_stats(profile / "A.prof")
        an1, bn1 = process_cpu_ns(me), process_cpu_ns(b_pid)
        a1, b1 = thread_cpu(me), thread_cpu(b_pid)
        if use_cg:
            assert cg_dir is not None
            callgrind(me, "-i", "off")
            callgrind(b_pid, "-i", "off")
            callgrind(me, "-d")
            callgrind(b_pid, "-d")
        stats = a.snapshot_stats()
        writer = a._writer
    n = sends // concurrent * concurrent
    per = {f"A:{k}": (a1[k] - a0.get(k, 0)) * 1e6 / n for k in a1}
    per.update({f"B:{k}": (b1[k] - b0.get(k, 0)) * 1e6 / n for k in b1})
    return {
        "sends": n, "elapsed_s": elapsed, "p50_us": statistics.median(samples),
        "p99_us": statistics.quantiles(samples, n=100)[98],
        "cpu_A_us": (an1 - an0) / 1e3 / n, "cpu_B_us": (bn1 - bn0) / 1e3 / n,
        "threads": {k: round(v, 1) for k, v in sorted(per.items()) if v > 0.05},
        "commits_per_send_A": (writer.commits if writer else 0) / max(1, stats.sent),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sends", type=int, default=5000)
    parser.add_argument("--concurrent", type=int, default=1)
    parser.add_argument("--sync", default="normal")
    parser.add_argument("--transport", default="tcp")
    parser.add_argument("--callgrind", action="store_true")
    parser.add_argument("--profile", type=Path, help="cProfile both sides into this folder")
    parser.add_argument("--cg-out", type=Path, default=None,
                        help="keep the callgrind dumps of both sides in this folder")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"),
                        help="event loop of both processes (default: meshpost's own)")
    args = parser.parse_args()
    run_a = use_loop(args.loop)  # before B starts: it inherits the choice
    root = Path(tempfile.mkdtemp(prefix="single-send-", dir="/tmp"))
    cluster = LocalCluster.create(root, 2, transport=args.transport,
                                  options={"sync": args.sync})
    cg_dir = (args.cg_out or Path(os.environ["SINGLE_SEND_CG_OUT"])) if args.callgrind else None
    if cg_dir is not None:
        cg_dir.mkdir(parents=True, exist_ok=True)
        _Prefixed.prefix = ["valgrind", "--tool=callgrind", "--instr-atstart=no",
                            f"--callgrind-out-file={cg_dir}/B.%p"]
        node_b = _Prefixed("B", cluster.config_path, cluster.data_dir("B"),
                           root / "logs" / "B.log")
        cluster.nodes["B"] = node_b
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
        _Prefixed.python_args = ["-m", "cProfile", "-o", str(args.profile / "B.prof")]
        cluster.nodes["B"] = _Prefixed("B", cluster.config_path, cluster.data_dir("B"),
                                       root / "logs" / "B.log")
    try:
        b = cluster.nodes["B"].start() if "B" in cluster.nodes else cluster.process("B").start()
        b.wait_ready(120)
        cfg_a = MeshConfig.load(cluster.config_path).node("A", data_dir=cluster.data_dir("A"))
        result = run_a(drive(cfg_a, args.sends, args.concurrent, b.pid, args.callgrind,
                             cg_dir, args.profile))
    finally:
        cluster.stop()
    if cg_dir is not None:
        b_ins = instructions(cg_dir / f"B.{b.pid}")
        a_ins = instructions(cg_dir / f"A.{os.getpid()}")
        n = result["sends"]
        assert isinstance(n, int)
        result["instr_A_per_send"] = round(a_ins / n)
        result["instr_B_per_send"] = round(b_ins / n)
        result["callgrind_dumps"] = str(cg_dir)
    for k, v in result.items():
        print(f"{k}: {round(v, 1) if isinstance(v, float) else v}")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    if "--callgrind" in sys.argv and os.environ.get("SINGLE_SEND_UNDER_VALGRIND") != "1":
        # Run this process itself under callgrind too, instrumentation off until the timed
        # phase (the child's dumps are found by their prefix).
        out = tempfile.mkdtemp(prefix="single-send-cg-", dir="/tmp")
        for i, arg in enumerate(sys.argv):
            if arg == "--cg-out" and i + 1 < len(sys.argv):
                out = sys.argv[i + 1]
            elif arg.startswith("--cg-out="):
                out = arg.split("=", 1)[1]
        os.makedirs(out, exist_ok=True)
        env = {**os.environ, "SINGLE_SEND_UNDER_VALGRIND": "1", "SINGLE_SEND_CG_OUT": out}
        sys.exit(subprocess.call(["valgrind", "--tool=callgrind", "--instr-atstart=no",
                                  f"--callgrind-out-file={out}/A.%p", sys.executable,
                                  *sys.argv], env=env))
    main()

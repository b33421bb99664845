"""What a scenario measures besides time: CPU per message, WAL size, RSS.

Rule: each meter reads processes or files it is given; none starts or stops anything.
"""

from __future__ import annotations

import contextlib
import dataclasses
import resource
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from meshpost.store import DB_FILENAME


class CpuMeter:
    """CPU time the processes of a scenario spend over its timed phase, per message.

    Far steadier than wall time on a shared machine: it is what the work costs, whatever else
    the machine does meanwhile. Each process is read by a callable returning its CPU seconds
    (this process: `time.process_time`; a node child: `NodeProcess.cpu_seconds`), both at
    nanosecond resolution, where psutil's 10 ms ticks would read 0 for a short phase.
    """

    def __init__(self, processes: dict[str, Callable[[], float]]) -> None:
        self._processes = processes
        self._start: dict[str, float] = {}

    def start(self) -> None:
        self._start = {name: read() for name, read in self._processes.items()}

    def us_per_message(self, messages: int) -> dict[str, float]:
        """µs per message of each process since `start`, and their `total`."""
        cpu = {name: (read() - self._start[name]) * 1e6 / messages
               for name, read in self._processes.items()}
        return {**{k: round(v, 2) for k, v in cpu.items()}, "total": round(sum(cpu.values()), 2)}


#: Threads of the bench itself (not of what it measures) start their names with this; with
#: rich's live-display refresh thread they are what `own_cpu` leaves out.
BENCH_THREAD_PREFIX = "bench-"


@dataclasses.dataclass(frozen=True)
class CpuTimes:
    """User and system CPU seconds (cumulative, or the difference of two readings)."""

    user: float
    sys: float

    @property
    def total(self) -> float:
        return self.user + self.sys

    def __sub__(self, other: CpuTimes) -> CpuTimes:
        return CpuTimes(self.user - other.user, self.sys - other.sys)

    def encode(self) -> bytes:
        """As a helper process reports it over ZeroMQ (`decode` reads it back)."""
        return f"{self.user!r} {self.sys!r}".encode()

    @classmethod
    def decode(cls, data: bytes) -> CpuTimes:
        user, sys_ = data.decode().split()
        return cls(float(user), float(sys_))


def process_cpu() -> CpuTimes:
    """This process's CPU time, every thread (getrusage: microseconds, user and system)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return CpuTimes(usage.ru_utime, usage.ru_stime)


def bench_threads() -> list[threading.Thread]:
    """The bench's own threads in this process: rich's live-display refresh (4 Hz, while a
    terminal shows the progress bars) and the threads named `BENCH_THREAD_PREFIX` (a helper's
    reply reader, the RSS sampler)."""
    return [t for t in threading.enumerate()
            if t.name.startswith(BENCH_THREAD_PREFIX) or type(t).__module__.startswith("rich.")]


def thread_cpu(thread: threading.Thread) -> CpuTimes:
    """CPU time of one live thread of this process: the total from its own CPU clock
    (nanoseconds), split by the user/system ticks of /proc/self/task/TID/stat (10 ms each: the
    split alone is coarse); zero for a thread that is gone."""
    try:
        assert thread.ident is not None
        total = time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
    except (AssertionError, OSError):
        return CpuTimes(0.0, 0.0)
    user_ticks = sys_ticks = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        stat = Path(f"/proc/self/task/{thread.native_id}/stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()
        user_ticks, sys_ticks = int(fields[11]), int(fields[12])  # utime, stime (man 5 proc)
    ticks = user_ticks + sys_ticks
    return CpuTimes(total * user_ticks / ticks, total * sys_ticks / ticks) if ticks else (
        CpuTimes(total, 0.0))


def own_cpu() -> CpuTimes:
    """CPU time of this process (the bench's driver) without the bench's own threads.

    What a measured phase in this process costs is its main thread's work (a ping-pong, a
    node's event loop) and the threads that work uses (pyzmq's I/O thread "ZMQbg/IO/0", a
    node's writer and checkpoint threads), but not the progress display's refresh, which
    renders and writes the terminal four times a second whatever is measured. Process CPU
    minus the bench's threads (`bench_threads`), rather than the sum of the threads that
    count: it needs no list of which threads a node or libzmq starts (a thread that starts
    or ends in the phase still counts), and both readings are nanosecond clocks, where
    /proc's per-thread figures move in 10 ms ticks. Pausing the display for the phase was
    the other way; this one leaves the display alone and also leaves out helper readers.
    A bench thread that ends inside a phase would be counted (none does: they live as long
    as the run or their helper).
    """
    cpu = process_cpu()
    for thread in bench_threads():
        cpu = cpu - thread_cpu(thread)
    return cpu


def own_cpu_seconds() -> float:
    """`own_cpu().total`: a `CpuMeter` reader for this process."""
    return own_cpu().total


def cpu_us_per(driver: CpuTimes, helper: CpuTimes, count: int) -> dict[str, float]:
    """µs per operation of `count` for a driver (A) and a helper process (B), each the
    difference of two readings: totals, `total`, and each side's user/system split."""
    out: dict[str, float] = {}
    for name, cpu in (("A", driver), ("B", helper)):
        out[name] = round(cpu.total * 1e6 / count, 2)
    out["total"] = round(out["A"] + out["B"], 2)
    for name, cpu in (("A", driver), ("B", helper)):
        out[f"{name}_user"] = round(cpu.user * 1e6 / count, 2)
        out[f"{name}_sys"] = round(cpu.sys * 1e6 / count, 2)
    return out


class WalPeak:
    """The largest size each node's WAL file reached, sampled while a scenario runs: under a
    steady stream it must stay bounded (docs/architecture.md section 7 has the history)."""

    def __init__(self, data_dirs: dict[str, Path]) -> None:
        self._paths = {name: d / f"{DB_FILENAME}-wal" for name, d in data_dirs.items()}
        self._peak = dict.fromkeys(data_dirs, 0)

    def sample(self) -> None:
        for name, path in self._paths.items():
            with contextlib.suppress(FileNotFoundError):
                self._peak[name] = max(self._peak[name], path.stat().st_size)

    def peak_mb(self) -> dict[str, float]:
        return {name: round(size / 2**20, 1) for name, size in self._peak.items()}


class RssSampler:
    """Samples a process's RSS every 50 ms in a thread; `take_peak()` returns and resets."""

    def __init__(self, proc: Any) -> None:
        self._proc = proc
        self._peak = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"{BENCH_THREAD_PREFIX}rss")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            try:
                rss = int(self._proc.memory_info().rss)
            except Exception:
                return
            with self._lock:
                self._peak = max(self._peak, rss)

    def take_peak(self) -> int:
        with self._lock:
            peak, self._peak = self._peak, 0
        return peak

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(1)

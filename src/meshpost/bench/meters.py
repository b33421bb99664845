"""What a scenario measures besides time: CPU per message, WAL size, RSS.

Rule: each meter reads processes or files it is given; none starts or stops anything.
"""

from __future__ import annotations

import contextlib
import threading
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
        self._thread = threading.Thread(target=self._run, daemon=True)
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

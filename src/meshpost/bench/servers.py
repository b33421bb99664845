"""Broker processes for the anchors: started on a loopback port, stopped by their own PID.

Rule: a server that cannot start makes its anchor `Unavailable` (skipped, with the reason),
never a failed run; nothing here is stopped by name.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from pathlib import Path
from typing import IO


class Unavailable(Exception):
    """A broker or its client library is missing: the anchor is skipped, with this reason."""


class Server:
    """A broker process on a loopback port, stopped by its own PID."""

    def __init__(self, cmd: list[str], log_path: Path, port: int) -> None:
        self.cmd, self.log_path, self.port = cmd, log_path, port
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def __enter__(self) -> Server:
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=self._log, start_new_session=True)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise Unavailable(f"{Path(self.cmd[0]).name} exited at start; see "
                                   f"{self.log_path}")
            with contextlib.suppress(OSError), socket.create_connection(
                ("127.0.0.1", self.port), timeout=0.5
            ):
                return self
            time.sleep(0.05)
        self.__exit__()
        raise Unavailable(f"{Path(self.cmd[0]).name} did not listen on {self.port}")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self._log is not None:
            self._log.close()


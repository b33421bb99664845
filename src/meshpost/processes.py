"""meshpost child processes: a `meshpost node`, or a `meshpost host` running several nodes.

Rule: readiness is observed, never assumed: a process counts as started when its control
endpoint (a host's: its own and each of its nodes') answers a status request; stopping is
terminate, bounded wait, then kill. A recorded pid counts only while /proc says it is still a
meshpost node of that name (or a meshpost host).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Self

from meshpost.control import ControlClient, ErrorReply, StatusRequest, process_alive
from meshpost.errors import ClusterError, ControlUnavailable, HostNotAnswering, NodeNotStarted
from meshpost.host import HostClient, HostReply

#: How long a node may take from spawn to answering its control endpoint.
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
#: A host starts its nodes a few at a time: it gets this much more per node it runs.
READY_S_PER_HOSTED_NODE = 0.5
#: ... and this much more per node to stop (each commits, says goodbye, closes its store).
STOP_S_PER_HOSTED_NODE = 0.5


def failure_reason(log_text: str) -> str:
    """The line of a node's log that says why it stopped (the CLI prints `meshpost node: ...`
    last; otherwise the last error line, otherwise the last line)."""
    lines = [line.strip() for line in log_text.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("meshpost node:"):
            return line.removeprefix("meshpost node:").strip()
    for line in reversed(lines):
        if " ERROR " in line or " CRITICAL " in line or "Error" in line:
            return line
    return lines[-1] if lines else "it wrote nothing to its log"


@dataclasses.dataclass
class NodeProcess:
    """One `meshpost node` child process."""

    name: str
    config: Path
    data_dir: Path
    log_path: Path
    extra_args: Sequence[str] = ()
    env: Mapping[str, str] | None = None
    process: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = None
    _signalled: bool = False  # SIGTERM sent (terminate): stop() only waits, then kills

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "meshpost", "node", self.name,
            "--config", str(self.config), "--data", str(self.data_dir), "--headless",
            *self.extra_args,
        ]

    def start(self) -> Self:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        env = {**os.environ, **(self.env or {})}
        self._signalled = False
        self.process = subprocess.Popen(
            self.command(), stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log,
            env=env, start_new_session=True,
        )
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Block until the node answers on its control endpoint (or fail with its log)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                raise ClusterError(f"node {self.name} exited early:\n{self.log_tail()}")
            if not self._answers():
                time.sleep(0.05)
                continue
            return
        raise ClusterError(f"node {self.name} not ready after {timeout_s}s:\n{self.log_tail()}")

    def not_ready_reason(self, timeout_s: float = READY_TIMEOUT_S) -> str | None:
        """Wait like `wait_ready`; None once ready, else why not (from the node's log)."""
        try:
            self.wait_ready(timeout_s)
        except ClusterError:
            why = failure_reason(self.log_tail(200))
            if self.alive():
                return f"no answer after {timeout_s:g}s ({why}); log {self.log_path}"
            code = self.process.returncode if self.process is not None else None
            return f"exited with code {code}: {why} (log {self.log_path})"
        return None

    def _answers(self) -> bool:
        """True when this very process answers (not another node holding the data dir)."""
        with (
            contextlib.suppress(ControlUnavailable),
            ControlClient(self.data_dir, name=self.name) as client,
        ):
            reply = client.request(StatusRequest(), timeout_s=1.0)
            return (not isinstance(reply, ErrorReply)
                    and reply.status.get("pid") == self.pid)
        return False

    def cpu_seconds(self, timeout_s: float = 5.0) -> float:
        """CPU time the node process has used so far (all its threads), from its status."""
        with ControlClient(self.data_dir, name=self.name) as client:
            reply = client.request(StatusRequest(), timeout_s=timeout_s)
        if isinstance(reply, ErrorReply):
            raise ClusterError(f"node {self.name} did not report its status: {reply.error}")
        return float(reply.status["cpu_s"])

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM, wait, then SIGKILL. Returns the exit code."""
        code = None
        if self.process is not None:
            if self.process.poll() is None:
                self.terminate()
                try:
                    code = self.process.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    code = self.process.wait(timeout_s)
            else:
                code = self.process.returncode
        self._close_log()
        return code

    def terminate(self) -> None:
        """SIGTERM without waiting (`stop` then waits); once: a second is not sent."""
        if self.process is not None and self.process.poll() is None and not self._signalled:
            self.process.send_signal(signal.SIGTERM)
            self._signalled = True

    def kill(self) -> None:
        """kill -9: no cleanup at all, as a crash would."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(STOP_TIMEOUT_S)
        self._close_log()

    def detach(self) -> None:
        """Leave the node running on its own (`cluster up` exits): close our copy of its log."""
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def node_answers(name: str, data_dir: Path, pid: int, timeout_s: float = 1.0) -> bool:
    """True when node `name` answers on its control endpoint from process `pid`."""
    with (
        contextlib.suppress(ControlUnavailable),
        ControlClient(data_dir, name=name) as client,
    ):
        reply = client.request(StatusRequest(), timeout_s=timeout_s)
        return not isinstance(reply, ErrorReply) and reply.status.get("pid") == pid
    return False


@dataclasses.dataclass
class HostProcess(NodeProcess):
    """One `meshpost host` child process running `names` (a run of the mesh file's nodes);
    `data_dir` is the host's folder (its endpoint), `node_dirs` each node's data dir."""

    names: Sequence[str] = ()
    node_dirs: Mapping[str, Path] = dataclasses.field(default_factory=dict)

    def command(self) -> list[str]:
        spec = f"{self.names[0]}..{self.names[-1]}" if len(self.names) > 1 else self.names[0]
        return [
            sys.executable, "-m", "meshpost", "host", "--config", str(self.config),
            "--nodes", spec, "--folder", str(self.data_dir), *self.extra_args,
        ]

    def ready_timeout_s(self) -> float:
        return READY_TIMEOUT_S + READY_S_PER_HOSTED_NODE * len(self.names)

    def stop(self, timeout_s: float | None = None) -> int | None:
        """SIGTERM, wait (longer for more nodes), then SIGKILL. Returns the exit code."""
        return super().stop(timeout_s if timeout_s is not None else
                            STOP_TIMEOUT_S + STOP_S_PER_HOSTED_NODE * len(self.names))

    def _answers(self) -> bool:
        """True once this very host answers and none of its nodes is still starting."""
        reply = self.host_status(timeout_s=1.0)
        return (reply is not None and reply.pid == self.pid
                and all(n.state != "starting" for n in reply.nodes))

    def host_status(self, timeout_s: float = 2.0) -> HostReply | None:
        with contextlib.suppress(HostNotAnswering), HostClient(self.data_dir) as client:
            return client.request("status", timeout_s=timeout_s)
        return None

    def node_failures(self) -> dict[str, str]:
        """Wait until the host has started every node; {name: why} for each one that does
        not serve and answer on its control endpoint (every name if the host died)."""
        why = self.not_ready_reason(self.ready_timeout_s())
        if why is not None:
            return dict.fromkeys(self.names, f"its host {self.name} {why}")
        reply = self.host_status()
        states = {n.name: n for n in reply.nodes} if reply is not None else {}
        failures = {}
        silent = []
        for name in self.names:
            info = states.get(name)
            if info is None or info.state != "serving":
                failures[name] = (info.error or info.state) if info else "unknown to its host"
                failures[name] += f" (host {self.name}, log {self.log_path})"
            else:
                silent.append(name)
        # Each serving node must answer on its own control socket; a busy host answers late,
        # so the nodes are asked again until the host's allowance has passed.
        deadline = time.monotonic() + self.ready_timeout_s()
        while silent and self.alive():
            silent = [n for n in silent
                      if not node_answers(n, self.node_dirs[n], self.pid, timeout_s=2.0)]
            if time.monotonic() > deadline:
                break
        for name in silent:
            failures[name] = (f"serving in host {self.name} but not answering its control "
                              f"socket (log {self.log_path})")
        return failures

    def restart_node(self, name: str, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Restart node `name` inside this (running) host; `NodeNotStarted` if it fails."""
        with HostClient(self.data_dir) as client:
            reply = client.request("restart", name, timeout_s=timeout_s)
        info = next((n for n in reply.nodes if n.name == name), None)
        if reply.error or info is None or info.state != "serving":
            raise NodeNotStarted({name: reply.error or (info.error if info else None)
                                  or "not serving after its restart"})


def is_node_process(pid: int, name: str) -> bool:
    """True while `pid` runs `meshpost node NAME` (a recorded pid may have been reused)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False  # someone else's process: not one we started
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return True  # no /proc: trust the pid
    return b"meshpost" in b" ".join(argv) and b"node" in argv and name.encode() in argv


def is_host_process(pid: int) -> bool:
    """True while `pid` runs `meshpost host` (a recorded pid may have been reused)."""
    argv = _argv(pid)
    return argv is None or (b"meshpost" in b" ".join(argv) and b"host" in argv)


def _argv(pid: int) -> list[bytes] | None:
    """`pid`'s argv; [] when it is gone or not ours, None when /proc cannot say."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return []
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None


def stop_pids(pids: Iterable[int], timeout_s: float) -> dict[int, str]:
    """SIGTERM every pid, wait for all within `timeout_s`, SIGKILL those left."""
    outcome: dict[int, str] = {}
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
            outcome[pid] = "stopped"
        except ProcessLookupError:
            outcome[pid] = "not running"
    deadline = time.monotonic() + timeout_s
    waiting = [p for p, what in outcome.items() if what == "stopped"]
    while waiting and time.monotonic() < deadline:
        waiting = [p for p in waiting if pid_exists(p)]
        if waiting:
            time.sleep(0.05)
    for pid in waiting:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        outcome[pid] = "killed"
    return outcome


def stop_pid(pid: int, timeout_s: float) -> str:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return "not running"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not pid_exists(pid):
            return "stopped"
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    return "killed"


def pid_exists(pid: int) -> bool:
    """False once `pid` is gone; a child of ours that exited is reaped here (a zombie would
    still answer `kill 0`)."""
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            return False
    return process_alive(pid)  # someone else's zombie counts as gone too

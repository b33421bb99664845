"""Helper processes of the bench: the parent's handle on one, and the roles a child can play.

Rule: parent and child speak JSON lines (commands on stdin, replies and progress on stdout,
logs to a file); a child is stopped by its own PID, never by name. `python -m meshpost.bench
ROLE ...` starts one; the node roles live in `meshpost.bench.drive`, imported only by them.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import IO, Any

from meshpost.bench.meters import BENCH_THREAD_PREFIX, process_cpu
from meshpost.bench.options import BenchError
from meshpost.bench.support import emit, optional, task_body

#: The signals that stop a bench run cleanly (`timeout` sends SIGTERM, Ctrl-C SIGINT).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(BaseException):
    """A stop signal reached the bench. A BaseException, like KeyboardInterrupt: a scenario's
    `except Exception` must not report it as a failure and go on; every `finally` on the way
    out stops the processes it started."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Turn SIGTERM and SIGINT into `Interrupted` in the main thread while the block runs.

    The default SIGTERM ended the process at once: no `finally` ran, so a node child (in its
    own session, which a terminal's signal does not reach) and the /tmp/mpbench-* folder
    stayed. After the first signal the others are ignored until the block ends: the way
    out (bounded stops, then removing the folder) is not cut short by a second one.
    """

    def handler(signum: int, frame: FrameType | None) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        raise Interrupted(signum)

    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class Child:
    """A helper process (`python -m meshpost.bench ROLE`) speaking JSON lines: commands in,
    replies and progress out; its stderr goes to `log_path`; `env` on top of ours (the
    bench's `MESHPOST_LOOP`: a node role runs on the run's event loop)."""

    def __init__(self, role_args: Sequence[str], log_path: Path,
                 env: Mapping[str, str] | None = None) -> None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log: IO[bytes] = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.log_path = log_path
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "meshpost.bench", *role_args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
            start_new_session=True, env={**os.environ, **(env or {})},
        )
        self.progress = 0
        self._replies: queue.Queue[dict[str, Any]] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True,
                                        name=f"{BENCH_THREAD_PREFIX}reader")
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if "progress" in msg:
                self.progress = int(msg["progress"])
            else:
                self._replies.put(msg)
        self._replies.put({"error": "helper process exited"})

    def send(self, **command: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command).encode() + b"\n")
        self.proc.stdin.flush()

    def reply(self, timeout_s: float) -> dict[str, Any]:
        try:
            msg = self._replies.get(timeout=timeout_s)
        except queue.Empty:
            raise BenchError(f"helper {self.pid} silent for {timeout_s:.0f}s; see "
                             f"{self.log_path}") from None
        if "error" in msg:
            raise BenchError(f"helper {self.pid}: {msg['error']}; see {self.log_path}")
        return msg

    def poll_reply(self) -> dict[str, Any] | None:
        try:
            msg = self._replies.get_nowait()
        except queue.Empty:
            return None
        if "error" in msg:
            raise BenchError(f"helper {self.pid}: {msg['error']}; see {self.log_path}")
        return msg

    def request(self, timeout_s: float, **command: Any) -> dict[str, Any]:
        self.send(**command)
        return self.reply(timeout_s)

    def stop(self, timeout_s: float = 15.0) -> int | None:
        """Ask it to stop, then terminate, then kill; by this process's own PID only.
        `timeout_s=0` terminates at once: for a child that cannot hear "stop" now."""
        with contextlib.suppress(BrokenPipeError, OSError, ValueError):
            self.send(op="stop")
        try:
            code = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            try:
                code = self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                code = self.proc.wait(5)
        for stream in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError, ValueError):
                if stream is not None:
                    stream.close()
        self._log.close()
        return code



def raw_sink(endpoint: str) -> None:
    """ROUTER: after a warm-up, answer "go"; then count N messages and report the times."""
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.bind(endpoint)
    emit({"ready": sock.getsockopt_string(zmq.LAST_ENDPOINT)})
    cmd = json.loads(sys.stdin.readline())
    warm, n = int(cmd["warm"]), int(cmd["n"])
    ident = b""
    for _ in range(warm):
        ident = sock.recv_multipart()[0]
    sock.send_multipart([ident, b"go"])
    recv = sock.recv_multipart
    for _ in range(n):
        recv()
    last = time.monotonic()
    emit({"last": last})
    sock.close(0)
    ctx.term()


#: A payload asking the echo or the reference receiver for its CPU time so far (a body is
#: never this: bodies are text); the answer is `CpuTimes.encode()` of the whole process.
CPU_QUERY = b"\x00cpu"


def raw_echo(endpoint: str) -> None:
    """ROUTER echo server for the ping-pong; an empty payload ends it; `CPU_QUERY` is
    answered with this process's CPU time so far (all its threads: this one and libzmq's,
    nothing else runs here), so the parent can time the echo's CPU over exactly a phase."""
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.bind(endpoint)
    emit({"ready": sock.getsockopt_string(zmq.LAST_ENDPOINT)})
    while True:
        ident, payload = sock.recv_multipart()
        if not payload:
            break
        if payload == CPU_QUERY:
            payload = process_cpu().encode()
        sock.send_multipart([ident, payload])
    sock.close(0)
    ctx.term()


#: The reference design's receiver table (stdlib sqlite3, SQLite's default page size):
#: its row of each message, keyed by the message's id.
REFERENCE_INBOX = """CREATE TABLE IF NOT EXISTS inbox (
    id TEXT NOT NULL PRIMARY KEY, sender TEXT NOT NULL, seq INTEGER NOT NULL,
    body TEXT NOT NULL, sent_at_ns INTEGER NOT NULL, stored_at_ns INTEGER NOT NULL)"""


def reference_db(path: Path, sync: str) -> Any:
    """A stdlib sqlite3 connection for the reference design: WAL, `synchronous` at the
    run's level, SQLite's own page size (4 KiB) and autocheckpoint (every 1,000 pages, in
    the committing call), autocommit (a lone statement is its own transaction)."""
    import sqlite3

    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(f"PRAGMA synchronous = {sync.upper()}")
    return conn


def reference_receiver(endpoint: str, db_path: str, sync: str) -> None:
    """The reference design's receiver (issue 20: synchronous pyzmq, SQLite WAL on both
    ends, one message at a time): ROUTER, bound; each message [b"m", id, seq, sent_at_ns,
    body] is committed (one INSERT, its own transaction) before its receipt [id,
    stored_at_ns] goes back; a duplicate id is receipted, not stored twice. `CPU_QUERY`
    answers this process's CPU time; an empty frame ends it."""
    import zmq

    conn = reference_db(Path(db_path), sync)
    conn.execute(REFERENCE_INBOX)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.bind(endpoint)
    emit({"ready": sock.getsockopt_string(zmq.LAST_ENDPOINT)})
    insert = ("INSERT OR IGNORE INTO inbox (id, sender, seq, body, sent_at_ns, stored_at_ns) "
              "VALUES (?, 'A', ?, ?, ?, ?)")
    execute, clock = conn.execute, time.time_ns
    while True:
        frames = sock.recv_multipart()
        ident, kind = frames[0], frames[1]
        if kind == b"m":
            _, _, mid, seq, sent_at, body = frames
            stored = clock()
            execute(insert, (mid.decode(), int(seq), body.decode(), int(sent_at), stored))
            sock.send_multipart([ident, mid, b"%d" % stored])
        elif kind == CPU_QUERY:
            sock.send_multipart([ident, process_cpu().encode()])
        else:
            break
    sock.close(0)
    ctx.term()
    conn.close()
    emit({"stopped": True})


#: How often a raw worker, idle, looks at its stdin for the parent's "stop" (ms).
RAW_WORKER_IDLE_MS = 100


def raw_ventilator(endpoint: str) -> None:
    """Seed 002's ventilator: PUSH, bound. Once `workers` workers are connected (both must be
    there, or PUSH would give every task to the first), send `n` task bodies; report when the
    first one went."""
    import zmq
    from zmq.utils.monitor import recv_monitor_message

    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
    sock.bind(endpoint)
    emit({"ready": sock.getsockopt_string(zmq.LAST_ENDPOINT), "cpu_s": time.process_time()})
    cmd = json.loads(sys.stdin.readline())
    n, size, workers = int(cmd["n"]), int(cmd["size"]), int(cmd["workers"])
    bodies = [task_body(i, size).encode() for i in range(n)]
    connected = 0
    while connected < workers:
        if monitor.poll(30_000) == 0:
            emit({"error": f"{connected} of {workers} workers connected after 30 s"})
            return
        connected += recv_monitor_message(monitor)["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED
    send = sock.send
    t0 = time.monotonic()
    for payload in bodies:
        send(payload)
    emit({"t0": t0})
    sys.stdin.readline()  # linger until told to go: queued tasks must reach the workers
    emit({"stopped": True, "cpu_s": time.process_time()})
    sock.disable_monitor()
    monitor.close(0)
    sock.close(0)
    ctx.term()


def raw_worker(pull_endpoint: str, push_endpoint: str) -> None:
    """Seed 002's worker: PULL from the ventilator, upper-case, PUSH to the sink; until a line
    (or the end) arrives on stdin. Each raw role reports its CPU seconds (all its threads)
    when ready and when told to stop."""
    import select

    import zmq

    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.RCVTIMEO, RAW_WORKER_IDLE_MS)
    pull.connect(pull_endpoint)
    push = ctx.socket(zmq.PUSH)
    push.connect(push_endpoint)
    emit({"ready": True, "cpu_s": time.process_time()})
    recv, send = pull.recv, push.send
    while True:
        try:
            send(recv().upper())
        except zmq.Again:
            if select.select([sys.stdin], [], [], 0)[0]:
                break
    emit({"stopped": True, "cpu_s": time.process_time()})
    pull.close(0)
    push.close()  # default linger: results already queued still go
    ctx.term()


def raw_collector(endpoint: str) -> None:
    """Seed 002's sink ("resultado"): PULL, bound; receive `n` results, then report when the
    last came and how many were not the upper-case of a task sent."""
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.bind(endpoint)
    emit({"ready": sock.getsockopt_string(zmq.LAST_ENDPOINT), "cpu_s": time.process_time()})
    cmd = json.loads(sys.stdin.readline())
    n, size = int(cmd["n"]), int(cmd["size"])
    recv = sock.recv
    got = [recv() for _ in range(n)]
    last = time.monotonic()
    # Checked after the clock stopped: each task's result once, upper-cased.
    expected = {task_body(i, size).upper().encode() for i in range(n)}
    emit({"last": last, "count": len(got), "distinct": len(set(got)),
          "wrong": sum(1 for r in got if r not in expected)})
    sys.stdin.readline()
    emit({"stopped": True, "cpu_s": time.process_time()})
    sock.close(0)
    ctx.term()


def mqtt_sub(port: int, topic: str, n: int) -> None:
    """MQTT QoS 1 subscriber: report when `n` messages have arrived."""
    mqtt = optional("paho.mqtt.client")

    done = threading.Event()
    subscribed = threading.Event()
    count = 0
    first = last = 0.0

    def on_message(_c: Any, _u: Any, _m: Any) -> None:
        nonlocal count, first, last
        count += 1
        if count == 1:
            first = time.monotonic()
        if count >= n:
            last = time.monotonic()
            done.set()

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-sub-{os.getpid()}")
    client.on_message = on_message
    client.on_subscribe = lambda *_a: subscribed.set()
    client.connect("127.0.0.1", port)
    client.subscribe(topic, qos=1)
    client.loop_start()
    if not subscribed.wait(15):
        emit({"error": "no SUBACK"})
        return
    emit({"ready": True})
    done.wait(600)
    emit({"count": count, "first": first, "last": last})
    client.loop_stop()
    client.disconnect()



# The node roles run on the event loop MESHPOST_LOOP names (the bench sets it for its
# helpers), as `meshpost node` does: the loop's default rule lives in `meshpost.eventloop`.


def _driver_role(args: list[str]) -> None:
    from meshpost import eventloop
    from meshpost.bench.drive import driver

    eventloop.run(driver(Path(args[0]), args[1], Path(args[2])), eventloop.choose())


def _host_driver_role(args: list[str]) -> None:
    from meshpost import eventloop
    from meshpost.bench.hosting import host_driver

    eventloop.run(host_driver(Path(args[0]), args[1]), eventloop.choose())


def _timeline_peer_role(args: list[str]) -> None:
    from meshpost import eventloop
    from meshpost.bench.drive import timeline_peer
    from meshpost.timeline import Mark

    marks: list[Mark] = []
    eventloop.run(timeline_peer(Path(args[0]), args[1], Path(args[2]), marks),
                  eventloop.choose())
    Path(args[3]).write_text(json.dumps(marks), encoding="utf-8")
    emit({"stopped": True})


#: Role name -> what the child does with the rest of its arguments.
ROLES: dict[str, Callable[[list[str]], None]] = {
    "raw-sink": lambda args: raw_sink(args[0]),
    "raw-echo": lambda args: raw_echo(args[0]),
    "reference-receiver": lambda args: reference_receiver(args[0], args[1], args[2]),
    "raw-ventilator": lambda args: raw_ventilator(args[0]),
    "raw-worker": lambda args: raw_worker(args[0], args[1]),
    "raw-collector": lambda args: raw_collector(args[0]),
    "mqtt-sub": lambda args: mqtt_sub(int(args[0]), args[1], int(args[2])),
    "driver": _driver_role,
    "host-driver": _host_driver_role,
    "timeline-peer": _timeline_peer_role,
}


def main(argv: list[str]) -> int:
    """Play the role `argv[0]` with the arguments after it; 2 for an unknown role."""
    if not argv or argv[0] not in ROLES:
        print(f"unknown role {argv[:1]!r}; roles: {', '.join(ROLES)}", file=sys.stderr)
        return 2
    ROLES[argv[0]](argv[1:])
    return 0


@contextlib.contextmanager
def quiet_pipe() -> Iterator[None]:
    """A parent that went away (closed pipe, Ctrl-C) ends a child quietly."""
    try:
        yield
    except BrokenPipeError:
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115
    except KeyboardInterrupt:
        pass

"""Where a single send's CPU goes beyond the reference design (issue 20 items 1-2; not part
of `make test`).

A ladder of variants, each one step from issue 20's reference design (pair-latency's
`_reference`) towards meshpost, run in one process, one message at a time, A (the sender)
in this process and B (the receiver) a child process:

1. reference: blocking pyzmq DEALER/ROUTER, stdlib sqlite3 WAL, one table a side with a TEXT
   id primary key, SQLite's default 4 KiB pages, the record of receipt N in the commit of
   message N+1 (pair-latency's SQL, `reference_db` and the `reference-receiver` role itself);
   1f (rung 7, a side row): the same with one msgpack frame each way instead of its
   multipart frames; 1r (`--check-reference`): pair-latency's `_reference` itself;
2. the same with 8 KiB pages (meshpost's `PAGE_SIZE`): the files made before the reference's
   own code opens them;
3. each side's commit by meshpost's `Store.apply` (its schema, triggers, checksums, indexes;
   `Envelope`, `WriteBatch`, `ReceiptFrame`, `Delivery` as pair-latency's `_two_commits`),
   still the reference's multipart frames over blocking pyzmq, no event loop;
4. 3 with meshpost's wire encoding: a `Batch` frame of the `Envelope` encoded on A and
   decoded on B through `meshpost.protocol.codec`, a `ReceiptFrame` back the same way;
5. 4 with both sides reading through the event loop (uvloop by default, as the nodes): the
   reader callback on ZMQ_FD drained until empty, a future per send (pair-latency's
   `_loop_pingpong`), commits inline on the loop; 5t (rung 8): the socket read and written
   as meshpost's transport does (pyzmq's backend methods, ZMQ_EVENTS from libzmq);
6. meshpost: two nodes, A in this process, B a `meshpost node` child
   (`benchmarks/single_send.py`'s own `drive`).

Steps 3-5t commit with `Store.apply` alone, without the node's writer and its checkpoint
thread: `Store.open` switches SQLite's autocheckpoint off, so these rungs switch it back on at
`INLINE_CHECKPOINT_PAGES` (the node checkpoints on a thread of its own after that many pages
when one send at a time commits on the loop); the WAL then stays as small as the node's.

CPU a send is each process's own (every thread, `/proc/PID/task/*/schedstat`) over the timed
sends, read by this process before the first and after the last (B then waits in its read).
Every store is verified after its rung. `--repeat R` runs the whole ladder R times, rung
after rung, every other ladder top down, `--pause` seconds between rungs; `--callgrind` runs
both processes of every rung under valgrind's callgrind, instrumentation on only for the
timed sends, and prints instructions a send (load-insensitive). `--check-reference` also runs
pair-latency's `_reference` itself (through a stand-in for the bench) beside rung 1, to show
that rung 1 is the same design at the same cost. `--store-steps` measures the store step
(2 -> 3) in parts instead: both sides' commits alone, in this process (s1-s7). Figures and
their reading: docs/benchmarks.md, "Where a single send's CPU goes beyond the reference
design".

    .venv/bin/python benchmarks/send_gap.py --sends 3000 --repeat 4 --check-reference
    .venv/bin/python benchmarks/send_gap.py --sends 500 --callgrind
    .venv/bin/python benchmarks/send_gap.py --store-steps --sends 1000 --callgrind
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import importlib.util
import json
import os
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import msgspec
import zmq

from meshpost.bench.children import REFERENCE_INBOX, reference_db, reference_receiver
from meshpost.bench.options import LATENCY_WARMUP
from meshpost.bench.scenarios import pair_latency
from meshpost.bench.scenarios.pair_latency import (
    _REF_RECORD,
    _REF_SEND,
    REFERENCE_OUTBOX,
    reference_commit,
    reference_exchange,
    reference_problems,
)
from meshpost.bench.support import emit, verify_all
from meshpost.protocol import Envelope, ReceiptFrame
from meshpost.protocol.codec import decode, encode
from meshpost.protocol.frames import Batch
from meshpost.store import Delivery, Store, WriteBatch
from meshpost.store.checkpoints import INLINE_CHECKPOINT_PAGES
from meshpost.store.connection import DB_FILENAME
from meshpost.store.sqlite import PAGE_SIZE
from meshpost.transport.zmq_transport import (
    _NOBLOCK,
    _POLLIN,
    _RECV,
    _SEND,
    _SNDMORE,
    _events_reader,
)

HERE = Path(__file__).resolve().parent
BODY = "x" * 100  # pair-latency's and single_send's default size
MAX_FRAME = 1 << 20
RUNGS = {
    1: "reference (4 KiB pages)",
    2: "reference, 8 KiB pages",
    3: "meshpost Store.apply, blocking pyzmq",
    4: "+ msgspec frames (codec)",
    5: "+ event loop both sides",
    6: "meshpost (two nodes)",
    7: "reference, one msgpack frame each way",  # a side row: shown as "1f", after rung 1
    8: "+ meshpost's socket calls (backend send/recv, ZMQ_EVENTS via libzmq)",  # "5t"
}
#: What rung 7's frames hold: (id, seq, sent_at_ns, body) there, (id, stored_at_ns) back.
_MSG = msgspec.msgpack.Decoder(tuple[str, int, int, str])
_ACK = msgspec.msgpack.Decoder(tuple[str, int])
_pack = msgspec.msgpack.Encoder().encode
#: pair-latency's reference receiver's statement (a local of `reference_receiver`).
_REF_INBOX_INSERT = ("INSERT OR IGNORE INTO inbox (id, sender, seq, body, sent_at_ns, "
                     "stored_at_ns) VALUES (?, 'A', ?, ?, ?, ?)")


def _single_send() -> ModuleType:
    """benchmarks/single_send.py as a module (benchmarks/ is no package)."""
    spec = importlib.util.spec_from_file_location("single_send", HERE / "single_send.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ss = _single_send()


def _mid(now: int) -> str:
    """The reference's message id: 12 hex digits of milliseconds and 16 random ones."""
    return f"{now // 1_000_000:012x}{os.urandom(8).hex()}"


def _make_8k(path: Path, table: str) -> None:
    """A new database of 8 KiB pages in WAL mode with `table`: the reference's own code then
    opens it and keeps its page size."""
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(table)
        assert conn.execute("PRAGMA page_size").fetchone()[0] == PAGE_SIZE


def _open_store(path: Path, name: str, sync: str) -> Store:
    store = Store.open(path, name=name, sync=sync)
    store._conn.execute(f"PRAGMA wal_autocheckpoint = {INLINE_CHECKPOINT_PAGES}")
    return store


# -- B: the receivers of rungs 1-5 (a child: `send_gap.py --receiver RUNG ENDPOINT DIR SYNC`) --


def receiver(rung: int, endpoint: str, root: Path, sync: str) -> None:
    if rung in (1, 2):
        # pair-latency's own receiver role (its database made beforehand for rung 2)
        reference_receiver(endpoint, str(root / "B.db"), sync)
        return
    if rung == 7:
        one_frame_receiver(endpoint, root / "B.db", sync)
        return
    store = _open_store(root / "B", "B", sync)
    ctx = zmq.Context()
    sock: Any = ctx.socket(zmq.ROUTER)  # Any: pyzmq's getsockopt is typed int | bytes
    sock.bind(endpoint)
    emit({"ready": sock.getsockopt_string(zmq.LAST_ENDPOINT)})
    wall = time.time_ns

    def answer(frames: list[bytes]) -> list[bytes] | None:
        """The reply to one message's frames (None: the end)."""
        if rung == 3:
            if frames[1] != b"m":
                return None
            _, _, mid, seq_b, sent_at, body = frames
            now = int(sent_at)
            message = Envelope(mid.decode(), int(seq_b), "A", "B", body.decode(), now, now)
            stored = wall()
            store.apply(WriteBatch(incoming=[[message]]), stored)
            return [frames[0], mid, b"%d" % stored]
        ident, data = frames
        if not data:
            return None
        received = wall()
        frame = decode(data, max_bytes=MAX_FRAME)
        assert isinstance(frame, Batch)
        stored = wall()
        store.apply(WriteBatch(incoming=[frame.messages]), stored)
        seq = frame.messages[0].seq
        receipt = ReceiptFrame([(seq, seq)], frame.tx_at_ns, received, stored, wall(), stored,
                               sync)
        return [ident, encode(receipt)]

    try:
        if rung in (3, 4):
            while (reply := answer(sock.recv_multipart())) is not None:
                sock.send_multipart(reply)
        else:
            from meshpost import eventloop

            async def serve() -> None:
                loop = asyncio.get_running_loop()
                done: asyncio.Future[None] = loop.create_future()

                def readable() -> None:
                    while sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                        reply = answer(sock.recv_multipart(zmq.NOBLOCK))
                        if reply is None:
                            if not done.done():
                                done.set_result(None)
                            return
                        sock.send_multipart(reply, zmq.NOBLOCK)

                events = _events_reader(sock, True)

                def readable_direct() -> None:
                    """Rung 8: as meshpost's transport reads and writes its ROUTER."""
                    while events() & _POLLIN:
                        identity = _RECV(sock, _NOBLOCK)
                        payload = _RECV(sock, _NOBLOCK, copy=False).bytes
                        reply = answer([identity, payload])
                        if reply is None:
                            if not done.done():
                                done.set_result(None)
                            return
                        _SEND(sock, reply[0], _NOBLOCK | _SNDMORE)
                        _SEND(sock, reply[1], _NOBLOCK)

                fd = sock.getsockopt(zmq.FD)
                if rung == 8:
                    readable = readable_direct
                loop.add_reader(fd, readable)
                readable()
                try:
                    await done
                finally:
                    loop.remove_reader(fd)

            eventloop.run(serve(), eventloop.choose())
    finally:
        sock.close(0)
        ctx.term()
        store.close()
    emit({"stopped": True})


def one_frame_receiver(endpoint: str, db_path: Path, sync: str) -> None:
    """Rung 7: `reference_receiver` with one msgpack frame each way instead of its
    multipart frames (the same statement, store and loop)."""
    conn = reference_db(db_path, sync)
    conn.execute(REFERENCE_INBOX)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.bind(endpoint)
    emit({"ready": sock.getsockopt_string(zmq.LAST_ENDPOINT)})
    execute, clock, decode_msg = conn.execute, time.time_ns, _MSG.decode
    while True:
        ident, data = sock.recv_multipart()
        if not data:
            break
        mid, seq, sent_at, body = decode_msg(data)
        stored = clock()
        execute(_REF_INBOX_INSERT, (mid, seq, body, sent_at, stored))
        sock.send_multipart([ident, _pack((mid, stored))])
    sock.close(0)
    ctx.term()
    conn.close()
    emit({"stopped": True})


# -- A: the senders --------------------------------------------------------------------------


class Phase:
    """The timed sends' CPU (both processes) and instructions, and the samples."""

    def __init__(self, b_pid: int, cg_dir: Path | None) -> None:
        self.b_pid, self.cg_dir = b_pid, cg_dir
        self.samples: list[float] = []
        self.a0 = self.b0 = 0

    def start(self) -> None:
        if self.cg_dir is not None:
            for pid in (os.getpid(), self.b_pid):
                ss.callgrind(pid, "-z")
                ss.callgrind(pid, "-i", "on")
        self.a0, self.b0 = ss.process_cpu_ns(os.getpid()), ss.process_cpu_ns(self.b_pid)

    def end(self) -> None:
        self.a1, self.b1 = ss.process_cpu_ns(os.getpid()), ss.process_cpu_ns(self.b_pid)
        if self.cg_dir is not None:
            for pid in (os.getpid(), self.b_pid):
                ss.callgrind(pid, "-i", "off")
                ss.callgrind(pid, "-d")

    def result(self, sends: int) -> dict[str, Any]:
        return {"A": (self.a1 - self.a0) / 1e3 / sends, "B": (self.b1 - self.b0) / 1e3 / sends,
                "p50": statistics.median(self.samples)}


def send_reference(dealer: zmq.Socket[bytes], conn: Any, sends: int, phase: Phase,
                   one_frame: bool = False) -> list[str]:
    """pair-latency's `_reference` loop (A's side), with this script's meter; `one_frame`:
    rung 7's frames."""
    text, payload = BODY, BODY.encode()
    execute, clock, wall = conn.execute, time.perf_counter_ns, time.time_ns
    record: tuple[int, int, str] | None = None
    sent: list[str] = []
    for seq in range(1, LATENCY_WARMUP + sends + 1):
        if seq == LATENCY_WARMUP + 1:
            phase.start()
        t = clock()
        now = wall()
        mid = _mid(now)
        reference_commit(execute, mid, seq, text, now, record)
        if one_frame:
            dealer.send(_pack((mid, seq, now, text)))
            got, stored = _ACK.decode(dealer.recv())
            if got != mid:
                raise RuntimeError(f"receipt for {got!r}, sent {mid}")
            record = (stored, wall(), mid)
        else:
            record = reference_exchange(dealer, mid, seq, now, payload)
        if seq > LATENCY_WARMUP:
            phase.samples.append((clock() - t) / 1000)
        sent.append(mid)
    phase.end()
    if record is not None:
        execute(_REF_RECORD, record)
    return sent


def send_store(rung: int, dealer: zmq.Socket[bytes], store: Store, sends: int, sync: str,
               phase: Phase) -> None:
    """Rungs 3 and 4: each commit by `Store.apply`; the reference's frames (3) or
    meshpost's (4), blocking pyzmq."""
    clock, wall = time.perf_counter_ns, time.time_ns
    record: list[Delivery] = []
    payload = BODY.encode()
    for seq in range(1, LATENCY_WARMUP + sends + 1):
        if seq == LATENCY_WARMUP + 1:
            phase.start()
        t = clock()
        now = wall()
        mid = _mid(now)
        message = Envelope(mid, seq, "A", "B", BODY, now, now)
        store.apply(WriteBatch(outgoing=[message], deliveries=record), wall())
        if rung == 3:
            dealer.send_multipart([b"m", mid.encode(), b"%d" % seq, b"%d" % now, payload])
            got, stored_at = dealer.recv_multipart()
            if got != mid.encode():
                raise RuntimeError(f"receipt for {got!r}, sent {mid}")
            stored = int(stored_at)
            receipt = ReceiptFrame([(seq, seq)], now, stored, stored, stored, stored, sync)
        else:
            dealer.send(encode(Batch(now, [message])))
            frame = decode(dealer.recv(), max_bytes=MAX_FRAME)
            if not isinstance(frame, ReceiptFrame) or frame.ranges != [(seq, seq)]:
                raise RuntimeError(f"receipt {frame!r} for seq {seq}")
            receipt = frame
        record = [Delivery("B", [seq], receipt, wall())]
        if seq > LATENCY_WARMUP:
            phase.samples.append((clock() - t) / 1000)
    phase.end()
    store.apply(WriteBatch(deliveries=record), wall())


async def send_loop(dealer: Any, store: Store, sends: int, phase: Phase,
                    direct: bool = False) -> None:
    """Rung 5: rung 4 with the receipt read by the loop's reader callback on ZMQ_FD (drained
    until empty) and awaited as a future, as pair-latency's `_loop_pingpong` and meshpost's
    transport read; the commit inline on the loop. `direct` (rung 8): the socket read and
    written as meshpost's transport does (pyzmq's backend methods, ZMQ_EVENTS through
    libzmq itself), not through pyzmq's `Socket` class."""
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] | None = None
    reply = b""
    events = _events_reader(dealer, True)
    send: Callable[[bytes, int], Any] = dealer.send

    def readable() -> None:
        nonlocal reply
        while dealer.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            reply = dealer.recv(zmq.NOBLOCK)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    def readable_direct() -> None:
        nonlocal reply
        while events() & _POLLIN:
            reply = _RECV(dealer, _NOBLOCK)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    if direct:
        readable = readable_direct
        send = functools.partial(_SEND, dealer)

    fd = dealer.getsockopt(zmq.FD)
    loop.add_reader(fd, readable)
    clock, wall = time.perf_counter_ns, time.time_ns
    record: list[Delivery] = []
    try:
        for seq in range(1, LATENCY_WARMUP + sends + 1):
            if seq == LATENCY_WARMUP + 1:
                phase.start()
            waiter = loop.create_future()
            t = clock()
            now = wall()
            mid = _mid(now)
            message = Envelope(mid, seq, "A", "B", BODY, now, now)
            store.apply(WriteBatch(outgoing=[message], deliveries=record), wall())
            send(encode(Batch(now, [message])), _NOBLOCK)
            readable()  # the send may have consumed the descriptor's edge
            await waiter
            frame = decode(reply, max_bytes=MAX_FRAME)
            if not isinstance(frame, ReceiptFrame) or frame.ranges != [(seq, seq)]:
                raise RuntimeError(f"receipt {frame!r} for seq {seq}")
            record = [Delivery("B", [seq], frame, wall())]
            if seq > LATENCY_WARMUP:
                phase.samples.append((clock() - t) / 1000)
        phase.end()
    finally:
        loop.remove_reader(fd)
    store.apply(WriteBatch(deliveries=record), wall())


def valgrind_prefix(cg_dir: Path | None, name: str) -> list[str]:
    if cg_dir is None:
        return []
    return ["valgrind", "--tool=callgrind", "--instr-atstart=no",
            f"--callgrind-out-file={cg_dir}/{name}.%p"]


def run_rung(rung: int, sends: int, sync: str, work: Path, cg_dir: Path | None,
             loop_runner: Callable[[Any], Any]) -> dict[str, Any]:
    root = work / f"rung{rung}"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    if rung == 6:
        return run_meshpost(sends, sync, root, cg_dir, loop_runner)
    if rung == 2:
        _make_8k(root / "A.db", REFERENCE_OUTBOX)
        _make_8k(root / "B.db", REFERENCE_INBOX)
    log = (root / "B.log").open("wb")  # closed once the receiver ended
    proc = subprocess.Popen(
        [*valgrind_prefix(cg_dir, f"B{rung}"), sys.executable, __file__, "--receiver",
         str(rung), "tcp://127.0.0.1:*", str(root), sync],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log)
    assert proc.stdout is not None
    ctx = zmq.Context()
    phase = Phase(proc.pid, cg_dir)
    store: Store | None = None
    conn: Any = None
    try:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"receiver of rung {rung} exited; see {root / 'B.log'}")
        endpoint = json.loads(line)["ready"]
        dealer = ctx.socket(zmq.DEALER)
        dealer.connect(endpoint)
        sent: list[str] = []
        if rung in (1, 2, 7):
            conn = reference_db(root / "A.db", sync)
            conn.execute(REFERENCE_OUTBOX)
            sent = send_reference(dealer, conn, sends, phase, one_frame=rung == 7)
            dealer.send_multipart([b""])
        else:
            store = _open_store(root / "A", "A", sync)
            if rung in (3, 4):
                send_store(rung, dealer, store, sends, sync, phase)
            else:
                loop_runner(send_loop(dealer, store, sends, phase, direct=rung == 8))
            dealer.send_multipart([b"end"] if rung == 3 else [b""])
        stopped = proc.stdout.readline()
        if b"stopped" not in stopped:
            raise RuntimeError(f"receiver of rung {rung}: {stopped!r}; see {root / 'B.log'}")
        proc.wait(60)
        dealer.close(0)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
        ctx.destroy(0)
        if conn is not None:
            conn.close()
        if store is not None:
            store.close()
    if rung in (1, 2, 7):
        with contextlib.closing(sqlite3.connect(root / "A.db")) as a, \
                contextlib.closing(sqlite3.connect(root / "B.db")) as b:
            problems = reference_problems(
                sent, BODY, a.execute("SELECT id, seq, body, state FROM outbox").fetchall(),
                b.execute("SELECT id, seq, body FROM inbox").fetchall())
            if problems:
                raise RuntimeError(f"rung {rung}: " + "; ".join(problems[:5]))
            page_size = a.execute("PRAGMA page_size").fetchone()[0]
            assert page_size == (PAGE_SIZE if rung == 2 else 4096), page_size
    else:
        verify_all({"A": root / "A", "B": root / "B"}, expect_sent=LATENCY_WARMUP + sends)
    out = phase.result(sends)
    if cg_dir is not None:
        _count(out, cg_dir, f"B{rung}.{proc.pid}", sends)
    shutil.rmtree(root, ignore_errors=True)
    return out


_seen: set[str] = set()
#: Where an instruction ran, by the object file callgrind names (the first match wins):
#: SQLite (the library and Python's `_sqlite3` module), ZeroMQ (libzmq and pyzmq's own
#: compiled parts), msgspec, the loop (uvloop, libuv and asyncio's C parts), CPython (its
#: library, or no object named: the interpreter's own), libc (malloc, locks, syscall stubs:
#: everyone's), and the rest.
BUCKETS = (("sqlite", "sqlite"), ("zmq", "zmq"), ("msgspec", "msgspec"), ("loop", "uvloop"),
           ("loop", "_asyncio"), ("python", "python3"), ("libc", "libc."), ("libc", "ld-linux"))
BUCKET_NAMES = ("python", "sqlite", "zmq", "msgspec", "loop", "libc", "other")
_LINE = re.compile(r"^\s*([\d,]+) \([^)]*\)\s+(.*?)(?: \[(.*)\])?$")


def _dumps(cg_dir: Path, prefix: str, phase_dumps: bool = False) -> list[Path]:
    """The dumps of `prefix` this script has not counted yet (A dumps once a rung; B's
    process is new each rung: its phase dump, `.1`)."""
    paths = []
    for path in sorted(cg_dir.glob(prefix + ".*")):
        if path.name in _seen or (not phase_dumps and not path.name.endswith(".1")):
            continue
        _seen.add(path.name)
        paths.append(path)
    return paths


def _instructions(paths: list[Path]) -> int:
    total = 0
    for path in paths:
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("totals:"):
                total += int(line.split()[1])
                break
    return total


def _by_object(paths: list[Path]) -> dict[str, int]:
    """Instructions of `paths` by `BUCKETS` (self cost of every function, callgrind_annotate)."""
    out = dict.fromkeys(BUCKET_NAMES, 0)
    for path in paths:
        text = subprocess.run(["callgrind_annotate", "--threshold=100", str(path)],
                              capture_output=True, text=True, check=True).stdout
        body = text.split("file:function", 1)[-1]
        for line in body.splitlines():
            m = _LINE.match(line)
            if m is None:
                continue
            count, where, obj = int(m[1].replace(",", "")), m[2], m[3] or ""
            bucket = next((b for b, key in BUCKETS if key in obj), None)
            if bucket is None:
                bucket = "python" if not obj and "Python-3" in where else "other"
            out[bucket] += count
    return out


def _count(out: dict[str, Any], cg_dir: Path, b_prefix: str, sends: int) -> None:
    """Instructions a send of A (this process's newest dump) and B, in total and by object."""
    a, b = _dumps(cg_dir, f"A.{os.getpid()}", phase_dumps=True), _dumps(cg_dir, b_prefix)
    out["iA"], out["iB"] = _instructions(a) / sends, _instructions(b) / sends
    objects_a, objects_b = _by_object(a), _by_object(b)
    for name in BUCKET_NAMES:
        out[f"o_{name}"] = (objects_a[name] + objects_b[name]) / sends


def run_meshpost(sends: int, sync: str, root: Path, cg_dir: Path | None,
                 loop_runner: Callable[[Any], Any]) -> dict[str, Any]:
    """Rung 6: single_send.py's cluster and `drive` (B a `meshpost node`, under callgrind
    when asked)."""
    from meshpost.cluster import LocalCluster
    from meshpost.config import MeshConfig

    cluster = LocalCluster.create(root, 2, transport="tcp", options={"sync": sync})
    if cg_dir is not None:
        ss._Prefixed.prefix = valgrind_prefix(cg_dir, "B6")
        cluster.nodes["B"] = ss._Prefixed("B", cluster.config_path, cluster.data_dir("B"),
                                          root / "logs" / "B.log")
    try:
        b = cluster.nodes["B"].start() if "B" in cluster.nodes else cluster.process("B").start()
        b.wait_ready(300)
        cfg_a = MeshConfig.load(cluster.config_path).node("A", data_dir=cluster.data_dir("A"))
        result = loop_runner(ss.drive(cfg_a, sends, 1, b.pid, cg_dir is not None, cg_dir,
                                      None))
    finally:
        cluster.stop()
    verify_all({"A": cluster.data_dir("A"), "B": cluster.data_dir("B")},
               expect_sent=ss.WARMUP + sends)
    out = {"A": result["cpu_A_us"], "B": result["cpu_B_us"], "p50": result["p50_us"]}
    if cg_dir is not None:
        _count(out, cg_dir, f"B6.{b.pid}", sends)
    shutil.rmtree(root, ignore_errors=True)
    return out


def check_reference(sends: int, sync: str, work: Path) -> dict[str, Any]:
    """pair-latency's `_reference` itself, through a stand-in for the bench (its figures,
    its own CPU meter: this process without the bench's threads, and the helper's)."""
    from meshpost.bench.children import Child

    root = work / "check"
    root.mkdir(parents=True, exist_ok=True)
    progress = SimpleNamespace(update=lambda *a, **k: None)
    bench = SimpleNamespace(
        root=root, body=BODY, o=SimpleNamespace(transport="tcp"), progress=progress,
        task=lambda *a: 0,
        child=lambda scenario, role, name: Child(role, root / f"{name}.log"))
    samples, cpu, _ = pair_latency._reference(bench, sends, sync)  # type: ignore[arg-type]
    shutil.rmtree(root, ignore_errors=True)
    return {"A": cpu["A"], "B": cpu["B"], "p50": statistics.median(samples)}


# -- the store step (2 -> 3) in parts: both sides' commits alone, in this process -----------

#: Sub-steps from the reference's tables to `Store.apply`, 8 KiB pages in every one.
STORE_STEPS = {
    "s1": "reference tables (as rung 2)",
    "s2": "meshpost's messages table, UNIQUE (sender, id) its only index; receipt an UPDATE",
    "s3": "+ messages_hlc (the history's order)",
    "s4": "+ messages_out_link (UNIQUE (peer, seq) of outgoing rows)",
    "s5": "receipt a row of `receipts` (a range), not an UPDATE of the message",
    "s6": "+ row checksums (envelope_checksum of each side's Envelope)",
    "s7": "Store.apply (rung 3's commits)",
}
_MSG_INSERT = ("INSERT INTO messages (peer, sender, recipient, stored_at_ns, id, direction, seq,"
               " body, sent_at_ns, hlc, state, checksum) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?,"
               " ?, ?)")
_MSG_RECORD = ("UPDATE messages SET state = 'delivered', receipt_stored_at_ns = ?,"
               " receipt_received_at_ns = ?, receipt_arrived_at_ns = ?, receipt_sync = ?,"
               " receipt_hlc = ? WHERE sender = 'A' AND id = ?")
_RANGE_RECORD = ("INSERT INTO receipts (peer, last_seq, first_seq, stored_at_ns,"
                 " received_at_ns, arrived_at_ns, sync, hlc) VALUES (?, ?, ?, ?, ?, ?, ?, ?)")


def _meshpost_db(path: Path, sync: str, drop: tuple[str, ...]) -> Any:
    """A stdlib connection to a store `Store.open` made (its schema and pragmas), with the
    indexes in `drop` dropped."""
    Store.open(path, name=path.name, sync=sync).close()
    conn = sqlite3.connect(path / DB_FILENAME, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(f"PRAGMA synchronous = {sync.upper()}")
    conn.execute(f"PRAGMA wal_autocheckpoint = {INLINE_CHECKPOINT_PAGES}")
    conn.execute("PRAGMA ignore_check_constraints = ON")  # as Store.open's writer
    for index in drop:
        conn.execute(f"DROP INDEX {index}")
    assert conn.execute("PRAGMA page_size").fetchone()[0] == PAGE_SIZE
    return conn


def store_step(step: str, sends: int, sync: str, root: Path, cg_dir: Path | None
               ) -> dict[str, Any]:
    """`sends` pairs of commits (A's message with the previous receipt's record, then B's
    row), back to back in this process: CPU µs a pair and instructions."""
    from meshpost.store.checksum import envelope_checksum

    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    wall = time.time_ns
    a_store = b_store = a = b = None
    if step == "s1":
        _make_8k(root / "A.db", REFERENCE_OUTBOX)
        _make_8k(root / "B.db", REFERENCE_INBOX)
        a, b = reference_db(root / "A.db", sync), reference_db(root / "B.db", sync)
        for conn in (a, b):
            conn.execute(f"PRAGMA wal_autocheckpoint = {INLINE_CHECKPOINT_PAGES}")
    elif step == "s7":
        a_store, b_store = _open_store(root / "A", "A", sync), _open_store(root / "B", "B", sync)
    else:
        drop = {"s2": ("messages_hlc", "messages_out_link"), "s3": ("messages_out_link",)}
        a = _meshpost_db(root / "A", sync, drop.get(step, ()))
        b = _meshpost_db(root / "B", sync, drop.get(step, ()))
    checksums = step == "s6"
    t0 = c0 = 0.0
    previous: tuple[str, int, int, int] | None = None  # id, seq, stored, arrived
    record: list[Delivery] = []
    for seq in range(1, LATENCY_WARMUP + sends + 1):
        if seq == LATENCY_WARMUP + 1:
            if cg_dir is not None:
                ss.callgrind(os.getpid(), "-z")
                ss.callgrind(os.getpid(), "-i", "on")
            c0, t0 = time.process_time(), time.perf_counter()
        now = wall()
        mid = _mid(now)
        if a_store is not None and b_store is not None:
            message = Envelope(mid, seq, "A", "B", BODY, now, now)
            a_store.apply(WriteBatch(outgoing=[message], deliveries=record), wall())
            received = Envelope(mid, seq, "A", "B", BODY, now, now)
            stored = wall()
            b_store.apply(WriteBatch(incoming=[[received]]), stored)
            receipt = ReceiptFrame([(seq, seq)], now, stored, stored, stored, stored, sync)
            record = [Delivery("B", [seq], receipt, wall())]
            continue
        assert a is not None
        assert b is not None
        if step == "s1":
            a.execute("BEGIN")
            a.execute(_REF_SEND, (mid, seq, BODY, now))
            if previous is not None:
                a.execute(_REF_RECORD, (previous[2], previous[3], previous[0]))
            a.execute("COMMIT")
            stored = wall()
            b.execute(_REF_INBOX_INSERT, (mid, seq, BODY, now, stored))
        else:
            # Each side's message as an Envelope (a node holds one anyway: the message it
            # sends, the one it decoded), in s2-s5 too, so that s6 adds the checksum alone.
            message = Envelope(mid, seq, "A", "B", BODY, now, now)
            check = envelope_checksum(message) if checksums else 0
            a.execute("BEGIN")
            a.execute(_MSG_INSERT, ("B", "A", "B", wall(), mid, "out", seq, BODY, now, now,
                                    "pending", check))
            if previous is not None:
                p_mid, p_seq, p_stored, p_arrived = previous
                if step in ("s2", "s3", "s4"):
                    a.execute(_MSG_RECORD, (p_stored, p_stored, p_arrived, sync, p_stored,
                                            p_mid))
                else:
                    a.execute(_RANGE_RECORD, ("B", p_seq, p_seq, p_stored, p_stored, p_arrived,
                                              sync, p_stored))
            a.execute("COMMIT")
            received = Envelope(mid, seq, "A", "B", BODY, now, now)
            check = envelope_checksum(received) if checksums else 0
            stored = wall()
            b.execute(_MSG_INSERT + " ON CONFLICT (sender, id) DO NOTHING",
                      ("A", "A", "B", stored, mid, "in", seq, BODY, now, now, "received",
                       check))
        previous = (mid, seq, stored, wall())
    cpu, elapsed = time.process_time() - c0, time.perf_counter() - t0
    out: dict[str, Any] = {"cpu": cpu * 1e6 / sends, "wall": elapsed * 1e6 / sends}
    if cg_dir is not None:
        ss.callgrind(os.getpid(), "-i", "off")
        ss.callgrind(os.getpid(), "-d")
        dumps = _dumps(cg_dir, f"A.{os.getpid()}", phase_dumps=True)
        out["i"] = _instructions(dumps) / sends
        out.update({f"o_{k}": v / sends for k, v in _by_object(dumps).items()})
    # the last receipt's record, after the clock (as the ladder's)
    if a_store is not None:
        a_store.apply(WriteBatch(deliveries=record), wall())
    elif step in ("s5", "s6") and a is not None and previous is not None:
        p_mid, p_seq, p_stored, p_arrived = previous
        a.execute(_RANGE_RECORD, ("B", p_seq, p_seq, p_stored, p_stored, p_arrived, sync,
                                  p_stored))
    for conn in (a, b):
        if conn is not None:
            conn.close()
    for store in (a_store, b_store):
        if store is not None:
            store.close()
    if step in ("s6", "s7"):  # the rows a node would have (checksums included): verify them
        verify_all({"A": root / "A", "B": root / "B"}, expect_sent=LATENCY_WARMUP + sends)
    elif step != "s1":  # no checksums (s2-s5): one row per send on each side
        for side in ("A", "B"):
            with contextlib.closing(sqlite3.connect(root / side / DB_FILENAME)) as conn:
                rows = conn.execute("SELECT COUNT(DISTINCT id) FROM messages").fetchone()[0]
                if rows != LATENCY_WARMUP + sends:
                    raise RuntimeError(f"{step} {side}: {rows} rows")
    shutil.rmtree(root, ignore_errors=True)
    return out


def store_table(rows: dict[str, dict[str, Any]], callgrind: bool) -> str:
    head = "| step | CPU µs a pair of commits | Δ | wall µs |"
    if callgrind:
        head += " instructions | Δ | " + " | ".join(BUCKET_NAMES) + " |"
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    prev: dict[str, Any] | None = None
    for name, r in rows.items():
        delta = "" if prev is None else f"{r['cpu'] - prev['cpu']:+.1f}"
        line = f"| {name} | {r['cpu']:.1f} | {delta} | {r['wall']:.1f} |"
        if callgrind:
            idelta = "" if prev is None else f"{r['i'] - prev['i']:+,.0f}"
            line += f" {r['i']:,.0f} | {idelta} | "
            if prev is None:
                line += " | ".join(f"{r['o_' + b]:,.0f}" for b in BUCKET_NAMES) + " |"
            else:
                line += " | ".join(f"{r['o_' + b] - prev['o_' + b]:+,.0f}"
                                   for b in BUCKET_NAMES) + " |"
        lines.append(line)
        prev = r
    return "\n".join(lines)


def _side(name: str) -> bool:
    """A side row (1r, 1f): its delta is from the row before it, and the next step's is not
    from it."""
    return name[:2] in ("1r", "1f")


def table(rows: dict[str, dict[str, Any]], callgrind: bool) -> str:
    head = "| step | A µs | B µs | both µs | step Δ | p50 µs |"
    if callgrind:
        head += " instr A | instr B | both | step Δ |"
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    prev: dict[str, Any] | None = None
    for name, r in rows.items():
        both = r["A"] + r["B"]
        delta = "" if prev is None else f"{both - (prev['A'] + prev['B']):+.0f}"
        line = f"| {name} | {r['A']:.0f} | {r['B']:.0f} | {both:.0f} | {delta} | {r['p50']:.0f} |"
        if callgrind:
            ib = r["iA"] + r["iB"]
            idelta = "" if prev is None else f"{ib - (prev['iA'] + prev['iB']):+,.0f}"
            line += f" {r['iA']:,.0f} | {r['iB']:,.0f} | {ib:,.0f} | {idelta} |"
        lines.append(line)
        if not _side(name):
            prev = r
    return "\n".join(lines)


def objects_table(rows: dict[str, dict[str, Any]]) -> str:
    """Instructions a send, both processes, by where they ran; each step's change below."""
    head = "| step | " + " | ".join(BUCKET_NAMES) + " |"
    lines = [head, "|" + " --- |" * (len(BUCKET_NAMES) + 1)]
    prev: dict[str, Any] | None = None
    for name, r in rows.items():
        cells = [f"{r['o_' + b]:,.0f}" for b in BUCKET_NAMES]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
        if prev is not None:
            cells = [f"{r['o_' + b] - prev['o_' + b]:+,.0f}" for b in BUCKET_NAMES]
            lines.append("| (step) | " + " | ".join(cells) + " |")
        if not _side(name):
            prev = r
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sends", type=int, default=2000)
    parser.add_argument("--sync", default="normal", choices=("normal", "full", "off"))
    parser.add_argument("--repeat", type=int, default=1, help="ladders, rung after rung")
    parser.add_argument("--rungs", default="1,7,2,3,4,5,8,6",
                        help="in this order; 7 is the side row 1f, 8 the rung 5t")
    parser.add_argument("--callgrind", action="store_true")
    parser.add_argument("--pause", type=float, default=2.0,
                        help="seconds between rungs (the previous one's files and processes "
                        "settle)")
    parser.add_argument("--check-reference", action="store_true",
                        help="also run pair-latency's _reference itself beside rung 1")
    parser.add_argument("--store-steps", action="store_true",
                        help="instead of the ladder: the store step (2 -> 3) in parts, both "
                        "sides' commits alone in this process (s1-s7)")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"),
                        help="event loop of rungs 5 and 6 (default: meshpost's own)")
    args = parser.parse_args()
    loop_runner = ss.use_loop(args.loop)  # both processes of rungs 5-6 (MESHPOST_LOOP)
    cg_dir = Path(os.environ["SEND_GAP_CG_OUT"]) if args.callgrind else None
    rungs = [int(r) for r in args.rungs.split(",")]
    work = Path(tempfile.mkdtemp(prefix="send-gap-", dir="/tmp"))
    runs: list[dict[str, dict[str, Any]]] = []
    if args.store_steps:
        try:
            for i in range(args.repeat):
                load = os.getloadavg()[0]
                steps = {f"{k} {v}": store_step(k, args.sends, args.sync, work / k, cg_dir)
                        for k, v in STORE_STEPS.items()}
                runs.append(steps)
                print(f"\nstore steps, run {i + 1}/{args.repeat}: {args.sends} pairs of "
                      f"commits, sync={args.sync}, load {load:.2f} -> "
                      f"{os.getloadavg()[0]:.2f}, {time.strftime('%H:%M')} UTC")
                print(store_table(steps, cg_dir is not None), flush=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return
    try:
        for i in range(args.repeat):
            load = os.getloadavg()[0]
            measured: dict[str, dict[str, Any]] = {}
            # Every other ladder from its top down: what runs first (after the previous
            # ladder's nodes and files went away) is not always the same rung.
            for rung in rungs if i % 2 == 0 else rungs[::-1]:
                time.sleep(args.pause)
                label = {7: "1f", 8: "5t"}.get(rung, str(rung))
                name = f"{label} {RUNGS[rung]}"
                measured[name] = run_rung(rung, args.sends, args.sync, work, cg_dir,
                                          loop_runner)
                if rung == 1 and args.check_reference and cg_dir is None:
                    measured["1r pair_latency._reference"] = check_reference(
                        args.sends, args.sync, work)
            order = [n for r in rungs for n in measured
                     if n.split()[0] == {7: "1f", 8: "5t"}.get(r, str(r))
                     or (r == 1 and n.startswith("1r"))]
            rows = {n: measured[n] for n in order}
            runs.append(rows)
            print(f"\nrun {i + 1}/{args.repeat} ({'up' if i % 2 == 0 else 'down'} the ladder): "
                  f"{args.sends} sends, sync={args.sync}, "
                  f"load {load:.2f} -> {os.getloadavg()[0]:.2f}, {time.strftime('%H:%M')} UTC")
            print(table(rows, cg_dir is not None), flush=True)
            if cg_dir is not None:
                print("\ninstructions a send, both processes, by object")
                print(objects_table(rows), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if len(runs) > 1:
        median = {name: {k: statistics.median(run[name][k] for run in runs)
                         for k in runs[0][name]} for name in runs[0]}
        print(f"\nmedians of {len(runs)} runs (each column's own median)")
        print(table(median, cg_dir is not None))
        if cg_dir is not None:
            print(objects_table(median))
    if cg_dir is not None:
        print(f"callgrind dumps: {cg_dir}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--receiver":
        receiver(int(sys.argv[2]), sys.argv[3], Path(sys.argv[4]), sys.argv[5])
    elif "--callgrind" in sys.argv and os.environ.get("SEND_GAP_UNDER_VALGRIND") != "1":
        out = tempfile.mkdtemp(prefix="send-gap-cg-", dir="/tmp")
        env = {**os.environ, "SEND_GAP_UNDER_VALGRIND": "1", "SEND_GAP_CG_OUT": out}
        sys.exit(subprocess.call(["valgrind", "--tool=callgrind", "--instr-atstart=no",
                                  f"--callgrind-out-file={out}/A.%p", sys.executable,
                                  *sys.argv], env=env))
    else:
        main()

"""`pair-latency`: the same pair as pair-throughput; `await send()` one message at a time
(sender stores, B commits, the receipt comes back; A records it in its next commit, off the
reply path), against a raw pyzmq DEALER/ROUTER ping-pong of the same size measured in the
same run, and the floor of what the guarantees cost (the loop's round trip plus the two
commits left on the path, alone), and the reference design of issue 20 (synchronous pyzmq,
SQLite WAL on both ends, the same commits, one message at a time; `_reference`). CPU per
round trip of both ping-pongs and per send of the reference, both processes, are the floors
of meshpost's CPU per send. With `--sync full` it also measures `normal`.

Rule: every ratio divides figures of the same run; the stores are verified after each level,
the reference design's too.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from rich.progress import TaskID

from meshpost.bench.children import CPU_QUERY, reference_db
from meshpost.bench.drive import wait_connected_or_fail
from meshpost.bench.meters import CpuMeter, CpuTimes, cpu_us_per, own_cpu, own_cpu_seconds
from meshpost.bench.options import FLOOR_SENDS, LATENCY_WARMUP, BenchError
from meshpost.bench.results import ScenarioResult, percentiles, rounded
from meshpost.bench.support import endpoint_for, run_async, verify_all
from meshpost.config import MeshConfig, NodeConfig
from meshpost.node import Node
from meshpost.protocol import Envelope, ReceiptFrame
from meshpost.store import Delivery, Store, WriteBatch
from meshpost.verify import VerifyReport

if TYPE_CHECKING:
    from meshpost.bench.runner import Bench
    from meshpost.probes import Probe

#: Concurrent senders of the loaded phase: enough that the writer is busy and groups commits.
LOADED_SENDERS = 16
PERCENTILES = ("p50", "p90", "p99", "p99.9")


def run(bench: Bench) -> ScenarioResult:
    m = bench.o.latency_messages
    levels = [bench.o.sync] + (["normal"] if bench.o.sync == "full" else [])
    result = ScenarioResult("pair-latency")
    raw, loop, raw_cpu, loop_cpu = _raw_pingpong(bench, m)
    result.samples["raw pyzmq ping-pong"] = raw
    result.samples[f"pyzmq ping-pong on the {bench.loop} event loop"] = loop
    raw_p, loop_p = percentiles(raw), percentiles(loop)
    result.figures["raw_pingpong_us"] = rounded(raw_p)
    # CPU a round trip, both processes (the echo's own reading; this process without the
    # bench's threads, `own_cpu`): the floor of item 2's CPU per send, as the ping-pong's
    # latency is of item 1's.
    result.figures["raw_cpu_us_per_round_trip"] = raw_cpu
    # The floor of any asyncio design (meshpost's included): the same ping-pong with the
    # client reading through the event loop, as meshpost's transport does, on the loop the
    # nodes of this run use (`--loop`). Reported beside the ratios so that the share owed to
    # the loop itself is visible.
    result.figures["loop"] = bench.loop
    result.figures["loop_pingpong_us"] = rounded(loop_p)
    result.figures["loop_cpu_us_per_round_trip"] = loop_cpu
    result.figures["ratio_loop"] = {
        k: round(loop_p[k] / raw_p[k], 2) for k in PERCENTILES
    }
    checks = []
    for sync in levels:
        samples, cpu_us, report = _meshpost_latency(bench, m, sync)
        result.samples[f"meshpost sync={sync}"] = samples
        p = percentiles(samples)
        result.figures[f"meshpost_{sync}_us"] = rounded(p)
        # A send waits for the work of both processes in turn, so its latency is mostly
        # their CPU time: the steadier figure when the machine is noisy.
        result.figures[f"cpu_us_per_send_{sync}"] = cpu_us["idle"]
        # The same sends from LOADED_SENDERS at once: the writer is busy and groups them.
        result.figures[f"cpu_us_per_send_{sync}_loaded"] = cpu_us["loaded"]
        result.figures[f"commits_per_send_{sync}"] = {
            k: cpu_us[f"commits_{k}"]["A"] for k in ("idle", "loaded")}
        result.figures[f"ratio_{sync}"] = {
            k: round(p[k] / raw_p[k], 2) for k in PERCENTILES
        }
        # What the guarantees alone cost: the loop's round trip plus the two commits a send
        # waits for, timed with meshpost's own store code and nothing else.
        commits = _two_commits(bench, min(m, FLOOR_SENDS), sync)
        floor = percentiles([a + b for a, b in zip(loop, commits, strict=False)])
        result.figures[f"commits_{sync}_us"] = rounded(percentiles(commits))
        result.figures[f"floor_{sync}_us"] = rounded(floor)
        result.figures[f"ratio_floor_{sync}"] = {
            k: round(floor[k] / raw_p[k], 2) for k in PERCENTILES
        }
        result.figures[f"over_floor_{sync}"] = {
            k: round(p[k] / floor[k], 2) for k in PERCENTILES
        }
        # The reference design of issue 20, as many sends as the commit floor times.
        ref, ref_cpu, ref_check = _reference(bench, min(m, FLOOR_SENDS), sync)
        result.samples[f"reference design sync={sync}"] = ref
        result.figures.update(reference_figures(result.figures, sync, rounded(percentiles(ref)),
                                                ref_cpu))
        checks.append(f"{sync}: {report.summary()}; {ref_check}")
    result.figures["messages"] = m
    result.figures["reference_sends"] = min(m, FLOOR_SENDS)
    result.figures["loaded_senders"] = LOADED_SENDERS
    result.figures["size"] = bench.o.size
    result.verify = "verified: " + " / ".join(checks)
    return result


def reference_figures(figures: dict[str, Any], sync: str, ref_us: dict[str, float],
                      ref_cpu: dict[str, float]) -> dict[str, Any]:
    """The reference design's figures at `sync` and the ratios of the same run that read
    meshpost against it and against the raw ping-pong (items 1 and 2 of issue 20); each
    ratio divides the rounded figures stored beside it, so a reader can check it."""
    raw_us, raw_cpu = figures["raw_pingpong_us"], figures["raw_cpu_us_per_round_trip"]
    mesh_us, mesh_cpu = figures[f"meshpost_{sync}_us"], figures[f"cpu_us_per_send_{sync}"]
    return {
        f"reference_{sync}_us": ref_us,
        f"reference_cpu_us_per_send_{sync}": ref_cpu,
        f"ratio_reference_{sync}": {k: round(ref_us[k] / raw_us[k], 2) for k in PERCENTILES},
        f"over_reference_{sync}": {k: round(mesh_us[k] / ref_us[k], 2) for k in PERCENTILES},
        f"reference_cpu_over_raw_{sync}": round(ref_cpu["total"] / raw_cpu["total"], 2),
        # Item 2 in ratios: meshpost's CPU a send over the transport's own (a blocking
        # round trip) and over the reference design's (the same work, done synchronously).
        f"cpu_over_raw_{sync}": round(mesh_cpu["total"] / raw_cpu["total"], 2),
        f"cpu_over_reference_{sync}": round(mesh_cpu["total"] / ref_cpu["total"], 2),
    }


def _raw_pingpong(bench: Bench, m: int
) -> tuple[list[float], list[float], dict[str, float], dict[str, float]]:
    """Blocking pyzmq ping-pong (the ceiling), then the same through the nodes' event loop:
    the samples of each and the CPU a round trip of each, both processes."""
    import zmq

    task = bench.task("pair-latency: raw pyzmq ping-pong (blocking, then asyncio)", 2 * m)
    echo = bench.child("pair-latency", ["raw-echo", endpoint_for(bench.o.transport, bench.root,
                                                              "echo")], "echo")
    ctx = zmq.Context()
    samples: list[float] = []
    ended = False  # the echo was sent its empty payload, which ends it
    try:
        endpoint = echo.reply(30)["ready"]
        dealer = ctx.socket(zmq.DEALER)
        dealer.connect(endpoint)
        payload = bench.body.encode()
        for _ in range(LATENCY_WARMUP):
            dealer.send(payload)
            dealer.recv()
        # CPU over exactly the timed round trips: the echo's reading before the first and
        # after the last (its interval also holds one query's reply and the next query's
        # read: 1/m of a round trip), this process's right after and before them.
        dealer.send(CPU_QUERY)
        echo_start, own_start = CpuTimes.decode(dealer.recv()), own_cpu()
        clock = time.perf_counter_ns
        for i in range(m):
            t = clock()
            dealer.send(payload)
            dealer.recv()
            samples.append((clock() - t) / 1000)
            if i % 500 == 0:
                bench.progress.update(task, completed=i)
        own_end = own_cpu()
        dealer.send(CPU_QUERY)
        raw_cpu = cpu_us_per(own_end - own_start, CpuTimes.decode(dealer.recv()) - echo_start, m)
        loop_samples, loop_cpu = run_async(
            _loop_pingpong(dealer, payload, m,
                           lambda i: bench.progress.update(task, completed=m + i)),
            bench.loop,
        )
        bench.progress.update(task, completed=2 * m)
        dealer.send(b"")
        ended = True
        dealer.close(0)
    finally:
        # The echo reads no stdin (its loop is what is measured): an echo not sent its empty
        # payload (an interruption, a failure) never hears "stop" and would wait out the 15 s
        # of stop(); terminate it at once instead.
        echo.stop(15.0 if ended else 0.0)
        ctx.destroy(0)  # a socket an interruption left open would block term() for ever
    return samples, loop_samples, raw_cpu, loop_cpu


#: The reference design's sender table: its row of each message, keyed by the message's id,
#: with the record of its receipt (state, the receiver's commit time, the arrival).
REFERENCE_OUTBOX = """CREATE TABLE IF NOT EXISTS outbox (
    id TEXT NOT NULL PRIMARY KEY, recipient TEXT NOT NULL, seq INTEGER NOT NULL,
    body TEXT NOT NULL, sent_at_ns INTEGER NOT NULL, state TEXT NOT NULL,
    receipt_stored_at_ns INTEGER, receipt_arrived_at_ns INTEGER)"""
_REF_SEND = ("INSERT INTO outbox (id, recipient, seq, body, sent_at_ns, state) "
             "VALUES (?, 'B', ?, ?, ?, 'pending')")
_REF_RECORD = ("UPDATE outbox SET state = 'delivered', receipt_stored_at_ns = ?, "
               "receipt_arrived_at_ns = ? WHERE id = ?")


def reference_exchange(dealer: Any, mid: str, seq: int, now: int,
                       payload: bytes) -> tuple[int, int, str]:
    """The reference sender's message (five parts) and its receipt (id, stored_at), checked;
    returns the record of that receipt for the next commit (`reference_commit`)."""
    dealer.send_multipart([b"m", mid.encode(), b"%d" % seq, b"%d" % now, payload])
    receipt, stored_at = dealer.recv_multipart()
    if receipt != mid.encode():
        raise BenchError(f"reference design: receipt for {receipt!r}, sent {mid}")
    return int(stored_at), time.time_ns(), mid


def reference_commit(execute: Callable[..., Any], mid: str, seq: int, text: str, now: int,
                     record: tuple[int, int, str] | None) -> None:
    """The reference sender's commit before a send: its message's row and, in the same
    transaction, `record` (the last receipt's stored_at, arrival and id: receipt N rides the
    commit of message N+1); the first send's row alone is its own autocommit."""
    if record is None:
        execute(_REF_SEND, (mid, seq, text, now))
    else:
        execute("BEGIN")
        execute(_REF_SEND, (mid, seq, text, now))
        execute(_REF_RECORD, record)
        execute("COMMIT")


def _reference(bench: Bench, sends: int, sync: str
) -> tuple[list[float], dict[str, float], str]:
    """Issue 20's reference design: synchronous pyzmq, SQLite WAL on both ends (stdlib
    sqlite3, at `sync`), the same three commits, one message at a time. The sender commits
    its message's row before sending it, the receiver (a helper process) commits its row
    before the receipt goes back, and the sender's record of receipt N rides the commit of
    message N+1, as meshpost's does since issue 20's decision (the last one: its own commit,
    after the clock). Latency samples of `sends` sends after a warm-up, CPU per send of both
    processes, and the check that each store holds exactly the rows sent."""
    import zmq

    root = bench.root / f"reference-{sync}"
    shutil.rmtree(root, ignore_errors=True)  # fresh stores: the check counts every row
    root.mkdir(parents=True)
    task = bench.task(f"pair-latency {sync}: reference design (blocking pyzmq + sqlite3)",
                      sends)
    receiver = bench.child("pair-latency", [
        "reference-receiver", endpoint_for(bench.o.transport, root, "reference"),
        str(root / "B.db"), sync], f"reference-{sync}")
    conn = reference_db(root / "A.db", sync)
    conn.execute(REFERENCE_OUTBOX)
    ctx = zmq.Context()
    samples: list[float] = []
    sent: list[str] = []
    ended = False
    try:
        endpoint = receiver.reply(30)["ready"]
        dealer = ctx.socket(zmq.DEALER)
        dealer.connect(endpoint)
        text, payload = bench.body, bench.body.encode()
        execute, clock, wall = conn.execute, time.perf_counter_ns, time.time_ns
        record: tuple[int, int, str] | None = None
        own_start, helper_start = CpuTimes(0, 0), CpuTimes(0, 0)
        for seq in range(1, LATENCY_WARMUP + sends + 1):
            if seq == LATENCY_WARMUP + 1:
                dealer.send(CPU_QUERY)
                helper_start, own_start = CpuTimes.decode(dealer.recv()), own_cpu()
            t = clock()
            now = wall()
            mid = f"{now // 1_000_000:012x}{os.urandom(8).hex()}"
            reference_commit(execute, mid, seq, text, now, record)
            record = reference_exchange(dealer, mid, seq, now, payload)
            if seq > LATENCY_WARMUP:
                samples.append((clock() - t) / 1000)
                if seq % 200 == 0:
                    bench.progress.update(task, completed=seq - LATENCY_WARMUP)
            sent.append(mid)
        own_end = own_cpu()
        dealer.send(CPU_QUERY)
        cpu = cpu_us_per(own_end - own_start, CpuTimes.decode(dealer.recv()) - helper_start,
                         sends)
        if record is not None:
            execute(_REF_RECORD, record)
        dealer.send(b"")
        ended = True
        receiver.reply(30)  # "stopped": its store is closed
        dealer.close(0)
    finally:
        receiver.stop(15.0 if ended else 0.0)
        ctx.destroy(0)
        conn.close()
    bench.progress.update(task, completed=sends)
    import sqlite3

    with contextlib.closing(sqlite3.connect(root / "A.db")) as a, \
            contextlib.closing(sqlite3.connect(root / "B.db")) as b:
        problems = reference_problems(
            sent, text,
            a.execute("SELECT id, seq, body, state FROM outbox").fetchall(),
            b.execute("SELECT id, seq, body FROM inbox").fetchall())
    if problems:
        raise BenchError(f"reference design sync={sync}: " + "; ".join(problems[:5]))
    shutil.rmtree(root, ignore_errors=True)
    return samples, cpu, (f"reference {len(sent)} sent, receipted and recorded, stored once "
                          "at the receiver")


def reference_problems(sent: list[str], body: str, outbox: list[tuple[Any, ...]],
                       inbox: list[tuple[Any, ...]]) -> list[str]:
    """What is wrong with the reference design's stores after a run that sent `sent` (ids,
    seq 1, 2, ... in order) with `body`: the sender's `outbox` rows (id, seq, body, state)
    and the receiver's `inbox` rows (id, seq, body) must each be exactly one row per id
    sent, with its seq and body, and every sender row delivered (its receipt recorded)."""
    problems: list[str] = []
    expected = {mid: seq for seq, mid in enumerate(sent, 1)}
    if len(expected) != len(sent):
        problems.append(f"{len(sent) - len(expected)} ids sent twice")
    for side, rows in (("sender", outbox), ("receiver", inbox)):
        ids = [row[0] for row in rows]
        if len(rows) != len(sent):
            problems.append(f"{side}: {len(rows)} rows, {len(sent)} sent")
        if len(set(ids)) != len(ids):
            problems.append(f"{side}: {len(ids) - len(set(ids))} ids stored twice")
        missing, phantom = expected.keys() - set(ids), set(ids) - expected.keys()
        if missing:
            problems.append(f"{side}: {len(missing)} sent ids missing")
        if phantom:
            problems.append(f"{side}: {len(phantom)} ids never sent")
        wrong = sum(1 for row in rows
                    if row[0] in expected and (row[1] != expected[row[0]] or row[2] != body))
        if wrong:
            problems.append(f"{side}: {wrong} rows with another seq or body")
    undelivered = sum(1 for row in outbox if row[3] != "delivered")
    if undelivered:
        problems.append(f"sender: {undelivered} rows without their receipt recorded")
    return problems


def _two_commits(bench: Bench, sends: int, sync: str) -> list[float]:
    """µs per send for the commits it waits for, back to back: the sender's (store A: its
    message, with the record of the previous send's receipt, which rides on this commit in a
    one-at-a-time loop), then the receiver's row (store B). Until 2026-12-06 the record was
    committed apart and untimed, so A's commit here was a lone row: cheaper than the one on
    the path once a lone row needed no BEGIN/COMMIT."""
    task = bench.task(f"pair-latency {sync}: the two commits alone", sends)
    root = bench.root / f"commit-floor-{sync}"
    a = Store.open(root / "A", name="A", sync=sync)
    b = Store.open(root / "B", name="B", sync=sync)
    samples: list[float] = []
    try:
        clock, wall = time.perf_counter_ns, time.time_ns
        record: list[Delivery] = []
        for seq in range(1, sends + LATENCY_WARMUP + 1):
            now = wall()
            message = Envelope(f"{now:x}-{seq}", seq, "A", "B", bench.body, now, now)
            t = clock()
            a.apply(WriteBatch(outgoing=[message], deliveries=record), wall())
            b.apply(WriteBatch(incoming=[[message]]), wall())
            if seq > LATENCY_WARMUP:
                samples.append((clock() - t) / 1000)
            receipt = ReceiptFrame([(seq, seq)], now, now, now, now, now, sync)
            record = [Delivery("B", [seq], receipt, wall())]
            if seq % 200 == 0:
                bench.progress.update(task, completed=max(0, seq - LATENCY_WARMUP))
        a.apply(WriteBatch(deliveries=record), wall())
    finally:
        a.close()
        b.close()
        shutil.rmtree(root, ignore_errors=True)
    bench.progress.update(task, completed=sends)
    return samples


def _meshpost_latency(bench: Bench, m: int, sync: str
) -> tuple[list[float], dict[str, Any], VerifyReport]:
    """Latency samples of `m` sends one at a time, then CPU per send (both processes) of
    those and of `m` more from LOADED_SENDERS senders at once, with A's commits per send."""
    cluster = bench.cluster(f"pair-latency-{sync}", 2, sync, bench.window_option())
    task = bench.task(f"pair-latency {sync}: meshpost send→receipt", 2 * m)
    samples: list[float] = []
    loaded_sends = m // LOADED_SENDERS * LOADED_SENDERS
    try:
        cluster.start(["B"])
        cfg = MeshConfig.load(cluster.config_path).node("A", data_dir=cluster.data_dir("A"))
        # A: this process without the bench's threads (`own_cpu`), as the ping-pongs' A.
        cpu = CpuMeter({"A": own_cpu_seconds, "B": cluster.process("B").cpu_seconds})
        cpu_us: dict[str, Any] = {}
        commits = _Commits()

        def started() -> None:
            cpu.start()
            commits.start()

        def idle_done() -> None:
            cpu_us["idle"] = cpu.us_per_message(m)
            cpu_us["commits_idle"] = commits.per_send(m)

        async def loaded(node: Node) -> None:
            commits.node = node
            started()

            async def sender() -> None:
                for _ in range(loaded_sends // LOADED_SENDERS):
                    await node.send("B", bench.body, timeout_s=30)

            await asyncio.gather(*(sender() for _ in range(LOADED_SENDERS)))
            cpu_us["loaded"] = cpu.us_per_message(loaded_sends)
            cpu_us["commits_loaded"] = commits.per_send(loaded_sends)
            bench.progress.update(task, completed=2 * m)

        send_one_at_a_time(
            bench, cfg, m, task, started=started,
            sent=lambda begin, end: samples.append((end - begin) / 1000),
            finished=idle_done, then=loaded, on_node=commits.watch,
        )
    finally:
        cluster.stop()
    report = verify_all({"A": cluster.data_dir("A"), "B": cluster.data_dir("B")},
                         expect_sent=m + loaded_sends + LATENCY_WARMUP)
    return samples, cpu_us, report


class _Commits:
    """A's store commits per send over a phase (1.00: one commit a send; below: grouped)."""

    def __init__(self) -> None:
        self.node: Node | None = None
        self._start = 0

    def watch(self, node: Node) -> None:
        self.node = node

    def start(self) -> None:
        self._start = self._count()

    def per_send(self, sends: int) -> dict[str, float]:
        return {"A": round((self._count() - self._start) / max(1, sends), 3)}

    def _count(self) -> int:
        return self.node.snapshot_stats().store_commits if self.node is not None else 0


def send_one_at_a_time(
    bench: Bench, cfg: NodeConfig, count: int, task: TaskID, *, started: Callable[[], None],
    sent: Callable[[int, int], None], finished: Callable[[], None] | None = None,
    probe: Probe | None = None, then: Callable[[Node], Awaitable[None]] | None = None,
    on_node: Callable[[Node], None] | None = None,
) -> None:
    """Node A (`cfg`, in this process) sends to B one message at a time, each waiting for
    its receipt: after a warm-up `started()`, then `sent(begin_ns, end_ns)` per send
    (perf_counter_ns), `finished()`, and `then(node)` before the node closes."""

    async def run() -> None:
        async with Node(cfg, probe=probe) as a:
            if on_node is not None:
                on_node(a)
            await wait_connected_or_fail(a)
            for _ in range(LATENCY_WARMUP):
                await a.send("B", bench.body, timeout_s=30)
            started()
            clock = time.perf_counter_ns
            for i in range(count):
                begin = clock()
                await a.send("B", bench.body, timeout_s=30)
                sent(begin, clock())
                if i % 200 == 0:
                    bench.progress.update(task, completed=i)
            if finished is not None:
                finished()
            bench.progress.update(task, completed=count)
            if then is not None:
                await then(a)

    run_async(run(), bench.loop)


async def _loop_pingpong(
    dealer: Any, payload: bytes, m: int, progress: Callable[[int], None]
) -> tuple[list[float], dict[str, float]]:
    """Ping-pong with replies read from the event loop's reader callback on ZMQ_FD, drained
    until empty: how meshpost's transport reads (no zmq.asyncio future per frame). Its
    samples and CPU a round trip (both processes, as the blocking one's)."""
    import zmq

    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] | None = None
    reply = b""

    def readable() -> None:
        nonlocal reply
        while dealer.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            reply = dealer.recv(zmq.NOBLOCK)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    async def round_trip(frame: bytes) -> bytes:
        nonlocal waiter
        waiter = loop.create_future()
        dealer.send(frame, zmq.NOBLOCK)
        readable()  # the send may have consumed the descriptor's edge
        await waiter
        return reply

    fd = dealer.getsockopt(zmq.FD)
    loop.add_reader(fd, readable)
    clock = time.perf_counter_ns
    samples: list[float] = []
    try:
        for _ in range(LATENCY_WARMUP):
            await round_trip(payload)
        echo_start, own_start = CpuTimes.decode(await round_trip(CPU_QUERY)), own_cpu()
        for i in range(m):  # inline, not round_trip(): what is timed is what it was
            waiter = loop.create_future()
            t = clock()
            dealer.send(payload, zmq.NOBLOCK)
            readable()  # the send may have consumed the descriptor's edge
            await waiter
            samples.append((clock() - t) / 1000)
            if i % 500 == 0:
                progress(i)
        own_end = own_cpu()
        echo_end = CpuTimes.decode(await round_trip(CPU_QUERY))
    finally:
        loop.remove_reader(fd)
    return samples, cpu_us_per(own_end - own_start, echo_end - echo_start, m)

"""`pair-latency`: the same pair as pair-throughput; `await send()` one message at a time
(sender stores, B commits, the receipt comes back; A records it in its next commit, off the
reply path), against a raw pyzmq DEALER/ROUTER ping-pong of the same size measured in the
same run, and the floor of what the guarantees cost (the loop's round trip plus the two
commits left on the path, alone). With `--sync full` it also measures `normal`.

Rule: every ratio divides figures of the same run; the stores are verified after each level.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from rich.progress import TaskID

from meshpost.bench.drive import wait_connected_or_fail
from meshpost.bench.meters import CpuMeter
from meshpost.bench.options import FLOOR_SENDS, LATENCY_WARMUP
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


def run(bench: Bench) -> ScenarioResult:
    m = bench.o.latency_messages
    levels = [bench.o.sync] + (["normal"] if bench.o.sync == "full" else [])
    result = ScenarioResult("pair-latency")
    raw, loop = _raw_pingpong(bench, m)
    result.samples["raw pyzmq ping-pong"] = raw
    result.samples[f"pyzmq ping-pong on the {bench.loop} event loop"] = loop
    raw_p, loop_p = percentiles(raw), percentiles(loop)
    result.figures["raw_pingpong_us"] = rounded(raw_p)
    # The floor of any asyncio design (meshpost's included): the same ping-pong with the
    # client reading through the event loop, as meshpost's transport does, on the loop the
    # nodes of this run use (`--loop`). Reported beside the ratios so that the share owed to
    # the loop itself is visible.
    result.figures["loop"] = bench.loop
    result.figures["loop_pingpong_us"] = rounded(loop_p)
    result.figures["ratio_loop"] = {
        k: round(loop_p[k] / raw_p[k], 2) for k in ("p50", "p90", "p99", "p99.9")
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
            k: round(p[k] / raw_p[k], 2) for k in ("p50", "p90", "p99", "p99.9")
        }
        # What the guarantees alone cost: the loop's round trip plus the two commits a send
        # waits for, timed with meshpost's own store code and nothing else.
        commits = _two_commits(bench, min(m, FLOOR_SENDS), sync)
        floor = percentiles([a + b for a, b in zip(loop, commits, strict=False)])
        result.figures[f"commits_{sync}_us"] = rounded(percentiles(commits))
        result.figures[f"floor_{sync}_us"] = rounded(floor)
        result.figures[f"ratio_floor_{sync}"] = {
            k: round(floor[k] / raw_p[k], 2) for k in ("p50", "p90", "p99", "p99.9")
        }
        result.figures[f"over_floor_{sync}"] = {
            k: round(p[k] / floor[k], 2) for k in ("p50", "p90", "p99", "p99.9")
        }
        checks.append(f"{sync}: {report.summary()}")
    result.figures["messages"] = m
    result.figures["loaded_senders"] = LOADED_SENDERS
    result.figures["size"] = bench.o.size
    result.verify = "verified: " + " / ".join(checks)
    return result


def _raw_pingpong(bench: Bench, m: int) -> tuple[list[float], list[float]]:
    """Blocking pyzmq ping-pong (the ceiling), then the same through the nodes' event loop."""
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
        clock = time.perf_counter_ns
        for i in range(m):
            t = clock()
            dealer.send(payload)
            dealer.recv()
            samples.append((clock() - t) / 1000)
            if i % 500 == 0:
                bench.progress.update(task, completed=i)
        loop_samples = run_async(
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
    return samples, loop_samples


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
        cpu = CpuMeter({"A": time.process_time, "B": cluster.process("B").cpu_seconds})
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
) -> list[float]:
    """Ping-pong with replies read from the event loop's reader callback on ZMQ_FD, drained
    until empty: how meshpost's transport reads (no zmq.asyncio future per frame)."""
    import zmq

    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] | None = None

    def readable() -> None:
        while dealer.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            dealer.recv(zmq.NOBLOCK)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    fd = dealer.getsockopt(zmq.FD)
    loop.add_reader(fd, readable)
    clock = time.perf_counter_ns
    samples: list[float] = []
    try:
        for i in range(LATENCY_WARMUP + m):
            waiter = loop.create_future()
            t = clock()
            dealer.send(payload, zmq.NOBLOCK)
            readable()  # the send may have consumed the descriptor's edge
            await waiter
            if i >= LATENCY_WARMUP:
                samples.append((clock() - t) / 1000)
                if i % 500 == 0:
                    progress(i - LATENCY_WARMUP)
    finally:
        loop.remove_reader(fd)
    return samples

"""`ceiling`: no meshpost. A helper process binds a ROUTER; this process connects a DEALER
and sends N bodies one way as fast as pyzmq allows (no acknowledgement, no storage).

Rule: the 1.0x of every throughput ratio, measured in the same run as the figures it divides.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from meshpost.bench.options import WARMUP_MESSAGES, BenchError, allowance
from meshpost.bench.results import ScenarioResult
from meshpost.bench.support import endpoint_for

if TYPE_CHECKING:
    from meshpost.bench.runner import Bench


def run(bench: Bench) -> ScenarioResult:
    n = bench.o.messages
    rates = [ceiling_once(bench, index) for index in range(1, bench.o.repeat + 1)]
    rate = max(rates)
    return ScenarioResult(
        "ceiling",
        figures={"msgs_per_s": round(rate), "messages": n, "size": bench.o.size,
                 "runs_msgs_per_s": [round(r) for r in rates]},
        verify=f"{rate:,.0f} msgs/s one-way (best of {len(rates)}), no receipts, no storage",
    )


def ceiling_once(bench: Bench, index: int, label: str = "") -> float:
    import zmq

    n = bench.o.messages
    task = bench.task(f"ceiling {label}run {index}: raw pyzmq DEALER→ROUTER one-way", n)
    tag = f"{'paired-' if label else ''}{index}"
    sink = bench.child("ceiling", ["raw-sink", endpoint_for(bench.o.transport, bench.root,
                                                         f"ceiling{tag}")], f"sink{tag}")
    ctx = zmq.Context()
    try:
        endpoint = sink.reply(30)["ready"]
        dealer = ctx.socket(zmq.DEALER)
        dealer.connect(endpoint)
        payload = bench.body.encode()
        sink.send(warm=WARMUP_MESSAGES, n=n)
        for _ in range(WARMUP_MESSAGES):
            dealer.send(payload)
        if dealer.poll(30_000) == 0:
            raise BenchError("raw sink never answered the warm-up")
        dealer.recv()
        send = dealer.send
        step = max(1, n // 50)
        t0 = time.monotonic()
        for i in range(n):
            send(payload)
            if i % step == 0:
                bench.progress.update(task, completed=i)
        last = float(sink.reply(allowance(n))["last"])
        bench.progress.update(task, completed=n)
        dealer.close(0)
    finally:
        sink.stop()
        ctx.destroy(0)  # a socket an interruption left open would block term() for ever
    return n / (last - t0)

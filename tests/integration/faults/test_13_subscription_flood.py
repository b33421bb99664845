"""13. Subscription flood against R: many `events` subscriptions (as `meshpost attach` opens)
that are abandoned at once, then a stream of 32 KB messages S -> R.

Checked: R's memory for subscriptions stays under one bound for all of them together
(`SUBSCRIBERS_MAX_BYTES`, counted from the bodies), whatever the number of subscribers; a
subscriber that comes back sees an explicit count of the events it lost, never a silent gap;
abandoned subscriptions expire after the node's `subscriber_idle_s` (`SUBSCRIBER_IDLE_S`,
30 s, by default; R runs with IDLE_S, so the test need not wait out the default); the stream
loses nothing. Before this, each abandoned subscription kept 10,000 events with their bodies
(three took a node from 46 MB to 391 MB) and never went away.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from meshpost.control import (
    SUBSCRIBERS_MAX_BYTES,
    AsyncControlClient,
    EventsReply,
    EventsRequest,
)

from .conftest import MeshFactory

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.timeout(300)]

ABANDONED = 40
MESSAGES = 4000
SIZE = 32_000
MB = 2**20
#: R's RSS may grow by the subscriptions' bound plus this much (SQLite cache, ZeroMQ buffers,
#: allocator slack). Without the bound every abandoned queue keeps its last 10,000 events:
#: all 4,000 bodies, 128 MB (shared between the queues, as the events are). Measured with
#: the bound: +21 MB on a quiet machine, +53 MB with the whole suite running beside it.
SLACK_MB = 64
#: R's `subscriber_idle_s` (a `[mesh]` option of the test's mesh file): short, so the test
#: does not wait out the default 30 s, yet long enough that the 40 abandoned subscriptions
#: are all there together (made one after another, 0.1-0.2 s) and still there when the flood
#: starts, and six times the late subscriber's poll interval. S floods from this test's own
#: event loop: when each 32 KB body took ~10 ms of `rng.choice` calls (a round of 100 sends
#: held the loop for a second or more) the late subscriber's polls were seen 8 s apart on a
#: loaded machine and 8 s expired it mid-flood, so this was 15 s; bodies are now drawn in
#: 0.1 ms, the flood takes 3-4 s instead of 80, and the largest gap between the late
#: subscriber's polls is reported (`late_poll_gap_max_s`).
IDLE_S = 6.0
#: How often the late subscriber polls: rarely enough to lose events to the flood (its share
#: of the bound is 1/41 of it, ~25 bodies), often enough never to be idle for IDLE_S.
POLL_S = 1.0


def test_subscription_flood(mesh_factory: MeshFactory) -> None:
    mesh = mesh_factory(["S", "R"], real=["R"], transport="tcp", seed=13,
                        options={"subscriber_idle_s": IDLE_S})

    async def scenario() -> None:
        await mesh.start()
        await mesh.wait_connected("R")
        rss_before = mesh.ps("R").memory_info().rss
        peak = {"rss": rss_before, "held": 0, "subscribers": 0}
        late_counts = {"seen": 0, "dropped": 0}
        late_gap = {"max": 0.0}
        flooding = asyncio.Event()

        async def sample() -> None:
            while True:
                control = (await mesh.status("R"))["control"]
                peak["held"] = max(peak["held"], control["subscription_bytes"])
                peak["subscribers"] = max(peak["subscribers"], control["subscribers"])
                peak["rss"] = max(peak["rss"], mesh.ps("R").memory_info().rss)
                await asyncio.sleep(0.5)

        async def read_all(client: AsyncControlClient) -> None:
            while True:
                reply = await client.request(EventsRequest(0.0), timeout_s=10)
                assert isinstance(reply, EventsReply)
                if not (reply.incoming or reply.peer_changes or reply.deliveries
                        or reply.dropped):
                    return
                late_counts["seen"] += len(reply.incoming)
                late_counts["dropped"] += reply.dropped

        async def slow_reader(client: AsyncControlClient) -> None:
            # Polls rarely (well within the idle limit): too slow for the flood.
            last = time.monotonic()
            while not flooding.is_set():
                await asyncio.sleep(POLL_S)
                await read_all(client)
                now = time.monotonic()
                late_gap["max"] = max(late_gap["max"], now - last)
                last = now

        subscribe_start = time.monotonic()
        for _ in range(ABANDONED):  # each request on a socket of its own, closed at once
            reply = await mesh.control("R", EventsRequest(0.0))
            assert isinstance(reply, EventsReply)
        async with AsyncControlClient(mesh.data_dir("R"), name="R") as late:
            await late.request(EventsRequest(0.0), timeout_s=10)
            subscribed_s = time.monotonic() - subscribe_start
            sampler = mesh.spawn_task(sample())
            reader = mesh.spawn_task(slow_reader(late))
            flood_start = time.monotonic()
            await mesh.stream("S", "R", MESSAGES, tag="flood", concurrency=100, pause_s=0,
                              size=SIZE)
            # S posts without waiting for receipts: wait until R has stored all of them.
            received_start = time.monotonic()
            while (await mesh.status("R"))["stats"]["received"] < MESSAGES:
                assert time.monotonic() - received_start < 60, "R did not receive the flood"
                await asyncio.sleep(0.2)
            flood_s = time.monotonic() - flood_start
            flooding.set()
            await reader
            await read_all(late)
        expire_start = time.monotonic()
        while (await mesh.status("R"))["control"]["subscribers"]:
            assert time.monotonic() - expire_start < IDLE_S + 20, \
                "abandoned subscriptions did not expire"
            await asyncio.sleep(0.25)
        sampler.cancel()
        grown_mb = (peak["rss"] - rss_before) / MB
        mesh.extra.update({
            "subscribers": peak["subscribers"],
            "held_peak_mb": round(peak["held"] / MB, 1),
            "bound_mb": SUBSCRIBERS_MAX_BYTES // MB,
            "rss_grown_mb": round(grown_mb, 1),
            "late_seen": late_counts["seen"],
            "late_dropped": late_counts["dropped"],
            "all_expired_after_s": round(time.monotonic() - expire_start, 1),
            "subscribed_s": round(subscribed_s, 1),
            "flood_s": round(flood_s, 1),
            "late_poll_gap_max_s": round(late_gap["max"], 1),
        })
        assert peak["subscribers"] == ABANDONED + 1
        assert peak["held"] <= SUBSCRIBERS_MAX_BYTES
        assert grown_mb < SUBSCRIBERS_MAX_BYTES / MB + SLACK_MB, f"R grew {grown_mb:.0f} MB"
        assert late_counts["dropped"] > 0
        assert late_counts["seen"] + late_counts["dropped"] >= MESSAGES, late_counts
        assert mesh.alive("R"), mesh.log_tail("R")
        counts = await mesh.finish()
        assert counts.accepted == counts.receipted == MESSAGES

    mesh.run(scenario)

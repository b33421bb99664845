"""The node's links (node/links.py): retransmission when the virtual timer fires; lazy links
and idle close: an idle link holds no socket and no timer, opens on the first message (or a
stored one at start, or `connect`), closes after `link_idle_s`, and reopens on the next
message with nothing lost."""

from __future__ import annotations

import asyncio
import dataclasses
import math
from pathlib import Path

from tests.unit.node.support import PATIENCE_S, config, frame_kinds, node_pair, run, until

from meshpost.clock import FakeClock
from meshpost.node import Node, wait_receipt
from meshpost.protocol import SessionState, decode
from meshpost.store import StoreReader
from meshpost.transport import MemoryNetwork

IDLE_S = 30.0


def lazy_pair(tmp_path: Path, net: MemoryNetwork, clock: FakeClock) -> tuple[Node, Node]:
    """A (lazy: dials nobody at start, idles after IDLE_S) and B, on one network."""
    a_config = dataclasses.replace(config("A", "B", tmp_path), dial_at_start=0,
                                   link_idle_s=IDLE_S)
    a = Node(a_config, clock=clock, transport=net.transport("A"))
    b = Node(config("B", "A", tmp_path), clock=clock, transport=net.transport("B"))
    return a, b


def state_of(node: Node, peer: str) -> str:
    return next(p.state for p in node.peers() if p.name == peer)


def bodies_at(node: Node) -> list[str]:
    with StoreReader.for_data_dir(node.config.data_dir) as reader:
        return sorted(m.body for m in reader.history(direction="in"))


def test_a_lost_frame_is_retransmitted_when_the_virtual_timer_fires(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with node_pair(tmp_path) as (a, b, net, clock):
            net.partition("A", "B")
            (handle,) = await a.post("B", "through the storm")
            await until(lambda: a.snapshot_stats().dropped_sends >= 1)
            net.heal("A", "B")
            # Nothing happens while virtual time stands still ...
            await asyncio.sleep(0.05)
            assert not handle.receipt.done()
            assert b.stats.received == 0
            # ... until the retransmission timer is due.
            clock.advance(a.config.retransmit_initial_s * 2)
            a.poll_timers()
            receipt = await wait_receipt(handle, PATIENCE_S)
            assert receipt.to == "B"
            assert a.snapshot_stats().retransmissions >= 1
            assert b.stats.received == 1

    run(scenario)


def test_a_lazy_link_opens_no_connection_until_the_first_message_then_delivers_it(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        net, clock = MemoryNetwork(), FakeClock()
        a, b = lazy_pair(tmp_path, net, clock)
        async with a, b:
            await until(lambda: state_of(b, "A") == "ready")  # B dials A: a small mesh
            assert net.nodes["A"].dials == {}
            assert state_of(a, "B") == "idle"
            assert "Hello" not in frame_kinds(net, "A")
            assert a.next_timer == math.inf  # nothing to time: the loop sleeps
            await a.send("B", "first", timeout_s=PATIENCE_S)
            assert net.nodes["A"].dials == {"B": 1}
            assert state_of(a, "B") == "ready"
            assert bodies_at(b) == ["first"]

    run(scenario)


def test_an_idle_link_closes_after_link_idle_s_and_reopens_on_the_next_message(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        net, clock = MemoryNetwork(), FakeClock()
        a, b = lazy_pair(tmp_path, net, clock)
        async with a, b:
            await a.send("B", "before", timeout_s=PATIENCE_S)
            await until(lambda: a.stats.delivered == 1)
            assert a.next_timer < math.inf  # pings in the recent window, then the idle close
            clock.advance(IDLE_S + 1)
            a.poll_timers()
            assert frame_kinds(net, "A")[-1] == "Close"
            assert state_of(a, "B") == "idle"
            assert "B" not in net.nodes["A"].peers  # the socket is closed
            assert a.next_timer == math.inf  # and no timer is armed
            (status,) = a.peers()
            assert status.last_seen_ns is not None and not status.connected
            # B's listener forgot the session: no PeerLeft, B's own link to A untouched.
            await until(lambda: b._listener is not None
                        and b._listener.session_state(b"A".hex()) is SessionState.NEW)
            assert state_of(b, "A") == "ready"
            await a.send("B", "after", timeout_s=PATIENCE_S)  # a new Hello, a new session
            assert net.nodes["A"].dials == {"B": 2}
            assert bodies_at(b) == ["after", "before"]
            assert a.stats.retransmissions == 0

    run(scenario)


def test_messages_pending_in_the_store_at_start_open_their_lazy_link(tmp_path: Path) -> None:
    async def scenario() -> None:
        net, clock = MemoryNetwork(), FakeClock()
        a, b = lazy_pair(tmp_path, net, clock)
        async with a:  # B is down: the message waits in A's outbox
            (handle,) = await a.post("B", "kept across a restart")
            await until(lambda: "Hello" in frame_kinds(net, "A"))
        net = MemoryNetwork()
        a, b = lazy_pair(tmp_path, net, clock)
        async with b, a:
            await until(lambda: bodies_at(b) == ["kept across a restart"])
            assert net.nodes["A"].dials == {"B": 1}
            await until(lambda: a.stats.delivered == 1)
            assert handle.id  # the same message, delivered after the restart

    run(scenario)


def test_connect_opens_idle_links_as_a_probe_and_they_idle_out_again(tmp_path: Path) -> None:
    async def scenario() -> None:
        net, clock = MemoryNetwork(), FakeClock()
        a, b = lazy_pair(tmp_path, net, clock)
        async with a, b:
            a.connect()
            await until(lambda: state_of(a, "B") == "ready")
            clock.advance(IDLE_S + 1)
            a.poll_timers()
            assert state_of(a, "B") == "idle"

    run(scenario)


def test_a_ventilator_keeps_its_workers_links_open_and_watched(tmp_path: Path) -> None:
    async def scenario() -> None:
        net, clock = MemoryNetwork(), FakeClock()
        a, b = lazy_pair(tmp_path, net, clock)
        async with a, b:
            a.watch_peers({"B"})
            await until(lambda: state_of(a, "B") == "ready")
            pings = frame_kinds(net, "A").count("Ping")
            for _ in range(int(2 * IDLE_S)):  # a second at a time: B answers each Ping
                clock.advance(a.config.ping_interval_s)
                a.poll_timers()
                await until(lambda: a.peers()[0].last_seen_ns == clock.wall_ns())  # Pong
            assert state_of(a, "B") == "ready"  # watched: never idle, never lost
            assert frame_kinds(net, "A").count("Ping") > pings + IDLE_S
            assert a.next_timer < math.inf
            a.watch_peers(set())
            clock.advance(IDLE_S + 1)
            a.poll_timers()
            assert state_of(a, "B") == "idle"

    run(scenario)


def test_a_quiet_node_polls_no_link_until_something_happens(tmp_path: Path) -> None:
    """The timer loop sleeps until the next real deadline: with every link quiet there is
    none, so it polls nothing (it used to scan every link every 250 ms)."""
    async def scenario() -> None:
        net, clock = MemoryNetwork(), FakeClock()
        a, b = lazy_pair(tmp_path, net, clock)
        async with a, b:
            await a.send("B", "one", timeout_s=PATIENCE_S)
            for _ in range(int(a.config.peer_timeout_s)):  # pinged in the recent window
                clock.advance(a.config.ping_interval_s)
                a.poll_timers()
                await until(lambda: a.peers()[0].last_seen_ns == clock.wall_ns())  # Pong
            clock.advance(a.config.ping_interval_s)  # past it: quiet
            a.poll_timers()
            assert state_of(a, "B") == "ready"
            assert a.next_timer > clock.monotonic() + IDLE_S / 2  # only the idle close left
            link = a._links["B"]
            polls: list[float] = []
            real_poll = link.poll

            def counting_poll(now: float, wall_ns: int, hlc: int) -> None:
                polls.append(now)
                real_poll(now, wall_ns, hlc)

            link.poll = counting_poll  # type: ignore[method-assign]
            await asyncio.sleep(0.6)  # the old loop polled every link at least every 0.25 s
            assert polls == []
            await a.send("B", "two", timeout_s=PATIENCE_S)  # and wakes for real work

    run(scenario)


def test_in_a_small_mesh_a_peer_that_dials_us_reopens_our_idle_link_to_it(
    tmp_path: Path,
) -> None:
    """A peer back after our link to it idled out shows as connected again without our
    sending anything (in a mesh small enough to dial at start)."""
    async def scenario() -> None:
        net, clock = MemoryNetwork(), FakeClock()
        a_config = dataclasses.replace(config("A", "B", tmp_path), link_idle_s=IDLE_S)
        a = Node(a_config, clock=clock, transport=net.transport("A"))
        async with a:
            async with Node(config("B", "A", tmp_path), clock=clock,
                            transport=net.transport("B")):
                await until(lambda: state_of(a, "B") == "ready")
            clock.advance(IDLE_S + 1)  # B is gone (it said Bye); nothing to send to it
            a.poll_timers()
            assert state_of(a, "B") == "idle"
            async with Node(config("B", "A", tmp_path), clock=clock,
                            transport=net.transport("B")):  # back: it dials A at start
                await until(lambda: state_of(a, "B") == "ready")
                assert net.nodes["A"].dials == {"B": 2}

    run(scenario)


def test_in_a_small_mesh_an_open_quiet_link_still_finds_a_silent_peer_lost(
    tmp_path: Path,
) -> None:
    """Links dialed at start are watched for as long as they are open (a console user sees a
    crashed peer as lost), until they idle out; a big mesh's links only while in use."""
    async def scenario() -> None:
        net, clock = MemoryNetwork(), FakeClock()
        a_config = dataclasses.replace(config("A", "B", tmp_path), link_idle_s=IDLE_S)
        a = Node(a_config, clock=clock, transport=net.transport("A"))
        b = Node(config("B", "A", tmp_path), clock=clock, transport=net.transport("B"))
        async with a, b:
            await a.send("B", "one", timeout_s=PATIENCE_S)
            for _ in range(10):  # quiet for 10 s, pinged all along
                clock.advance(a.config.ping_interval_s)
                a.poll_timers()
                await until(lambda: a.peers()[0].last_seen_ns == clock.wall_ns())  # Pong
            net.partition("A", "B")  # B goes silent (a crash, a cable)
            for _ in range(int(a.config.peer_timeout_s)):
                clock.advance(a.config.ping_interval_s)
                a.poll_timers()
            assert state_of(a, "B") == "lost"

    run(scenario)


def test_a_lost_peer_is_redialled_only_if_still_silent_a_peer_timeout_later(
    tmp_path: Path,
) -> None:
    """A loss keeps the connection (a peer merely stopped reads it, and what is queued on it,
    once it runs: a new one would discard that); a link still lost a peer timeout later,
    nothing heard, gets a new one before its next Hello goes. The old node redialled at
    every loss."""
    async def scenario() -> None:
        async with node_pair(tmp_path) as (a, _b, net, clock):
            redials: list[tuple[str, int]] = []  # (peer, frames A had sent by then)
            net.nodes["A"].redial = (  # type: ignore[method-assign]
                lambda peer: redials.append((peer, len(net.log))))
            step, timeout = a.config.ping_interval_s, a.config.peer_timeout_s

            def silence(seconds: float) -> None:
                for _ in range(round(seconds / step)):
                    clock.advance(step)
                    a.poll_timers()

            # B silent, then back within a peer timeout: its Hello welcomed, no redial.
            net.partition("A", "B")
            silence(timeout)
            assert state_of(a, "B") == "lost"
            net.heal("A", "B")
            silence(timeout / 2)
            await until(lambda: state_of(a, "B") == "ready")
            silence(timeout / 2 + step)
            assert redials == []
            # B silent past the loss by a peer timeout: one redial, then the Hello on it.
            net.partition("A", "B")
            silence(timeout)
            assert state_of(a, "B") == "lost"
            assert redials == []
            silence(timeout)
            assert [peer for peer, _ in redials] == ["B"]
            after = [type(decode(data, max_bytes=1 << 24)).__name__
                     for sender, to, data in net.log[redials[0][1]:] if sender == "A"]
            assert after[:1] == ["Hello"]
            silence(3 * timeout)
            assert len(redials) == 1  # once per loss
            net.heal("A", "B")
            silence(step)
            await until(lambda: state_of(a, "B") == "ready")

    run(scenario)


def test_add_peer_of_a_known_name_changes_nothing_not_even_its_node_id(tmp_path: Path) -> None:
    """`add_peer` of a peer A already has (B, configured) returns False and pins no node id
    for it: pinned, B's own Hellos would be refused as a name clash (whoever called it,
    discovery with a beacon's made-up node id above all). A new name is pinned."""
    async def scenario() -> None:
        async with node_pair(tmp_path) as (a, _b, _net, _clock):
            assert a.add_peer("B", "tcp://127.0.0.1:9", node_id="made-up") is False
            listener = a._listener
            assert listener is not None
            assert "B" not in listener.expected_node_ids
            assert a.add_peer("C", "tcp://127.0.0.1:9", node_id="c-1") is True
            assert listener.expected_node_ids["C"] == "c-1"
            (handle,) = await a.post("B", "still B")
            assert (await wait_receipt(handle, PATIENCE_S)).to == "B"

    run(scenario)

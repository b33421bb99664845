"""The node's inbound path (node/inbound.py): a frame sent to the node's ROUTER goes through
its listener; arrived messages are receipted only once committed, a replayed batch is
receipted again but stored, counted and told once; a refused connection is told to
subscribers at most once per interval per claimed name, from a bounded memory; a full writer
pauses inbound frames until it has room."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest
from tests.unit.node.support import PATIENCE_S, config, node_pair, run, until

import meshpost.node.inbound as inbound
from meshpost.clock import FakeClock
from meshpost.node import MessageReceived, Node, NodeEvent, PeerRefused
from meshpost.protocol import PROTOCOL_VERSION, Batch, Hello, Refuse, RefuseCode, decode, encode
from meshpost.store import StoreReader
from meshpost.transport import MemoryNetwork, MemoryTransport

MAX_FRAME = 1 << 24


def drain(queue: asyncio.Queue[NodeEvent]) -> list[NodeEvent]:
    events = []
    while not queue.empty():
        events.append(queue.get_nowait())
    return events


class Stranger:
    """A connection to B's ROUTER from no peer of B's: it says Hello and keeps B's answers."""

    def __init__(self, net: MemoryNetwork, name: str = "C") -> None:
        self.transport = net.transport(name)
        self.answers: list[bytes] = []
        self.transport.start(lambda *_: None, lambda _peer, data: self.answers.append(data))
        self.transport.add_peer("B", "memory://B")

    def hello(self, claimed: str) -> None:
        self.transport.send_to_peer("B", encode(Hello(PROTOCOL_VERSION, "c" * 32, claimed, 1, 1)))

    def refusals(self) -> list[Refuse]:
        frames = [decode(data, max_bytes=MAX_FRAME) for data in self.answers]
        return [f for f in frames if isinstance(f, Refuse)]


def test_a_refused_hello_is_answered_each_time_but_told_once_per_interval(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        async with node_pair(tmp_path) as (_a, b, net, clock):
            events = b.subscribe()
            stranger = Stranger(net)
            for _ in range(3):
                stranger.hello("C")
            await until(lambda: len(stranger.refusals()) == 3)
            assert {r.code for r in stranger.refusals()} == {RefuseCode.UNKNOWN_PEER}
            (notice,) = [e for e in drain(events) if isinstance(e, PeerRefused)]
            assert notice.who == "C"  # the name its Hello claimed, not the routing id
            assert "not a peer" in notice.detail
            clock.advance(inbound.REFUSAL_NOTICE_INTERVAL_S)
            stranger.hello("C")
            await until(lambda: len(stranger.refusals()) == 4)
            assert [e.who for e in drain(events) if isinstance(e, PeerRefused)] == ["C"]

    run(scenario)


def test_the_refusal_notices_remembered_are_bounded_forgetting_the_oldest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(inbound, "REFUSAL_NOTICE_MEMORY", 3)

    async def scenario() -> None:
        async with node_pair(tmp_path) as (_a, b, net, _clock):
            events = b.subscribe()
            stranger = Stranger(net)
            names = [f"stranger{i}" for i in range(5)]
            for name in names:
                stranger.hello(name)
            await until(lambda: len(stranger.refusals()) == 5)
            assert [e.who for e in drain(events) if isinstance(e, PeerRefused)] == names
            assert list(b._inbound._refusal_notices) == names[-3:]
            # The first was forgotten: it is told again at once, within the interval.
            stranger.hello(names[0])
            await until(lambda: len(stranger.refusals()) == 6)
            assert [e.who for e in drain(events) if isinstance(e, PeerRefused)] == names[:1]

    run(scenario)


class ReceiptWatcher(MemoryTransport):
    """B's transport: for each frame B sends back on a connection, whether the messages B
    holds are committed at that moment (B's store read beside its writer)."""

    data_dir: Path | None = None
    replies: list[tuple[str, list[str]]]

    def reply(self, identity: bytes, payload: bytes) -> bool:
        assert self.data_dir is not None
        with StoreReader.for_data_dir(self.data_dir) as reader:
            stored = [m.body for m in reader.history(direction="in")]
        self.replies.append((type(decode(payload, max_bytes=MAX_FRAME)).__name__, stored))
        return super().reply(identity, payload)


@contextlib.asynccontextmanager
async def watched_pair(
    tmp_path: Path,
) -> AsyncIterator[tuple[Node, Node, MemoryNetwork, ReceiptWatcher, FakeClock]]:
    net, clock = MemoryNetwork(), FakeClock()
    watcher = ReceiptWatcher(net, "B")
    watcher.replies = []
    net.nodes["B"] = watcher
    a = Node(config("A", "B", tmp_path), clock=clock, transport=net.transport("A"))
    b = Node(config("B", "A", tmp_path), clock=clock, transport=watcher)
    watcher.data_dir = b.config.data_dir
    async with a, b:
        await until(lambda: all(p.connected for p in a.peers()))
        yield a, b, net, watcher, clock


def test_a_receipt_leaves_only_once_its_message_is_committed(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with watched_pair(tmp_path) as (a, _b, _net, watcher, _clock):
            await a.send("B", "durable first", timeout_s=PATIENCE_S)
            receipts = [stored for kind, stored in watcher.replies if kind == "ReceiptFrame"]
            assert receipts == [["durable first"]]

    run(scenario)


def test_a_replayed_batch_is_receipted_again_but_stored_counted_and_told_once(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        async with watched_pair(tmp_path) as (a, b, net, watcher, clock):
            events = b.subscribe()
            await a.send("B", "once", timeout_s=PATIENCE_S)
            (batch,) = [data for frm, to, data in net.log if (frm, to) == ("A", "B")
                        and isinstance(decode(data, max_bytes=MAX_FRAME), Batch)]
            await until(lambda: b.stats.received == 1)
            # Time moves here; it stands still in the test below.
            clock.advance(0.001)
            net.nodes["B"]._inbound(b"A", batch)  # the same batch again, on A's connection
            await until(lambda: [k for k, _ in watcher.replies].count("ReceiptFrame") == 2)
            await until(lambda: b.stats.duplicates == 1)
            assert b.stats.received == 1
            received = [e for e in drain(events) if isinstance(e, MessageReceived)]
            assert [e.message.body for e in received] == ["once"]
            with StoreReader.for_data_dir(b.config.data_dir) as reader:
                assert [m.body for m in reader.history(direction="in")] == ["once"]

    run(scenario)


def test_a_batch_replayed_while_the_clock_stands_still_is_told_and_handled_once(
    tmp_path: Path,
) -> None:
    """A wall clock that does not move between the two commits (coarse, stepped back, this
    FakeClock): the replay's commit has the first one's timestamp, and is still a replay."""

    async def scenario() -> None:
        async with watched_pair(tmp_path) as (a, b, net, watcher, clock):
            events = b.subscribe()
            handled: list[str] = []
            b.on_request(lambda m: handled.append(m.body), direct=True)  # an echo, no reply
            await a.send("B", "once", timeout_s=PATIENCE_S)
            (batch,) = [data for frm, to, data in net.log if (frm, to) == ("A", "B")
                        and isinstance(decode(data, max_bytes=MAX_FRAME), Batch)]
            await until(lambda: handled == ["once"])
            stood_still = clock.wall_ns()
            net.nodes["B"]._inbound(b"A", batch)  # the same batch again, on A's connection
            await until(lambda: [k for k, _ in watcher.replies].count("ReceiptFrame") == 2)
            await until(lambda: b.stats.duplicates == 1 and not b._handler_tasks)
            assert clock.wall_ns() == stood_still
            assert (b.stats.received, handled) == (1, ["once"])
            received = [e for e in drain(events) if isinstance(e, MessageReceived)]
            assert [e.message.body for e in received] == ["once"]

    run(scenario)


def test_a_message_a_batch_repeats_is_told_and_handled_once(tmp_path: Path) -> None:
    """The same message several times in one batch, under several seqs: receipted, stored
    once, a duplicate in its later copies, told and handled once. (Copies under one seq are
    a malformed batch since 2026-12-06: the listener rejects that seq, docs/protocol.md 8.2.)"""

    async def scenario() -> None:
        async with watched_pair(tmp_path) as (a, b, net, watcher, _clock):
            events = b.subscribe()
            handled: list[str] = []
            b.on_request(lambda m: handled.append(m.body), direct=True)
            await a.send("B", "first", timeout_s=PATIENCE_S)
            (sent,) = [decode(data, max_bytes=MAX_FRAME) for frm, to, data in net.log
                       if (frm, to) == ("A", "B")
                       and isinstance(decode(data, max_bytes=MAX_FRAME), Batch)]
            assert isinstance(sent, Batch)
            (m,) = sent.messages
            again = [msgspec.structs.replace(m, seq=m.seq + k) for k in (1, 5)]
            repeated = msgspec.structs.replace(sent, messages=[m, *again])
            await until(lambda: handled == ["first"])
            # The batch's copies were all stored before: every copy is a duplicate.
            net.nodes["B"]._inbound(b"A", encode(repeated))
            await until(lambda: b.stats.duplicates == 3 and not b._handler_tasks)
            # A new message under two seqs: new in its first copy only; the copies that
            # share one seq are refused, that seq rejected, the rest stored as usual.
            new = msgspec.structs.replace(m, id="fresh-id-1", body="second", seq=m.seq + 2)
            under_one = msgspec.structs.replace(new, seq=m.seq + 6)
            twice = msgspec.structs.replace(
                sent, messages=[new, msgspec.structs.replace(new, seq=m.seq + 3), under_one,
                                under_one])
            net.nodes["B"]._inbound(b"A", encode(twice))
            await until(lambda: [k for k, _ in watcher.replies].count("ReceiptFrame") == 3)
            await until(lambda: b.stats.duplicates == 4 and not b._handler_tasks)
            assert [k for k, _ in watcher.replies].count("Reject") == 1
            assert b.stats.violations == 1
            assert (b.stats.received, handled) == (2, ["first", "second"])
            received = [e for e in drain(events) if isinstance(e, MessageReceived)]
            assert [e.message.body for e in received] == ["first", "second"]
            with StoreReader.for_data_dir(b.config.data_dir) as reader:
                assert [m.body for m in reader.history(direction="in")] == ["first", "second"]

    run(scenario)


class PauseCounter(MemoryTransport):
    """B's transport, counting how often the node paused and resumed its inbound frames."""

    pauses = 0
    resumes = 0

    def pause_inbound(self) -> None:
        self.pauses += 1
        super().pause_inbound()

    def resume_inbound(self) -> None:
        self.resumes += 1
        super().resume_inbound()


def test_a_full_writer_pauses_inbound_frames_until_it_has_room(tmp_path: Path) -> None:
    async def scenario() -> None:
        net, clock = MemoryNetwork(), FakeClock()
        counter = PauseCounter(net, "B")
        net.nodes["B"] = counter
        a = Node(config("A", "B", tmp_path), clock=clock, transport=net.transport("A"))
        b = Node(config("B", "A", tmp_path), clock=clock, transport=counter)
        async with a, b:
            await until(lambda: all(p.connected for p in a.peers()))
            resumed_at_start = counter.resumes
            assert b._writer is not None
            b._writer._room.clear()  # as if its pending batch were full
            await a.send("B", "while full", timeout_s=PATIENCE_S)
            assert counter.pauses == 1
            await until(lambda: counter.resumes == resumed_at_start + 1)
            assert not counter.inbound_paused
            assert not [t for t in b._tasks if t.get_name().endswith("-inbound-room")]
            await a.send("B", "with room", timeout_s=PATIENCE_S)
            assert counter.pauses == 1
            assert b.stats.received == 2

    run(scenario)

"""The patterns through a pair of nodes (in-memory transport, real stores): a headed message
is stored once on each side with its header, retransmitted with it, and readers see its kind
and ref; a header the rules refuse never leaves the node; request/reply (node/requests.py),
work queues (node/workqueue.py), broadcasts k/n (node/groups.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from pathlib import Path

import pytest
from tests.unit.node.support import PATIENCE_S, config, connected, node_pair, run, until

from meshpost.clock import FakeClock
from meshpost.errors import InvalidMessage, InvalidPrefetch, NoRecipients, RequestTimeout
from meshpost.node import BroadcastProgress, Message, Node, wait_receipt
from meshpost.protocol import Batch, Envelope, decode
from meshpost.protocol.groups import MemberRecord
from meshpost.protocol.header import Kind, PatternHeader, reply_id, result_id
from meshpost.protocol.workqueue import MAX_PREFETCH, WorkerStatus
from meshpost.store import StoredMessage, StoreReader
from meshpost.transport import MemoryNetwork

REPLY = PatternHeader(Kind.REPLY, "0000000000000001-request")


def test_a_headed_message_round_trips_and_is_stored_once_on_each_side(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with node_pair(tmp_path) as (a, b, net, clock):
            stream = b.messages()
            first = asyncio.ensure_future(anext(stream))
            await asyncio.sleep(0.05)
            # Lost once, then retransmitted: the copy that arrives still carries its header.
            net.partition("A", "B")
            (handle,) = await a.post("B", "the answer", header=REPLY)
            await until(lambda: a.snapshot_stats().dropped_sends >= 1)
            net.heal("A", "B")
            clock.advance(a.config.retransmit_initial_s * 2)
            a.poll_timers()
            await wait_receipt(handle, PATIENCE_S)
            got: Message = await asyncio.wait_for(first, PATIENCE_S)
            assert (got.id, got.body, got.kind, got.ref) == (handle.id, "the answer", "reply",
                                                              REPLY.ref)
            await stream.aclose()
            sent = [decode(data, max_bytes=1 << 24) for frm, _to, data in net.log if frm == "A"]
            headers = [m.header for f in sent if isinstance(f, Batch) for m in f.messages]
            assert headers and set(headers) == {REPLY}
            await a.flush()
            await b.flush()
        for node, direction in ((a, "out"), (b, "in")):
            with StoreReader.for_data_dir(node.config.data_dir) as reader:
                rows = reader.history()
            assert [(r.id, r.direction, r.kind, r.ref) for r in rows] == [
                (handle.id, direction, "reply", REPLY.ref)]

    run(scenario)


def test_a_header_the_rules_refuse_is_not_posted(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with node_pair(tmp_path, connect=False) as (a, _b, _net, _clock):
            with pytest.raises(InvalidMessage, match="ref"):
                await a.post("B", "x", header=PatternHeader(Kind.REPLY))
            with StoreReader.for_data_dir(a.config.data_dir) as reader:
                assert reader.history() == []

    run(scenario)


def test_a_request_returns_its_reply_linked_to_it_on_both_sides(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with node_pair(tmp_path) as (a, b, _net, _clock):
            b.on_request(lambda m: m.body.upper())
            reply = await a.request("B", "hello", timeout_s=PATIENCE_S)
            assert (reply.body, reply.sender) == ("HELLO", "B")
            assert reply.id == reply_id(reply.request_id)
            # Answering again (a handler run twice) stores nothing more.
            [request] = [m for m in b_history(b) if m.kind == "request"]
            assert await b.reply(_as_message(request), "again") is None
            await a.flush()
            await b.flush()
        for node in (a, b):
            rows = b_history(node)
            assert sorted((r.kind or "", r.ref or "", r.body) for r in rows) == [
                ("reply", reply.request_id, "HELLO"), ("request", "", "hello")]

    run(scenario)


def test_a_timeout_says_whether_the_request_was_delivered(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with node_pair(tmp_path) as (a, b, net, clock):
            # No handler at B: delivered (receipted) but unanswered.
            with pytest.raises(RequestTimeout) as unanswered:
                await a.request("B", "anyone?", timeout_s=0.3)
            assert unanswered.value.outcome == "delivered-unanswered"
            # Partitioned: not delivered.
            net.partition("A", "B")
            with pytest.raises(RequestTimeout) as lost:
                await a.request("B", "hello?", timeout_s=0.3)
            assert lost.value.outcome == "not-delivered"
            net.heal("A", "B")
            # A handler registered now answers both stored-but-unanswered requests; the late
            # replies are stored and linked.
            b.on_request(lambda m: f"re: {m.body}")
            clock.advance(a.config.retransmit_initial_s * 2)
            a.poll_timers()
            await until(lambda: len([r for r in b_history(a) if r.kind == "reply"]) == 2)
            rows = b_history(a)
            requests = {r.id: r.body for r in rows if r.kind == "request"}
            links = {requests[r.ref]: r.body for r in rows if r.kind == "reply" and r.ref}
            assert links == {"anyone?": "re: anyone?", "hello?": "re: hello?"}

    run(scenario)


def b_history(node: Node) -> list[StoredMessage]:
    with StoreReader.for_data_dir(node.config.data_dir) as reader:
        return reader.history()


def _as_message(row: StoredMessage) -> Message:
    return Message(row.id, row.sender, row.recipient, row.body, row.sent_at_ns, row.hlc,
                   row.stored_at_ns, row.kind, row.ref)


def test_tasks_go_to_the_worker_and_each_result_is_kept_once_at_the_sink(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        async with node_pair(tmp_path) as (a, b, _net, _clock):
            await until(lambda: connected(b))  # node_pair waited for A's side
            await b.serve_queue("upper", str.upper)
            await until(lambda: "B" in a._queues.workers_of.get("upper", {}))
            bodies = [f"task {i}" for i in range(40)]
            assert await a.submit("upper", [], sink="A") == []  # nothing to commit, no wait
            ids = await a.submit("upper", bodies, sink="A", lease_s=60)
            await until(lambda: len(a.completed_tasks) == len(ids))
            assert sorted(t for t, _by in a.completed_tasks) == sorted(ids)
            await a.flush()
            with StoreReader.for_data_dir(a.config.data_dir) as reader:
                results = reader.task_results()
            assert [(t, w, body) for t, w, _m, body in results] == sorted(
                (t, "B", body.upper()) for t, body in zip(ids, bodies, strict=True))
            [status] = await a.queue_status("upper")
            assert status.unfinished == 0
            # The store's counts: every task done here, each result kept here (A is the sink).
            assert (status.done, status.results, status.redelivered) == (40, 40, 0)
            assert [(w.name, w.live, w.in_flight) for w in status.workers] == [("B", True, 0)]

    run(scenario)


def test_an_echo_answers_a_message_to_all_as_it_answers_a_direct_one(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with node_pair(tmp_path) as (a, b, _net, _clock):
            b.on_request(lambda m: m.body, direct=True)
            # To all: one copy to B with header kind group (its logical id as ref).
            (copy,) = await a.post("all", "hola")
            await wait_receipt(copy, PATIENCE_S)
            await until(lambda: any(r.kind == "reply" and r.ref == copy.id
                                    for r in b_history(a)))
            await a.flush()
            await b.flush()
        rows = b_history(a)
        assert sorted((r.kind or "", r.body) for r in rows) == [("group", "hola"),
                                                                 ("reply", "hola")]

    run(scenario)


def test_broadcast_counts_receipts_k_of_n_and_names_the_pending(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with node_pair(tmp_path, groups={"us": ("A",)}) as (a, b, _net, _clock):
            handle = await a.broadcast("all", "to everyone")
            assert handle.status.total == 1 and handle.copies[0].id != handle.logical_id
            status = handle.status
            while not status.settled:
                status = await handle.changed(PATIENCE_S)
            assert (status.delivered, status.pending) == (("B",), ())
            assert a.broadcasts() == []  # settled ones are forgotten (the store keeps them)
            for node in (a, b):  # each copy names its logical message, on both ends
                with StoreReader.for_data_dir(node.config.data_dir) as reader:
                    [row] = reader.history()
                assert (row.kind, row.ref) == ("group", handle.logical_id)
            with pytest.raises(NoRecipients):
                await a.broadcast("us", "nobody else")
            assert await a.post("us", "nobody else") == []  # it used to wait forever

    run(scenario)


class _CountedValues(dict):  # type: ignore[type-arg]
    """A dispatcher table that counts how often the work-queue timer looks at it."""

    looks = 0

    def values(self):  # type: ignore[no-untyped-def,override]
        type(self).looks += 1
        return super().values()


def test_a_node_that_is_no_ventilator_runs_no_work_queue_timer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A host runs hundreds of nodes: one with no queue of its own must not wake twice a
    second to look at no dispatchers; its first `submit` starts the timer."""
    import meshpost.node.workqueue as workqueue

    monkeypatch.setattr(workqueue, "WORKQUEUE_TICK_S", 0.002)

    async def scenario() -> None:
        async with node_pair(tmp_path) as (a, _b, _net, _clock):
            a._queues.dispatchers = _CountedValues()
            a._queues.wakeup.set()  # one turn with the counting table in place
            await asyncio.sleep(0.2)  # 100 ticks of the old timer
            idle_looks = _CountedValues.looks
            assert idle_looks <= 2, "the one turn it was woken for"
            await a.submit("jobs", ["t1"], sink="A")
            await until(lambda: _CountedValues.looks > idle_looks + 5)  # ticking now


def test_a_worker_runs_the_tasks_it_stored_before_a_restart_when_it_serves_again(
    tmp_path: Path,
) -> None:
    """docs/patterns.md 4.6: a worker that comes back runs its stored, unanswered tasks. Here
    the ventilator never sees it go (fake time: no peer timeout, no lease expiry), so no one
    else ever would; before the fix they waited for their lease forever."""

    async def never(_body: str) -> str:
        await asyncio.Event().wait()  # the worker dies with every task in hand
        return "never"

    async def scenario() -> None:
        async with node_pair(tmp_path, connect=False, start_b=False) as (a, b, net, clock):
            async with b:
                await until(lambda: connected(a) and connected(b))
                await b.serve_queue("upper", never)
                await until(lambda: "B" in a._queues.workers_of.get("upper", {}))
                bodies = [f"task {i}" for i in range(5)]
                ids = await a.submit("upper", bodies, sink="A", lease_s=3600)
                await until(lambda: len([r for r in b_history(b) if r.kind == "task"]) == 5)
            b = Node(config("B", "A", tmp_path), clock=clock, transport=net.transport("B"))
            async with b:
                await b.serve_queue("upper", str.upper)
                await until(lambda: len(a.completed_tasks) == len(ids))
                await a.flush()
            with StoreReader.for_data_dir(a.config.data_dir) as reader:
                results = reader.task_results()
            assert [(t, w, body) for t, w, _m, body in results] == sorted(
                (t, "B", body.upper()) for t, body in zip(ids, bodies, strict=True))

    run(scenario)


def test_a_task_message_reported_new_twice_runs_once_and_posts_one_result(
    tmp_path: Path,
) -> None:
    """Both runs used to pass the "result already posted?" check before either claimed the
    result id, so the handler ran twice and the second insert of the same result id failed
    the worker's writer, which then retried that batch forever."""
    calls: list[str] = []

    def upper(body: str) -> str:
        calls.append(body)
        return body.upper()

    async def scenario() -> None:
        async with node_pair(tmp_path) as (a, b, _net, _clock):
            await until(lambda: connected(b))
            await b.serve_queue("upper", upper)
            task = Envelope("a-task-message", 1, "A", "B", "hola", 1, 1,
                            PatternHeader(Kind.TASK, "task-1", "upper", "A", 60_000, 1))
            b._queues.on_stored(task)
            b._queues.on_stored(task)
            await until(lambda: any(r.kind == "result" for r in b_history(a)))
            await b.flush()
            await a.flush()
            assert calls == ["hola"] and b.failure is None
            results = [r for r in b_history(a) if r.kind == "result"]
            assert [(r.id, r.body, r.ref) for r in results] == [
                (result_id(task.id), "HOLA", "task-1")]

    run(scenario)


def test_a_ventilator_restarted_goes_on_with_its_unfinished_tasks_only(tmp_path: Path) -> None:
    """Issue 18: after the ventilator restarts, its dispatcher comes back from its `tasks`
    rows: the unfinished task held by a worker that went away is redelivered after its
    lease, the finished one is not sent again, and each is completed once."""
    async def scenario() -> None:
        net, clock = MemoryNetwork(), FakeClock()
        a_config, b_config = config("A", "B", tmp_path), config("B", "A", tmp_path)
        gate = asyncio.Event()

        async def slow_unless_quick(body: str) -> str:
            if body != "quick":
                await gate.wait()  # never set: B goes away with these in hand
            return body.upper()

        a = Node(a_config, clock=clock, transport=net.transport("A"))
        b = Node(b_config, clock=clock, transport=net.transport("B"))
        async with a, b:
            await until(lambda: connected(a) and connected(b))
            await b.serve_queue("work", slow_unless_quick)
            await until(lambda: a.queue_workers("work") == ["B"])
            quick, slow = await a.submit("work", ["quick", "slow"], sink="A", lease_s=2.0)
            await until(lambda: a.completed_tasks == [(quick, "B")])
            await until(lambda: len([r for r in b_history(b) if r.kind == "task"]) == 2)
        # Both went down; A comes back first (B, its only worker, is not live yet). B, back,
        # runs the task it stored again (node/workqueue.py) but stalls on it: only the lease
        # gets it done.
        ran: list[str] = []

        async def upper(body: str) -> str:
            ran.append(body)
            if len(ran) == 1:
                await gate.wait()
            return body.upper()

        a = Node(a_config, clock=clock, transport=net.transport("A"))
        b = Node(b_config, clock=clock, transport=net.transport("B"))
        async with a:
            [status] = await a.queue_status("work")
            assert (status.in_flight, status.done, status.workers) == (
                1, 1, (WorkerStatus("B", False, False, 1),))
            async with b:
                await b.serve_queue("work", upper)
                await until(lambda: connected(a) and connected(b))
                # The restored lease (2 s from A's start, as the task message said) runs out:
                # the task goes to B again, as attempt 2.
                clock.advance(3.0)
                await until(lambda: a.completed_tasks == [(slow, "B")])
                [status] = await a.queue_status("work")
                assert (status.unfinished, status.done, status.redelivered) == (0, 2, 1)
                await a.flush()
        assert ran == ["slow", "slow"]  # the finished task was not sent again
        with StoreReader.for_data_dir(a_config.data_dir) as reader:
            assert sorted((t, w, body) for t, w, _m, body in reader.task_results()) == sorted(
                [(quick, "B", "QUICK"), (slow, "B", "SLOW")])

    run(scenario)


def test_a_restored_task_message_delivered_late_is_leased_from_its_receipt(
    tmp_path: Path,
) -> None:
    """A task message that had not reached its worker when the ventilator stopped is sent
    again after the restart: its lease runs from the worker's receipt, not from the restart
    (time in the outbox is not the worker's)."""
    async def scenario() -> None:
        net, clock = MemoryNetwork(), FakeClock()
        a_config, b_config = config("A", "B", tmp_path), config("B", "A", tmp_path)
        gate = asyncio.Event()

        async def stall(body: str) -> str:
            await gate.wait()  # never set: only the lease would take the task back
            return body

        a = Node(a_config, clock=clock, transport=net.transport("A"))
        b = Node(b_config, clock=clock, transport=net.transport("B"))
        async with a, b:
            await until(lambda: connected(a) and connected(b))
            await b.serve_queue("work", stall)
            await until(lambda: a.queue_workers("work") == ["B"])
            net.partition("A", "B")  # the task message stays in A's outbox
            await a.submit("work", ["slow"], sink="A", lease_s=2.0)
            [status] = await a.queue_status("work")
            assert (status.in_flight, status.leased) == (1, 0)
        net.heal("A", "B")
        a = Node(a_config, clock=clock, transport=net.transport("A"))
        b = Node(b_config, clock=clock, transport=net.transport("B"))
        async with a:
            clock.advance(1.5)  # most of the lease goes by before B is back
            async with b:
                await b.serve_queue("work", stall)
                await until(lambda: connected(a) and connected(b))
                await until(lambda: any(r.kind == "task" for r in b_history(b)))

                async def leased() -> int:
                    [status] = await a.queue_status("work")
                    return status.leased

                deadline = asyncio.get_running_loop().time() + PATIENCE_S
                while await leased() != 1:
                    assert asyncio.get_running_loop().time() < deadline, "never leased"
                    await asyncio.sleep(0.01)
                received_at = clock.monotonic()
                # The lease runs 2 s from the receipt (not 0.5 s more from the restart).
                assert a._queues.dispatchers["work"].next_timer() == received_at + 2.0
                assert a.completed_tasks == []

    run(scenario)


def test_a_restored_task_message_its_worker_rejects_is_abandoned_not_leased_again(
    tmp_path: Path,
) -> None:
    """A task message still in the outbox when the ventilator stopped, which the worker's node
    rejects after the restart, is abandoned as a fresh dispatch's rejection is (before, it
    stayed in flight until its lease ran out and was then sent again)."""
    async def scenario() -> None:
        net, clock = MemoryNetwork(), FakeClock()
        a_config, b_config = config("A", "B", tmp_path), config("B", "A", tmp_path)
        a = Node(a_config, clock=clock, transport=net.transport("A"))
        b = Node(b_config, clock=clock, transport=net.transport("B"))
        async with a, b:
            await until(lambda: connected(a) and connected(b))
            await b.serve_queue("work", str.upper)
            await until(lambda: a.queue_workers("work") == ["B"])
            net.partition("A", "B")  # the task message stays in A's outbox
            [task_id] = await a.submit("work", ["larger than B takes"], sink="A",
                                       lease_s=3600)
        net.heal("A", "B")
        a = Node(a_config, clock=clock, transport=net.transport("A"))
        # B comes back taking messages of 8 bytes at most: it rejects the task (too large).
        b = Node(dataclasses.replace(b_config, max_message_bytes=8), clock=clock,
                 transport=net.transport("B"))
        async with a, b:
            await b.serve_queue("work", str.upper)

            async def abandoned() -> bool:
                [status] = await a.queue_status("work")
                return (status.abandoned, status.in_flight) == (1, 0)

            deadline = asyncio.get_running_loop().time() + PATIENCE_S
            while not await abandoned():
                assert asyncio.get_running_loop().time() < deadline, "never abandoned"
                clock.advance(0.2)  # redials; nothing near the lease
                await asyncio.sleep(0.01)
            assert a.stats.rejected == 1 and a.completed_tasks == []
            await a.flush()
        with StoreReader.for_data_dir(a_config.data_dir) as reader:
            [task] = [r for r in reader.history() if r.kind == "task"]
            assert (task.ref, task.state) == (task_id, "rejected")
            assert reader._conn.execute("SELECT state, attempts FROM tasks").fetchall() == [
                ("abandoned", 1)]

    run(scenario)


def test_a_broadcast_sent_before_a_restart_counts_on_from_the_store(tmp_path: Path) -> None:
    """Issue 18: k/n after the sender restarts comes from its copies and receipts: the handle
    (`broadcast_handle`) and the console's event follow the receipt that comes later."""
    async def scenario() -> None:
        net, clock = MemoryNetwork(), FakeClock()
        a_config, b_config = config("A", "B", tmp_path), config("B", "A", tmp_path)
        a = Node(a_config, clock=clock, transport=net.transport("A"))
        async with a:  # B is down: its copy waits in the outbox
            handle = await a.broadcast("all", "while B sleeps")
            assert handle.status.pending == ("B",)
        a = Node(a_config, clock=clock, transport=net.transport("A"))
        async with a:
            events = a.subscribe()
            restored = await a.broadcast_handle(handle.logical_id)
            assert restored is not None
            assert (restored.status.total, restored.status.pending) == (1, ("B",))
            assert [s.logical_id for s in a.broadcasts()] == [handle.logical_id]
            async with Node(b_config, clock=clock, transport=net.transport("B")):
                status = await restored.changed(PATIENCE_S)
                assert (status.delivered, status.pending) == (("B",), ())
                event = await asyncio.wait_for(events.get(), PATIENCE_S)
                while not isinstance(event, BroadcastProgress):
                    event = await asyncio.wait_for(events.get(), PATIENCE_S)
                assert event.status == status
                await a.flush()
                # Settled: read from the store, as any later `broadcast-status` is.
                settled = await a.broadcast_handle(handle.logical_id)
                assert settled is not None and settled.status == status
                assert await a.broadcast_handle("no-such-id") is None

    run(scenario)


def test_a_task_id_tells_a_worker_nothing_of_the_other_tasks_ids(tmp_path: Path) -> None:
    """Found by the adversarial audit: the tasks of one `submit` got consecutive ids (one
    random start, counting up), while a sink keeps the first result stored under a task id
    and a ventilator finishes a task at a `done`, whoever sends them. A worker handed one
    task could name every other task of the run and answer (or finish) them first."""
    async def scenario() -> None:
        async with node_pair(tmp_path) as (a, _b, _net, _clock):
            ids = await a.submit("jobs", [f"task {i}" for i in range(64)], sink="A")
            tails = sorted(int(task_id[12:], 16) for task_id in ids)
            closest = min(later - earlier for earlier, later in itertools.pairwise(tails))
            # 64 random 64-bit values: two within 2**32 of each other has odds ~2**-21.
            assert closest > 2**32, f"task ids {closest} apart: the others can be guessed"

    run(scenario)


def test_a_send_to_all_or_a_group_reads_that_group_only_however_many_a_peer_named(
    tmp_path: Path,
) -> None:
    """B (a peer: records are their senders' own) named 2,000 groups. A send to `all` or to
    one group reads that group's members, not a table of every group: before, each such
    send built the whole table, group by group over every record (groups x records steps:
    10,000 records stalled the node 8 s at each send)."""
    async def scenario() -> None:
        async with node_pair(tmp_path) as (a, _b, _net, _clock):
            membership = a._groups.membership
            for i in range(2_000):
                membership.merge(MemberRecord(f"g{i}", "B", True, 1, 1), sender="B")
            calls: list[str] = []
            members = membership.members

            def counted(group: str) -> list[str]:
                calls.append(group)
                return members(group)

            membership.members = counted  # type: ignore[method-assign]
            assert a.resolve("g7") == ["B"]
            assert a.resolve("all") == ["B"]
            (copy,) = await a.post("g1999", "to one group of many")
            await asyncio.wait_for(copy.receipt, PATIENCE_S)
            assert set(calls) == {"g7", "g1999"}, len(calls)  # (g1999: once per resolve)
            assert len(a.groups()) == 2_000  # the whole table, when asked for it

    run(scenario)


def test_a_fresh_task_message_starts_its_lease_at_the_receipt_and_its_rejection_is_seen(
    tmp_path: Path,
) -> None:
    """The ventilator holds a fresh task message's receipt future until it is settled:
    before, nothing held it (a weak reference), so the worker's receipt never started the
    lease (`leased` stayed 0) and a rejection was never seen (the task stayed in flight
    until its lease ran out)."""
    async def scenario() -> None:
        net, clock = MemoryNetwork(), FakeClock()
        a = Node(config("A", "B", tmp_path), clock=clock, transport=net.transport("A"))
        # B takes messages of 8 bytes at most: it rejects the large task (too large).
        b = Node(dataclasses.replace(config("B", "A", tmp_path), max_message_bytes=8),
                 clock=clock, transport=net.transport("B"))
        held = asyncio.Event()

        async def hold(body: str) -> str:
            await held.wait()
            return body

        async with a, b:
            await until(lambda: connected(a) and connected(b))
            await b.serve_queue("work", hold)
            await until(lambda: a.queue_workers("work") == ["B"])
            await a.submit("work", ["small"], sink="A", lease_s=3600)

            async def status() -> tuple[int, int, int]:
                [s] = await a.queue_status("work")
                return s.in_flight, s.leased, s.abandoned

            async with asyncio.timeout(PATIENCE_S):
                while await status() != (1, 1, 0):
                    await asyncio.sleep(0.01)
            await a.submit("work", ["larger than B takes"], sink="A", lease_s=3600)
            async with asyncio.timeout(PATIENCE_S):
                while await status() != (1, 1, 1):  # B, the only worker, refused it
                    await asyncio.sleep(0.01)
            held.set()

    run(scenario)


def test_a_worker_is_given_at_most_the_prefetch_it_announces(tmp_path: Path) -> None:
    """B serves with max_inflight=3: its `serve` record says so, and A gives it 3 tasks of
    10 while it holds them (A's default would have given 10, up to 16). A record announcing
    more than MAX_PREFETCH is honoured as MAX_PREFETCH, counted and stored as announced."""
    async def scenario() -> None:
        async with node_pair(tmp_path) as (a, b, _net, _clock):
            await until(lambda: connected(b))
            gate = asyncio.Event()

            async def held(body: str) -> str:
                await gate.wait()
                return body.upper()

            await b.serve_queue("work", held, max_inflight=3)
            await until(lambda: "B" in a._queues.workers_of.get("work", {}))
            ids = await a.submit("work", [f"t{i}" for i in range(10)], sink="A", lease_s=60)
            [status] = await a.queue_status("work")
            assert [(w.name, w.in_flight, w.prefetch) for w in status.workers] == [
                ("B", 3, 3)]
            assert status.waiting == 7
            [own] = await b.queue_status("work")
            assert [(w.name, w.prefetch) for w in own.workers] == [("B", 3)]
            gate.set()
            await until(lambda: len(a.completed_tasks) == len(ids))

            # A hand-made record beyond the cap: clamped, counted, kept as announced.
            await b._post("A", "serve", held=False, header=PatternHeader(
                Kind.SERVE, "", "work", version=b.hlc.now(), prefetch=10**12))
            await until(lambda: a.snapshot_stats().prefetch_clamped == 1)
            [status] = await a.queue_status("work")
            assert [(w.name, w.prefetch) for w in status.workers] == [("B", MAX_PREFETCH)]
            await a.flush()
            assert ("work", "B", True, status_version(a), 10**12) in \
                await a._writer.call(a._store.members, "queue")  # type: ignore[union-attr]

    run(scenario)


def status_version(node: Node) -> int:
    """The version of B's latest `serve` record for `work` as `node` holds it."""
    return node._queues.workers_of["work"]["B"].version


def test_serve_queue_refuses_a_prefetch_out_of_range(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with node_pair(tmp_path) as (_a, b, _net, _clock):
            for bad in (0, -1, MAX_PREFETCH + 1):
                with pytest.raises(InvalidPrefetch, match="not a prefetch"):
                    await b.serve_queue("work", str.upper, max_inflight=bad)
            assert "work" not in b._queues.serving

    run(scenario)

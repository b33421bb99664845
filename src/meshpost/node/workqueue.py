"""Work queues (docs/protocol.md 19.4): ventilator, worker and sink roles of one node.

Rule: this component owns the dispatchers (sans-IO, protocol.workqueue), the queues served
here, the result sink and the workers each queue has; it stores and posts through its node.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import inspect
import logging
from typing import TYPE_CHECKING, NamedTuple

import meshpost.rules as rules
from meshpost.errors import InvalidMessage, MeshpostError, MessageRejected
from meshpost.node.records import CrashPoint, Receipt, TaskHandler
from meshpost.protocol import Envelope
from meshpost.protocol.header import Kind, PatternHeader, is_valid_name, result_id
from meshpost.protocol.ratelimit import (
    INPUT_WARNINGS_BURST,
    INPUT_WARNINGS_PER_S,
    Allowed,
    RateLimiter,
)
from meshpost.protocol.workqueue import (
    DEFAULT_MAX_INFLIGHT,
    MAX_PREFETCH,
    CompletionRefused,
    DispatchTask,
    QueueStatus,
    ResultSink,
    TaskAbandoned,
    TaskCompleted,
    TaskRecord,
    TaskRedelivered,
    WorkerStatus,
    WorkQueueDispatcher,
    check_lease,
    check_prefetch,
    honoured_prefetch,
)
from meshpost.store import NewTask, QueueCounts
from meshpost.store.patterns import OwedDone

if TYPE_CHECKING:
    from collections.abc import Awaitable, Iterable, Mapping, Sequence

    from meshpost.node.core import Node

log = logging.getLogger(__name__)

#: A task's lease unless the ventilator says otherwise (docs/protocol.md 19.4).
DEFAULT_LEASE_S = 30.0
#: The work-queue timer wakes at least this often (leases are checked in between too).
WORKQUEUE_TICK_S = 0.5
#: Stored, unanswered tasks read per query when a worker serves a queue again.
STORED_TASKS_BATCH = 500


class ServeRecord(NamedTuple):
    """A worker's latest `serve` record for one queue: its `version`, whether it says it
    `serving`, and the `prefetch` it announced (None: none stated; as sent, the dispatcher
    caps it)."""

    version: int
    serving: bool
    prefetch: int | None = None


class WorkQueues:
    """A node's work queues: `submit` (ventilator), `serve_queue` (worker), results (sink)."""

    def __init__(self, node: Node) -> None:
        self._node = node
        # As a ventilator, one dispatcher per queue; as a worker, a handler per queue; as a
        # sink, the first result per task; everywhere, the workers each queue has (their
        # latest `serve` record: version, serving, prefetch).
        self.dispatchers: dict[str, WorkQueueDispatcher] = {}
        self.workers_of: dict[str, dict[str, ServeRecord]] = {}
        #: Per queue served here: its handler, the room of its tasks run at once, and that
        #: number (the prefetch its `serve` record announces).
        self.serving: dict[str, tuple[TaskHandler, asyncio.Semaphore, int]] = {}
        #: The threads of each served queue's blocking handler, as many as its tasks in
        #: flight. Not the loop's default executor (`asyncio.to_thread`), which is shared:
        #: by every node of a host process, and by this node's own store reads. A peer's
        #: tasks in a slow handler held all of its threads (min(32, CPUs + 4), 6 on 2 cores,
        #: against 16 tasks in flight), so the control socket of every node of the process
        #: stopped answering, and none could open its store to (re)start, until they ended.
        self._threads: dict[str, concurrent.futures.ThreadPoolExecutor] = {}
        self.sink = ResultSink()
        self.wakeup = asyncio.Event()
        #: Completed tasks as (task id, worker), in order (ventilator).
        self.completed_tasks: list[tuple[str, str | None]] = []
        self._replying: set[str] = set()
        # As a worker after a restart, the `done`s owed (`_pay_owed_dones`): per task, the
        # one owed (taken out by whoever sends it: one per task), and the results still
        # waiting for their sink's receipt by (sink, seq). Until the start's query has
        # answered, deliveries and rejections are kept (`_early`) and replayed after it.
        self._owed: dict[str, OwedDone] = {}
        self._owed_seqs: dict[tuple[str, int], str] = {}
        self._early: list[tuple[str, Sequence[int], bool]] | None = []
        #: Warnings of completions refused, paced per peer: a flood of them is counted
        #: (`completions_refused`), not logged line by line.
        self._refused_warnings = RateLimiter(rate_per_s=INPUT_WARNINGS_PER_S,
                                             burst=INPUT_WARNINGS_BURST)
        #: Warnings of prefetches clamped (a peer announcing more than MAX_PREFETCH), paced
        #: per peer the same way (`prefetch_clamped` counts each record).
        self._prefetch_warnings = RateLimiter(rate_per_s=INPUT_WARNINGS_PER_S,
                                              burst=INPUT_WARNINGS_BURST)

    def restore(self, results: Iterable[tuple[str, str, str]],
                members: Iterable[tuple[str, str, bool, int, int | None]]) -> None:
        """At start: the results stored (sink) and every worker's latest `serve` record
        (with the prefetch it announced: a ventilator's restart keeps it)."""
        self.sink = ResultSink(results)
        for queue, member, joined, version, prefetch in members:
            self.workers_of.setdefault(queue, {})[member] = ServeRecord(version, joined,
                                                                        prefetch)

    async def serve_queue(self, queue: str, handler: TaskHandler, *,
                          max_inflight: int = DEFAULT_MAX_INFLIGHT) -> None:
        node = self._node
        node._check_open()
        if not is_valid_name(queue):
            raise InvalidMessage(f"{queue!r} is not a queue name (1-63 of A-Z a-z 0-9 _ . -)")
        # The number this worker runs at once is the prefetch it announces: a ventilator
        # gives it at most that many unfinished tasks (docs/protocol.md 19.4).
        max_inflight = check_prefetch(max_inflight)
        self.serving[queue] = (handler, asyncio.Semaphore(max_inflight), max_inflight)
        old = self._threads.pop(queue, None)
        if old is not None:
            old.shutdown(wait=False)
        self._threads[queue] = concurrent.futures.ThreadPoolExecutor(
            max_workers=max_inflight, thread_name_prefix=f"meshpost-{node.name}-{queue}")
        node._spawn_handler(self._run_stored_tasks(queue), "stored-tasks")
        header = PatternHeader(Kind.SERVE, "", queue, version=node.hlc.now(),
                               prefetch=max_inflight)
        if node._links:
            await node._post("all", "serve", held=False, header=header)

    async def _run_stored_tasks(self, queue: str) -> None:
        """Run again the tasks of `queue` stored here and never answered: those in hand when
        this node died, and those that came before it served the queue (docs/patterns.md
        4.6). A ventilator that saw no loss leaves them with this worker until their lease."""
        node = self._node
        writer, store = node._writer, node._store
        assert writer is not None
        assert store is not None
        after = 0
        while found := await writer.call(store.unanswered_incoming_tasks, queue, after,
                                         STORED_TASKS_BATCH):
            for after, envelope in found:  # noqa: B007 - `after` pages the next query
                node._spawn_handler(self._work(envelope), "task")

    async def submit(self, queue: str, bodies: Sequence[str], *, sink: str,
                     lease_s: float = DEFAULT_LEASE_S) -> list[str]:
        node = self._node
        node._check_open()
        lease_s = check_lease(lease_s)
        rules.resolve_peer(sink, peers=node.config.peer_names) if sink != node.name else None
        if not is_valid_name(queue):
            raise InvalidMessage(f"{queue!r} is not a queue name (1-63 of A-Z a-z 0-9 _ . -)")
        for body in bodies:
            node.validate_body(body)
        if not bodies:
            return []  # an empty batch item would never be committed, nor answered
        dispatcher = self._dispatcher(queue, lease_s)
        writer = node._writer
        assert writer is not None
        await writer.wait_for_room()
        node._check_open()
        wall = node.clock.wall_ns()
        # Each task id random on its own, not a run counting up from one random start
        # (`_new_id.many`): a task id is a key across peers (a sink keeps the first result
        # under it, a ventilator finishes it at a `done`, from whoever sends them), and a
        # worker handed one task of a run could name all the others and answer them first.
        new_id = node._new_id
        ids = [new_id(wall) for _ in bodies]
        # Every task of this call, and of the calls that come while the writer is busy, in
        # one transaction of the writer's batch (one commit per task was the ventilator's
        # whole cost: ~4.4 ms CPU a task in `bench work-queue`).
        stored: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def failed(error: BaseException) -> None:
            if not stored.done():
                stored.set_exception(node.failure or error)

        writer.add_tasks([NewTask(task_id, queue, body, sink, wall)
                          for task_id, body in zip(ids, bodies, strict=True)],
                         lambda: None if stored.done() else stored.set_result(None), failed)
        await stored
        now = node.clock.monotonic()
        for task_id, body in zip(ids, bodies, strict=True):
            dispatcher.submit(task_id, body, sink, now)
        self.wakeup.set()
        return ids

    def workers(self, queue: str) -> list[str]:
        links = self._node._links
        return sorted(w for w, record in self.workers_of.get(queue, {}).items()
                      if record.serving and w in links and links[w].reachable)

    def queues(self) -> list[str]:
        """Every queue this node knows: submitted to, served here, or served by a peer."""
        return sorted({*self.dispatchers, *self.serving, *self.workers_of})

    def status(self, queue: str, counts: QueueCounts | None = None) -> QueueStatus:
        """`queue` as this node sees it: its dispatcher's memory (waiting, in flight, leased,
        per worker) with the store's `counts` (done, abandoned, redelivered, results)."""
        node = self._node
        links = node._links
        dispatcher = self.dispatchers.get(queue)
        known = {w.name: w for w in dispatcher.workers()} if dispatcher is not None else {}
        for worker, record in self.workers_of.get(queue, {}).items():
            if record.serving and worker not in known and worker != node.name:
                link = links.get(worker)
                known[worker] = WorkerStatus(worker, link is not None and link.reachable,
                                             prefetch=honoured_prefetch(record.prefetch))
        if queue in self.serving:
            known[node.name] = WorkerStatus(node.name, True,
                                            prefetch=self.serving[queue][2])
        c = counts or QueueCounts()
        if dispatcher is None:
            return QueueStatus(queue, tuple(known[w] for w in sorted(known)), done=c.done,
                               abandoned=c.abandoned, redelivered=c.redelivered,
                               results=c.results)
        waiting = len(dispatcher.waiting())
        return QueueStatus(queue, tuple(known[w] for w in sorted(known)), waiting=waiting,
                           in_flight=len(dispatcher) - waiting, leased=dispatcher.leased(),
                           done=c.done, abandoned=c.abandoned, redelivered=c.redelivered,
                           results=c.results)

    def restore_dispatchers(
        self, unfinished: Mapping[str, tuple[float | None, list[TaskRecord]]]
    ) -> None:
        """At start (ventilator): one dispatcher per queue with unfinished tasks, from the
        store's `tasks` rows and each queue's lease; the workers holding tasks are known but
        not live until their link is up (`peer_event`)."""
        now = self._node.clock.monotonic()
        for queue, (lease_s, records) in unfinished.items():
            dispatcher = self.dispatchers[queue] = WorkQueueDispatcher.restore(
                queue, records, now, lease_s=lease_s or DEFAULT_LEASE_S,
                ventilator=self._node.name)
            # Every worker whose latest record says it serves: known (with the prefetch
            # it announced), live once its link is up (`peer_event`).
            for worker, record in self.workers_of.get(queue, {}).items():
                if record.serving:
                    dispatcher.worker_known(worker, record.prefetch)
            log.info("[%s] queue %s: %d unfinished task(s) restored", self._node.name, queue,
                     len(records))

    @property
    def follows_seqs(self) -> bool:
        """Whether the node must hand this component its recorded deliveries and rejections
        (`receipted`, `refused`): as a ventilator (task messages posted before a restart),
        and as a worker while it owes a `done` for a result not receipted yet."""
        return bool(self.dispatchers) or bool(self._owed_seqs) or self._early is not None

    def receipted(self, peer: str, seqs: Sequence[int]) -> None:
        """`peer` receipted `seqs` (recorded): a task message posted before a restart (no
        one awaits its receipt here) starts its lease now; a result posted before a restart
        makes its `done` due."""
        self._settled(peer, seqs, rejected=False)

    def refused(self, peer: str, seqs: Sequence[int]) -> None:
        """`peer` rejected `seqs` (recorded): a task message posted before a restart is
        abandoned as a fresh dispatch's is (`WorkQueueDispatcher.refused`); a result posted
        before a restart owes no `done` any more."""
        self._settled(peer, seqs, rejected=True)

    def _settled(self, peer: str, seqs: Sequence[int], *, rejected: bool) -> None:
        if self._early is not None:
            self._early.append((peer, seqs, rejected))
        if self._owed_seqs:
            self._owed_settled(peer, seqs, rejected=rejected)
        if self.dispatchers:
            now = self._node.clock.monotonic()
            if rejected:
                changed = [d.refused(peer, seqs, now) for d in self.dispatchers.values()]
            else:
                changed = [d.receipted(peer, seqs, now) for d in self.dispatchers.values()]
            if any(changed):
                self.wakeup.set()

    # -- the `done`s a worker owes after a restart -------------------------------------------

    async def _pay_owed_dones(self) -> None:
        """At start (worker): send the `done` of each task whose result this node sent and
        whose `done` it never stored (it died between the sink's receipt and the `done`'s
        commit), once per task: now if the sink receipted the result, else when it does
        (the outbox resends the result). Without it the ventilator's lease was the only way
        out, and the task ran twice (docs/protocol.md 19.4)."""
        node = self._node
        writer, store = node._writer, node._store
        assert writer is not None
        assert store is not None
        try:
            owed = await writer.call(store.owed_dones)
        finally:
            early, self._early = self._early or [], None
        due: dict[str, OwedDone] = {}
        for o in owed:
            if o.delivered:
                due.setdefault(o.task_id, o)
        for o in owed:
            self._owed.setdefault(o.task_id, o)
            if o.task_id not in due:
                self._owed_seqs[(o.sink, o.seq)] = o.task_id
        if owed:
            log.info("[%s] %d done(s) owed to ventilators from before the restart, %d of them "
                     "due now", node.name, len(self._owed), len(due))
        # What was recorded while the query ran, then what is due now.
        for peer, seqs, rejected in early:
            self._owed_settled(peer, seqs, rejected=rejected)
        for task_id in due:
            await self._pay(task_id)

    def _owed_settled(self, peer: str, seqs: Sequence[int], *, rejected: bool) -> None:
        for seq in seqs:
            task_id = self._owed_seqs.pop((peer, seq), None)
            if task_id is None or task_id not in self._owed:
                continue
            if not rejected:
                self._node._spawn_handler(self._pay(task_id), "owed-done")
            elif task_id not in self._owed_seqs.values():
                # The sink refused every result of this task we had: there is nothing for
                # a `done` to vouch for; the ventilator's lease gives the task to another.
                del self._owed[task_id]

    async def _pay(self, task_id: str) -> None:
        owed = self._owed.pop(task_id, None)
        if owed is None:
            return  # sent already (another result of the task, or the task run again)
        try:
            await self._send_done(owed.ventilator, owed.task_id, owed.queue)
        except MeshpostError as exc:
            if not self._node._closed:
                log.warning("[%s] done of task %s to %s not sent: %s", self._node.name,
                            task_id, owed.ventilator, exc)

    async def _send_done(self, ventilator: str, task_id: str, queue: str) -> None:
        """Tell `ventilator` that `task_id`'s result is durably at its sink (stored and
        retried like any message; a second `done` is a duplicate there)."""
        node = self._node
        node._crash(CrashPoint.AFTER_RESULT_RECEIPT)
        await node._post(ventilator, "done", held=False,
                         header=PatternHeader(Kind.DONE, task_id, queue))

    def _dispatcher(self, queue: str, lease_s: float) -> WorkQueueDispatcher:
        dispatcher = self.dispatchers.get(queue)
        if dispatcher is None:
            dispatcher = self.dispatchers[queue] = WorkQueueDispatcher(
                queue, lease_s=lease_s, ventilator=self._node.name)
            self.wakeup.set()  # the timer runs from now on
            node = self._node
            now = node.clock.monotonic()
            for worker, record in self.workers_of.get(queue, {}).items():
                link = node._links.get(worker)
                if record.serving and link is not None and link.reachable:
                    dispatcher.worker_up(worker, now, record.prefetch)
                elif record.serving:
                    dispatcher.worker_known(worker, record.prefetch)
        return dispatcher

    def on_stored(self, m: Envelope) -> None:
        """A fresh task, result, done or serve message: run it, count it or merge it."""
        node = self._node
        h = m.header
        assert h is not None
        if h.kind is Kind.TASK:
            if h.queue in self.serving:
                node._spawn_handler(self._work(m), "task")
            else:
                log.warning("[%s] task %s from %s for queue %r, which this node does not "
                            "serve: stored, not run", node.name, h.ref, m.sender, h.queue)
        elif h.kind is Kind.RESULT:
            self.sink.offer(h.ref, m.id, m.sender)
            if h.queue in self.dispatchers:  # this ventilator is its own sink
                self.dispatchers[h.queue].completed(h.ref, node.clock.monotonic(),
                                                    by=m.sender)
                self.wakeup.set()
        elif h.kind is Kind.DONE:
            dispatcher = self.dispatchers.get(h.queue)
            if dispatcher is not None:
                dispatcher.completed(h.ref, node.clock.monotonic(), by=m.sender, ack=True)
                self.wakeup.set()
        elif h.kind is Kind.SERVE:
            self._serve_record(m.sender, h.queue,
                               ServeRecord(h.version, m.body == "serve", h.prefetch))

    def _serve_record(self, worker: str, queue: str, record: ServeRecord) -> None:
        """A worker's `serve`/`stop` record: the highest version wins (a stale one changes
        nothing); only the worker speaks for itself (the record's sender). A prefetch above
        MAX_PREFETCH is honoured as MAX_PREFETCH: counted (`prefetch_clamped`) and logged,
        paced per peer."""
        node = self._node
        known = self.workers_of.setdefault(queue, {})
        old = known.get(worker)
        if old is not None and (old.version, not old.serving) >= (record.version,
                                                                  not record.serving):
            return
        # The `members` row was written in the message's own transaction (store: derived
        # writes), so memory and store cannot disagree after a crash.
        known[worker] = record
        if record.serving and record.prefetch is not None and record.prefetch > MAX_PREFETCH:
            self._prefetch_clamped(worker, queue, record.prefetch)
        dispatcher = self.dispatchers.get(queue)
        if dispatcher is not None:
            now = node.clock.monotonic()
            link = node._links.get(worker)
            if record.serving and link is not None and link.reachable:
                dispatcher.worker_up(worker, now, record.prefetch)
            elif record.serving:
                dispatcher.worker_known(worker, record.prefetch)
            else:
                dispatcher.worker_left(worker, now)
            self.wakeup.set()

    def _prefetch_clamped(self, worker: str, queue: str, announced: int) -> None:
        node = self._node
        node.stats.prefetch_clamped += 1
        decision = self._prefetch_warnings.check(worker, node.clock.monotonic())
        if isinstance(decision, Allowed):
            log.warning("[%s] %s serves queue %s announcing a prefetch of %d tasks at once: "
                        "it is given at most %d (MAX_PREFETCH)", node.name, worker, queue,
                        announced, MAX_PREFETCH)
        elif decision.burst_started:
            log.warning("[%s] %s announces prefetches above %d faster than %d at once and %g "
                        "a second: each is clamped and counted (`prefetch_clamped`), logged "
                        "at that rate", node.name, worker, MAX_PREFETCH,
                        INPUT_WARNINGS_BURST, INPUT_WARNINGS_PER_S)

    def peer_event(self, peer: str, up: bool) -> None:
        """`peer` connected (`up`) or left/was lost: its dispatchers learn it."""
        if not self.dispatchers:
            return
        now = self._node.clock.monotonic()
        for queue, dispatcher in self.dispatchers.items():
            if up:
                record = self.workers_of.get(queue, {}).get(peer)
                if record is not None and record.serving:
                    dispatcher.worker_up(peer, now, record.prefetch)
            else:
                dispatcher.worker_lost(peer, now)
        self.wakeup.set()

    async def run(self) -> None:
        """The node's work-queue task: leases, dispatch and completions, on a timer; at
        start, the `done`s owed from before a restart (`_pay_owed_dones`)."""
        self._node._spawn_handler(self._pay_owed_dones(), "owed-dones")
        try:
            await self._tick()
        finally:  # the node closes: no handler starts from now on
            for threads in self._threads.values():
                threads.shutdown(wait=False, cancel_futures=True)

    async def _tick(self) -> None:
        while True:
            if not self.dispatchers:  # not a ventilator (yet): no timer, no wake-ups
                await self.wakeup.wait()
            self.wakeup.clear()
            now = self._node.clock.monotonic()
            due = [d.next_timer() for d in self.dispatchers.values()]
            for dispatcher in self.dispatchers.values():
                dispatcher.on_timer(now)
                for action in dispatcher.actions():
                    self._perform(dispatcher, action)
            # A ventilator keeps its serving workers' links open and watched: a worker lost
            # (silent) gives its tasks back, even while nothing waits for a receipt from it.
            self._node.watch_peers({
                worker for queue in self.dispatchers
                for worker, record in self.workers_of.get(queue, {}).items()
                if record.serving})
            wait = min([WORKQUEUE_TICK_S, *(max(0.0, t - now) for t in due if t is not None)])
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self.wakeup.wait()

    def _perform(self, dispatcher: WorkQueueDispatcher, action: object) -> None:
        node = self._node
        writer, store = node._writer, node._store
        if writer is None or store is None:
            return
        match action:
            case DispatchTask():
                node._spawn_handler(self._dispatch_task(dispatcher, action), "dispatch")
            case TaskCompleted(task_id=task_id, by=by):
                # `tasks.state = 'done'` was written with the `done` (or result) message that
                # completed it, in that message's transaction.
                self.completed_tasks.append((task_id, by))
            case TaskAbandoned(task_id=task_id, attempts=attempts):
                log.warning("[%s] task %s abandoned after %d attempt(s)", node.name,
                            task_id, attempts)
                node._spawn_handler(_ignore_result(writer.call(
                    functools.partial(store.set_task_state, task_id, "abandoned",
                                      at_ns=node.clock.wall_ns()))), "task-abandoned")
            case TaskRedelivered(task_id=task_id, worker=worker, reason=reason):
                log.info("[%s] task %s taken back from %s (%s): redelivering", node.name,
                         task_id, worker, reason.value)
            case CompletionRefused(task_id=task_id, by=by, reason=reason):
                # Its message is stored and receipted; the store's derived write refused it
                # by the same rule (store.patterns: _GIVEN_TO_SENDER).
                node.stats.completions_refused += 1
                decision = self._refused_warnings.check(by, node.clock.monotonic())
                if isinstance(decision, Allowed):
                    log.warning("[%s] %s says task %s of queue %s is finished, but %s: "
                                "ignored", node.name, by, task_id, dispatcher.queue, reason)
                elif decision.burst_started:
                    log.warning("[%s] %s reports tasks finished that it cannot finish faster "
                                "than %d at once and %g a second: each is ignored and counted "
                                "(`completions_refused`), logged at that rate", node.name, by,
                                INPUT_WARNINGS_BURST, INPUT_WARNINGS_PER_S)

    async def _dispatch_task(self, dispatcher: WorkQueueDispatcher, t: DispatchTask) -> None:
        node = self._node
        # The task message's commit also marks the task assigned to this worker, this attempt
        # (store: derived writes): no task message without its state, nor the reverse.
        header = PatternHeader(Kind.TASK, t.task_id, t.queue, t.sink,
                               max(1, int(t.lease_s * 1000)), t.attempt)
        # Not `held`: nothing here keeps the handle once this returns, and a held receipt
        # future nobody holds is forgotten (a weak reference) before its receipt or
        # rejection comes: `settled` never ran, so a fresh dispatch's lease never started at
        # the worker's receipt (`leased` stayed 0) and its rejection was never seen. The node
        # holds it until it is settled.
        (handle,) = await node._post(t.worker, t.body, held=False, header=header)

        def settled(f: asyncio.Future[Receipt]) -> None:
            if f.cancelled():
                return
            now = node.clock.monotonic()
            if f.exception() is None:
                dispatcher.delivered(t.task_id, t.worker, now)
            elif isinstance(f.exception(), MessageRejected):
                dispatcher.rejected(t.task_id, t.worker, now)
            self.wakeup.set()

        handle.receipt.add_done_callback(settled)

    async def _work(self, m: Envelope) -> None:
        """Run one task message: the result (derived id: once per task message) to its
        sink, then, once the sink receipted it, `done` to the ventilator."""
        node = self._node
        h = m.header
        assert h is not None
        handler, room, _prefetch = self.serving[h.queue]
        if h.sink not in node._links:
            # The result could go nowhere: not `all` or a group (one message id for many
            # peers, or a result to whoever is in a group), not this node, not a name that
            # is no peer. A ventilator names one of its peers; a made-up sink must not buy a
            # handler run here, nor one at every start (the task stays unanswered). The
            # ventilator's lease gives the task to another worker.
            node.stats.tasks_refused += 1
            decision = self._refused_warnings.check(m.sender, node.clock.monotonic())
            if isinstance(decision, Allowed):
                log.warning("[%s] task %s from %s not run: its sink %r is no peer of this "
                            "node, so its result could go nowhere", node.name, h.ref,
                            m.sender, h.sink)
            return
        rid = result_id(m.id)
        # Claimed before the first await: a second run of the same task message (found again
        # at serve, or reported new twice) returns here instead of racing this one to post
        # the same result id.
        if rid in self._replying:
            return
        self._replying.add(rid)
        try:
            async with room:
                writer, store = node._writer, node._store
                assert writer is not None
                assert store is not None
                if await writer.call(store.has_outgoing, rid, node.name):
                    return
                try:
                    result = (handler(m.body) if inspect.iscoroutinefunction(handler)
                              else await asyncio.get_running_loop().run_in_executor(
                                  self._threads[h.queue], handler, m.body))
                    if inspect.isawaitable(result):
                        result = await result
                except Exception:
                    node.stats.handler_errors += 1
                    log.exception("[%s] handler for queue %r failed on task %s", node.name,
                                  h.queue, h.ref)
                    return
                result_header = PatternHeader(Kind.RESULT, h.ref, h.queue)
                try:
                    (handle,) = await node._post(h.sink, str(result), held=True,
                                                 header=result_header, message_id=rid)
                except MeshpostError as exc:  # e.g. an empty result, an unknown sink
                    node.stats.handler_errors += 1
                    log.warning("[%s] result of task %s not sent: %s", node.name, h.ref, exc)
                    return
        finally:
            # The result is committed by now (or never will be): has_outgoing answers.
            self._replying.discard(rid)
        await handle.receipt
        if h.sink != m.sender:
            # One `done` per task: one owed from before a restart is this one.
            self._owed.pop(h.ref, None)
            await self._send_done(m.sender, h.ref, h.queue)


async def _ignore_result(awaitable: Awaitable[object]) -> None:
    await awaitable

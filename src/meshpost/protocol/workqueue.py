"""Work queues (seed 002's ventilator, workers and sink, made reliable): the ventilator's
`WorkQueueDispatcher` and the sink's `ResultSink`.

Rule: pure state, like the links. Inputs are calls with `now` (monotonic seconds) handed in;
outputs are `actions()` for the node to perform (store and send a task; report a completion)
and `next_timer()`. Each task is completed once, however often its completion is reported,
and only by a worker it was given to: a task id a peer names is no proof it had the task.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import heapq
import itertools
import math
from collections.abc import Iterable

import msgspec

from meshpost.errors import InvalidLease, InvalidPrefetch
from meshpost.protocol.header import MAX_LEASE_MS

#: A worker takes this many unfinished tasks at a time unless its `serve` record states its
#: own prefetch: enough to keep a fast handler busy while results and receipts travel, few
#: enough that a worker that dies takes little work down with it (all of it is redelivered
#: after its loss or lease), and that slow tasks spread over the workers (each one's queue
#: at the end of a run is short).
DEFAULT_MAX_INFLIGHT = 16
#: The most unfinished tasks a ventilator gives one worker, whatever prefetch it announces
#: (a larger one is clamped to it, counted and logged by the node). 1,024 is 8x the 128
#: that doubles `bench work-queue`'s rate (docs/benchmarks.md): past the depth that keeps a
#: handler busy, more only makes the worker's loss or stall hold more tasks for a lease, and
#: a worker that announces more than it can take (by mistake or on purpose) keeps tasks
#: from the others for as long. It also bounds the worker's own threads (one per task in
#: flight, `Node.serve_queue`).
MAX_PREFETCH = 1024
#: The longest lease: a day, the most a task's header carries; a longer one would hide a dead
#: worker's task that long.
MAX_LEASE_S = MAX_LEASE_MS / 1000


def lease_ok(lease_s: object) -> bool:
    """The one rule for a lease (CLI, Python API, control socket, dispatcher): a finite
    number of seconds above 0, at most a day. A `nan` lease never expired: its task stayed
    in flight for ever."""
    return (isinstance(lease_s, int | float) and not isinstance(lease_s, bool)
            and math.isfinite(lease_s) and 0 < lease_s <= MAX_LEASE_S)


def prefetch_ok(prefetch: object) -> bool:
    """The one rule for a prefetch a worker sets for itself (CLI, Python API): a whole
    number from 1 to MAX_PREFETCH."""
    return (isinstance(prefetch, int) and not isinstance(prefetch, bool)
            and 1 <= prefetch <= MAX_PREFETCH)


def check_prefetch(prefetch: int) -> int:
    """`prefetch` if `prefetch_ok`, else `InvalidPrefetch` (a usage error, exit 2)."""
    if not prefetch_ok(prefetch):
        raise InvalidPrefetch(prefetch, MAX_PREFETCH)
    return prefetch


def honoured_prefetch(announced: int | None, default: int = DEFAULT_MAX_INFLIGHT) -> int:
    """How many unfinished tasks a ventilator gives a worker that announced `announced`
    (its `serve` record's `prefetch`; None: it stated none, e.g. an older version):
    `default`, else min(announced, MAX_PREFETCH). The wire refuses 0 and below at decode
    (`header.Prefetch`), so only a store row changed by hand can hold one: it counts as
    stating none (the default), rather than stopping the ventilator at start."""
    if announced is None or announced < 1:
        return default
    return min(announced, MAX_PREFETCH)


def check_lease(lease_s: float) -> float:
    """`lease_s` as a float if `lease_ok`, else `InvalidLease` (a usage error, exit 2)."""
    if not lease_ok(lease_s):
        raise InvalidLease(lease_s, MAX_LEASE_S)
    return float(lease_s)


class TaskState(enum.Enum):
    """An unfinished task's state. Finished ones (`TaskCompleted`, `TaskAbandoned`) leave
    the dispatcher; the store keeps them as `done` / `abandoned`."""

    QUEUED = "queued"  # waiting for a live worker with room
    ASSIGNED = "assigned"  # sent to a worker; its lease runs


class RedeliveryReason(enum.Enum):
    LEASE_EXPIRED = "lease-expired"
    WORKER_LOST = "worker-lost"
    WORKER_LEFT = "worker-left"
    WORKER_REFUSED = "worker-refused"  # its node rejected the task message


@dataclasses.dataclass(frozen=True, slots=True)
class DispatchTask:
    """Store, then send, a task message to `worker` (header kind `task`, this `attempt`).

    A new message id each time: redelivery is a new message to another worker, never a
    resend of the old one (that one stays in its link's outbox and is harmless)."""

    task_id: str
    queue: str
    worker: str
    body: str
    sink: str
    attempt: int
    lease_s: float


@dataclasses.dataclass(frozen=True, slots=True)
class TaskRedelivered:
    """`task_id` was taken back from `worker` and queued again (first in line)."""

    task_id: str
    worker: str
    reason: RedeliveryReason
    attempts: int


@dataclasses.dataclass(frozen=True, slots=True)
class TaskCompleted:
    """`task_id` is done; reported exactly once per task. `by` is the worker that finished
    it when known (a worker's ack), else None (the result was seen at the sink)."""

    task_id: str
    by: str | None
    attempts: int


@dataclasses.dataclass(frozen=True, slots=True)
class TaskAbandoned:
    """`task_id` is given up after `attempts` attempts (max_attempts leases expired, or a
    worker's node rejected it); it is not sent again."""

    task_id: str
    attempts: int


#: `CompletionRefused.reason`s.
NOT_GIVEN = "this node never gave it that task"
OWN_SINK = "this node is the task's sink: only the task's result finishes it, not a `done`"


@dataclasses.dataclass(frozen=True, slots=True)
class CompletionRefused:
    """`by` reported `task_id` finished and the report finishes nothing (the node counts
    and logs it), for `reason`: no attempt of the task was ever given to `by` (a peer that
    knows a task id, however it learnt it, cannot finish a task it was never sent: a queued
    task would never run at all), or `by` sent a `done` for a task whose sink is this
    ventilator itself (a `done` vouches for a result at another node; here the result
    itself is what counts, and a worker's `done` without it left the task finished with no
    result anywhere)."""

    task_id: str
    by: str
    reason: str = NOT_GIVEN


Action = DispatchTask | TaskRedelivered | TaskCompleted | TaskAbandoned | CompletionRefused


class TaskRecord(msgspec.Struct, frozen=True):
    """A task as the ventilator's store keeps it (`restore`, `snapshot`): plain data."""

    task_id: str
    body: str
    sink: str
    state: TaskState
    attempts: int = 0
    worker: str | None = None
    #: Assigned, and its worker receipted the task message (restore: the lease runs).
    delivered: bool = False
    #: Assigned, not receipted: the task message's seq on its worker's link (restore: its
    #: receipt, `receipted`, starts the lease, as for a fresh dispatch).
    seq: int | None = None
    #: Every worker an attempt of the task was sent to (the store's task messages): the
    #: only peers whose completion of it counts.
    given: tuple[str, ...] = ()


class WorkerStatus(msgspec.Struct, frozen=True):
    """One worker of a queue as a node sees it: `live` (serving, link up), `suspect` (a
    lease of its expired and it has finished nothing since), `in_flight` (tasks it holds),
    `prefetch` (the most it is given at once: its announced prefetch, capped, or the
    default; a suspect worker gets one at a time whatever it is)."""

    name: str
    live: bool
    suspect: bool = False
    in_flight: int = 0
    prefetch: int = DEFAULT_MAX_INFLIGHT


class QueueStatus(msgspec.Struct, frozen=True):
    """One queue at one node (`Node.queue_status`, control `queue-status`, `/queue`).

    As its ventilator: `waiting` (no worker with room yet), `in_flight` (sent to a worker,
    unfinished), of those `leased` (receipted by the worker: the lease runs), and from the
    store `done`, `abandoned` and `redelivered` (attempts beyond each task's first). As its
    sink: `results` kept (one per task). `workers`: those whose latest `serve` record says
    they serve it, live or not."""

    queue: str
    workers: tuple[WorkerStatus, ...] = ()
    waiting: int = 0
    in_flight: int = 0
    leased: int = 0
    done: int = 0
    abandoned: int = 0
    redelivered: int = 0
    results: int = 0

    @property
    def unfinished(self) -> int:
        """Tasks submitted here and not finished (waiting or in flight)."""
        return self.waiting + self.in_flight


@dataclasses.dataclass(slots=True)
class _Task:
    task_id: str
    body: str
    sink: str
    state: TaskState
    order: int  # submission order: who goes first when several are queued again at once
    attempts: int = 0
    worker: str | None = None
    lease_deadline: float | None = None
    #: The current assignee receipted it: the lease runs from its receipt.
    leased: bool = False
    #: Restored assigned and not receipted: its task message's seq on the worker's link.
    restored_seq: int | None = None
    #: Every worker an attempt went to: only their completions count (`completed`).
    given: set[str] = dataclasses.field(default_factory=set)
    #: Workers whose node rejected a task message of it: it never goes to them again.
    refused_by: set[str] = dataclasses.field(default_factory=set)


@dataclasses.dataclass(slots=True)
class _Worker:
    name: str
    live: bool = True
    #: A lease of this worker's expired and it has completed nothing since: it may be stalled,
    #: so it gets at most one task at a time (a probe) while others have room.
    suspect: bool = False
    inflight: set[str] = dataclasses.field(default_factory=set)
    #: When it was last given a task (a counter, not time): ties go to the longest idle.
    last_assigned: int = 0
    #: The most unfinished tasks it is given at once (`honoured_prefetch` of what its latest
    #: `serve` record announced).
    room: int = DEFAULT_MAX_INFLIGHT


class WorkQueueDispatcher:
    """The ventilator's side of one named queue: tasks waiting, workers with their in-flight
    counts, leases.

    Each task goes to the live worker with the fewest unfinished tasks (ties: the one idle
    longest), at most its prefetch per worker: what its `serve` record announced (`prefetch`
    of `worker_up` / `worker_known`), capped at MAX_PREFETCH, or `max_inflight` if it stated
    none; one at a time while it is suspect. A task whose lease expires, or whose worker
    is lost or leaves, is queued again first in line and sent to another worker when one has
    room. `completed()` ends a task once; later reports of it return False.
    """

    def __init__(
        self,
        queue: str,
        *,
        lease_s: float,
        max_inflight: int = DEFAULT_MAX_INFLIGHT,
        max_attempts: int | None = None,
        ventilator: str = "",
    ) -> None:
        if not lease_ok(lease_s):  # our misuse: the node checks a user's lease first
            raise ValueError(f"lease_s must be above 0 and at most {MAX_LEASE_S:g}, got "
                             f"{lease_s}")
        if max_inflight < 1:
            raise ValueError(f"max_inflight must be at least 1, got {max_inflight}")
        if max_attempts is not None and max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1 or None, got {max_attempts}")
        self.queue = queue
        #: This node's name: a task whose sink it is is finished by its result, never by a
        #: `done` ("": not known, no such task).
        self.ventilator = ventilator
        self.lease_s = lease_s
        self.max_inflight = max_inflight
        self.max_attempts = max_attempts
        self._tasks: dict[str, _Task] = {}
        self._waiting: collections.deque[str] = collections.deque()
        self._workers: dict[str, _Worker] = {}
        #: Workers that stopped serving with tasks in hand and have completed none since:
        #: when they serve again they are suspect (one task at a time). Without it each
        #: `serve` record of a worker that stops again at once cost this ventilator a full
        #: window of task messages (`max_inflight` rows and sends per record it sent).
        self._walked_away: set[str] = set()
        #: (deadline, task_id); an entry is stale unless the task is still assigned with
        #: that deadline (removal from a heap is lazy).
        self._leases: list[tuple[float, str]] = []
        #: (worker, seq) of task messages posted before a restart, not receipted then.
        self._restored: dict[tuple[str, int], str] = {}
        self._ticks = itertools.count(1)
        self._orders = itertools.count()
        self._actions: list[Action] = []

    # -- inputs ----------------------------------------------------------------------------

    def submit(self, task_id: str, body: str, sink: str, now: float) -> None:
        """Queue a new task (already stored by the node). Submitting a known id is a bug."""
        if task_id in self._tasks:
            raise ValueError(f"task {task_id!r} was already submitted")
        self._tasks[task_id] = _Task(task_id, body, sink, TaskState.QUEUED, next(self._orders))
        self._waiting.append(task_id)
        self._dispatch(now)

    def worker_up(self, worker: str, now: float, prefetch: int | None = None) -> None:
        """`worker` serves this queue and its link is up (announced, or back after a loss).
        `prefetch`: what its latest `serve` record announced (None: nothing, the default)."""
        room = honoured_prefetch(prefetch, self.max_inflight)
        state = self._workers.get(worker)
        if state is None:
            self._workers[worker] = _Worker(worker, suspect=worker in self._walked_away,
                                            room=room)
        else:
            state.room = room
            if not state.live:
                state.live = True
                state.suspect = False
        self._dispatch(now)

    def worker_known(self, worker: str, prefetch: int | None = None) -> None:
        """`worker` serves this queue but its link is down: it gets nothing until
        `worker_up`, and a task some other worker refused waits for it rather than being
        abandoned (`rejected`). `prefetch` as for `worker_up`."""
        room = honoured_prefetch(prefetch, self.max_inflight)
        self._workers.setdefault(worker, _Worker(worker, live=False)).room = room

    def worker_lost(self, worker: str, now: float) -> None:
        """`worker`'s link went silent: its unfinished tasks go to others now."""
        self._take_back(worker, RedeliveryReason.WORKER_LOST, now)

    def worker_left(self, worker: str, now: float) -> None:
        """`worker` stopped serving this queue (left the queue's group). If it had tasks in
        hand, it is suspect when it serves again, until it completes one."""
        state = self._workers.get(worker)
        if state is not None and state.inflight:
            self._walked_away.add(worker)
        self._take_back(worker, RedeliveryReason.WORKER_LEFT, now)
        self._workers.pop(worker, None)
        self._dispatch(now)

    def delivered(self, task_id: str, worker: str, now: float) -> None:
        """The worker receipted the task message: the lease runs from now (time spent in the
        outbox or on the wire is not the worker's)."""
        task = self._tasks.get(task_id)
        if task is None or task.state is not TaskState.ASSIGNED or task.worker != worker:
            return  # a receipt for an older attempt: the task moved on
        task.lease_deadline = now + self.lease_s
        task.leased = True
        heapq.heappush(self._leases, (task.lease_deadline, task_id))

    def receipted(self, worker: str, seqs: Iterable[int], now: float) -> bool:
        """`worker` receipted the messages `seqs` of its link. Those that are task messages
        posted before a restart (`restore`: nobody awaits their receipt) start their task's
        lease now, as `delivered` does for a fresh dispatch; other seqs are ignored. True when
        a lease started."""
        started = False
        for task_id in self._restored_tasks(worker, seqs):
            self.delivered(task_id, worker, now)
            started = True
        return started

    def refused(self, worker: str, seqs: Iterable[int], now: float) -> bool:
        """`worker`'s node rejected the messages `seqs` of its link. Those that are task
        messages posted before a restart are handled as `rejected` handles a fresh
        dispatch's (the same rule: the task is abandoned); other seqs are ignored. True
        when a task was abandoned."""
        abandoned = False
        for task_id in self._restored_tasks(worker, seqs):
            self.rejected(task_id, worker, now)
            abandoned = True
        return abandoned

    def rejected(self, task_id: str, worker: str, now: float) -> None:
        """The worker's node rejected the task message (invalid, too large): it will never
        store it. The task never goes to that worker again; it is queued for the others,
        and abandoned only once every worker this dispatcher knows has refused it (a body
        too large for all of them). A refusal is a peer's word: abandoning at the first
        one let a worker that rejects whatever it is sent drop every task it was given,
        while other workers could have done them. (`refused` is the same input for a task
        message posted before a restart, known by its seq.)"""
        task = self._tasks.get(task_id)
        if task is None or task.state is not TaskState.ASSIGNED or task.worker != worker:
            return  # an older attempt's message: the task moved on
        self._release(task)
        task.refused_by.add(worker)
        if task.refused_by.issuperset(self._workers):
            del self._tasks[task_id]
            self._actions.append(TaskAbandoned(task_id, task.attempts))
        else:
            self._requeue(task, worker, RedeliveryReason.WORKER_REFUSED)
        self._dispatch(now)

    def completed(self, task_id: str, now: float, *, by: str | None = None,
                  ack: bool = False) -> bool:
        """The task's result was seen (at the sink) or `by` acknowledged it (`ack`: its
        `done`, which finishes only a task whose sink is another node).

        True the first time, for a task this dispatcher knows; False for a duplicate (two
        workers both finished it, a retransmitted ack) or an unknown task. A completion by a
        worker that is not the current assignee (its lease expired, then it finished) counts:
        the result is real, and the sink keeps only the first one. A completion `by` a peer
        no attempt was given to finishes nothing (`CompletionRefused`); `by` None (this
        node's own word) is not checked."""
        task = self._tasks.get(task_id)
        if task is None:
            return False
        if by is not None and by not in task.given:
            self._actions.append(CompletionRefused(task_id, by))
            return False
        if ack and by is not None and task.sink == self.ventilator:
            self._actions.append(CompletionRefused(task_id, by, OWN_SINK))
            return False
        if task.state is TaskState.QUEUED:
            self._waiting.remove(task_id)
        elif task.state is TaskState.ASSIGNED:
            self._release(task)
        # Finished tasks are forgotten (the store keeps them): memory holds unfinished work
        # only, and a later report of this id finds nothing, as a duplicate should.
        del self._tasks[task_id]
        if by is not None:
            self._walked_away.discard(by)
            if (worker := self._workers.get(by)) is not None:
                worker.suspect = False
        self._actions.append(TaskCompleted(task_id, by, task.attempts))
        self._dispatch(now)
        return True

    def on_timer(self, now: float) -> None:
        """Expire the leases due by `now`; call at `next_timer()` (earlier is harmless)."""
        while self._leases and self._leases[0][0] <= now:
            deadline, task_id = heapq.heappop(self._leases)
            task = self._tasks.get(task_id)
            if task is None or task.state is not TaskState.ASSIGNED \
                    or task.lease_deadline != deadline:
                continue
            worker = task.worker
            assert worker is not None
            self._workers[worker].suspect = True
            self._release(task)
            self._requeue(task, worker, RedeliveryReason.LEASE_EXPIRED)
        self._dispatch(now)

    # -- outputs ---------------------------------------------------------------------------

    def actions(self) -> list[Action]:
        """What to do since the last call, in order; the node performs each."""
        actions, self._actions = self._actions, []
        return actions

    def next_timer(self) -> float | None:
        """The earliest lease deadline, or None when no lease runs."""
        while self._leases:
            deadline, task_id = self._leases[0]
            task = self._tasks.get(task_id)
            if task is not None and task.state is TaskState.ASSIGNED \
                    and task.lease_deadline == deadline:
                return deadline
            heapq.heappop(self._leases)
        return None

    # -- views -----------------------------------------------------------------------------

    def state_of(self, task_id: str) -> TaskState | None:
        """QUEUED or ASSIGNED; None once finished (completed or abandoned) or never known."""
        task = self._tasks.get(task_id)
        return task.state if task is not None else None

    def __len__(self) -> int:
        """Unfinished tasks."""
        return len(self._tasks)

    def inflight(self) -> dict[str, int]:
        """Unfinished tasks per known worker (live or not)."""
        return {name: len(w.inflight) for name, w in self._workers.items()}

    def waiting(self) -> list[str]:
        """Task ids waiting for a worker, in the order they will go."""
        return list(self._waiting)

    def workers(self) -> list[WorkerStatus]:
        """Every worker this dispatcher knows (live or not), by name."""
        return [WorkerStatus(w.name, w.live, w.suspect, len(w.inflight), w.room)
                for _, w in sorted(self._workers.items())]

    def leased(self) -> int:
        """Assigned tasks their worker receipted (whose lease runs from that receipt)."""
        return sum(t.leased for t in self._tasks.values())

    def snapshot(self) -> list[TaskRecord]:
        """Every unfinished task as plain data, in submission order (a status view; the
        store writes the same facts as they happen)."""
        return [TaskRecord(t.task_id, t.body, t.sink, t.state, t.attempts, t.worker, t.leased,
                           given=tuple(sorted(t.given)))
                for t in self._tasks.values()]

    @classmethod
    def restore(
        cls,
        queue: str,
        records: Iterable[TaskRecord],
        now: float,
        *,
        lease_s: float,
        max_inflight: int = DEFAULT_MAX_INFLIGHT,
        max_attempts: int | None = None,
        ventilator: str = "",
    ) -> WorkQueueDispatcher:
        """A dispatcher after a restart, from the store's task rows.

        Assigned tasks stay with their worker (their task messages are still in that link's
        outbox and are resent) under a fresh lease from `now`; one whose message was not
        receipted yet (a `seq` given) is leased again from its receipt (`receipted`), as a
        fresh dispatch is, so time in the outbox across the restart is not the worker's. The
        worker counts as known but
        not live until `worker_up`, so if it never comes back its tasks go elsewhere when
        its lease expires. Queued tasks wait in the order given."""
        dispatcher = cls(queue, lease_s=lease_s, max_inflight=max_inflight,
                         max_attempts=max_attempts, ventilator=ventilator)
        for record in records:
            task = _Task(record.task_id, record.body, record.sink, record.state,
                         next(dispatcher._orders), record.attempts, record.worker,
                         given=set(record.given))
            if record.worker is not None:
                task.given.add(record.worker)
            dispatcher._tasks[task.task_id] = task
            if task.state is TaskState.QUEUED:
                task.worker = None
                dispatcher._waiting.append(task.task_id)
            elif task.state is TaskState.ASSIGNED:
                if task.worker is None:
                    raise ValueError(f"assigned task {task.task_id!r} has no worker")
                worker = dispatcher._workers.setdefault(
                    task.worker, _Worker(task.worker, live=False, room=max_inflight))
                worker.inflight.add(task.task_id)
                task.lease_deadline = now + lease_s
                task.leased = record.delivered
                heapq.heappush(dispatcher._leases, (task.lease_deadline, task.task_id))
                if not record.delivered and record.seq is not None:
                    task.restored_seq = record.seq
                    dispatcher._restored[(task.worker, record.seq)] = task.task_id
        return dispatcher

    # -- internals -------------------------------------------------------------------------

    def _restored_tasks(self, worker: str, seqs: Iterable[int]) -> list[str]:
        """The tasks whose restored task message (not receipted before the restart) is
        among `worker`'s `seqs`, each settled once: its seq is forgotten here."""
        if not self._restored:
            return []
        found = []
        for seq in seqs:
            task_id = self._restored.pop((worker, seq), None)
            task = self._tasks.get(task_id) if task_id is not None else None
            if task is not None and task.restored_seq == seq:
                task.restored_seq = None
                found.append(task.task_id)
        return found

    def _release(self, task: _Task) -> None:
        assert task.worker is not None
        worker = self._workers.get(task.worker)
        if worker is not None:
            worker.inflight.discard(task.task_id)
        task.lease_deadline = None
        task.leased = False
        if task.restored_seq is not None:
            self._restored.pop((task.worker, task.restored_seq), None)
            task.restored_seq = None

    def _requeue(self, task: _Task, worker: str, reason: RedeliveryReason) -> None:
        if self.max_attempts is not None and task.attempts >= self.max_attempts:
            del self._tasks[task.task_id]
            self._actions.append(TaskAbandoned(task.task_id, task.attempts))
            return
        task.state = TaskState.QUEUED
        # Redelivered work goes first: it is the oldest, and someone may be waiting for it.
        self._waiting.appendleft(task.task_id)
        self._actions.append(TaskRedelivered(task.task_id, worker, reason, task.attempts))

    def _take_back(self, name: str, reason: RedeliveryReason, now: float) -> None:
        worker = self._workers.get(name)
        if worker is None:
            return
        worker.live = False
        # Oldest first, so that after the appendlefts the oldest is first in line again.
        for task_id in sorted(worker.inflight, key=lambda t: self._tasks[t].order,
                              reverse=True):
            task = self._tasks[task_id]
            self._release(task)
            self._requeue(task, name, reason)
        worker.inflight.clear()
        self._dispatch(now)

    def _pick(self, avoid: str | None, refused: set[str]) -> _Worker | None:
        """The worker for the next task, or None to wait.

        Among the live workers: healthy ones only while there are any (a suspect one may be
        stalled); not `avoid` (the task's last worker, whose lease expired) while there is
        another; then the one with the fewest unfinished tasks and room for one more (its
        prefetch; a suspect one has room for a single probe), the longest idle first. A task waits
        for a busy healthy worker rather than go back to one that failed it, and never
        goes to a worker in `refused` (its node rejected the task)."""
        live = [w for w in self._workers.values() if w.live and w.name not in refused]
        pool = [w for w in live if not w.suspect] or live
        if len(pool) > 1:
            pool = [w for w in pool if w.name != avoid]
        best: _Worker | None = None
        for worker in pool:
            room = 1 if worker.suspect else worker.room
            if len(worker.inflight) >= room:
                continue
            if best is None or (len(worker.inflight), worker.last_assigned) < (
                    len(best.inflight), best.last_assigned):
                best = worker
        return best

    def _dispatch(self, now: float) -> None:
        passed: list[str] = []  # tasks only workers that refused them have room for
        while self._waiting:
            task = self._tasks[self._waiting[0]]
            worker = self._pick(task.worker, task.refused_by)
            if worker is None:
                if not task.refused_by:
                    break  # no worker has room: every task behind it waits too
                passed.append(self._waiting.popleft())  # the tasks behind it may go
                continue
            self._waiting.popleft()
            task.state = TaskState.ASSIGNED
            task.worker = worker.name
            task.given.add(worker.name)
            task.attempts += 1
            task.lease_deadline = now + self.lease_s
            heapq.heappush(self._leases, (task.lease_deadline, task.task_id))
            worker.inflight.add(task.task_id)
            worker.last_assigned = next(self._ticks)
            self._actions.append(DispatchTask(task.task_id, self.queue, worker.name, task.body,
                                              task.sink, task.attempts, self.lease_s))
        self._waiting.extendleft(reversed(passed))  # first in line again, in their order

    def __repr__(self) -> str:
        live = sum(w.live for w in self._workers.values())
        return (f"<WorkQueueDispatcher {self.queue!r} workers={live}/{len(self._workers)} "
                f"waiting={len(self._waiting)} assigned={len(self._tasks) - len(self._waiting)}>")


@dataclasses.dataclass(frozen=True, slots=True)
class ResultAccepted:
    """The first result for `task_id`: record it (the sink's `task_results` row)."""

    task_id: str
    message_id: str
    worker: str


@dataclasses.dataclass(frozen=True, slots=True)
class ResultDuplicate:
    """Another result for a task that has one: store the message (it was receipted like any
    other), but it is not the task's result. `first_message_id` is the one that is."""

    task_id: str
    message_id: str
    worker: str
    first_message_id: str


class ResultSink:
    """The sink's dedupe of results by task id: exactly one result per task, the first.

    The store's `task_results` primary key is the durable form of the same rule; this object
    decides for the node before the write (decide, then perform) and is rebuilt from that
    table at start (`known`). Offering the accepted message again (a retransmission after a
    crash) is accepted again, so replaying is harmless."""

    def __init__(self, known: Iterable[tuple[str, str, str]] = ()) -> None:
        #: task id -> (message id, worker) of its result
        self._results: dict[str, tuple[str, str]] = {
            task_id: (message_id, worker) for task_id, message_id, worker in known
        }

    def offer(self, task_id: str, message_id: str, worker: str) -> ResultAccepted | ResultDuplicate:
        first = self._results.setdefault(task_id, (message_id, worker))
        if first[0] == message_id:
            return ResultAccepted(task_id, message_id, first[1])
        return ResultDuplicate(task_id, message_id, worker, first[0])

    def result_of(self, task_id: str) -> str | None:
        """The message id of `task_id`'s result, or None."""
        found = self._results.get(task_id)
        return found[0] if found else None

    def __len__(self) -> int:
        return len(self._results)

    def __repr__(self) -> str:
        return f"<ResultSink results={len(self._results)}>"

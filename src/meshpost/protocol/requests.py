"""Request/reply: which requests wait for a reply, what became of each (not delivered,
delivered but unanswered, answered), and the linkage of a reply to its request.

Rule: pure state, `now` (monotonic seconds) handed in; outputs are `events()` and
`next_timer()`. The linkage itself is durable in both stores (the reply's header `ref` is the
request's id); this object only says what the waiting caller should hear.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import heapq
from collections.abc import Iterable

import msgspec

#: Requests whose caller stopped waiting are remembered this long (in number), so that a late
#: reply is still reported as late and checked against its peer; older ones are linked by the
#: store alone. About 1 MB of ids.
MAX_EXPIRED_REMEMBERED = 10_000


class RequestOutcome(enum.Enum):
    NOT_DELIVERED = "not-delivered"  # no receipt: the peer may never have seen it
    DELIVERED_UNANSWERED = "delivered-unanswered"  # the peer stored it; no reply yet
    ANSWERED = "answered"


@dataclasses.dataclass(frozen=True, slots=True)
class RequestAnswered:
    """`reply_id` answers `request_id`. `late`: after the caller's timeout (the reply is
    still linked to the request in history)."""

    request_id: str
    peer: str
    reply_id: str
    late: bool


@dataclasses.dataclass(frozen=True, slots=True)
class RequestTimedOut:
    """The caller's timeout passed; `outcome` says whether the peer had the request."""

    request_id: str
    peer: str
    outcome: RequestOutcome


@dataclasses.dataclass(frozen=True, slots=True)
class ReplyUnmatched:
    """A reply this tracker cannot link: store it (it was receipted), count it, log it."""

    reply_id: str
    request_id: str
    sender: str
    reason: str


RequestEvent = RequestAnswered | RequestTimedOut | ReplyUnmatched


class PendingRequest(msgspec.Struct, frozen=True):
    """An unanswered request as the store knows it (`restore`)."""

    request_id: str
    peer: str
    delivered: bool


@dataclasses.dataclass(slots=True)
class _Request:
    peer: str
    delivered: bool = False
    deadline: float | None = None


class RequestTracker:
    """Requests this node sent and waits on, keyed by the request's message id."""

    def __init__(self) -> None:
        self._pending: dict[str, _Request] = {}
        #: timed-out requests still unanswered, oldest first, bounded
        self._expired: collections.OrderedDict[str, _Request] = collections.OrderedDict()
        self._timers: list[tuple[float, str]] = []
        self._events: list[RequestEvent] = []

    def sent(self, request_id: str, peer: str, now: float, timeout_s: float | None) -> None:
        """The request is stored (and will be sent); the caller waits up to `timeout_s`."""
        if request_id in self._pending or request_id in self._expired:
            raise ValueError(f"request {request_id!r} is already tracked")
        deadline = None if timeout_s is None else now + timeout_s
        self._pending[request_id] = _Request(peer, deadline=deadline)
        if deadline is not None:
            heapq.heappush(self._timers, (deadline, request_id))

    def delivered(self, request_id: str) -> None:
        """The peer receipted the request."""
        request = self._pending.get(request_id) or self._expired.get(request_id)
        if request is not None:
            request.delivered = True

    def answered(self, request_id: str, reply_id: str, sender: str) -> None:
        """A reply (header kind `reply`, ref `request_id`) from `sender` was stored."""
        request = self._pending.get(request_id)
        late = request is None
        if request is None:
            request = self._expired.get(request_id)
        if request is None:
            self._events.append(ReplyUnmatched(reply_id, request_id, sender,
                                               "no such request is waiting"))
            return
        if request.peer != sender:
            self._events.append(ReplyUnmatched(
                reply_id, request_id, sender, f"the request went to {request.peer!r}"))
            return
        if late:
            del self._expired[request_id]
        else:
            del self._pending[request_id]
        self._events.append(RequestAnswered(request_id, request.peer, reply_id, late))

    def on_timer(self, now: float) -> None:
        """Time out the requests due by `now`."""
        while self._timers and self._timers[0][0] <= now:
            deadline, request_id = heapq.heappop(self._timers)
            request = self._pending.get(request_id)
            if request is None or request.deadline != deadline:
                continue
            del self._pending[request_id]
            self._expired[request_id] = request
            if len(self._expired) > MAX_EXPIRED_REMEMBERED:
                self._expired.popitem(last=False)
            outcome = (RequestOutcome.DELIVERED_UNANSWERED if request.delivered
                       else RequestOutcome.NOT_DELIVERED)
            self._events.append(RequestTimedOut(request_id, request.peer, outcome))

    def events(self) -> list[RequestEvent]:
        events, self._events = self._events, []
        return events

    def next_timer(self) -> float | None:
        while self._timers:
            deadline, request_id = self._timers[0]
            request = self._pending.get(request_id)
            if request is not None and request.deadline == deadline:
                return deadline
            heapq.heappop(self._timers)
        return None

    def outcome(self, request_id: str) -> RequestOutcome | None:
        """NOT_DELIVERED or DELIVERED_UNANSWERED while unanswered; None once answered or if
        unknown (the store's linkage says ANSWERED then)."""
        request = self._pending.get(request_id) or self._expired.get(request_id)
        if request is None:
            return None
        return (RequestOutcome.DELIVERED_UNANSWERED if request.delivered
                else RequestOutcome.NOT_DELIVERED)

    def waiting(self) -> int:
        """Requests whose caller still waits."""
        return len(self._pending)

    @classmethod
    def restore(cls, pending: Iterable[PendingRequest]) -> RequestTracker:
        """After a restart: unanswered requests from the store. Their callers are gone, so
        they wait without a timeout; a reply that comes is reported late and linked."""
        tracker = cls()
        for p in pending:
            tracker._expired[p.request_id] = _Request(p.peer, p.delivered)
            if len(tracker._expired) > MAX_EXPIRED_REMEMBERED:
                tracker._expired.popitem(last=False)
        return tracker

    def __repr__(self) -> str:
        return f"<RequestTracker waiting={len(self._pending)} expired={len(self._expired)}>"

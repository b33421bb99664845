"""0b. The checker's pattern rules: hand-made stores of a work queue (ventilator V, workers W1
and W2, sink S), of request/reply and of group copies, each with one rule broken, are counted
as exactly that; the same stores without the damage are clean.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from meshpost.protocol import Envelope
from meshpost.protocol.header import Kind, PatternHeader, reply_id, result_id
from meshpost.store import Store, WriteBatch

from .checker import Counts, Ledger, evaluate

pytestmark = [pytest.mark.faults]

COUNTED = ("lost", "missing", "duplicated", "phantom", "mismatched", "no_result")


def _only(counts: Counts, **expected: int) -> None:
    got = {f: getattr(counts, f) for f in COUNTED}
    assert got == {f: expected.get(f, 0) for f in COUNTED}, counts.line() + "\n" + "\n".join(
        counts.problems)


class Stores:
    """Real stores (meshpost's own `Store`) written the way the nodes write them."""

    def __init__(self, root: Path, names: list[str]) -> None:
        self.dirs = {n: root / n for n in names}
        self.s = {n: Store.open(d, name=n, sync="off") for n, d in self.dirs.items()}
        self.ledger = Ledger()
        self.ledger.expect_result = str.upper
        self._seqs: dict[tuple[str, str], itertools.count[int]] = {}
        self._clock = itertools.count(1_000)

    def message(self, sender: str, recipient: str, body: str, header: PatternHeader | None,
                *, message_id: str | None = None, store_at: bool = True,
                deliver: bool = True) -> Envelope:
        seq = next(self._seqs.setdefault((sender, recipient), itertools.count(1)))
        tick = next(self._clock)
        e = Envelope(message_id or f"{sender}{recipient}{seq}", seq, sender, recipient, body,
                     tick, tick, header)
        self.s[sender].apply(WriteBatch(outgoing=[e]), tick)
        if store_at:
            self.s[recipient].apply(WriteBatch(incoming=[[e]]), tick)
        if deliver:
            self.s[sender].execute_raw("UPDATE messages SET state = 'delivered' WHERE id = ?",
                                       [e.id])
        return e

    def count(self) -> Counts:
        for store in self.s.values():
            store.close()
        return evaluate("pattern-checker", self.ledger, self.dirs)


class Queue(Stores):
    def submit(self, task_id: str, body: str) -> None:
        (attempt,) = self.ledger.submit("V", "work", "S", [body])
        attempt.outcome, attempt.task_id = "accepted", task_id
        self.s["V"].add_task(task_id, "work", body, "S", 1)

    def deliver(self, task_id: str, body: str, worker: str, attempt: int = 1,
                **kwargs: bool) -> Envelope:
        self.s["V"].set_task_state(task_id, "assigned", worker=worker, attempts=attempt)
        header = PatternHeader(Kind.TASK, task_id, "work", "S", 30_000, attempt)
        return self.message("V", worker, body, header, **kwargs)

    def result(self, task: Envelope, worker: str, body: str | None = None,
               **kwargs: bool) -> Envelope:
        h = task.header
        assert h is not None
        result = self.message(worker, "S", task.body.upper() if body is None else body,
                              PatternHeader(Kind.RESULT, h.ref, "work"),
                              message_id=result_id(task.id), **kwargs)
        self.message(worker, "V", "done", PatternHeader(Kind.DONE, h.ref, "work"))
        self.s["V"].set_task_state(h.ref, "done", worker=worker, at_ns=1)
        return result

    def run(self, task_id: str, body: str, worker: str = "W1") -> None:
        self.submit(task_id, body)
        self.result(self.deliver(task_id, body, worker), worker)


@pytest.fixture
def queue(tmp_path: Path) -> Queue:
    return Queue(tmp_path, ["V", "W1", "W2", "S"])


def test_a_work_queue_with_a_redelivery_finished_twice_is_clean(queue: Queue) -> None:
    queue.run("t1", "hola")
    queue.run("t2", "aloha", "W2")
    # t3: W1's lease expired, W2 got it (attempt 2); both finished: S keeps W1's, the first.
    queue.submit("t3", "hello")
    first = queue.deliver("t3", "hello", "W1")
    second = queue.deliver("t3", "hello", "W2", attempt=2)
    queue.result(first, "W1")
    queue.result(second, "W2")
    counts = queue.count()
    _only(counts)
    assert counts.verify == "ok"
    assert counts.patterns["tasks"] == 3 and counts.patterns["deliveries"] == 4
    assert counts.patterns["results_kept"] == 3 and counts.patterns["results_twice"] == 1
    assert "no_result=0" in counts.line() and "redelivered=1" in counts.line()


def test_a_task_without_a_result_is_no_result(queue: Queue) -> None:
    queue.run("t1", "hola")
    queue.submit("t2", "aloha")
    queue.deliver("t2", "aloha", "W2")
    _only(queue.count(), no_result=1)


def test_an_accepted_task_missing_at_its_ventilator_is_missing(queue: Queue) -> None:
    queue.run("t1", "hola")
    (attempt,) = queue.ledger.submit("V", "work", "S", ["never stored"])
    attempt.outcome, attempt.task_id = "accepted", "t9"
    _only(queue.count(), missing=1)


def test_a_task_nobody_submitted_is_a_phantom(queue: Queue) -> None:
    queue.run("t1", "hola")
    queue.s["V"].add_task("ghost", "work", "boo", "S", 1)
    _only(queue.count(), phantom=1)


def test_one_delivery_sent_twice_is_duplicated(queue: Queue) -> None:
    queue.submit("t1", "hola")
    task = queue.deliver("t1", "hola", "W1")
    queue.deliver("t1", "hola", "W2")  # attempt 1 again: the same delivery under a new id
    queue.result(task, "W1")
    _only(queue.count(), duplicated=1)


def test_a_receipted_task_not_stored_at_its_worker_is_lost(queue: Queue) -> None:
    queue.submit("t1", "hola")
    queue.deliver("t1", "hola", "W1", store_at=False)
    task = queue.deliver("t1", "hola", "W2", attempt=2)
    queue.result(task, "W2")
    _only(queue.count(), lost=1)


def test_a_result_from_a_worker_that_never_had_the_task_is_a_phantom(queue: Queue) -> None:
    queue.submit("t1", "hola")
    task = queue.deliver("t1", "hola", "W1")
    queue.result(task, "W1")
    queue.message("W2", "S", "HOLA", PatternHeader(Kind.RESULT, "t1", "work"),
                  message_id="stolen")
    _only(queue.count(), phantom=1)


def test_a_wrong_result_is_mismatched(queue: Queue) -> None:
    queue.submit("t1", "hola")
    queue.result(queue.deliver("t1", "hola", "W1"), "W1", body="HOLa")
    _only(queue.count(), mismatched=1)


def test_a_kept_result_that_is_not_the_first_stored_is_mismatched(queue: Queue) -> None:
    queue.submit("t1", "hola")
    first = queue.deliver("t1", "hola", "W1")
    second = queue.deliver("t1", "hola", "W2", attempt=2)
    queue.result(first, "W1")
    later = queue.result(second, "W2")
    queue.s["S"].execute_raw("UPDATE task_results SET message_id = ?, worker = 'W2'",
                             [later.id])
    _only(queue.count(), mismatched=1)


def test_a_result_stored_at_the_sink_but_not_sent_is_a_phantom(queue: Queue) -> None:
    queue.run("t1", "hola")
    queue.s["W1"].execute_raw("DELETE FROM messages WHERE kind = 'result'")
    _only(queue.count(), phantom=1)


@pytest.fixture
def pair(tmp_path: Path) -> Stores:
    return Stores(tmp_path, ["A", "B", "C"])


def _request(pair: Stores, body: str, *, reply: bool = True, reply_stored: bool = True,
             reply_as: str | None = None) -> None:
    (attempt,) = pair.ledger.attempt("A", ["B"], body)
    request = pair.message("A", "B", body, PatternHeader(Kind.REQUEST))
    attempt.accept(request.id, request.seq, request.sent_at_ns)
    attempt.receipted = True
    if reply:
        answer = pair.message("B", "A", body, PatternHeader(Kind.REPLY, request.id),
                              message_id=reply_as or reply_id(request.id),
                              store_at=reply_stored)
        pair.ledger.replies[("A", "B", request.id)] = answer.id


def test_a_request_and_its_reply_are_clean(pair: Stores) -> None:
    _request(pair, "ping")
    _request(pair, "unanswered", reply=False)
    counts = pair.count()
    _only(counts)
    assert counts.patterns["replies"] == 1 and counts.verify == "ok"


def test_a_request_an_echo_stored_and_never_answered_is_missing(pair: Stores) -> None:
    pair.ledger.repliers = {"B"}
    _request(pair, "ping")
    _request(pair, "unanswered", reply=False)
    _only(pair.count(), missing=1)


def test_a_reply_the_observer_saw_that_the_requester_lacks_is_lost(pair: Stores) -> None:
    _request(pair, "ping", reply_stored=False)
    _only(pair.count(), lost=2)  # receipted by A and not stored; shown to the observer


def test_a_reply_to_no_request_is_a_phantom(pair: Stores) -> None:
    _request(pair, "ping")
    pair.message("B", "A", "pong", PatternHeader(Kind.REPLY, "no-such-request"),
                  message_id=reply_id("no-such-request"))
    _only(pair.count(), phantom=1)


def test_a_reply_under_another_id_is_mismatched(pair: Stores) -> None:
    _request(pair, "ping", reply_as="made-up")
    _only(pair.count(), mismatched=1)


def _group(pair: Stores, bodies: dict[str, str], logical: str) -> None:
    for member, body in bodies.items():
        (attempt,) = pair.ledger.attempt("A", [member], body)
        e = pair.message("A", member, body, PatternHeader(Kind.GROUP, logical, "team"))
        attempt.accept(e.id, e.seq, e.sent_at_ns)
        attempt.receipted = True


def test_group_copies_one_per_member_are_clean(pair: Stores) -> None:
    _group(pair, {"B": "to the team", "C": "to the team"}, "L1")
    counts = pair.count()
    _only(counts)
    assert (counts.patterns["group_messages"], counts.patterns["group_copies"]) == (1, 2)


def test_group_copies_that_differ_are_mismatched(pair: Stores) -> None:
    _group(pair, {"B": "to the team", "C": "to the tean"}, "L1")
    _only(pair.count(), mismatched=1)


def test_two_copies_of_one_group_message_to_a_member_are_duplicated(pair: Stores) -> None:
    _group(pair, {"B": "to the team", "C": "to the team"}, "L1")
    e = pair.message("A", "B", "to the team", PatternHeader(Kind.GROUP, "L1", "team"))
    counts = pair.count()
    # The ledger counts B's attempt stored twice on each side (2) and under two ids (a
    # mismatch); the group rule adds its own: L1 has two copies to B.
    _only(counts, duplicated=3, mismatched=1)
    assert any("group message L1 of A: 2 copies to B" in p for p in counts.problems), e

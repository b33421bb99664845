"""The seeds' patterns with real node processes (issue 18): echo request/reply across a
crash and restart of the replier; a work queue with a worker killed -9 (the pipeline demo)
or stalled by SIGSTOP, every result kept once at the sink."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from meshpost.cli import CRASH_ENV
from meshpost.cluster import LocalCluster, NodeProcess
from meshpost.control import ControlClient, QueueStatusRequest, SubmitRequest, checked
from meshpost.errors import EXIT_TIMEOUT
from meshpost.protocol.workqueue import QueueStatus
from meshpost.store import DB_FILENAME, StoredMessage, StoreReader
from meshpost.verify import verify_stores
from tests.integration.conftest import wait_until

pytestmark = pytest.mark.integration

FAST = {"ping_interval_s": 0.2, "peer_timeout_s": 1.0, "retransmit_initial_s": 0.2,
        "retransmit_max_s": 1.0}
#: Bound on every wait: reaching it means a bug, not a slow machine.
PATIENCE_S = 60.0


def rows(data_dir: Path) -> list[StoredMessage]:
    with StoreReader.for_data_dir(data_dir) as reader:
        return reader.history()


def meshpost(*args: str, timeout_s: float = PATIENCE_S) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meshpost", *args], capture_output=True,
                          text=True, timeout=timeout_s, check=False)


def _start_work_queue(cluster: LocalCluster, logs: Path) -> None:
    """Seed 002's shape: V and S as plain nodes, W1 and W2 serving queue `work` with the slow
    upper-case handler (so tasks are in hand when a fault comes)."""
    cluster.start(["V", "S"])
    for worker in ("W1", "W2"):
        node = NodeProcess(worker, cluster.config_path, cluster.data_dir(worker),
                           logs / f"{worker}.log",
                           extra_args=("--worker", "work=meshpost.pipeline:slow_upper"))
        cluster.nodes[worker] = node.start()
        node.wait_ready()


def _submit(cluster: LocalCluster, bodies: list[str], *, lease_s: float) -> dict[str, str]:
    """Submit `bodies` to queue `work` at V with sink S; the expected result of each task id."""
    with ControlClient(cluster.data_dir("V"), name="V") as client:
        reply = checked(client.request(
            SubmitRequest(queue="work", sink="S", bodies=bodies, lease_s=lease_s),
            timeout_s=60))
    return {t: b.upper() for t, b in zip(reply.task_ids, bodies, strict=True)}


def _kept(cluster: LocalCluster) -> list[tuple[str, str, str, str]]:
    with StoreReader.for_data_dir(cluster.data_dir("S")) as reader:
        return reader.task_results()


def test_echo_request_reply_across_a_crash_of_the_replier(short_tmp: Path) -> None:
    cluster = LocalCluster.create(short_tmp, 2, transport="ipc", options=FAST)
    a_dir, b_dir = cluster.data_dir("A"), cluster.data_dir("B")

    def echo_b(env: dict[str, str] | None) -> NodeProcess:
        return NodeProcess("B", cluster.config_path, b_dir, short_tmp / "logs" / "B.log",
                           extra_args=("--echo",), env=env)

    b: NodeProcess | None = None
    try:
        cluster.start(["A"])
        # B dies like kill -9 (os._exit, no cleanup) right after committing the request:
        # between the request and its reply, before even the receipt.
        b = echo_b({CRASH_ENV: "after-receiver-commit"}).start()
        b.wait_ready()
        first = meshpost("request", "--node", "A", "--data", str(a_dir), "--to", "B",
                         "--timeout", "3", "marco")
        assert first.returncode == EXIT_TIMEOUT, first.stderr
        assert "not delivered" in first.stderr
        wait_until(lambda: b is not None and not b.alive(), PATIENCE_S, "B to crash")
        b.stop()
        [request] = [r for r in rows(b_dir) if r.kind == "request"]
        assert request.body == "marco"
        assert not [r for r in rows(b_dir) if r.kind == "reply"]

        # B restarts (no crash this time): its echo answers the stored request, A's
        # retransmission of it is stored once, and the reply reaches A linked to it.
        b = echo_b(None).start()
        b.wait_ready()
        wait_until(lambda: any(r.kind == "reply" for r in rows(a_dir)), PATIENCE_S,
                   "the reply to reach A")
        # A live request/reply through the CLI prints the reply.
        second = meshpost("request", "--node", "A", "--data", str(a_dir), "--to", "B",
                          "--timeout", "30", "polo")
        assert (second.returncode, second.stdout) == (0, "polo\n"), second.stderr
    finally:
        if b is not None:
            b.stop()
        cluster.stop()
    for data_dir, request_dir, reply_dir in ((a_dir, "out", "in"), (b_dir, "in", "out")):
        stored = rows(data_dir)
        requests = {r.id: r for r in stored if r.kind == "request"}
        replies = [r for r in stored if r.kind == "reply"]
        assert sorted(r.body for r in requests.values()) == ["marco", "polo"]
        assert {r.direction for r in requests.values()} == {request_dir}
        # One reply per request (the crash did not double it), each linked by its ref.
        assert sorted((requests[r.ref].body, r.body) for r in replies if r.ref) == [
            ("marco", "marco"), ("polo", "polo")]
        assert len(replies) == 2 and {r.direction for r in replies} == {reply_dir}
    report = verify_stores({"A": a_dir, "B": b_dir})
    assert report.ok, report.problems


def test_pipeline_demo_kills_a_worker_and_every_result_arrives_once() -> None:
    done = meshpost("pipeline", "demo", "--tasks", "120", timeout_s=240)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "killed W1 (kill -9)" in done.stdout
    assert "every result arrived once: 120 tasks, 120 results kept at S" in done.stdout


def test_a_stalled_worker_sigstop_loses_no_task_and_doubles_no_result(short_tmp: Path) -> None:
    cluster = LocalCluster.create(short_tmp, 4, transport="ipc", names=["V", "W1", "W2", "S"],
                                  options=FAST)
    tasks = 120
    w1: NodeProcess | None = None
    try:
        _start_work_queue(cluster, short_tmp / "logs")
        w1 = cluster.nodes["W1"]
        bodies = [f"stall {i}" for i in range(tasks)]
        expected = _submit(cluster, bodies, lease_s=5.0)

        wait_until(lambda: len(_kept(cluster)) >= tasks // 4, PATIENCE_S,
                   "a quarter of the results")
        os.kill(w1.pid, signal.SIGSTOP)  # stalled with tasks in hand (16 at a time)
        stopped_at = len(_kept(cluster))
        assert stopped_at < tasks
        # W1 is lost after peer_timeout_s (or its leases expire): W2 gets its tasks.
        wait_until(lambda: len(_kept(cluster)) >= tasks, PATIENCE_S,
                   "every result while W1 stalls")
        results = _kept(cluster)
        # The ventilator completes each task when W2's `done` (sent after S's receipt of
        # the result) reaches it.
        wait_until(lambda: task_states(cluster.data_dir("V"))[0] == ["done"], PATIENCE_S,
                   "every task done at the ventilator")
        os.kill(w1.pid, signal.SIGCONT)
    finally:
        if w1 is not None and w1.alive():
            os.kill(w1.pid, signal.SIGCONT)
        cluster.stop()
    assert {t: body for t, _w, _m, body in results} == expected
    assert len(results) == tasks  # one kept result per task (task_results' primary key)
    by_worker = {w for _t, w, _m, _b in results}
    assert "W2" in by_worker
    # The stalled worker's tasks were redelivered: the ventilator's tasks show a second
    # attempt, and every task is done.
    states, attempts = task_states(cluster.data_dir("V"))
    assert states == ["done"]
    assert attempts >= 2


def test_a_ventilator_killed_mid_run_goes_on_after_restart_and_every_task_has_one_result(
    short_tmp: Path,
) -> None:
    """Issue 18: kill -9 the ventilator with tasks queued, in flight and done; restarted, it
    rebuilds its queue from its `tasks` rows and carries on: the unfinished are delivered
    (again after their lease where needed), the finished are not resent, and the sink keeps
    exactly one result per task."""
    cluster = LocalCluster.create(short_tmp, 4, transport="ipc", names=["V", "W1", "W2", "S"],
                                  options=FAST)
    tasks = 150
    try:
        _start_work_queue(cluster, short_tmp / "logs")
        bodies = [f"task {i}" for i in range(tasks)]
        expected = _submit(cluster, bodies, lease_s=3.0)

        wait_until(lambda: len(_kept(cluster)) >= tasks // 5, PATIENCE_S,
                   "a fifth of the results")
        cluster.nodes["V"].kill()  # kill -9, tasks in every state
        states, _ = task_states(cluster.data_dir("V"))
        assert "done" in states and ("queued" in states or "assigned" in states)
        cluster.restart("V")
        wait_until(lambda: len(_kept(cluster)) >= tasks, PATIENCE_S,
                   "every result after V restarted")
        wait_until(lambda: task_states(cluster.data_dir("V"))[0] == ["done"], PATIENCE_S,
                   "every task done at the ventilator")
        status = meshpost("queue", "status", "work", "--node", "V", "--data",
                          str(cluster.data_dir("V")), "--json")
        assert status.returncode == 0, status.stderr
        [work] = json.loads(status.stdout)
        assert (work["queue"], work["done"], work["waiting"], work["in_flight"]) == (
            "work", tasks, 0, 0)
        assert {w["name"] for w in work["workers"]} == {"W1", "W2"}
        results = _kept(cluster)
    finally:
        cluster.stop()
    assert {t: body for t, _w, _m, body in results} == expected
    assert len(results) == tasks  # one kept result per task
    # Each task message is stored once at its worker, and no worker stored a task twice per
    # attempt; every stored message is the same on both ends.
    report = verify_stores({n: cluster.data_dir(n) for n in ("V", "W1", "W2", "S")})
    assert report.ok, report


def task_states(data_dir: Path) -> tuple[list[str], int]:
    """A ventilator's task states (distinct, sorted) and the most attempts of any task."""
    db = sqlite3.connect(f"file:{data_dir / DB_FILENAME}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT state, MAX(attempts) FROM tasks GROUP BY state").fetchall()
    finally:
        db.close()
    return sorted(str(s) for s, _a in rows), max((int(a) for _s, a in rows), default=0)


def test_a_worker_killed_between_its_results_receipt_and_its_done_sends_the_done_at_start(
    short_tmp: Path,
) -> None:
    """19.4: W dies (os._exit, like kill -9) after S receipted its result and before its
    `done` to V was stored. Restarted, W sends that `done`: V completes the task without
    its lease (an hour here; V's peer timeout too, so V never takes the task back), and the
    task ran once. Before the fix nothing completed it until the lease ran out, and then it
    ran a second time."""
    cluster = LocalCluster.create(short_tmp, 3, transport="ipc", names=["V", "W", "S"],
                                  options={"peer_timeout_s": 3600.0})
    w_dir, logs = cluster.data_dir("W"), short_tmp / "logs"

    def worker(env: dict[str, str] | None) -> NodeProcess:
        return NodeProcess("W", cluster.config_path, w_dir, logs / "W.log",
                           extra_args=("--worker", "work=upper"), env=env)

    w: NodeProcess | None = None
    try:
        cluster.start(["V", "S"])
        w = worker({CRASH_ENV: "after-result-receipt"}).start()
        w.wait_ready()
        wait_until(lambda: any(r.kind == "serve" and r.sender == "W"
                               for r in rows(cluster.data_dir("V"))), PATIENCE_S,
                   "V to have W's serve record")
        expected = _submit(cluster, ["hola"], lease_s=3600.0)
        wait_until(lambda: w is not None and not w.alive(), PATIENCE_S,
                   "W to die before its done")
        w.stop()
        assert [r.kind for r in rows(w_dir) if r.kind in ("result", "done")] == ["result"]
        assert task_states(cluster.data_dir("V")) == (["assigned"], 1)

        w = worker(None).start()
        w.wait_ready()
        wait_until(lambda: task_states(cluster.data_dir("V"))[0] == ["done"], PATIENCE_S,
                   "V to complete the task from W's done")
    finally:
        if w is not None:
            w.stop()
        cluster.stop()
    assert task_states(cluster.data_dir("V")) == (["done"], 1)  # one attempt: run once
    w_rows = rows(w_dir)
    assert sorted(r.kind or "" for r in w_rows if r.kind != "serve") == [
        "done", "result", "task"]
    [done] = [r for r in w_rows if r.kind == "done"]
    assert (done.recipient, done.ref) == ("V", next(iter(expected)))
    assert {t: body for t, _w, _m, body in _kept(cluster)} == expected
    report = verify_stores({n: cluster.data_dir(n) for n in ("V", "W", "S")})
    assert report.ok, report.problems


#: Loaded into each worker through PYTHONPATH: a handler that holds every task until the test
#: opens its gate (a file), so the tasks a ventilator gives a worker stay unfinished there
#: for as long as the test looks (bounded: it lets them go after PATIENCE_S anyway).
GATED_HANDLER = f'''
import os
import time


def gated_upper(text):
    gate = os.environ["MESHPOST_TEST_GATE"]
    deadline = time.monotonic() + {PATIENCE_S}
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.02)
    return text.upper()
'''


def _queue_status(cluster: LocalCluster, node: str = "V") -> QueueStatus:
    with ControlClient(cluster.data_dir(node), name=node) as client:
        reply = checked(client.request(QueueStatusRequest(queue="work"), timeout_s=PATIENCE_S))
    [status] = reply.queues
    return status


def _held(status: QueueStatus) -> dict[str, tuple[bool, int, int]]:
    """Per worker at the ventilator: (live, tasks in flight, the most it is given)."""
    return {w.name: (w.live, w.in_flight, w.prefetch) for w in status.workers}


def _most_held_at_once(data_dir: Path) -> dict[str, int]:
    """From a ventilator's store, per worker, the most unfinished tasks it held at once: its
    task messages and the `done`s it sent, in commit order (rowid), +1 and -1."""
    db = sqlite3.connect(f"file:{data_dir / DB_FILENAME}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT direction, peer, kind, ref FROM messages WHERE kind IN"
                          " ('task', 'done') ORDER BY rowid").fetchall()
    finally:
        db.close()
    held: dict[str, set[str]] = {}
    most: dict[str, int] = {}
    for direction, peer, kind, ref in rows:
        tasks = held.setdefault(peer, set())
        if kind == "task" and direction == "out":
            tasks.add(ref)
        elif kind == "done" and direction == "in":
            tasks.discard(ref)
        most[peer] = max(most.get(peer, 0), len(tasks))
    return most


@pytest.mark.timeout(300)
def test_each_worker_holds_at_most_the_prefetch_it_announced_across_a_ventilator_restart(
    short_tmp: Path,
) -> None:
    """W1 serves with `--prefetch 1`, W2 with `--prefetch 64` (handlers held shut by a gate):
    of 100 tasks V gives W1 one and W2 64 (before, 16 each), and a restarted V (kill -9)
    still gives each what it announced: W1 gets no second task when its link comes back
    (had V forgotten, it would have the default 16 at once). Once the gate opens every task
    has one result, and V's store shows W1 never held two unfinished tasks at once."""
    site = short_tmp / "site"
    site.mkdir()
    (site / "gate_handler.py").write_text(GATED_HANDLER, encoding="utf-8")
    gate = short_tmp / "gate-open"
    env = {"PYTHONPATH": os.pathsep.join([str(site), *filter(None, [
        os.environ.get("PYTHONPATH")])]), "MESHPOST_TEST_GATE": str(gate)}
    cluster = LocalCluster.create(short_tmp, 4, transport="ipc", names=["V", "W1", "W2", "S"],
                                  options=FAST)
    tasks = 100
    try:
        cluster.start(["V", "S"])
        for worker, prefetch in (("W1", "1"), ("W2", "64")):
            node = NodeProcess(worker, cluster.config_path, cluster.data_dir(worker),
                               short_tmp / "logs" / f"{worker}.log", env=env,
                               extra_args=("--worker", "work=gate_handler:gated_upper",
                                           "--prefetch", prefetch))
            cluster.nodes[worker] = node.start()
            node.wait_ready()
        wait_until(lambda: _held(_queue_status(cluster)) == {
            "W1": (True, 0, 1), "W2": (True, 0, 64)}, PATIENCE_S,
            "V to know both workers and their prefetch")
        expected = _submit(cluster, [f"task {i}" for i in range(tasks)], lease_s=600.0)
        # Dispatching is done by the time `submit` answers: each worker's room is full.
        status = _queue_status(cluster)
        assert _held(status) == {"W1": (True, 1, 1), "W2": (True, 64, 64)}
        assert status.waiting == tasks - 65

        cluster.nodes["V"].kill()  # kill -9 with every task unfinished
        cluster.restart("V")
        wait_until(lambda: {live for live, _n, _p in _held(_queue_status(cluster)).values()}
                   == {True}, PATIENCE_S, "V, restarted, to see both workers live again")
        # Up again, each worker was given what room it had at once: none.
        status = _queue_status(cluster)
        assert _held(status) == {"W1": (True, 1, 1), "W2": (True, 64, 64)}
        assert status.waiting == tasks - 65

        gate.touch()
        wait_until(lambda: len(_kept(cluster)) >= tasks, PATIENCE_S, "every result")
        wait_until(lambda: task_states(cluster.data_dir("V"))[0] == ["done"], PATIENCE_S,
                   "every task done at the ventilator")
        results = _kept(cluster)
    finally:
        gate.touch()
        cluster.stop()
    assert {t: body for t, _w, _m, body in results} == expected
    most = _most_held_at_once(cluster.data_dir("V"))
    assert most["W1"] == 1 and most["W2"] == 64, most
    report = verify_stores({n: cluster.data_dir(n) for n in ("V", "W1", "W2", "S")})
    assert report.ok, report

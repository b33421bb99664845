"""`meshpost demo`: a local mesh of real node processes that proves the promise end to end.

Rule: the demo uses only public surfaces a user has (node processes, the control endpoint,
the stores read-only), so what it proves is what a user gets.
"""

from __future__ import annotations

import queue
import random
import shutil
import tempfile
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from meshpost.cluster import LocalCluster
from meshpost.control import ControlClient, ErrorReply, SendRequest, SendResult, StatusRequest
from meshpost.store import StoreReader
from meshpost.text import format_clock
from meshpost.verify import verify_stores

RECEIPT_TIMEOUT_S = 15.0
WORDS = ("hola", "hello", "aloha", "buenos días", "bonjour", "ciao", "olá", "hallo", "salut")


def _fmt_ns(ns: int | None) -> str:
    return "-" if ns is None else format_clock(ns)


def _send(cluster: LocalCluster, sender: str, target: str, body: str) -> list[SendResult]:
    with ControlClient(cluster.data_dir(sender), name=sender) as client:
        reply = client.request(SendRequest(target, body, RECEIPT_TIMEOUT_S),
                               timeout_s=RECEIPT_TIMEOUT_S + 10)
    if isinstance(reply, ErrorReply):
        raise RuntimeError(f"{sender} could not send: {reply.error}")
    return reply.sent


def _event_loop(cluster: LocalCluster, name: str) -> str:
    """The event loop node `name` says it runs on (its status; "?" if it does not say)."""
    with ControlClient(cluster.data_dir(name), name=name) as client:
        reply = client.request(StatusRequest(), timeout_s=10)
    return "?" if isinstance(reply, ErrorReply) else str(reply.status.get("loop", "?"))


Outcome = tuple[str, str, list[SendResult] | BaseException]


def _send_all(cluster: LocalCluster, plan: list[tuple[str, str, str]],
              workers: int) -> queue.Queue[Outcome]:
    """Send the plan from `workers` daemon threads; outcomes arrive on the returned queue.

    Daemon threads, not a thread pool: on Ctrl-C the demo stops at once, where a pool would
    first wait for every send in flight (each up to RECEIPT_TIMEOUT_S).
    """
    todo: queue.Queue[tuple[str, str, str]] = queue.Queue()
    for item in plan:
        todo.put(item)
    done: queue.Queue[Outcome] = queue.Queue()

    def work() -> None:
        while True:
            try:
                sender, target, body = todo.get_nowait()
            except queue.Empty:
                return
            try:
                done.put((sender, body, _send(cluster, sender, target, body)))
            except Exception as exc:  # reported by the main thread, which re-raises it
                done.put((sender, body, exc))

    for _ in range(workers):
        threading.Thread(target=work, daemon=True, name="demo-send").start()
    return done


def run_demo(*, nodes: int = 5, messages: int = 20, root: Path | None = None,
             secure: bool = False, seed: int = 4, loop: str | None = None) -> int:
    """Run the demo; return 0 when every message is receipted and stored on both ends, 130
    when interrupted (Ctrl-C: the nodes are stopped and a temporary folder removed). `loop`
    is the nodes' `--loop` (None: their default)."""
    console = Console(highlight=False)
    keep = root is not None
    root = root or Path(tempfile.mkdtemp(prefix="meshpost-demo-"))
    try:
        return _run_demo(console, nodes, messages, root, secure, seed, keep=keep, loop=loop)
    except KeyboardInterrupt:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
        where = (f"its files are kept in {root}" if keep
                 else f"its temporary folder {root} is removed")
        console.print(f"\n[yellow]demo stopped (Ctrl-C)[/]: every node is stopped; {where}")
        return 130


def _run_demo(console: Console, nodes: int, messages: int, root: Path, secure: bool,
              seed: int, *, keep: bool, loop: str | None = None) -> int:
    rng = random.Random(seed)
    extra = ["--secure"] if secure else []
    extra += ["--loop", loop] if loop else []
    cluster = LocalCluster.create(root, nodes, extra_args=extra)
    if secure:
        from meshpost.keys import generate_mesh_keys

        generate_mesh_keys({n: cluster.data_dir(n) for n in cluster.names})
    console.rule(f"meshpost demo: {nodes} node processes, full mesh over tcp://127.0.0.1")
    started = time.monotonic()
    exit_codes: dict[str, int | None] = {}
    results: list[tuple[str, str, SendResult]] = []
    try:
        cluster.start()
        for name in cluster.names:
            console.print(f"  node [bold]{name}[/] pid {cluster.nodes[name].pid} "
                          f"({_event_loop(cluster, name)}) on {cluster.endpoints[name]}  "
                          f"data {cluster.data_dir(name)}")
        plan = []
        for i in range(messages):
            sender, receiver = rng.sample(cluster.names, 2)
            plan.append((sender, receiver, f"{rng.choice(WORDS)} #{i} from {sender}"))
        broadcaster = rng.choice(cluster.names)
        plan.append((broadcaster, "all", f"broadcast from {broadcaster} to everyone"))
        console.print(f"\nsending {messages} messages between random pairs and one broadcast, "
                      "from every node at once:\n")
        outcomes = _send_all(cluster, plan, nodes)
        for _ in plan:
            sender, body, outcome = outcomes.get(timeout=RECEIPT_TIMEOUT_S + 30)
            if isinstance(outcome, BaseException):
                raise outcome
            for r in outcome:
                results.append((sender, body, r))
                if r.delivered:
                    console.print(
                        f"  [green]✓[/] {sender} → {r.to}  {body!r}  "
                        f"sent {_fmt_ns(r.sent_at_ns)}"
                        f" (sender clock), stored by {r.to} at {_fmt_ns(r.delivered_at_ns)}"
                        f" (its clock, sync={r.sync})"
                    )
                else:
                    console.print(f"  [red]✗[/] {sender} → {r.to}  {body!r}: "
                                  f"{r.error or 'no receipt in time'}")
    finally:
        exit_codes = cluster.stop()
    console.print(f"\nall nodes stopped: exit codes {exit_codes}\n")
    report = verify_stores({n: cluster.data_dir(n) for n in cluster.names})
    inbox: dict[str, dict[str, tuple[str, int]]] = {}
    for name in cluster.names:
        with StoreReader.for_data_dir(cluster.data_dir(name)) as reader:
            inbox[name] = {m.id: (m.body, m.sent_at_ns)
                           for m in reader.history(direction="in")}
    outbox: dict[str, dict[str, str]] = {}
    for name in cluster.names:
        with StoreReader.for_data_dir(cluster.data_dir(name)) as reader:
            outbox[name] = {m.id: m.state for m in reader.history(direction="out")}
    table = Table(title="verification: each message in both nodes' databases")
    for col in ("id", "from → to", "sender clock", "at sender", "at receiver", "identical"):
        table.add_column(col)
    all_good = True
    for sender, body, r in sorted(results, key=lambda x: x[2].sent_at_ns):
        state = outbox[sender].get(r.id, "missing")
        copy = inbox.get(r.to, {}).get(r.id)
        same = copy == (body, r.sent_at_ns)
        good = r.delivered and state == "delivered" and copy is not None and same
        all_good &= good
        table.add_row(r.id[-8:], f"{sender} → {r.to}", _fmt_ns(r.sent_at_ns),
                      state, "stored" if copy else "[red]missing[/]",
                      "[green]yes[/]" if same else "[red]NO[/]")
    console.print(table)
    console.print(f"mesh-wide check: {report.summary()}")
    ok = all_good and report.ok and report.pending == 0 and all(
        c == 0 for c in exit_codes.values())
    elapsed = time.monotonic() - started
    if ok:
        console.print(f"[bold green]OK[/]: {len(results)} messages receipted and stored exactly "
                      f"once on both ends ({elapsed:.1f}s)")
    else:
        console.print(f"[bold red]FAILED[/] ({elapsed:.1f}s); logs in {root / 'logs'}")
        for line in report.problems:
            console.print(f"  {line}")
        keep = True
    if not keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if ok else 1

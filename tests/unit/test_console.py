"""The console: pure rendering, and a session driven through a pipe (its command language is
tested in tests/unit/console/test_commands.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import io
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st
from prompt_toolkit.data_structures import Size
from prompt_toolkit.input import PipeInput, create_pipe_input
from prompt_toolkit.output import DummyOutput, Output
from prompt_toolkit.output.vt100 import Vt100_Output

from meshpost.clock import FakeClock
from meshpost.config import NodeConfig, PeerConfig
from meshpost.console import (
    HELP_TEXT,
    clean,
    format_clock,
    format_incoming,
    format_peer_change,
    format_pending,
    format_queued,
    format_receipt,
    render_history,
    render_peers_table,
    render_stats,
    run_console,
    run_script,
)
from meshpost.errors import EmptyMessage, MessageRejected, UnknownPeer
from meshpost.node import (
    BroadcastProgress,
    FetchedMessage,
    GroupHistory,
    MessageReceived,
    NodeEvent,
    NodeStats,
    Outgoing,
    PeerChange,
    PeerChanged,
    PeerRefused,
    PeerStatus,
    Receipt,
)
from meshpost.protocol import Envelope, ReceiptFrame
from meshpost.protocol.groups import BroadcastStatus
from meshpost.protocol.header import Kind, PatternHeader
from meshpost.protocol.workqueue import QueueStatus, WorkerStatus
from meshpost.store import Delivery, Store, StoredMessage, WriteBatch

UTC = datetime.UTC
#: 2023-11-14 22:13:20 UTC
T0 = 1_700_000_000_000_000_000
MS = 1_000_000
STEP_TIMEOUT_S = 5.0


# -- rendering -------------------------------------------------------------------------------


def test_format_clock() -> None:
    assert format_clock(T0 + 123_456_789, tz=UTC) == "22:13:20.123"
    assert format_clock(T0 + 999 * MS, tz=UTC, date=True) == "2023-11-14 22:13:20.999"
    assert format_clock(-1, tz=UTC) == "23:59:59.999"


@given(st.integers(min_value=-(2**80), max_value=2**80))
def test_format_clock_never_raises(ns: int) -> None:
    assert format_clock(ns, tz=UTC)


def test_clean_escapes_terminal_controls() -> None:
    assert clean("a\x1b[2Jb\u202ec\n") == "a\\u001b[2Jb\\u202ec\n"
    assert clean("héllo 👋\tok") == "héllo 👋\tok"


def envelope(body: str = "hi", *, sender: str = "B", sent_at_ns: int = T0 + 5 * MS) -> Envelope:
    return Envelope(id="m1", seq=1, sender=sender, recipient="A", body=body,
                    sent_at_ns=sent_at_ns, hlc=1)


def test_format_incoming_says_when_a_message_came_to_a_group_or_to_all() -> None:
    def copy(group: str) -> Envelope:
        return msgspec.structs.replace(envelope("hi all"), header=PatternHeader(
            Kind.GROUP, ref="logical-1", queue=group))

    assert format_incoming(copy("team"), tz=UTC).endswith("] B → team: hi all")
    assert format_incoming(copy(""), tz=UTC).endswith("] B → all: hi all")
    assert format_incoming(envelope("hi"), tz=UTC).endswith("] B → me: hi")


def test_format_incoming_uses_the_sender_clock() -> None:
    line = format_incoming(envelope("hello there"), tz=UTC)
    assert line == "[22:13:20.005 sender-clock] B → me: hello there"


def test_format_incoming_indents_lines_and_escapes_controls() -> None:
    line = format_incoming(envelope("one\ntwo\x07"), tz=UTC)
    assert line.endswith("B → me: one\n    two\\u0007")


def outgoing(to: str = "B", body: str = "hi", *, seq: int = 1) -> Outgoing:
    loop = asyncio.new_event_loop()
    try:
        future: asyncio.Future[Receipt] = loop.create_future()
    finally:
        loop.close()
    return Outgoing(id=f"id-{to}-{seq}", to=to, seq=seq, body=body, sent_at_ns=T0, hlc=1,
                    receipt=future)


def test_format_pending_names_every_recipient() -> None:
    assert format_pending("A", [outgoing("B", "hello there")]) == "… A → B: hello there (pending)"
    assert format_pending("A", [outgoing("B"), outgoing("C")]) == "… A → B, C: hi (pending)"
    assert format_pending("A", []) == "… nobody to send to"


def receipt(to: str = "B", *, delivered_at_ns: int = T0 + 250 * MS) -> Receipt:
    return Receipt(message_id="m1", to=to, seq=1, sent_at_ns=T0, delivered_at_ns=delivered_at_ns,
                   received_at_ns=delivered_at_ns - MS, recorded_at_ns=T0 + 3 * MS, sync="full")


def test_format_receipt_shows_the_receiver_clock() -> None:
    # Issue 17 item 13: the line also names the message it receipts (short id, first words).
    assert format_receipt(receipt(), tz=UTC) == (
        "✓ delivered to B at 22:13:20.250 B-clock (3.0 ms after sending) #m1"
    )


def test_format_receipt_names_the_message_by_short_id_and_first_words() -> None:
    r = msgspec.structs.replace(receipt(), message_id="0190abcdef12" + "00000000001a2b3c")
    line = format_receipt(r, body="the quarterly numbers are in " + "x" * 100, tz=UTC)
    assert line.endswith("#1a2b3c 'the quarterly numbers are in…'")


def test_format_queued() -> None:
    assert format_queued("B").startswith("… queued, B unreachable (not connected)")
    assert "no receipt within 2.5s" in format_queued("B", waited_s=2.5)


@pytest.mark.parametrize(
    ("event", "line"),
    [
        (PeerChanged("B", True, PeerChange.CONNECTED), "● B connected"),
        (PeerChanged("B", False, PeerChange.LOST, "silent for 4.0s"), "○ B lost (silent for 4.0s)"),
        (PeerChanged("B", False, PeerChange.LEFT, "shutting down"), "○ B left (shutting down)"),
        (PeerChanged("B", False, PeerChange.REFUSED, "wrong mesh"), "✗ B refused: wrong mesh"),
        (PeerChanged("B", False, PeerChange.JOINED, "via beacon at tcp://127.0.0.1:7002"),
         "+ B joined via beacon at tcp://127.0.0.1:7002"),
    ],
)
def test_format_peer_change(event: PeerChanged, line: str) -> None:
    assert format_peer_change(event) == line


def peer_status(name: str = "B", *, connected: bool = True, **kw: object) -> PeerStatus:
    fields: dict[str, object] = {
        "name": name, "endpoint": f"tcp://127.0.0.1:{5000 + ord(name[0])}",
        "connected": connected, "state": "ready" if connected else "connecting",
        "last_seen_ns": T0 - 1500 * MS, "rtt_ns": 1_500_000, "offset_ns": 2_250_000,
        "unacknowledged": 3, "refusal": None,
    }
    fields.update(kw)
    return PeerStatus(**fields)  # type: ignore[arg-type]


def test_render_peers_table() -> None:
    text = render_peers_table(
        [peer_status("B"), peer_status("C", connected=False, last_seen_ns=None, rtt_ns=None,
                                      offset_ns=None, unacknowledged=0),
         peer_status("D", connected=False, refusal="mesh: other mesh"),
         peer_status("E", connected=False, state="idle", last_seen_ns=T0 - 90_000 * MS)],
        now_ns=T0, width=140,
    )
    e_row = next(line for line in text.splitlines() if " E " in line)
    assert "idle" in e_row and "unreachable" not in e_row  # an idle link is not down
    assert "2m ago" in e_row  # when it was last heard
    b_row = next(line for line in text.splitlines() if " B " in line)
    assert "tcp://127.0.0.1:5066" in b_row
    assert "connected" in b_row
    assert "1.5s ago" in b_row
    assert "1.50" in b_row
    assert "+2.25" in b_row
    assert re.search(r"\b3\b", b_row)
    c_row = next(line for line in text.splitlines() if " C " in line)
    assert "unreachable (connecting)" in c_row
    assert "never" in c_row
    assert "refused (mesh: other mesh)" in text
    for header in ("peer", "endpoint", "state", "last seen", "rtt ms", "offset ms", "unacked"):
        assert header in text
    assert render_peers_table([], now_ns=T0) == "no peers configured"


def stored(
    direction: str, state: str, body: str, *, sent: int, at: int, receipt_at: int | None = None,
    reason: str | None = None,
) -> StoredMessage:
    peer = "B"
    sender, recipient = ("A", peer) if direction == "out" else (peer, "A")
    return StoredMessage(
        id=f"{direction}-{sent}", direction=direction, peer=peer, sender=sender,
        recipient=recipient, seq=1, body=body, sent_at_ns=sent, hlc=sent, state=state,
        stored_at_ns=at, receipt_stored_at_ns=receipt_at, receipt_received_at_ns=receipt_at,
        receipt_arrived_at_ns=receipt_at, receipt_sync="full" if receipt_at else None,
        receipt_hlc=None, reject_reason=reason,
    )


def test_render_history_shows_both_clocks_direction_and_state() -> None:
    rows = [
        stored("out", "delivered", "greeting", sent=T0, at=T0 + 1 * MS, receipt_at=T0 + 40 * MS),
        stored("in", "received", "[bold]reply[/bold] :smile:", sent=T0 + 100 * MS,
               at=T0 + 900 * MS),
        stored("out", "pending", "waiting", sent=T0 + 2000 * MS, at=T0 + 2001 * MS),
        stored("out", "rejected", "bad", sent=T0 + 3000 * MS, at=T0 + 3001 * MS,
               reason="conflict: reused id"),
    ]
    text = render_history(rows, me="A", tz=UTC, width=140)
    assert "2023-11-14" in text
    first = next(line for line in text.splitlines() if "greeting" in line)
    assert "22:13:20.000" in first
    assert "22:13:20.001" in first
    assert "me → B" in first
    assert "✓ 22:13:20.040 B-clock" in first
    reply = next(line for line in text.splitlines() if "reply" in line)
    assert "[bold]reply[/bold] :smile:" in reply  # bodies are text, never markup
    assert "22:13:20.100" in reply
    assert "22:13:20.900" in reply
    assert "B → me" in reply
    assert "received" in reply
    assert "… pending" in next(line for line in text.splitlines() if "waiting" in line)
    assert "✗ rejected: conflict: reused id" in text
    assert render_history([], me="A") == "no messages yet"


def test_render_stats() -> None:
    text = render_stats(NodeStats(sent=4, delivered=3))
    assert re.search(r"^sent\s+4$", text, re.M)
    assert re.search(r"^delivered\s+3$", text, re.M)
    assert "retransmissions" in text


# -- the console, driven through a pipe ------------------------------------------------------


class FakeNode:
    """The slice of `Node` the console uses; posts are recorded and receipts resolved by hand."""

    def __init__(self, data_dir: Path, *, connected: tuple[str, ...] = ("B", "C")) -> None:
        self.config = NodeConfig(
            name="A",
            bind=("tcp://127.0.0.1:7001",),
            peers=(PeerConfig("B", "tcp://127.0.0.1:7002"),
                   PeerConfig("C", "tcp://127.0.0.1:7003")),
            data_dir=data_dir,
            groups={"team": ("A", "B", "C")},
        )
        self.name = "A"
        self.clock = FakeClock(wall=T0)
        self.connected = set(connected)
        self.posted: list[tuple[str, str]] = []
        self.handles: list[Outgoing] = []
        self.queues: list[asyncio.Queue[NodeEvent]] = []
        self.seq = 0
        self.groups: dict[str, list[str]] = {}
        self.asked: list[tuple[str, int]] = []

    async def post(self, target: str, body: str) -> list[Outgoing]:
        peers = self.resolve(target)
        self.validate_body(body)
        self.posted.append((target, body))
        loop = asyncio.get_running_loop()
        handles = []
        for peer in peers:
            self.seq += 1
            handles.append(Outgoing(f"id{self.seq}", peer, self.seq, body, T0, self.seq,
                                    loop.create_future()))
        self.handles.extend(handles)
        return handles

    def resolve(self, target: str) -> list[str]:
        if target.lower() == "all":
            return self.config.peer_names
        if target in self.config.peer_names:
            return [target]
        if target in self.config.groups:
            return [m for m in self.config.groups[target] if m != self.name]
        raise UnknownPeer(target, [*self.config.peer_names, "all"])

    def validate_body(self, body: str) -> None:
        if not body.strip():
            raise EmptyMessage()

    def peers(self) -> list[PeerStatus]:
        return [peer_status(p, connected=p in self.connected) for p in self.config.peer_names]

    def subscribe(self) -> asyncio.Queue[NodeEvent]:
        queue: asyncio.Queue[NodeEvent] = asyncio.Queue()
        self.queues.append(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[NodeEvent]) -> None:
        self.queues.remove(queue)

    def publish(self, event: NodeEvent) -> None:
        for queue in self.queues:
            queue.put_nowait(event)

    def snapshot_stats(self) -> NodeStats:
        return NodeStats(sent=self.seq)

    async def join(self, group: str) -> bool:
        self.groups.setdefault(group, ["B"])
        if self.name in self.groups[group]:
            return False
        self.groups[group] = sorted([*self.groups[group], self.name])
        return True

    async def leave(self, group: str) -> bool:
        if self.name not in self.groups.get(group, []):
            return False
        self.groups[group].remove(self.name)
        return True

    def members(self, group: str) -> list[str]:
        return self.groups.get(group, [])

    async def fetch_group_history(self, group: str, *, limit: int = 50, before_hlc: int = 0,
                                  timeout_s: float | None = 5.0) -> GroupHistory:
        self.asked.append((group, limit))
        return GroupHistory(group, (
            FetchedMessage("B", group, "l1", T0, 1, "before you came"),
            FetchedMessage("B", group, "l2", T0 + MS, 2, "and again")), ("B",),
            {"C": "not-delivered"})

    async def queue_status(self, queue: str | None = None) -> list[QueueStatus]:
        statuses = [QueueStatus("work", (WorkerStatus("B", True, False, 2),
                                         WorkerStatus("C", False, True, 1)),
                                waiting=4, in_flight=3, leased=2, done=40, redelivered=5,
                                results=0)]
        return [q for q in statuses if queue in (None, q.queue)]

    def deliver(self, handle: Outgoing) -> None:
        handle.receipt.set_result(receipt(handle.to))


class Driver:
    """A console session under test: type lines, wait for printed output."""

    def __init__(self, node: FakeNode, pipe: PipeInput) -> None:
        self.node = node
        self.pipe = pipe
        self.lines: list[str] = []
        self.printed_more = asyncio.Event()

    def print(self, line: str) -> None:
        """The console's printer."""
        self.lines.append(line)
        self.printed_more.set()

    def type(self, text: str) -> None:
        self.pipe.send_text(text)

    async def until(self, what: Callable[[], bool], describe: str) -> None:
        async def poll() -> None:
            while not what():
                self.printed_more.clear()
                await self.printed_more.wait()

        try:
            await asyncio.wait_for(poll(), STEP_TIMEOUT_S)
        except TimeoutError:
            pytest.fail(f"timed out waiting for {describe}; printed so far: {self.lines}")

    async def printed(self, pattern: str) -> str:
        """Wait for a printed line matching `pattern`; return it."""
        def found() -> bool:
            return any(re.search(pattern, line) for line in self.lines)

        await self.until(found, repr(pattern))
        return next(line for line in self.lines if re.search(pattern, line))


Scenario = Callable[[Driver], Awaitable[None]]


def drive(
    node: FakeNode, scenario: Scenario, *, receipt_wait_s: float = 5.0,
    terminal: Output | None = None,
) -> Driver:
    """Run the console with a pipe as keyboard while `scenario` types and checks.

    Printed lines are collected by the driver, or with `terminal`, go there the default way.
    """
    async def main(pipe: PipeInput) -> None:
        driver.pipe = pipe
        console = asyncio.create_task(run_console(
            node, input=pipe, output=terminal or DummyOutput(),
            printer=None if terminal else driver.print, receipt_wait_s=receipt_wait_s,
        ))
        try:
            await asyncio.wait_for(scenario(driver), STEP_TIMEOUT_S * 4)
            await asyncio.wait_for(console, STEP_TIMEOUT_S)
        finally:
            console.cancel()

    with create_pipe_input() as pipe:
        driver = Driver(node, pipe)
        asyncio.run(main(pipe))
    assert node.queues == [], "the console must unsubscribe when it ends"
    return driver


@pytest.fixture
def node(tmp_path: Path) -> FakeNode:
    return FakeNode(tmp_path)


def test_send_shows_pending_then_delivered(node: FakeNode) -> None:
    async def scenario(d: Driver) -> None:
        d.type("@B hi\n")
        assert await d.printed("pending") == "… A → B: hi (pending)"
        assert node.posted == [("B", "hi")]
        node.deliver(node.handles[0])
        assert (await d.printed("✓")).startswith("✓ delivered to B at ")
        d.type("/quit\n")

    d = drive(node, scenario)
    assert not any("queued" in line for line in d.lines)


def test_incoming_and_peer_events_print_while_prompting(node: FakeNode) -> None:
    async def scenario(d: Driver) -> None:
        await d.printed("/help for commands")
        node.publish(MessageReceived(envelope("hello from B", sent_at_ns=T0), T0 + MS))
        line = await d.printed("hello from B")
        assert re.fullmatch(r"\[\d\d:\d\d:\d\d\.000 sender-clock\] B → me: hello from B", line)
        node.publish(PeerChanged("C", False, PeerChange.LOST, "silent for 4.0s"))
        await d.printed(r"○ C lost \(silent for 4\.0s\)")
        d.type("/quit\n")

    drive(node, scenario)


def test_join_leave_and_members_and_a_peers_membership_record_shown_as_such(
    node: FakeNode,
) -> None:
    async def scenario(d: Driver) -> None:
        d.type("/join ops\n")
        assert await d.printed("joined") == "● joined ops"
        assert await d.printed("ops:") == "ops: A, B"
        d.type("/join ops\n")
        await d.printed("already in ops")
        d.type("/leave ops\n")
        assert await d.printed("left") == "○ left ops"
        d.type("/members ops\n")
        await d.printed("ops: B$")
        joined = msgspec.structs.replace(envelope("join", sent_at_ns=T0),
                                         header=PatternHeader(Kind.MEMBER, queue="ops",
                                                              version=3))
        node.publish(MessageReceived(joined, T0 + MS))
        assert await d.printed("B joined") == "● B joined ops"
        d.type("/quit\n")

    d = drive(node, scenario)
    assert not any("→ me: join" in line for line in d.lines)


def test_a_message_to_a_group_counts_delivered_k_of_n_naming_the_pending(
    node: FakeNode,
) -> None:
    async def scenario(d: Driver) -> None:
        d.type("@team to the team\n")
        await d.printed(r"… A → B, C: to the team \(pending\)")
        node.deliver(node.handles[0])
        assert (await d.printed("✓ delivered to B")).endswith(
            " · delivered 1/2 (pending: C)")
        node.deliver(node.handles[1])
        assert (await d.printed("✓ delivered to C")).endswith(" · delivered 2/2")
        d.type("@B just B\n")
        await d.printed(r"… A → B: just B \(pending\)")
        node.deliver(node.handles[2])
        assert "·" not in await d.printed("✓ delivered to B .* 'just B'")
        d.type("/quit\n")

    drive(node, scenario)


def test_unreachable_peer_is_queued_and_delivered_later(node: FakeNode) -> None:
    node.connected = {"B"}

    async def scenario(d: Driver) -> None:
        d.type("@all hello everyone\n")
        await d.printed(r"… A → B, C: hello everyone \(pending\)")
        await d.printed(r"… queued, C unreachable \(not connected\)")
        assert [h.to for h in node.handles] == ["B", "C"]
        node.deliver(node.handles[1])
        await d.printed("✓ delivered to C")
        node.deliver(node.handles[0])
        await d.printed("✓ delivered to B")
        d.type("/quit\n")

    d = drive(node, scenario)
    assert not any("queued, B" in line for line in d.lines)


def test_slow_receipt_is_reported_queued_then_delivered(node: FakeNode) -> None:
    async def scenario(d: Driver) -> None:
        d.type("@team slow\n")
        await d.printed(r"… A → B, C: slow \(pending\)")
        await d.printed(r"… queued, B unreachable \(no receipt within 0.05s\)")
        await d.printed(r"… queued, C unreachable")
        for handle in node.handles:
            node.deliver(handle)
        await d.printed("✓ delivered to B")
        await d.printed("✓ delivered to C")
        d.type("/quit\n")

    drive(node, scenario, receipt_wait_s=0.05)


def test_rejection_is_shown(node: FakeNode) -> None:
    async def scenario(d: Driver) -> None:
        d.type("@B nope\n")
        await d.printed("pending")
        node.handles[0].receipt.set_exception(MessageRejected("id1", "B", "conflict", "reused"))
        await d.printed(r"✗ 'B' rejected message id1 \(conflict\): reused")
        d.type("/quit\n")

    drive(node, scenario)


def test_last_recipient_hints_and_errors(node: FakeNode) -> None:
    async def scenario(d: Driver) -> None:
        d.type("hello?\n")
        await d.printed("start with a recipient")
        d.type("@Z hi\n")
        await d.printed(r"✗ unknown peer 'Z'; known peers: B, C, all")
        d.type("@B\n")
        await d.printed("✗ nothing to send")
        d.type("/history -n abc\n")
        await d.printed("✗ -n wants a whole number")
        d.type("/frobnicate\n")
        await d.printed(r"✗ unknown command `/frobnicate`")
        d.type("@C first\n")
        await d.printed("A → C: first")
        d.type("second\n")
        await d.printed("A → C: second")
        d.type("/quit\n")

    drive(node, scenario)
    assert node.posted == [("C", "first"), ("C", "second")]


def test_peers_stats_help_and_history(node: FakeNode, tmp_path: Path) -> None:
    store = Store.open(tmp_path, name="A")
    store.apply(WriteBatch(outgoing=[
        Envelope("m1", 1, "A", "B", "stored for B", T0, T0),
        Envelope("m2", 1, "A", "C", "stored for C", T0 + MS, T0 + MS),
    ]), T0 + 2 * MS)
    store.close()

    async def scenario(d: Driver) -> None:
        d.type("/peers\n")
        await d.printed(r"offset ms")
        d.type("/stats\n")
        await d.printed(r"^sent\s+0")
        d.type("/help\n")
        await d.printed(re.escape(HELP_TEXT.splitlines()[0]))
        d.type("/history B -n 5\n")
        table = await d.printed("stored for B")
        assert "stored for C" not in table
        assert "me → B" in table
        assert "… pending" in table
        assert table.startswith("history of A with B (oldest first)")  # as `history --peer B`
        # Issue 17 item 16: a name that is no peer at all is said to be unknown.
        d.type("/history nobody\n")
        await d.printed(r"✗ unknown peer 'nobody'; known peers: B, C")
        d.type("/quit\n")

    drive(node, scenario)


def test_history_without_a_store_says_so(node: FakeNode) -> None:
    async def scenario(d: Driver) -> None:
        d.type("/history\n")
        await d.printed("✗ no meshpost database at .*has this node ever run")
        d.type("/quit\n")

    drive(node, scenario)


def test_end_of_input_ends_the_console(node: FakeNode) -> None:
    async def scenario(d: Driver) -> None:
        await d.printed("/help for commands")
        d.pipe.close()

    drive(node, scenario)


@pytest.mark.parametrize("key", ["\x04", "\x03"], ids=["ctrl-d", "ctrl-c"])
def test_ctrl_d_and_ctrl_c_quit(node: FakeNode, key: str) -> None:
    async def scenario(d: Driver) -> None:
        await d.printed("/help for commands")
        d.type(key)

    drive(node, scenario)


def test_default_printer_writes_above_the_prompt_in_order(node: FakeNode) -> None:
    screen = io.StringIO()
    terminal = Vt100_Output(screen, lambda: Size(rows=24, columns=100), enable_cpr=False)

    def shown() -> str:
        return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.getvalue())

    async def on_screen(text: str) -> None:
        for _ in range(int(STEP_TIMEOUT_S / 0.01)):
            if text in shown():
                return
            await asyncio.sleep(0.01)
        pytest.fail(f"{text!r} never reached the terminal: {shown()!r}")

    async def scenario(d: Driver) -> None:
        d.type("@B hi\n")
        await on_screen("(pending)")
        node.deliver(node.handles[0])
        await on_screen("✓ delivered to B")
        node.publish(MessageReceived(envelope("news"), T0))
        await on_screen("B → me: news")
        d.type("/quit\n")

    drive(node, scenario, terminal=terminal)
    text = shown()
    order = ["/help for commands", "A → B: hi (pending)", "✓ delivered to B", "B → me: news"]
    positions = [text.index(line) for line in order]
    assert positions == sorted(positions), text
    assert re.search(r"\x1b\[[0-9;]*32m✓ delivered", screen.getvalue()), "receipts are green"


# -- issue 17: console polish ------------------------------------------------------------------


def test_peers_connected_before_the_console_started_are_shown_once(node: FakeNode) -> None:
    node.connected = {"B"}

    async def scenario(d: Driver) -> None:
        await d.printed("● B connected")
        # The event that may follow the snapshot says nothing new: not shown twice.
        node.publish(PeerChanged("B", True, PeerChange.CONNECTED))
        node.publish(PeerChanged("C", True, PeerChange.CONNECTED))
        await d.printed("● C connected")
        d.type("/quit\n")

    d = drive(node, scenario)
    assert d.lines.count("● B connected") == 1
    assert d.lines.index("● B connected") < d.lines.index("● C connected")


def test_ctrl_c_clears_a_half_typed_line_and_leaves_on_an_empty_one(node: FakeNode) -> None:
    async def scenario(d: Driver) -> None:
        await d.printed("/help for commands")
        d.type("@B never sent")
        d.type("\x03")
        d.type("@B sent\n")
        await d.printed("pending")
        d.type("\x03")

    drive(node, scenario)
    assert node.posted == [("B", "sent")]


def test_delivery_line_names_the_message_it_receipts(node: FakeNode) -> None:
    async def scenario(d: Driver) -> None:
        d.type("@B first words of a long message that goes on and on and on and on and on\n")
        await d.printed("pending")
        node.deliver(node.handles[0])
        line = await d.printed("✓")
        assert line.endswith("#m1 'first words of a long message…'"), line
        d.type("/quit\n")

    drive(node, scenario)


def test_a_peer_that_refuses_us_is_shown_as_a_refusal_not_a_queue(node: FakeNode) -> None:
    node.connected = {"B"}
    refused = peer_status("C", connected=False, refusal="unknown-peer: 'A' is not a peer of 'C'")
    node.peers = lambda: [peer_status("B"), refused]  # type: ignore[method-assign]

    async def scenario(d: Driver) -> None:
        d.type("@C hello\n")
        line = await d.printed("✗ C refuses us")
        assert "'A' is not a peer of 'C'" in line
        d.type("/quit\n")

    d = drive(node, scenario)
    assert not any("queued" in line for line in d.lines)


def test_the_receiver_says_whom_it_refused_and_why(node: FakeNode) -> None:
    async def scenario(d: Driver) -> None:
        await d.printed("/help for commands")
        node.publish(PeerRefused("Z", "unknown-peer", "'Z' is not a peer of 'A'"))
        line = await d.printed("refused a connection")
        assert line == "✗ refused a connection from 'Z': 'Z' is not a peer of 'A'"
        d.type("/quit\n")

    drive(node, scenario)


def test_history_shortens_long_bodies_and_v_shows_them_whole(
    node: FakeNode, tmp_path: Path
) -> None:
    long_body = "word " * 60 + "END"
    store = Store.open(tmp_path, name="A")
    store.apply(WriteBatch(outgoing=[Envelope("m1", 1, "A", "B", long_body, T0, T0)]),
                T0 + MS)
    store.close()

    async def scenario(d: Driver) -> None:
        d.type("/history\n")
        short = await d.printed("me → B")
        assert "END" not in short
        assert "…" in short
        d.type("/history -v\n")
        await d.until(lambda: "END" in d.lines[-1], "the whole body")
        d.type("/quit\n")

    drive(node, scenario)


@pytest.mark.parametrize("width", [40, 60, 80, 120])
def test_tables_fit_the_terminal_width(width: int) -> None:
    rows = [stored("out", "delivered", "x" * 500, sent=T0, at=T0 + MS, receipt_at=T0 + 2 * MS),
            stored("in", "received", "y " * 200, sent=T0 + MS, at=T0 + 2 * MS)]
    peers = [peer_status("B", endpoint="tcp://127.0.0.1:5" + "5" * 4,
                         refusal=None, connected=False, state="connecting" * 5)]
    for text in (render_history(rows, me="A", tz=UTC, width=width),
                 render_history(rows, me="A", tz=UTC, width=width, verbose=True),
                 render_peers_table(peers, now_ns=T0, width=width)):
        widest = max(len(line) for line in text.splitlines())
        assert widest <= width, text


def test_an_attached_console_says_once_that_its_node_stopped_and_shows_dropped_events(
    node: FakeNode,
) -> None:
    """What `RemoteNode` publishes when its node died (pending sends fail with NodeStopped
    too), and when the node dropped events for a console that fell behind."""
    from meshpost.control import EventsDropped, NodeGone
    from meshpost.errors import NodeStopped

    async def scenario(d: Driver) -> None:
        d.type("@B hi\n")
        await d.printed("pending")
        node.publish(EventsDropped(7))  # type: ignore[arg-type]
        assert await d.printed("fell behind") == (
            "… 7 event(s) not shown: this console fell behind (/history has every message)")
        node.handles[0].receipt.set_exception(NodeStopped("A"))
        node.publish(NodeGone("A"))  # type: ignore[arg-type]
        await d.printed("stopped")
        d.type("/help\n")
        await d.printed("/quit")
        assert [line for line in d.lines if "stopped" in line] == [
            "✗ node 'A' stopped; start it again, then attach again"]
        d.type("/quit\n")

    drive(node, scenario)


def test_queue_shows_workers_and_task_counts(node: FakeNode) -> None:
    async def scenario(d: Driver) -> None:
        d.type("/queue work\n")
        shown = (await d.printed("^work: ")).splitlines()
        # B live with two tasks in flight, C not live and suspect with one.
        assert shown[:2] == [
            "work: workers B* (2/16), C? (1/16)",
            "  waiting 4 · in flight 3 (leased 2) · done 40 · redelivered 5 · abandoned 0"
            " · results kept 0"]
        d.type("/queue nothing\n")
        await d.printed("no work queues known here")
        d.type("/queue a b\n")
        await d.printed("/queue takes at most one queue name")
        d.type("/quit\n")

    drive(node, scenario)


def test_history_of_a_group_shows_its_messages_ours_once_with_k_of_n(
    node: FakeNode, tmp_path: Path,
) -> None:
    # A sent one message to team (two copies, B receipted its copy), B sent one to team, and
    # A has a direct message to B: `/history team` shows the two group messages only.
    copy = PatternHeader(Kind.GROUP, "logical-1", "team")
    store = Store.open(tmp_path, name="A")
    store.apply(WriteBatch(outgoing=[
        Envelope("c1", 1, "A", "B", "hello team", T0, T0, copy),
        Envelope("c2", 1, "A", "C", "hello team", T0, T0 + 1, copy),
        Envelope("d1", 2, "A", "B", "just for B", T0, T0 + 2),
    ]), T0 + MS)
    store.apply(WriteBatch(
        incoming=[[Envelope("b1", 1, "B", "A", "hi from B", T0 + 3 * MS, T0 + 3 * MS,
                            PatternHeader(Kind.GROUP, "logical-2", "team"))]],
        deliveries=[Delivery("B", [1], ReceiptFrame([(1, 1)], 0, T0, T0, T0, T0, "full"),
                             T0 + 4 * MS)]), T0 + 4 * MS)
    store.close()

    async def scenario(d: Driver) -> None:
        d.type("/history team\n")
        table = await d.printed("messages to team")
        assert table.count("me → team") == 1
        # The state cell may wrap in a narrow terminal: read it across its lines.
        cells = " ".join(line.split("│")[-2].strip() for line in table.splitlines()
                         if line.count("│") > 2)
        assert "delivered 1/2 (pending: C)" in cells
        assert "B → team" in table
        assert "just for B" not in table
        d.type("/history B\n")  # a peer's name is still a peer's history
        await d.printed("just for B")
        d.type("/quit\n")

    drive(node, scenario)


def test_an_attached_console_prints_an_earlier_broadcasts_k_of_n(node: FakeNode) -> None:
    """What `RemoteNode` makes of an `events` reply carrying a broadcast's progress prints as
    the local console prints the node's own event."""
    from meshpost.control import BroadcastProgressInfo, EventsReply
    from meshpost.remote import console_events

    status = BroadcastStatus("0123456789abcdef", "team", 3, ("B",), ("C",), (("D", "full"),))
    reply = EventsReply(broadcasts=[BroadcastProgressInfo(status)])

    async def scenario(d: Driver) -> None:
        for event in console_events(reply, "A"):
            node.publish(event)  # type: ignore[arg-type]
        line = await d.printed("earlier message to team")
        assert "delivered 1/3" in line, line
        d.type("/quit\n")

    drive(node, scenario)


def test_a_broadcast_from_before_a_restart_prints_its_k_of_n(node: FakeNode) -> None:
    async def scenario(d: Driver) -> None:
        node.publish(BroadcastProgress(BroadcastStatus("0123456789abcdef", "team", 2,
                                                       ("B", "C"), ())))
        line = await d.printed("earlier message to team")
        assert line.endswith(": delivered 2/2")
        d.type("/quit\n")

    drive(node, scenario)


def test_history_ask_shows_each_members_messages_labelled_and_who_did_not_answer(
    node: FakeNode,
) -> None:
    async def scenario(d: Driver) -> None:
        d.type("/history team --ask -n 7\n")
        first = await d.printed("before you came")
        assert first.endswith("B → team (earlier): before you came")
        await d.printed("B → team \\(earlier\\): and again")
        await d.printed("answered: B \\(1/2\\)")
        await d.printed("no answer from C: not-delivered")
        assert node.asked == [("team", 7)]
        d.type("/history B --ask\n")  # a peer is no group
        await d.printed("--ask asks the members of a group")
        assert node.asked == [("team", 7)]
        d.type("/quit\n")

    drive(node, scenario)


def test_render_history_names_the_kind_of_pattern_messages() -> None:
    """A worker's `serve`, a task's `done`, a request and its reply are not text anyone typed:
    each says its kind; a direct message shows its body alone."""
    rows = [
        dataclasses.replace(stored("in", "received", "serve", sent=T0, at=T0 + MS),
                            kind="serve"),
        dataclasses.replace(stored("in", "received", "ping", sent=T0 + 2 * MS, at=T0 + 3 * MS),
                            kind="request"),
        dataclasses.replace(stored("out", "delivered", "done", sent=T0 + 4 * MS, at=T0 + 5 * MS,
                                   receipt_at=T0 + 6 * MS), kind="done", ref="t1"),
        stored("in", "received", "plain words", sent=T0 + 7 * MS, at=T0 + 8 * MS),
    ]
    lines = render_history(rows, me="A", tz=UTC, width=140).splitlines()
    assert any("(serve) serve" in line for line in lines)
    assert any("(request) ping" in line for line in lines)
    assert any("(done) done" in line for line in lines)
    plain = next(line for line in lines if "plain words" in line)
    assert "(" not in plain
    # In a group's own history every row is a group message: that kind goes unsaid.
    copy = dataclasses.replace(stored("in", "received", "hi team", sent=T0, at=T0 + MS),
                               kind="group", ref="g1")
    assert "(group)" not in render_history([copy], me="A", tz=UTC, width=140, group="team")
    assert "(group) hi team" in render_history([copy], me="A", tz=UTC, width=140)


def test_a_script_runs_each_line_prints_plainly_and_waits_for_the_receipts(
    node: FakeNode,
) -> None:
    """`meshpost attach < script`: each line echoed after the prompt, its output below, and
    the end of the script waits for the receipts of what it sent."""
    printed: list[str] = []

    async def lines() -> AsyncIterator[str]:
        for line in ("@B hi\n", "/stats\n", "/bogus\n", "again\n"):
            yield line

    async def deliver_when_posted() -> None:
        delivered = 0
        while delivered < 2:
            while len(node.handles) <= delivered:
                await asyncio.sleep(0.01)
            node.deliver(node.handles[delivered])
            delivered += 1

    async def main() -> None:
        deliverer = asyncio.create_task(deliver_when_posted())
        await asyncio.wait_for(run_script(node, lines(), printer=printed.append, width=100),
                               STEP_TIMEOUT_S * 4)
        await asyncio.wait_for(deliverer, STEP_TIMEOUT_S)

    asyncio.run(main())
    assert node.queues == [], "the script must unsubscribe when it ends"
    assert printed[0] == "meshpost console of A; commands from standard input"
    assert "A> @B hi" in printed
    assert "A → B> /bogus" in printed
    assert "✗ unknown command `/bogus`; type /help for the list" in printed
    assert "A → B> again" in printed
    assert any(re.match(r"^sent\s+1$", line, re.M) for line in printed)
    receipts = [line for line in printed if line.startswith("✓ delivered to B at ")]
    assert len(receipts) == 2, printed
    assert printed.index("A> @B hi") < printed.index(receipts[0])


def test_format_incoming_says_what_a_pattern_message_is() -> None:
    """A reply, a worker's `serve` or a task's `done` is not text someone typed to this node
    (the console and `meshpost tail` showed `B → me: pong` for a reply)."""
    reply = msgspec.structs.replace(envelope("pong"), header=PatternHeader(Kind.REPLY, "r1"))
    assert format_incoming(reply, tz=UTC).endswith("] B → me: (reply) pong")
    serve = dataclasses.replace(stored_row("serve"), kind="serve")
    assert format_incoming(serve, tz=UTC).endswith("] B → me: (serve) serve")
    assert format_incoming(stored_row("hola"), tz=UTC).endswith("] B → me: hola")


def stored_row(body: str) -> StoredMessage:
    return StoredMessage(id="m1", direction="in", peer="B", sender="B", recipient="A", seq=1,
                         body=body, sent_at_ns=T0, hlc=1, state="received", stored_at_ns=T0,
                         receipt_stored_at_ns=None, receipt_received_at_ns=None,
                         receipt_arrived_at_ns=None, receipt_sync=None, receipt_hlc=None,
                         reject_reason=None)


def test_a_members_history_request_is_said_as_such_not_as_its_json(node: FakeNode) -> None:
    """B's `/history team --ask` reached A's console as `B → me: {"limit":20,...}`."""
    asked = msgspec.structs.replace(envelope('{"limit":20,"before_hlc":0}'),
                                    header=PatternHeader(Kind.REQUEST, queue="team"))

    async def scenario(d: Driver) -> None:
        await d.printed("/help for commands")
        node.publish(MessageReceived(asked, T0 + MS))
        assert await d.printed("asked for") == "… B asked for this node's messages to team"
        d.type("/quit\n")

    d = drive(node, scenario)
    assert not any("limit" in line for line in d.lines)


def test_history_ask_replies_are_not_printed_as_messages_and_a_late_one_is_announced(
    node: FakeNode,
) -> None:
    """The members' answers to `/history team --ask` printed as `B → me: []` beside the
    fetch's own lines; a member that answers after the wait is said to have answered late."""
    node.groups["team"] = ["A", "B", "C"]

    def reply(sender: str, body: str) -> MessageReceived:
        message = msgspec.structs.replace(envelope(body, sender=sender),
                                          header=PatternHeader(Kind.REPLY, f"q-{sender}"))
        return MessageReceived(message, T0 + MS)

    async def scenario(d: Driver) -> None:
        d.type("/history team --ask\n")
        await d.printed("no answer from C: not-delivered")
        node.publish(reply("B", "[]"))  # B's answer, which the fetch has shown
        node.publish(reply("C", '[["l9",1,1,"late news"]]'))  # C's, after the wait
        assert await d.printed("C answered") == ("… C answered `/history team --ask` late; ask "
                                           "again to see its messages")
        node.publish(reply("B", "pong"))  # a reply to anything else is shown as one
        await d.printed(r"B → me: \(reply\) pong")
        d.type("/quit\n")

    d = drive(node, scenario)
    assert not any("→ me: (reply) [" in line or "late news" in line for line in d.lines)


def test_a_peer_found_by_beacon_before_the_console_started_is_shown_joined(
    node: FakeNode,
) -> None:
    """With --discover, a node that heard its peer's beacon before its console subscribed
    showed only `● B connected`, never `+ B joined via beacon at ...` (README, LAN)."""
    found = peer_status("D", found="beacon", endpoint="tcp://127.0.0.1:7004")
    node.peers = lambda: [found]  # type: ignore[method-assign]

    async def scenario(d: Driver) -> None:
        await d.printed("● D connected")
        d.type("/quit\n")

    d = drive(node, scenario)
    assert d.lines[d.lines.index("● D connected") - 1] == \
        "+ D joined via beacon at tcp://127.0.0.1:7004"

"""The interactive console of a running node: type `@B hello`, see receipts and arrivals live.

Rule: parsing and rendering are pure functions of their arguments (text in, `Command` or text
out); only `run_console` touches the terminal, the node and the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import functools
import io
import logging
import re
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, Protocol, assert_never

from prompt_toolkit import PromptSession
from prompt_toolkit.application import run_in_terminal
from prompt_toolkit.application.current import create_app_session, get_app_session
from prompt_toolkit.completion import WordCompleter
from prompt_toolkit.formatted_text import FormattedText
from prompt_toolkit.input import Input
from prompt_toolkit.output import Output
from prompt_toolkit.patch_stdout import patch_stdout
from prompt_toolkit.renderer import print_formatted_text as render_formatted_text
from prompt_toolkit.styles import Style
from rich.console import Console
from rich.table import Table
from rich.text import Text

from meshpost.clock import Clock
from meshpost.config import NodeConfig
from meshpost.errors import MeshpostError
from meshpost.node import (
    DeliveryRecorded,
    MessageReceived,
    NodeEvent,
    NodeStats,
    Outgoing,
    PeerChanged,
    PeerStatus,
    Receipt,
    describe_error,
)
from meshpost.protocol import Envelope
from meshpost.store import StoredMessage, StoreReader

log = logging.getLogger(__name__)

#: How long a sent message may wait for its receipt before the console says it is queued.
RECEIPT_WAIT_S = 5.0
#: `/history` shows this many messages unless told `-n N`.
DEFAULT_HISTORY_LIMIT = 20
#: Upper bound for `/history -n N`, so a typo cannot load a whole database into the terminal.
MAX_HISTORY_LIMIT = 100_000
#: Rendered tables are never narrower than this, whatever the terminal reports.
MIN_WIDTH = 60
#: On exit, how long the console waits for its last lines to reach the terminal.
PRINT_DRAIN_S = 2.0


class CommandError(MeshpostError):
    """A console line that cannot be understood; the message says how to write it."""


# -- commands ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class SendCommand:
    """Send `body` to `target` (peer, group or `all`); `target=None` means the last one used."""

    target: str | None
    body: str


@dataclasses.dataclass(frozen=True, slots=True)
class PeersCommand:
    """Show the peer table."""


@dataclasses.dataclass(frozen=True, slots=True)
class HistoryCommand:
    """Show the last `limit` stored messages, all peers or one."""

    peer: str | None = None
    limit: int = DEFAULT_HISTORY_LIMIT


@dataclasses.dataclass(frozen=True, slots=True)
class StatsCommand:
    """Show the node's counters."""


@dataclasses.dataclass(frozen=True, slots=True)
class HelpCommand:
    """Show how to use the console."""


@dataclasses.dataclass(frozen=True, slots=True)
class QuitCommand:
    """Leave the console."""


@dataclasses.dataclass(frozen=True, slots=True)
class EmptyCommand:
    """A blank line: do nothing."""


Command = (
    SendCommand
    | PeersCommand
    | HistoryCommand
    | StatsCommand
    | HelpCommand
    | QuitCommand
    | EmptyCommand
)

_SIMPLE_COMMANDS: dict[str, Command] = {
    "peers": PeersCommand(),
    "stats": StatsCommand(),
    "help": HelpCommand(),
    "?": HelpCommand(),
    "quit": QuitCommand(),
    "exit": QuitCommand(),
    "q": QuitCommand(),
}
_NUMBER = re.compile(r"[0-9]{1,9}")

HELP_TEXT = """\
@NAME text        send text to peer NAME (a group name or `all` sends to each member)
text              send to the last recipient again
/peers            peers: connection, last seen, round trip, clock offset, unacknowledged
/history [PEER] [-n N]
                  the last N stored messages (default 20), with sender and local clocks
/stats            the node's counters
/help             this text
/quit             leave (Ctrl-D and Ctrl-C too); queued messages are still delivered"""


def parse_command(line: str) -> Command:
    """Turn one typed line into a `Command`; raise `CommandError` saying how to fix it."""
    text = line.strip()
    if not text:
        return EmptyCommand()
    if text.startswith("@"):
        return _parse_send(text)
    if text.startswith("/"):
        return _parse_slash(text)
    return SendCommand(None, text)


def _parse_send(text: str) -> SendCommand:
    parts = text[1:].split(maxsplit=1)
    if not parts or text[1:2].isspace():
        raise CommandError("put the recipient right after '@', e.g. `@B hello`")
    target = parts[0]
    if len(parts) < 2:
        raise CommandError(f"nothing to send: type the text after the recipient, "
                           f"e.g. `@{target} hello`")
    return SendCommand(target, parts[1])


def _parse_slash(text: str) -> Command:
    word, *args = text[1:].split() or [""]
    name = word.lower()
    if name == "history":
        return _parse_history(args)
    simple = _SIMPLE_COMMANDS.get(name)
    if simple is None:
        shown = f"/{word}" if word else "/"
        raise CommandError(f"unknown command `{shown}`; type /help for the list")
    if args:
        raise CommandError(f"/{name} takes no arguments")
    return simple


def _parse_history(args: Sequence[str]) -> HistoryCommand:
    peer: str | None = None
    limit = DEFAULT_HISTORY_LIMIT
    usage = "usage: /history [PEER] [-n N]"
    rest = list(args)
    while rest:
        arg = rest.pop(0)
        if arg.startswith("-n"):
            value = arg[2:].removeprefix("=") or (rest.pop(0) if rest else "")
            if not value:
                raise CommandError(f"-n needs a number of messages; {usage}")
            if not _NUMBER.fullmatch(value) or not 1 <= int(value) <= MAX_HISTORY_LIMIT:
                shown = value if len(value) <= 20 else f"{value[:20]}…"
                raise CommandError(
                    f"-n wants a whole number from 1 to {MAX_HISTORY_LIMIT}, not {shown!r}; "
                    f"{usage}"
                )
            limit = int(value)
        elif arg.startswith("-"):
            raise CommandError(f"unknown option {arg!r}; {usage}")
        elif peer is None:
            peer = arg.removeprefix("@")
            if not peer:
                raise CommandError(f"put the peer's name right after '@'; {usage}")
        else:
            raise CommandError(f"/history takes one peer, got {peer!r} and {arg!r}; {usage}")
    return HistoryCommand(peer, limit)


# -- rendering (pure) ----------------------------------------------------------------------

#: Control characters a peer could use to rewrite the terminal; shown escaped instead.
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def clean(text: str) -> str:
    """`text` safe to print: control and bidi-override characters shown as escapes."""
    return _UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def format_clock(ns: int, *, tz: datetime.tzinfo | None = None, date: bool = False) -> str:
    """`HH:MM:SS.mmm` (with `date`, `YYYY-MM-DD ` first) of ns since the epoch, in `tz`."""
    seconds, rem = divmod(ns, 1_000_000_000)
    try:
        moment = datetime.datetime.fromtimestamp(seconds, tz)
    except (OverflowError, OSError, ValueError):
        return f"<{ns} ns>"
    shown = moment.strftime("%Y-%m-%d %H:%M:%S" if date else "%H:%M:%S")
    return f"{shown}.{rem // 1_000_000:03d}"


def _ms(ns: int) -> str:
    return f"{ns / 1e6:.1f} ms"


def _indent(body: str) -> str:
    return clean(body).replace("\n", "\n    ")


def format_incoming(message: Envelope, *, tz: datetime.tzinfo | None = None) -> str:
    """`[HH:MM:SS.mmm sender-clock] A → me: text` for a message that arrived."""
    stamp = format_clock(message.sent_at_ns, tz=tz)
    return f"[{stamp} sender-clock] {clean(message.sender)} → me: {_indent(message.body)}"


def format_pending(me: str, handles: Sequence[Outgoing]) -> str:
    """`… A → B: text (pending)`: stored in the outbox, no receipt yet."""
    if not handles:
        return "… nobody to send to"
    to = ", ".join(h.to for h in handles)
    return f"… {me} → {to}: {_indent(handles[0].body)} (pending)"


def format_receipt(receipt: Receipt, *, tz: datetime.tzinfo | None = None) -> str:
    """`✓ delivered to B at <receiver clock>`, with the round trip on our clock."""
    at = format_clock(receipt.delivered_at_ns, tz=tz)
    took = receipt.recorded_at_ns - receipt.sent_at_ns
    return f"✓ delivered to {receipt.to} at {at} {receipt.to}-clock ({_ms(took)} after sending)"


def format_queued(peer: str, *, waited_s: float | None = None) -> str:
    """`… queued, B unreachable`: the message waits in the outbox and is delivered later."""
    why = "not connected" if waited_s is None else f"no receipt within {waited_s:g}s"
    return f"… queued, {peer} unreachable ({why}); it will be delivered when {peer} is back"


def format_failure(exc: BaseException) -> str:
    """`✗ reason` for an error the user should see."""
    return f"✗ {describe_error(exc)}"


def format_peer_change(event: PeerChanged) -> str:
    """One line for a peer that connected, went silent or refused us."""
    if event.connected:
        return f"● {event.peer} connected"
    if event.detail.startswith("refused"):
        return f"✗ {event.peer} {clean(event.detail)}"
    if event.detail.startswith("left"):
        return f"○ {event.peer} left ({clean(event.detail.removeprefix('left: '))})"
    return f"○ {event.peer} lost ({clean(event.detail)})"


def _render(renderable: Table, width: int) -> str:
    out = io.StringIO()
    console = Console(
        file=out, width=max(width, MIN_WIDTH), color_system=None, force_terminal=False,
        force_jupyter=False, force_interactive=False, markup=False, emoji=False,
        highlight=False, legacy_windows=False, no_color=True,
    )
    console.print(renderable)
    return "\n".join(line.rstrip() for line in out.getvalue().rstrip("\n").splitlines())


def _ago(now_ns: int, then_ns: int | None) -> str:
    if then_ns is None:
        return "never"
    seconds = max(now_ns - then_ns, 0) / 1e9
    if seconds < 60:
        return f"{seconds:.1f}s ago"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def _peer_state(peer: PeerStatus) -> str:
    if peer.connected:
        return "connected"
    if peer.refusal:
        return f"refused ({peer.refusal})"
    return f"unreachable ({peer.state})"


def render_peers_table(peers: Sequence[PeerStatus], *, now_ns: int, width: int = 100) -> str:
    """The `/peers` table; `now_ns` (our wall clock) dates "last seen"."""
    if not peers:
        return "no peers configured"
    table = Table(title="peers", title_justify="left")
    for column in ("peer", "endpoint", "state", "last seen"):
        table.add_column(column, overflow="fold")
    for column in ("rtt ms", "offset ms", "unacked"):
        table.add_column(column, justify="right")
    for p in peers:
        table.add_row(
            Text(p.name), Text(p.endpoint), Text(clean(_peer_state(p))),
            Text(_ago(now_ns, p.last_seen_ns)),
            Text("-" if p.rtt_ns is None else f"{p.rtt_ns / 1e6:.2f}"),
            Text("-" if p.offset_ns is None else f"{p.offset_ns / 1e6:+.2f}"),
            Text(str(p.unacknowledged)),
        )
    return _render(table, width)


def _history_state(row: StoredMessage, tz: datetime.tzinfo | None) -> str:
    match row.direction, row.state:
        case "out", "delivered" if row.receipt_stored_at_ns is not None:
            return f"✓ {format_clock(row.receipt_stored_at_ns, tz=tz)} {row.peer}-clock"
        case "out", "rejected":
            return f"✗ rejected: {clean(row.reject_reason or '')}"
        case "out", "pending":
            return "… pending"
        case "in", "received":
            return "received"
        case _:
            return clean(row.state)


def render_history(
    rows: Sequence[StoredMessage], *, me: str, tz: datetime.tzinfo | None = None,
    width: int = 100,
) -> str:
    """The `/history` table: sender clock, local stored clock, direction, body, state."""
    if not rows:
        return "no messages yet"
    table = Table(title=f"history of {me} (oldest first)", title_justify="left")
    table.add_column("sent (sender clock)", no_wrap=True)
    table.add_column("stored (local)", no_wrap=True)
    table.add_column("route", no_wrap=True)
    table.add_column("message", overflow="fold")
    table.add_column("state", overflow="fold")
    day = ""
    for row in rows:
        stored_day = format_clock(row.stored_at_ns, tz=tz, date=True).partition(" ")[0]
        if stored_day != day:
            day = stored_day
            table.add_row(Text(day, style="bold"), "", "", "", "")
        if row.direction == "in":
            route = f"{clean(row.sender)} → me"
        else:
            route = f"me → {clean(row.recipient)}"
        table.add_row(
            Text(format_clock(row.sent_at_ns, tz=tz)), Text(format_clock(row.stored_at_ns, tz=tz)),
            Text(route), Text(clean(row.body)), Text(_history_state(row, tz)),
        )
    return _render(table, width)


def render_stats(stats: NodeStats) -> str:
    """`/stats`: one `name value` line per counter."""
    fields = dataclasses.fields(stats)
    pad = max(len(f.name) for f in fields)
    return "\n".join(f"{f.name:<{pad}}  {getattr(stats, f.name)}" for f in fields)


# -- the running console -------------------------------------------------------------------


class ConsoleNode(Protocol):
    """What the console needs from a node (`meshpost.node.Node` provides it)."""

    @property
    def name(self) -> str: ...

    @property
    def config(self) -> NodeConfig: ...

    @property
    def clock(self) -> Clock: ...

    async def post(self, target: str, body: str) -> list[Outgoing]: ...

    def resolve(self, target: str) -> list[str]: ...

    def validate_body(self, body: str) -> None: ...

    def peers(self) -> list[PeerStatus]: ...

    def subscribe(self) -> asyncio.Queue[NodeEvent]: ...

    def unsubscribe(self, queue: asyncio.Queue[NodeEvent]) -> None: ...

    def snapshot_stats(self) -> NodeStats: ...


Printer = Callable[[str], None]


#: Colors for console lines by their first character; everything else is printed plain.
_MARK_STYLES = {"✓": "ansigreen", "✗": "ansired", "…": "ansiyellow", "●": "ansigreen",
                "○": "ansiyellow", "[": "ansicyan"}


class TerminalPrinter:
    """The default printer: lines go above the prompt, strictly in the order given.

    `print_formatted_text` prints at once when no prompt is shown but defers while one is,
    so lines could overtake each other; one task printing a queue cannot reorder them.
    """

    def __init__(self) -> None:
        self._lines: asyncio.Queue[str] = asyncio.Queue()
        self._style = Style([])

    def __call__(self, text: str) -> None:
        self._lines.put_nowait(text)

    async def run(self) -> None:
        """Print queued lines until cancelled, batching bursts into one redraw."""
        while True:
            batch = [await self._lines.get()]
            while not self._lines.empty():
                batch.append(self._lines.get_nowait())
            try:
                await run_in_terminal(functools.partial(self._write, batch))
            except Exception:
                log.exception("console could not print %d line(s)", len(batch))
            finally:
                for _ in batch:
                    self._lines.task_done()

    async def drain(self, timeout_s: float) -> None:
        """Wait (at most `timeout_s`) until every queued line is printed."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._lines.join(), timeout_s)

    def _write(self, batch: list[str]) -> None:
        output = get_app_session().output
        fragments: list[tuple[str, str]] = []
        for text in batch:
            fragments += [(_MARK_STYLES.get(text[:1], ""), text), ("", "\n")]
        render_formatted_text(output, FormattedText(fragments), self._style)
        output.flush()


def read_history(data_dir: Path, peer: str | None, limit: int) -> list[StoredMessage]:
    """Rows for `/history`, read through a short-lived read-only connection."""
    with StoreReader.for_data_dir(data_dir) as reader:
        return reader.history(peer=peer, limit=limit)


class _Console:
    """State of one console session: last recipient and the background printing tasks."""

    def __init__(self, node: ConsoleNode, printer: Printer, receipt_wait_s: float) -> None:
        self.node = node
        self.print = printer
        self.receipt_wait_s = receipt_wait_s
        self.last_target: str | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        for task in list(self.tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    @property
    def width(self) -> int:
        try:
            return get_app_session().output.get_size().columns
        except Exception:  # an output that cannot tell its size: any width will do
            return 100

    async def watch(self, events: asyncio.Queue[NodeEvent]) -> None:
        """Print what the node reports: arrivals and peer changes."""
        while True:
            event = await events.get()
            try:
                match event:
                    case MessageReceived(message=message):
                        self.print(format_incoming(message))
                    case PeerChanged():
                        self.print(format_peer_change(event))
                    case DeliveryRecorded():
                        pass  # our own sends print their receipt from their handle
                    case _:
                        assert_never(event)
            except Exception:
                log.exception("console could not show %r", event)

    async def follow(self, handle: Outgoing, *, announced: bool) -> None:
        """Print the receipt of one message; say it is queued if it takes too long."""
        receipt_f = handle.receipt
        try:
            if not announced:
                try:
                    receipt = await asyncio.wait_for(asyncio.shield(receipt_f),
                                                     self.receipt_wait_s)
                except TimeoutError:
                    self.print(format_queued(handle.to, waited_s=self.receipt_wait_s))
                else:
                    self.print(format_receipt(receipt))
                    return
            self.print(format_receipt(await asyncio.shield(receipt_f)))
        except MeshpostError as exc:
            self.print(format_failure(exc))

    async def handle(self, command: Command) -> bool:
        """Perform one command; False once the user wants to leave."""
        match command:
            case EmptyCommand():
                pass
            case SendCommand(target=target, body=body):
                await self.send(target, body)
            case PeersCommand():
                self.print(render_peers_table(self.node.peers(), now_ns=self.node.clock.wall_ns(),
                                              width=self.width))
            case HistoryCommand(peer=peer, limit=limit):
                rows = await asyncio.to_thread(read_history, self.node.config.data_dir, peer,
                                               limit)
                if not rows and peer is not None:
                    self.print(f"no messages with {clean(peer)}")
                else:
                    self.print(render_history(rows, me=self.node.name, width=self.width))
            case StatsCommand():
                self.print(render_stats(self.node.snapshot_stats()))
            case HelpCommand():
                self.print(HELP_TEXT)
            case QuitCommand():
                return False
            case _:
                assert_never(command)
        return True

    async def send(self, target: str | None, body: str) -> None:
        if target is None:
            if self.last_target is None:
                self.print("start with a recipient, e.g. `@B hello` (or `@all hello`); "
                           "/help lists the commands")
                return
            target = self.last_target
        node = self.node
        recipients = node.resolve(target)
        node.validate_body(body)
        if not recipients:
            self.print(f"{clean(target)} names no other node; nothing sent")
            return
        connected = {p.name for p in node.peers() if p.connected}
        handles = await node.post(target, body)
        self.last_target = target
        self.print(format_pending(node.name, handles))
        for handle in handles:
            announced = handle.to not in connected
            if announced:
                self.print(format_queued(handle.to))
            self.spawn(self.follow(handle, announced=announced))

    def prompt_text(self) -> str:
        to = f" → {self.last_target}" if self.last_target else ""
        return f"{self.node.name}{to}> "

    def completer(self) -> WordCompleter:
        config = self.node.config
        names = ["@all", *(f"@{n}" for n in config.peer_names), *(f"@{g}" for g in config.groups)]
        commands = ["/peers", "/history", "/stats", "/help", "/quit"]
        return WordCompleter([*names, *commands], sentence=True)


async def run_console(
    node: ConsoleNode,
    *,
    input: Input | None = None,
    output: Output | None = None,
    printer: Printer | None = None,
    receipt_wait_s: float = RECEIPT_WAIT_S,
) -> None:
    """Run the console on `node` until `/quit`, Ctrl-D, Ctrl-C or the end of input.

    `input`/`output` default to the terminal; `printer` (default: print above the prompt)
    receives every line the console shows. The node keeps running afterwards.
    """
    with create_app_session(input=input, output=output):
        terminal = TerminalPrinter()
        console = _Console(node, printer or terminal, receipt_wait_s)
        printing: asyncio.Task[None] | None = None
        events = node.subscribe()
        try:
            if printer is None:
                printing = asyncio.create_task(terminal.run(), name="console-printer")
            console.spawn(console.watch(events))
            session: PromptSession[str] = PromptSession(
                completer=console.completer(), complete_while_typing=False
            )
            with patch_stdout(raw=True):
                console.print(f"meshpost console of {node.name}; /help for commands")
                while True:
                    try:
                        line = await session.prompt_async(console.prompt_text)
                    except (EOFError, KeyboardInterrupt):
                        break
                    try:
                        if not await console.handle(parse_command(line)):
                            break
                    except MeshpostError as exc:
                        console.print(format_failure(exc))
                    except Exception as exc:  # keep the console alive; the log has details
                        log.exception("console command %r failed", line)
                        console.print(format_failure(exc))
        finally:
            node.unsubscribe(events)
            await console.close()
            if printing is not None:
                await terminal.drain(PRINT_DRAIN_S)
                printing.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await printing


__all__ = [
    "DEFAULT_HISTORY_LIMIT",
    "HELP_TEXT",
    "RECEIPT_WAIT_S",
    "Command",
    "CommandError",
    "ConsoleNode",
    "EmptyCommand",
    "HelpCommand",
    "HistoryCommand",
    "PeersCommand",
    "Printer",
    "QuitCommand",
    "SendCommand",
    "StatsCommand",
    "TerminalPrinter",
    "clean",
    "format_clock",
    "format_failure",
    "format_incoming",
    "format_peer_change",
    "format_pending",
    "format_queued",
    "format_receipt",
    "parse_command",
    "read_history",
    "render_history",
    "render_peers_table",
    "render_stats",
    "run_console",
]

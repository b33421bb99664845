"""The interactive console of a running node: type `@B hello`, see receipts and arrivals live.

Rule: this module performs the commands `console.commands` parses (a pure language of its own)
and shows every line or table through `meshpost.text`; only `run_console` and `run_script`
touch the terminal, the node and the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any, Protocol, assert_never, runtime_checkable

from prompt_toolkit import PromptSession
from prompt_toolkit.application import run_in_terminal
from prompt_toolkit.application.current import create_app_session, get_app_session
from prompt_toolkit.completion import WordCompleter
from prompt_toolkit.formatted_text import FormattedText
from prompt_toolkit.input import Input
from prompt_toolkit.key_binding import KeyBindings, KeyPressEvent
from prompt_toolkit.output import Output
from prompt_toolkit.patch_stdout import patch_stdout
from prompt_toolkit.renderer import print_formatted_text as render_formatted_text
from prompt_toolkit.styles import Style

from meshpost.clock import Clock
from meshpost.config import NodeConfig
from meshpost.console.commands import (
    HELP_TEXT,
    Command,
    CommandError,
    EmptyCommand,
    GroupCommand,
    HelpCommand,
    HistoryCommand,
    PeersCommand,
    QueueCommand,
    QuitCommand,
    SendCommand,
    StatsCommand,
    parse_command,
)
from meshpost.control.messages import EventsDropped, NodeGone
from meshpost.errors import MeshpostError, NodeStopped, ReceiptTimeout, UnknownPeer
from meshpost.node import (
    BroadcastProgress,
    DeliveryRecorded,
    GroupHistory,
    MessageReceived,
    NodeEvent,
    NodeStats,
    Outgoing,
    PeerChange,
    PeerChanged,
    PeerProbe,
    PeerRefused,
    PeerStatus,
    Receipt,
    wait_receipt,
)
from meshpost.protocol import Envelope
from meshpost.protocol.groups import BroadcastStatus
from meshpost.protocol.history import (
    MAX_HISTORY_ITEMS,
    HistoryRefused,
    HistoryReplyInvalid,
    decode_reply,
    history_group,
)
from meshpost.protocol.workqueue import QueueStatus
from meshpost.store import StoredMessage, StoreReader
from meshpost.text import (
    clean,
    format_broadcast,
    format_failure,
    format_fetched_history,
    format_incoming,
    format_peer_change,
    format_pending,
    format_queued,
    format_receipt,
    format_refused_by,
    format_refused_peer,
    render_history,
    render_peers_table,
    render_probes,
    render_queues,
    render_stats,
    short_id,
    terminal_width,
)

log = logging.getLogger(__name__)

#: How long `/peers --probe` waits for answers (`meshpost peers --probe`'s default).
CONSOLE_PROBE_WAIT_S = 2.0

#: How long a sent message may wait for its receipt before the console says it is queued.
RECEIPT_WAIT_S = 5.0
#: How long `/history G --ask` waits for the members' replies (a member that has not
#: answered by then is listed; its reply is still stored when it comes).
HISTORY_ASK_WAIT_S = 5.0
#: On exit, how long the console waits for its last lines to reach the terminal.
PRINT_DRAIN_S = 2.0
#: Name prefix of the tasks that print a sent message's receipt (`run_script` waits for them).
_FOLLOW_TASK = "console-follow-"


# -- the running console -------------------------------------------------------------------


@runtime_checkable
class RefreshesStatus(Protocol):
    """A node seen from afar (`remote.RemoteNode`): its counters are a poll's copy until
    `refresh_status` asks its process again."""

    async def refresh_status(self) -> None: ...


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

    def subscribe(
        self,
    ) -> asyncio.Queue[NodeEvent] | asyncio.Queue[NodeEvent | NodeGone | EventsDropped]: ...

    def unsubscribe(self, queue: Any) -> None: ...

    def snapshot_stats(self) -> NodeStats: ...

    async def join(self, group: str) -> bool: ...

    async def leave(self, group: str) -> bool: ...

    def members(self, group: str) -> list[str]: ...

    async def queue_status(self, queue: str | None = None) -> list[QueueStatus]: ...

    async def fetch_group_history(self, group: str, *, limit: int = ...,
                                  before_hlc: int = ..., timeout_s: float | None = ...
                                  ) -> GroupHistory: ...

    async def probe_peers(self, *peers: str, wait_s: float) -> list[PeerProbe]: ...


Printer = Callable[[str], None]


#: Colors for console lines by their first character; everything else is printed plain.
_MARK_STYLES = {"✓": "ansigreen", "✗": "ansired", "…": "ansiyellow", "●": "ansigreen",
                "○": "ansiyellow", "[": "ansicyan"}


@dataclasses.dataclass(eq=False)
class _Progress:
    """How far one message to many (`@all`, `@G`) has got, as its copies' receipts come."""

    members: list[str]
    delivered: set[str] = dataclasses.field(default_factory=set)

    def text(self) -> str:
        pending = [m for m in self.members if m not in self.delivered]
        return format_broadcast(BroadcastStatus("", "", len(self.members),
                                                tuple(sorted(self.delivered)), tuple(pending)))


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


def read_group_history(
    data_dir: Path, group: str, limit: int
) -> list[tuple[StoredMessage, BroadcastStatus | None]]:
    """Rows for `/history G`: the messages to group G this node stored (its own once each,
    with delivered k/n), through a short-lived read-only connection."""
    with StoreReader.for_data_dir(data_dir) as reader:
        return reader.group_history(group, limit=limit)


class _Console:
    """State of one console session: last recipient and the background printing tasks."""

    def __init__(self, node: ConsoleNode, printer: Printer, receipt_wait_s: float) -> None:
        self.node = node
        self.print = printer
        self.receipt_wait_s = receipt_wait_s
        #: How long `/history G --ask` waits for the members' replies.
        self.history_wait_s = HISTORY_ASK_WAIT_S
        self.last_target: str | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        #: The last line shown for each peer's connection state.
        self.peer_lines: dict[str, str] = {}
        self.stopped_shown = False
        #: Table width when there is no terminal to ask (`run_script`); None: ask it.
        self.fixed_width: int | None = None
        #: Members that `/history G --ask` asked and whose reply has not arrived (member ->
        #: G): that reply is the fetch's to show, not a message to print as its raw JSON.
        self.history_asked: dict[str, str] = {}
        #: Of those, the ones that had not answered when the fetch stopped waiting.
        self.history_late: set[str] = set()

    def fail(self, exc: BaseException) -> None:
        """Print a failure nobody typed a command for; that the node stopped is said once,
        however many pending sends it fails (a command typed later is answered again)."""
        if isinstance(exc, NodeStopped):
            if self.stopped_shown:
                return
            self.stopped_shown = True
        self.print(format_failure(exc))

    def spawn(self, coro: Coroutine[Any, Any, None], name: str | None = None) -> None:
        task = asyncio.create_task(coro, name=name)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        for task in list(self.tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def run_line(self, line: str) -> bool:
        """Perform one typed line, printing what it shows or why it failed; False once the
        user wants to leave. A failure never ends the console."""
        try:
            return await self.handle(parse_command(line))
        except MeshpostError as exc:
            self.stopped_shown |= isinstance(exc, NodeStopped)
            self.print(format_failure(exc))
        except Exception as exc:  # keep the console alive; the log has details
            log.exception("console command %r failed", line)
            self.print(format_failure(exc))
        return True

    async def settle(self, timeout_s: float) -> None:
        """Wait (at most `timeout_s`) until every message sent has shown its receipt or that
        it is queued: the end of a script must not cut those lines off."""
        follows = [t for t in self.tasks if t.get_name().startswith(_FOLLOW_TASK)]
        if follows:
            await asyncio.wait(follows, timeout=timeout_s)

    @property
    def width(self) -> int:
        if self.fixed_width is not None:
            return self.fixed_width
        try:
            return get_app_session().output.get_size().columns
        except Exception:  # an output that cannot tell its size: any width will do
            return 100

    def show_current_peers(self) -> None:
        """Print each peer's state now (called right after subscribing), so a peer that
        connected before the console started is shown too; `watch` skips repeats."""
        for peer in self.node.peers():
            if peer.found != "config":
                # Found on the LAN before the console started: its `joined` event came
                # before anyone listened, and README promises the line.
                self.show_peer_change(PeerChanged(peer.name, False, PeerChange.JOINED,
                                                  f"via {peer.found} at {peer.endpoint}"))
            if peer.connected:
                self.show_peer_change(PeerChanged(peer.name, True, PeerChange.CONNECTED))
            elif peer.refusal:
                self.show_peer_change(PeerChanged(peer.name, False, PeerChange.REFUSED,
                                                  peer.refusal))

    def show_peer_change(self, event: PeerChanged) -> None:
        shown = format_peer_change(event)
        if self.peer_lines.get(event.peer) == shown:
            return  # the snapshot at start and the event that follows it say the same
        self.peer_lines[event.peer] = shown
        self.print(shown)

    def show_message(self, message: Envelope) -> None:
        """An arrival: a peer's message, or a record of the node's own protocols said as what
        it means (a membership change, a member asking for this node's group messages, the
        answer to our `/history G --ask`), never as its raw body."""
        header, sender = message.header, clean(message.sender)
        if header is not None and header.kind == "member":
            went = "joined" if message.body == "join" else "left"
            self.print(f"● {sender} {went} {clean(header.queue)}")
        elif (group := history_group(header)) is not None:
            # The node answers it itself (docs/patterns.md 4); its body is a query in JSON.
            self.print(f"… {sender} asked for this node's messages to {clean(group)}")
        elif header is not None and header.kind == "reply" and self.is_history_reply(message):
            group = self.history_asked.pop(message.sender)
            if message.sender in self.history_late:
                self.history_late.discard(message.sender)
                self.print(f"… {sender} answered `/history {clean(group)} --ask` late; ask "
                           "again to see its messages")
            # Otherwise the fetch prints what the reply brought.
        else:
            self.print(format_incoming(message))

    def is_history_reply(self, message: Envelope) -> bool:
        """A reply from a member `/history G --ask` is waiting for, shaped as a history reply
        (a list of messages, or a refusal)."""
        if message.sender not in self.history_asked:
            return False
        try:
            decode_reply(message.body)
        except HistoryRefused:
            return True
        except HistoryReplyInvalid:
            return False
        return True

    async def watch(self, events: asyncio.Queue[Any]) -> None:
        """Print what the node reports: arrivals, peer changes, and (attached) that it
        stopped."""
        while True:
            event = await events.get()
            try:
                match event:
                    case MessageReceived(message=message):
                        self.show_message(message)
                    case PeerChanged():
                        self.show_peer_change(event)
                    case PeerRefused(who=who, detail=detail):
                        self.print(format_refused_peer(who, detail))
                    case DeliveryRecorded():
                        pass  # our own sends print their receipt from their handle
                    case BroadcastProgress(status=status):
                        # A message to many posted before the node restarted: no handle
                        # here follows it, so its k/n comes from the node as receipts come.
                        to = clean(status.target)
                        self.print(f"✓ earlier message to {to} ({short_id(status.logical_id)}):"
                                   f" {format_broadcast(status)}")
                    case NodeGone(name=name):
                        self.fail(NodeStopped(name))
                    case EventsDropped(count=count):
                        self.print(f"… {count} event(s) not shown: this console fell behind "
                                   "(/history has every message)")
                    case _:
                        assert_never(event)
            except Exception:
                log.exception("console could not show %r", event)

    async def follow(self, handle: Outgoing, *, announced: bool,
                     progress: _Progress | None = None) -> None:
        """Print the receipt of one message; say it is queued if it takes too long. One copy
        of a message to many (`progress`) adds `delivered k/n (pending: ...)`."""
        def receipted(receipt: Receipt) -> str:
            line = format_receipt(receipt, body=handle.body)
            if progress is None:
                return line
            progress.delivered.add(handle.to)
            return f"{line} · {progress.text()}"

        try:
            if not announced:
                try:
                    receipt = await wait_receipt(handle, self.receipt_wait_s)
                except ReceiptTimeout:
                    self.print(format_queued(handle.to, waited_s=self.receipt_wait_s))
                else:
                    self.print(receipted(receipt))
                    return
            self.print(receipted(await wait_receipt(handle, None)))
        except MeshpostError as exc:
            self.fail(exc)

    async def handle(self, command: Command) -> bool:
        """Perform one command; False once the user wants to leave."""
        match command:
            case EmptyCommand():
                pass
            case SendCommand(target=target, body=body):
                await self.send(target, body)
            case PeersCommand(probe=True, names=names):
                self.print(f"asking {', '.join(map(clean, names)) or 'every peer'} …")
                probes = await self.node.probe_peers(*names, wait_s=CONSOLE_PROBE_WAIT_S)
                self.print(render_probes(probes, width=self.width))
            case PeersCommand():
                self.print(render_peers_table(self.node.peers(), now_ns=self.node.clock.wall_ns(),
                                              width=self.width))
            case HistoryCommand(peer=peer, limit=limit, ask=True) if peer is not None:
                if not self.is_group(peer) or peer == "all":
                    raise CommandError(f"--ask asks the members of a group, and {clean(peer)!r} "
                                       "is no group this node knows")
                self.print(f"asking the members of {clean(peer)} for their messages to it …")
                self.history_asked.update(
                    (m, peer) for m in self.node.members(peer) if m != self.node.name)
                fetched = await self.node.fetch_group_history(
                    peer, limit=min(limit, MAX_HISTORY_ITEMS), timeout_s=self.history_wait_s)
                for member, why in fetched.unanswered.items():
                    if why in ("not-delivered", "delivered-unanswered"):
                        self.history_late.add(member)  # its reply may still come
                    elif why.startswith("not asked"):
                        self.history_asked.pop(member, None)  # no reply will
                for line in format_fetched_history(fetched):
                    self.print(line)
            case HistoryCommand(peer=peer, limit=limit, verbose=verbose) if (
                    peer is not None and self.is_group(peer)):
                shown = await asyncio.to_thread(read_group_history, self.node.config.data_dir,
                                                peer, limit)
                self.print(render_history([row for row, _ in shown], me=self.node.name,
                                          width=self.width, verbose=verbose, group=peer,
                                          statuses=[status for _, status in shown],
                                          title=f"messages to {clean(peer)} stored by "
                                                f"{self.node.name} (oldest first)"))
            case HistoryCommand(peer=peer, limit=limit, verbose=verbose):
                rows = await asyncio.to_thread(read_history, self.node.config.data_dir, peer,
                                               limit)
                if not rows and peer is not None:
                    known = self.node.config.peer_names
                    if peer not in known:
                        raise UnknownPeer(peer, known)
                    self.print(f"no messages with {clean(peer)}")
                else:
                    # As `meshpost history --peer B` titles it: whose messages these are.
                    with_peer = f" with {clean(peer)}" if peer is not None else ""
                    self.print(render_history(rows, me=self.node.name, width=self.width,
                                              verbose=verbose,
                                              title=f"history of {self.node.name}{with_peer} "
                                                    "(oldest first)"))
            case GroupCommand(action=action, group=group):
                await self.group(action, group)
            case QueueCommand(queue=queue):
                self.print(render_queues(await self.node.queue_status(queue)))
            case StatsCommand():
                if isinstance(self.node, RefreshesStatus):
                    await self.node.refresh_status()  # the poll's copy may be a second old
                self.print(render_stats(self.node.snapshot_stats()))
            case HelpCommand():
                self.print(HELP_TEXT)
            case QuitCommand():
                return False
            case _:
                assert_never(command)
        return True

    def is_group(self, name: str) -> bool:
        """`name` is no peer of this node but `all` or a group it knows (configured, or with
        members now): `/history name` shows the messages to that group."""
        node = self.node
        if name in node.config.peer_names or any(p.name == name for p in node.peers()):
            return False
        return name == "all" or name in node.config.groups or bool(node.members(name))

    async def group(self, action: str, group: str) -> None:
        node = self.node
        if action == "join":
            changed = await node.join(group)
            self.print(f"● joined {clean(group)}" if changed
                       else f"already in {clean(group)}")
        elif action == "leave":
            changed = await node.leave(group)
            self.print(f"○ left {clean(group)}" if changed else f"not in {clean(group)}")
        members = ", ".join(clean(m) for m in node.members(group)) or "nobody"
        self.print(f"{clean(group)}: {members}")

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
        peers = node.peers()
        # An idle link opens for this message: not news (its receipt wait still reports).
        connected = {p.name for p in peers if p.connected or p.state == "idle"}
        refusals = {p.name: p.refusal for p in peers if p.refusal}
        handles = await node.post(target, body)
        self.last_target = target
        self.print(format_pending(node.name, handles))
        many = _Progress([h.to for h in handles]) if target not in connected | set(
            node.config.peer_names) else None
        for handle in handles:
            announced = handle.to not in connected
            if handle.to in refusals:
                self.print(format_refused_by(handle.to, refusals[handle.to]))
            elif announced:
                self.print(format_queued(handle.to))
            self.spawn(self.follow(handle, announced=announced, progress=many),
                       name=f"{_FOLLOW_TASK}{handle.to}")

    def prompt_text(self) -> str:
        to = f" → {self.last_target}" if self.last_target else ""
        return f"{self.node.name}{to}> "

    def completer(self) -> WordCompleter:
        config = self.node.config
        names = ["@all", *(f"@{n}" for n in config.peer_names), *(f"@{g}" for g in config.groups)]
        commands = ["/peers", "/history", "/join", "/leave", "/members", "/queue", "/stats",
                    "/help", "/quit"]
        return WordCompleter([*names, *commands], sentence=True)


def _key_bindings() -> KeyBindings:
    """Ctrl-C as in a shell: clears a half-typed line; on an empty line it leaves."""
    bindings = KeyBindings()

    @bindings.add("c-c")
    def _interrupt(event: KeyPressEvent) -> None:
        buffer = event.app.current_buffer
        if buffer.text:
            buffer.reset()
        else:
            event.app.exit(exception=KeyboardInterrupt, style="class:aborting")

    return bindings


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
            session: PromptSession[str] = PromptSession(
                completer=console.completer(), complete_while_typing=False,
                key_bindings=_key_bindings(),
            )
            with patch_stdout(raw=True):
                console.print(f"meshpost console of {node.name}; /help for commands")
                console.show_current_peers()
                console.spawn(console.watch(events))
                while True:
                    try:
                        line = await session.prompt_async(console.prompt_text)
                    except (EOFError, KeyboardInterrupt):
                        break
                    if not await console.run_line(line):
                        break
        finally:
            node.unsubscribe(events)
            await console.close()
            if printing is not None:
                await terminal.drain(PRINT_DRAIN_S)
                printing.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await printing


async def run_script(
    node: ConsoleNode,
    lines: AsyncIterator[str],
    *,
    printer: Printer | None = None,
    width: int | None = None,
    receipt_wait_s: float = RECEIPT_WAIT_S,
) -> None:
    """Run console commands that come from a pipe or a file (`meshpost attach < script`),
    one a line, until `/quit` or their end, then wait (at most `receipt_wait_s`) for the
    receipts of what they sent. Lines go to `printer` (default: standard output) as plain
    text: no prompt, no terminal control, in the order they come."""
    console = _Console(node, printer or _print_line, receipt_wait_s)
    console.fixed_width = width or terminal_width()
    events = node.subscribe()
    try:
        console.print(f"meshpost console of {node.name}; commands from standard input")
        console.show_current_peers()
        console.spawn(console.watch(events))
        async for line in lines:
            console.print(f"{console.prompt_text()}{line.rstrip(chr(10))}")
            if not await console.run_line(line):
                break
        await console.settle(receipt_wait_s + PRINT_DRAIN_S)
    finally:
        node.unsubscribe(events)
        await console.close()


def _print_line(text: str) -> None:
    print(text, flush=True)


__all__ = [
    "CONSOLE_PROBE_WAIT_S",
    "HISTORY_ASK_WAIT_S",
    "PRINT_DRAIN_S",
    "RECEIPT_WAIT_S",
    "ConsoleNode",
    "Printer",
    "RefreshesStatus",
    "TerminalPrinter",
    "read_group_history",
    "read_history",
    "run_console",
    "run_script",
]

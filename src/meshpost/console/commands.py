"""The console's command language: one typed line in, one `Command` out.

Rule: pure. Parsing is text in, a frozen `Command` (or a `CommandError` saying how to write
the line) out; no terminal, no node, no store, no asyncio here. `console.app` performs the
commands; `HELP_TEXT` describes this language, so it lives beside the parser.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

from meshpost.errors import MeshpostError

#: `/history` shows this many messages unless told `-n N`.
DEFAULT_HISTORY_LIMIT = 20
#: Upper bound for `/history -n N`, so a typo cannot load a whole database into the terminal.
MAX_HISTORY_LIMIT = 100_000


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
    """Show the peer table; with `probe`, ask the peers (`names`, else all) for a sign of
    life now and show who answered (`/peers --probe [PEER ...]`)."""

    probe: bool = False
    names: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class HistoryCommand:
    """Show the last `limit` stored messages, all peers or one."""

    peer: str | None = None
    limit: int = DEFAULT_HISTORY_LIMIT
    verbose: bool = False
    #: `--ask`: ask each member of group `peer` for its own messages to it (19.6)
    ask: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class GroupCommand:
    """`/join G`, `/leave G` or `/members G`."""

    action: str
    group: str


@dataclasses.dataclass(frozen=True, slots=True)
class QueueCommand:
    """`/queue [Q]`: the work queues this node knows (or Q): workers and task counts."""

    queue: str | None = None


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
    | GroupCommand
    | QueueCommand
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
/peers --probe [PEER ...]
                  ask every peer (or those named) for a sign of life now, idle links too:
                  live with its round trip, or lost (no answer within a few seconds)
/history [PEER|G] [-n N] [-v]
                  the last N stored messages (default 20), with sender and local clocks;
                  -v shows whole texts and ids (long texts are shortened otherwise); for a
                  group G, the messages to G stored here (ours with delivered k/n)
/history G --ask [-n N]
                  ask each member of G for its own last N messages to G (also those from
                  before this node joined), each shown with the member that answered
/join G, /leave G join or leave group G from now on (peers learn it; @G reaches members)
/members G        who is in group G now
/queue [Q]        work queues: workers, tasks waiting, in flight, leased, done, redelivered
/stats            the node's counters
/help             this text
/quit             leave (Ctrl-D, or Ctrl-C on an empty line; Ctrl-C on a half-typed line
                  clears it); queued messages are still delivered"""


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
    if name in ("join", "leave", "members"):
        if len(args) != 1:
            raise CommandError(f"/{name} takes one group name, e.g. `/{name} team`")
        return GroupCommand(name, args[0])
    if name == "peers" and args:
        if args[0] not in ("-p", "--probe"):
            raise CommandError("/peers takes no arguments, or --probe [PEER ...] to ask the "
                               "peers for a sign of life now")
        return PeersCommand(probe=True, names=tuple(a.removeprefix("@") for a in args[1:]))
    if name == "queue":
        if len(args) > 1:
            raise CommandError("/queue takes at most one queue name, e.g. `/queue work`")
        return QueueCommand(args[0] if args else None)
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
    verbose = False
    ask = False
    usage = "usage: /history [PEER] [-n N] [-v], or /history G --ask [-n N]"
    rest = list(args)
    while rest:
        arg = rest.pop(0)
        if arg in ("-v", "--verbose"):
            verbose = True
        elif arg in ("-a", "--ask"):
            ask = True
        elif arg.startswith("-n"):
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
    if ask and peer is None:
        raise CommandError(f"--ask needs the group to ask about, e.g. `/history team --ask`; "
                           f"{usage}")
    return HistoryCommand(peer, limit, verbose, ask)


__all__ = [
    "DEFAULT_HISTORY_LIMIT",
    "HELP_TEXT",
    "MAX_HISTORY_LIMIT",
    "Command",
    "CommandError",
    "EmptyCommand",
    "GroupCommand",
    "HelpCommand",
    "HistoryCommand",
    "PeersCommand",
    "QueueCommand",
    "QuitCommand",
    "SendCommand",
    "StatsCommand",
    "parse_command",
]

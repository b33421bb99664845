"""The console: a node's interactive prompt (`meshpost node` on a terminal, `meshpost attach`).

Rule: `from meshpost.console import X` is the public import path; this file only re-exports.

    commands   the command language, pure: `parse_command` (a line in, a `Command` out, or a
               `CommandError` saying how to write it) and `HELP_TEXT`; no terminal, node,
               store or asyncio
    app        the running console (prompt_toolkit): performs the commands on a node
               (`ConsoleNode`), prints what it reports; `run_console`, `run_script`

What the console shows comes from `meshpost.text`; its most used functions are re-exported
here as before the console had modules.
"""

from __future__ import annotations

from meshpost.console.app import (
    CONSOLE_PROBE_WAIT_S,
    HISTORY_ASK_WAIT_S,
    PRINT_DRAIN_S,
    RECEIPT_WAIT_S,
    ConsoleNode,
    Printer,
    RefreshesStatus,
    TerminalPrinter,
    read_group_history,
    read_history,
    run_console,
    run_script,
)
from meshpost.console.commands import (
    DEFAULT_HISTORY_LIMIT,
    HELP_TEXT,
    MAX_HISTORY_LIMIT,
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
from meshpost.text import (
    clean,
    format_clock,
    format_failure,
    format_incoming,
    format_peer_change,
    format_pending,
    format_queued,
    format_receipt,
    render_history,
    render_peers_table,
    render_stats,
)

__all__ = [
    "CONSOLE_PROBE_WAIT_S",
    "DEFAULT_HISTORY_LIMIT",
    "HELP_TEXT",
    "HISTORY_ASK_WAIT_S",
    "MAX_HISTORY_LIMIT",
    "PRINT_DRAIN_S",
    "RECEIPT_WAIT_S",
    "Command",
    "CommandError",
    "ConsoleNode",
    "EmptyCommand",
    "GroupCommand",
    "HelpCommand",
    "HistoryCommand",
    "PeersCommand",
    "Printer",
    "QueueCommand",
    "QuitCommand",
    "RefreshesStatus",
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
    "read_group_history",
    "read_history",
    "render_history",
    "render_peers_table",
    "render_stats",
    "run_console",
    "run_script",
]

"""The console's command language (`meshpost.console.commands`): each typed line parsed to its
command, and every line it cannot parse refused with a `CommandError` that says how to write it."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshpost.console.commands import (
    DEFAULT_HISTORY_LIMIT,
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

# -- parse_command ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("", EmptyCommand()),
        ("   \t ", EmptyCommand()),
        ("@B hello there", SendCommand("B", "hello there")),
        ("  @B   hello   there  ", SendCommand("B", "hello   there")),
        ("@B\thi", SendCommand("B", "hi")),
        ("@all everyone", SendCommand("all", "everyone")),
        ("@ops /not a command", SendCommand("ops", "/not a command")),
        ("hello again", SendCommand(None, "hello again")),
        ("/peers", PeersCommand()),
        ("/PEERS", PeersCommand()),
        ("/stats", StatsCommand()),
        ("/help", HelpCommand()),
        ("/?", HelpCommand()),
        ("/quit", QuitCommand()),
        ("/exit", QuitCommand()),
        ("/q", QuitCommand()),
        ("/history", HistoryCommand(None, DEFAULT_HISTORY_LIMIT)),
        ("/history B", HistoryCommand("B", DEFAULT_HISTORY_LIMIT)),
        ("/history -n 5", HistoryCommand(None, 5)),
        ("/history B -n 5", HistoryCommand("B", 5)),
        ("/history -n 7 B", HistoryCommand("B", 7)),
        ("/history -n3", HistoryCommand(None, 3)),
        ("/history -n=3 C", HistoryCommand("C", 3)),
        ("/history @B", HistoryCommand("B", DEFAULT_HISTORY_LIMIT)),
        ("/join team", GroupCommand("join", "team")),
        ("/LEAVE team", GroupCommand("leave", "team")),
        ("/members ops", GroupCommand("members", "ops")),
        ("/queue", QueueCommand()),
        ("/QUEUE work", QueueCommand("work")),
    ],
)
def test_parse_command(line: str, expected: Command) -> None:
    assert parse_command(line) == expected


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ("@B", "type the text after the recipient"),
        ("@B    ", "`@B hello`"),
        ("@", "recipient right after '@'"),
        ("@ hello", "recipient right after '@'"),
        ("/history -n abc", "not 'abc'"),
        ("/history -n", "-n needs a number"),
        ("/history -n 0", "from 1 to"),
        ("/history -n ١٢", "whole number"),
        ("/history -n 1_000", "whole number"),
        ("/history -n " + "9" * 5000, "whole number"),
        ("/history @", "peer's name right after '@'"),
        ("/history -x", "unknown option '-x'"),
        ("/join", "one group name"),
        ("/leave a b", "one group name"),
        ("/history B C", "one peer"),
        ("/foo", "unknown command `/foo`"),
        ("/", "unknown command `/`"),
        ("/peers now", "/peers takes no arguments"),
        ("/quit please", "takes no arguments"),
    ],
)
def test_parse_errors_say_what_to_do(line: str, fragment: str) -> None:
    with pytest.raises(CommandError) as info:
        parse_command(line)
    assert fragment in str(info.value)


@given(st.one_of(
    st.text(),
    st.text().map(lambda s: "@" + s),
    st.text().map(lambda s: "/" + s),
    st.text().map(lambda s: "/history " + s),
    st.text().map(lambda s: "/history -n " + s),
))
def test_parse_raises_nothing_but_command_error(line: str) -> None:
    command: Command | None = None
    try:
        command = parse_command(line)
    except CommandError as exc:
        message = str(exc)
    if command is None:
        assert message
    else:
        assert isinstance(command, (SendCommand, PeersCommand, HistoryCommand, StatsCommand,
                                    HelpCommand, QuitCommand, EmptyCommand))


@given(
    st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,20}\Z"),
    st.text(min_size=1).filter(lambda s: s == s.strip() and s != ""),
)
def test_send_keeps_target_and_body(name: str, body: str) -> None:
    assert parse_command(f"@{name} {body}") == SendCommand(name, body)


def test_history_v_is_parsed() -> None:
    assert parse_command("/history B -v -n 3") == HistoryCommand("B", 3, verbose=True)


def test_history_ask_is_parsed_and_needs_a_group() -> None:
    assert parse_command("/history team --ask -n 5") == HistoryCommand("team", 5, ask=True)
    assert parse_command("/history -a team") == HistoryCommand("team", ask=True)
    with pytest.raises(CommandError, match="--ask needs the group"):
        parse_command("/history --ask")


# -- /peers --probe ------------------------------------------------------------------------


@pytest.mark.parametrize(("line", "expected"), [
    ("/peers", PeersCommand()),
    ("/peers --probe", PeersCommand(probe=True)),
    ("/peers -p B @C", PeersCommand(probe=True, names=("B", "C"))),
])
def test_peers_probe_parses(line: str, expected: PeersCommand) -> None:
    assert parse_command(line) == expected


def test_peers_with_anything_but_probe_says_how_to_use_it() -> None:
    with pytest.raises(CommandError, match=r"or --probe \[PEER \.\.\.\]"):
        parse_command("/peers B")

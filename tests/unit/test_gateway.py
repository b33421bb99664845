"""The gateway's pure parts: framing a byte stream, parsing a guest's line."""

from __future__ import annotations

import pytest

from meshpost.errors import InvalidEndpoint, InvalidMessage
from meshpost.gateway import (
    Blank,
    Framer,
    GatewayInputError,
    Inbox,
    Post,
    decode_text,
    format_time,
    parse_line,
    parse_listen,
    relayed_body,
)


def test_framer_splits_at_newlines_and_keeps_the_unterminated_rest_for_a_pause() -> None:
    framer = Framer(max_bytes=10)
    assert framer.feed(b"ab\ncd") == [b"ab"]
    assert framer.pending
    assert framer.feed(b"e\n\nf") == [b"cde", b""]
    assert framer.flush() == b"f"
    assert not framer.pending


def test_framer_refuses_more_than_the_limit_buffered_without_a_newline() -> None:
    framer = Framer(max_bytes=4)
    assert framer.feed(b"abcd") == []
    with pytest.raises(GatewayInputError, match="limit of 4 bytes"):
        framer.feed(b"e")
    with pytest.raises(GatewayInputError):
        Framer(max_bytes=4).feed(b"abcdef\n")
    assert Framer(max_bytes=4).feed(b"abcd\r\n") == [b"abcd\r"]


def test_decode_text_drops_a_crlf_carriage_return_and_refuses_bad_utf8() -> None:
    assert decode_text("señal\r".encode()) == "señal"
    with pytest.raises(GatewayInputError, match="not UTF-8"):
        decode_text(b"caf\xe9")


@pytest.mark.parametrize(
    ("line", "command"),
    [
        ("hola", Post(None, "hola")),
        ("@B hola B", Post("B", "hola B")),
        ("@all a todos", Post("all", "a todos")),
        ("@B", Post("B", "")),
        ("/inbox", Inbox(20)),
        ("/inbox 5", Inbox(5)),
        ("   ", Blank()),
        ("", Blank()),
    ],
)
def test_parse_line(line: str, command: object) -> None:
    assert parse_line(line) == command


@pytest.mark.parametrize("line", ["@ hola", "/inbox 0", "/inbox x", "/inbox 100000"])
def test_parse_line_refuses_malformed_commands(line: str) -> None:
    with pytest.raises(InvalidMessage):
        parse_line(line)


def test_parse_listen() -> None:
    assert parse_listen("tcp://127.0.0.1:7000", "tcp") == ("127.0.0.1", 7000)
    assert parse_listen("udp://[::1]:0", "udp") == ("::1", 0)
    for bad in ("udp://127.0.0.1:7000", "tcp://127.0.0.1", "tcp://:7", "tcp://h:70000"):
        with pytest.raises(InvalidEndpoint):
            parse_listen(bad, "tcp")


def test_relayed_body_names_the_guest_and_times_are_utc_iso() -> None:
    assert relayed_body("tcp:127.0.0.1:5", "hola") == "[tcp:127.0.0.1:5] hola"
    assert format_time(1_700_000_000_123_456_789) == "2023-11-14T22:13:20.123456Z"

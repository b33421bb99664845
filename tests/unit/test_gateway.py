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
    fit_answer,
    format_time,
    inbox_lines,
    inbox_rows,
    parse_line,
    parse_listen,
    relayed_body,
    udp_budget,
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


def test_framer_counts_a_line_without_its_crlf_carriage_return_whatever_the_line() -> None:
    # One byte over is over, CR or not (a CR used to be allowed to any line).
    with pytest.raises(GatewayInputError, match="message of 5 bytes or more"):
        Framer(max_bytes=4).feed(b"abcde\n")
    with pytest.raises(GatewayInputError, match="message of 5 bytes or more"):
        Framer(max_bytes=4).feed(b"abcde\r\n")
    framer = Framer(max_bytes=4)
    assert framer.feed(b"abcd\r") == []  # its LF may come in the next read
    assert framer.feed(b"\n") == [b"abcd\r"]


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


def test_fit_answer_keeps_whole_lines_then_cuts_the_first_that_does_not_fit() -> None:
    assert fit_answer(["ab", "cd"], 6) == b"ab\ncd\n"
    assert fit_answer(["ab", "cdefghij"], 9) == b"ab\ncd\xe2\x80\xa6\n"  # 9 bytes
    assert fit_answer(["ab", "cdefghij", "k"], 5) == b"ab\n"  # no room for a cut line
    # A cut never splits a character: 'ñ' is two bytes.
    assert fit_answer(["ñññññ"], 8).decode() == "ññ…\n"
    assert fit_answer(["ñññññ"], 7).decode() == "ñ…\n"


def test_a_udp_answer_is_three_times_its_request_or_128_bytes() -> None:
    assert udp_budget(1) == 128
    assert udp_budget(100) == 300
    assert udp_budget(60_000) == 65_507


def test_inbox_lists_the_newest_that_fit_and_says_how_many_were_left_out() -> None:
    rows = [(i * 1_000_000_000, "B", f"message {i}") for i in range(5)]
    assert inbox_lines(rows, 10_000) == [
        "inbox: 5 message(s)", *(f"1970-01-01T00:00:0{i}.000000Z B: message {i}"
                                 for i in range(5))]
    cut = inbox_lines(rows, 180)
    assert cut == ["inbox: 2 message(s) (the newest that fit an answer of 180 bytes)",
                   "1970-01-01T00:00:03.000000Z B: message 3",
                   "1970-01-01T00:00:04.000000Z B: message 4"]
    assert len("".join(f"{line}\n" for line in cut).encode()) <= 180
    # The newest alone is too long: it is cut to fit, its control characters escaped.
    (header, line) = inbox_lines([(0, "udp:1.2.3.4:5", "\x01" * 1000)], 128)
    assert header == "inbox: 1 message(s) (the newest that fit an answer of 128 bytes)"
    assert line.startswith("1970-01-01T00:00:00.000000Z udp:1.2.3.4:5: \\x01")
    assert line.endswith("…") and len(f"{header}\n{line}\n".encode()) <= 128


def test_inbox_reads_only_the_rows_that_can_fit_and_one_more() -> None:
    assert inbox_rows(200, 128) == 5  # 4 lines of 32 bytes fit in 128 at most
    assert inbox_rows(20, 65_507) == 20
    assert inbox_rows(200, 1 << 20) == 200
    # The one more is enough to say that some were left out: they can never all fit.
    rows = [(0, "B", "x")] * inbox_rows(200, 128)
    assert inbox_lines(rows, 128)[0].startswith("inbox: 1 message(s) (the newest that fit")

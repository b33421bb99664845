"""The command line against real node processes: exit codes and messages a user can act on."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meshpost.cluster import LocalCluster

pytestmark = pytest.mark.integration

CLI_TIMEOUT_S = 60


def meshpost(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshpost", *args], capture_output=True, text=True,
        timeout=CLI_TIMEOUT_S, stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})},
    )


@pytest.fixture
def pair(short_tmp: Path):  # type: ignore[no-untyped-def]
    cluster = LocalCluster.create(short_tmp, 2, transport="ipc",
                                  options={"ping_interval_s": 0.2, "peer_timeout_s": 1.0})
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


def test_send_prints_the_receipt_and_history_json_has_the_documented_schema(
    pair: LocalCluster,
) -> None:
    data_a = str(pair.data_dir("A"))
    done = meshpost("send", "--node", "A", "--data", data_a, "--to", "B", "hola", "B")
    assert done.returncode == 0, done.stderr
    assert "✓ delivered to B" in done.stdout
    for node in ("A", "B"):
        out = meshpost("history", "--node", node, "--data", str(pair.data_dir(node)), "--json")
        assert out.returncode == 0, out.stderr
        (record,) = json.loads(out.stdout)
        assert {"id", "from", "to", "body", "sent_at_ns", "hlc", "direction", "state",
                "delivered_at_ns", "receipt_received_at_ns", "receipt_sync"} <= set(record)
        assert (record["from"], record["to"], record["body"]) == ("A", "B", "hola B")
        assert record["state"] == ("delivered" if node == "A" else "received")
    csv_out = meshpost("history", "--node", "A", "--data", data_a, "--csv")
    assert csv_out.stdout.splitlines()[0].startswith("id,from,to,body,sent_at_ns")


def test_history_table_shows_bodies_as_typed_even_when_they_look_like_markup(
    pair: LocalCluster,
) -> None:
    data_a = str(pair.data_dir("A"))
    body = "see [bold]this[/bold], then [/] and [red]"
    sneaky = "clear \x1b[2J screen"
    for text in (body, sneaky):
        done = meshpost("send", "--node", "A", "--data", data_a, "--to", "B", text)
        assert done.returncode == 0, done.stderr
    for node in ("A", "B"):
        out = meshpost("history", "--node", node, "--data", str(pair.data_dir(node)),
                       env={"COLUMNS": "250"})
        assert out.returncode == 0, out.stderr
        assert body in out.stdout
        # A control character is shown escaped, as the console shows it, never sent raw.
        assert "clear \\u001b[2J screen" in out.stdout and "\x1b" not in out.stdout
    mistyped = meshpost("history", "--node", "A", "--data", data_a, "--peer", "b")
    assert mistyped.returncode == 0
    assert "no messages with 'b' in A's store (peers it has messages with: B)" in mistyped.stderr


def test_peers_table_wraps_a_long_endpoint_instead_of_cutting_it(pair: LocalCluster) -> None:
    endpoint = pair.endpoints["B"]
    out = meshpost("peers", "--node", "A", "--data", str(pair.data_dir("A")),
                   env={"COLUMNS": "60"})
    assert out.returncode == 0, out.stderr
    # The endpoint column's cells, top to bottom, joined: the whole endpoint, no ellipsis.
    cells = [line.split("│")[2].strip() for line in out.stdout.splitlines()
             if line.count("│") == 8]
    assert endpoint in "".join(cells) and "…" not in out.stdout


def test_history_into_a_pipe_closed_early_ends_quietly(pair: LocalCluster) -> None:
    data_a = str(pair.data_dir("A"))
    # One pipelined `send -l` rather than 30 processes: the history output is what is tested.
    lines = "".join(f"line {i} " + "x" * 2000 + "\n" for i in range(30))
    sent = subprocess.run([sys.executable, "-m", "meshpost", "send", "--node", "A", "--data",
                           data_a, "--to", "B", "--lines", "--quiet"], input=lines,
                          capture_output=True, text=True, timeout=CLI_TIMEOUT_S)
    assert sent.returncode == 0, sent.stderr
    # As `meshpost history --json | head -1`: the reader leaves after one line.
    proc = subprocess.Popen([sys.executable, "-m", "meshpost", "history", "--node", "A",
                             "--data", data_a, "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline().startswith(b"[")
    proc.stdout.close()
    code = proc.wait(CLI_TIMEOUT_S)
    with proc.stderr:
        errors = proc.stderr.read()
    assert code == 0 and b"Traceback" not in errors, errors


def test_send_to_unknown_peer_or_empty_or_oversized_message_is_a_usage_error(
    pair: LocalCluster,
) -> None:
    data_a = str(pair.data_dir("A"))
    unknown = meshpost("send", "--node", "A", "--data", data_a, "--to", "Z", "hi")
    assert unknown.returncode == 2
    assert "unknown peer 'Z'" in unknown.stderr
    empty = meshpost("send", "--node", "A", "--data", data_a, "--to", "B", " ")
    assert empty.returncode == 2
    assert "empty" in empty.stderr
    big = meshpost("send", "--node", "A", "--data", data_a, "--to", "B", "x" * 70_000)
    assert big.returncode == 2
    assert "over the 65536-byte limit" in big.stderr
    status = meshpost("peers", "--node", "A", "--data", data_a, "--json")
    assert json.loads(status.stdout)["status"]["pending"] == 0, "nothing bad was stored"


def test_send_while_receiver_is_down_times_out_with_exit_3_and_delivers_later(
    pair: LocalCluster,
) -> None:
    pair.nodes["B"].stop()
    data_a = str(pair.data_dir("A"))
    late = meshpost("send", "--node", "A", "--data", data_a, "--to", "B", "--timeout", "0.5",
                    "later")
    assert late.returncode == 3
    assert "stays queued" in late.stderr
    pair.start(["B"])
    again = meshpost("send", "--node", "A", "--data", data_a, "--to", "B", "now")
    assert again.returncode == 0

    def stored_at_b() -> list[str]:
        out = meshpost("history", "--node", "B", "--data", str(pair.data_dir("B")), "--json")
        return [r["body"] for r in json.loads(out.stdout)]

    # "now" was receipted; "later" goes on the same link but may be a batch of its own that
    # is still on its way (resent after B's restart): its promise is delivery, so wait for
    # it, bounded. Once in a full-suite run under load only "now" was there at the first
    # look (the logs below are for the next time).
    deadline = time.monotonic() + 15
    while (bodies := stored_at_b()) != ["later", "now"] and time.monotonic() < deadline:
        time.sleep(0.2)
    logs = {n: pair.process(n).log_path.read_text(errors="replace")[-3000:] for n in "AB"}
    assert bodies == ["later", "now"], logs


def test_stop_ends_a_running_node_cleanly_and_its_queued_message_goes_after_restart(
    pair: LocalCluster,
) -> None:
    """`meshpost stop --node B` (the way to end a node started in the background): B exits
    0 as after Ctrl-C; a message to B then waits in A (exit 3), a second stop finds nothing
    running (exit 4), and B started again receives it."""
    data_b = str(pair.data_dir("B"))
    process = pair.process("B").process
    assert process is not None and process.poll() is None
    stopped = meshpost("stop", "--node", "B", "--data", data_b)
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout.startswith(f"B stopped (pid {process.pid})")
    assert process.wait(CLI_TIMEOUT_S) == 0  # exited on its own, cleanly, not killed
    assert "[B] node closed" in pair.process("B").log_path.read_text(errors="replace")
    data_a = str(pair.data_dir("A"))
    waiting = meshpost("send", "--node", "A", "--data", data_a, "--to", "B", "--timeout", "0.5",
                       "while B was stopped")
    assert waiting.returncode == 3, waiting.stderr
    again = meshpost("stop", "--node", "B", "--data", data_b)
    assert again.returncode == 4 and "not running" in again.stderr
    bad = meshpost("stop", "--node", "A", "--data", data_a, "--timeout", "0")
    assert bad.returncode == 2 and "--timeout" in bad.stderr
    assert pair.process("A").alive()
    pair.start(["B"])
    deadline = time.monotonic() + 15
    while "while B was stopped" not in _bodies_at(pair, "B") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _bodies_at(pair, "B") == ["while B was stopped"]


def test_send_through_a_node_that_is_not_running_exits_4(tmp_path: Path) -> None:
    done = meshpost("send", "--node", "ghost", "--data", str(tmp_path), "--to", "B", "hi")
    assert done.returncode == 4
    assert "not running" in done.stderr


def test_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = meshpost("node", "A", "--bind", f"tcp://127.0.0.1:{port}", "--data",
                        str(tmp_path / "A"), "--headless")
    # Issue 17 item 7: a port in use has its own exit code (it was 1, an "internal error").
    assert done.returncode == 7, done.stderr
    assert "cannot bind" in done.stderr
    assert "in use" in done.stderr.lower()


def test_ipc_path_a_running_node_serves_is_refused_and_stays_its(
    pair: LocalCluster, short_tmp: Path,
) -> None:
    """Audit: binding the ipc path of a running node took it over (exit 0) and, when the
    second node stopped, deleted the first node's socket file: it was unreachable over ipc."""
    endpoint = pair.endpoints["A"]
    sock_path = Path(endpoint[len("ipc://"):])
    second = subprocess.Popen(
        [sys.executable, "-m", "meshpost", "node", "X", "--bind", endpoint, "--data",
         str(short_tmp / "X"), "--headless"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        _, err = second.communicate(timeout=CLI_TIMEOUT_S / 2)
    except subprocess.TimeoutExpired:
        second.terminate()
        _, err = second.communicate(timeout=CLI_TIMEOUT_S)
    assert second.returncode == 7, err
    assert str(sock_path) in err and "another process" in err
    assert "Traceback" not in err
    assert sock_path.exists(), "A's socket file is still there"
    done = meshpost("send", "--node", "B", "--data", str(pair.data_dir("B")), "--to", "A",
                    "still A")
    assert done.returncode == 0, done.stderr


def test_stale_ipc_socket_file_is_replaced(short_tmp: Path) -> None:
    """A socket file left by a process that died (nothing listens) does not stop a bind."""
    stale = short_tmp / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(stale))  # bound, never listening: a connect is refused
    node = subprocess.Popen(
        [sys.executable, "-m", "meshpost", "node", "S", "--bind", f"ipc://{stale}", "--data",
         str(short_tmp / "S"), "--headless"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        peers = None
        for _ in range(200):
            peers = meshpost("peers", "--node", "S", "--data", str(short_tmp / "S"))
            if peers.returncode == 0 or node.poll() is not None:
                break
        assert peers is not None and peers.returncode == 0, peers and peers.stderr
    finally:
        node.terminate()
        node.communicate(timeout=CLI_TIMEOUT_S)


def test_ipc_path_in_a_missing_folder_is_a_usage_error(short_tmp: Path) -> None:
    missing = short_tmp / "no" / "such"
    done = meshpost("node", "A", "--bind", f"ipc://{missing}/x.sock", "--data",
                    str(short_tmp / "A"), "--headless")
    assert done.returncode == 2, done.stderr
    assert f"folder {missing} does not exist" in done.stderr
    assert "Traceback" not in done.stderr


def test_second_node_on_the_same_data_dir_is_refused(pair: LocalCluster, short_tmp: Path) -> None:
    done = meshpost("node", "A", "--config", str(pair.config_path), "--data",
                    str(pair.data_dir("A")), "--bind", f"ipc://{short_tmp}/other.sock",
                    "--headless")
    assert done.returncode == 6
    assert "locked by another process" in done.stderr


def test_data_dir_that_is_not_writable_is_a_clear_error(short_tmp: Path) -> None:
    blocker = short_tmp / "file"
    blocker.write_text("not a directory")
    done = meshpost("node", "A", "--bind", f"ipc://{short_tmp}/unwritable.sock", "--data",
                    str(blocker / "A"), "--headless")
    assert done.returncode == 6
    assert "not writable" in done.stderr


def test_a_data_dir_that_is_a_file_or_holds_an_empty_db_is_named_as_such(
    short_tmp: Path,
) -> None:
    """Audit: "is not writable: File exists" and "no such table: messages" (exit 6)."""
    a_file = short_tmp / "file"
    a_file.write_text("")
    for args in (("node", "A", "--bind", f"ipc://{short_tmp}/f.sock", "--headless"),
                 ("history", "--node", "A")):
        done = meshpost(*args, "--data", str(a_file))
        assert done.returncode == 6, done.stderr
        assert (f"data directory {a_file} is not writable: it is a file, not a folder"
                in done.stderr)
    empty = short_tmp / "empty"
    empty.mkdir()
    (empty / "meshpost.db").touch()
    done = meshpost("history", "--node", "X", "--data", str(empty))
    assert done.returncode == 4, done.stderr
    assert "the file is empty" in done.stderr and "no such table" not in done.stderr


def test_bad_config_and_bad_endpoints_are_usage_errors(tmp_path: Path) -> None:
    bad = meshpost("node", "all", "--bind", "tcp://127.0.0.1:1", "--headless")
    assert bad.returncode == 2
    assert "reserved" in bad.stderr
    endpoint = meshpost("node", "A", "--bind", "udp://x:1", "--headless")
    assert endpoint.returncode == 2
    assert "tcp:// and ipc://" in endpoint.stderr
    cfg = tmp_path / "mesh.toml"
    cfg.write_text("[nodes.A\n")
    toml = meshpost("node", "A", "--config", str(cfg), "--headless")
    assert toml.returncode == 2
    assert "not valid TOML" in toml.stderr


@pytest.mark.parametrize("secure", [False, True], ids=["plain", "curve"])
def test_cluster_up_and_down(short_tmp: Path, secure: bool) -> None:
    up = meshpost("cluster", "up", "3", "--transport", "ipc", "--data", str(short_tmp),
                  *(["--secure"] if secure else []))
    try:
        assert up.returncode == 0, up.stderr
        assert "meshpost send --node A" in up.stdout
        sent = meshpost("send", "--node", "A", "--data", str(short_tmp / "A"), "--to", "all",
                        "hello cluster")
        assert sent.returncode == 0, sent.stderr
        assert sent.stdout.count("✓ delivered") == 2
    finally:
        down = meshpost("cluster", "down", "--data", str(short_tmp))
    assert down.returncode == 0
    assert down.stdout.count("stopped") == 3


def meshpost_in(*args: str, stdin: str) -> subprocess.CompletedProcess[str]:
    """`meshpost` with `stdin` piped in."""
    return subprocess.run([sys.executable, "-m", "meshpost", *args], capture_output=True,
                          text=True, timeout=CLI_TIMEOUT_S, input=stdin)


def _bodies_at(cluster: LocalCluster, node: str) -> list[str]:
    out = meshpost("history", "--node", node, "--data", str(cluster.data_dir(node)), "--json")
    assert out.returncode == 0, out.stderr
    return [r["body"] for r in json.loads(out.stdout)]


def test_send_reads_stdin_a_file_or_lines_and_prints_json_or_nothing(
    pair: LocalCluster, tmp_path: Path
) -> None:
    data_a = str(pair.data_dir("A"))
    piped = meshpost_in("send", "--node", "A", "--data", data_a, "--to", "B", stdin="hi\n")
    assert piped.returncode == 0, piped.stderr
    assert "✓ delivered to B" in piped.stdout
    lines = meshpost_in("send", "--node", "A", "--data", data_a, "--to", "B", "-l", "--json",
                        stdin="one\n\ntwo words\nthree\n")
    assert lines.returncode == 0, lines.stderr
    records = [json.loads(line) for line in lines.stdout.splitlines()]
    assert [r["status"] for r in records] == ["delivered"] * 3
    assert {"to", "id", "seq", "sent_at_ns", "delivered", "delivered_at_ns"} <= set(records[0])
    assert [r["seq"] for r in records] == sorted(r["seq"] for r in records)
    file = tmp_path / "note.txt"
    file.write_text("from a file\nsecond line\n", encoding="utf-8")
    quiet = meshpost("send", "--node", "A", "--data", data_a, "--to", "B", "-f", str(file),
                     "--quiet")
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stdout == quiet.stderr == ""
    assert _bodies_at(pair, "B") == ["hi", "one", "two words", "three",
                                     "from a file\nsecond line"]


def test_send_lines_reports_each_failed_line_and_keeps_going(pair: LocalCluster) -> None:
    data_a = str(pair.data_dir("A"))
    big = "x" * 70_000
    done = meshpost_in("send", "--node", "A", "--data", data_a, "--to", "B", "--lines",
                       stdin=f"first\n{big}\nlast\n")
    assert done.returncode == 2
    assert "line 2: message is 70000 bytes" in done.stderr
    as_json = meshpost_in("send", "--node", "A", "--data", data_a, "--to", "B", "--lines",
                          "--json", "--quiet", stdin=f"{big}\n")
    assert as_json.returncode == 2 and as_json.stderr == ""
    (record,) = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert (record["line"], record["status"], record["kind"]) == (1, "error",
                                                                  "message_too_large")
    assert _bodies_at(pair, "B") == ["first", "last"]


@pytest.mark.parametrize("value", ["nan", "1e300", "-1", "inf", "soon"])
def test_send_rejects_a_bad_timeout_before_sending_anything(
    pair: LocalCluster, value: str
) -> None:
    data_a = str(pair.data_dir("A"))
    done = meshpost("send", "--node", "A", "--data", data_a, "--to", "B", "--timeout", value,
                    "never sent")
    assert done.returncode == 2
    assert "--timeout" in done.stderr and "Traceback" not in done.stderr
    assert _bodies_at(pair, "A") == []


def test_send_with_no_text_on_a_terminal_says_how_to_give_it(tmp_path: Path) -> None:
    import pty

    primary, secondary = pty.openpty()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "meshpost", "send", "--node", "A", "--data", str(tmp_path),
             "--to", "B"], stdin=secondary, capture_output=True, text=True,
            timeout=CLI_TIMEOUT_S)
    finally:
        os.close(primary)
        os.close(secondary)
    assert done.returncode == 2
    assert "standard input" in done.stderr


def test_history_csv_escapes_terminal_controls_on_a_tty_and_keeps_raw_bytes_in_a_pipe(
    pair: LocalCluster,
) -> None:
    import pty

    from meshpost.control import ControlClient, SendRequest

    body = "red \x1b[31malert\x07 \u202eevil"
    with ControlClient(pair.data_dir("A"), name="A") as client:
        assert client.request(SendRequest("B", body, 10), timeout_s=20).ok
    args = [sys.executable, "-m", "meshpost", "history", "--node", "B", "--data",
            str(pair.data_dir("B")), "--csv"]
    piped = subprocess.run(args, capture_output=True, text=True, timeout=CLI_TIMEOUT_S)
    assert body in piped.stdout
    primary, secondary = pty.openpty()
    try:
        process = subprocess.Popen(args, stdout=secondary, stderr=subprocess.DEVNULL)
        os.close(secondary)
        chunks = []
        while True:
            try:
                chunk = os.read(primary, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        assert process.wait(CLI_TIMEOUT_S) == 0
    finally:
        os.close(primary)
    shown = b"".join(chunks).decode("utf-8")
    assert "\x1b" not in shown and "\x07" not in shown and "\u202e" not in shown
    assert "\\u001b[31malert\\u0007" in shown

"""`meshpost tail` against real node processes: a pipeline over tcp:// and ipc:// at once (seed
001) ended by its marker `x`, `--count`, `--from`, `--json`, and nothing lost between polls."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshpost.cluster import NodeProcess, free_tcp_ports

pytestmark = pytest.mark.integration

CLI_TIMEOUT_S = 60


@dataclasses.dataclass
class FlagNode(NodeProcess):
    """A node started from flags alone (binds and peers), without a mesh config file."""

    def command(self) -> list[str]:
        return [sys.executable, "-m", "meshpost", "node", self.name, "--data",
                str(self.data_dir), "--headless", *self.extra_args]


def start_nodes(root: Path, flags: dict[str, list[str]]) -> dict[str, FlagNode]:
    nodes = {name: FlagNode(name, root / "none.toml", root / name, root / f"{name}.log",
                            extra_args=args) for name, args in flags.items()}
    for node in nodes.values():
        node.start()
    for node in nodes.values():
        node.wait_ready()
    return nodes


def meshpost(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meshpost", *args], capture_output=True,
                          text=True, timeout=CLI_TIMEOUT_S, stdin=subprocess.DEVNULL)


def send(root: Path, node: str, to: str, text: str) -> None:
    done = meshpost("send", "--node", node, "--data", str(root / node), "--to", to, text)
    assert done.returncode == 0, done.stderr


class Tail:
    """A `meshpost tail` process, started and waited for until it follows the node."""

    def __init__(self, root: Path, node: str, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "meshpost", "tail", "--node", node, "--data",
             str(root / node), *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        assert self.proc.stderr is not None
        # Its note on stderr comes once it holds the node's cursor: what is sent after counts.
        note = self.proc.stderr.readline()
        assert "incoming messages from now" in note, note + self.proc.stderr.read()

    def finish(self) -> tuple[int, list[str], str]:
        out, err = self.proc.communicate(timeout=CLI_TIMEOUT_S)
        return self.proc.returncode, out.splitlines(), err

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate(timeout=CLI_TIMEOUT_S)


@pytest.fixture
def pipeline(short_tmp: Path) -> Iterator[tuple[Path, dict[str, FlagNode]]]:
    """S binds tcp:// and ipc:// at once; A reaches it over tcp, C over ipc (seed 001)."""
    port_s, port_a = free_tcp_ports(2)
    s_tcp, s_ipc = f"tcp://127.0.0.1:{port_s}", f"ipc://{short_tmp}/s.sock"
    a_tcp, c_ipc = f"tcp://127.0.0.1:{port_a}", f"ipc://{short_tmp}/c.sock"
    nodes = start_nodes(short_tmp, {
        "S": ["--bind", s_tcp, "--bind", s_ipc, "--peer", f"A={a_tcp}", "--peer", f"C={c_ipc}"],
        "A": ["--bind", a_tcp, "--peer", f"S={s_tcp}"],
        "C": ["--bind", c_ipc, "--peer", f"S={s_ipc}"],
    })
    try:
        yield short_tmp, nodes
    finally:
        for node in nodes.values():
            node.stop()


def test_pipeline_over_tcp_and_ipc_at_once_ends_each_tail_at_its_x(
    pipeline: tuple[Path, dict[str, FlagNode]],
) -> None:
    root, _ = pipeline
    # The seed's server: numbers, then texts, spread over its clients, then an `x` for each.
    texts = ["1", "2", "3", "Esta es una prueba,1", "Desde zeroMQ,2", "Sigo probando,3",
             "Prueba...,4", "q,5", "1,6", "q,7"]
    tails = {client: Tail(root, client, "--until", "x") for client in ("A", "C")}
    into_s = Tail(root, "S", "--until", "x", "--json")
    try:
        expected: dict[str, list[str]] = {"A": [], "C": []}
        for i, text in enumerate(texts):
            client = "AC"[i % 2]
            send(root, "S", client, text)
            expected[client].append(text)
        for client in ("A", "C"):
            send(root, "S", client, "x")
        # And the other way, into S's two binds at once: A over tcp, C over ipc.
        send(root, "A", "S", "from A over tcp")
        send(root, "C", "S", "from C over ipc")
        send(root, "A", "S", "x")
        for client, tail in tails.items():
            code, lines, err = tail.finish()
            assert code == 0, err
            # One line per message, the sender named, the marker itself not printed.
            assert [line.split(" → me: ", 1)[1] for line in lines] == expected[client]
            assert all("] S → me: " in line for line in lines), lines
        code, lines, err = into_s.finish()
        assert code == 0, err
        records = [json.loads(line) for line in lines]
        assert [(r["from"], r["to"], r["body"]) for r in records] == [
            ("A", "S", "from A over tcp"), ("C", "S", "from C over ipc")]
        assert {r["direction"] for r in records} == {"in"}
    finally:
        for tail in [*tails.values(), into_s]:
            tail.kill()


def test_tail_count_from_and_json_lose_nothing_between_polls(
    pipeline: tuple[Path, dict[str, FlagNode]],
) -> None:
    root, _ = pipeline
    from_a = Tail(root, "S", "--from", "A", "--count", "40", "--json")
    any_two = Tail(root, "S", "-C", "2")
    try:
        # A stream through one connection: many messages arrive between two of tail's polls.
        lines = "\n".join(f"a{i}" for i in range(40))
        done = subprocess.run(
            [sys.executable, "-m", "meshpost", "send", "--node", "A", "--data", str(root / "A"),
             "--to", "S", "--lines", "-q"], input=lines, capture_output=True, text=True,
            timeout=CLI_TIMEOUT_S)
        assert done.returncode == 0, done.stderr
        send(root, "C", "S", "c0")
        code, out, err = from_a.finish()
        assert code == 0, err
        records = [json.loads(line) for line in out]
        assert [r["body"] for r in records] == [f"a{i}" for i in range(40)]
        # The `history --json` fields, each message once.
        history = meshpost("history", "--node", "S", "--data", str(root / "S"), "--json")
        by_id = {r["id"]: r for r in json.loads(history.stdout)}
        for record in records:
            assert record == by_id[record["id"]]
        code, out, err = any_two.finish()
        assert code == 0, err
        assert len(out) == 2
    finally:
        from_a.kill()
        any_two.kill()


def test_tail_of_a_node_that_is_not_running_exits_4(short_tmp: Path) -> None:
    done = meshpost("tail", "--node", "Z", "--data", str(short_tmp / "Z"))
    assert done.returncode == 4, done.stderr
    bad = meshpost("tail", "--node", "Z", "--data", str(short_tmp / "Z"), "--count", "0")
    assert bad.returncode == 2 and "--count" in bad.stderr
    assert not os.path.exists(short_tmp / "Z" / "control.endpoint")

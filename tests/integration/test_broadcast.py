"""Broadcast k/n against real node processes: `send --to all|GROUP` shows `delivered k/n`
naming the members pending as receipts arrive, keeps retrying a member that is down, and ends
with every member's receipt, each copy stored once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshpost.cluster import LocalCluster

pytestmark = pytest.mark.integration

CLI_TIMEOUT_S = 90
MEMBERS = ["B", "C", "D", "E", "F"]


def meshpost(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meshpost", *args], capture_output=True,
                          text=True, timeout=CLI_TIMEOUT_S, stdin=subprocess.DEVNULL)


@pytest.fixture
def six(short_tmp: Path) -> Iterator[LocalCluster]:
    cluster = LocalCluster.create(short_tmp, 6, transport="ipc", names=["A", *MEMBERS],
                                  groups={"team": ["A", *MEMBERS]},
                                  options={"ping_interval_s": 0.2, "peer_timeout_s": 1.0,
                                           "retransmit_max_s": 0.5})
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


def history(cluster: LocalCluster, node: str) -> list[dict[str, object]]:
    out = meshpost("history", "--node", node, "--data", str(cluster.data_dir(node)), "--json")
    assert out.returncode == 0, out.stderr
    records: list[dict[str, object]] = json.loads(out.stdout)
    return records


@pytest.mark.parametrize("target", ["team", "all"])
def test_broadcast_to_five_with_one_down_then_restarted_gets_five_receipts_each_stored_once(
    six: LocalCluster, target: str,
) -> None:
    six.stop(["D"])
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshpost", "send", "--node", "A", "--data",
         str(six.data_dir("A")), "--to", target, "--timeout", "60", "to the five"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    lines: list[str] = []
    four = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if "delivered 4/5 (pending: D)" in line:
                four.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        # Four members receipt; D is named as the one pending while it is down.
        assert four.wait(CLI_TIMEOUT_S), lines
        assert proc.poll() is None  # still waiting for D, retrying it
        six.start(["D"])
        assert proc.wait(CLI_TIMEOUT_S) == 0, lines
        reader.join(CLI_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=CLI_TIMEOUT_S)  # reaps it and closes its pipes
    assert lines[0].startswith(f"… A → {target}: stored for 5 (id ")
    delivered = [line for line in lines if line.startswith("✓ delivered to ")]
    assert sorted(line.split()[3].rstrip(":") for line in delivered) == MEMBERS
    assert delivered[-1] == "✓ delivered to D: delivered 5/5"
    # n receipts at A, and each member stored its copy exactly once.
    out = [r for r in history(six, "A") if r["direction"] == "out"]
    assert sorted(str(r["to"]) for r in out) == MEMBERS
    assert {r["state"] for r in out} == {"delivered"}
    for member in MEMBERS:
        got = [r for r in history(six, member) if r["direction"] == "in"]
        assert [(r["from"], r["body"]) for r in got] == [("A", "to the five")]


def test_broadcast_status_of_an_unknown_id_and_a_group_with_nobody_else_are_clear_errors(
    six: LocalCluster,
) -> None:
    lonely = meshpost("send", "--node", "A", "--data", str(six.data_dir("A")), "--to", "Z",
                      "hi")
    assert lonely.returncode == 2 and "unknown peer 'Z'" in lonely.stderr


def test_broadcast_status_after_the_sender_restarts_comes_from_its_store(
    short_tmp: Path,
) -> None:
    """Issue 18: k/n of a message to many survives a crash of its sender: after kill -9 and
    a restart, `broadcast status ID` reads it from the copies and receipts, and follows the
    member that comes back."""
    cluster = LocalCluster.create(short_tmp, 3, transport="ipc", names=["A", "B", "C"],
                                  options={"ping_interval_s": 0.2, "peer_timeout_s": 1.0,
                                           "retransmit_max_s": 0.5})
    try:
        cluster.start(["A", "B"])  # C is down
        a_data = str(cluster.data_dir("A"))
        sent = meshpost("send", "--node", "A", "--data", a_data, "--to", "all", "--timeout",
                        "5", "before the crash")
        assert sent.returncode == 3, sent.stdout + sent.stderr
        assert "✓ delivered to B: delivered 1/2 (pending: C)" in sent.stdout
        logical_id = sent.stdout.split("(id ")[1].split(")")[0]
        cluster.nodes["A"].kill()  # kill -9: the control server's handle is gone with it
        cluster.restart("A")
        now = meshpost("broadcast", "status", logical_id, "--node", "A", "--data", a_data)
        assert now.returncode == 3, now.stdout + now.stderr
        assert now.stdout.startswith(f"… A → all (id {logical_id}): delivered 1/2 (pending: C)")
        cluster.start(["C"])
        after = meshpost("broadcast", "status", logical_id, "--node", "A", "--data", a_data,
                         "--timeout", "60")
        assert after.returncode == 0, after.stdout + after.stderr
        assert after.stdout.splitlines()[-1] == "✓ delivered to C: delivered 2/2"
        unknown = meshpost("broadcast", "status", "nope", "--node", "A", "--data", a_data)
        assert unknown.returncode == 2 and "sent no broadcast 'nope'" in unknown.stderr
        # The messages to all, ours as one logical message with its k/n.
        shown = subprocess.run(
            [sys.executable, "-m", "meshpost", "history", "--node", "A", "--data", a_data,
             "--group", "all"], capture_output=True, text=True, timeout=CLI_TIMEOUT_S,
            stdin=subprocess.DEVNULL, env={**os.environ, "COLUMNS": "200"})
        assert shown.returncode == 0, shown.stderr
        assert shown.stdout.count("before the crash") == 1
        assert "me → all" in shown.stdout and "2/2" in shown.stdout
    finally:
        cluster.stop()
    # One copy each, stored once; the same logical id on both ends.
    c_rows = [r for r in history(cluster, "C") if r["direction"] == "in"]
    assert [(r["from"], r["body"], r["ref"]) for r in c_rows] == [
        ("A", "before the crash", logical_id)]

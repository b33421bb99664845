"""Live groups against real node processes: `group join|leave` at run time spreads to peers as
`member` records, `--to GROUP` reaches exactly the members at posting time (a later joiner gets
no older message), direct traffic flowing meanwhile is untouched, and membership survives
restarts."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshpost.cluster import LocalCluster

from .conftest import wait_until

pytestmark = pytest.mark.integration

CLI_TIMEOUT_S = 90


def meshpost(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meshpost", *args], capture_output=True,
                          text=True, timeout=CLI_TIMEOUT_S, input=stdin,
                          stdin=None if stdin is not None else subprocess.DEVNULL)


@pytest.fixture
def four(short_tmp: Path) -> Iterator[LocalCluster]:
    cluster = LocalCluster.create(short_tmp, 4, transport="ipc", names=["A", "B", "C", "D"],
                                  groups={"team": ["A", "B"]},
                                  options={"ping_interval_s": 0.2, "peer_timeout_s": 1.0,
                                           "retransmit_max_s": 0.5})
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


def test_join_and_leave_while_messages_flow_and_membership_after_restart(
    four: LocalCluster,
) -> None:
    def data(node: str) -> str:
        return str(four.data_dir(node))

    def members(node: str) -> str:
        out = meshpost("group", "members", "team", "--node", node, "--data", data(node))
        assert out.returncode == 0, out.stderr
        return out.stdout.splitlines()[-1]

    def to_team(text: str) -> list[str]:
        out = meshpost("send", "--node", "A", "--data", data("A"), "--to", "team", text)
        assert out.returncode == 0, out.stderr
        return sorted(line.split()[3].rstrip(":") for line in out.stdout.splitlines()
                      if line.startswith("✓ delivered to "))

    def bodies(node: str) -> list[str]:
        out = meshpost("history", "--node", node, "--data", data(node), "--json")
        return [r["body"] for r in json.loads(out.stdout)
                if r["direction"] == "in" and r["from"] == "A" and r["body"].startswith("m")]

    # Direct traffic D -> B flows the whole time (a stream of 300, receipted one by one).
    stream = subprocess.Popen(
        [sys.executable, "-m", "meshpost", "send", "--node", "D", "--data", data("D"), "--to",
         "B", "--lines", "-q"], stdin=subprocess.PIPE, text=True)
    assert stream.stdin is not None
    try:
        stream.stdin.write("\n".join(f"d{i}" for i in range(300)))
        stream.stdin.close()
        assert members("A") == "team: A, B"  # the configuration: version-0 joins
        assert to_team("m1") == ["B"]
        joined = meshpost("group", "join", "team", "--node", "C", "--data", data("C"))
        assert joined.returncode == 0 and "C joined team" in joined.stdout, joined.stderr
        for node in ("A", "B", "D"):
            wait_until(lambda node=node: members(node) == "team: A, B, C", 30,  # type: ignore[misc]
                       f"{node} to learn that C joined")
        assert to_team("m2") == ["B", "C"]
        left = meshpost("group", "leave", "team", "--node", "B", "--data", data("B"))
        assert left.returncode == 0 and "B left team" in left.stdout, left.stderr
        wait_until(lambda: members("A") == "team: A, C", 30, "A to learn that B left")
        assert to_team("m3") == ["C"]
        assert stream.wait(CLI_TIMEOUT_S) == 0
    finally:
        if stream.poll() is None:
            stream.kill()
            stream.wait(CLI_TIMEOUT_S)
    # C got nothing from before it joined; B nothing after it left.
    assert bodies("B") == ["m1", "m2"]
    assert bodies("C") == ["m2", "m3"]
    out = meshpost("history", "--node", "B", "--data", data("B"), "--json")
    assert [r["body"] for r in json.loads(out.stdout) if r["from"] == "D"] == [
        f"d{i}" for i in range(300)]
    # Durable: after restarts every node still sees B out and C in (B's leave outranks the
    # configuration that lists it).
    for node in ("A", "B", "C"):
        four.restart(node)
    for node in ("A", "B", "C", "D"):
        assert members(node) == "team: A, C", node
    assert to_team("m4") == ["C"]

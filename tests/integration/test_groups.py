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


def test_a_later_member_asks_each_member_for_its_own_earlier_messages(
    four: LocalCluster,
) -> None:
    """Issue 18 item 5 (docs/protocol.md 19.6.1): A and B talk in team, C joins later and asks
    (`history --group team --ask`): it gets A's and B's messages, each labelled with the member
    that answered, and each member's reply holds its own messages only."""
    def data(node: str) -> str:
        return str(four.data_dir(node))

    for node, text in (("A", "a-early"), ("B", "b-early"), ("A", "a-later")):
        sent = meshpost("send", "--node", node, "--data", data(node), "--to", "team", text)
        assert sent.returncode == 0, sent.stderr
    joined = meshpost("group", "join", "team", "--node", "C", "--data", data("C"))
    assert joined.returncode == 0, joined.stderr

    def members_know_c() -> bool:
        for node in ("A", "B"):
            out = meshpost("group", "members", "team", "--node", node, "--data", data(node))
            if out.stdout.splitlines()[-1:] != ["team: A, B, C"]:
                return False
        return True

    wait_until(members_know_c, 30, "A and B to learn that C joined")
    asked = meshpost("history", "--node", "C", "--data", data("C"), "--group", "team", "--ask",
                     "--wait", "20", "--json")
    assert asked.returncode == 0, asked.stderr
    fetched = json.loads(asked.stdout)
    assert sorted(fetched["answered"]) == ["A", "B"]
    assert fetched["unanswered"] == {}
    assert [(m["sender"], m["body"]) for m in fetched["messages"]] == [
        ("A", "a-early"), ("B", "b-early"), ("A", "a-later")]
    # The lines a person reads, and C's own store: the replies, no received group message.
    lines = meshpost("history", "--node", "C", "--data", data("C"), "--group", "team", "--ask")
    assert "B → team (earlier): b-early" in lines.stdout, lines.stdout
    stored = json.loads(meshpost("history", "--node", "C", "--data", data("C"),
                                 "--json").stdout)
    replies = [r for r in stored if r["kind"] == "reply"]
    assert {r["from"] for r in replies} == {"A", "B"}
    for reply in replies:
        assert all(body.startswith(reply["from"].lower() + "-")
                   for _id, _sent, _hlc, body in json.loads(reply["body"]))
    assert not [r for r in stored if r["kind"] == "group"]

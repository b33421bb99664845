"""docs/protocol.md section 14 is enough for an independent control client: `control_peer`,
written from the section alone (no meshpost import), talks to real `meshpost node` processes
(a pair A, B on ipc:// in a temp dir) and every reply is checked against the section's words.

The harness (config, starting nodes) uses meshpost's cluster helpers; the client never does."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zmq

from meshpost.cluster import write_mesh_config
from meshpost.processes import NodeProcess

from . import control_peer as cp
from .conftest import wait_until

pytestmark = pytest.mark.integration

#: Every wait for a node's answer: generous for a loaded 2-core machine, never a threshold.
ANSWER_S = 20.0
DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"


class Pair:
    """Two real nodes A and B, peers of each other on ipc://, and clients of their control."""

    def __init__(self, root: Path, options: dict[str, Any] | None = None) -> None:
        self.root = root
        endpoints = {n: f"ipc://{root}/{n.lower()}.sock" for n in "AB"}
        config = write_mesh_config(root / "mesh.toml", endpoints, options=options,
                                   groups={"team": ["A", "B"]})
        self.nodes = {n: NodeProcess(n, config, root / n, root / f"{n}.log") for n in "AB"}
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.clients: list[cp.ControlPeer] = []

    def start(self) -> None:
        for node in self.nodes.values():
            node.start()
        for node in self.nodes.values():
            node.wait_ready()

    def stop(self) -> None:
        for client in self.clients:
            client.close()
        for node in self.nodes.values():
            node.stop()
        self.ctx.destroy(linger=0)

    def client(self, name: str) -> cp.ControlPeer:
        client = cp.ControlPeer(self.ctx, self.nodes[name].data_dir)
        self.clients.append(client)
        return client

    def connected(self) -> None:
        """Both links ready (14.4 `peers`), so a send is receipted rather than queued."""
        a, b = self.client("A"), self.client("B")

        def up(c: cp.ControlPeer) -> bool:
            return all(p["connected"] for p in c.call("peers", ANSWER_S)["peers"])
        wait_until(lambda: up(a) and up(b), ANSWER_S, "A and B connected")


def _pair(options: dict[str, Any] | None = None) -> Iterator[Pair]:
    root = Path(tempfile.mkdtemp(prefix="mp-", dir="/tmp"))
    pair = Pair(root, options)
    try:
        pair.start()
        pair.connected()
        yield pair
    finally:
        pair.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    yield from _pair()


def error_of(reply: dict[str, Any], kind: str, exit_code: int) -> None:
    """14.4 `error`: `kind`, `message`, `exit_code` as in 14.6's table."""
    assert reply["type"] == "error", reply
    assert reply["kind"] == kind, reply
    assert reply["exit_code"] == exit_code, reply
    assert isinstance(reply["message"], str) and reply["message"], reply


def doc_table(section: str) -> dict[str, int]:
    """14.6's kind -> exit table."""
    text = DOC.read_text()
    part = text[text.index(section):]
    part = part[:part.index("\n## ")]
    return {k: int(e) for k, e in re.findall(r"^\| `([a-z_]+)` \| (\d) \|", part, flags=re.M)}


# -- 14.1 endpoint and discovery -----------------------------------------------------------

def test_the_endpoint_file_names_the_socket_and_the_live_pid(pair: Pair) -> None:
    for name, node in pair.nodes.items():
        text = (node.data_dir / cp.ENDPOINT_FILE).read_text()
        lines = text.splitlines()
        assert len(lines) == 2, text
        assert lines[0] == f"ipc://{node.data_dir.resolve()}/control.sock", (name, text)
        assert int(lines[1]) == node.pid


def test_a_data_dir_without_a_running_node_is_not_running(tmp_path: Path) -> None:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        with pytest.raises(cp.NotRunning):
            cp.ControlPeer(ctx, tmp_path)
        (tmp_path / cp.ENDPOINT_FILE).write_text(f"ipc://{tmp_path}/control.sock\n999999999\n")
        with pytest.raises(cp.NotRunning):
            cp.ControlPeer(ctx, tmp_path)
    finally:
        ctx.destroy(linger=0)


def test_a_long_data_dir_gets_a_hashed_socket_in_a_private_folder(short_tmp: Path) -> None:
    data = short_tmp / ("d" * 60) / ("e" * 60)
    config = write_mesh_config(short_tmp / "mesh.toml", {"L": f"ipc://{short_tmp}/l.sock"})
    node = NodeProcess("L", config, data, short_tmp / "L.log")
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        node.start()
        node.wait_ready()
        endpoint, pid = cp.read_endpoint(data)
        digest = hashlib.sha256(str((data / "control.sock").resolve()).encode()).hexdigest()
        folder = Path(tempfile.gettempdir()) / f"meshpost-{os.getuid()}"
        assert endpoint == f"ipc://{folder}/{digest[:16]}.sock" and pid == node.pid
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        client = cp.ControlPeer(ctx, data)
        assert client.call("status", ANSWER_S)["status"]["name"] == "L"
        client.close()
    finally:
        node.stop()
        ctx.destroy(linger=0)


# -- 14.2/14.3 framing: the document's example, byte for byte ------------------------------

def test_the_documented_send_example_is_plain_msgpack_and_is_answered(pair: Pair) -> None:
    text = DOC.read_text()
    section = text[text.index("## 14. "):text.index("## 15. ")]
    dump = re.search(r"is\n`((?:[0-9a-f]{2} ?)+)`", section)
    assert dump is not None
    example = bytes.fromhex(dump.group(1))
    record = {"type": "send", "target": "B", "body": "hi", "timeout_s": 10.0, "id": 1}
    assert msgspec.msgpack.encode(record) == example
    a = pair.client("A")
    a.send_raw(example)
    a.in_flight.add(1)
    reply = a.wait(1, ANSWER_S)
    assert reply["type"] == "sent" and reply["id"] == 1, reply
    [result] = reply["sent"]
    assert set(result) == {"to", "id", "seq", "sent_at_ns", "delivered", "delivered_at_ns",
                           "received_at_ns", "sync", "error"}, result
    assert result["to"] == "B" and result["delivered"] is True and result["error"] is None
    assert result["delivered_at_ns"] >= result["received_at_ns"] > 0


# -- 14.4 status and peers -----------------------------------------------------------------

PEER_STATUS = {"name", "endpoint", "connected", "state", "last_seen_ns", "rtt_ns",
               "offset_ns", "unacknowledged", "refusal", "found"}


def test_status_carries_the_documented_fields(pair: Pair) -> None:
    reply = pair.client("A").call("status", ANSWER_S)
    assert reply["type"] == "status", reply
    status = reply["status"]
    assert set(status) == {"name", "node_id", "endpoints", "pid", "cpu_s", "loop", "pending",
                           "stats", "groups", "max_message_bytes", "data_dir", "control"}, status
    assert status["name"] == "A" and status["pid"] == pair.nodes["A"].pid
    assert status["loop"] in ("uvloop", "asyncio")
    assert status["groups"] == {"team": ["A", "B"]}
    assert set(status["control"]) == {"subscribers", "subscription_bytes", "expired"}
    assert isinstance(status["stats"], dict) and isinstance(status["pending"], int)
    [peer] = reply["peers"]
    assert set(peer) == PEER_STATUS and peer["name"] == "B" and peer["found"] == "config"
    assert peer["state"] in ("idle", "connecting", "ready", "lost", "left", "refused")


def test_peers_lists_one_peer_status_per_configured_peer(pair: Pair) -> None:
    reply = pair.client("B").call("peers", ANSWER_S)
    assert reply["type"] == "peers"
    assert [p["name"] for p in reply["peers"]] == ["A"]
    assert set(reply["peers"][0]) == PEER_STATUS


def test_probe_answers_one_peer_probe_per_peer(pair: Pair) -> None:
    reply = pair.client("A").call("probe", ANSWER_S, peers=[], wait_s=10.0)
    assert reply["type"] == "probe", reply
    [probe] = reply["probes"]
    assert set(probe) == {"name", "result", "rtt_ns", "state", "detail"}
    assert probe["name"] == "B" and probe["result"] == "live" and probe["rtt_ns"] > 0


# -- 14.2 request ids, pipelining ----------------------------------------------------------

def test_pipelined_sends_are_posted_in_the_order_sent_and_matched_by_id(pair: Pair) -> None:
    a = pair.client("A")
    ids = [a.post("send", target="B", body=f"pipe {i}", timeout_s=30.0) for i in range(20)]
    replies = {rid: a.wait(rid, ANSWER_S) for rid in ids}
    assert all(r["id"] == rid and r["type"] == "sent" for rid, r in replies.items())
    seqs = [replies[rid]["sent"][0]["seq"] for rid in ids]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), seqs
    assert all(replies[rid]["sent"][0]["delivered"] for rid in ids)
    assert a.stale == 0


def test_ids_are_per_client_two_clients_may_use_the_same_id(pair: Pair) -> None:
    one, two = pair.client("A"), pair.client("A")
    r1, r2 = one.post("peers"), two.post("status")
    assert r1 == r2 == 1
    assert one.wait(r1, ANSWER_S)["type"] == "peers"
    assert two.wait(r2, ANSWER_S)["type"] == "status"


# -- 14.5a tail: the receipt's message is in the receiver's store --------------------------

def test_tail_returns_what_was_sent_after_the_cursor(pair: Pair) -> None:
    a, b = pair.client("A"), pair.client("B")
    now = b.call("tail", ANSWER_S, after=None, sender=None, limit=512, wait_s=0.0)
    assert now["type"] == "tail" and now["messages"] == [], now
    sent = a.call("send", ANSWER_S, target="B", body="tail me", timeout_s=30.0)
    assert sent["sent"][0]["delivered"], sent
    got = b.call("tail", ANSWER_S, after=now["cursor"], sender="A", limit=512, wait_s=10.0)
    [row] = got["messages"]
    assert set(row) == {"id", "direction", "peer", "sender", "recipient", "seq", "body",
                        "sent_at_ns", "hlc", "state", "stored_at_ns", "receipt_stored_at_ns",
                        "receipt_received_at_ns", "receipt_arrived_at_ns", "receipt_sync",
                        "receipt_hlc", "reject_reason", "kind", "ref"}, sorted(row)
    assert row["body"] == "tail me" and row["sender"] == "A" and row["id"] == sent["sent"][0]["id"]
    assert got["cursor"] > now["cursor"]


# -- 14.5 events ---------------------------------------------------------------------------

def test_events_long_poll_reports_an_incoming_message(pair: Pair) -> None:
    a, b = pair.client("A"), pair.client("B")
    first = b.call("events", ANSWER_S, wait_s=0.0)
    assert first["type"] == "events", first
    assert set(first) >= {"incoming", "peer_changes", "deliveries", "refused", "broadcasts",
                          "dropped"}
    a.call("send", ANSWER_S, target="B", body="evented", timeout_s=30.0)
    seen: list[dict[str, Any]] = []

    def got_it() -> bool:
        seen.extend(b.call("events", ANSWER_S, wait_s=5.0)["incoming"])
        return any(i["body"] == "evented" for i in seen)
    wait_until(got_it, ANSWER_S, "the incoming event")
    info = next(i for i in seen if i["body"] == "evented")
    assert set(info) == {"id", "sender", "body", "sent_at_ns", "hlc", "stored_at_ns"}
    assert info["sender"] == "A"


@pytest.fixture
def quick_idle_pair() -> Iterator[Pair]:
    """A pair whose subscriptions expire after half a second without a poll."""
    yield from _pair({"subscriber_idle_s": 0.5})


def test_an_idle_subscription_expires_and_status_counts_it(quick_idle_pair: Pair) -> None:
    b, watcher = quick_idle_pair.client("B"), quick_idle_pair.client("B")
    assert b.call("events", ANSWER_S, wait_s=0.0)["type"] == "events"
    # `expired` >= 1 proves the subscription existed; no check in between (0.5 s is a race).

    def expired() -> bool:
        control = watcher.call("status", ANSWER_S)["status"]["control"]
        return bool(control["subscribers"] == 0 and control["expired"] >= 1)
    wait_until(expired, ANSWER_S, "the idle subscription to expire")


def test_a_send_without_a_receipt_in_time_is_not_delivered_and_not_an_error(
        quick_idle_pair: Pair) -> None:
    """14.4: no receipt within `timeout_s` is `delivered: false` without `error`; and a
    stopped node's data dir is `not_running` (14.1)."""
    quick_idle_pair.nodes["B"].stop()
    with pytest.raises(cp.NotRunning):
        quick_idle_pair.client("B")
    reply = quick_idle_pair.client("A").call("send", ANSWER_S, target="B", body="later",
                                             timeout_s=0.2)
    [result] = reply["sent"]
    assert result["delivered"] is False and result["error"] is None, result
    assert result["delivered_at_ns"] is None and result["received_at_ns"] is None
    assert quick_idle_pair.client("A").call("status", ANSWER_S)["status"]["pending"] == 1


# -- 14.3/14.6 bad requests ----------------------------------------------------------------

def test_the_error_table_matches_what_the_node_answers(pair: Pair) -> None:
    kinds = doc_table("### 14.6")
    a = pair.client("A")
    error_of(a.call("send", ANSWER_S, target="Z", body="x", timeout_s=1.0),
             "unknown_peer", kinds["unknown_peer"])
    error_of(a.call("send", ANSWER_S, target="B", body="", timeout_s=1.0),
             "empty_message", kinds["empty_message"])
    error_of(a.call("broadcast-status", ANSWER_S, logical_id="nope", seen=0, wait_s=0.0),
             "unknown_broadcast", kinds["unknown_broadcast"])
    error_of(a.call("probe", ANSWER_S, peers=[], wait_s=31.0), "bad_request", kinds["bad_request"])


def test_reload_keys_at_a_node_without_secure_is_a_config_error(pair: Pair) -> None:
    """14.5e: only a --secure node has authorized_keys to reload (the `keys-reloaded` reply's
    fields are checked against a secure node in test_key_reload.py)."""
    reply = pair.client("A").call("reload-keys", ANSWER_S)
    error_of(reply, "config", doc_table("### 14.6")["config"])
    assert "runs without --secure" in reply["message"], reply


@pytest.mark.parametrize("fields", [
    {"type": "tail", "after": None, "sender": None, "limit": 1, "wait_s": float("nan")},
    {"type": "events", "wait_s": -1.0},
    {"type": "send", "target": "B", "body": "x", "timeout_s": float("inf")},
    {"type": "request", "to": "B", "body": "x", "timeout_s": 86_401.0},
    {"type": "tail", "after": 2**63, "sender": None, "limit": 1, "wait_s": 0.0},
    {"type": "no-such-request"},
    {"type": "send", "target": "B"},
    {"type": "group", "action": "rename", "group": "team"},
])
def test_a_bad_request_is_answered_bad_request_at_once(pair: Pair, fields: dict[str, Any]) -> None:
    a = pair.client("A")
    reply = a.call(fields.pop("type"), ANSWER_S, **fields)
    error_of(reply, "bad_request", 2)


def test_unknown_fields_are_ignored_and_a_missing_id_is_zero(pair: Pair) -> None:
    a = pair.client("A")
    assert a.call("status", ANSWER_S, extra=1)["type"] == "status"
    a.post_map({"type": "peers"})
    reply = a.recv_any(ANSWER_S)
    assert reply["type"] == "peers" and reply["id"] == 0, reply


@pytest.mark.parametrize("raw", [b"\xc1", msgspec.msgpack.encode([1, 2]), b"",
                                 msgspec.msgpack.encode({"type": "status", "id": "x"})])
def test_undecodable_input_is_answered_bad_request_with_id_zero(pair: Pair, raw: bytes) -> None:
    a = pair.client("A")
    a.send_raw(raw)
    error_of(a.recv_any(ANSWER_S), "bad_request", 2)
    assert a.call("status", ANSWER_S)["type"] == "status"


def test_a_multipart_request_is_answered_bad_request_and_the_node_keeps_serving(
    pair: Pair,
) -> None:
    a = pair.client("A")
    a.send_raw([b"a", b"b"])
    reply = a.recv_any(ANSWER_S)
    error_of(reply, "bad_request", 2)
    assert "one ZeroMQ message part, not 2" in reply["message"]
    assert a.call("status", ANSWER_S)["type"] == "status"
    assert a.stale == 0 and pair.nodes["A"].alive()


# -- 14.5c groups --------------------------------------------------------------------------

def test_group_members_of_a_configured_group(pair: Pair) -> None:
    reply = pair.client("A").call("group", ANSWER_S, action="members", group="team")
    assert reply["type"] == "group", reply
    assert reply["group"] == "team" and sorted(reply["members"]) == ["A", "B"]
    assert reply["changed"] is False

"""Many nodes per process (issue 20 item 4): each hosted node keeps its own store, identity,
endpoint and control socket; one that cannot start is reported and the others serve; a host
killed with -9 comes back with nothing lost or stored twice (the fault battery's checker)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from meshpost.cluster import (
    LocalCluster,
    cluster_status,
    listen_ports,
    read_state,
    restart_from_state,
)
from meshpost.config import MeshConfig, NodeConfig
from meshpost.control import (
    ControlClient,
    SendRequest,
    StatusRequest,
    SubmitRequest,
    checked,
)
from meshpost.errors import ControlUnavailable
from meshpost.host import HostClient, HostedState, NodeHost, load_keys, node_configs
from meshpost.keys import generate_mesh_keys
from meshpost.store import Store, StoreReader

from .conftest import wait_until
from .faults.checker import Ledger, evaluate

pytestmark = pytest.mark.integration

#: Quick liveness so that a killed host is noticed and its peers' messages retried at once.
FAST = {"ping_interval_s": 0.2, "peer_timeout_s": 1.5, "retransmit_initial_s": 0.2,
        "retransmit_max_s": 1.0, "sync": "normal"}
CLI_TIMEOUT_S = 60


def meshpost(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meshpost", *args], capture_output=True,
                          text=True, timeout=CLI_TIMEOUT_S, stdin=subprocess.DEVNULL,
                          env={**os.environ, "COLUMNS": "200"})


class Observer:
    """Sends through nodes' control sockets and writes what it saw in the checker's ledger."""

    def __init__(self, cluster: LocalCluster) -> None:
        self.cluster = cluster
        self.ledger = Ledger()
        self.count = 0

    def send(self, sender: str, to: str, *, receipt_timeout_s: float = 30.0) -> bool:
        self.count += 1
        (attempt,) = self.ledger.attempt(sender, [to], f"{sender}>{to} #{self.count}")
        with ControlClient(self.cluster.data_dir(sender), name=sender) as client:
            reply = checked(client.request(SendRequest(to, attempt.body, receipt_timeout_s),
                                           timeout_s=receipt_timeout_s + 15))
        (result,) = reply.sent
        attempt.accept(result.id, result.seq, result.sent_at_ns)
        attempt.receipted = result.delivered
        return result.delivered

    def pending(self) -> int:
        total = 0
        for name in self.cluster.names:
            with StoreReader.for_data_dir(self.cluster.data_dir(name)) as reader:
                total += reader.counts().get("out/pending", 0)
        return total


@pytest.mark.timeout(300)  # a loaded machine: each step has its own bound besides
def test_hosted_nodes_exchange_within_and_across_hosts_and_a_killed_host_loses_nothing(
    short_tmp: Path,
) -> None:
    cluster = LocalCluster.create(short_tmp, 20, transport="ipc", options=FAST,
                                  per_process=10)
    h1, h2 = cluster.host_names()  # A..J and K..T
    observer = Observer(cluster)
    try:
        cluster.start()
        pids = {h.pid for h in cluster.hosts.values()}
        assert len(pids) == 2, "20 nodes in 2 processes"
        # Each node is itself: its own id, its own store, the host's pid on its control socket.
        ids = set()
        for name in ("A", "J", "K", "T"):
            with ControlClient(cluster.data_dir(name), name=name) as client:
                status = checked(client.request(StatusRequest(), timeout_s=10)).status
            assert status["name"] == name and status["pid"] in pids
            assert Path(status["data_dir"]) == cluster.data_dir(name)
            ids.add(status["node_id"])
        assert len(ids) == 4

        pairs = [("A", "B"), ("B", "J"), ("K", "T"), ("A", "T"), ("T", "A"), ("J", "K")]
        for sender, to in pairs * 3:  # in one host, and across hosts, both ways
            assert observer.send(sender, to), f"{sender}->{to} receipted"

        # A CLI command against a hosted node works as against a lone one.
        sent = meshpost("send", "--node", "C", "--data", str(cluster.data_dir("C")),
                        "--to", "S", "from the CLI")
        assert sent.returncode == 0, sent.stderr
        history = meshpost("history", "--node", "S", "--data", str(cluster.data_dir("S")))
        assert history.returncode == 0 and "from the CLI" in history.stdout
        peers = meshpost("peers", "--node", "S", "--data", str(cluster.data_dir("S")))
        assert peers.returncode == 0 and "S — peers" in peers.stdout
        # `meshpost stop` ends a process of one node only: a hosted one's host keeps running.
        stop = meshpost("stop", "--node", "S", "--data", str(cluster.data_dir("S")))
        assert stop.returncode == 2 and "meshpost host" in stop.stderr, stop.stderr
        assert all(h.alive() for h in cluster.hosts.values())
        observer.ledger.attempt("C", ["S"], "from the CLI")[0].accept()

        # kill -9 the host of A..J while K..T send to it: their messages wait in K..T's stores.
        cluster.hosts[h1].kill()
        for sender, to in [("K", "A"), ("T", "J"), ("L", "B")] * 2:
            assert not observer.send(sender, to, receipt_timeout_s=0.5)
        assert observer.pending() >= 6
        host = cluster.restart("A")  # its host is dead: the whole host starts again
        assert host.name == h1 and host.pid not in pids
        wait_until(lambda: observer.pending() == 0, 90, "every pending message receipted")
        assert observer.send("A", "K") and observer.send("K", "A")
    finally:
        cluster.stop()
    counts = evaluate("hosted", observer.ledger, {n: cluster.data_dir(n) for n in cluster.names})
    assert counts.clean, counts.line() + "\n" + "\n".join(counts.problems)
    assert counts.stored == counts.attempted == len(observer.ledger)
    assert not [h for h in [h1, h2] if cluster.hosts[h].alive()]


async def _host(configs: list[NodeConfig], folder: Path | None = None) -> NodeHost:
    host = NodeHost(configs, folder=folder)
    await host.start()
    return host


def test_a_node_that_cannot_start_is_reported_and_counted_and_the_others_serve(
    short_tmp: Path,
) -> None:
    cluster = LocalCluster.create(short_tmp, 4, options=FAST)
    mesh = MeshConfig.load(cluster.config_path)
    port = int(cluster.endpoints["B"].rsplit(":", 1)[1])
    taken = socket.socket()
    taken.bind(("127.0.0.1", port))  # B's port is in use
    taken.listen()
    locked = Store.open(cluster.data_dir("C"), name="C")  # C's store is held by another

    async def scenario() -> None:
        host = await _host(node_configs(mesh, cluster.names), short_tmp / "host")
        try:
            assert host.serving == ["A", "D"]
            assert host.failures == 2
            assert host.nodes["B"].state is HostedState.FAILED
            assert "in use" in (host.nodes["B"].error or "")
            assert "locked" in (host.nodes["C"].error or "").lower()
            a, d = host.nodes["A"].node, host.nodes["D"].node
            assert a is not None and d is not None
            receipt = await a.send("D", "the others serve", timeout_s=15)
            assert receipt.to == "D"
            # The host endpoint tells the same, and restarts C in place once it is free.
            locked.close()
            reply = await asyncio.to_thread(_restart_through_endpoint, short_tmp / "host", "C")
            states = {n.name: n.state for n in reply.nodes}
            assert states == {"A": "serving", "B": "failed", "C": "serving", "D": "serving"}
            assert reply.error is None and reply.failures == 2
            c = host.nodes["C"].node
            assert c is not None
            assert (await c.send("A", "back", timeout_s=15)).to == "A"
        finally:
            await host.close()

    try:
        asyncio.run(scenario())
    finally:
        taken.close()
        locked.close()


def _restart_through_endpoint(folder: Path, name: str):  # type: ignore[no-untyped-def]
    with HostClient(folder) as client:
        return client.request("restart", name, timeout_s=30)


def test_cluster_up_per_process_status_restart_in_place_and_down(short_tmp: Path) -> None:
    root = str(short_tmp)
    up = meshpost("cluster", "up", "4", "--per-process", "2", "--peers-per-node", "1",
                  "--transport", "ipc", "--data", root)
    try:
        assert up.returncode == 0, up.stderr
        assert "started 4 nodes in 2 processes" in up.stdout
        state = read_state(short_tmp)
        assert state["nodes"]["A"]["pid"] == state["nodes"]["B"]["pid"] != \
            state["nodes"]["C"]["pid"]
        assert [n.state for n in cluster_status(short_tmp)] == ["ready"] * 4
        with ControlClient(short_tmp / "B", name="B") as client:
            before = checked(client.request(StatusRequest(), timeout_s=10)).status
        restarted = restart_from_state(short_tmp, "B")  # inside its running host
        assert restarted.pid == before["pid"]
        with ControlClient(short_tmp / "B", name="B") as client:
            after = checked(client.request(StatusRequest(), timeout_s=10)).status
        assert after["node_id"] == before["node_id"] and after["pid"] == before["pid"]
        status = meshpost("cluster", "status", "--data", root)
        assert status.returncode == 0 and status.stdout.count("ready") == 4
    finally:
        down = meshpost("cluster", "down", "--data", root)
    assert down.returncode == 0, down.stderr
    assert down.stdout.count("stopped") == 4
    for name in "ABCD":
        with pytest.raises(ControlUnavailable):
            ControlClient(short_tmp / name, name=name).request(StatusRequest(), timeout_s=2)
    assert not any(_alive(int(p)) for p in {state["nodes"][n]["pid"] for n in "ABCD"})


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def test_a_host_signal_stops_every_node_it_runs(short_tmp: Path) -> None:
    cluster = LocalCluster.create(short_tmp, 3, transport="ipc", options=FAST, per_process=3)
    try:
        cluster.start()
        host = next(iter(cluster.hosts.values()))
        os.kill(host.pid, signal.SIGTERM)
        assert host.process is not None and host.process.wait(30) == 0
        assert "shutting down 3 nodes" in host.log_path.read_text()
    finally:
        cluster.stop()


def test_secure_nodes_share_a_host(short_tmp: Path) -> None:
    """ZAP's handler endpoint exists once per ZeroMQ context: two secure nodes in one host
    (each with its own allowlist) once failed with 'Address already in use' for the second."""
    cluster = LocalCluster.create(short_tmp, 3, transport="ipc", options=FAST)
    generate_mesh_keys({n: cluster.data_dir(n) for n in cluster.names})
    mesh = MeshConfig.load(cluster.config_path)
    configs = node_configs(mesh, cluster.names, secure=True)

    async def scenario() -> None:
        host = NodeHost(configs, curve_keys=load_keys(configs))
        await host.start()
        try:
            assert host.serving == ["A", "B", "C"], [h.error for h in host.nodes.values()]
            a = host.nodes["A"].node
            assert a is not None
            for to in ("B", "C"):
                assert (await a.send(to, "under CURVE", timeout_s=15)).to == to
        finally:
            await host.close()

    asyncio.run(scenario())


def _give_roles(config_path: Path, roles: dict[str, list[str]]) -> None:
    """Add role lines (`echo = true`, ...) to nodes' tables of a written mesh file."""
    lines = config_path.read_text(encoding="utf-8").splitlines()
    out: list[str] = []
    for line in lines:
        out.append(line)
        table = line.removeprefix("[nodes.").removesuffix("]") if line.startswith(
            "[nodes.") else None
        if table in roles:
            out += roles[table]
    config_path.write_text("\n".join(out) + "\n", encoding="utf-8")


@pytest.mark.timeout(300)
def test_hosted_nodes_take_the_echo_worker_and_gateway_roles_their_tables_give_them(
    short_tmp: Path,
) -> None:
    """A hosted node runs what `meshpost node` would from its `[nodes.NAME]` table: B (echo)
    answers a request from V in another host; W (worker of `work`) runs V's tasks, and S,
    in W's host, keeps one result each; S's text gateway stores a plain TCP client's line.
    Before, `meshpost host` ran no roles at all (and refused a table with them as unknown
    keys)."""
    cluster = LocalCluster.create(short_tmp, 4, transport="ipc", names=["V", "B", "W", "S"],
                                  options=FAST, per_process=2)
    assert list(cluster.host_names().values()) == [["V", "B"], ["W", "S"]]
    [port] = listen_ports(1)
    _give_roles(cluster.config_path, {"B": ["echo = true"],
                                      "W": ['worker = ["work=upper", "other=reverse"]'],
                                      "S": [f'text_listen = "tcp://127.0.0.1:{port}"']})
    v_dir = cluster.data_dir("V")
    try:
        cluster.start()
        # S's text gateway, in its host: a plain TCP client's line is stored and answered.
        with socket.create_connection(("127.0.0.1", port), timeout=30) as client:
            client.sendall(b"from a text client\n")
            assert client.makefile("rb").readline().startswith(b"received ")
        answered = meshpost("request", "--node", "V", "--data", str(v_dir), "--to", "B",
                            "--timeout", "30", "marco")
        assert (answered.returncode, answered.stdout) == (0, "marco\n"), answered.stderr

        def serving() -> set[tuple[str, str]]:
            with StoreReader.for_data_dir(v_dir) as reader:
                return {(r.sender, r.body) for r in reader.history() if r.kind == "serve"}

        wait_until(lambda: ("W", "serve") in serving(), 60, "V to hear that W serves")
        bodies = [f"task {i}" for i in range(8)]
        with ControlClient(v_dir, name="V") as client:
            reply = checked(client.request(
                SubmitRequest(queue="work", sink="S", bodies=bodies, lease_s=60.0),
                timeout_s=60))

        def kept() -> list[tuple[str, str, str, str]]:
            with StoreReader.for_data_dir(cluster.data_dir("S")) as reader:
                return reader.task_results()

        wait_until(lambda: len(kept()) == len(bodies), 60, "every result at S")
        results = kept()
        status = meshpost("queue", "status", "work", "--node", "V", "--data", str(v_dir),
                          "--json")
        assert status.returncode == 0, status.stderr
    finally:
        cluster.stop()
    assert sorted((t, w, b) for t, w, _m, b in results) == sorted(
        (t, "W", b.upper()) for t, b in zip(reply.task_ids, bodies, strict=True))
    [work] = json.loads(status.stdout)
    assert [w["name"] for w in work["workers"]] == ["W"]
    with StoreReader.for_data_dir(cluster.data_dir("S")) as reader:
        assert "from a text client" in [r.body for r in reader.history(direction="in")]

"""`meshpost.cluster` without processes: the partial mesh it generates, how hosts are cut, the
roles `cluster up`'s flags give its nodes (written into their `[nodes.NAME]` tables)."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshpost.cluster import (
    LISTEN_PORTS_FROM,
    LISTEN_PORTS_MIN_COUNT,
    LocalCluster,
    cluster_roles,
    ephemeral_port_range,
    listen_ports,
    node_names,
    random_peers,
)
from meshpost.config import MeshConfig
from meshpost.errors import ConfigError
from meshpost.host import node_roles
from meshpost.roles import NodeRoles


def test_random_peers_draws_k_others_for_each_node_the_same_for_a_seed() -> None:
    names = node_names(100)
    peers = random_peers(names, 5, seed=3)
    assert peers == random_peers(names, 5, seed=3)
    assert peers != random_peers(names, 5, seed=4)
    for name, drawn in peers.items():
        assert len(drawn) == len(set(drawn)) == 5
        assert name not in drawn


def test_random_peers_never_draws_more_than_the_others() -> None:
    assert all(len(p) == 2 for p in random_peers(["A", "B", "C"], 9).values())


def test_a_cluster_with_peers_per_node_writes_a_partial_mesh_whose_links_are_symmetric(
    tmp_path: Path,
) -> None:
    cluster = LocalCluster.create(tmp_path, 30, transport="ipc", peers_per_node=3,
                                  per_process=8)
    mesh = MeshConfig.load(cluster.config_path)
    linked = {n: set(mesh.linked(n)) for n in cluster.names}
    for name, peers in linked.items():
        assert len(peers) >= 3
        assert all(name in linked[p] for p in peers), "a receiver accepts its senders"
    assert list(cluster.host_names().values()) == [
        cluster.names[0:8], cluster.names[8:16], cluster.names[16:24], cluster.names[24:30]]
    assert cluster.host_of(cluster.names[9]).names == cluster.names[8:16]
    # Every node of it opens links on first use, however few peers it has: a node with
    # fewer than dial_at_start peers would dial and ping them for as long as it runs.
    assert all(mesh.node(n).dial_at_start == 0 for n in cluster.names)


def test_many_listen_ports_come_from_below_the_ephemeral_range() -> None:
    """Outgoing connections take ephemeral ports: a 1,000-node cluster whose listen ports came
    from there lost one node to 'address in use' while the others connected."""
    low, _high = ephemeral_port_range()
    ports = listen_ports(LISTEN_PORTS_MIN_COUNT)
    assert len(set(ports)) == LISTEN_PORTS_MIN_COUNT
    assert all(LISTEN_PORTS_FROM <= p < low for p in ports)


NAMES = ["A", "B", "C", "D"]


def test_echo_is_every_nodes_and_a_worker_is_the_nodes_its_suffix_names() -> None:
    tables = cluster_roles(NAMES, echo=True, worker=["upper=upper@B,C", "rev=reverse@C..D",
                                                      "all=lower"])
    assert tables == {
        "A": {"echo": True, "worker": ["all=lower"]},
        "B": {"echo": True, "worker": ["upper=upper", "all=lower"]},
        "C": {"echo": True, "worker": ["upper=upper", "rev=reverse", "all=lower"]},
        "D": {"echo": True, "worker": ["rev=reverse", "all=lower"]},
    }
    assert cluster_roles(NAMES) == {}


def test_prefetch_goes_to_the_workers_it_names_or_to_every_worker() -> None:
    tables = cluster_roles(NAMES, worker=["upper=upper@B,C"], prefetch=["128"])
    assert tables == {"B": {"worker": ["upper=upper"], "prefetch": 128},
                      "C": {"worker": ["upper=upper"], "prefetch": 128}}
    tables = cluster_roles(NAMES, worker=["upper=upper@B,C"], prefetch=["1@C"])
    assert tables["B"] == {"worker": ["upper=upper"]} and tables["C"]["prefetch"] == 1


@pytest.mark.parametrize(("prefetch", "why"), [
    (["lots"], "N must be a whole number"),
    (["0@B"], "prefetch"),
    (["2000@B"], "prefetch"),
    (["8@A"], "prefetch"),  # A serves no queue
])
def test_a_prefetch_cluster_up_cannot_give_is_refused(prefetch: list[str], why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        cluster_roles(NAMES, worker=["upper=upper@B,C"], prefetch=prefetch)


def test_the_roles_are_written_into_the_node_tables_that_node_and_host_read(
    tmp_path: Path,
) -> None:
    roles = cluster_roles(NAMES, echo=True, worker=["upper=upper@B,C"],
                          text_listen=["tcp://127.0.0.1:0@D"])
    cluster = LocalCluster.create(tmp_path, 4, transport="ipc", roles=roles)
    mesh = MeshConfig.load(cluster.config_path)
    assert mesh.roles("B") == {"echo": True, "worker": ["upper=upper"]}
    built = node_roles(mesh, NAMES)  # what `meshpost host` (and `node --config`) starts
    assert built["A"] == NodeRoles(echo=True)
    assert built["B"].workers == built["C"].workers == (("upper", "upper"),)
    assert built["D"].gateway.tcp == ("127.0.0.1", 0)


@pytest.mark.parametrize(("flags", "why"), [
    ({"text_listen": ["tcp://127.0.0.1:7001"]},
     r"gives 4 nodes the same port 7001.*tcp://127.0.0.1:7001@A\), or use port 0"),
    ({"udp_listen": ["udp://127.0.0.1:7005@B..C"]}, "gives 2 nodes the same port 7005"),
    ({"text_listen": ["tcp://127.0.0.1:7001@A", "tcp://127.0.0.1:7001@B"]},
     "nodes A and B both want a text gateway on tcp://127.0.0.1:7001: a cluster's nodes"),
    ({"text_listen": ["tcp://127.0.0.1:0@A", "tcp://127.0.0.1:0@A..B"]},
     "gives node A a second gateway"),
    ({"worker": ["upper=upper@Z"]}, "names 'Z', which the cluster does not have"),
    ({"worker": ["upper=upper@D..B"]}, "runs backwards in the cluster"),
    ({"worker": ["q=upper", "q=lower@B"]}, "gives node B queue 'q' twice"),
    ({"worker": ["upper@B"]}, "--worker wants QUEUE=HANDLER"),
    ({"worker": ["@B"]}, "gives nodes but nothing for them"),
    ({"worker": ["q=no_such_module_here:f"]}, "cannot load handler"),
])
def test_role_flags_a_cluster_cannot_take_are_refused_saying_why(
    flags: dict[str, list[str]], why: str,
) -> None:
    with pytest.raises(ConfigError, match=why):
        cluster_roles(NAMES, **flags)  # type: ignore[arg-type]


class _RecordedProcess:
    """Stands in for a node's Popen: records SIGTERMs and waits in one shared list."""

    def __init__(self, name: str, events: list[tuple[str, str]]) -> None:
        self.name, self.events, self.returncode = name, events, None

    def poll(self) -> int | None:
        return self.returncode

    def send_signal(self, sig: int) -> None:
        self.events.append(("signal", self.name))

    def wait(self, timeout: float | None = None) -> int:
        self.events.append(("wait", self.name))
        self.returncode = 0
        return 0


def test_stop_signals_every_node_before_waiting_for_any(tmp_path: Path) -> None:
    """One after another, each node's close added up at every teardown: all are told first,
    then each is waited for (each once: no second SIGTERM)."""
    cluster = LocalCluster.create(tmp_path, 3, transport="ipc")
    events: list[tuple[str, str]] = []
    for name in cluster.names:
        node = cluster.process(name)
        node.process = _RecordedProcess(name, events)  # type: ignore[assignment]
    assert cluster.stop() == dict.fromkeys(cluster.names, 0)
    assert events == [*(("signal", n) for n in cluster.names),
                      *(("wait", n) for n in cluster.names)]


def test_cluster_down_signals_every_node_before_waiting_for_any(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`cluster down` (stop_from_state) likewise: every recorded node is told, then waited
    for; each one's outcome is reported as before."""
    import json
    import signal

    import meshpost.cluster as cluster_module
    import meshpost.processes as processes_module

    pids = {"A": 900001, "B": 900002, "C": 900003}
    state = {"config": "", "extra_args": [], "nodes": {n: {"pid": p} for n, p in pids.items()}}
    (tmp_path / cluster_module.STATE_FILE).write_text(json.dumps(state), encoding="utf-8")
    events: list[tuple[str, int]] = []

    def kill(pid: int, sig: int) -> None:
        assert sig == signal.SIGTERM and pid in pids.values()
        events.append(("signal", pid))

    def exists(pid: int) -> bool:
        events.append(("wait", pid))
        return False

    monkeypatch.setattr(cluster_module, "is_node_process", lambda pid, name: pids[name] == pid)
    monkeypatch.setattr(processes_module.os, "kill", kill)
    monkeypatch.setattr(processes_module, "pid_exists", exists)
    assert cluster_module.stop_from_state(tmp_path) == dict.fromkeys(pids, "stopped")
    assert set(events[:3]) == {("signal", p) for p in pids.values()}
    assert all(kind == "wait" for kind, _ in events[3:]) and events[3:]
    assert not (tmp_path / cluster_module.STATE_FILE).exists()

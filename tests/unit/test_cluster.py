"""`meshpost.cluster` without processes: the partial mesh it generates, how hosts are cut."""

from __future__ import annotations

from pathlib import Path

from meshpost.cluster import (
    LISTEN_PORTS_FROM,
    LISTEN_PORTS_MIN_COUNT,
    LocalCluster,
    ephemeral_port_range,
    listen_ports,
    node_names,
    random_peers,
)
from meshpost.config import MeshConfig


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

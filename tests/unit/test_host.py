"""`meshpost.host` without processes: choosing the nodes of a host, its typed records."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
import zmq

from meshpost.config import MeshConfig, NodeConfig
from meshpost.errors import ConfigError
from meshpost.gateway import GatewayConfig
from meshpost.host import (
    SOCKETS_PER_NODE,
    HostedNodeInfo,
    HostReply,
    HostRequest,
    NodeHost,
    host_endpoint,
    node_configs,
    select_nodes,
)
from meshpost.roles import NodeRoles


def mesh(names: list[str]) -> MeshConfig:
    return MeshConfig.from_dict(
        {"nodes": {n: {"bind": f"tcp://127.0.0.1:{7000 + i}"} for i, n in enumerate(names)}},
        base_dir=Path("."))


NAMES = [f"n{i:03d}" for i in range(1, 11)]


def test_a_range_takes_the_files_order_from_one_end_to_the_other() -> None:
    assert select_nodes(mesh(NAMES), "n003..n006") == ["n003", "n004", "n005", "n006"]


def test_lists_and_ranges_mix_and_each_node_is_taken_once() -> None:
    assert select_nodes(mesh(NAMES), "n010,n001..n002,n002") == ["n010", "n001", "n002"]


@pytest.mark.parametrize(("spec", "why"), [
    ("n001..zed", "'zed', which the mesh config does not have"),
    ("nope", "'nope', which the mesh config does not have"),
    ("n005..n002", "runs backwards"),
    (",", "names no node"),
])
def test_a_spec_naming_no_node_of_the_file_is_a_config_error(spec: str, why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        select_nodes(mesh(NAMES), spec)


def test_the_host_endpoint_is_an_ipc_socket_in_its_folder(tmp_path: Path) -> None:
    assert host_endpoint(tmp_path) == f"ipc://{tmp_path.resolve()}/host.sock"


def test_host_records_round_trip_and_refuse_an_unknown_action() -> None:
    request = HostRequest("restart", "n001", 7)
    data = msgspec.msgpack.encode(request)
    assert msgspec.msgpack.decode(data, type=HostRequest) == request
    reply = HostReply(7, 123, [HostedNodeInfo("n001", "serving", None, 2)])
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(reply), type=HostReply) == reply
    bad = msgspec.msgpack.encode({"op": "host", "action": "format-disk", "id": 1})
    with pytest.raises(msgspec.ValidationError):
        msgspec.msgpack.decode(bad, type=HostRequest)


def test_a_host_raises_zeromqs_socket_limit_to_what_its_nodes_need(tmp_path: Path) -> None:
    """libzmq allows 1,023 sockets per context by default: 100 nodes of 10 peers each, one
    DEALER per peer, would run out while starting."""
    names = [f"n{i:03d}" for i in range(100)]
    peers = {n: [names[(i + d) % 100] for d in range(1, 11)] for i, n in enumerate(names)}
    mesh = MeshConfig.from_dict({"nodes": {
        n: {"bind": f"ipc://{tmp_path}/{n}", "data": n, "peers": peers[n]} for n in names}},
        base_dir=tmp_path)
    host = NodeHost(node_configs(mesh, names))
    try:
        needed = sum(SOCKETS_PER_NODE + 2 * len(c.config.peers) for c in host.nodes.values())
        assert needed > 1023
        assert host.context.get(zmq.MAX_SOCKETS) >= needed
        # Each node's inbound cap is its share of the descriptor limit, not the whole of it.
        caps = {c.config.max_inbound_connections for c in host.nodes.values()}
        assert len(caps) == 1 and caps.pop() < host_fd_limit()
    finally:
        host.context.term()


def host_fd_limit() -> int:
    import resource

    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def test_a_host_refuses_roles_its_nodes_cannot_share_before_starting_any(
    tmp_path: Path,
) -> None:
    configs = [NodeConfig(name=n, bind=(f"ipc://{tmp_path}/{n}.sock",), data_dir=tmp_path / n)
               for n in ("A", "B")]
    gateway = NodeRoles(gateway=GatewayConfig(tcp=("127.0.0.1", 7123)))
    with pytest.raises(ConfigError, match="each node in one host needs its own port"):
        NodeHost(configs, roles={"A": gateway, "B": gateway})
    with pytest.raises(ConfigError, match=r"nodes this host does not run: \['C'\]"):
        NodeHost(configs, roles={"C": NodeRoles(echo=True)})
    assert not (tmp_path / "A").exists()  # nothing was started

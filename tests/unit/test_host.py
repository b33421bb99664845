"""`meshpost.host` without processes: choosing the nodes of a host, its typed records."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from meshpost.config import MeshConfig
from meshpost.errors import ConfigError
from meshpost.host import HostedNodeInfo, HostReply, HostRequest, host_endpoint, select_nodes


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

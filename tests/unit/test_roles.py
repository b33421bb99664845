"""`meshpost.roles`: a node's roles (echo, workers, gateways, discovery) from `meshpost node`'s
flags or a mesh file's node table, by one function, with clear errors; what one host's nodes
cannot share."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from meshpost.config import NODE_ROLE_KEYS, MeshConfig
from meshpost.discovery import DiscoveryConfig
from meshpost.errors import ConfigError, InvalidEndpoint, InvalidName
from meshpost.gateway import GatewayConfig
from meshpost.host import node_roles
from meshpost.roles import (
    ROLE_OPTIONS,
    NodeRoles,
    check_hosted_together,
    merged_options,
    parse_worker_flag,
    resolve_handler,
    roles_from_options,
)

#: What argparse gives `meshpost node` when no role flag is used.
NO_FLAGS: dict[str, Any] = {"echo": False, "worker": [], "text_listen": None,
                            "udp_listen": None, "text_idle_gap": None, "discover": None,
                            "discover_host": None, "beacon_to": [], "mesh": None,
                            "beacon_interval": None, "name": "A", "log_level": "info"}


def test_no_role_given_is_no_role() -> None:
    assert roles_from_options(NO_FLAGS) == NodeRoles()
    assert roles_from_options({}) == NodeRoles()


def test_flags_and_a_file_table_give_the_same_roles() -> None:
    flags = {**NO_FLAGS, "echo": True, "worker": ["work=upper", "q2=reverse"],
             "text_listen": "tcp://127.0.0.1:0", "text_idle_gap": 0.5, "discover": 5999,
             "beacon_to": ["127.0.0.1:5999"], "mesh": "lab", "beacon_interval": 0.25}
    table = {"echo": True, "worker": ["work=upper", "q2=reverse"],
             "text_listen": "tcp://127.0.0.1:0", "text_idle_gap": 0.5, "discover": 5999,
             "beacon_to": ["127.0.0.1:5999"], "mesh": "lab", "beacon_interval": 0.25}
    roles = roles_from_options(flags)
    assert roles == roles_from_options(table, where="[nodes.A]")
    assert roles.echo and roles.workers == (("work", "upper"), ("q2", "reverse"))
    assert roles.gateway == GatewayConfig(tcp=("127.0.0.1", 0), idle_gap_s=0.5)
    assert roles.discovery == DiscoveryConfig(port=5999, host="0.0.0.0",
                                              targets=(("127.0.0.1", 5999),), mesh="lab",
                                              interval_s=0.25, silence_s=1.25)


@pytest.mark.parametrize(("table", "why"), [
    ({"echo": "yes"}, r"\[nodes.B\]: echo = 'yes' is not a boolean"),
    ({"worker": "work=upper"}, r"worker = 'work=upper' is not a list"),
    ({"worker": [1]}, r"worker must be a list of strings"),
    ({"discover": True}, r"discover = True is not a whole number"),
    ({"discover": 70000}, "from 0 to 65535"),
    ({"text_idle_gap": 0}, "positive number of seconds"),
    ({"worker": ["work"]}, "QUEUE=HANDLER"),
    ({"worker": ["work=nope"]}, "unknown handler 'nope'"),
    ({"mesh": "lab"}, "need --discover"),
    ({"prefetch": 8}, "--prefetch .* needs --worker"),
    ({"worker": ["work=upper"], "prefetch": 0}, "from 1 to 1024, not 0"),
    ({"worker": ["work=upper"], "prefetch": 1025}, "from 1 to 1024, not 1025"),
    ({"worker": ["work=upper"], "prefetch": True}, "prefetch = True is not a whole number"),
    ({"worker": ["work=upper"], "prefetch": "8"}, "prefetch = '8' is not a whole number"),
])
def test_a_bad_table_is_a_config_error_naming_the_option(table: dict[str, Any],
                                                         why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        roles_from_options(table, where="[nodes.B]")


def test_a_bad_listen_address_is_an_invalid_endpoint() -> None:
    with pytest.raises(InvalidEndpoint):
        roles_from_options({"text_listen": "udp://127.0.0.1:1"})


def test_flags_given_replace_the_files_value_of_that_option() -> None:
    table = {"echo": True, "worker": ["a=upper"], "text_listen": "tcp://127.0.0.1:7001",
             "bind": "tcp://127.0.0.1:7000"}
    merged = merged_options(table, {**NO_FLAGS, "worker": ["b=lower"]})
    assert merged == {"echo": True, "worker": ["b=lower"],
                      "text_listen": "tcp://127.0.0.1:7001"}


def test_nodes_of_one_host_need_their_own_gateway_ports() -> None:
    def gw(tcp: int | None = None, udp: int | None = None) -> NodeRoles:
        return NodeRoles(gateway=GatewayConfig(
            tcp=None if tcp is None else ("127.0.0.1", tcp),
            udp=None if udp is None else ("127.0.0.1", udp)))

    check_hosted_together({"A": gw(7001, 7001), "B": gw(7002), "C": gw(0), "D": gw(0),
                           "E": NodeRoles(discovery=DiscoveryConfig(port=5671)),
                           "F": NodeRoles(discovery=DiscoveryConfig(port=5671))})
    with pytest.raises(ConfigError, match=r"nodes A and C both want a text gateway on "
                                          r"tcp://127.0.0.1:7001: each node in one host"):
        check_hosted_together({"A": gw(7001), "B": gw(7002), "C": gw(7001)})
    with pytest.raises(ConfigError, match=r"udp://127\.0\.0\.1:7005"):
        check_hosted_together({"A": gw(udp=7005), "B": gw(udp=7005)})


def test_handlers_are_built_ins_or_module_functions() -> None:
    assert resolve_handler("upper")("ab") == "AB"
    assert resolve_handler("meshpost.pipeline:slow_upper").__name__ == "slow_upper"
    assert parse_worker_flag("work=reverse") == ("work", "reverse")
    for spec, why in (("nope", "unknown handler"), ("os:nothing_here", "cannot load"),
                      ("meshpost.roles:DEFAULT_DISCOVER_HOST", "not callable")):
        with pytest.raises(ConfigError, match=why):
            resolve_handler(spec)


def test_the_mesh_file_knows_every_role_option_and_only_those() -> None:
    assert set(ROLE_OPTIONS) == NODE_ROLE_KEYS


def test_a_nodes_table_in_the_mesh_file_gives_it_its_roles(tmp_path: Path) -> None:
    path = tmp_path / "mesh.toml"
    path.write_text('[nodes.A]\nbind = ["tcp://127.0.0.1:7000"]\n'
                    '[nodes.B]\nbind = ["tcp://127.0.0.1:7001"]\necho = true\n'
                    'worker = ["work=upper"]\ntext_listen = "tcp://127.0.0.1:0"\n',
                    encoding="utf-8")
    mesh = MeshConfig.load(path)
    assert mesh.roles("A") == {}
    assert node_roles(mesh, ["A", "B"]) == {"B": NodeRoles(
        echo=True, workers=(("work", "upper"),),
        gateway=GatewayConfig(tcp=("127.0.0.1", 0)))}
    # The node's own config is unchanged by its roles.
    assert mesh.node("B").bind == ("tcp://127.0.0.1:7001",)
    path.write_text('[nodes.A]\nbind = ["tcp://127.0.0.1:7000"]\nechoes = true\n',
                    encoding="utf-8")
    with pytest.raises(ConfigError, match=r"unknown keys \['echoes'\].*roles beacon_interval"):
        MeshConfig.load(path)
    path.write_text('[nodes.A]\nbind = ["tcp://127.0.0.1:7000"]\necho = 1\n',
                    encoding="utf-8")
    with pytest.raises(ConfigError, match=r"\[nodes.A\]: echo = 1 is not a boolean"):
        node_roles(MeshConfig.load(path), ["A"])



def test_meshpost_node_takes_its_tables_roles_with_its_flags_on_top(tmp_path: Path) -> None:
    from meshpost.cli import build_parser
    from meshpost.cli.node import build_roles

    path = tmp_path / "mesh.toml"
    path.write_text('[nodes.B]\nbind = ["tcp://127.0.0.1:7001"]\necho = true\n'
                    'worker = ["work=upper"]\n', encoding="utf-8")
    args = build_parser().parse_args(["node", "B", "--config", str(path)])
    assert build_roles(args) == NodeRoles(echo=True, workers=(("work", "upper"),))
    args = build_parser().parse_args(["node", "B", "--config", str(path),
                                      "--worker", "q=lower", "--discover", "6000"])
    assert build_roles(args) == NodeRoles(echo=True, workers=(("q", "lower"),),
                                          discovery=DiscoveryConfig(port=6000))
    args = build_parser().parse_args(["node", "B", "--bind", "tcp://127.0.0.1:7001"])
    assert build_roles(args) == NodeRoles()


def test_a_workers_prefetch_comes_from_its_flag_or_its_table(tmp_path: Path) -> None:
    """`--prefetch N` (or `prefetch = N` in the node's table): how many tasks each queue the
    node serves runs at once, announced to ventilators (docs/patterns.md); 16 unless given."""
    from meshpost.cli import build_parser
    from meshpost.cli.node import build_roles

    path = tmp_path / "mesh.toml"
    path.write_text('[nodes.B]\nbind = ["tcp://127.0.0.1:7001"]\nworker = ["work=upper"]\n'
                    'prefetch = 64\n', encoding="utf-8")
    args = build_parser().parse_args(["node", "B", "--config", str(path)])
    assert build_roles(args) == NodeRoles(workers=(("work", "upper"),), prefetch=64)
    args = build_parser().parse_args(["node", "B", "--config", str(path), "--prefetch", "1"])
    assert build_roles(args).prefetch == 1
    args = build_parser().parse_args(["node", "B", "--worker", "work=upper"])
    assert build_roles(args).prefetch == 16


@pytest.mark.parametrize(("table", "why"), [
    ({"worker": ["bad q=upper"]}, "^invalid queue name 'bad q': use 1-63"),
    ({"discover": 5999, "mesh": "bad mesh"}, r"^invalid mesh name 'bad mesh': use 1-63"),
])
def test_queue_and_mesh_names_are_called_what_they_are(table: dict[str, Any], why: str) -> None:
    """Audit: a mesh name was called an "invalid node name"; a bad queue name passed the
    mesh file and was refused only once the node served it."""
    with pytest.raises(InvalidName, match=why):
        roles_from_options(table, where="[nodes.B]")

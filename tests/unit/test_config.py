"""Configuration: names, endpoints, the mesh TOML file and command-line flags."""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import string
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshpost.config import (
    DEFAULT_MAX_MESSAGE_BYTES,
    MAX_MESSAGE_BYTES_CEILING,
    MIN_DURATION_S,
    WINDOW_CEILING,
    MeshConfig,
    NodeConfig,
    PeerConfig,
    default_data_dir,
    is_local_endpoint,
    parse_group_flag,
    parse_peer_flag,
    unique,
    validate_endpoint,
    validate_name,
)
from meshpost.errors import ConfigError, InvalidEndpoint, InvalidName

FAST = settings(max_examples=200, deadline=None)

MESH_TOML = """
[mesh]
sync = "normal"
window = 128

[nodes.alice]
bind = ["tcp://127.0.0.1:7001", "ipc:///tmp/alice.sock"]
connect = "tcp://127.0.0.1:7001"
data = "data/alice"

[nodes.bob]
bind = "tcp://127.0.0.1:7002"

[nodes.carol]
bind = ["tcp://*:7003"]
connect = "tcp://10.0.0.3:7003"

[groups]
friends = ["alice", "bob"]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "mesh.toml"
    path.write_text(text, encoding="utf-8")
    return path


def node(**overrides: Any) -> NodeConfig:
    fields: dict[str, Any] = {
        "name": "alice",
        "bind": ("tcp://127.0.0.1:7001",),
        "peers": (PeerConfig("bob", "tcp://127.0.0.1:7002"),),
        "data_dir": Path("/tmp/alice"),
    }
    fields.update(overrides)
    return NodeConfig(**fields)


# -- names ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["alice", "a", "Node-1", "n.2_x", "9lives", "x" * 63])
def test_good_names_are_accepted(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize(
    "name",
    ["", "-alice", ".hidden", "_x", "with space", "a/b", "x" * 64, "é", "alice\n", "all", "ALL",
     "me", "*"],
)
def test_bad_names_are_rejected(name: str) -> None:
    with pytest.raises(InvalidName) as info:
        validate_name(name)
    assert info.value.name == name
    assert isinstance(info.value, ConfigError)


def test_reserved_words_say_so() -> None:
    with pytest.raises(InvalidName, match="reserved"):
        validate_name("Me")


@FAST
@given(st.text(max_size=80))
def test_any_text_is_a_valid_name_or_invalid_name(name: str) -> None:
    try:
        assert validate_name(name) == name
    except InvalidName:
        return


# -- endpoints --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "endpoint",
    ["tcp://127.0.0.1:1", "tcp://localhost:65535", "tcp://[::1]:7000", "ipc:///tmp/x.sock",
     "ipc://relative", "ipc://" + "p" * 107, "tcp://node-7.lab.example.org.:7000",
     "tcp://eth0:7000", "tcp://[fe80::1]:7000"],
)
def test_good_endpoints_are_accepted_for_both_uses(endpoint: str) -> None:
    assert validate_endpoint(endpoint, for_bind=True) == endpoint
    assert validate_endpoint(endpoint, for_bind=False) == endpoint


@pytest.mark.parametrize("endpoint", ["tcp://*:7000", "tcp://0.0.0.0:7000", "tcp://[::]:7000",
                                      "tcp://127.0.0.1:*", "tcp://*:*"])
def test_wildcards_are_for_binding_only(endpoint: str) -> None:
    assert validate_endpoint(endpoint, for_bind=True) == endpoint
    with pytest.raises(InvalidEndpoint):
        validate_endpoint(endpoint, for_bind=False)


@pytest.mark.parametrize(
    ("endpoint", "why"),
    [
        ("udp://1.2.3.4:5", "supported transports"),
        ("127.0.0.1:7000", "supported transports"),
        ("", "supported transports"),
        ("tcp://", "expected tcp://HOST:PORT"),
        ("tcp://host", "expected tcp://HOST:PORT"),
        ("tcp://:7000", "expected tcp://HOST:PORT"),
        ("tcp://host:0", "from 1 to 65535"),
        ("tcp://host:65536", "from 1 to 65535"),
        ("tcp://host:-1", "from 1 to 65535"),
        ("tcp://host:http", "from 1 to 65535"),
        ("tcp://host:", "from 1 to 65535"),
        ("tcp://host:²", "from 1 to 65535"),  # a digit to str.isdigit, not to int()
        ("tcp://host:٣", "from 1 to 65535"),  # an Arabic-Indic three
        ("tcp://::1:7000", "IPv6 address goes in brackets"),
        ("tcp://host::1", "IPv6 address goes in brackets"),
        ("tcp://[::g]:7000", "not an IPv6 address"),
        ("tcp://[]:7000", "not an IPv6 address"),
        ("tcp://h\x80:1", "not an IPv4 address, a host name or an interface"),
        ("tcp://my host:7000", "not an IPv4 address, a host name or an interface"),
        ("tcp://host\n:7000", "not an IPv4 address, a host name or an interface"),
        ("tcp://a..b:7000", "not an IPv4 address, a host name or an interface"),
        ("ipc://", "needs a path"),
        ("ipc://" + "p" * 108, "longer than 107 bytes"),
        ("ipc://" + "é" * 54, "longer than 107 bytes"),
    ],
)
def test_bad_endpoints_are_rejected_with_a_reason(endpoint: str, why: str) -> None:
    for for_bind in (True, False):
        with pytest.raises(InvalidEndpoint, match=why) as info:
            validate_endpoint(endpoint, for_bind=for_bind)
        assert info.value.endpoint == endpoint


def accepted(endpoint: str, *, for_bind: bool) -> bool:
    """True if `validate_endpoint` takes `endpoint`; False if it refuses it, as it must,
    with InvalidEndpoint (any other exception fails the test)."""
    try:
        validate_endpoint(endpoint, for_bind=for_bind)
    except InvalidEndpoint:
        return False
    return True


@FAST
@given(st.text(max_size=12), st.booleans())
def test_any_tcp_port_text_is_valid_or_invalid_endpoint(port: str, for_bind: bool) -> None:
    if not accepted(f"tcp://host:{port}", for_bind=for_bind):
        return
    assert (port == "*" and for_bind) or (
        port.isascii() and port.isdigit() and 1 <= int(port) <= 65535
    )


@FAST
@given(st.text(max_size=12), st.booleans())
def test_any_tcp_host_text_is_valid_or_invalid_endpoint(host: str, for_bind: bool) -> None:
    if not accepted(f"tcp://{host}:7000", for_bind=for_bind):
        return
    # What passes is a wildcard (to bind), a bracketed IPv6 address, or ASCII name labels.
    if host == "*":
        assert for_bind
    elif host.startswith("["):
        ipaddress.IPv6Address(host[1:-1])
    else:
        assert host.isascii() and ":" not in host
        allowed = set(string.ascii_letters + string.digits + "-_")
        assert all(label and set(label) <= allowed for label in host.removesuffix(".").split("."))


# -- node config --------------------------------------------------------------------------------


def test_a_node_config_has_sensible_defaults() -> None:
    cfg = node()
    assert cfg.max_message_bytes == DEFAULT_MAX_MESSAGE_BYTES
    assert cfg.sync == "full"
    assert cfg.peer_names == ["bob"]
    assert cfg.peer("bob") == PeerConfig("bob", "tcp://127.0.0.1:7002")
    assert cfg.peer("carol") is None


@pytest.mark.parametrize(
    ("overrides", "why"),
    [
        ({"bind": ()}, "at least one --bind"),
        ({"bind": ("tcp://h:0",)}, "from 1 to 65535"),
        ({"peers": (PeerConfig("bob", "tcp://h:1"), PeerConfig("bob", "tcp://h:2"))},
         "lists a peer twice"),
        ({"peers": (PeerConfig("alice", "tcp://h:1"),)}, "lists itself"),
        ({"max_message_bytes": 0}, "max_message_bytes"),
        ({"max_message_bytes": MAX_MESSAGE_BYTES_CEILING + 1}, "max_message_bytes"),
        ({"sync": "sometimes"}, "sync must be"),
        ({"window": 0}, "window"),
        ({"groups": {"all": ("bob",)}}, "reserved"),
        ({"groups": {"team": ("bob", "zed")}}, "unknown nodes"),
        ({"window": "10"}, "window"),
        ({"window": True}, "window"),
        ({"max_message_bytes": 1.5}, "max_message_bytes"),
        ({"ping_interval_s": "1"}, "ping_interval_s"),
        ({"ping_interval_s": 0}, "ping_interval_s"),
        ({"peer_timeout_s": -1.0}, "peer_timeout_s"),
        ({"retransmit_initial_s": 0.0}, "retransmit_initial_s"),
        ({"retransmit_max_s": None}, "retransmit_max_s"),
        ({"secure": "yes"}, "secure"),
        ({"max_inbound_connections": 0}, "max_inbound_connections"),
        ({"max_inbound_connections": "100"}, "max_inbound_connections"),
        ({"max_inbound_connections": True}, "max_inbound_connections"),
    ],
)
def test_invalid_node_configs_are_rejected(overrides: dict[str, Any], why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        node(**overrides)


@pytest.mark.parametrize(
    ("overrides", "why"),
    [
        ({"window": 10**20}, "window must be between 1 and"),
        ({"window": WINDOW_CEILING + 1}, "window must be between 1 and"),
        ({"ping_interval_s": 1e-300}, "ping_interval_s must be at least"),
        ({"retransmit_initial_s": 1e-9}, "retransmit_initial_s must be at least"),
        ({"link_idle_s": 1e-300}, "link_idle_s must be"),
    ],
)
def test_a_window_the_store_cannot_read_or_a_duration_shorter_than_a_millisecond_is_refused(
    overrides: dict[str, Any], why: str,
) -> None:
    """Found by the careless-operator audit: `window = 100000000000000000000` in mesh.toml
    started a node whose link reader failed at once (OverflowError binding the limit), so
    every message to that peer was stored and never sent; `ping_interval_s = 1e-300` made a
    node spin at start and ignore SIGTERM (a deadline equal to `now`)."""
    with pytest.raises(ConfigError, match=why):
        node(**overrides)


def test_the_largest_window_and_the_shortest_durations_are_accepted() -> None:
    cfg = node(window=WINDOW_CEILING, ping_interval_s=MIN_DURATION_S, link_idle_s=0)
    assert (cfg.window, cfg.ping_interval_s, cfg.link_idle_s) == (WINDOW_CEILING, 0.001, 0)


def test_whole_numbers_are_fine_for_durations() -> None:
    cfg = node(ping_interval_s=2, peer_timeout_s=8, retransmit_initial_s=1, retransmit_max_s=4)
    assert cfg.peer_timeout_s == 8


def test_groups_may_name_the_node_itself() -> None:
    assert node(groups={"us": ("alice", "bob")}).groups == {"us": ("alice", "bob")}


def test_an_exclusive_node_has_its_one_peer_only() -> None:
    assert node(exclusive="bob").exclusive == "bob"
    with pytest.raises(ConfigError, match=r"exclusive to 'carol'.*--peer carol=ENDPOINT"):
        node(exclusive="carol")
    with pytest.raises(ConfigError, match="only peer"):
        node(exclusive="bob", peers=(PeerConfig("bob", "tcp://127.0.0.1:7002"),
                                     PeerConfig("carol", "tcp://127.0.0.1:7003")))


def test_a_mesh_file_node_made_exclusive_keeps_that_peer_and_its_groups_only(
    tmp_path: Path,
) -> None:
    text = MESH_TOML.replace('bind = ["tcp://*:7003"]\nconnect = "tcp://10.0.0.3:7003"',
                             'bind = ["tcp://127.0.0.1:7003"]')
    mesh = MeshConfig.load(write(tmp_path, text + 'all3 = ["alice", "bob", "carol"]\n'))
    cfg = mesh.node("bob", exclusive="alice")
    assert cfg.peer_names == ["alice"]
    assert cfg.groups == {"friends": ("alice", "bob"), "all3": ("alice", "bob")}


def test_peer_configs_validate_name_and_endpoint() -> None:
    with pytest.raises(InvalidName):
        PeerConfig("bad name", "tcp://h:1")
    with pytest.raises(InvalidEndpoint):
        PeerConfig("bob", "tcp://*:1")


# -- the mesh file ----------------------------------------------------------------------------


def test_a_mesh_file_loads_every_node_group_and_option(tmp_path: Path) -> None:
    mesh = MeshConfig.load(write(tmp_path, MESH_TOML))
    assert [n.name for n in mesh.nodes] == ["alice", "bob", "carol"]
    alice = mesh.nodes[0]
    assert alice.bind == ("tcp://127.0.0.1:7001", "ipc:///tmp/alice.sock")
    assert alice.data_dir == tmp_path / "data" / "alice"
    assert mesh.nodes[1].bind == ("tcp://127.0.0.1:7002",)
    assert mesh.nodes[1].connect == "tcp://127.0.0.1:7002"
    assert mesh.nodes[1].data_dir is None
    assert mesh.groups == {"friends": ("alice", "bob")}
    assert mesh.options == {"sync": "normal", "window": 128}


def test_node_picks_every_other_node_as_a_peer(tmp_path: Path) -> None:
    mesh = MeshConfig.load(write(tmp_path, MESH_TOML))
    bob = mesh.node("bob", data_dir=tmp_path / "override")
    assert bob.name == "bob"
    assert bob.bind == ("tcp://127.0.0.1:7002",)
    assert bob.peers == (
        PeerConfig("alice", "tcp://127.0.0.1:7001"),
        PeerConfig("carol", "tcp://10.0.0.3:7003"),
    )
    assert bob.data_dir == tmp_path / "override"
    assert (bob.sync, bob.window) == ("normal", 128)
    assert bob.groups == {"friends": ("alice", "bob")}
    assert mesh.node("alice").data_dir == tmp_path / "data" / "alice"


PARTIAL_TOML = """
[nodes.A]
bind = "tcp://127.0.0.1:7001"
peers = ["B"]

[nodes.B]
bind = "tcp://127.0.0.1:7002"
peers = []

[nodes.C]
bind = "tcp://127.0.0.1:7003"
peers = ["B"]

[nodes.D]
bind = "tcp://127.0.0.1:7004"

[groups]
abc = ["A", "B", "C"]
"""


def test_peers_lists_make_symmetric_links_and_a_node_without_one_links_to_all(
    tmp_path: Path,
) -> None:
    mesh = MeshConfig.load(write(tmp_path, PARTIAL_TOML))
    # B lists nobody but is listed by A and C (a receiver accepts whoever sends to it);
    # D has no list, so it links to every node and every node to it.
    assert {n: mesh.node(n).peer_names for n in "ABCD"} == {
        "A": ["B", "D"], "B": ["A", "C", "D"], "C": ["B", "D"], "D": ["A", "B", "C"]}
    # Groups keep the members a node links to.
    assert mesh.node("A").groups == {"abc": ("A", "B")}
    assert mesh.node("B").groups == {"abc": ("A", "B", "C")}


@pytest.mark.parametrize(("peers", "why"), [
    ('"B"', "must be a list of node names"),
    ('["Zed"]', "not in the file: ['Zed']"),
])
def test_a_bad_peers_list_is_a_config_error(tmp_path: Path, peers: str, why: str) -> None:
    text = f'[nodes.A]\nbind = "tcp://127.0.0.1:1"\npeers = {peers}\n' \
           '[nodes.B]\nbind = "tcp://127.0.0.1:2"\n'
    with pytest.raises(ConfigError, match=re.escape(why)):
        MeshConfig.load(write(tmp_path, text))


def test_node_overrides_beat_the_mesh_options(tmp_path: Path) -> None:
    mesh = MeshConfig.load(write(tmp_path, MESH_TOML))
    assert mesh.node("alice", sync="full", max_message_bytes=1000).sync == "full"


def test_a_node_without_a_data_entry_gets_the_default_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    mesh = MeshConfig.load(write(tmp_path, MESH_TOML))
    assert mesh.node("bob").data_dir == tmp_path / "xdg" / "meshpost" / "bob"
    assert default_data_dir("bob") == tmp_path / "xdg" / "meshpost" / "bob"


def test_a_node_missing_from_the_file_is_named_in_the_error(tmp_path: Path) -> None:
    mesh = MeshConfig.load(write(tmp_path, MESH_TOML))
    with pytest.raises(ConfigError, match=r"'dave' is not in the mesh config.*alice, bob, carol"):
        mesh.node("dave")


def test_unknown_options_are_rejected_and_the_known_ones_listed(tmp_path: Path) -> None:
    mesh = MeshConfig.load(write(tmp_path, MESH_TOML + "\n[mesh.extra]\n"))
    with pytest.raises(ConfigError, match=r"unknown mesh options \['extra'\].*'window'"):
        mesh.node("alice")
    mesh = MeshConfig.load(write(tmp_path, MESH_TOML))
    with pytest.raises(ConfigError, match="unknown mesh options"):
        mesh.node("alice", colour="blue")
    for structural in ("bind", "peers", "groups"):
        override: dict[str, Any] = {structural: "x"}
        with pytest.raises(ConfigError, match="unknown mesh options"):
            mesh.node("alice", **override)


def test_a_wrongly_typed_option_in_the_file_is_a_config_error(tmp_path: Path) -> None:
    text = MESH_TOML.replace("window = 128", 'window = "lots"')
    with pytest.raises(ConfigError, match="window"):
        MeshConfig.load(write(tmp_path, text)).node("alice")


def test_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        MeshConfig.load(tmp_path / "nope.toml")


def test_an_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        MeshConfig.load(tmp_path)  # a directory
    (tmp_path / "latin1.toml").write_bytes(b"[nodes.alice]\nbind = '\xe9'\n")
    with pytest.raises(ConfigError, match="cannot read"):
        MeshConfig.load(tmp_path / "latin1.toml")


def test_invalid_toml_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        MeshConfig.load(write(tmp_path, "[nodes.alice\nbind = 1"))


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", r"\[nodes.NAME\]"),
        ("nodes = 5", r"\[nodes.NAME\]"),
        ("[nodes]", r"\[nodes.NAME\]"),
        ("[nodes]\nalice = 5", "must be a table"),
        ("[nodes.alice]", "needs bind"),
        ("[nodes.alice]\nbind = []", "needs bind"),
        ("[nodes.alice]\nbind = [1]", "needs bind"),
        ("[nodes.alice]\nbind = 'tcp://h:1'\nconnect = 5", "connect must be a string"),
        ('[nodes."bad name"]\nbind = "tcp://h:1"', "invalid node name"),
        ('[nodes.all]\nbind = "tcp://h:1"', "reserved"),
        ('[nodes.alice]\nbind = "tcp://h:1"\n[groups]\nteam = "alice"', "list of node names"),
        ('[nodes.alice]\nbind = "tcp://h:1"\n[groups]\nteam = 5', "list of node names"),
        ('[nodes.alice]\nbind = "tcp://h:1"\n[groups]\nteam = [1, 2]', "list of node names"),
        ('[nodes.alice]\nbind = "tcp://h:1"\nconect = "tcp://h:1"', r"unknown keys \['conect'\]"),
        ('[nodes.alice]\nbind = "tcp://h:1"\ndata = 5', "data must be"),
        ('groups = 3\n[nodes.alice]\nbind = "tcp://h:1"', r"\[groups\] must map"),
        ('[nodes.alice]\nbind = "tcp://h:1"\n[groups]\n"bad name" = ["alice"]',
         "invalid group name 'bad name'"),  # it said "invalid node name" (audit)
        ('mesh = 3\n[nodes.alice]\nbind = "tcp://h:1"', r"\[mesh\] must be a table"),
    ],
)
def test_malformed_mesh_files_are_config_errors(tmp_path: Path, text: str, why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        MeshConfig.load(write(tmp_path, text)).node("alice")


def test_groups_naming_unknown_nodes_are_rejected_when_building_a_node(tmp_path: Path) -> None:
    text = MESH_TOML.replace('friends = ["alice", "bob"]', 'friends = ["alice", "zed"]')
    mesh = MeshConfig.load(write(tmp_path, text))
    with pytest.raises(ConfigError, match="unknown nodes"):
        mesh.node("alice")


def test_a_wildcard_bind_without_connect_cannot_be_dialed(tmp_path: Path) -> None:
    text = '[nodes.alice]\nbind = "tcp://h:1"\n[nodes.bob]\nbind = "tcp://*:2"\n'
    mesh = MeshConfig.load(write(tmp_path, text))
    with pytest.raises(InvalidEndpoint, match="wildcard"):
        mesh.node("alice")


def test_the_mesh_config_is_frozen(tmp_path: Path) -> None:
    mesh = MeshConfig.load(write(tmp_path, MESH_TOML))
    with pytest.raises(dataclasses.FrozenInstanceError):
        mesh.nodes = ()  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        mesh.node("alice").window = 1  # type: ignore[misc]


# -- flags ------------------------------------------------------------------------------------


def test_a_peer_flag_is_name_equals_endpoint() -> None:
    assert parse_peer_flag("bob=tcp://10.0.0.2:7000") == PeerConfig("bob", "tcp://10.0.0.2:7000")
    assert parse_peer_flag(" bob = ipc:///tmp/b ") == PeerConfig("bob", "ipc:///tmp/b")


@pytest.mark.parametrize(
    ("flag", "error", "why"),
    [
        ("bob", ConfigError, "NAME=ENDPOINT"),
        ("tcp://10.0.0.2:7000", ConfigError, "NAME=ENDPOINT"),
        ("=tcp://h:1", InvalidName, "invalid node name"),
        ("bad name=tcp://h:1", InvalidName, "invalid node name"),
        ("bob=", InvalidEndpoint, "supported transports"),
        ("bob=tcp://h:99999", InvalidEndpoint, "from 1 to 65535"),
        ("bob=tcp://0.0.0.0:7000", InvalidEndpoint, "wildcard"),
    ],
)
def test_bad_peer_flags_say_what_is_wrong(flag: str, error: type[Exception], why: str) -> None:
    with pytest.raises(error, match=why):
        parse_peer_flag(flag)


def test_a_group_flag_is_name_equals_members() -> None:
    assert parse_group_flag("team = a, b,,c ") == ("team", ("a", "b", "c"))
    for bad in ("team", "team="):
        with pytest.raises(ConfigError, match="GROUP=NODE"):
            parse_group_flag(bad)


def test_unique_keeps_the_first_of_each_in_order() -> None:
    assert unique(["b", "a", "b", "c", "a"]) == ["b", "a", "c"]


def test_a_non_ascii_name_is_refused_saying_ascii_only() -> None:
    # Issue 17 item 16.
    with pytest.raises(InvalidName, match="ASCII only"):
        validate_name("José")


def test_a_group_named_like_a_node_is_refused(tmp_path: Path) -> None:
    # Issue 17 item 16: `@B` must name one thing.
    with pytest.raises(ConfigError, match="group 'B' has the name of a node"):
        NodeConfig(name="A", bind=("tcp://127.0.0.1:5555",),
                   peers=(PeerConfig("B", "tcp://127.0.0.1:5556"),),
                   data_dir=tmp_path, groups={"B": ("B",)})


# -- private by default (issue 16, item 7) ------------------------------------------------------


@pytest.mark.parametrize("endpoint", ["tcp://0.0.0.0:7000", "tcp://*:7000", "tcp://[::]:7000",
                                      "tcp://10.0.0.3:7000", "tcp://eth0:7000",
                                      "tcp://node-7.lab.example.org:7000"])
def test_binding_beyond_loopback_needs_secure_or_an_explicit_insecure(endpoint: str) -> None:
    with pytest.raises(ConfigError, match=r"--secure.*--insecure"):
        node(bind=(endpoint,))
    assert node(bind=(endpoint,), secure=True).bind == (endpoint,)
    assert node(bind=(endpoint,), insecure=True).bind == (endpoint,)


@pytest.mark.parametrize("endpoint", ["tcp://127.0.0.1:7000", "tcp://127.8.9.1:7000",
                                      "tcp://[::1]:7000", "tcp://localhost:7000",
                                      "tcp://lo:7000", "ipc:///tmp/x.sock"])
def test_loopback_and_ipc_binds_need_nothing(endpoint: str) -> None:
    assert is_local_endpoint(endpoint)
    assert node(bind=(endpoint,)).bind == (endpoint,)


def test_link_idle_s_comes_from_the_mesh_config_or_the_node_flag(tmp_path: Path) -> None:
    from meshpost.cli.node import build_node_config
    from meshpost.cli.parser import build_parser

    args = build_parser().parse_args(
        ["node", "A", "--bind", f"ipc://{tmp_path}/a.sock", "--data", str(tmp_path / "a"),
         "--link-idle-s", "5"])
    assert build_node_config(args).link_idle_s == 5.0
    args = build_parser().parse_args(
        ["node", "A", "--bind", f"ipc://{tmp_path}/a.sock", "--data", str(tmp_path / "a")])
    assert build_node_config(args).link_idle_s == 60.0  # the default
    args = build_parser().parse_args(
        ["node", "A", "--bind", f"ipc://{tmp_path}/a.sock", "--link-idle-s", "-1"])
    with pytest.raises(ConfigError, match="link_idle_s"):
        build_node_config(args)


def test_subscriber_idle_s_comes_from_the_mesh_config_or_the_node_flag(tmp_path: Path) -> None:
    from meshpost.cli.node import build_node_config
    from meshpost.cli.parser import build_parser

    mesh_file = tmp_path / "mesh.toml"
    mesh_file.write_text('[mesh]\nsubscriber_idle_s = 4.5\n'
                         f'[nodes.A]\nbind = ["ipc://{tmp_path}/a.sock"]\n'
                         f'[nodes.B]\nbind = ["ipc://{tmp_path}/b.sock"]\n', encoding="utf-8")
    base = ["node", "A", "--data", str(tmp_path / "a")]
    parse = build_parser().parse_args
    assert build_node_config(parse([*base, "--config", str(mesh_file)])).subscriber_idle_s == 4.5
    assert build_node_config(parse([*base, "--config", str(mesh_file),
                                    "--subscriber-idle-s", "2"])).subscriber_idle_s == 2.0
    local = [*base, "--bind", f"ipc://{tmp_path}/a.sock"]
    assert build_node_config(parse(local)).subscriber_idle_s == 30.0  # the default
    for bad in ("0", "-1", "nan"):
        with pytest.raises(ConfigError, match=r"subscriber_idle_s must be a positive number"):
            build_node_config(parse([*local, "--subscriber-idle-s", bad]))
    with pytest.raises(ConfigError, match="subscriber_idle_s"):
        MeshConfig.from_dict({"mesh": {"subscriber_idle_s": "soon"},
                              "nodes": {"A": {"bind": [f"ipc://{tmp_path}/a.sock"]}}},
                             base_dir=tmp_path).node("A")


def test_dial_at_start_must_be_a_whole_number_of_zero_or_more(tmp_path: Path) -> None:
    base = {"name": "A", "bind": (f"ipc://{tmp_path}/a.sock",), "data_dir": tmp_path}
    assert NodeConfig(**base, dial_at_start=0).dial_at_start == 0
    for bad in (-1, 1.5, True):
        with pytest.raises(ConfigError, match="dial_at_start"):
            NodeConfig(**base, dial_at_start=bad)


def test_a_group_name_given_to_the_python_api_is_called_a_group_name() -> None:
    """Audit: group, queue and mesh names were all called an "invalid node name"."""
    with pytest.raises(InvalidName, match=r"^invalid group name 'bad name': use 1-63") as caught:
        NodeConfig(name="alice", bind=("tcp://127.0.0.1:1",), data_dir=Path("d"),
                   groups={"bad name": ("alice",)})
    assert caught.value.what == "group"

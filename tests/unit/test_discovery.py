"""Beacons and the directory that judges them, in virtual time."""

from __future__ import annotations

import pytest

from meshpost.discovery import (
    BEACON_MAGIC,
    Beacon,
    BeaconError,
    Clash,
    Directory,
    EndpointClaim,
    Found,
    Heard,
    Moved,
    Refused,
    Silent,
    Unauthorized,
    decode_beacon,
    dial_endpoint,
    encode_beacon,
    key_fingerprint,
    parse_target,
)
from meshpost.errors import InvalidEndpoint
from meshpost.protocol import PROTOCOL_VERSION


def beacon(name: str = "B", node_id: str = "b1", endpoint: str = "tcp://127.0.0.1:7002", *,
           mesh: str = "meshpost", protocol: int = PROTOCOL_VERSION,
           key: str | None = None) -> bytes:
    return encode_beacon(Beacon(mesh, node_id, name, endpoint, protocol, key))


def directory(**kwargs: object) -> Directory:
    return Directory(mesh="meshpost", name="A", node_id="a1", silence_s=5.0, **kwargs)  # type: ignore[arg-type]


def test_beacon_bytes_are_magic_version_then_a_msgpack_array_and_round_trip() -> None:
    b = Beacon("meshpost", "b1", "B", "tcp://127.0.0.1:7002", PROTOCOL_VERSION, None)
    data = encode_beacon(b)
    assert data[:4] == BEACON_MAGIC + b"\x01"
    assert data[4] == 0x96  # msgpack fixarray of 6
    assert decode_beacon(data) == b
    assert len(data) < 80


@pytest.mark.parametrize(
    "data", [b"", b"MPB", b"hello", b"MPB\x02" + b"\x90", b"MPB\x01\xc1", b"MPB\x01" + b"x" * 600,
             b"MPB\x01\x93\xa1a\xa1b\xa1c",
             # Not UTF-8 in the node id; seven fields; a map, not an array; a str for the
             # protocol; a protocol beyond 64 bits (msgpack has none: a float instead).
             b"MPB\x01\x96\xa8meshpost\xa2\xff\xfe\xa1B\xa9tcp://x:1\x01\xc0",
             b"MPB\x01\x97\xa8meshpost\xa2b1\xa1B\xa9tcp://x:1\x01\xc0\xc0",
             b"MPB\x01\x81\xa4mesh\xa8meshpost",
             b"MPB\x01\x96\xa8meshpost\xa2b1\xa1B\xa9tcp://x:1\xa11\xc0",
             b"MPB\x01\x96\xa8meshpost\xa2b1\xa1B\xa9tcp://x:1\xcb\x47\xf0\x00\x00\x00\x00"
             b"\x00\x00\xc0"],
)
def test_anything_but_a_beacon_raises_beacon_error(data: bytes) -> None:
    with pytest.raises(BeaconError):
        decode_beacon(data)


def test_first_beacon_finds_a_node_then_it_is_heard_then_silent_then_back() -> None:
    d = directory()
    assert d.receive(beacon(), "127.0.0.1", 0.0) == [Found("B", "b1", "tcp://127.0.0.1:7002")]
    assert d.receive(beacon(), "127.0.0.1", 1.0) == [Heard("B", returned=False)]
    assert d.expire(5.5) == []
    assert d.expire(6.0) == [Silent("B", 5.0)]
    assert d.expire(7.0) == []
    assert d.receive(beacon(), "127.0.0.1", 8.0) == [Heard("B", returned=True)]


def test_own_beacon_other_mesh_other_protocol_and_bad_names_are_ignored_and_counted() -> None:
    d = directory()
    assert d.receive(beacon("A", "a1"), "127.0.0.1", 0.0) == []
    assert d.receive(beacon(mesh="other"), "127.0.0.1", 0.0) == []
    said = f"protocol {PROTOCOL_VERSION + 1}; this node speaks {PROTOCOL_VERSION}"
    with pytest.raises(BeaconError, match=said):
        d.receive(beacon(protocol=PROTOCOL_VERSION + 1), "127.0.0.1", 0.0)
    with pytest.raises(BeaconError):
        d.receive(beacon(name="bad name"), "127.0.0.1", 0.0)
    assert d.receive(beacon(endpoint="http://x"), "127.0.0.1", 0.0) == [
        Refused("B", "b1", "http://x",
                "invalid endpoint 'http://x': supported transports are tcp:// and ipc://")]
    with pytest.raises(BeaconError):
        d.receive(b"junk", "127.0.0.1", 0.0)
    with pytest.raises(BeaconError):
        d.receive(b"MPB\x07", "127.0.0.1", 0.0)
    s = d.stats
    assert (s.other_mesh, s.other_version, s.garbage, s.endpoints_refused) == (1, 2, 2, 1)


def test_a_second_node_claiming_a_known_name_is_a_clash_never_found() -> None:
    d = directory()
    d.receive(beacon(), "127.0.0.1", 0.0)
    clash = Clash("B", "b1", "b2", "tcp://127.0.0.1:7009", ours=False)
    assert d.receive(beacon(node_id="b2", endpoint="tcp://127.0.0.1:7009"), "127.0.0.1",
                     1.0) == [clash]
    # Reported once per silence period, and the holder keeps the name even once silent.
    assert d.receive(beacon(node_id="b2", endpoint="tcp://127.0.0.1:7009"), "127.0.0.1",
                     2.0) == []
    d.expire(10.0)
    assert d.receive(beacon(node_id="b2", endpoint="tcp://127.0.0.1:7009"), "127.0.0.1",
                     11.0) == [clash]
    assert d.receive(beacon("A", "a2"), "127.0.0.1", 11.0) == [
        Clash("A", "a1", "a2", "tcp://127.0.0.1:7002", ours=True)]


def test_a_node_is_followed_to_a_new_endpoint_only_once_its_old_one_fell_silent() -> None:
    """Restarted elsewhere (another port or address), B is dialed at its new endpoint once
    nothing came from the old one for `silence_s`; until then a beacon giving B's name and
    node id elsewhere (anyone can say them) is a claim, not followed, reported once a period,
    and it does not count as hearing B."""
    d = directory()
    old, new = "tcp://127.0.0.1:7002", "tcp://127.0.0.1:7010"
    assert d.receive(beacon(endpoint=old), "127.0.0.1", 0.0) == [Found("B", "b1", old)]
    claim = EndpointClaim("B", "b1", old, new)
    assert d.receive(beacon(endpoint=new), "127.0.0.1", 1.0) == [claim]
    assert d.receive(beacon(endpoint=new), "127.0.0.1", 2.0) == []  # reported once a period
    assert d.receive(beacon(endpoint=old), "127.0.0.1", 3.0) == [Heard("B", returned=False)]
    assert d.receive(beacon(endpoint=new), "127.0.0.1", 7.9) == [claim]  # a period later
    assert d.stats.endpoint_claims == 3
    # The claims did not keep B heard: 5 s after its last beacon at `old`, it is silent, and
    # the next beacon from `new` moves it.
    assert d.expire(8.0) == [Silent("B", 5.0)]
    assert d.receive(beacon(endpoint=new), "127.0.0.1", 8.1) == [Moved("B", "b1", new, old)]
    assert d.receive(beacon(endpoint=new), "127.0.0.1", 9.0) == [Heard("B", returned=False)]
    # Now the old endpoint is the claim.
    assert d.receive(beacon(endpoint=old), "127.0.0.1", 9.5) == [EndpointClaim("B", "b1", new,
                                                                             old)]


def test_a_move_needs_no_silent_report_first() -> None:
    """`expire` runs on a timer: a beacon from elsewhere `silence_s` after the last one from
    the old endpoint moves the node even if `expire` has not run since."""
    d = directory()
    d.receive(beacon(endpoint="tcp://127.0.0.1:7002"), "127.0.0.1", 0.0)
    assert d.receive(beacon(endpoint="tcp://127.0.0.1:7010"), "127.0.0.1", 5.0) == [
        Moved("B", "b1", "tcp://127.0.0.1:7010", "tcp://127.0.0.1:7002")]


def test_under_secure_only_authorized_key_fingerprints_are_found() -> None:
    prints = {"B": key_fingerprint(b"k" * 32)}
    d = directory(authorized=lambda name, key: key is not None and prints.get(name) == key)
    assert d.receive(beacon(key=None), "127.0.0.1", 0.0) == [Unauthorized("B", "b1")]
    assert d.receive(beacon(key=key_fingerprint(b"x" * 32)), "127.0.0.1", 0.0) == []
    assert d.receive(beacon(key=prints["B"]), "127.0.0.1", 0.0)[0] == Found(
        "B", "b1", "tcp://127.0.0.1:7002")
    assert d.stats.unauthorized == 2


def test_wildcard_endpoint_is_dialed_at_the_beacons_source() -> None:
    assert dial_endpoint("tcp://*:7000", "192.0.2.7") == "tcp://192.0.2.7:7000"
    assert dial_endpoint("tcp://0.0.0.0:7000", "fe80::1") == "tcp://[fe80::1]:7000"
    assert dial_endpoint("tcp://10.0.0.1:7000", "192.0.2.7") == "tcp://10.0.0.1:7000"
    assert parse_target("127.0.0.1:5671") == ("127.0.0.1", 5671)
    with pytest.raises(InvalidEndpoint):
        parse_target("127.0.0.1")


# -- hostile beacons (docs/reliability.md, "Hostile peers against discovery") ------------------


@pytest.mark.parametrize(
    "fields",
    [
        {"node_id": "\x1b[2J\x1b[31mb1"},  # terminal escapes, in a clash line of the log
        {"node_id": "b\u202e1"},  # a bidi override
        {"node_id": "b" * 65},
        {"node_id": ""},
        {"key": "not a fingerprint"},
        {"endpoint": "tcp://127.0.0.1:7002\n2026-12-06 INFO forged line"},
        {"endpoint": "ipc:///tmp/x\u202e"},
    ],
)
def test_a_node_id_key_or_endpoint_of_the_wrong_form_is_garbage(fields: dict[str, str]) -> None:
    """What is logged or kept of a beacon is printable and short: before, a node id was any
    string of up to 500 bytes and reached the log raw (a clash line prints it)."""
    d = directory()
    with pytest.raises(BeaconError):
        d.receive(beacon(**fields), "127.0.0.1", 0.0)  # type: ignore[arg-type]
    with pytest.raises(BeaconError):  # under our own name: the clash line printed it
        d.receive(beacon("A", **fields), "127.0.0.1", 0.0)  # type: ignore[arg-type]
    assert d.stats.garbage == 2
    assert d.stats.clashes == 0


def test_reserved_words_and_this_nodes_groups_are_never_found() -> None:
    """Found under `team`, a stranger took what A sends to its group team (a peer's name wins
    over a group's); found under `all` or `ALL`, a line a beacon said `add_peer` refused."""
    d = directory(is_group=lambda name: name == "team")
    for name in ("all", "ALL", "me", "team"):
        decisions = d.receive(beacon(name), "127.0.0.1", 0.0)
        assert [type(x) for x in decisions] == [Refused], name
    assert d.stats.names_refused == 4
    assert d.stats.found == 0
    assert d.receive(beacon("teams"), "127.0.0.1", 0.0) == [
        Found("teams", "b1", "tcp://127.0.0.1:7002")]


@pytest.mark.parametrize(
    ("endpoint", "source", "found"),
    [
        ("tcp://*:7000", "192.0.2.7", "tcp://192.0.2.7:7000"),
        ("tcp://0.0.0.0:7000", "192.0.2.7", "tcp://192.0.2.7:7000"),
        ("tcp://192.0.2.7:7000", "192.0.2.7", "tcp://192.0.2.7:7000"),
        ("tcp://127.0.0.1:7000", "127.0.0.1", "tcp://127.0.0.1:7000"),
        ("ipc:///tmp/mp/B/node.sock", "127.0.0.1", "ipc:///tmp/mp/B/node.sock"),
        # A third party, a local service, a DNS name, a local socket: never dialed for a
        # beacon from elsewhere.
        ("tcp://192.0.2.99:25", "192.0.2.7", None),
        ("tcp://127.0.0.1:6379", "192.0.2.7", None),
        ("tcp://[::1]:6379", "192.0.2.7", None),
        ("tcp://example.com:7000", "192.0.2.7", None),
        ("tcp://localhost:7000", "127.0.0.1", None),
        ("ipc:///run/docker.sock", "192.0.2.7", None),
        ("tcp://127.0.0.2:7000", "127.0.0.1", None),
    ],
)
def test_a_node_is_dialed_only_at_its_beacons_source(endpoint: str, source: str,
                                                     found: str | None) -> None:
    d = directory()
    decisions = d.receive(beacon(endpoint=endpoint), source, 0.0)
    if found is None:
        assert [type(x) for x in decisions] == [Refused]
        assert d.stats.endpoints_refused == 1
    else:
        assert decisions == [Found("B", "b1", found)]


def test_at_most_max_found_nodes_are_found() -> None:
    """Before, every made-up name was a peer: a link each (7 KB, a dial for the first eight,
    a copy of every message to `all`), without bound."""
    d = directory(max_found=3)
    for i in range(3):
        assert d.receive(beacon(f"n{i}", f"id{i}"), "127.0.0.1", 0.0)[0] == Found(
            f"n{i}", f"id{i}", "tcp://127.0.0.1:7002")
    refused = d.receive(beacon("n3", "id3"), "127.0.0.1", 0.0)
    assert [type(x) for x in refused] == [Refused]
    # Those found are still heard.
    assert d.receive(beacon("n0", "id0"), "127.0.0.1", 1.0) == [Heard("n0", returned=False)]
    assert (d.stats.found, d.stats.directory_full) == (3, 1)


def test_a_beacon_naming_a_configured_peer_only_counts_as_hearing_it() -> None:
    """Before, a beacon under a configured peer's name with a made-up node id was `Found`,
    and `add_peer` pinned that node id for the name (although the link existed): the real
    peer's Hellos were refused as a name clash until the node restarted. Under --secure too,
    with the key's fingerprint copied from the real beacon."""
    d = directory(configured=frozenset({"B"}))
    assert d.receive(beacon(node_id="made-up", endpoint="tcp://127.0.0.1:9"), "127.0.0.1",
                     0.0) == [Heard("B", returned=False)]
    assert d.receive(beacon(), "127.0.0.1", 0.0) == [Heard("B", returned=False)]
    assert d.stats.clashes == 0
    assert d.stats.found == 0


def test_under_secure_a_node_id_copied_before_the_real_node_cannot_keep_it_out() -> None:
    """M beacons B's name and B's key fingerprint (both in B's beacons) with its own node id
    and endpoint before A hears B. Before: B's own beacons were a clash, never dialed, for as
    long as A ran. Now the key decides: B's endpoint is a claim, which the I/O side follows
    (`follow`) when M's endpoint never answered the handshake, once a period at most."""
    fp = key_fingerprint(b"k" * 32)
    d = directory(authorized=lambda name, key: name == "B" and key == fp)
    m_at, b_at = "tcp://127.0.0.1:7666", "tcp://127.0.0.1:7002"
    assert d.receive(beacon(node_id="m1", endpoint=m_at, key=fp), "127.0.0.1", 0.0) == [
        Found("B", "m1", m_at)]
    claim = EndpointClaim("B", "b1", m_at, b_at)
    assert d.receive(beacon(endpoint=b_at, key=fp), "127.0.0.1", 0.5) == [claim]
    assert d.stats.clashes == 0
    assert d.follow(claim, 0.5) == Moved("B", "b1", b_at, m_at)
    # M's next beacon is a claim in turn; following it back waits a period.
    back = EndpointClaim("B", "m1", b_at, m_at)
    assert d.receive(beacon(node_id="m1", endpoint=m_at, key=fp), "127.0.0.1", 1.0) == [back]
    assert d.follow(back, 1.0) is None
    assert d.follow(back, 5.5) == Moved("B", "m1", m_at, b_at)


def test_without_keys_follow_never_moves_a_node() -> None:
    d = directory()
    d.receive(beacon(), "127.0.0.1", 0.0)
    claim = d.receive(beacon(endpoint="tcp://127.0.0.1:7010"), "127.0.0.1", 1.0)[0]
    assert isinstance(claim, EndpointClaim)
    assert d.follow(claim, 100.0) is None


def test_a_protocol_at_msgspecs_limits_is_another_version() -> None:
    d = directory()
    for protocol in (2**64 - 1, -(2**63), 0):
        with pytest.raises(BeaconError, match=f"protocol {protocol};"):
            d.receive(beacon(protocol=protocol), "127.0.0.1", 0.0)
    assert d.stats.other_version == 3


def test_a_beacon_of_the_largest_size_is_read_and_one_byte_more_is_not() -> None:
    """512 bytes: a mesh name long enough to fill them (another mesh: counted, no state)."""
    base = len(beacon(mesh=""))
    for size, ok in ((512, True), (513, False)):
        # A str of 256 bytes or more takes three bytes of header, two more than the empty
        # mesh's one.
        data = beacon(mesh="m" * (size - base - 2))
        assert len(data) == size
        d = directory()
        if ok:
            assert d.receive(data, "127.0.0.1", 0.0) == []
            assert d.stats.other_mesh == 1
        else:
            with pytest.raises(BeaconError):
                d.receive(data, "127.0.0.1", 0.0)


def test_paced_log_lines_go_out_twenty_at_once_then_one_every_ten_seconds() -> None:
    from meshpost.discovery import LOG_BURST, LOG_EVERY_S, _PacedLog

    paced = _PacedLog()
    assert [paced.allow(0.0) for _ in range(LOG_BURST)] == [""] * LOG_BURST
    assert [paced.allow(1.0) for _ in range(1000)] == [None] * 1000
    assert paced.allow(LOG_EVERY_S) == " (1000 such lines left out before this one)"
    assert paced.allow(LOG_EVERY_S) is None
    # Quiet for long enough, the burst is back.
    assert paced.allow(LOG_EVERY_S * (LOG_BURST + 2)) == " (1 such lines left out before this one)"
    assert paced.allow(LOG_EVERY_S * (LOG_BURST + 2)) == ""


def test_one_source_address_finds_at_most_its_share() -> None:
    """A host that floods made-up names (at its own address: an endpoint must be there) fills
    its share, not the directory: nodes at other addresses are still found."""
    d = directory(max_found=10, max_found_per_source=3)
    for i in range(5):
        d.receive(beacon(f"fake{i}", f"f{i}", "tcp://*:7000"), "192.0.2.66", 0.0)
    assert d.stats.found == 3
    assert d.stats.directory_full == 2
    assert d.receive(beacon("B", "b1", "tcp://*:7000"), "192.0.2.7", 0.0) == [
        Found("B", "b1", "tcp://192.0.2.7:7000")]

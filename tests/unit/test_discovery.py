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
             b"MPB\x01\x93\xa1a\xa1b\xa1c"],
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
    assert d.receive(beacon(protocol=PROTOCOL_VERSION + 1), "127.0.0.1", 0.0) == []
    assert d.receive(beacon(name="bad name"), "127.0.0.1", 0.0) == []
    assert d.receive(beacon(endpoint="http://x"), "127.0.0.1", 0.0) == []
    with pytest.raises(BeaconError):
        d.receive(b"junk", "127.0.0.1", 0.0)
    with pytest.raises(BeaconError):
        d.receive(b"MPB\x07", "127.0.0.1", 0.0)
    s = d.stats
    assert (s.other_mesh, s.other_version, s.garbage) == (1, 2, 3)


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

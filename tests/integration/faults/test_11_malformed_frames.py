"""11. Malformed frames from connected raw peers while a good pair keeps exchanging.

A raw ZeroMQ DEALER connects to R three times: with routing id "K" (a configured peer that
never runs, so its Hello is welcomed), "Zed" (unknown to R) and no routing id at all. Each
sends hypothesis-generated frames: random bytes, truncated valid frames, tagged arrays with
wrong types, huge length prefixes, deep nesting, batches of semantically invalid envelopes,
multipart messages. Checked: R never crashes, logs no traceback or error (every bad frame is
a meshpost ProtocolError, counted as a violation), and S -> R stays clean. Valid messages the
raw "K" happens to produce are stored as K's (without CURVE a routing id is all the identity
there is); they are reported as foreign rows, not judged.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import msgspec
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshpost.protocol import PROTOCOL_VERSION, Batch, Envelope, Hello, Ping, encode

from .conftest import MeshFactory

pytestmark = [pytest.mark.faults, pytest.mark.integration]

EXAMPLES = 500
IDENTITIES: dict[str, bytes | None] = {"K": b"K", "Zed": b"Zed", "anonymous": None}

_enc = msgspec.msgpack.encode
_u64 = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.sampled_from([0, -1, 1, 2**31, 2**63 - 1, 2**63, 2**64 - 1, -(2**63)]),
)
_values = st.recursive(
    st.one_of(st.none(), st.booleans(), _u64, st.floats(), st.text(max_size=40),
              st.binary(max_size=40)),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=16,
)
_tags = st.sampled_from(["hello", "welcome", "refuse", "batch", "receipt", "reject", "ping",
                         "pong", "", "HELLO", "batch\x00", "ünïcode"])
_names = st.sampled_from(["K", "S", "R", "Zed", "", "k" * 70])


def _hello(name: str, version: int = PROTOCOL_VERSION) -> bytes:
    return encode(Hello(version=version, node_id="feedface", name=name, sent_at_ns=1, hlc=1))


_valid = st.one_of(
    st.builds(_hello, _names, st.sampled_from([PROTOCOL_VERSION, 0, 2, 99])),
    st.builds(lambda t: encode(Ping(sent_at_ns=t)), _u64.filter(lambda v: v >= -(2**63))),
    st.builds(
        lambda seq, body: encode(Batch(tx_at_ns=1, messages=[
            Envelope(id=f"k-{seq}", seq=seq, sender="K", recipient="R", body=body,
                     sent_at_ns=1, hlc=1)])),
        st.integers(1, 2**31), st.text(min_size=1, max_size=50),
    ),
)
_envelopes = st.lists(
    st.tuples(st.text(max_size=80), _u64, _names, st.sampled_from(["R", "S", ""]),
              st.text(max_size=200), _u64, _u64).map(list),
    max_size=6,
)
FRAMES = st.one_of(
    st.binary(max_size=1024),  # random bytes
    st.builds(lambda b, n: b[:n], _valid, st.integers(0, 120)),  # truncated valid frames
    st.builds(lambda tag, rest: _enc([tag, *rest]), _tags, st.lists(_values, max_size=8)),
    st.builds(lambda head, tail: head + tail,  # huge length prefixes
              st.sampled_from([b"\xdd\xff\xff\xff\xff", b"\xdb\xff\xff\xff\xff",
                               b"\xc6\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff",
                               b"\x92\xa5batch\xdd\x7f\xff\xff\xff",
                               b"\x93\xa5batch\x01\xdd\xff\xff\xff\xff"]),
              st.binary(max_size=32)),
    st.builds(lambda head, depth: head + b"\x91" * depth + b"\xc0",  # deep nesting
              st.sampled_from([b"", b"\x93\xa5batch\x01", b"\x92\xa4ping"]),
              st.integers(1, 200_000)),
    st.builds(lambda tx, envs: _enc(["batch", tx, envs]), _u64, _envelopes),
    _valid,
    st.lists(st.binary(max_size=64), min_size=2, max_size=4),  # multipart messages
)


def _is_pong(frame: bytes) -> bool:
    """A Pong: a msgpack array (of 4 fields, or 5 since Pong says `pending`) tagged "pong"."""
    return frame[:1] in (b"\x94", b"\x95") and frame[1:6] == b"\xa4pong"


def _fuzz(endpoint: str) -> dict[str, Any]:
    ctx = zmq.Context()
    socks: dict[str, zmq.Socket[Any]] = {}
    sent: Counter[str] = Counter()
    try:
        for name, ident in IDENTITIES.items():
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDTIMEO, 2000)
            if ident is not None:
                sock.setsockopt(zmq.ROUTING_ID, ident)
            sock.connect(endpoint)
            socks[name] = sock

        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(who=st.sampled_from(list(IDENTITIES)), hello_first=st.booleans(),
               frames=st.lists(FRAMES, min_size=1, max_size=8))
        def attack(who: str, hello_first: bool, frames: list[bytes | list[bytes]]) -> None:
            sock = socks[who]
            with_hello = [_hello(who)] if hello_first else []
            for frame in [*with_hello, *frames]:
                try:
                    if isinstance(frame, list):
                        sock.send_multipart(frame)
                        sent["multipart"] += 1
                    else:
                        sock.send(frame)
                        sent["frames"] += 1
                except zmq.Again:
                    sent["send_timeouts"] += 1
            while sock.poll(0):
                sock.recv_multipart()
                sent["replies"] += 1

        attack()
        # Still answering: K (known) gets a Pong after a Hello.
        sock = socks["K"]
        sock.send(_hello("K"))
        sock.send(encode(Ping(sent_at_ns=7)))
        replies: list[bytes] = []
        while sock.poll(5000) and len(replies) < 100:
            replies.append(sock.recv())
            if any(_is_pong(r) for r in replies):
                break
        sent["pong_after_fuzz"] = int(any(_is_pong(r) for r in replies))
        return dict(sent)
    finally:
        for sock in socks.values():
            sock.close(0)
        ctx.term()


def test_malformed_frames_from_raw_peers(mesh_factory: MeshFactory) -> None:
    mesh = mesh_factory(["S", "R", "K"], real=["R"], absent=["K"], seed=11)
    mesh.foreign_senders.add("K")

    async def scenario() -> None:
        await mesh.start()
        done = asyncio.Event()

        good = mesh.keep_streaming("S", "R", done, pause_s=0.05)
        try:
            sent = await asyncio.to_thread(_fuzz, mesh.endpoint("R"))
        finally:
            done.set()
        await good
        assert mesh.alive("R"), mesh.log_tail("R")
        assert sent["pong_after_fuzz"] == 1, sent
        stats = (await mesh.status("R"))["stats"]
        mesh.extra.update({k: v for k, v in sent.items() if k != "pong_after_fuzz"})
        mesh.extra["violations"] = stats["violations"]
        assert stats["violations"] > 0
        log = mesh.log_text("R")
        assert "Traceback" not in log, mesh.log_tail("R", 80)
        assert " ERROR " not in log and "CRITICAL" not in log, mesh.log_tail("R", 80)
        counts = await mesh.finish()
        assert counts.accepted == counts.receipted > 0

    mesh.run(scenario)

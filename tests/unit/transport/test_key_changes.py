"""`ZmqTransport.set_peer_keys`: a reload's effect on the sockets, with real ones (nothing
listens at the endpoints: only which DEALERs exist, with which server key, is looked at).
A removed peer's DEALER goes and it is not dialled again until a key is listed; a changed
one is redialled (a new DEALER: its server key is set at connect); a peer whose key stayed
keeps its very socket."""

from __future__ import annotations

import asyncio

import zmq

from meshpost.transport import ZmqTransport

ENDPOINT = "tcp://127.0.0.1:9"  # the discard port: nothing answers, nothing is sent


def pair() -> tuple[bytes, bytes]:
    public, secret = zmq.curve_keypair()
    return public, secret


def test_a_reload_cuts_the_removed_redials_the_changed_and_leaves_the_others() -> None:
    own_public, own_secret = pair()
    p, q, r, q2 = (pair()[0] for _ in range(4))

    async def scenario() -> None:  # the authenticator runs on the event loop
        transport = ZmqTransport(name="N", max_frame_bytes=1 << 20, curve_secret_key=own_secret,
                                 curve_public_key=own_public,
                                 peer_public_keys={"P": p, "Q": q, "R": r})
        try:
            for peer in "PQR":
                transport.add_peer(peer, ENDPOINT)
            kept, old_q = transport._dealers["P"], transport._dealers["Q"]
            changes = transport.set_peer_keys({"P": p, "Q": q2})
            assert (changes.added, changes.removed, changes.changed) == ((), ("R",), ("Q",))
            assert transport._dealers["P"] is kept  # untouched
            assert transport._dealers["Q"] is not old_q  # a new DEALER, with Q's new key
            assert transport.redials == 1
            assert "R" not in transport._dealers
            assert "not dialled" in (transport.handshake_failure("R") or "")
            assert not transport.send_to_peer("R", b"frame")  # nothing to queue it on
            transport.redial("R")  # the link's redial of a peer without a key: nothing
            assert "R" not in transport._dealers
            # A link that idles and opens again does not dial a peer without a key either.
            transport.drop_peer("R")
            transport.add_peer("R", ENDPOINT)
            assert "R" not in transport._dealers
            # Its key back: dialled again, with that key.
            again = transport.set_peer_keys({"P": p, "Q": q2, "R": r})
            assert again.added == ("R",)
            assert "R" in transport._dealers
            assert transport.handshake_failure("R") is None
            assert transport._dealers["P"] is kept
            names = transport._authenticator.allowlist.names_by_key  # type: ignore[union-attr]
            assert names == {p: "P", q2: "Q", r: "R"}
        finally:
            transport.close()

    asyncio.run(scenario())

"""`meshpost tail --from NAME` with a NAME that is none of the node's peers says so at once: a
typo (`--from Sx` for S) waited in silence for ever."""

from __future__ import annotations

import queue
import threading
from pathlib import Path

import pytest

from meshpost.cluster import free_tcp_ports
from tests.integration.test_tail import Tail, send, start_nodes

pytestmark = pytest.mark.integration

#: How long tail has to say that the name is no peer (it asks the node once, at start).
NOTE_WAIT_S = 20.0


def test_tail_from_a_name_that_is_no_peer_says_so_and_from_a_peer_says_nothing(
    short_tmp: Path,
) -> None:
    port_s, port_a = free_tcp_ports(2)
    s_ep, a_ep = f"tcp://127.0.0.1:{port_s}", f"tcp://127.0.0.1:{port_a}"
    nodes = start_nodes(short_tmp, {"S": ["--bind", s_ep, "--peer", f"A={a_ep}"],
                                    "A": ["--bind", a_ep, "--peer", f"S={s_ep}"]})
    typo = right = None
    try:
        typo = Tail(short_tmp, "A", "--from", "Sx")
        assert typo.proc.stderr is not None
        # The note comes right after tail's first line; wait for it a bounded time (a
        # thread reads it: the first line's read may have buffered it already).
        stderr, lines = typo.proc.stderr, queue.Queue[str]()
        threading.Thread(target=lambda: lines.put(stderr.readline()), daemon=True).start()
        note = lines.get(timeout=NOTE_WAIT_S)
        assert note.startswith("meshpost tail: 'Sx' is none of A's peers (S)"), note
        right = Tail(short_tmp, "A", "--from", "S", "--count", "1")
        send(short_tmp, "S", "A", "hola")
        code, lines, err = right.finish()
        assert code == 0, err
        assert lines[0].endswith("S → me: hola")
        assert "none of" not in err
    finally:
        for tail in (typo, right):
            if tail is not None:
                tail.kill()
        for node in nodes.values():
            node.stop()

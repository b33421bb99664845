"""Message ids (issue 16, item 3): time-ordered, but the next one cannot be read off the last."""

from __future__ import annotations

import itertools
import os

from meshpost.node.core import _IdFactory

WALL = 1_700_000_000_000_000_000


def test_the_next_id_is_not_the_last_one_plus_one() -> None:
    ids = _IdFactory()
    first, second = ids(WALL), ids(WALL)
    assert first[:12] == second[:12] == f"{WALL // 1_000_000:012x}"  # time-ordered prefix
    assert int(second[12:], 16) != int(first[12:], 16) + 1
    runs = [ids.many(WALL, 3) for _ in range(2)]
    steps = [int(b[12:], 16) - int(a[12:], 16) for run in runs for a, b in itertools.pairwise(run)]
    assert steps == [1, 1, 1, 1]  # a run counts up
    assert int(runs[1][0][12:], 16) != int(runs[0][-1][12:], 16) + 1  # a new random start


def test_ids_stay_unique_and_28_hex_digits() -> None:
    ids = _IdFactory()
    made = [ids(WALL) for _ in range(1000)] + ids.many(WALL, 5000)
    assert len(set(made)) == len(made)
    assert {len(i) for i in made} == {28}


def test_a_forked_child_does_not_reuse_its_parents_randomness() -> None:
    """Single ids are cut from randomness drawn ahead: a child forked with some of it left
    must draw its own, or parent and child would make the same ids."""
    ids = _IdFactory()
    ids(WALL)  # randomness for the next ids is drawn now, before the fork
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.write(write, ",".join(ids(WALL) for _ in range(8)).encode())
        finally:
            os._exit(0)
    os.close(write)
    try:
        with os.fdopen(read) as pipe:
            child = pipe.read().split(",")
    finally:
        os.waitpid(pid, 0)
    parent = [ids(WALL) for _ in range(8)]
    assert len(child) == 8
    assert not set(child) & set(parent)

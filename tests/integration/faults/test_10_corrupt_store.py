"""10. A corrupt store (bytes flipped or the file truncated while the node is stopped) is
detected at start-up: a clear error, a non-zero exit, and nothing is ever receipted into it
(the file is left untouched). Restoring the copy lets delivery complete."""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from meshpost.cli import EXIT_STORE
from meshpost.cluster import ClusterError

from .checker import Mesh
from .conftest import MeshFactory

pytestmark = [pytest.mark.faults, pytest.mark.integration]



def _page_size(data: bytearray) -> int:
    """The database's page size, from its header (bytes 16-17, big-endian; 1 means 65536)."""
    size = int.from_bytes(data[16:18], "big")
    return 65536 if size == 1 else size


def _header(data: bytearray, rng: random.Random) -> None:
    data[0:16] = b"definitely not a"  # the "SQLite format 3\0" magic


def _page_headers(data: bytearray, rng: random.Random) -> None:
    # Byte 0 of every b-tree page is its type (2, 5, 10, 13); 0x00 or 0xff is no type at all.
    page_size = _page_size(data)
    pages = range(1, len(data) // page_size)
    for page in rng.sample(list(pages), max(1, len(pages) // 3)):
        data[page * page_size] ^= 0xFF


def _truncate_half(data: bytearray, rng: random.Random) -> None:
    del data[len(data) // 2 + 123 :]


def _truncate_pages(data: bytearray, rng: random.Random) -> None:
    del data[len(data) - 2 * _page_size(data) :]


def _body_bit(data: bytearray, rng: random.Random) -> None:
    needle = b"before#000042 "
    at = data.find(needle)
    assert at > 0, "message body not found in the database file"
    data[at + len(needle)] ^= 0x01  # one bit of a stored message's text


CORRUPTIONS: dict[str, Callable[[bytearray, random.Random], None]] = {
    "header-magic": _header,
    "page-type-bytes": _page_headers,
    "truncate-half": _truncate_half,
    "truncate-last-pages": _truncate_pages,
}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def _prepare(mesh: Mesh, corrupt: Callable[[bytearray, random.Random], None]) -> bytes:
    """Exchange, stop R cleanly, keep a copy of its store, corrupt the store; return the copy."""
    await mesh.start()
    await mesh.stream("S", "R", 200, tag="before", concurrency=20, pause_s=0)
    await mesh.heal_and_drain()
    assert await asyncio.to_thread(mesh.terminate, "R") == 0
    db = mesh.db("R")
    assert not db.with_name(db.name + "-wal").exists(), "R left a WAL behind"
    backup = db.read_bytes()
    data = bytearray(backup)
    corrupt(data, random.Random(10))
    db.write_bytes(bytes(data))
    return backup


async def _start_corrupt(mesh: Mesh) -> None:
    """Start R on the corrupt store: it must refuse, clearly, without writing to it."""
    db = mesh.db("R")
    before = _sha(db)
    await mesh.stream("S", "R", 50, tag="while-corrupt", concurrency=10, pause_s=0)
    await asyncio.to_thread(mesh.start_real, ["R"], wait=False)
    try:
        await asyncio.to_thread(mesh.proc("R").wait_ready)
    except ClusterError:
        pass  # it exited: expected
    else:
        raise AssertionError("R started on a corrupt store")
    code = await asyncio.to_thread(mesh.wait_exit, "R")
    log = mesh.log_tail("R", 5)
    assert code == EXIT_STORE, f"exit code {code}:\n{log}"
    assert "is corrupt" in log and "restore it from a copy" in log, log
    assert _sha(db) == before, "the node wrote into a corrupt store"
    assert await mesh.inproc["S"].pending_count() == 50, "S saw a receipt from R"

    mesh.extra["exit_code"] = code
    detail = log.splitlines()[-1].split("(", 1)[-1].split(")")[0]
    mesh.extra["error"] = detail[:60].replace(" ", "_")


def _restore(mesh: Mesh, backup: bytes) -> None:
    db = mesh.db("R")
    for suffix in ("-wal", "-shm"):
        db.with_name(db.name + suffix).unlink(missing_ok=True)
    db.write_bytes(backup)


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_corrupt_store_refused_at_start(mesh_factory: MeshFactory, kind: str) -> None:
    mesh = mesh_factory(["S", "R"], real=["R"], seed=10)

    async def scenario() -> None:
        backup = await _prepare(mesh, CORRUPTIONS[kind])
        await _start_corrupt(mesh)
        _restore(mesh, backup)
        counts = await mesh.finish()
        assert counts.accepted == counts.stored == 250

    mesh.run(scenario)


def test_corrupt_message_body_detected(mesh_factory: MeshFactory) -> None:
    mesh = mesh_factory(["S", "R"], real=["R"], seed=10)

    async def scenario() -> None:
        backup = await _prepare(mesh, _body_bit)
        try:
            await _start_corrupt(mesh)
        except AssertionError:
            # Not detected: R runs on altered data. Show what the checker sees, then fail.
            counts = await mesh.finish(assert_clean=False)
            raise AssertionError(f"corruption not detected at start-up: {counts.line()}\n"
                                 + "\n".join(counts.problems)) from None
        _restore(mesh, backup)
        await mesh.finish()

    mesh.run(scenario)

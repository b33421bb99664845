"""9. Store errors at the receiver while a stream arrives: another process holds the write lock,
the database file turns read-only, the disk is full. Checked: no receipt for a message that
is not stored, the node stays up (and counts the errors), delivery completes once cleared.

How each fault is made (the tests run as root, so `chmod` would not stop the node):
- lock: a sqlite3 connection of the test holds `BEGIN IMMEDIATE` on R's database;
- read-only: `chattr +i` (immutable) on R's database and WAL files; writes to the already open
  files then fail with EPERM, which SQLite reports as SQLITE_IOERR_WRITE;
- disk full: R's data directory is a 16 MiB tmpfs; a filler file takes the free space, so the
  WAL cannot grow (SQLITE_FULL). `max_page_count` would need a debug option in the node (it
  is a per-connection pragma); the real ENOSPC path is exercised instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import sqlite3
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from .checker import Mesh, read_rows
from .conftest import MeshFactory

pytestmark = [pytest.mark.faults, pytest.mark.integration]

FAULT_S = 3.0

Fault = tuple[Callable[[], None], Callable[[], None]]


def _lock(mesh: Mesh) -> Fault:
    conn = sqlite3.connect(str(mesh.db("R")), timeout=10, isolation_level=None)

    def inject() -> None:
        conn.execute("BEGIN IMMEDIATE")

    def clear() -> None:
        conn.execute("ROLLBACK")
        conn.close()

    mesh.cleanups.append(conn.close)
    return inject, clear


def _chattr(flag: str, *paths: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["chattr", flag, *map(str, paths)], capture_output=True, text=True,
                          check=False)


def _readonly(mesh: Mesh) -> Fault:
    files = [mesh.db("R"), mesh.db("R").with_name(mesh.db("R").name + "-wal")]

    def inject() -> None:
        done = _chattr("+i", *files)
        assert done.returncode == 0, done.stderr

    def clear() -> None:
        _chattr("-i", *files)

    mesh.cleanups.append(clear)
    return inject, clear


def _disk_full(mesh: Mesh) -> Fault:
    filler = mesh.data_dir("R") / "filler"

    def inject() -> None:
        # Unbuffered: with a buffer, the failed tail would be flushed again (and fail again)
        # when the file closes.
        with open(filler, "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise

    def clear() -> None:
        filler.unlink()

    return inject, clear


def _mount_tmpfs(mesh: Mesh) -> None:
    path = mesh.data_dir("R")
    path.mkdir(parents=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(path)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"disk-full test needs to mount a small tmpfs (CAP_SYS_ADMIN): "
                    f"{done.stderr.strip()}")

    def unmount() -> None:
        subprocess.run(["umount", "-l", str(path)], check=False)

    mesh.cleanups.append(unmount)


def _immutable_supported(path: Path) -> None:
    probe = path / "chattr-probe"
    probe.write_bytes(b"x")
    done = _chattr("+i", probe)
    _chattr("-i", probe)
    probe.unlink()
    if done.returncode != 0:
        pytest.skip("read-only test needs `chattr +i` (root on a filesystem with inode flags, "
                    f"e.g. ext4): {done.stderr.strip()}")


#: The error kind R's status names while it retries under each fault (`store_retry_error`):
#: an immutable database file and WAL make SQLite report a disk I/O error, not "read-only".
RETRY_KINDS = {"write-lock": "store_locked", "read-only": "storage", "disk-full": "store_full"}

FAULTS: dict[str, Callable[[Mesh], Fault]] = {
    "write-lock": _lock, "read-only": _readonly, "disk-full": _disk_full,
}


@pytest.mark.parametrize("kind", list(FAULTS))
def test_store_error_at_receiver(mesh_factory: MeshFactory, kind: str) -> None:
    mesh = mesh_factory(["S", "R"], real=["R"], seed=9)
    if kind == "disk-full":
        _mount_tmpfs(mesh)
    if kind == "read-only":
        _immutable_supported(mesh.root)

    async def scenario() -> None:
        await mesh.start()
        await mesh.stream("S", "R", 100, tag="before", concurrency=20, pause_s=0)
        await mesh.heal_and_drain()
        inject, clear = FAULTS[kind](mesh)
        errors_before = (await mesh.status("R"))["stats"]["store_errors"]
        inject()
        try:
            await asyncio.sleep(0.3)  # a commit already under way may still finish
            stored_at_start = len(read_rows(mesh.data_dir("R"), "WHERE direction = 'in'"))
            await mesh.stream("S", "R", 200, tag="during", concurrency=20, pause_s=0.05,
                              size=200)
            await asyncio.sleep(FAULT_S)
            assert mesh.alive("R"), mesh.log_tail("R")
            mesh.assert_no_receipt_without_commit(f"during {kind}")
            stored_now = len(read_rows(mesh.data_dir("R"), "WHERE direction = 'in'"))
            during = [a for a in mesh.ledger.attempts.values() if a.body.startswith("during")]
            receipted = sum(a.receipted for a in during)
            status = await mesh.status("R")
            mesh.extra["store_errors"] = status["stats"]["store_errors"] - errors_before
            mesh.extra["receipted_during_fault"] = receipted
            assert stored_now == stored_at_start, "R committed while its store was failing"
            assert receipted == 0
            assert mesh.extra["store_errors"] > 0, "the fault never reached R's writer"
            # R's status says it is retrying, and why (docs/reliability.md, "Store errors").
            stats = status["stats"]
            mesh.extra["retry_error"] = stats["store_retry_error"].split(":")[0]
            assert stats["store_retry_attempts"] > 0, stats
            assert stats["store_retry_delay_s"] > 0 and stats["store_retry_for_s"] > 0, stats
            assert mesh.extra["retry_error"] == RETRY_KINDS[kind], stats["store_retry_error"]
        finally:
            with contextlib.suppress(Exception):
                clear()
        counts = await mesh.finish()
        assert counts.accepted == counts.receipted == 300
        assert mesh.log_text("R").count("Traceback") == 0

    mesh.run(scenario)

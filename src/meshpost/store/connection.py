"""Opening SQLite connections and translating SQLite's errors.

Rule: every connection to a store is opened by `connect` (URI, busy timeout, our own
transactions), and every `sqlite3.Error` leaves the store package as a meshpost `StoreError`.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from meshpost.errors import (
    DataDirIsAFile,
    DataDirNotWritable,
    NoStore,
    RowRefused,
    StoreCorrupt,
    StoreError,
    StoreFull,
    StoreLocked,
)

#: The database file in a node's data dir (the writer's `Store` and every reader open it).
DB_FILENAME = "meshpost.db"
#: How long a write waits for another process's lock before the batch is retried later.
BUSY_TIMEOUT_MS = 1000


def translate(exc: sqlite3.Error, path: Path) -> StoreError:
    """Map a sqlite3 error to the meshpost error a user can act on."""
    if isinstance(exc, sqlite3.IntegrityError | sqlite3.DataError) or (
        isinstance(exc, sqlite3.ProgrammingError | sqlite3.InterfaceError)
        and "binding" in str(exc)
    ):
        # A constraint the row breaks (SQLITE_CONSTRAINT, MISMATCH), a value too big
        # (TOOBIG) or one sqlite3 cannot bind ("Error binding parameter 3: type 'list' is not
        # supported"): a property of what was written, not of the store; it fails the same
        # way every time. (A binding error was a plain `StoreError` until 2026-12-06, so the
        # writer retried its batch for ever.) Checked first: a constraint's text may name a
        # column "full".
        return RowRefused(str(path), str(exc))
    text = str(exc).lower()
    code = getattr(exc, "sqlite_errorcode", None)
    if "locked" in text or "busy" in text or code in (5, 6):
        return StoreLocked(str(path))
    if "full" in text or code == 13:
        return StoreFull(str(path))
    if "readonly" in text or "read-only" in text or code == 8:
        return DataDirNotWritable(str(path), "the database is read-only")
    if "malformed" in text or "not a database" in text or code in (11, 26):
        return StoreCorrupt(str(path), str(exc))
    return StoreError(f"database {path}: {exc}")


def check_data_dir(data_dir: Path) -> None:
    """`DataDirIsAFile` if `data_dir` is a file (mkdir's "File exists" said nothing useful)."""
    if data_dir.exists() and not data_dir.is_dir():
        raise DataDirIsAFile(str(data_dir))


def check_is_meshpost(conn: sqlite3.Connection, path: Path) -> None:
    """`NoStore` (saying what is there) unless the database at `path` has meshpost's tables:
    a reader of an empty file or another program's database got "no such table: messages".
    Only for readers: a writer's `Store` creates the tables in a new, empty file."""
    if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'messages'"
                    ).fetchone() is not None:
        return
    try:
        empty = path.stat().st_size == 0
    except OSError:
        empty = False
    raise NoStore(str(path), "the file is empty: no meshpost node has written it; a node "
                  "started with this data dir creates its tables" if empty
                  else "it is an SQLite database without meshpost's tables")


def connect(path: Path, *, read_only: bool) -> sqlite3.Connection:
    uri = f"file:{path}?mode=ro" if read_only else f"file:{path}?mode=rwc"
    # isolation_level=None: we issue BEGIN IMMEDIATE / COMMIT ourselves.
    conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    return conn


@contextlib.contextmanager
def translated(path: Path) -> Iterator[None]:
    try:
        yield
    except sqlite3.Error as exc:
        raise translate(exc, path) from exc

"""The SQLite store: opening, migrations, idempotent writes, reads, and every failure mode."""

from __future__ import annotations

import os
import sqlite3
import zlib
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.unit.store.support import (
    T,
    assert_counts_match_the_view,
    incoming,
    out,
    receipt,
    states,
    view_pending,
)

from meshpost.errors import (
    DataDirNotWritable,
    RowRefused,
    SchemaTooNew,
    StoreCorrupt,
    StoreError,
    StoreFull,
    StoreLocked,
)
from meshpost.protocol import Envelope
from meshpost.protocol.header import Kind, PatternHeader
from meshpost.store import (
    DB_FILENAME,
    Delivery,
    Rejection,
    Store,
    StoreReader,
    WriteBatch,
)
from meshpost.store import sqlite as sqlite_module
from meshpost.store.checksum import content_checksum, envelope_checksum
from meshpost.store.patterns import NewTask
from meshpost.store.schema import MIGRATIONS, SCHEMA_VERSION
from meshpost.store.sqlite import (
    PAGE_SIZE,
    WAL_SIZE_LIMIT_BYTES,
    _row_values,
    migrate,
    translate,
)

# -- opening ----------------------------------------------------------------------------------


def test_open_creates_a_wal_database_at_the_current_schema_version(store: Store) -> None:
    assert store.path.name == DB_FILENAME
    assert store.path.exists()
    assert store.execute_raw("PRAGMA journal_mode") == [("wal",)]
    # A WAL that a long reader let grow is cut back when it next starts over.
    assert store.execute_raw("PRAGMA journal_size_limit") == [(WAL_SIZE_LIMIT_BYTES,)]
    assert store.execute_raw("PRAGMA user_version") == [(SCHEMA_VERSION,)]
    assert len(MIGRATIONS) == SCHEMA_VERSION
    assert len(store.node_id) == 16


def test_synchronous_follows_the_sync_level(tmp_path: Path) -> None:
    for sync, level in (("full", 2), ("normal", 1)):
        s = Store.open(tmp_path / sync, name="alice", sync=sync)
        try:
            assert s.execute_raw("PRAGMA synchronous") == [(level,)]
        finally:
            s.close()


def test_reopening_keeps_data_and_identity_and_does_not_migrate_again(data_dir: Path) -> None:
    first = Store.open(data_dir, name="alice")
    node_id = first.node_id
    first.apply(WriteBatch(outgoing=[out(1)]), T)
    first.close()
    second = Store.open(data_dir, name="alice")
    try:
        assert second.node_id == node_id
        assert second.execute_raw("PRAGMA user_version") == [(SCHEMA_VERSION,)]
        assert second.load_pending("bob", 0, 10) == [out(1)]
    finally:
        second.close()


def test_migrating_an_up_to_date_database_is_a_no_op(store: Store) -> None:
    store.apply(WriteBatch(outgoing=[out(1)]), T)
    conn = sqlite3.connect(store.path, isolation_level=None)
    try:
        migrate(conn, store.path)
        migrate(conn, store.path)
        assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        assert conn.execute("SELECT COUNT(*) FROM messages").fetchone() == (1,)
    finally:
        conn.close()


def test_an_interrupted_migration_leaves_the_previous_version(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "x.db", isolation_level=None)
    conn.execute("CREATE TABLE meta (key TEXT)")  # the first migration will collide with this
    try:
        with pytest.raises(sqlite3.OperationalError, match="already exists"):
            migrate(conn, tmp_path / "x.db")
        assert conn.execute("PRAGMA user_version").fetchone() == (0,)
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert tables == {"meta"}
    finally:
        conn.close()


def test_a_data_dir_belongs_to_one_node_name(data_dir: Path) -> None:
    Store.open(data_dir, name="alice").close()
    with pytest.raises(StoreError, match="belongs to node 'alice'"):
        Store.open(data_dir, name="mallory")
    # The failed open released its lock.
    Store.open(data_dir, name="alice").close()


def test_a_database_from_a_newer_meshpost_is_refused(data_dir: Path) -> None:
    data_dir.mkdir()
    conn = sqlite3.connect(data_dir / DB_FILENAME)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(SchemaTooNew, match=f"schema version {SCHEMA_VERSION + 1}"):
        Store.open(data_dir, name="alice")
    with pytest.raises(SchemaTooNew):  # and the lock was released
        Store.open(data_dir, name="alice")


def test_a_second_open_of_the_same_data_dir_is_locked(store: Store, data_dir: Path) -> None:
    with pytest.raises(StoreLocked, match="another node running"):
        Store.open(data_dir, name="alice")
    store.apply(WriteBatch(outgoing=[out(1)]), T)  # the first store is unaffected


def test_the_lock_is_released_on_close(data_dir: Path) -> None:
    Store.open(data_dir, name="alice").close()
    Store.open(data_dir, name="alice").close()


def test_a_data_dir_that_cannot_be_created_is_not_writable(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(DataDirNotWritable, match="not writable"):
        Store.open(blocker / "alice", name="alice")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write to read-only directories")
def test_a_read_only_data_dir_is_not_writable(tmp_path: Path) -> None:
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(DataDirNotWritable):
            Store.open(locked, name="alice")
    finally:
        locked.chmod(0o700)


@pytest.mark.parametrize("offset", [0, 16, 40])
def test_garbage_over_the_database_header_is_corrupt(data_dir: Path, offset: int) -> None:
    s = Store.open(data_dir, name="alice")
    s.apply(WriteBatch(outgoing=[out(i) for i in range(1, 50)]), T)
    s.close()
    with open(data_dir / DB_FILENAME, "r+b") as f:
        f.seek(offset)
        f.write(b"\xde\xad\xbe\xef garbage garbage garbage \xff" * 3)
    with pytest.raises(StoreCorrupt, match="corrupt"):
        Store.open(data_dir, name="alice")
    with pytest.raises(StoreCorrupt):  # the lock was released; still corrupt
        Store.open(data_dir, name="alice")


def test_a_database_file_of_pure_garbage_is_corrupt(data_dir: Path) -> None:
    data_dir.mkdir()
    (data_dir / DB_FILENAME).write_bytes(os.urandom(8192))
    with pytest.raises(StoreCorrupt):
        Store.open(data_dir, name="alice")


# -- incoming -------------------------------------------------------------------------------


def test_an_incoming_message_is_committed_once_however_often_it_arrives(store: Store) -> None:
    m = incoming(1)
    [first] = store.apply(WriteBatch(incoming=[[m]]), T)
    [again] = store.apply(WriteBatch(incoming=[[m]]), T + 10)
    [twice_in_one] = store.apply(WriteBatch(incoming=[[m, m]]), T + 20)
    assert first.committed == again.committed == [1]
    assert twice_in_one.committed == [1, 1]
    assert first.conflicts == again.conflicts == twice_in_one.conflicts == []
    assert store.execute_raw("SELECT COUNT(*), MIN(stored_at_ns) FROM messages") == [(1, T)]


def test_the_same_id_with_a_different_body_is_a_conflict_and_the_original_is_kept(
    store: Store,
) -> None:
    store.apply(WriteBatch(incoming=[[incoming(1, body="original")]]), T)
    forged = incoming(1, body="forged")
    retimed = Envelope(forged.id, 1, "bob", "alice", "original", T + 999, 1001)
    [result] = store.apply(WriteBatch(incoming=[[incoming(2), forged, retimed]]), T)
    assert result.committed == [2]
    assert result.conflicts == [1, 1]
    assert store.execute_raw("SELECT body FROM messages WHERE id = ?", (forged.id,)) == [
        ("original",)
    ]


def test_an_incoming_id_equal_to_an_outgoing_id_is_another_senders_message(store: Store) -> None:
    # Issue 16: ids are unique per sender. (Before, this was a conflict: a peer could block
    # our own ids, or another peer's, by sending them first.)
    mine = out(1)
    store.apply(WriteBatch(outgoing=[mine]), T)
    same_id = Envelope(mine.id, 1, "bob", "alice", mine.body, mine.sent_at_ns, mine.hlc)
    [result] = store.apply(WriteBatch(incoming=[[same_id]]), T)
    assert (result.committed, result.conflicts) == ([1], [])
    assert store.execute_raw("SELECT COUNT(*) FROM messages WHERE id = ?", (mine.id,)) == [(2,)]


def test_one_peer_cannot_preclaim_another_peers_ids(store: Store) -> None:
    claim = incoming(1, frm="carol", body="claim", msg_id="next-id-of-bob")
    real = incoming(7, frm="bob", body="bob's own", msg_id="next-id-of-bob")
    [claimed] = store.apply(WriteBatch(incoming=[[claim]]), T)
    [stored] = store.apply(WriteBatch(incoming=[[real]]), T + 1)
    assert (claimed.committed, stored.committed, stored.conflicts) == ([1], [7], [])
    # Within one sender, an id still means one message: a retransmission or a conflict.
    [again] = store.apply(WriteBatch(incoming=[[real]]), T + 2)
    forged = incoming(8, frm="bob", body="other", msg_id="next-id-of-bob")
    [conflict] = store.apply(WriteBatch(incoming=[[forged]]), T + 3)
    assert (again.committed, again.duplicates, conflict.conflicts) == ([7], [7], [8])


def test_a_version_5_store_migrates_to_per_sender_ids_keeping_rows_and_order(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "old"
    data_dir.mkdir()
    conn = sqlite3.connect(data_dir / DB_FILENAME, isolation_level=None)
    conn.create_function("mp_checksum", 7, content_checksum, deterministic=True)
    for migration in MIGRATIONS[:5]:
        for statement in migration.split(";"):
            if statement.strip():
                conn.execute(statement)
    conn.execute("PRAGMA user_version = 5")
    conn.execute("INSERT INTO meta VALUES ('node_id', 'abcd'), ('name', 'alice')")
    rows = [(9, "m1", "in", "bob", "bob", "alice", 1, "hi"),
            (4, "m2", "out", "bob", "alice", "bob", 1, "yo")]
    for rowid, mid, direction, peer, sender, recipient, seq, body in rows:
        conn.execute(
            "INSERT INTO messages (rowid, id, direction, peer, sender, recipient, seq, body,"
            " sent_at_ns, hlc, state, stored_at_ns, checksum) VALUES (?, ?, ?, ?, ?, ?, ?, ?,"
            " 1, 2, ?, 3, mp_checksum(?, ?, ?, ?, ?, 1, 2))",
            (rowid, mid, direction, peer, sender, recipient, seq, body,
             "received" if direction == "in" else "pending", mid, sender, recipient, seq, body))
    conn.close()
    store = Store.open(data_dir, name="alice")
    try:
        assert store.execute_raw("PRAGMA user_version") == [(SCHEMA_VERSION,)]
        assert store.execute_raw("SELECT m.rowid, m.id, v.state FROM messages AS m JOIN"
                                 " message_rows AS v ON v.id = m.id ORDER BY m.rowid") == [
            (4, "m2", "pending"), (9, "m1", "received")]
        # carol may now use bob's id; bob's own id is still his.
        [result] = store.apply(WriteBatch(incoming=[[incoming(5, frm="carol", msg_id="m1"),
                                                     incoming(1, frm="bob", body="x",
                                                              msg_id="m1")]]), T)
        assert result.conflicts == [1]
        assert store.execute_raw("SELECT COUNT(*) FROM messages WHERE id = 'm1'") == [(2,)]
    finally:
        store.close()


def test_results_come_back_per_incoming_group_in_order(store: Store) -> None:
    store.apply(WriteBatch(incoming=[[incoming(1, body="a")]]), T)
    results = store.apply(
        WriteBatch(
            incoming=[[incoming(2)], [incoming(1, body="b"), incoming(3)], [incoming(1, "carol")]]
        ),
        T,
    )
    assert [(r.committed, r.conflicts) for r in results] == [([2], []), ([3], [1]), ([1], [])]


def test_a_message_in_two_groups_of_one_transaction_is_new_in_the_first_only(
    store: Store,
) -> None:
    """A retransmission that arrived while its first copy waited for the commit: both
    copies in one transaction. Groups all of whose rows are new report no duplicate."""
    results = store.apply(
        WriteBatch(incoming=[[incoming(1), incoming(2)], [incoming(3)],
                             [incoming(2), incoming(4)], [incoming(5)]]),
        T,
    )
    assert [(r.committed, r.duplicates) for r in results] == [
        ([1, 2], []), ([3], []), ([2, 4], [2]), ([5], [])]
    fresh = store.apply(WriteBatch(incoming=[[incoming(6), incoming(7)], [incoming(8)]]), T + 1)
    assert [(r.committed, r.duplicates) for r in fresh] == [([6, 7], []), ([8], [])]
    assert store.execute_raw("SELECT COUNT(*) FROM messages") == [(8,)]


def test_the_extremes_of_64_bit_numbers_round_trip(store: Store) -> None:
    edge = Envelope("edge", 2**63 - 1, "bob", "alice", "b", -(2**63), 2**63 - 1)
    [result] = store.apply(WriteBatch(incoming=[[edge]]), T)
    assert result.committed == [2**63 - 1]
    with StoreReader(store.path) as reader:
        [row] = reader.history()
    assert (row.seq, row.sent_at_ns, row.hlc) == (2**63 - 1, -(2**63), 2**63 - 1)


# -- outgoing, deliveries, rejections ----------------------------------------------------------


def test_deliveries_update_only_pending_rows_in_range_for_that_peer(store: Store) -> None:
    store.apply(
        WriteBatch(outgoing=[out(s) for s in range(1, 7)] + [out(s, "carol") for s in (1, 2)]), T
    )
    store.apply(WriteBatch(rejections=[Rejection("bob", [3], "conflict: taken")]), T)
    store.apply(WriteBatch(deliveries=[Delivery("bob", [1, 2, 3, 4], receipt(stored_at=7), 8)]), T)
    assert states(store) == {
        1: "delivered", 2: "delivered", 3: "rejected", 4: "delivered", 5: "pending", 6: "pending"
    }
    assert states(store, "carol") == {1: "pending", 2: "pending"}
    rows = store.execute_raw(
        "SELECT receipt_stored_at_ns, receipt_received_at_ns, receipt_arrived_at_ns,"
        " receipt_sync, receipt_hlc FROM message_rows WHERE peer = 'bob' AND seq = 1"
    )
    assert rows == [(7, 2, 8, "full", 99)]
    # A second receipt for the same rows changes nothing.
    store.apply(WriteBatch(deliveries=[Delivery("bob", [1], receipt(stored_at=70), 80)]), T)
    assert store.execute_raw(
        "SELECT receipt_stored_at_ns FROM message_rows WHERE peer = 'bob' AND seq = 1"
    ) == [(7,)]
    assert store.execute_raw("SELECT reject_reason FROM messages WHERE seq = 3 AND peer = 'bob'") \
        == [("conflict: taken",)]


def test_deliveries_with_gaps_touch_only_the_listed_seqs(store: Store) -> None:
    store.apply(WriteBatch(outgoing=[out(s) for s in range(1, 11)]), T)
    store.apply(WriteBatch(deliveries=[Delivery("bob", [2, 3, 7, 9], receipt(), 1)]), T)
    assert sorted(s for s, state in states(store).items() if state == "delivered") == [2, 3, 7, 9]


def test_a_failed_batch_writes_nothing(store: Store) -> None:
    store.apply(WriteBatch(outgoing=[out(1)]), T)
    doomed = WriteBatch(outgoing=[out(2), out(1)], incoming=[[incoming(1)]])
    with pytest.raises(StoreError, match="UNIQUE"):
        store.apply(doomed, T)
    assert store.execute_raw("SELECT COUNT(*) FROM messages") == [(1,)]
    store.apply(WriteBatch(outgoing=[out(2)]), T)  # and the connection still works


def test_a_one_row_batch_is_one_statement_with_the_same_outcomes(store: Store) -> None:
    """Every send's commit on the receiver writes one row: it skips BEGIN/COMMIT (SQLite's
    autocommit) and must still report duplicates and conflicts, and fail cleanly."""
    statements: list[str] = []
    store._conn.set_trace_callback(statements.append)
    [first] = store.apply(WriteBatch(incoming=[[incoming(1)]]), T)
    [again] = store.apply(WriteBatch(incoming=[[incoming(1)]]), T + 10)
    [forged] = store.apply(WriteBatch(incoming=[[incoming(1, body="forged")]]), T + 20)
    assert store.apply(WriteBatch(outgoing=[out(1)]), T) == []
    with pytest.raises(StoreError, match="UNIQUE"):
        store.apply(WriteBatch(outgoing=[out(1, body="again")]), T)
    store._conn.set_trace_callback(None)
    assert not any(s.startswith(("BEGIN", "COMMIT")) for s in statements)
    assert (first.committed, first.duplicates) == ([1], [])
    assert (again.committed, again.duplicates, again.conflicts) == ([1], [1], [])
    assert (forged.committed, forged.conflicts) == ([], [1])
    assert not store._conn.in_transaction
    assert store.execute_raw("SELECT direction, body, stored_at_ns FROM messages ORDER BY rowid"
                             ) == [("in", "yo", T), ("out", "hi", T)]
    # A receipt of two ranges beside the row makes it two statements and more: one
    # transaction again. (A receipt of one range beside it is one statement:
    # test_a_message_and_one_receipt_range_are_one_statement_writing_both_rows.)
    statements.clear()
    store._conn.set_trace_callback(statements.append)
    store.apply(WriteBatch(outgoing=[out(2)],
                           deliveries=[Delivery("bob", [1, 3], receipt(), T)]), T)
    store._conn.set_trace_callback(None)
    assert statements[0] == "BEGIN IMMEDIATE" and statements[-1] == "COMMIT"


def test_a_message_and_one_receipt_range_are_one_statement_writing_both_rows(
    store: Store, tmp_path: Path,
) -> None:
    """A sender's commit in a one-at-a-time exchange (its message and the previous one's
    receipt) is one INSERT, no BEGIN/COMMIT, and writes what the general path writes."""
    other = Store.open(tmp_path / "other", name="alice", sync="normal")
    try:
        store.apply(WriteBatch(outgoing=[out(1), out(2)]), T)
        other.apply(WriteBatch(outgoing=[out(1), out(2)]), T)
        statements: list[str] = []
        store._conn.set_trace_callback(statements.append)
        for seq, settled in ((3, [1, 2]), (4, [3])):
            batch = WriteBatch(outgoing=[out(seq)],
                               deliveries=[Delivery("bob", settled, receipt(stored_at=seq), 9)])
            assert store.apply(batch, T + seq) == []
            # The same rows written apart: the row alone, then the record in a transaction.
            other.apply(WriteBatch(outgoing=batch.outgoing), T + seq)
            other.apply(WriteBatch(deliveries=batch.deliveries), T + seq)
        store._conn.set_trace_callback(None)
        # (SQLite traces the statement again for each part of its trigger.)
        assert all(s.startswith("INSERT INTO mp_send_and_record") for s in statements)
        assert len(set(statements)) == 2
        assert not store._conn.in_transaction
        assert states(store) == {1: "delivered", 2: "delivered", 3: "delivered", 4: "pending"}
        rows = "SELECT * FROM message_rows ORDER BY seq"
        receipts = "SELECT * FROM receipts ORDER BY last_seq"
        assert store.execute_raw(receipts) == [("bob", 2, 1, 3, 2, 9, "full", 99),
                                               ("bob", 3, 3, 4, 2, 9, "full", 99)]
        assert [r[1:] for r in store.execute_raw(rows)] == [
            r[1:] for r in other.execute_raw(rows)]
        assert_counts_match_the_view(store)
    finally:
        other.close()


def test_a_send_and_a_receipt_of_one_seq_from_its_peer_bind_each_value_once(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The one-at-a-time exchange's commit (a receipt of one seq from the message's own
    recipient) binds the shared values once (`_SEND_AND_RECORD_ONE`), and so does a lone
    row; either writes what the statement binding each column does."""
    # Marked, to tell in the trace (which shows values, not placeholders) which one ran.
    for name in ("_SEND_AND_RECORD_ONE", "_SEND_AND_RECORD"):
        monkeypatch.setattr(sqlite_module, name, f"/* {name} */ {getattr(sqlite_module, name)}")
    monkeypatch.setitem(sqlite_module._ONE_ROW, "in",
                        f"/* in */ {sqlite_module._ONE_ROW['in']}")
    other = Store.open(tmp_path / "other", name="alice", sync="normal")
    try:
        for s in (store, other):
            s.apply(WriteBatch(outgoing=[out(1), out(1, to="carol")]), T)
        statements: list[str] = []
        store._conn.set_trace_callback(statements.append)
        batches = [  # (batch, used the one-seq statement)
            (WriteBatch(outgoing=[out(2)], deliveries=[Delivery("bob", [1], receipt(), 9)]),
             True),
            # The receipt is another peer's: each column bound.
            (WriteBatch(outgoing=[out(3)], deliveries=[Delivery("carol", [1], receipt(), 9)]),
             False),
        ]
        for seq, (batch, one) in enumerate(batches, start=2):
            statements.clear()
            assert store.apply(batch, T + seq) == []
            assert statements[0].startswith("/* _SEND_AND_RECORD_ONE */" if one
                                            else "/* _SEND_AND_RECORD */")
            other.apply(WriteBatch(outgoing=batch.outgoing), T + seq)
            other.apply(WriteBatch(deliveries=batch.deliveries), T + seq)
        statements.clear()
        assert store.apply(WriteBatch(incoming=[[incoming(1)]]), T + 5)[0].committed == [1]
        assert [s[:10] for s in statements] == ["/* in */ I"]
        other.apply(WriteBatch(incoming=[[incoming(1)]], outgoing=[out(9)]), T + 5)
        store.apply(WriteBatch(outgoing=[out(9)]), T + 5)
        store._conn.set_trace_callback(None)
        for sql in ("SELECT * FROM message_rows ORDER BY direction, peer, seq",
                    "SELECT * FROM receipts ORDER BY peer, last_seq"):
            assert [r[1:] for r in store.execute_raw(sql)] == [
                r[1:] for r in other.execute_raw(sql)]
        assert states(store) == {1: "delivered", 2: "pending", 3: "pending", 9: "pending"}
        assert states(store, "carol") == {1: "delivered"}
    finally:
        other.close()


def test_a_message_and_its_receipt_range_fail_together_and_a_repeated_record_is_left_out(
    store: Store,
) -> None:
    store.apply(WriteBatch(outgoing=[out(1)]), T)
    with pytest.raises(StoreError, match="UNIQUE"):  # its message is refused: no record either
        store.apply(WriteBatch(outgoing=[out(1, body="again")],
                               deliveries=[Delivery("bob", [1], receipt(), 9)]), T)
    assert store.execute_raw("SELECT COUNT(*) FROM receipts") == [(0,)]
    assert not store._conn.in_transaction
    store.apply(WriteBatch(outgoing=[out(2)],
                           deliveries=[Delivery("bob", [1], receipt(stored_at=7), 9)]), T)
    store.apply(WriteBatch(outgoing=[out(3)],
                           deliveries=[Delivery("bob", [1], receipt(stored_at=70), 9)]), T)
    # The first receipt stands, as when it is recorded on its own.
    assert store.execute_raw("SELECT first_seq, last_seq, stored_at_ns FROM receipts") == [
        (1, 1, 7)]
    assert states(store) == {1: "delivered", 2: "pending", 3: "pending"}


def test_an_empty_batch_is_falsy_and_harmless(store: Store) -> None:
    assert not WriteBatch()
    assert WriteBatch(outgoing=[out(1)])
    assert store.apply(WriteBatch(), T) == []


# -- error translation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ("database is locked", StoreLocked),
        ("database table is locked", StoreLocked),
        ("database or disk is full", StoreFull),
        ("attempt to write a readonly database", DataDirNotWritable),
        ("database disk image is malformed", StoreCorrupt),
        ("file is not a database", StoreCorrupt),
        ("no such table: nope", StoreError),
    ],
)
def test_sqlite_errors_become_errors_a_user_can_act_on(
    tmp_path: Path, message: str, expected: type[StoreError]
) -> None:
    error = translate(sqlite3.OperationalError(message), tmp_path / DB_FILENAME)
    assert type(error) is expected
    assert str(tmp_path) in str(error)


def test_a_value_sqlite_cannot_bind_is_a_refused_row_not_a_store_condition(store: Store) -> None:
    """Until 2026-12-06 sqlite3's binding error was a plain `StoreError`, a store condition,
    so the writer retried the batch holding such a value for ever. It is about the row."""
    unbindable = Envelope("m1", 1, "alice", "bob", ["not", "text"], T, 1)  # type: ignore[arg-type]
    with pytest.raises(RowRefused, match="binding parameter"):
        store.apply(WriteBatch(outgoing=[unbindable]), T)
    with pytest.raises(RowRefused, match="binding parameter"):
        store.apply(WriteBatch(outgoing=[unbindable, unbindable]), T)
    # The connection itself being unusable is still about the store.
    assert type(translate(sqlite3.ProgrammingError("Cannot operate on a closed database."),
                          store.path)) is StoreError


def test_a_version_1_database_gets_content_checksums_when_migrated(data_dir: Path) -> None:
    data_dir.mkdir(parents=True)
    conn = sqlite3.connect(data_dir / DB_FILENAME, isolation_level=None)
    conn.executescript(MIGRATIONS[0] + "; PRAGMA user_version = 1;")
    conn.execute(
        "INSERT INTO messages (id, direction, peer, sender, recipient, seq, body, sent_at_ns,"
        " hlc, state, stored_at_ns) VALUES ('m1', 'in', 'bob', 'bob', 'alice', 1, 'old', 1, 2,"
        " 'received', 3)"
    )
    conn.close()
    store = Store.open(data_dir, name="alice")
    try:
        assert store.execute_raw("SELECT checksum FROM messages") == [
            (content_checksum("m1", "bob", "alice", 1, "old", 1, 2),)
        ]
    finally:
        store.close()


@settings(max_examples=200, deadline=None)
@given(body=st.text(min_size=1, max_size=3000), seq=st.integers(1, 2**63 - 1))
def test_row_checksums_are_the_standard_zlib_crc32_of_the_envelope(body: str, seq: int) -> None:
    # protocol.md defines the column as zlib's CRC-32 of the msgpack Envelope, and stores
    # written before the SIMD implementation carry those values: any other CRC breaks them.
    # (The seven-field array: a direct message's checksum did not change with headers.)
    m = Envelope(f"id-{seq}", seq, "alice", "bob", body, T + seq, seq)
    expected = zlib.crc32(msgspec.msgpack.encode(msgspec.structs.astuple(m)[:7]))
    assert envelope_checksum(m) == expected
    assert content_checksum(m.id, m.sender, m.recipient, m.seq, m.body, m.sent_at_ns,
                            m.hlc) == expected
    assert _row_values([m, m])[5::6] == [expected, expected]


@settings(max_examples=100, deadline=None)
@given(bodies=st.lists(st.text(min_size=1, max_size=70_000), min_size=1, max_size=6),
       stamps=st.integers(0, 2**63 - 1))
def test_row_checksums_stay_right_in_a_scratch_buffer_reused_across_rows_and_batches(
    bodies: list[str], stamps: int,
) -> None:
    """`_row_values` encodes every row into the one buffer its store keeps: rows of any
    length, longer or shorter than the one before (msgpack's str headers take 1, 2, 3 or 5
    bytes), in one batch or the next, each get their own envelope's checksum."""
    scratch = bytearray()
    for batch in (bodies, bodies[::-1]):
        rows = [Envelope(f"id-{i}", i + 1, "alice", "bob", body, stamps, stamps // (i + 1))
                for i, body in enumerate(batch)]
        values = _row_values(rows, scratch)
        assert values is not None
        assert values[5::6] == [envelope_checksum(m) for m in rows]


def test_row_values_take_one_links_direct_messages_only() -> None:
    """The bulk path builds the values of one link's direct messages in one pass; a row of
    another link or with a header anywhere sends the batch down the general path."""
    rows = [out(1), out(2), out(3)]
    assert _row_values(rows) is not None
    assert _row_values([*rows, out(4, "carol")]) is None
    assert _row_values([*rows, headed(out(4))]) is None
    assert _row_values([incoming(1), incoming(2, "carol")]) is None


def test_a_batch_mixing_links_and_headers_late_in_it_stores_every_row(store: Store) -> None:
    late = [out(1), out(2), out(3, "carol"), headed(out(4)), out(5)]
    store.apply(WriteBatch(outgoing=late), T)
    assert store.execute_raw(
        "SELECT peer, seq, kind FROM messages ORDER BY rowid") == [
        ("bob", 1, None), ("bob", 2, None), ("bob", 4, "task"), ("bob", 5, None),
        ("carol", 3, None)]


def test_a_store_whose_checksums_the_standard_zlib_wrote_opens(data_dir: Path) -> None:
    store = Store.open(data_dir, name="alice")
    store.close()
    m = out(1, body="written before zlib-ng")
    conn = sqlite3.connect(data_dir / DB_FILENAME, isolation_level=None)
    conn.execute(
        "INSERT INTO messages (id, direction, peer, sender, recipient, seq, body, sent_at_ns,"
        " hlc, state, stored_at_ns, checksum) VALUES (?, 'out', ?, ?, ?, ?, ?, ?, ?,"
        " 'pending', ?, ?)",
        (m.id, m.recipient, m.sender, m.recipient, m.seq, m.body, m.sent_at_ns, m.hlc, T,
         zlib.crc32(msgspec.msgpack.encode(msgspec.structs.astuple(m)[:7]))),
    )
    conn.close()
    store = Store.open(data_dir, name="alice")
    try:
        assert store.execute_raw("SELECT body FROM messages") == [("written before zlib-ng",)]
    finally:
        store.close()


def test_a_changed_message_body_is_caught_by_its_checksum_at_open(data_dir: Path) -> None:
    store = Store.open(data_dir, name="alice")
    store.apply(WriteBatch(outgoing=[out(1, body="the original text")]), T)
    store.close()
    # What a flipped bit inside the record does: the page stays well-formed, the text changes.
    conn = sqlite3.connect(data_dir / DB_FILENAME, isolation_level=None)
    conn.execute("UPDATE messages SET body = 'the originaL text'")
    conn.close()
    with pytest.raises(StoreCorrupt, match="fail their content checksum"):
        Store.open(data_dir, name="alice")


def test_a_retransmission_is_committed_again_and_reported_as_a_duplicate(store: Store) -> None:
    first = store.apply(WriteBatch(incoming=[[incoming(1), incoming(2)]]), T)
    again = store.apply(WriteBatch(incoming=[[incoming(2), incoming(3)]]), T + 1)
    assert (first[0].committed, first[0].duplicates) == ([1, 2], [])
    assert (again[0].committed, again[0].duplicates, again[0].conflicts) == ([2, 3], [2], [])


def test_a_retransmission_in_the_same_transaction_is_new_only_in_the_first_group(
    store: Store,
) -> None:
    # Two batches of one peer in one group commit, the second resending a message of the
    # first (it arrived while the first waited for the commit): acted on once, not twice.
    first, again = store.apply(WriteBatch(incoming=[[incoming(1), incoming(2)],
                                                    [incoming(2), incoming(3)]]), T)
    assert (first.committed, first.duplicates) == ([1, 2], [])
    assert (again.committed, again.duplicates, again.conflicts) == ([2, 3], [2], [])

# A wall clock that does not move between two commits (coarse, stepped back, a FakeClock):
# the replay is committed with the very timestamp of the first commit.


@pytest.mark.parametrize("size", [1, 2, 5, 2049])
def test_a_batch_replayed_at_the_same_timestamp_is_all_duplicates(store: Store, size: int) -> None:
    group = [incoming(seq) for seq in range(1, size + 1)]
    [first] = store.apply(WriteBatch(incoming=[group]), T)
    [again] = store.apply(WriteBatch(incoming=[group]), T)
    seqs = list(range(1, size + 1))
    assert (first.committed, first.duplicates) == (seqs, [])
    assert (again.committed, again.duplicates, again.conflicts) == (seqs, seqs, [])
    assert store.execute_raw("SELECT COUNT(*) FROM messages") == [(size,)]


def test_a_partial_replay_at_the_same_timestamp_tells_old_rows_from_new_ones(
    store: Store,
) -> None:
    # Rows before (and after) the replay's rows in the table, and another peer's in between.
    store.apply(WriteBatch(incoming=[[incoming(1), incoming(2)]]), T)
    store.apply(WriteBatch(incoming=[[incoming(1, frm="carol")]]), T)
    [again] = store.apply(WriteBatch(incoming=[[incoming(3), incoming(1), incoming(4),
                                                incoming(2), incoming(5)]]), T)
    assert (again.committed, again.duplicates, again.conflicts) == ([3, 1, 4, 2, 5], [1, 2], [])
    # With a pattern header too (those rows are inserted one statement each).
    task = [headed(incoming(6)), headed(incoming(7))]
    store.apply(WriteBatch(incoming=[task]), T)
    [mixed] = store.apply(WriteBatch(incoming=[[incoming(8), *task, headed(incoming(9))]]), T)
    assert (mixed.committed, mixed.duplicates) == ([8, 6, 7, 9], [6, 7])


def test_a_replay_in_a_later_transaction_is_a_duplicate_even_if_the_clock_went_back(
    store: Store,
) -> None:
    store.apply(WriteBatch(incoming=[[incoming(1)]]), T)
    again, fresh = store.apply(WriteBatch(incoming=[[incoming(1)], [incoming(2)]]), T - 10**9)
    assert (again.committed, again.duplicates, fresh.duplicates) == ([1], [1], [])


def test_a_message_repeated_in_one_group_is_new_in_its_first_copy_only(store: Store) -> None:
    """The same id twice in one group (same seq or another): stored once, new in its first
    copy, a duplicate in the later ones (receipted, told once); a later copy with other
    content is a conflict, and the first copy is what is stored."""
    m = incoming(1)
    same_under_seq_2 = Envelope(m.id, 2, m.sender, m.recipient, m.body, m.sent_at_ns, m.hlc)
    other_body = Envelope(m.id, 3, m.sender, m.recipient, "other", m.sent_at_ns, m.hlc)
    [result] = store.apply(WriteBatch(incoming=[[m, incoming(4), same_under_seq_2, m,
                                                 other_body]]), T)
    assert (result.committed, result.duplicates, result.conflicts) == ([1, 4, 2, 1], [2, 1], [3])
    assert store.execute_raw("SELECT seq, body FROM messages WHERE id = ?", (m.id,)) == [
        (1, "yo")]
    # Replayed whole at the same timestamp: every copy is a duplicate now.
    [again] = store.apply(WriteBatch(incoming=[[m, same_under_seq_2]]), T)
    assert (again.committed, again.duplicates) == ([1, 2], [1, 2])


@pytest.mark.parametrize("count", [1, 3, 7, 2048, 2049, 4096 + 5])
def test_batches_of_any_size_store_every_row_with_its_columns(store: Store, count: int) -> None:
    outgoing = [out(s, body=f"o{s}", hlc=10_000 + s) for s in range(1, count + 1)]
    arriving = [incoming(s, body=f"i{s}") for s in range(1, count + 1)]
    [result] = store.apply(WriteBatch(outgoing=outgoing, incoming=[arriving]), T)
    assert result.committed == list(range(1, count + 1))
    rows = store.execute_raw(
        "SELECT direction, peer, sender, recipient, seq, body, hlc, state, stored_at_ns,"
        " checksum FROM messages ORDER BY direction, seq"
    )
    assert len(rows) == 2 * count
    expected_in = [("in", "bob", "bob", "alice", m.seq, m.body, m.hlc, "received", T,
                    content_checksum(m.id, m.sender, m.recipient, m.seq, m.body, m.sent_at_ns,
                                     m.hlc)) for m in arriving]
    expected_out = [("out", "bob", "alice", "bob", m.seq, m.body, m.hlc, "pending", T,
                     content_checksum(m.id, m.sender, m.recipient, m.seq, m.body, m.sent_at_ns,
                                      m.hlc)) for m in outgoing]
    assert rows == expected_in + expected_out


def test_a_batch_of_interleaved_links_stores_each_row_with_its_own_link(store: Store) -> None:
    """Rows of one statement share their link's values, bound once: a batch that mixes links
    (a broadcast, several senders) must still give every row its own peer."""
    peers = ["bob", "carol", "dave"]
    outgoing = [out(s // 3 + 1, to=peers[s % 3], body=f"o{s}") for s in range(3 * 1400)]
    arriving = [incoming(s // 2 + 1, frm=peers[s % 2], body=f"i{s}") for s in range(2 * 1100)]
    [result] = store.apply(WriteBatch(outgoing=outgoing, incoming=[arriving]), T)
    assert sorted(result.committed) == sorted(m.seq for m in arriving)
    rows = store.execute_raw("SELECT id, direction, peer, sender, recipient, seq, body,"
                             " stored_at_ns, checksum FROM messages")
    expected = {(m.id, "out", m.recipient, m.sender, m.recipient, m.seq, m.body, T,
                 content_checksum(m.id, m.sender, m.recipient, m.seq, m.body, m.sent_at_ns,
                                  m.hlc)) for m in outgoing}
    expected |= {(m.id, "in", m.sender, m.sender, m.recipient, m.seq, m.body, T,
                  content_checksum(m.id, m.sender, m.recipient, m.seq, m.body, m.sent_at_ns,
                                   m.hlc)) for m in arriving}
    assert len(rows) == len(expected) and set(rows) == expected
    assert store.last_seqs() == dict.fromkeys(peers, 1400)


def test_bodies_with_nul_and_any_unicode_round_trip(store: Store) -> None:
    bodies = ["a\x00b", "\x00", "naïve ☃ 𝄞", "tab\tnew\nline", "\\u0000 is not NUL"]
    store.apply(WriteBatch(outgoing=[out(s, body=b) for s, b in enumerate(bodies, 1)],
                           incoming=[[incoming(s, body=b) for s, b in enumerate(bodies, 1)]]), T)
    got = store.execute_raw("SELECT direction, body FROM messages ORDER BY direction, seq")
    assert got == [("in", b) for b in bodies] + [("out", b) for b in bodies]


def test_rows_per_statement_fit_the_sqlite_variable_limit() -> None:
    from meshpost.store.sqlite import rows_per_statement

    assert rows_per_statement(32766) == 2048  # SQLite >= 3.32, capped
    assert rows_per_statement(999) == 128  # older builds: 4 + 768 values
    assert rows_per_statement(5) == 1


def write_old_outbox(data_dir: Path, *, version: int) -> None:
    """A store at schema `version` (2 or later) holding three messages to bob: 1 delivered
    (its receipt in its own columns, as before schema 4), 2 and 3 pending."""
    data_dir.mkdir(parents=True)
    conn = sqlite3.connect(data_dir / DB_FILENAME, isolation_level=None)
    conn.create_function("mp_checksum", 7, content_checksum, deterministic=True)
    conn.executescript("".join(MIGRATIONS[:version]) + f"; PRAGMA user_version = {version};")
    for seq, state in ((1, "delivered"), (2, "pending"), (3, "pending")):
        m = out(seq)
        conn.execute(
            "INSERT INTO messages (id, direction, peer, sender, recipient, seq, body, sent_at_ns,"
            " hlc, state, stored_at_ns, checksum, receipt_stored_at_ns, receipt_sync)"
            " VALUES (?, 'out', 'bob', 'alice', 'bob', ?, ?, ?, ?, ?, 1, ?, ?, ?)",
            (m.id, seq, m.body, m.sent_at_ns, m.hlc, state,
             content_checksum(m.id, m.sender, m.recipient, seq, m.body, m.sent_at_ns, m.hlc),
             *((5, "full") if state == "delivered" else (None, None))),
        )
    conn.close()


def open_migrated(data_dir: Path) -> tuple[Store, set[str]]:
    """Open (so migrate) an old store; the store, at the current version, and its indexes."""
    store = Store.open(data_dir, name="alice")
    assert store.execute_raw("PRAGMA user_version") == [(SCHEMA_VERSION,)]
    indexes = {r[0] for r in store.execute_raw(
        "SELECT name FROM sqlite_master WHERE type = 'index'")}
    return store, indexes


def test_a_version_2_database_loses_its_pending_index_and_keeps_its_outbox(
    data_dir: Path,
) -> None:
    write_old_outbox(data_dir, version=2)
    store, indexes = open_migrated(data_dir)
    try:
        assert "messages_pending" not in indexes
        assert [m.seq for m in store.load_pending("bob", 0, 10)] == [2, 3]
        assert store.pending_count() == store.pending_count("bob") == 2
    finally:
        store.close()


# -- receipts as ranges (schema 4) -------------------------------------------------------------


def test_a_receipt_is_one_row_per_range_whatever_its_length(store: Store) -> None:
    store.apply(WriteBatch(outgoing=[out(s) for s in range(1, 5001)]), T)
    store.apply(WriteBatch(deliveries=[
        Delivery("bob", list(range(1, 4097)), receipt(stored_at=7), 8),
        Delivery("bob", [4100, 4101, 4200], receipt(stored_at=9), 10),
    ]), T)
    assert store.execute_raw("SELECT peer, first_seq, last_seq FROM receipts ORDER BY last_seq") \
        == [("bob", 1, 4096), ("bob", 4100, 4101), ("bob", 4200, 4200)]
    delivered = {seq: at for seq, at in store.execute_raw(
        "SELECT seq, receipt_stored_at_ns FROM message_rows WHERE state = 'delivered'")}
    assert sorted(delivered) == [*range(1, 4097), 4100, 4101, 4200]
    assert delivered[1] == delivered[4096] == 7 and delivered[4200] == 9
    # The row itself is not rewritten: that is the point.
    assert store.execute_raw("SELECT DISTINCT state FROM messages") == [("pending",)]
    assert store.pending_count() == view_pending(store) == 5000 - 4099
    assert [m.seq for m in store.load_pending("bob", 0, 5)] == [4097, 4098, 4099, 4102, 4103]
    assert_counts_match_the_view(store)


def test_a_receipt_recorded_twice_keeps_the_first(store: Store) -> None:
    store.apply(WriteBatch(outgoing=[out(s) for s in range(1, 6)]), T)
    store.apply(WriteBatch(deliveries=[Delivery("bob", [2, 3, 4], receipt(stored_at=7), 8)]), T)
    for seqs in ([2, 3, 4], [3], [1, 2], [4, 5]):  # exact, inside, and overlapping either end
        store.apply(WriteBatch(deliveries=[Delivery("bob", seqs, receipt(stored_at=70), 80)]), T)
    assert store.execute_raw("SELECT first_seq, last_seq FROM receipts") == [(2, 4)]
    assert states(store) == {1: "pending", 2: "delivered", 3: "delivered", 4: "delivered",
                             5: "pending"}
    assert store.pending_count() == view_pending(store) == 2


def test_a_version_3_database_keeps_its_delivered_rows_and_records_new_receipts_as_ranges(
    data_dir: Path,
) -> None:
    write_old_outbox(data_dir, version=3)
    # A reader of this version on the store before any node migrated it reads the rows as
    # they are (no receipts table yet).
    with StoreReader.for_data_dir(data_dir) as reader:
        assert [(m.seq, m.state) for m in reader.history()] == [
            (1, "delivered"), (2, "pending"), (3, "pending")]
        assert reader.pending_count() == 2
    store = Store.open(data_dir, name="alice")
    try:
        assert store.execute_raw("PRAGMA user_version") == [(SCHEMA_VERSION,)]
        assert [m.seq for m in store.load_pending("bob", 0, 10)] == [2, 3]
        store.apply(WriteBatch(deliveries=[Delivery("bob", [2], receipt(stored_at=9), 10)]), T)
        assert store.pending_count() == view_pending(store) == 1
        assert [m.seq for m in store.load_pending("bob", 0, 10)] == [3]
    finally:
        store.close()
    with StoreReader.for_data_dir(data_dir) as reader:
        rows = {m.seq: m for m in reader.history()}
        assert reader.counts() == {"out/delivered": 2, "out/pending": 1}
        assert (rows[1].state, rows[1].receipt_stored_at_ns, rows[1].receipt_sync) == (
            "delivered", 5, "full")  # delivered under schema 3, in its own columns
        assert (rows[2].state, rows[2].receipt_stored_at_ns, rows[2].receipt_arrived_at_ns) == (
            "delivered", 9, 10)  # delivered under schema 4, through the receipts table
        assert rows[3].state == "pending" and rows[3].receipt_stored_at_ns is None


def test_a_version_4_database_loses_its_peer_hlc_index_and_still_reads_by_peer(
    data_dir: Path,
) -> None:
    write_old_outbox(data_dir, version=4)
    store, indexes = open_migrated(data_dir)
    try:
        assert "messages_peer_hlc" not in indexes
        assert {"messages_out_link", "messages_hlc"} <= indexes
        store.apply(WriteBatch(incoming=[[incoming(1, frm="carol")]]), T)
    finally:
        store.close()
    with StoreReader.for_data_dir(data_dir) as reader:
        assert [m.seq for m in reader.history(peer="bob")] == [1, 2, 3]  # causal order
        assert [m.peer for m in reader.history(peer="carol")] == ["carol"]
        assert reader.history(peer="dave") == []
        assert reader.peers() == ["bob", "carol"]


# -- WAL page estimate ------------------------------------------------------------------------


def empty_store_file(data_dir: Path, *, page_size: int) -> None:
    """An empty database file with `page_size` pages, as a store made before 8 KiB pages."""
    data_dir.mkdir()
    conn = sqlite3.connect(data_dir / DB_FILENAME)
    conn.execute(f"PRAGMA page_size = {page_size}")
    conn.execute("PRAGMA journal_mode = WAL")  # writes the header: the page size is set
    conn.close()


def test_a_new_store_has_8_kib_pages_and_an_older_one_keeps_its_own(data_dir: Path) -> None:
    store = Store.open(data_dir, name="alice")
    store.close()
    old_dir = data_dir.parent / "old"
    empty_store_file(old_dir, page_size=4096)
    old = Store.open(old_dir, name="alice")
    try:
        assert (store.page_size, old.page_size) == (PAGE_SIZE, 4096) == (8192, 4096)
        assert old.execute_raw("PRAGMA page_size") == [(4096,)]
        old.apply(WriteBatch(outgoing=[out(1)]), T)
        assert [m.seq for m in old.load_pending("bob", 0, 10)] == [1]
    finally:
        old.close()


@pytest.mark.parametrize("page_size", [4096, PAGE_SIZE])
def test_the_wal_page_estimate_follows_what_commits_really_append(
    data_dir: Path, page_size: int
) -> None:
    """`WriteBatch.wal_pages` drives the checkpoints: too high makes them (and their fsyncs)
    needlessly frequent, too low lets the WAL grow. Compared here with SQLite's own count,
    for new stores' pages and for the 4 KiB pages of stores made before 2026-12-03."""
    empty_store_file(data_dir, page_size=page_size)
    store = Store.open(data_dir, name="alice")
    assert store.page_size == page_size
    checkpointer = store.open_checkpointer()
    body = "x" * 100
    seq = in_seq = 0

    # Ids as nodes make them: 28 hex digits, time-ordered.
    def outgoing(n: int) -> list[Envelope]:
        nonlocal seq
        seq += n
        return [Envelope(f"a{s:027x}", s, "alice", "bob", body, T + s, s)
                for s in range(seq - n + 1, seq + 1)]

    def arriving(n: int) -> list[Envelope]:
        nonlocal in_seq
        in_seq += n
        return [Envelope(f"b{s:027x}", s, "bob", "alice", body, T + s, s)
                for s in range(in_seq - n + 1, in_seq + 1)]

    store.apply(WriteBatch(outgoing=outgoing(400)), T)  # rows for the deliveries below
    delivered = 0

    def delivery() -> WriteBatch:
        nonlocal delivered
        delivered += 1
        return WriteBatch(deliveries=[Delivery("bob", [delivered], receipt(), T)])

    shapes = {
        "one outgoing row": (100, lambda: WriteBatch(outgoing=outgoing(1))),
        "one incoming row": (100, lambda: WriteBatch(incoming=[arriving(1)])),
        "one delivery": (100, delivery),
        "512 outgoing rows": (10, lambda: WriteBatch(outgoing=outgoing(512))),
        "4,096 incoming rows": (4, lambda: WriteBatch(incoming=[arriving(4096)])),
        "rejections": (50, lambda: WriteBatch(rejections=[Rejection("bob", [seq], "no")],
                                               outgoing=outgoing(1))),
    }
    try:
        for shape, (commits, make) in shapes.items():
            checkpointer.checkpoint()
            store.apply(WriteBatch(outgoing=outgoing(1)), T)  # restarts the checkpointed WAL
            checkpointer.checkpoint()
            estimated = 0
            for _ in range(commits):
                batch = make()
                estimated += batch.wal_pages(page_size)
                store.apply(batch, T)
            actual = checkpointer.checkpoint()  # the first commit restarted the WAL
            assert 0.75 * actual <= estimated <= 1.33 * actual, (shape, estimated, actual)
    finally:
        checkpointer.close()
        store.close()


@given(st.integers(0, 3), st.lists(st.integers(0, 40), max_size=3), st.integers(0, 2),
       st.lists(st.integers(0, 30), max_size=3), st.integers(0, 30),
       st.sampled_from([4096, PAGE_SIZE]))
def test_the_wal_page_estimate_is_its_formula(
    outgoing: int, groups: list[int], deliveries: int, rejections: list[int], tasks: int,
    page_size: int,
) -> None:
    """`wal_pages` tests each kind before summing it (it runs at every commit): the same
    figure as the formula it stands for, whatever the batch holds."""
    m = Envelope("a" * 28, 1, "alice", "bob", "x", T, 1)
    batch = WriteBatch(
        outgoing=[m] * outgoing, incoming=[[m] * n for n in groups],
        deliveries=[Delivery("bob", [1], receipt(), T)] * deliveries,
        rejections=[Rejection("bob", list(range(n)), "no") for n in rejections],
        tasks=[NewTask(f"t{i}", "q", "b", "s", T) for i in range(tasks)])
    inserted = outgoing + sum(groups)
    assert batch.wal_pages(page_size) == (
        inserted * 4096 // (12 * page_size)
        + (4 if outgoing else 0) + (3 if groups else 0) + (1 if deliveries else 0)
        + sum(1 + n // 12 for n in rejections) + (1 + tasks // 12 if tasks else 0))


# -- pattern headers (schema 7) -----------------------------------------------------------------

TASK_HEADER = PatternHeader(Kind.TASK, "task-1", "upper", "carol", 30_000, 1)


def headed(m: Envelope, header: PatternHeader = TASK_HEADER) -> Envelope:
    return Envelope(*msgspec.structs.astuple(m)[:7], header)


def test_a_version_6_store_migrates_to_7_and_keeps_its_rows_and_checksums(
    data_dir: Path,
) -> None:
    data_dir.mkdir(parents=True)
    conn = sqlite3.connect(data_dir / DB_FILENAME, isolation_level=None)
    conn.create_function("mp_checksum", 7, content_checksum, deterministic=True)
    for version, script in enumerate(MIGRATIONS[:6], start=1):
        conn.executescript(f"{script}; PRAGMA user_version = {version};")
    m = incoming(1)
    conn.execute(
        "INSERT INTO messages (id, direction, peer, sender, recipient, seq, body, sent_at_ns,"
        " hlc, state, stored_at_ns, checksum) VALUES (?, 'in', ?, ?, ?, ?, ?, ?, ?,"
        " 'received', 3, ?)",
        (m.id, m.sender, m.sender, m.recipient, m.seq, m.body, m.sent_at_ns, m.hlc,
         zlib.crc32(msgspec.msgpack.encode(msgspec.structs.astuple(m)[:7]))),
    )
    conn.close()
    with StoreReader.for_data_dir(data_dir) as reader:  # a reader of the old schema
        [old] = reader.history()
        assert (old.id, old.kind, old.ref) == (m.id, None, None)
    store = Store.open(data_dir, name="alice")  # the checksums pass, or this raises
    try:
        assert store.execute_raw("PRAGMA user_version") == [(SCHEMA_VERSION,)]
        tables = {r[0] for r in store.execute_raw("SELECT name FROM sqlite_master")}
        assert {"tasks", "task_results", "members", "messages_ref"} <= tables
        assert store.execute_raw("SELECT kind, ref, queue, header FROM messages") == [
            (None, None, None, None)]
    finally:
        store.close()
    with StoreReader.for_data_dir(data_dir) as reader:
        [row] = reader.history()
        assert (row.id, row.body, row.kind, row.ref) == (m.id, m.body, None, None)


class SevenFieldServe(msgspec.Struct, array_like=True, frozen=True):
    """A `serve` header as a node from before `prefetch` encoded it (seven fields)."""

    kind: str
    ref: str = ""
    queue: str = ""
    sink: str = ""
    lease_ms: int = 0
    attempt: int = 0
    version: int = 0


def test_a_version_7_store_migrates_to_8_and_its_serve_records_state_no_prefetch(
    data_dir: Path,
) -> None:
    """A worker's `serve` record stored at schema 7 (its header as seven fields, its
    `members` row without prefetch): after the migration the checksums pass, the record
    states no prefetch (the ventilator's default), and the worker's retransmission of that
    message, whose header now decodes with an eighth field, is a duplicate, not a conflict
    (the stored header bytes differ from today's encoding of the same header)."""
    data_dir.mkdir(parents=True)
    conn = sqlite3.connect(data_dir / DB_FILENAME, isolation_level=None)
    conn.create_function("mp_checksum", 7, content_checksum, deterministic=True)
    for version, script in enumerate(MIGRATIONS[:7], start=1):
        conn.executescript(f"{script}; PRAGMA user_version = {version};")
    m = incoming(1, body="serve")
    blob = msgspec.msgpack.encode(SevenFieldServe("serve", "", "work", version=5))
    conn.execute(
        "INSERT INTO messages (id, direction, peer, sender, recipient, seq, body, sent_at_ns,"
        " hlc, state, stored_at_ns, checksum, kind, ref, queue, header) VALUES"
        " (?, 'in', ?, ?, ?, ?, ?, ?, ?, 'received', 3, ?, 'serve', NULL, 'work', ?)",
        (m.id, m.sender, m.sender, m.recipient, m.seq, m.body, m.sent_at_ns, m.hlc,
         content_checksum(m.id, m.sender, m.recipient, m.seq, m.body, m.sent_at_ns, m.hlc,
                          blob), blob))
    conn.execute("INSERT INTO members (namespace, name, member, joined, version, hlc)"
                 " VALUES ('queue', 'work', ?, 1, 5, ?)", (m.sender, m.hlc))
    conn.close()
    store = Store.open(data_dir, name="alice")  # the checksums pass, or this raises
    try:
        assert store.execute_raw("PRAGMA user_version") == [(8,)]
        assert store.members("queue") == [("work", m.sender, True, 5, None)]
        header = msgspec.msgpack.decode(blob, type=PatternHeader)
        assert header.prefetch is None and msgspec.msgpack.encode(header) != blob
        [again] = store.apply(WriteBatch(incoming=[[headed(m, header)]]), T)
        assert (again.committed, again.duplicates, again.conflicts) == ([1], [1], [])
        # A newer record of the worker brings its prefetch.
        newer = Envelope("in-bob-2", 2, m.sender, m.recipient, "serve", T, m.hlc + 1,
                         PatternHeader(Kind.SERVE, "", "work", version=6, prefetch=64))
        store.apply(WriteBatch(incoming=[[newer]]), T)
        assert store.members("queue") == [("work", m.sender, True, 6, 64)]
    finally:
        store.close()


def test_headed_rows_keep_their_header_through_the_outbox_and_history(store: Store) -> None:
    batch = [out(1), headed(out(2)), headed(out(3), PatternHeader(Kind.REPLY, "req-9")), out(4)]
    store.apply(WriteBatch(outgoing=batch), T)
    assert store.load_pending("bob", 0, 10) == batch
    assert store.execute_raw(
        "SELECT seq, kind, ref, queue FROM messages ORDER BY rowid") == [
        (1, None, None, None), (2, "task", "task-1", "upper"), (3, "reply", "req-9", None),
        (4, None, None, None)]
    with StoreReader(store.path) as reader:
        assert [(r.kind, r.ref) for r in reader.history()] == [
            (None, None), ("task", "task-1"), ("reply", "req-9"), (None, None)]


def test_a_headed_incoming_message_is_stored_once_and_its_header_is_part_of_its_content(
    store: Store,
) -> None:
    m = headed(incoming(1))
    [first] = store.apply(WriteBatch(incoming=[[m]]), T)
    [again] = store.apply(WriteBatch(incoming=[[m]]), T + 1)
    assert (first.committed, again.committed, again.duplicates) == ([1], [1], [1])
    # The same id with another header is not a retransmission.
    other = headed(incoming(1), PatternHeader(Kind.REPLY, "req-1"))
    [clash] = store.apply(WriteBatch(incoming=[[other]]), T + 2)
    assert (clash.committed, clash.conflicts) == ([], [1])
    assert store.execute_raw("SELECT COUNT(*) FROM messages") == [(1,)]


def test_a_headed_row_checksum_chains_the_header_after_the_seven_fields(
    data_dir: Path,
) -> None:
    m = headed(out(1))
    seven = msgspec.msgpack.encode(msgspec.structs.astuple(m)[:7])
    header = msgspec.msgpack.encode(TASK_HEADER)
    assert envelope_checksum(m) == zlib.crc32(header, zlib.crc32(seven))
    store = Store.open(data_dir, name="alice")
    store.apply(WriteBatch(outgoing=[m]), T)
    store.close()
    Store.open(data_dir, name="alice").close()  # valid as written
    conn = sqlite3.connect(data_dir / DB_FILENAME, isolation_level=None)
    # A flipped header (attempt 1 -> 2) is caught like a flipped body.
    conn.execute("UPDATE messages SET header = ?",
                 (msgspec.msgpack.encode(PatternHeader(Kind.TASK, "task-1", "upper", "carol",
                                                       30_000, 2)),))
    conn.close()
    with pytest.raises(StoreCorrupt, match="checksum"):
        Store.open(data_dir, name="alice")


def test_group_member_records_keep_the_highest_rank_and_survive_reopening(
    data_dir: Path,
) -> None:
    from meshpost.protocol.groups import MemberRecord

    store = Store.open(data_dir, name="alice")
    try:
        assert store.save_member(MemberRecord("team", "bob", True, 5, 50))
        assert not store.save_member(MemberRecord("team", "bob", True, 4, 40))  # older
        assert store.save_member(MemberRecord("team", "bob", False, 5, 51))  # leave wins a tie
        assert not store.save_member(MemberRecord("team", "bob", True, 5, 52))
        assert store.save_member(MemberRecord("ops", "alice", True, 1, 10))
    finally:
        store.close()
    store = Store.open(data_dir, name="alice")
    try:
        assert store.member_records() == [MemberRecord("ops", "alice", True, 1, 10),
                                          MemberRecord("team", "bob", False, 5, 51)]
    finally:
        store.close()

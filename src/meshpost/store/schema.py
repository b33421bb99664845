"""The database schema and its migrations, numbered from day one.

Rule: `PRAGMA user_version` holds the schema version; `MIGRATIONS[i]` takes a database from
version i to i + 1 inside the caller's transaction. Never edit a released migration; append.
"""

from __future__ import annotations

MIGRATIONS: tuple[str, ...] = (
    # 0 -> 1: messages in both directions, metadata.
    """
    CREATE TABLE meta (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    ) WITHOUT ROWID;

    CREATE TABLE messages (
        id              TEXT    NOT NULL PRIMARY KEY,
        direction       TEXT    NOT NULL CHECK (direction IN ('out', 'in')),
        peer            TEXT    NOT NULL,
        sender          TEXT    NOT NULL,
        recipient       TEXT    NOT NULL,
        seq             INTEGER NOT NULL,
        body            TEXT    NOT NULL,
        sent_at_ns      INTEGER NOT NULL,
        hlc             INTEGER NOT NULL,
        state           TEXT    NOT NULL
                        CHECK (state IN ('pending', 'delivered', 'rejected', 'received')),
        stored_at_ns    INTEGER NOT NULL,
        receipt_stored_at_ns   INTEGER,
        receipt_received_at_ns INTEGER,
        receipt_arrived_at_ns  INTEGER,
        receipt_sync    TEXT,
        receipt_hlc     INTEGER,
        reject_reason   TEXT
    );

    CREATE UNIQUE INDEX messages_out_link ON messages (peer, seq) WHERE direction = 'out';
    CREATE INDEX messages_pending ON messages (peer, seq) WHERE state = 'pending';
    CREATE INDEX messages_peer_hlc ON messages (peer, hlc);
    CREATE INDEX messages_hlc ON messages (hlc);
    """,
    # 1 -> 2: a CRC-32 of each row's content, so a bit flip that leaves SQLite's page
    # structure intact (PRAGMA quick_check passes) is still caught at start-up.
    # `mp_checksum` is registered on the writer's connection (store/sqlite.py).
    """
    ALTER TABLE messages ADD COLUMN checksum INTEGER;
    UPDATE messages SET checksum = mp_checksum(id, sender, recipient, seq, body, sent_at_ns, hlc);
    """,
    # 2 -> 3: no index of pending rows. Keeping it cost every outgoing message an index
    # insert and its delivery an index delete: 19% of the sender's store instructions
    # (callgrind, 20,480 rows). The outbox is read through messages_out_link (peer, seq)
    # instead, above the highest seq already loaded, where rows are pending anyway.
    """
    DROP INDEX messages_pending;
    """,
)

SCHEMA_VERSION = len(MIGRATIONS)

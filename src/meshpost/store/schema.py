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
    # 3 -> 4: deliveries as receipt ranges. Marking each delivered row rewrote it: 3-4.5 us a
    # message, a third of the sender's store time (benchmarks/store_rows.py). A receipt now
    # adds one row per contiguous range of seqs it settles, whatever the range's length.
    # `message_rows` is the messages table as readers see it: an outgoing row that a receipt
    # covers is 'delivered', with that receipt's times. (Rows delivered before this migration
    # carry their receipt in their own columns, and keep it.) The ranges of one peer never
    # overlap, so the covering range, if any, is the one with the lowest last_seq >= seq.
    """
    CREATE TABLE receipts (
        peer            TEXT    NOT NULL,
        last_seq        INTEGER NOT NULL,
        first_seq       INTEGER NOT NULL,
        stored_at_ns    INTEGER NOT NULL,
        received_at_ns  INTEGER NOT NULL,
        arrived_at_ns   INTEGER NOT NULL,
        sync            TEXT    NOT NULL,
        hlc             INTEGER NOT NULL,
        PRIMARY KEY (peer, last_seq),
        CHECK (first_seq BETWEEN 1 AND last_seq)
    ) WITHOUT ROWID;

    CREATE VIEW message_rows AS
    SELECT m.id, m.direction, m.peer, m.sender, m.recipient, m.seq, m.body, m.sent_at_ns, m.hlc,
           CASE WHEN r.peer IS NULL THEN m.state ELSE 'delivered' END AS state,
           m.stored_at_ns,
           COALESCE(r.stored_at_ns, m.receipt_stored_at_ns) AS receipt_stored_at_ns,
           COALESCE(r.received_at_ns, m.receipt_received_at_ns) AS receipt_received_at_ns,
           COALESCE(r.arrived_at_ns, m.receipt_arrived_at_ns) AS receipt_arrived_at_ns,
           COALESCE(r.sync, m.receipt_sync) AS receipt_sync,
           COALESCE(r.hlc, m.receipt_hlc) AS receipt_hlc,
           m.reject_reason, m.checksum
    FROM messages AS m
    LEFT JOIN receipts AS r
        ON m.direction = 'out' AND m.state = 'pending' AND r.peer = m.peer
        AND r.last_seq = (SELECT MIN(c.last_seq) FROM receipts AS c
                          WHERE c.peer = m.peer AND c.last_seq >= m.seq)
        AND r.first_seq <= m.seq;
    """,
    # 4 -> 5: no (peer, hlc) index. Every message in both directions paid an insert into it,
    # 7-8% of each side's store instructions (callgrind, benchmarks/store_rows.py: sender
    # 26,958 -> 25,011 a row, receiver 24,677 -> 22,695) and a WAL page in every one-row
    # commit (5.4 -> 4.3), which is on every send's critical path. Its readers were
    # `history --peer` and the list of peers, which now walk messages_hlc (or the table) and
    # filter. On a 1M-row store: the last 100 with a busy peer 0.4 ms as before; with a peer
    # that has 1 in 1,000 messages 21 ms (was 0.6); with no messages, or all 1,000 of the rare
    # peer's, a full scan of 0.2 s (was under 7 ms). Reads are rare and off the node's loop.
    """
    DROP INDEX messages_peer_hlc;
    """,
    # 5 -> 6: an id is unique per sender, not across the store (issue 16). With ids unique
    # store-wide, C could send B messages carrying A's next ids and have A's own messages
    # rejected as conflicts. SQLite cannot drop a PRIMARY KEY: the table is rebuilt with
    # UNIQUE (sender, id), rowids kept (storage order), its indexes and view made again.
    """
    DROP VIEW message_rows;
    CREATE TABLE messages_new (
        id              TEXT    NOT NULL,
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
        reject_reason   TEXT,
        checksum        INTEGER,
        UNIQUE (sender, id)
    );
    INSERT INTO messages_new (rowid, id, direction, peer, sender, recipient, seq, body,
        sent_at_ns, hlc, state, stored_at_ns, receipt_stored_at_ns, receipt_received_at_ns,
        receipt_arrived_at_ns, receipt_sync, receipt_hlc, reject_reason, checksum)
    SELECT rowid, id, direction, peer, sender, recipient, seq, body,
        sent_at_ns, hlc, state, stored_at_ns, receipt_stored_at_ns, receipt_received_at_ns,
        receipt_arrived_at_ns, receipt_sync, receipt_hlc, reject_reason, checksum
    FROM messages;
    DROP TABLE messages;
    ALTER TABLE messages_new RENAME TO messages;
    CREATE UNIQUE INDEX messages_out_link ON messages (peer, seq) WHERE direction = 'out';
    CREATE INDEX messages_hlc ON messages (hlc);
    CREATE VIEW message_rows AS
    SELECT m.id, m.direction, m.peer, m.sender, m.recipient, m.seq, m.body, m.sent_at_ns, m.hlc,
           CASE WHEN r.peer IS NULL THEN m.state ELSE 'delivered' END AS state,
           m.stored_at_ns,
           COALESCE(r.stored_at_ns, m.receipt_stored_at_ns) AS receipt_stored_at_ns,
           COALESCE(r.received_at_ns, m.receipt_received_at_ns) AS receipt_received_at_ns,
           COALESCE(r.arrived_at_ns, m.receipt_arrived_at_ns) AS receipt_arrived_at_ns,
           COALESCE(r.sync, m.receipt_sync) AS receipt_sync,
           COALESCE(r.hlc, m.receipt_hlc) AS receipt_hlc,
           m.reject_reason, m.checksum
    FROM messages AS m
    LEFT JOIN receipts AS r
        ON m.direction = 'out' AND m.state = 'pending' AND r.peer = m.peer
        AND r.last_seq = (SELECT MIN(c.last_seq) FROM receipts AS c
                          WHERE c.peer = m.peer AND c.last_seq >= m.seq)
        AND r.first_seq <= m.seq;
    """,
    # 6 -> 7: pattern headers (issue 18, docs/protocol.md "Patterns"). The header's kind, ref
    # and queue as columns (NULL for a direct message, so old rows and direct messages are
    # unchanged; adding a NULL column rewrites nothing), the whole header as msgpack. The
    # partial index holds pattern messages only: a direct message pays no index insert. Then
    # the patterns' durable state: a ventilator's tasks, a sink's one result per task, and
    # the winning membership record per (namespace, name, member).
    """
    DROP VIEW message_rows;
    ALTER TABLE messages ADD COLUMN kind TEXT;
    ALTER TABLE messages ADD COLUMN ref TEXT;
    ALTER TABLE messages ADD COLUMN queue TEXT;
    ALTER TABLE messages ADD COLUMN header BLOB;
    CREATE INDEX messages_ref ON messages (ref, kind) WHERE ref IS NOT NULL;
    CREATE TABLE tasks (
        task_id          TEXT    NOT NULL PRIMARY KEY,
        queue            TEXT    NOT NULL,
        body             TEXT    NOT NULL,
        sink             TEXT    NOT NULL,
        state            TEXT    NOT NULL
                         CHECK (state IN ('queued', 'assigned', 'done', 'abandoned')),
        attempts         INTEGER NOT NULL DEFAULT 0,
        worker           TEXT,
        submitted_at_ns  INTEGER NOT NULL,
        finished_at_ns   INTEGER,
        finished_by      TEXT
    ) WITHOUT ROWID;
    CREATE INDEX tasks_unfinished ON tasks (queue) WHERE state IN ('queued', 'assigned');
    CREATE TABLE task_results (
        task_id      TEXT    NOT NULL PRIMARY KEY,
        queue        TEXT    NOT NULL,
        message_id   TEXT    NOT NULL,
        worker       TEXT    NOT NULL,
        stored_at_ns INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE members (
        namespace TEXT    NOT NULL CHECK (namespace IN ('group', 'queue')),
        name      TEXT    NOT NULL,
        member    TEXT    NOT NULL,
        joined    INTEGER NOT NULL CHECK (joined IN (0, 1)),
        version   INTEGER NOT NULL,
        hlc       INTEGER NOT NULL,
        PRIMARY KEY (namespace, name, member)
    ) WITHOUT ROWID;
    CREATE VIEW message_rows AS
    SELECT m.id, m.direction, m.peer, m.sender, m.recipient, m.seq, m.body, m.sent_at_ns, m.hlc,
           CASE WHEN r.peer IS NULL THEN m.state ELSE 'delivered' END AS state,
           m.stored_at_ns,
           COALESCE(r.stored_at_ns, m.receipt_stored_at_ns) AS receipt_stored_at_ns,
           COALESCE(r.received_at_ns, m.receipt_received_at_ns) AS receipt_received_at_ns,
           COALESCE(r.arrived_at_ns, m.receipt_arrived_at_ns) AS receipt_arrived_at_ns,
           COALESCE(r.sync, m.receipt_sync) AS receipt_sync,
           COALESCE(r.hlc, m.receipt_hlc) AS receipt_hlc,
           m.reject_reason, m.checksum, m.kind, m.ref, m.queue, m.header
    FROM messages AS m
    LEFT JOIN receipts AS r
        ON m.direction = 'out' AND m.state = 'pending' AND r.peer = m.peer
        AND r.last_seq = (SELECT MIN(c.last_seq) FROM receipts AS c
                          WHERE c.peer = m.peer AND c.last_seq >= m.seq)
        AND r.first_seq <= m.seq;
    """,
    # 7 -> 8: a worker's prefetch (docs/protocol.md 19.4): how many unfinished tasks it takes
    # at once, as its latest `serve` record announced it (the header's `prefetch`, as sent:
    # the ventilator caps it when it uses it). NULL: not stated (every row before this, every
    # group record, a worker of an older version): the ventilator's default. Kept with the
    # record so that a ventilator's restart keeps it; adding a NULL column rewrites nothing.
    """
    ALTER TABLE members ADD COLUMN prefetch INTEGER;
    """,
)

SCHEMA_VERSION = len(MIGRATIONS)

"""Durable storage: SQLite in WAL mode, schema migrations, group commit."""

from meshpost.store.connection import DB_FILENAME
from meshpost.store.patterns import NewTask, QueueCounts, StoredBroadcast
from meshpost.store.reader import StoredMessage, StoreReader
from meshpost.store.sqlite import Delivery, IncomingResult, Rejection, Store, WriteBatch
from meshpost.store.verifier import Verifier
from meshpost.store.writer import GroupCommitWriter

__all__ = [
    "DB_FILENAME",
    "Delivery",
    "GroupCommitWriter",
    "IncomingResult",
    "NewTask",
    "QueueCounts",
    "Rejection",
    "Store",
    "StoreReader",
    "StoredBroadcast",
    "StoredMessage",
    "Verifier",
    "WriteBatch",
]

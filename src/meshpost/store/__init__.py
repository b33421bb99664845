"""Durable storage: SQLite in WAL mode, schema migrations, group commit."""

from typing import TYPE_CHECKING

from meshpost.lazy import lazy_exports

# The names below are imported on first use (module `__getattr__`, as in `meshpost`): a
# `meshpost` command that only talks to a running node (peers, send, group...) needs a few
# records from here, not SQLite and the writer.
if TYPE_CHECKING:
    from meshpost.store.connection import DB_FILENAME
    from meshpost.store.patterns import NewTask, QueueCounts, StoredBroadcast
    from meshpost.store.reader import StoredMessage, StoreReader
    from meshpost.store.sqlite import Delivery, IncomingResult, Rejection, Store, WriteBatch
    from meshpost.store.verifier import Verifier
    from meshpost.store.writer import GroupCommitWriter

#: Public name -> the module that defines it (add a name here, above and to `__all__`).
_EXPORTS: dict[str, str] = {
    "DB_FILENAME": "meshpost.store.connection",
    "Delivery": "meshpost.store.sqlite",
    "GroupCommitWriter": "meshpost.store.writer",
    "IncomingResult": "meshpost.store.sqlite",
    "NewTask": "meshpost.store.patterns",
    "QueueCounts": "meshpost.store.patterns",
    "Rejection": "meshpost.store.sqlite",
    "Store": "meshpost.store.sqlite",
    "StoreReader": "meshpost.store.reader",
    "StoredBroadcast": "meshpost.store.patterns",
    "StoredMessage": "meshpost.store.reader",
    "Verifier": "meshpost.store.verifier",
    "WriteBatch": "meshpost.store.sqlite",
}


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)


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

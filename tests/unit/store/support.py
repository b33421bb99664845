"""What the store's unit tests share: messages to write, a receipt, and reads of the
`message_rows` view to check the store's own counts against."""

from __future__ import annotations

from meshpost.protocol import Envelope, ReceiptFrame
from meshpost.store import Store, StoreReader

T = 1_700_000_000_000_000_000


def out(seq: int, to: str = "bob", body: str = "hi", hlc: int | None = None) -> Envelope:
    return Envelope(f"out-{to}-{seq}", seq, "alice", to, body, T + seq, seq if hlc is None else hlc)


def incoming(seq: int, frm: str = "bob", body: str = "yo", msg_id: str | None = None) -> Envelope:
    return Envelope(msg_id or f"in-{frm}-{seq}", seq, frm, "alice", body, T + seq, 1000 + seq)


def receipt(stored_at: int = 5, sync: str = "full") -> ReceiptFrame:
    return ReceiptFrame([(0, 0)], 1, 2, stored_at, 4, 99, sync)


def states(store: Store, peer: str = "bob") -> dict[int, str]:
    rows = store.execute_raw(
        "SELECT seq, state FROM message_rows WHERE direction = 'out' AND peer = ?", (peer,)
    )
    return dict(rows)


def assert_counts_match_the_view(store: Store) -> None:
    with StoreReader(store.path) as reader:
        assert reader.counts() == {f"{d}/{s}": n for d, s, n in store.execute_raw(
            "SELECT direction, state, COUNT(*) FROM message_rows GROUP BY direction, state")}


def view_pending(store: Store, peer: str | None = None) -> int:
    """Pending outgoing rows counted one by one through `message_rows` (the slow, exact way)."""
    where = " AND peer = ?" if peer else ""
    [(count,)] = store.execute_raw(
        "SELECT COUNT(*) FROM message_rows WHERE direction = 'out' AND state = 'pending'"
        + where, (peer,) if peer else ())
    return int(count)

"""Cross-check the stores of a whole mesh: every message stored once on both ends.

Rule: read-only. It opens each node's database with `StoreReader` and compares what senders
recorded with what receivers committed; it trusts no node's opinion of itself.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Collection, Mapping
from pathlib import Path

from meshpost.store import StoredMessage, StoreReader


@dataclasses.dataclass
class VerifyReport:
    """Counts over all messages of a mesh. `ok` means nothing was lost, doubled or altered."""

    sent: int = 0
    delivered: int = 0
    pending: int = 0
    rejected: int = 0
    received: int = 0
    #: Marked delivered at the sender but absent at the receiver.
    lost: int = 0
    #: Stored twice at a receiver (same sender and seq under two ids).
    duplicated: int = 0
    #: Stored at a receiver but never recorded by its sender.
    phantom: int = 0
    #: Both copies exist but body, sender time or HLC differ.
    mismatched: int = 0
    #: Receipt claims a commit time earlier than the message's arrival.
    receipt_before_arrival: int = 0
    per_node: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    problems: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicated or self.phantom or self.mismatched
                    or self.receipt_before_arrival)

    def summary(self) -> str:
        return (
            f"sent={self.sent} delivered={self.delivered} pending={self.pending} "
            f"rejected={self.rejected} received={self.received} lost={self.lost} "
            f"duplicated={self.duplicated} phantom={self.phantom} mismatched={self.mismatched}"
        )


def load_rows(data_dir: Path) -> list[StoredMessage]:
    with StoreReader.for_data_dir(data_dir) as reader:
        # Unchecked: an altered row is a mismatch to count here, not an error to stop at.
        return reader.history(check=False)


def verify_stores(
    data_dirs: Mapping[str, Path],
    *,
    max_problems: int = 20,
    ignore_senders: Collection[str] = (),
) -> VerifyReport:
    """Compare every node's outbox with every receiver's inbox.

    `ignore_senders` names connections that are not nodes of the mesh (a test's raw, hostile
    peers): what they managed to get stored is theirs to count, not a mesh inconsistency.
    """
    rows = {name: load_rows(path) for name, path in data_dirs.items()}
    report = VerifyReport()

    def problem(text: str) -> None:
        if len(report.problems) < max_problems:
            report.problems.append(text)

    inbox: dict[str, dict[str, StoredMessage]] = {}
    for name, messages in rows.items():
        incoming = [m for m in messages
                    if m.direction == "in" and m.sender not in ignore_senders]
        inbox[name] = {m.id: m for m in incoming}
        report.received += len(incoming)
        per_link = Counter((m.sender, m.seq) for m in incoming)
        for (sender, seq), n in per_link.items():
            if n > 1:
                report.duplicated += n - 1
                problem(f"{sender}->{name} seq {seq}: stored {n} times under different ids")
        report.per_node[name] = {"in": len(incoming), "out": 0, "delivered": 0}
    outbox_ids: dict[str, set[str]] = {name: set() for name in rows}

    for name, messages in rows.items():
        for m in messages:
            if m.direction != "out":
                continue
            report.sent += 1
            report.per_node[name]["out"] += 1
            outbox_ids.setdefault(m.recipient, set()).add(m.id)
            copy = inbox.get(m.recipient, {}).get(m.id)
            if m.state == "delivered":
                report.delivered += 1
                report.per_node[name]["delivered"] += 1
                if copy is None and m.recipient in inbox:
                    report.lost += 1
                    problem(f"{m.id} {name}->{m.recipient}: receipted but not stored")
            elif m.state == "pending":
                report.pending += 1
            elif m.state == "rejected":
                report.rejected += 1
            if copy is not None:
                if (copy.body, copy.sent_at_ns, copy.hlc, copy.sender) != (
                    m.body, m.sent_at_ns, m.hlc, m.sender
                ):
                    report.mismatched += 1
                    problem(f"{m.id} {name}->{m.recipient}: copies differ")
                if (
                    m.state == "delivered"
                    and m.receipt_stored_at_ns is not None
                    and m.receipt_received_at_ns is not None
                    and m.receipt_stored_at_ns < m.receipt_received_at_ns
                ):
                    report.receipt_before_arrival += 1
                    problem(f"{m.id}: receipt time precedes arrival")
    for name, by_id in inbox.items():
        for mid, m in by_id.items():
            if m.sender in rows and mid not in outbox_ids.get(name, set()):
                report.phantom += 1
                problem(f"{mid} {m.sender}->{name}: stored but never sent")
    return report

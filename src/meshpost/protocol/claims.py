"""Who a keyless name is, as far as this node checked itself (docs/protocol.md 6.2.1): per known
peer, the node id its configured endpoint last answered as, whether that endpoint is being
asked, and the connections refused as claims to that name, to welcome if it answers as theirs.

Rule: never what a claimant says; only what the node's own link to the name's endpoint heard
(`answered`), or that it heard nothing in time (`unanswered`). Sans-IO, as the listener that
consults it: the node performs the check (node/claims.py). Bounded: one entry per known peer,
MAX_CLAIMANTS_PER_NAME claimants each.
"""

from __future__ import annotations

import dataclasses

from meshpost.protocol.events import ClaimCheckWanted

__all__ = ["CLAIMANT_KEPT_NS", "CLAIM_CHECK_INTERVAL_NS", "MAX_CLAIMANTS_PER_NAME", "ClaimBook"]

#: Without a key, a refused claim asks the name's configured endpoint who it is
#: (`ClaimCheckWanted`: one Ping or Hello on this node's own link) at most once per name per
#: this long, however many Hellos come: a stranger's Hellos cost at most that exchange. The
#: endpoint's answer also counts: within this long of it, a Hello of another node id is
#: refused without asking again. A check not settled within this long is taken as lost (the
#: node settles each within `CLAIM_CHECK_TIMEOUT_S`, node/claims.py, which is shorter).
CLAIM_CHECK_INTERVAL_NS = 5_000_000_000
#: Connections refused under one name as claims, kept to be welcomed if the name's endpoint
#: answers as their node id (a check's answer, or a Welcome to this node's own link); past it
#: the oldest is forgotten (its dialer's next Hello is then judged by the answer). Bounds what
#: Hellos under many node ids make this node keep.
MAX_CLAIMANTS_PER_NAME = 4
#: A claimant is welcomed by an answer at most this long after its refusal: a refused dialer
#: says Hello again every 10 s (`dialer.REFUSED_RETRY_S`), so an older one has either been
#: kept again by that Hello or is gone.
CLAIMANT_KEPT_NS = 10_000_000_000


@dataclasses.dataclass(slots=True)
class _Claim:
    """What this node knows of who one keyless name is."""

    #: The node id the endpoint last answered as (None: unknown, or it stopped answering).
    node_id: str | None = None
    answered_ns: int | None = None
    #: When the endpoint was last asked (`ClaimCheckWanted`), and whether that check is
    #: still open (neither `answered` nor `unanswered` since).
    asked_ns: int | None = None
    asking: bool = False
    #: Connections refused as claims, by connection: the node id their Hello said, and when.
    claimants: dict[str, tuple[str, int]] = dataclasses.field(default_factory=dict)


def _recent(since_ns: int | None, wall_ns: int, within_ns: int) -> bool:
    # A wall clock that went back makes nothing recent: a check is asked rather than never.
    return since_ns is not None and 0 <= wall_ns - since_ns < within_ns


class ClaimBook:
    """The listener's knowledge of who its peers' keyless names are (one `_Claim` a name)."""

    def __init__(self) -> None:
        self._claims: dict[str, _Claim] = {}

    def known(self, name: str) -> str | None:
        """The node id `name`'s configured endpoint last answered as, if it did (and has not
        failed a check since)."""
        claim = self._claims.get(name)
        return claim.node_id if claim is not None else None

    def refused(self, name: str, connection: str, node_id: str,
                wall_ns: int) -> tuple[bool, ClaimCheckWanted | None]:
        """A Hello as `name` with `node_id` on `connection` was refused as a claim: keep the
        connection, to welcome if the endpoint answers as `node_id`. Returns whether a check
        is open, and the check to ask for now (`ClaimCheckWanted`), unless one was asked, or
        answered, within CLAIM_CHECK_INTERVAL_NS."""
        claim = self._claims.setdefault(name, _Claim())
        if claim.asking and not _recent(claim.asked_ns, wall_ns, CLAIM_CHECK_INTERVAL_NS):
            claim.asking = False  # never settled: taken as lost
        claim.claimants.pop(connection, None)
        claim.claimants[connection] = (node_id, wall_ns)  # the latest last
        while len(claim.claimants) > MAX_CLAIMANTS_PER_NAME:
            del claim.claimants[next(iter(claim.claimants))]
        if claim.asking:
            return True, None
        if (_recent(claim.asked_ns, wall_ns, CLAIM_CHECK_INTERVAL_NS)
                or _recent(claim.answered_ns, wall_ns, CLAIM_CHECK_INTERVAL_NS)):
            return False, None
        claim.asking, claim.asked_ns = True, wall_ns
        return True, ClaimCheckWanted(name, node_id, claim.node_id)

    def answered(self, name: str, node_id: str, wall_ns: int) -> tuple[bool, list[str]]:
        """`name`'s endpoint answered, at `wall_ns`, as `node_id`: that is who `name` is from
        now on. Returns whether a check was open, and the connections refused as `node_id`
        within CLAIMANT_KEPT_NS (the claimants are forgotten: each is welcomed or not now)."""
        claim = self._claims.setdefault(name, _Claim())
        claim.node_id, claim.answered_ns = node_id, wall_ns
        asked, claimants = claim.asking, claim.claimants
        claim.asking, claim.claimants = False, {}
        return asked, [connection for connection, (claimed, refused_ns) in claimants.items()
                       if claimed == node_id
                       and _recent(refused_ns, wall_ns, CLAIMANT_KEPT_NS)]

    def unanswered(self, name: str) -> int | None:
        """The open check of `name` went unanswered: what the endpoint answered before is
        forgotten (a restarted peer must not stay locked out by it) and so are the claimants.
        Returns how many claimants were refused meanwhile; None if no check was open."""
        claim = self._claims.get(name)
        if claim is None or not claim.asking:
            return None
        refused = len(claim.claimants)
        claim.node_id = claim.answered_ns = None
        claim.asking, claim.claimants = False, {}
        return refused

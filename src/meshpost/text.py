"""How meshpost shows things to a person: clocks, echo lines, peers/history/stats tables.

Rule: pure functions of their arguments (text in, text out), shared by the console, the CLI and
the demo, so each thing is shown one way everywhere. Imports rich only: `meshpost send` and
`meshpost peers` use this module without loading prompt_toolkit.
"""

from __future__ import annotations

import dataclasses
import datetime
import io
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table
from rich.text import Text

from meshpost.errors import describe_error

if TYPE_CHECKING:
    from meshpost.node import (
        GroupHistory,
        NodeStats,
        Outgoing,
        PeerChanged,
        PeerProbe,
        PeerStatus,
        Receipt,
    )
    from meshpost.protocol import Envelope
    from meshpost.protocol.groups import BroadcastStatus
    from meshpost.protocol.workqueue import QueueStatus
    from meshpost.store import StoredMessage

#: Rendered tables are never narrower than this, whatever the terminal reports (below it a
#: clock column alone would wrap).
MIN_WIDTH = 40
#: Width used when the output cannot tell its size (a pipe, a file).
DEFAULT_WIDTH = 100
#: Bodies in echo lines and table cells are cut to this many characters (with `…`); the full
#: text stays in the store (`/history -v`, `meshpost history --json`).
SHORT_BODY_CHARS = 60
#: Characters of a message id shown to name it: the tail of the id is its per-process counter,
#: so consecutive messages differ there.
SHORT_ID_CHARS = 6

#: Control characters a peer could use to rewrite the terminal; shown escaped instead.
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def clean(text: str) -> str:
    """`text` safe to print: control and bidi-override characters shown as escapes."""
    return _UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def shorten(text: str, limit: int = SHORT_BODY_CHARS) -> str:
    """`text` on one line and at most `limit` characters (`…` marks a cut), made safe."""
    one_line = " ".join(text.split())
    if len(one_line) > limit:
        one_line = one_line[: max(limit - 1, 1)].rstrip() + "…"
    return clean(one_line)


def short_id(message_id: str) -> str:
    """`#1a2b3c`: enough of a message id to tell it from its neighbours."""
    return f"#{message_id[-SHORT_ID_CHARS:]}"


def format_clock(ns: int, *, tz: datetime.tzinfo | None = None, date: bool = False) -> str:
    """`HH:MM:SS.mmm` (with `date`, `YYYY-MM-DD ` first) of ns since the epoch, in `tz`."""
    seconds, rem = divmod(ns, 1_000_000_000)
    try:
        moment = datetime.datetime.fromtimestamp(seconds, tz)
    except (OverflowError, OSError, ValueError):
        return f"<{ns} ns>"
    shown = moment.strftime("%Y-%m-%d %H:%M:%S" if date else "%H:%M:%S")
    return f"{shown}.{rem // 1_000_000:03d}"


def format_time(ns: int | None, *, tz: datetime.tzinfo | None = None) -> str:
    """Date and time of `ns`, or `-` when there is none (CLI tables)."""
    return "-" if ns is None else format_clock(ns, tz=tz, date=True)


def _ms(ns: int) -> str:
    return f"{ns / 1e6:.1f} ms"


def _indent(body: str) -> str:
    return clean(body).replace("\n", "\n    ")


def format_incoming(message: Envelope | StoredMessage, *,
                    tz: datetime.tzinfo | None = None) -> str:
    """`[HH:MM:SS.mmm sender-clock] A → me: text`; the whole text, since it is the message.
    A copy of a message to a group or to all says so: `A → team`, `A → all`; a pattern
    message says its kind first, as the history table does: `B → me: (reply) pong`."""
    stamp = format_clock(message.sent_at_ns, tz=tz)
    header = getattr(message, "header", None)
    kind = header.kind if header is not None else getattr(message, "kind", None)
    to = "me"
    if header is not None and header.kind == "group":
        to = clean(header.queue) if header.queue else "all"
    # A `serve`, a `done` or a reply is not text someone typed to this node: it says what it is.
    label = f"({clean(str(kind))}) " if kind is not None and kind != "group" else ""
    return (f"[{stamp} sender-clock] {clean(message.sender)} → {to}: "
            f"{label}{_indent(message.body)}")


def format_fetched_history(history: GroupHistory, *,
                           tz: datetime.tzinfo | None = None) -> list[str]:
    """Lines for `/history G --ask` and `meshpost history --group G --ask`: each fetched
    message `[HH:MM:SS.mmm sender-clock] B → team (earlier): text`, oldest first (by HLC),
    labelled with the member that answered for it; then who answered and who did not."""
    group = clean(history.group)
    lines = [f"[{format_clock(m.sent_at_ns, tz=tz)} sender-clock] {clean(m.sender)} → {group} "
             f"(earlier): {_indent(m.body)}" for m in history.messages]
    if not history.messages:
        lines.append(f"no earlier messages to {group} from its members")
    asked = len(history.answered) + len(history.unanswered)
    if not asked:
        lines.append(f"{group} has no other member to ask")
        return lines
    answered = ", ".join(clean(m) for m in history.answered) or "nobody"
    lines.append(f"answered: {answered} ({len(history.answered)}/{asked})")
    for member, why in sorted(history.unanswered.items()):
        # Only a request still waiting can get a later reply (a refusal is its reply).
        waiting = why in ("not-delivered", "delivered-unanswered")
        lines.append(f"no answer from {clean(member)}: {clean(why)}" + (
            " (a later reply is stored and linked to its request)" if waiting else ""))
    return lines


def format_pending(me: str, handles: Sequence[Outgoing]) -> str:
    """`… A → B: text (pending)`: stored in the outbox, no receipt yet (long text shortened)."""
    if not handles:
        return "… nobody to send to"
    to = ", ".join(h.to for h in handles)
    return f"… {me} → {to}: {shorten(handles[0].body)} (pending)"


def format_receipt(
    receipt: Receipt, *, body: str | None = None, tz: datetime.tzinfo | None = None
) -> str:
    """`✓ delivered to B at <receiver clock> (<ms> after sending) #id "first words"`."""
    at = format_clock(receipt.delivered_at_ns, tz=tz)
    took = receipt.recorded_at_ns - receipt.sent_at_ns
    what = short_id(receipt.message_id)
    if body is not None:
        what += f" {shorten(body, SHORT_BODY_CHARS // 2)!r}"
    return (f"✓ delivered to {receipt.to} at {at} {receipt.to}-clock "
            f"({_ms(took)} after sending) {what}")


def format_broadcast(status: BroadcastStatus) -> str:
    """`delivered 2/3 (pending: C)`: how far one message to many has got, the members
    still pending named (they keep their copy and are retried until they receipt)."""
    text = f"delivered {len(status.delivered)}/{status.total}"
    notes = []
    if status.pending:
        notes.append("pending: " + ", ".join(clean(m) for m in status.pending))
    if status.rejected:
        notes.append("rejected by " + ", ".join(f"{clean(m)} ({clean(why)})"
                                               for m, why in status.rejected))
    return text + (f" ({'; '.join(notes)})" if notes else "")


def format_queued(peer: str, *, waited_s: float | None = None) -> str:
    """`… queued, B unreachable`: the message waits in the outbox and is delivered later."""
    why = "not connected" if waited_s is None else f"no receipt within {waited_s:g}s"
    return f"… queued, {peer} unreachable ({why}); it will be delivered when {peer} is back"


def format_refused_by(peer: str, refusal: str) -> str:
    """`✗ B refuses us: ...`: B answered our handshake with a refusal; the message is kept."""
    return (f"✗ {peer} refuses us: {clean(refusal)}; the message stays in the outbox until "
            f"{peer} accepts this node")


def format_refused_peer(who: str, detail: str) -> str:
    """`✗ refused a connection from 'C': ...` (a receiver's side of a refusal)."""
    return f"✗ refused a connection from {clean(who)!r}: {clean(detail)}"


def format_failure(exc: BaseException) -> str:
    """`✗ reason` for an error the user should see."""
    return f"✗ {describe_error(exc)}"


def format_peer_change(event: PeerChanged) -> str:
    """One line for a peer that connected, went silent or refused us."""
    # Whoever holds a PeerChanged has loaded the node module already: this import is free.
    from meshpost.node import PeerChange

    match event.kind:
        case PeerChange.CONNECTED:
            return f"● {event.peer} connected"
        case PeerChange.JOINED:
            return f"+ {event.peer} joined {clean(event.reason)}"
        case PeerChange.REFUSED:
            return f"✗ {event.peer} {clean(event.detail)}"
        case PeerChange.LEFT:
            return f"○ {event.peer} left ({clean(event.reason)})"
        case _:
            return f"○ {event.peer} lost ({clean(event.reason)})"


def render(renderable: Table, width: int) -> str:
    """`renderable` as plain text lines of at most `width` (>= MIN_WIDTH) columns."""
    out = io.StringIO()
    console = Console(
        file=out, width=max(width, MIN_WIDTH), color_system=None, force_terminal=False,
        force_jupyter=False, force_interactive=False, markup=False, emoji=False,
        highlight=False, legacy_windows=False, no_color=True,
    )
    console.print(renderable)
    return "\n".join(line.rstrip() for line in out.getvalue().rstrip("\n").splitlines())


def _ago(now_ns: int, then_ns: int | None) -> str:
    if then_ns is None:
        return "never"
    seconds = max(now_ns - then_ns, 0) / 1e9
    if seconds < 60:
        return f"{seconds:.1f}s ago"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def peer_state(peer: PeerStatus) -> str:
    """`connected`, `idle` (no connection: nothing to send lately; "last seen" says when it
    was last heard), `refused (why)` or `unreachable (link state)`."""
    if peer.connected:
        return "connected"
    if peer.state == "idle":
        return "idle"
    if peer.refusal:
        return f"refused ({peer.refusal})"
    return f"unreachable ({peer.state})"


def render_peers_table(
    peers: Sequence[PeerStatus], *, now_ns: int, width: int = DEFAULT_WIDTH,
    title: str = "peers",
) -> str:
    """The peers table (`/peers`, `meshpost peers`); `now_ns` (our wall clock) dates
    "last seen"."""
    if not peers:
        return "no peers configured"
    table = Table(title=title, title_justify="left")
    for column in ("peer", "endpoint", "state", "last seen"):
        table.add_column(column, overflow="fold")
    for column in ("rtt ms", "offset ms", "unacked"):
        table.add_column(column, justify="right", overflow="fold")
    for p in peers:
        table.add_row(
            # How a peer was found shows when it was not configured (a LAN beacon).
            Text(p.name), Text(p.endpoint if p.found == "config" else f"{p.endpoint} ({p.found})"),
            Text(clean(peer_state(p))),
            Text(_ago(now_ns, p.last_seen_ns)),
            Text("-" if p.rtt_ns is None else f"{p.rtt_ns / 1e6:.2f}"),
            Text("-" if p.offset_ns is None else f"{p.offset_ns / 1e6:+.2f}"),
            Text(str(p.unacknowledged)),
        )
    return render(table, width)


def render_probes(probes: Sequence[PeerProbe], *, width: int = DEFAULT_WIDTH,
                  title: str = "probe") -> str:
    """What `meshpost peers --probe` (and `/peers --probe`) found: each peer live (with the
    round trip of its answer), lost or refused, and its link's state after the probe."""
    if not probes:
        return "no peers configured"
    table = Table(title=title, title_justify="left")
    for column in ("peer", "result", "rtt ms", "state", "detail"):
        table.add_column(column, overflow="fold", justify="right" if column == "rtt ms"
                         else "left")
    for p in probes:
        table.add_row(Text(p.name), Text(clean(p.result)),
                      Text("-" if p.rtt_ns is None else f"{p.rtt_ns / 1e6:.2f}"),
                      Text(clean(_LINK_STATE_WORDS.get(p.state, p.state))),
                      Text(clean(p.detail or "")))
    return render(table, width)


#: A link state said as the peers table says it (`ready` there is `connected`): the probe
#: table beside it said `ready` for the peer the peers table called `connected`.
_LINK_STATE_WORDS = {"ready": "connected"}


def _history_state(row: StoredMessage, tz: datetime.tzinfo | None) -> str:
    match row.direction, row.state:
        case "out", "delivered" if row.receipt_stored_at_ns is not None:
            return f"✓ {format_clock(row.receipt_stored_at_ns, tz=tz)} {row.peer}-clock"
        case "out", "rejected":
            return f"✗ rejected: {clean(row.reject_reason or '')}"
        case "out", "pending":
            return "… pending"
        case "in", "received":
            return "received"
        case _:
            return clean(row.state)


def render_history(
    rows: Sequence[StoredMessage], *, me: str, tz: datetime.tzinfo | None = None,
    width: int = DEFAULT_WIDTH, verbose: bool = False, title: str | None = None,
    statuses: Sequence[BroadcastStatus | None] | None = None, group: str | None = None,
) -> str:
    """The history table: sender clock, local stored clock, direction, body, state. Bodies are
    shortened unless `verbose` (then whole, wrapped, with their full ids); a pattern message's
    body follows its kind in parentheses (`(request) ping`, `(serve) serve`). For a `group`'s
    history, routes name the group and `statuses` (one per row) give this node's own
    messages their `delivered k/n`."""
    if not rows:
        return "no messages yet" if group is None else f"no messages to {clean(group)} here"
    table = Table(title=title or f"history of {me} (oldest first)", title_justify="left")
    table.add_column("sent (sender clock)", overflow="fold")
    table.add_column("stored (local)", overflow="fold")
    table.add_column("route", overflow="fold")
    table.add_column("message", overflow="fold", ratio=1)
    table.add_column("state", overflow="fold")
    # A pattern message (a request, a task, a worker's `serve`...) says what it is, so that
    # `serve` or `done` rows are not read as text someone typed; in a group's own history
    # every row is a group message, so that one kind goes unsaid there.
    group_kind = "group" if group is not None else None
    day = ""
    for index, row in enumerate(rows):
        stored_day = format_clock(row.stored_at_ns, tz=tz, date=True).partition(" ")[0]
        if stored_day != day:
            day = stored_day
            table.add_row(Text(day, style="bold"), "", "", "", "")
        to = clean(group) if group is not None else None
        if row.direction == "in":
            route = f"{clean(row.sender)} → {to or 'me'}"
        else:
            route = f"me → {to or clean(row.recipient)}"
        body = f"{clean(row.body)} ({row.id})" if verbose else shorten(row.body)
        if row.kind is not None and row.kind != group_kind:
            body = f"({clean(row.kind)}) {body}"
        status = statuses[index] if statuses is not None else None
        state = format_broadcast(status) if status is not None else _history_state(row, tz)
        table.add_row(
            Text(format_clock(row.sent_at_ns, tz=tz)), Text(format_clock(row.stored_at_ns, tz=tz)),
            Text(route), Text(body), Text(state),
        )
    return render(table, width)


def render_queues(queues: Sequence[QueueStatus]) -> str:
    """`/queue`, `meshpost queue status`: per queue a line of workers (tasks in flight each,
    of the most it is given at once, its prefetch; `*` live, `?` suspect: a lease of its
    expired) and a line of task counts."""
    if not queues:
        return "no work queues known here (none submitted to, served, or announced)"
    lines = []
    for q in queues:
        workers = ", ".join(
            f"{clean(w.name)}{'*' if w.live else ''}{'?' if w.suspect else ''} "
            f"({w.in_flight}/{w.prefetch})"
            for w in q.workers) or "none"
        lines.append(f"{clean(q.queue)}: workers {workers}")
        lines.append(f"  waiting {q.waiting} · in flight {q.in_flight} (leased {q.leased})"
                     f" · done {q.done} · redelivered {q.redelivered}"
                     f" · abandoned {q.abandoned} · results kept {q.results}")
    return "\n".join([*lines, "(* live, ? suspect: a lease expired; tasks in flight/prefetch "
                              "per worker)"])


def render_stats(stats: NodeStats) -> str:
    """`/stats`: one `name value` line per counter, after the store's retrying if it is."""
    fields = dataclasses.fields(stats)
    pad = max(len(f.name) for f in fields)

    def value(name: str) -> str:
        v = getattr(stats, name)
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    lines = [f"{f.name:<{pad}}  {value(f.name)}" for f in fields]
    retry = format_store_retry(stats)
    return "\n".join([retry, *lines] if retry else lines)


def render_counters(title: str, counters: Mapping[str, object]) -> str:
    """A role's counters (`meshpost peers`): `title`, then `  name value` a line."""
    if not counters:
        return title
    pad = max(len(str(name)) for name in counters)
    return "\n".join([title, *(f"  {clean(str(name)):<{pad}}  {clean(str(value))}"
                                for name, value in counters.items())])


def format_store_retry(stats: NodeStats) -> str | None:
    """`store: writes failing for S s (N attempts), next try in D s: kind: message`, while the
    node's writer retries after store errors (nothing is stored or receipted meanwhile);
    None while writes commit."""
    n = stats.store_retry_attempts
    if not n:
        return None
    return (f"store: writes failing for {stats.store_retry_for_s:.1f} s ({n} attempt"
            f"{'' if n == 1 else 's'}), next try in {stats.store_retry_delay_s:.2f} s; nothing "
            f"new is stored or receipted until one commits: {clean(stats.store_retry_error)}")


def terminal_width() -> int:
    """Columns of the terminal on stdout, or DEFAULT_WIDTH when it is not a terminal."""
    import shutil

    return shutil.get_terminal_size((DEFAULT_WIDTH, 24)).columns


__all__ = [
    "DEFAULT_WIDTH",
    "MIN_WIDTH",
    "SHORT_BODY_CHARS",
    "clean",
    "describe_error",
    "format_clock",
    "format_failure",
    "format_fetched_history",
    "format_incoming",
    "format_peer_change",
    "format_pending",
    "format_queued",
    "format_receipt",
    "format_refused_by",
    "format_refused_peer",
    "format_store_retry",
    "format_time",
    "peer_state",
    "render",
    "render_counters",
    "render_history",
    "render_peers_table",
    "render_queues",
    "render_stats",
    "short_id",
    "shorten",
    "terminal_width",
]

"""`meshpost history` (a node's stored messages, read from its store, running or not) and
`tail` (its incoming messages as they arrive, over the control socket). `history_record` is the
one `history --json` schema; `tail --json` prints the same records."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from typing import TYPE_CHECKING, Any

from meshpost.cli.common import DATA_HELP, NODE_HELP, data_dir
from meshpost.errors import EXIT_OK, ConfigError

if TYPE_CHECKING:
    from meshpost.cli.common import Subcommands

HISTORY_FIELDS = (
    "id", "from", "to", "body", "sent_at_ns", "hlc", "direction", "state", "stored_at_ns",
    "delivered_at_ns", "receipt_received_at_ns", "receipt_recorded_at_ns", "receipt_sync",
    "kind", "ref",
)


def history_record(m: Any) -> dict[str, Any]:
    """One message as the stable `history --json` schema (see README)."""
    return {
        "id": m.id,
        "from": m.sender,
        "to": m.recipient,
        "body": m.body,
        "sent_at_ns": m.sent_at_ns,
        "hlc": m.hlc,
        "direction": m.direction,
        "state": m.state,
        "stored_at_ns": m.stored_at_ns,
        "delivered_at_ns": m.receipt_stored_at_ns,
        "receipt_received_at_ns": m.receipt_received_at_ns,
        "receipt_recorded_at_ns": m.receipt_arrived_at_ns,
        "receipt_sync": m.receipt_sync,
        "kind": getattr(m, "kind", None),
        "ref": getattr(m, "ref", None),
    }


def cmd_history(args: argparse.Namespace) -> int:
    from meshpost.store import StoreReader

    if args.n is not None and args.n < 1:
        raise ConfigError(f"-n wants a whole number of messages, 1 or more, not {args.n}")

    if args.peer and args.group:
        raise ConfigError("--peer and --group: give one (a group's messages come from all)")
    if args.ask:
        return _ask_group_history(args)
    statuses = None
    with StoreReader.for_data_dir(data_dir(args)) as reader:
        if args.group:  # ours once each, with delivered k/n from their copies' receipts
            shown = reader.group_history(args.group, limit=args.n)
            rows, statuses = [row for row, _ in shown], [status for _, status in shown]
        else:
            rows = reader.history(peer=args.peer, limit=args.n)
        known = reader.peers() if args.peer and not rows else []
    if args.peer and not rows:
        # Not an error (a script may ask about any peer, and --json prints []), but a
        # mistyped name should not look like an empty conversation.
        others = ", ".join(known) or "none"
        print(f"meshpost history: no messages with {args.peer!r} in {args.node}'s store "
              f"(peers it has messages with: {others})", file=sys.stderr)
    records = [history_record(m) for m in rows]
    if args.json:
        json.dump(records, sys.stdout, ensure_ascii=False, indent=1)
        print()
    elif args.csv:
        writer = csv.DictWriter(sys.stdout, fieldnames=HISTORY_FIELDS)
        writer.writeheader()
        if sys.stdout.isatty():
            # On a terminal a body could rewrite the screen (ESC, BEL, bidi overrides): show
            # them escaped, as the table does. Files and pipes get the bytes as stored.
            from meshpost.text import clean

            records = [{k: clean(v) if isinstance(v, str) else v for k, v in r.items()}
                       for r in records]
        writer.writerows(records)
    else:
        from meshpost.text import render_history, terminal_width

        title = f"history of {args.node}" + (f" with {args.peer}" if args.peer else
                                             f" to {args.group}" if args.group else "")
        # Bodies are whatever a peer sent: plain text, never markup, control characters
        # escaped (as in the console), shortened unless -v.
        print(render_history(rows, me=args.node, width=terminal_width(), verbose=args.verbose,
                             title=title, group=args.group, statuses=statuses))
    return EXIT_OK


#: How long `history --ask` waits for the members' replies unless told `--wait`.
ASK_WAIT_S = 5.0


def _ask_group_history(args: argparse.Namespace) -> int:
    """`history --group G --ask`: the running node asks each member of G for its own messages
    to G (docs/protocol.md 19.6); each is printed labelled with the member that answered."""
    import dataclasses

    from meshpost.control import ControlClient, GroupHistoryRequest, checked
    from meshpost.protocol.history import DEFAULT_HISTORY_ITEMS, MAX_HISTORY_ITEMS
    from meshpost.text import format_fetched_history

    if not args.group:
        raise ConfigError("--ask needs --group G: it asks the members of a group")
    if args.csv:
        raise ConfigError("--ask prints lines or --json, not --csv")
    limit = DEFAULT_HISTORY_ITEMS if args.n is None else args.n
    if limit > MAX_HISTORY_ITEMS:
        raise ConfigError(f"--ask takes at most {MAX_HISTORY_ITEMS} messages per member (-n)")
    if args.wait <= 0:
        raise ConfigError(f"--wait wants seconds above 0, not {args.wait}")
    with ControlClient(data_dir(args), name=args.node) as client:
        history = checked(client.request(
            GroupHistoryRequest(args.group, limit, 0, args.wait),
            timeout_s=args.wait + 10)).history
    if args.json:
        json.dump(dataclasses.asdict(history), sys.stdout, ensure_ascii=False, indent=1)
        print()
    else:
        for line in format_fetched_history(history):
            print(line)
    return EXIT_OK


#: How long one `tail` poll waits at the node for a first message.
TAIL_POLL_S = 5.0


def _note_unknown_sender(client: Any, args: argparse.Namespace) -> None:
    """`--from NAME` that is none of the node's peers: say so once (a typo waited in silence
    for ever). Not an error: a gateway guest (`tcp:IP:PORT`) is no peer and may be tailed."""
    from meshpost.control import StatusRequest, checked

    if args.quiet or args.sender is None or ":" in args.sender:
        return
    peers = sorted(p.name for p in checked(client.request(StatusRequest(), timeout_s=10)).peers)
    if args.sender not in peers:
        print(f"meshpost tail: {args.sender!r} is none of {args.node}'s peers "
              f"({', '.join(peers) or 'it has none'}): nothing will come from it unless a node "
              "of that name joins", file=sys.stderr, flush=True)


def cmd_tail(args: argparse.Namespace) -> int:
    from meshpost.control import ControlClient, TailRequest, checked
    from meshpost.text import format_incoming

    if args.count is not None and args.count < 1:
        raise ConfigError(f"--count wants a whole number of messages, 1 or more, not "
                          f"{args.count}")
    if args.until is not None and not args.until.strip():
        # An empty or blank message is never stored: tail would wait for ever.
        raise ConfigError("--until wants the text of the message that ends the tail (no "
                          "message is empty), e.g. --until x")
    shown = 0
    with ControlClient(data_dir(args), name=args.node) as client:
        # The node's cursor of now: messages stored from here on are shown, none skipped,
        # however long a line takes to print (the next poll starts where this one ended).
        cursor = checked(client.request(TailRequest(), timeout_s=10)).cursor
        if not args.quiet:
            until = f" until {args.until!r}" if args.until is not None else ""
            print(f"meshpost tail: {args.node}'s incoming messages from now{until} "
                  "(Ctrl-C to stop)", file=sys.stderr, flush=True)
        _note_unknown_sender(client, args)
        while True:
            limit = 512 if args.count is None else min(512, args.count - shown)
            request = TailRequest(after=cursor, sender=args.sender, limit=limit,
                                  wait_s=TAIL_POLL_S)
            reply = checked(client.request(request, timeout_s=TAIL_POLL_S + 10))
            cursor = reply.cursor
            for m in reply.messages:
                if args.until is not None and m.body == args.until:
                    return EXIT_OK  # the end marker ends the stream; it is not printed
                if args.json:
                    print(json.dumps(history_record(m), ensure_ascii=False), flush=True)
                else:
                    print(format_incoming(m), flush=True)
                shown += 1
                if args.count is not None and shown >= args.count:
                    return EXIT_OK


def add_history(sub: Subcommands) -> None:
    """`meshpost history --node A [--peer B | --group G] [--json|--csv]`."""
    p = sub.add_parser("history", help="messages stored by a node (works while it runs)")
    p.add_argument("--node", required=True, help=NODE_HELP)
    p.add_argument("--peer", help="only the messages to or from PEER")
    p.add_argument("--group", help="only messages to group G (ours once each, with k/n)")
    p.add_argument("--ask", action="store_true",
                   help="with --group G: the running node asks each member of G for its own "
                        "last N messages to G (also those from before it joined)")
    p.add_argument("--wait", type=float, default=ASK_WAIT_S, metavar="S",
                   help=f"--ask: wait S seconds for the members' replies (default {ASK_WAIT_S:g})")
    p.add_argument("--data", help=DATA_HELP)
    p.add_argument("-n", type=int, default=None, help="only the last N messages")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true")
    fmt.add_argument("--csv", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="whole message texts and ids in the table (shortened otherwise)")
    p.set_defaults(func=cmd_history)


def add_tail(sub: Subcommands) -> None:
    """`meshpost tail --node A [--from B] [--count N] [--until TEXT]`."""
    p = sub.add_parser("tail", help="print a running node's incoming messages as they arrive")
    p.add_argument("--node", required=True, help=NODE_HELP)
    p.add_argument("--data", help=DATA_HELP)
    p.add_argument("--from", dest="sender", metavar="PEER", help="only messages from PEER")
    p.add_argument("--count", "-C", type=int, metavar="N", help="exit 0 after N messages")
    p.add_argument("--until", metavar="TEXT",
                   help="exit 0 when a message's whole text is TEXT (that one not printed)")
    p.add_argument("--json", action="store_true",
                   help="one JSON object a line, with the `history --json` fields")
    p.add_argument("-q", "--quiet", action="store_true", help="no note on standard error")
    p.set_defaults(func=cmd_tail)

"""`meshpost send`, `request` and `task`: hand messages to a running node over its control
socket and report what came of each (a receipt, a reply, a task id), with the exit code that
says it. The text comes from arguments, a file or standard input."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meshpost.cli.common import (
    DATA_HELP,
    NODE_HELP,
    EmptyCommandText,
    data_dir,
    lease_seconds,
    struct_dict,
    timeout_seconds,
)
from meshpost.errors import (
    EXIT_OK,
    EXIT_REJECTED,
    EXIT_TIMEOUT,
    ConfigError,
    MeshpostError,
)

if TYPE_CHECKING:
    from meshpost.cli.common import Subcommands
    from meshpost.control import ControlClient
    from meshpost.protocol.groups import BroadcastStatus


def _fmt_time(ns: int | None) -> str:
    from meshpost.text import format_time

    return format_time(ns)


def _not_to_itself(args: argparse.Namespace) -> None:
    """`--to` naming the sending node itself: say so (the node would answer "unknown peer")."""
    if args.to == args.node:
        raise ConfigError(f"{args.node} is the node that sends: give --to one of its peers, "
                          f"a group or all (`meshpost peers --node {args.node}` lists them)")


def _bodies(args: argparse.Namespace) -> list[str]:
    """The message(s) to send: TEXT, else `-f FILE`, else standard input; with `--lines`,
    one message per non-empty line."""
    if args.text and args.file:
        raise ConfigError("give the text either as arguments or with -f FILE, not both")
    if args.text:
        text = " ".join(args.text)
    elif args.file:
        path = Path(args.file)
        try:
            text = sys.stdin.read() if args.file == "-" else path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read {args.file}: {exc}") from None
    elif sys.stdin.isatty():
        raise ConfigError("no text: give it as arguments, with -f FILE, or on standard input "
                          "(echo hi | meshpost send ...)")
    else:
        text = sys.stdin.read()
    if args.lines:
        # Like `mosquitto_pub -l`: one message per line; empty lines carry nothing to send.
        return [line for line in text.splitlines() if line.strip()]
    # A trailing newline (echo, a file) is the line's end, not part of the message.
    return [text[:-1] if text.endswith("\n") else text]


def _result_json(r: Any) -> str:
    record = struct_dict(r)
    record["status"] = "delivered" if r.delivered else ("rejected" if r.error else "queued")
    return json.dumps(record, ensure_ascii=False)


def cmd_send(args: argparse.Namespace) -> int:
    from meshpost.control import ControlClient, ErrorReply, SendReply, SendRequest, checked
    from meshpost.text import clean

    _not_to_itself(args)
    bodies = _bodies(args)
    if not any(body.strip() for body in bodies):
        raise EmptyCommandText()
    if len(bodies) == 1 and not args.json and _is_broadcast(args):
        return _send_broadcast(args, bodies[0])
    requests = (SendRequest(args.to, body, args.timeout) for body in bodies)
    queued: set[str] = set()
    code = EXIT_OK
    answered = 0
    with ControlClient(data_dir(args), name=args.node) as client, \
            _answered_before_exit(args, len(bodies), lambda: answered):
        replies = client.stream(requests, timeout_s=args.timeout + 10, window=args.window)
        for index, reply in replies:
            answered = index + 1
            if isinstance(reply, ErrorReply):
                if not args.lines:
                    checked(reply)  # raises: main() prints it and exits with its code
                if args.json:
                    print(json.dumps({"line": index + 1, "status": "error", "kind": reply.kind,
                                      "error": reply.message}, ensure_ascii=False))
                if not args.quiet:
                    print(f"meshpost send: line {index + 1}: {reply.message}", file=sys.stderr)
                code = max(code, reply.exit_code)
                continue
            assert isinstance(reply, SendReply)
            for r in reply.sent:
                outcome = _report_result(r, args, clean)
                if outcome == EXIT_TIMEOUT:
                    queued.add(r.to)
                code = max(code, outcome)
    if queued and not args.quiet:
        _why_unreachable(args, queued)
    return code


@contextlib.contextmanager
def _answered_before_exit(args: argparse.Namespace, total: int,
                          answered: Callable[[], int]) -> Iterator[None]:
    """If the node exits in the middle of several messages, say how many it answered: those
    after them may or may not be in its store, so sending them again blindly could double
    them."""
    from meshpost.errors import NodeExited

    try:
        yield
    except NodeExited:
        if total > 1 and not args.quiet:
            done = answered()
            print(f"meshpost send: {done} of {total} messages were answered before "
                  f"{args.node} stopped; messages {done + 1}-{total} may or may not be stored "
                  f"there: check `meshpost history --node {args.node}` once it runs again "
                  "before sending them again", file=sys.stderr)
        raise


def cmd_request(args: argparse.Namespace) -> int:
    """Send a request through a running node and print the peer's reply."""
    from meshpost.control import AnswerReply, ControlClient, PeerRequest, checked
    from meshpost.text import clean

    _not_to_itself(args)
    body = " ".join(args.text)
    if not body.strip():
        raise EmptyCommandText()
    try:
        with ControlClient(data_dir(args), name=args.node) as client:
            reply = checked(client.request(PeerRequest(to=args.to, body=body,
                                                       timeout_s=args.timeout),
                                           timeout_s=args.timeout + 10))
    except MeshpostError as exc:
        if exc.exit_code != EXIT_TIMEOUT:
            raise
        # As `send` does: a peer that refuses this node never answers, and says why.
        print(f"meshpost request: {exc}", file=sys.stderr)
        _why_unreachable(args, {args.to})
        return exc.exit_code
    assert isinstance(reply, AnswerReply)
    if args.json:
        print(json.dumps({"request_id": reply.request_id, "id": reply.reply_id,
                          "sender": reply.sender, "body": reply.body,
                          "sent_at_ns": reply.sent_at_ns, "stored_at_ns": reply.stored_at_ns},
                         ensure_ascii=False))
    else:
        print(clean(reply.body))
    return EXIT_OK


def _is_broadcast(args: argparse.Namespace) -> bool:
    """`--to all` or a group: anything but one of the node's peers."""
    if args.to == "all":
        return True
    from meshpost.control import ControlClient, StatusRequest, checked

    with ControlClient(data_dir(args), name=args.node) as client:
        peers = checked(client.request(StatusRequest(), timeout_s=10)).peers
    return args.to not in {p.name for p in peers}


def _send_broadcast(args: argparse.Namespace, body: str) -> int:
    """One logical message to `all` or a group: `delivered k/n (pending: ...)` as receipts
    come, until all are in or `--timeout`; the pending keep their copy and are retried."""
    from meshpost.control import BroadcastRequest, ControlClient, checked
    from meshpost.text import clean

    deadline = time.monotonic() + args.timeout
    with ControlClient(data_dir(args), name=args.node) as client:
        status = checked(client.request(BroadcastRequest(args.to, body), timeout_s=30)).status
        if not args.quiet:
            print(f"… {args.node} → {clean(args.to)}: stored for {status.total} "
                  f"(id {status.logical_id})", flush=True)
        return follow_broadcast(client, status, args, deadline)


def follow_broadcast(client: ControlClient, status: BroadcastStatus, args: argparse.Namespace,
                     deadline: float) -> int:
    """Print each member's receipt or rejection of broadcast `status` as it comes (long
    polls of `broadcast-status`) until all are in or `deadline`; the exit code says which."""
    from meshpost.control import BroadcastStatusRequest, checked
    from meshpost.text import clean, format_broadcast

    def say(text: str) -> None:
        if not args.quiet:
            print(text, flush=True)

    shown: set[str] = set()
    while True:
        for member in status.delivered:
            if member not in shown:
                shown.add(member)
                say(f"✓ delivered to {clean(member)}: {format_broadcast(_as_of(status, shown))}")
        for member, why in status.rejected:
            if member not in shown:
                shown.add(member)
                if not args.quiet:
                    print(f"✗ {clean(member)}: {clean(why)}", file=sys.stderr)
        left = deadline - time.monotonic()
        if status.settled or left <= 0:
            break
        request = BroadcastStatusRequest(status.logical_id, len(shown), min(left, 5.0))
        status = checked(client.request(request, timeout_s=left + 10)).status
    if status.pending:
        if not args.quiet:
            print(f"… {format_broadcast(status)} within {args.timeout:g}s; the pending keep "
                  "their copy, retried until they receipt", file=sys.stderr)
        return EXIT_TIMEOUT
    return EXIT_REJECTED if status.rejected else EXIT_OK


def _as_of(status: BroadcastStatus, shown: set[str]) -> BroadcastStatus:
    """`status` as it stood when the members in `shown` had answered: one poll may bring
    several receipts, and each line counts those up to its own (not `5/5` on every line)."""
    import msgspec

    later = [m for m in status.delivered if m not in shown]
    later += [m for m, _ in status.rejected if m not in shown]
    return msgspec.structs.replace(
        status,
        delivered=tuple(m for m in status.delivered if m in shown),
        pending=(*later, *status.pending),
        rejected=tuple(r for r in status.rejected if r[0] in shown),
    )


def _report_result(r: Any, args: argparse.Namespace, clean: Callable[[str], str]) -> int:
    if args.json:
        print(_result_json(r))
    if r.delivered:
        if not args.json and not args.quiet:
            print(f"✓ delivered to {r.to} at {_fmt_time(r.delivered_at_ns)} "
                  f"(id {r.id}, sync={clean(r.sync or '')})")
        return EXIT_OK
    if r.error:
        if not args.quiet:
            # The detail of a rejection is the receiver's text: escaped, like any peer's text.
            print(f"✗ {r.to}: {clean(r.error)}", file=sys.stderr)
        return EXIT_REJECTED
    if not args.quiet:
        print(f"… no receipt from {r.to} within {args.timeout:g}s; message {r.id} stays "
              "queued and will be delivered when the peer is reachable", file=sys.stderr)
    return EXIT_TIMEOUT


def _why_unreachable(args: argparse.Namespace, peers: set[str]) -> None:
    """After a timeout: what the node knows of why (a refusal, a failed secure handshake)."""
    from meshpost.control import ControlClient, StatusRequest, checked
    from meshpost.text import clean

    with contextlib.suppress(MeshpostError), ControlClient(data_dir(args), name=args.node) as c:
        for p in checked(c.request(StatusRequest(), timeout_s=5)).peers:
            if p.name in peers and p.refusal:
                # "Delivered when the peer is reachable" is not the whole story here: it is
                # reachable, and refuses this node until its configuration or keys change.
                print(f"  {p.name}: {clean(p.refusal)} ({p.name} refuses this node: the "
                      f"message is delivered only once {p.name} accepts it)", file=sys.stderr)


def cmd_task(args: argparse.Namespace) -> int:
    """Queue tasks on a running node (the ventilator); print their ids."""
    from meshpost.control import ControlClient, SubmitRequest, checked

    bodies = [t for t in args.text if t.strip()]
    if not bodies:
        raise EmptyCommandText()
    with ControlClient(data_dir(args), name=args.node) as client:
        reply = checked(client.request(SubmitRequest(queue=args.queue, sink=args.sink,
                                                     bodies=bodies, lease_s=args.lease),
                                       timeout_s=60))
    for task_id in reply.task_ids:
        print(task_id)
    # Standard output stays the ids alone (scripts read them); the person reads this line.
    print(f"meshpost task: {len(reply.task_ids)} task(s) queued on {args.queue!r} (ids above); "
          f"each result goes to {args.sink}: `meshpost history --node {args.sink}"
          f"{_sink_data_option(args)}`, progress: `meshpost queue status {args.queue} "
          f"--node {args.node}{f' --data {args.data}' if args.data else ''}`",
          file=sys.stderr)
    return EXIT_OK


def _sink_data_option(args: argparse.Namespace) -> str:
    """` --data DIR` for the sink in `task`'s hint when the ventilator's `--data` has the
    sink's data dir beside it (a cluster's folder): without it the suggested `history`
    command looked in the default folder and found no store there (exit 4)."""
    from meshpost.store.connection import DB_FILENAME

    if not args.data:
        return ""
    beside = Path(args.data).parent / args.sink
    return f" --data {beside}" if (beside / DB_FILENAME).exists() else ""


def add_send(sub: Subcommands) -> None:
    """`meshpost send --node A --to B TEXT`."""
    p = sub.add_parser("send", help="send through a running node and wait for the receipt")
    p.add_argument("--node", required=True, help=NODE_HELP)
    p.add_argument("--to", required=True, help="peer name, group name, or 'all'")
    p.add_argument("--data", help=DATA_HELP)
    p.add_argument("--timeout", type=timeout_seconds, default=10.0,
                   help="seconds to wait for each receipt (default 10; 0 to not wait; at "
                        "most a day)")
    p.add_argument("-l", "--lines", action="store_true",
                   help="one message per line of the input, streamed through one connection")
    p.add_argument("-f", "--file", help="read the text from FILE ('-': standard input)")
    p.add_argument("--json", action="store_true", help="one JSON object per receipt a line")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="print no receipts or notes; the exit code tells")
    p.add_argument("--window", type=int, default=1024, help=argparse.SUPPRESS)
    p.add_argument("text", nargs="*",
                   help="the message (default: -f FILE, else standard input)")
    p.set_defaults(func=cmd_send)


def add_request(sub: Subcommands) -> None:
    """`meshpost request --node A --to B TEXT`."""
    p = sub.add_parser("request", help="send a request through a running node and print "
                                       "the peer's reply")
    p.add_argument("--node", required=True, help=NODE_HELP)
    p.add_argument("--to", required=True, help="the peer that answers")
    p.add_argument("--data", help=DATA_HELP)
    p.add_argument("--timeout", type=timeout_seconds, default=10.0,
                   help="seconds to wait for the reply (default 10; exit 3 saying whether "
                        "the peer had the request)")
    p.add_argument("--json", action="store_true", help="the reply as one JSON object")
    p.add_argument("text", nargs="+", help="the request")
    p.set_defaults(func=cmd_request)


def add_task(sub: Subcommands) -> None:
    """`meshpost task --node A --queue Q --sink S TEXT...`."""
    p = sub.add_parser("task", help="queue tasks on a work queue through a running node "
                                    "(the ventilator)")
    p.add_argument("--node", required=True, help=NODE_HELP)
    p.add_argument("--queue", required=True, help="the work queue (its workers serve it: "
                                                   "`meshpost node W --worker QUEUE=HANDLER`)")
    p.add_argument("--sink", required=True, help="the node that keeps each task's result")
    p.add_argument("--lease", type=lease_seconds, default=30.0, metavar="S",
                   help="seconds a worker has per task before it is redelivered (above 0, "
                        "at most a day; default 30)")
    p.add_argument("--data", help=DATA_HELP)
    p.add_argument("text", nargs="+", help="one task per argument")
    p.set_defaults(func=cmd_task)

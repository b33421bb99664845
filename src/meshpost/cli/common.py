"""What the commands share: logging setup, the data dir of `--node`/`--data`, argument types
and the error for an empty text. No command lives here, and nothing here imports a heavy module
at import time (`meshpost --help` loads this)."""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meshpost.config import NAME_PATTERN, default_data_dir
from meshpost.errors import InvalidMessage
from meshpost.eventloop import LOOP_ENV, LOOPS

if TYPE_CHECKING:
    #: What `add_parser` is called on: each command module adds its own subcommands.
    Subcommands = argparse._SubParsersAction[argparse.ArgumentParser]

#: `--node NAME` and `--data DIR` of every command that works on one node, said the same way.
NODE_HELP = "the node's name"
DATA_HELP = ("the node's data dir, if not its default per-name folder (a `cluster up` "
             "node's: the cluster folder's NAME, as `cluster up` prints)")

SYNC_HELP = ("SQLite synchronous level (default full: a receipted message survives power "
             "loss; normal: a process crash only)")

#: Upper bound of `send --timeout` (a day): larger values are a typo, not a wish.
MAX_TIMEOUT_S = 86_400.0


def setup_logging(level: str, *, log_file: Path | None = None) -> None:
    """Log to stderr, or to `log_file` (the console owns the terminal: a log line printed
    there would tear the line being typed)."""
    fmt = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
    target: dict[str, Any] = {"stream": sys.stderr}
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        target = {"filename": str(log_file), "encoding": "utf-8"}
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), format=fmt,
                        force=True, **target)


def add_loop_option(parser: argparse.ArgumentParser, what: str) -> None:
    """`--loop uvloop|asyncio`: the event loop `what` runs on (`meshpost.eventloop`)."""
    parser.add_argument("--loop", choices=LOOPS,
                        help=f"event loop of {what}: uvloop (the default where it is "
                             f"installed) or asyncio (the standard library's); default from "
                             f"{LOOP_ENV} when set")


def timeout_seconds(text: str) -> float:
    """argparse type of `--timeout`: a finite number of seconds, 0 to a day."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or not 0 <= value <= MAX_TIMEOUT_S:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not between 0 and {MAX_TIMEOUT_S:g} seconds")
    return value


def at_least(minimum: int) -> Callable[[str], int]:
    """argparse type: a whole number from `minimum` up (`demo --nodes 1` used to end in a
    ValueError traceback, `cluster up 0` to start nothing and exit 0)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text} is too few: give {minimum} or more")
        return value

    parse.__name__ = f"whole number from {minimum}"  # what argparse names in its errors
    return parse


def name_argument(what: str) -> Callable[[str], str]:
    """argparse type: a node, group or queue name (1-63 of A-Z a-z 0-9 _ . -, first a letter
    or digit), said as what it names (`keys generate --node 'bad name'` used to write a key
    line no authorized_keys file can hold)."""
    def parse(text: str) -> str:
        if not NAME_PATTERN.fullmatch(text):
            raise argparse.ArgumentTypeError(
                f"{text!r} is no {what} name: use 1-63 ASCII letters, digits, '_', '.', '-', "
                "starting with a letter or digit")
        return text

    parse.__name__ = f"{what} name"
    return parse


def lease_seconds(text: str) -> float:
    """argparse type of `task --lease`: a finite number of seconds above 0, at most a day
    (`protocol.workqueue.check_lease`, the rule the node applies too).

    Checked here, before the node sees it: a lease of `nan` used to be queued and then never
    dispatched (the task stayed in flight for ever), and `-3` came back as an internal error.
    """
    from meshpost.errors import InvalidLease
    from meshpost.protocol.workqueue import check_lease

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    try:
        return check_lease(value)
    except InvalidLease as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def data_dir(args: argparse.Namespace) -> Path:
    """`--data`, else the default data dir of `--node`."""
    return Path(args.data) if args.data else default_data_dir(args.node)


def cluster_data_hint(args: argparse.Namespace) -> str:
    """After "not running" or "no store" for `--node NAME` without `--data`: the `--data` to
    add when the default cluster folder has a node of that name ('' when it has none).
    README's cluster commands all carry `--data`; one typed without it looked in the node's
    own default folder, found nothing, and said only "start it with `meshpost node`"."""
    node = getattr(args, "node", None)
    if not isinstance(node, str) or getattr(args, "data", None):
        return ""
    from meshpost.cluster import default_cluster_root
    from meshpost.store.connection import DB_FILENAME

    folder = default_cluster_root() / node
    if not (folder / DB_FILENAME).exists():
        return ""
    return f"the cluster's node {node} keeps its data in {folder}: add `--data {folder}`"


class EmptyCommandText(InvalidMessage):
    def __init__(self) -> None:
        super().__init__("the message text is empty; give it after the options, e.g. "
                         "`meshpost send --node A --to B hello`")


def struct_dict(obj: Any) -> dict[str, Any]:
    import msgspec

    result = msgspec.to_builtins(obj)
    assert isinstance(result, dict)
    return result

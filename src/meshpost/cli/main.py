"""`main()`: parse the arguments, run the command, and turn its outcome into the exit code.
The one place where a `MeshpostError` becomes a message on stderr and its class's exit code
(no second mapping by class name anywhere in the CLI)."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from meshpost.cli.common import cluster_data_hint
from meshpost.cli.parser import build_parser
from meshpost.errors import (
    EXIT_ADDRESS_IN_USE,
    EXIT_INTERNAL,
    EXIT_NODE_NOT_STARTED,
    EXIT_NOT_RUNNING,
    EXIT_OK,
    EXIT_REJECTED,
    EXIT_STORE,
    EXIT_TIMEOUT,
    EXIT_USAGE,
    MeshpostError,
)

#: Every exit code and what it means, as README's table says it (tests compare the two).
EXIT_CODE_MEANINGS: dict[int, str] = {
    EXIT_OK: "success",
    EXIT_INTERNAL: "internal error (a bug: please report it with the log)",
    EXIT_USAGE: "usage or configuration error",
    EXIT_TIMEOUT: "no receipt in time; the message stays queued",
    EXIT_NOT_RUNNING: "node or cluster not running, or no store",
    EXIT_REJECTED: "rejected or refused by the receiver",
    EXIT_STORE: "storage error",
    EXIT_ADDRESS_IN_USE: "endpoint in use",
    EXIT_NODE_NOT_STARTED: "a cluster node did not start",
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result: int = args.func(args)
        return result
    except MeshpostError as exc:
        print(f"meshpost {args.command}: {exc}", file=sys.stderr)
        if exc.exit_code == EXIT_NOT_RUNNING and (hint := cluster_data_hint(args)):
            print(f"meshpost {args.command}: {hint}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader of our output went away (`meshpost history --json | head`): not an error
        # of ours. Point stdout at /dev/null so that the interpreter's final flush stays quiet.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_OK

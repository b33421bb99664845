"""The `meshpost` command line: arguments, logging, exit codes. No business logic here.

Exit codes (README's table lists the same, a test compares them): 0 success; 1 internal error;
2 usage or configuration error; 3 no receipt in time (the message stays queued and is delivered
later); 4 node or cluster not running, or no store (the node never ran there); 5 message
rejected by the receiver; 6 storage error; 7 an endpoint to bind is in use; 8 a node of
`cluster up`/`restart` did not start.

The package: `main` (the console script, `meshpost.cli:main`) in `main.py`, the parser in
`parser.py`, and one module per command group (`node`, `send`, `peers`, `history`, `cluster`,
`keys`, `demo`, `bench`), each adding its own subcommands; shared helpers in `common.py`.
"""

from __future__ import annotations

from meshpost.cli.main import EXIT_CODE_MEANINGS, main
from meshpost.cli.node import CRASH_ENV
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
)

__all__ = ["CRASH_ENV", "EXIT_ADDRESS_IN_USE", "EXIT_CODE_MEANINGS", "EXIT_INTERNAL",
           "EXIT_NODE_NOT_STARTED", "EXIT_NOT_RUNNING", "EXIT_OK", "EXIT_REJECTED", "EXIT_STORE",
           "EXIT_TIMEOUT", "EXIT_USAGE", "build_parser", "main"]

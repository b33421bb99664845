"""The `meshpost` argument parser: the top level, and each subcommand added by the module that
runs it, in the order `--help` lists them. Building it imports no heavy module (no zmq, sqlite3
or asyncio): every command imports what it needs when it runs."""

from __future__ import annotations

import argparse

from meshpost.cli.bench import add_bench
from meshpost.cli.cluster import add_cluster, add_host
from meshpost.cli.demo import add_demo, add_pipeline
from meshpost.cli.history import add_history, add_tail
from meshpost.cli.keys import add_keys
from meshpost.cli.node import add_attach, add_node, add_stop
from meshpost.cli.patterns import add_broadcast, add_queue
from meshpost.cli.peers import add_group, add_peers
from meshpost.cli.send import add_request, add_send, add_task


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("meshpost")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshpost",
        description="Brokerless messaging mesh: receipted, stored on both ends, clock-stamped.",
    )
    parser.add_argument("--version", action="version", version=f"meshpost {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    add_node(sub)
    add_send(sub)
    add_request(sub)
    add_task(sub)
    add_pipeline(sub)
    add_peers(sub)
    add_history(sub)
    add_group(sub)
    add_queue(sub)
    add_broadcast(sub)
    add_tail(sub)
    add_attach(sub)
    add_stop(sub)
    add_host(sub)
    add_cluster(sub)
    add_keys(sub)
    add_demo(sub)
    add_bench(sub)
    return parser

"""`meshpost keys generate|show|reload`: a node's CURVE key pair for `--secure`, the
authorized_keys line its peers need, and a running node told to read its authorized_keys
again. Key files belong to `meshpost.keys`."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from meshpost.cli.common import DATA_HELP, NODE_HELP, data_dir, name_argument
from meshpost.errors import EXIT_OK

if TYPE_CHECKING:
    from meshpost.cli.common import Subcommands


#: How long `keys reload` waits for the node's answer (it reads one small file).
RELOAD_TIMEOUT_S = 30.0


def reload_keys(args: argparse.Namespace) -> int:
    """`meshpost keys reload --node A`: the running node A reads its authorized_keys again
    and puts it in force; prints the names added, removed and changed. A file that would not
    start the node is refused (exit 2, the node's message naming the lines), the keys in
    force staying."""
    from meshpost.control import ControlClient, ReloadKeysRequest, checked

    with ControlClient(data_dir(args), name=args.node) as client:
        reply = checked(client.request(ReloadKeysRequest(), timeout_s=RELOAD_TIMEOUT_S))
    for what, names in (("added", reply.added), ("removed", reply.removed),
                        ("changed", reply.changed)):
        print(f"{what}: {', '.join(names) or '-'}")
    if not (reply.added or reply.removed or reply.changed):
        print(f"{args.node}: authorized_keys lists the keys already in force", file=sys.stderr)
    return EXIT_OK


def cmd_keys(args: argparse.Namespace) -> int:
    from meshpost import keys

    if args.action == "reload":
        return reload_keys(args)
    folder = data_dir(args)
    if args.action == "show":
        public = keys.load_public(folder, name=args.node)
    else:
        public = keys.generate(folder, overwrite=args.force, name=args.node)
    public_file, secret_file = keys.key_paths(folder)
    line = keys.authorized_line(args.node, public)
    print(line)
    if args.action == "generate":
        print(f"public key: {public_file}\nsecret key: {secret_file} (mode 0600)",
              file=sys.stderr)
    print(f"to trust {args.node}, add the line `{line}` (printed above on stdout) to every "
          f"peer's {keys.AUTHORIZED_KEYS} file, in that peer's data dir", file=sys.stderr)
    return EXIT_OK


def add_keys(sub: Subcommands) -> None:
    """`meshpost keys ...`."""
    p = sub.add_parser("keys", help="CURVE keys for --secure")
    ksub = p.add_subparsers(dest="action", required=True)
    gen = ksub.add_parser("generate", help="create this node's key pair in its data dir")
    gen.add_argument("--node", required=True, type=name_argument("node"), help=NODE_HELP)
    gen.add_argument("--data", help=DATA_HELP)
    gen.add_argument("--force", action="store_true", help="replace an existing key pair")
    show = ksub.add_parser("show", help="print this node's authorized_keys line again")
    show.add_argument("--node", required=True, type=name_argument("node"), help=NODE_HELP)
    show.add_argument("--data", help=DATA_HELP)
    reload = ksub.add_parser(
        "reload", help="have the running node read its authorized_keys again (as SIGHUP does): "
                       "added keys admitted, removed or changed ones cut, at once")
    reload.add_argument("--node", required=True, type=name_argument("node"), help=NODE_HELP)
    reload.add_argument("--data", help=DATA_HELP)
    p.set_defaults(func=cmd_keys)

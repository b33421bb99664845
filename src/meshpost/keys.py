"""CURVE key files: a node's key pair in its data dir and the mesh's authorized keys.

Rule: the secret key never leaves its data dir and is written with mode 0600; peers are known
by public key only, one `NAME Z85KEY` line each in `authorized_keys`.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from collections.abc import Mapping
from pathlib import Path

import zmq
import zmq.auth
from zmq.utils import z85

from meshpost.config import validate_name
from meshpost.errors import ConfigError
from meshpost.store.sqlite import LOCK_FILENAME

KEYS_DIR = "keys"
AUTHORIZED_KEYS = "authorized_keys"
#: A CURVE public key in Z85: 32 bytes as 40 characters.
Z85_KEY_CHARS = 40


def key_paths(data_dir: Path) -> tuple[Path, Path]:
    """(public key file, secret key file) of the node in `data_dir`."""
    folder = data_dir / KEYS_DIR
    return folder / "node.key", folder / "node.key_secret"


def _node_running(data_dir: Path) -> bool:
    """Whether a node holds `data_dir` (the store's lock, held for a node's whole life)."""
    try:
        with open(data_dir / LOCK_FILENAME, "rb") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
    except FileNotFoundError:
        return False
    except OSError as exc:
        return exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
    return False


def generate(data_dir: Path, *, overwrite: bool = False, name: str = "NAME") -> bytes:
    """Create the node's CURVE key pair; return its public key (Z85). A pair is replaced only
    with `overwrite`, and never under a running node: it keeps the key it read at start, so
    the files would no longer say which key it holds (peers reading them would be refused)."""
    public_file, secret_file = key_paths(data_dir)
    if secret_file.exists() and not overwrite:
        raise ConfigError(f"{secret_file} already exists; pass --force to replace it")
    if secret_file.exists() and _node_running(data_dir):
        raise ConfigError(f"node {name} is running in {data_dir} with the key pair in "
                          f"{secret_file.parent}, which it read at start: stop it first "
                          f"(`meshpost stop --node {name}`, or its host), make its new key, "
                          "start it, and give its peers the new line in place of the old")
    folder = public_file.parent
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    zmq.auth.create_certificates(folder, "node")
    os.chmod(secret_file, 0o600)
    public, _ = zmq.auth.load_certificate(public_file)
    return public


def _no_key(folder: Path, data_dir: Path, name: str) -> ConfigError:
    # The command to run as it is: `--node NAME` alone said neither the name nor the folder.
    return ConfigError(f"no CURVE key in {folder}; create one with "
                       f"`meshpost keys generate --node {name} --data {data_dir}`")


def load_public(data_dir: Path, *, name: str = "NAME") -> bytes:
    """The node's public key (Z85), read again from its key file (nothing is replaced);
    `name`, the node's, is for the error that says how to make one."""
    public_file, _ = key_paths(data_dir)
    if not public_file.exists():
        raise _no_key(public_file.parent, data_dir, name)
    public, _ = zmq.auth.load_certificate(public_file)
    return public


def authorized_line(name: str, public: bytes) -> str:
    """The `NAME Z85KEY` line that peers add to their `authorized_keys` to trust this node."""
    return f"{name} {public.decode('ascii')}"


def load_own(data_dir: Path, *, name: str = "NAME") -> tuple[bytes, bytes]:
    """(secret, public) key of the node `name` in `data_dir`."""
    _, secret_file = key_paths(data_dir)
    if not secret_file.exists():
        raise _no_key(secret_file.parent, data_dir, name)
    public, secret = zmq.auth.load_certificate(secret_file)
    if secret is None:
        raise ConfigError(f"{secret_file} holds no secret key")
    return secret, public


def z85_key(text: str) -> bytes | None:
    """`text` as a CURVE public key in Z85 (40 characters of ZeroMQ's alphabet, 32 bytes), or
    None. libzmq refuses anything else when the key is set on a socket, and a ZAP handler
    compares keys as text: an unreadable line would never admit its peer and stop the dial."""
    if len(text) != Z85_KEY_CHARS or not text.isascii():
        return None
    raw = text.encode("ascii")
    try:
        decoded = z85.decode(raw)
    except (KeyError, ValueError, struct.error):  # a character outside the alphabet; overflow
        return None
    return raw if len(decoded) == 32 and z85.encode(decoded) == raw else None


def load_authorized(data_dir: Path) -> dict[str, bytes]:
    """Peers' public keys from `authorized_keys`: `NAME Z85KEY` lines, `#` comment lines.

    Each line binds its key to its name, for both directions: connections made with that key
    are that name's, and dialing that name expects that key. So a key may stand for one name
    only, and a name have one key (the same line twice is harmless); anything else is a
    `ConfigError` naming the lines, not a silent choice of one of them."""
    path = data_dir / AUTHORIZED_KEYS
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"secure mode needs {path} listing each peer's public key: one "
                          "line each, as `meshpost keys show --node PEER` prints it where that "
                          "peer keeps its data") from None
    keys: dict[str, bytes] = {}
    lines: dict[str, int] = {}
    names: dict[bytes, tuple[str, int]] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()  # Z85 keys may contain '#': only whole-line comments
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        key = z85_key(parts[1]) if len(parts) == 2 else None
        if key is None:
            raise ConfigError(f"{path}:{number}: expected 'NAME Z85KEY' (a 40-character key "
                              "of ZeroMQ's Z85 alphabet, as `meshpost keys show` prints it)")
        try:
            name = validate_name(parts[0])
        except ConfigError as exc:
            raise ConfigError(f"{path}:{number}: {exc}") from None
        if name in keys and keys[name] != key:
            raise ConfigError(f"{path}:{number}: {name} has another key on line "
                              f"{lines[name]}; keep only the line of its current key")
        if key in names and names[key][0] != name:
            other, at = names[key]
            raise ConfigError(f"{path}:{number}: this key is {other}'s on line {at}; a key "
                              "proves one name, so each node needs a key pair of its own")
        keys[name], lines[name], names[key] = key, number, (name, number)
    return keys


def write_authorized(data_dir: Path, keys: Mapping[str, bytes]) -> Path:
    path = data_dir / AUTHORIZED_KEYS
    lines = ["# meshpost authorized keys: NAME Z85-PUBLIC-KEY"]
    lines += [f"{name} {key.decode('ascii')}" for name, key in sorted(keys.items())]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def generate_mesh_keys(data_dirs: Mapping[str, Path]) -> dict[str, bytes]:
    """Key pairs for every node of a local mesh, each trusting all the others."""
    publics = {name: generate(path, overwrite=True) for name, path in data_dirs.items()}
    for name, path in data_dirs.items():
        write_authorized(path, {n: k for n, k in publics.items() if n != name})
    return publics

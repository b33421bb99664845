"""An `ipc://` path belongs to one node: checked before the bind, held while the node runs.

Rule: a filesystem ipc path is bound only under its lock, an `flock` on `<path>.lock` held for
the bind's life, and only once a probe finds no process serving the path; on release the
socket file goes first, then the lock file. Abstract names (`ipc://@name`) and other
transports need neither: the kernel refuses a second bind itself.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import stat

from meshpost.errors import EndpointInUse, InvalidEndpoint

IPC_PROBE_TIMEOUT_S = 1.0
#: Beside the socket path: `node.sock` is held through `node.sock.lock`.
LOCK_SUFFIX = ".lock"
#: Attempts to lock a lock file that its last holder removes meanwhile (each attempt that
#: loses that race finds the file gone or replaced and opens it again); more is a fault.
LOCK_ATTEMPTS = 8


def ipc_path(endpoint: str) -> str | None:
    """The filesystem path of an `ipc://` endpoint; None for any other endpoint, an abstract
    name (`ipc://@name`) or a wildcard (`ipc://*`, a fresh path libzmq picks)."""
    if not endpoint.startswith("ipc://"):
        return None
    path = endpoint[len("ipc://"):]
    if not path or path.startswith("@") or path == "*":
        return None
    return path


def missing_folder(endpoint: str) -> str:
    folder = os.path.dirname(endpoint[len("ipc://"):]) or "."
    return f"folder {folder} does not exist; create it first or pick a path in an existing folder"


def check_ipc_path_free(endpoint: str) -> None:
    """Refuse an `ipc://` path that a running process serves; pass a free or stale one.

    libzmq unlinks an existing socket file before it binds (and deletes its file when it
    closes), so binding a path a live node holds would silently take it over and, on exit,
    leave that node unreachable. ZeroMQ's ipc is a Unix stream socket: a path that accepts a
    connect is in use; one that refuses it is a stale file from a process that died, which the
    bind may replace. Two meshpost nodes starting on one path at once are kept apart by the
    lock (`IpcPathLock`), under which this probe runs; the probe finds a process that takes
    no lock (an older meshpost, another program).
    """
    path = ipc_path(endpoint)
    if path is None:
        return
    folder = os.path.dirname(path)
    if folder and not os.path.isdir(folder):
        raise InvalidEndpoint(endpoint, missing_folder(endpoint))
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        # libzmq would unlink whatever is there, a user's file included.
        raise InvalidEndpoint(endpoint, f"{path} exists and is not a socket; pick another path")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(IPC_PROBE_TIMEOUT_S)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            return  # stale (or just removed): the bind replaces it
        except TimeoutError:
            pass  # a listener whose backlog is full is still a listener
        except OSError:
            return  # e.g. no permission to connect: the bind reports what libzmq finds
    raise EndpointInUse(
        endpoint, f"another process is serving the ipc socket {path} (it answered a connect)"
    )


class IpcPathLock:
    """The lock that makes this process the one binding an ipc path (`acquire`), until
    `release`. The kernel drops it with the process, so a node killed with -9 leaves a lock
    file that the next node simply locks."""

    def __init__(self, endpoint: str, path: str, fd: int) -> None:
        self.endpoint = endpoint
        self.path = path
        self.lock_path = path + LOCK_SUFFIX
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, endpoint: str) -> IpcPathLock | None:
        """Lock `endpoint`'s path for this process (None if it has no filesystem path), or
        raise `EndpointInUse` if another process holds it. Then probe it, then bind; call
        `release` when the bind fails or the socket closes."""
        path = ipc_path(endpoint)
        if path is None:
            return None
        lock_path = path + LOCK_SUFFIX
        for _ in range(LOCK_ATTEMPTS):
            try:
                fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except FileNotFoundError:
                raise InvalidEndpoint(endpoint, missing_folder(endpoint)) from None
            except OSError as exc:
                raise InvalidEndpoint(endpoint, (
                    f"cannot create the lock file {lock_path} beside the socket: "
                    f"{exc.strerror}; pick a path in a folder this user can write"
                )) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise EndpointInUse(endpoint, (
                    f"another process holds {lock_path}: a node is serving {path} or "
                    f"starting on it"
                )) from None
            # Its last holder may have removed the file between our open and our lock (it
            # removes it on release): then we hold a lock on a file nobody else will open.
            if _same_file(fd, lock_path):
                return cls(endpoint, path, fd)
            os.close(fd)
        raise EndpointInUse(endpoint, f"{lock_path} keeps being replaced; try again")

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self, *, remove_socket: bool) -> None:
        """Let the path go: its socket file first if `remove_socket` (the bound socket is
        closed), then the lock file, both while still holding the lock, so no other process
        binds in between. Idempotent."""
        if self._fd is None:
            return
        if remove_socket:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        with contextlib.suppress(OSError):
            os.unlink(self.lock_path)
        os.close(self._fd)
        self._fd = None

    def __repr__(self) -> str:
        return f"IpcPathLock({self.lock_path}, {'held' if self.held else 'released'})"


def _same_file(fd: int, path: str) -> bool:
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (opened.st_dev, opened.st_ino) == (named.st_dev, named.st_ino)


__all__ = [
    "IPC_PROBE_TIMEOUT_S",
    "LOCK_SUFFIX",
    "IpcPathLock",
    "check_ipc_path_free",
    "ipc_path",
    "missing_folder",
]

"""ZMTP spoken by hand over a plain socket: what a hostile peer can put on the wire below
pyzmq's well-behaved DEALER (tests/integration/adversarial/test_zmtp_attacks.py).

Rule: bytes only, written from RFC 23 (ZMTP 3.0) and RFC 37 (ZMTP 3.1): a 64-byte greeting
(signature, version, mechanism, as-server, filler), then frames of a flags byte (MORE 0x01,
LONG 0x02, COMMAND 0x04), a 1- or 8-byte size and the body; a command's body is a name of
up to 255 bytes after its length byte, then its data (READY: properties, each a 1-byte name
length, the name, a 4-byte value length, the value).
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterable

MORE, LONG, COMMAND = 0x01, 0x02, 0x04
GREETING_BYTES = 64


def greeting(mechanism: bytes = b"NULL", *, major: int = 3, minor: int = 0,
             as_server: bool = False) -> bytes:
    """A ZMTP 3.x greeting: signature, version, mechanism (padded), as-server, filler."""
    return (b"\xff" + b"\x00" * 8 + b"\x7f" + bytes([major, minor])
            + mechanism.ljust(20, b"\x00") + bytes([as_server]) + b"\x00" * 31)


def frame(body: bytes, *, more: bool = False, command: bool = False,
          long: bool | None = None) -> bytes:
    """One frame; `long` forces the 8-byte size (None: only when the body needs it)."""
    wide = len(body) > 255 if long is None else long
    flags = (MORE if more else 0) | (COMMAND if command else 0) | (LONG if wide else 0)
    size = len(body).to_bytes(8 if wide else 1, "big")
    return bytes([flags]) + size + body


def command(name: bytes, data: bytes = b"") -> bytes:
    """A command frame: `name` after its length byte, then `data`."""
    return frame(bytes([len(name)]) + name + data, command=True)


def properties(props: Iterable[tuple[bytes, bytes]]) -> bytes:
    """READY/INITIATE metadata: each name after its 1-byte length, each value after 4."""
    return b"".join(bytes([len(name)]) + name + len(value).to_bytes(4, "big") + value
                    for name, value in props)


def ready(props: Iterable[tuple[bytes, bytes]] = ((b"Socket-Type", b"DEALER"),)) -> bytes:
    """The NULL mechanism's READY command with these properties."""
    return command(b"READY", properties(props))


def ping(ttl_ds: int = 0, context: bytes = b"") -> bytes:
    """A ZMTP 3.1 PING: TTL in tenths of a second, then up to 16 bytes of context."""
    return command(b"PING", ttl_ds.to_bytes(2, "big") + context)


class RawPeer:
    """A plain TCP (or AF_UNIX, for ipc://) connection to a ZeroMQ endpoint."""

    def __init__(self, endpoint: str, *, timeout_s: float = 5.0) -> None:
        if endpoint.startswith("tcp://"):
            host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
            self.sock = socket.create_connection((host, int(port)), timeout=timeout_s)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        elif endpoint.startswith("ipc://"):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout_s)
            self.sock.connect(endpoint.removeprefix("ipc://"))
        else:
            raise ValueError(f"not a tcp:// or ipc:// endpoint: {endpoint}")
        self._buffer = b""

    @classmethod
    def adopt(cls, sock: socket.socket, *, timeout_s: float = 5.0) -> RawPeer:
        """A connection accepted on a listener of our own (playing the server's side)."""
        peer = cls.__new__(cls)
        peer.sock, peer._buffer = sock, b""
        sock.settimeout(timeout_s)
        return peer

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_exactly(self, count: int) -> bytes:
        """`count` bytes, or fewer if the other side closed (never more than asked)."""
        while len(self._buffer) < count:
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            self._buffer += chunk
        data, self._buffer = self._buffer[:count], self._buffer[count:]
        return data

    def read_frame(self) -> tuple[int, bytes] | None:
        """(flags, body) of the next frame, None if the other side closed first."""
        head = self.recv_exactly(1)
        if not head:
            return None
        flags = head[0]
        size_bytes = self.recv_exactly(8 if flags & LONG else 1)
        body = self.recv_exactly(int.from_bytes(size_bytes, "big"))
        return flags, body

    def handshake(self, props: Iterable[tuple[bytes, bytes]] = ((b"Socket-Type", b"DEALER"),),
                  *, minor: int = 0, as_server: bool = False) -> bytes:
        """NULL greeting and READY both ways; returns the node's READY body."""
        self.send(greeting(minor=minor, as_server=as_server))
        theirs = self.recv_exactly(GREETING_BYTES)
        assert len(theirs) == GREETING_BYTES and theirs[0] == 0xFF, theirs
        self.send(ready(props))
        answer = self.read_frame()
        assert answer is not None and answer[0] & COMMAND, answer
        return answer[1]

    def closed_by_peer(self, timeout_s: float) -> bool:
        """Whether the other side closes (EOF or reset) within `timeout_s`, reading and
        discarding whatever it sends meanwhile."""
        deadline = time.monotonic() + timeout_s
        self._buffer = b""
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                if not self.sock.recv(65536):
                    return True
            except TimeoutError:
                return False
            except OSError:
                return True
        return False

    def reset(self) -> None:
        """Close with a TCP reset (SO_LINGER 0): the other side sees an error, not an EOF."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def close(self) -> None:
        self.sock.close()

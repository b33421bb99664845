"""An independent client of meshpost's local control protocol, written from docs/protocol.md
section 14 alone: no meshpost import, only pyzmq and msgspec's plain msgpack.

It reads `<data_dir>/control.endpoint` (14.1), connects a DEALER, and exchanges single-part
msgpack maps tagged by `"type"` and correlated by `"id"` (14.2)."""

from __future__ import annotations

import itertools
import os
import time
from pathlib import Path
from typing import Any

import msgspec
import zmq

#: 14.1: the discovery file in the node's data directory.
ENDPOINT_FILE = "control.endpoint"


def read_endpoint(data_dir: Path) -> tuple[str, int]:
    """14.1: two lines, the endpoint and the node's pid."""
    endpoint, pid = (data_dir / ENDPOINT_FILE).read_text().splitlines()
    return endpoint, int(pid)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class NotRunning(Exception):
    """14.1: no endpoint file, or its pid is not alive (`not_running`)."""


class ControlPeer:
    """One DEALER connection to a node's control socket."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], data_dir: Path,
                 routing_id: bytes | None = None) -> None:
        try:
            self.endpoint, self.pid = read_endpoint(data_dir)
        except FileNotFoundError:
            raise NotRunning(f"no {ENDPOINT_FILE} in {data_dir}") from None
        if not pid_alive(self.pid):
            raise NotRunning(f"pid {self.pid} is not alive")
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if routing_id is not None:
            self.sock.setsockopt(zmq.ROUTING_ID, routing_id)
        self.sock.connect(self.endpoint)
        self._ids = itertools.count(1)
        #: Replies received but not yet asked for, by id.
        self.waiting: dict[int, dict[str, Any]] = {}
        #: Replies whose id matched no request of ours (14.2: dropped and counted).
        self.stale = 0
        self.in_flight: set[int] = set()

    def close(self) -> None:
        self.sock.close(linger=0)

    def post(self, type_: str, **fields: Any) -> int:
        """Send one request without waiting; returns its id."""
        rid = next(self._ids)
        self.post_map({"type": type_, **fields, "id": rid})
        self.in_flight.add(rid)
        return rid

    def post_map(self, record: dict[str, Any]) -> None:
        self.send_raw(msgspec.msgpack.encode(record))

    def send_raw(self, data: bytes | list[bytes]) -> None:
        if isinstance(data, list):
            self.sock.send_multipart(data)
        else:
            self.sock.send(data)

    def recv_any(self, timeout_s: float) -> dict[str, Any]:
        """The next reply, whatever its id (single part, a msgpack map)."""
        if not self.sock.poll(int(timeout_s * 1000)):
            raise TimeoutError(f"no reply from {self.endpoint} within {timeout_s}s")
        parts = self.sock.recv_multipart()
        assert len(parts) == 1, f"a reply of {len(parts)} parts"
        reply = msgspec.msgpack.decode(parts[0])
        assert isinstance(reply, dict), reply
        return reply

    def wait(self, rid: int, timeout_s: float) -> dict[str, Any]:
        """The reply to request `rid`; replies to other requests are kept for later."""
        deadline = time.monotonic() + timeout_s
        while rid not in self.waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no reply to request {rid} within {timeout_s}s")
            if not pid_alive(self.pid):
                raise NotRunning(f"node pid {self.pid} exited while request {rid} waited")
            try:
                reply = self.recv_any(min(left, 0.2))
            except TimeoutError:
                continue
            got = reply.get("id")
            if isinstance(got, int) and got in self.in_flight:
                self.in_flight.discard(got)
                self.waiting[got] = reply
            else:
                self.stale += 1
        return self.waiting.pop(rid)

    def call(self, type_: str, within: float, **fields: Any) -> dict[str, Any]:
        """Send one request and wait up to `within` seconds for its reply."""
        return self.wait(self.post(type_, **fields), within)

"""A fault-injecting TCP proxy (asyncio) for the link-fault test.

Modes, switchable at any time:
- pass: forward bytes unchanged;
- reset: abort every connection with a TCP RST, and reset new ones on accept;
- blackhole: stop forwarding in both directions and hold new connections (like a path that
  drops every packet: TCP keeps retrying, so held bytes arrive late once healed, unless an
  endpoint gave up on the connection meanwhile);
- latency: delay every chunk by a random 5-60 ms (order kept per direction);
- tiny: forward in writes of 1-7 bytes;
- bytelimit: each connection may carry a random 300-5000 bytes, then it is reset.
`heal()` returns to pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import socket
import struct

MODES = ("pass", "reset", "blackhole", "latency", "tiny", "bytelimit")


@dataclasses.dataclass(eq=False)
class _Conn:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    budget: int | None = None
    closed: bool = False


def _rst(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@dataclasses.dataclass
class ProxyStats:
    connections: int = 0
    resets: int = 0
    bytes: int = 0
    modes: list[str] = dataclasses.field(default_factory=list)


class FaultProxy:
    def __init__(self, listen_port: int, target_port: int, rng: random.Random,
                 host: str = "127.0.0.1") -> None:
        self.host = host
        self.listen_port = listen_port
        self.target_port = target_port
        self.rng = rng
        self.mode = "pass"
        self.stats = ProxyStats()
        self._open = asyncio.Event()
        self._open.set()
        self._conns: set[_Conn] = set()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.host, self.listen_port,
                                                  reuse_address=True)

    def set(self, mode: str) -> None:
        assert mode in MODES, mode
        self.mode = mode
        self.stats.modes.append(mode)
        if mode == "blackhole":
            self._open.clear()
        else:
            self._open.set()
        if mode == "reset":
            for conn in list(self._conns):
                self._reset(conn)

    def heal(self) -> None:
        self.set("pass")

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns):
            self._reset(conn)
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    def _reset(self, conn: _Conn) -> None:
        if conn.closed:
            return
        conn.closed = True
        self.stats.resets += 1
        _rst(conn.client)
        if conn.upstream is not None:
            _rst(conn.upstream)
        self._conns.discard(conn)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        conn = _Conn(writer)
        self._conns.add(conn)
        self.stats.connections += 1
        try:
            if self.mode == "reset":
                self._reset(conn)
                return
            await self._open.wait()  # a black hole holds new connections too
            if conn.closed or self.mode == "reset":
                self._reset(conn)
                return
            up_reader, up_writer = await asyncio.open_connection(self.host, self.target_port)
            conn.upstream = up_writer
            if conn.closed:
                # Reset while it connected: `_reset` ran before this writer existed, so it is
                # closed here (left open, it was a ResourceWarning when collected).
                _rst(up_writer)
                return
            await asyncio.gather(self._pump(reader, up_writer, conn),
                                 self._pump(up_reader, writer, conn))
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            if not conn.closed:
                self._reset(conn)
            self._tasks.discard(task)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                    conn: _Conn) -> None:
        while not conn.closed:
            data = await src.read(65536)
            if not data:
                break
            await self._open.wait()
            mode = self.mode
            if conn.closed or mode == "reset":
                break
            if mode == "latency":
                await asyncio.sleep(self.rng.uniform(0.005, 0.06))
            if mode == "bytelimit":
                if conn.budget is None:
                    conn.budget = self.rng.randint(300, 5000)
                if len(data) >= conn.budget:
                    dst.write(data[: conn.budget])
                    self.stats.bytes += conn.budget
                    with contextlib.suppress(OSError):
                        await dst.drain()
                    break
                conn.budget -= len(data)
            if mode == "tiny":
                i = 0
                while i < len(data) and not conn.closed:
                    n = self.rng.randint(1, 7)
                    dst.write(data[i : i + n])
                    await dst.drain()
                    i += n
            else:
                dst.write(data)
                await dst.drain()
            self.stats.bytes += len(data)
        self._reset(conn)

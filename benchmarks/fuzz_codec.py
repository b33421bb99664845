"""Long-running fuzz target for the wire codec and the listener (not part of `make test`).

Feeds arbitrary bytes to `meshpost.protocol.decode`, to a stateful `Listener.receive` and to a
`DialerLink.receive`. The contract under test: `decode` returns a frame or raises
`meshpost.errors.ProtocolError` (nothing else, ever), and a frame it returns holds no integer
outside signed 64 bits in its own fields (an unchecked batch's envelopes are the listener's to
reject); `Listener.receive` and `DialerLink.receive` never raise, and every frame the listener
answers with can be encoded. Anything else is a crash: the input is saved and counted.

Besides mutations of valid frames, a share of the inputs are well-formed frames of every type
whose integers are drawn from the edges of msgpack's range (2**64 - 1, 2**63, -2**63, ...).

Engines:
- atheris (coverage-guided libFuzzer; `pip install atheris`), used when importable;
- a seeded mutation loop (bit flips, truncations, splices, insertions of msgpack headers over a
  corpus of valid frames, plus pure random bytes) otherwise, or with `--engine random`.

    .venv/bin/python benchmarks/fuzz_codec.py --runs 1000000
    .venv/bin/python benchmarks/fuzz_codec.py --seconds 600 --engine random
Prints `inputs=N crashes=M` at the end (atheris: libFuzzer's own "Done N runs" line too).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

#: meshpost is imported only after atheris (if used) can instrument it: see `load()`.
mp: Any = None


def load(instrument: bool) -> None:
    """Import meshpost's protocol (under atheris' coverage instrumentation when asked)."""
    global mp
    if instrument:
        import atheris

        with atheris.instrument_imports(include=["meshpost"]):
            import meshpost.errors
            import meshpost.protocol
            import meshpost.protocol.frames
    else:
        import meshpost.errors
        import meshpost.protocol
        import meshpost.protocol.frames
    mp = ModuleType("mp")
    mp.__dict__.update(vars(meshpost.protocol))
    mp.ProtocolError = meshpost.errors.ProtocolError
    mp.UncheckedBatch = meshpost.protocol.frames.UncheckedBatch


MAX_FRAME = 512 * (64 * 1024 + 256) + 4096
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
#: Integers at and past the edges of what a frame may carry (msgpack holds -2**63 .. 2**64-1).
EDGE_INTS = (0, 1, -1, 2**31, 2**32, INT64_MAX, INT64_MAX + 1, 2**64 - 1, INT64_MIN,
             INT64_MIN + 1, 10**18)
CRASH_DIR = Path(os.environ.get("MESHPOST_FUZZ_CRASHES", tempfile.gettempdir())) / "meshpost-fuzz"


def seed_frames() -> list[bytes]:
    envs = [mp.Envelope(f"id{i}", i, "K", "R", "body é 日本" * i, 10**18 + i, 2**40 + i)
            for i in range(1, 4)]
    frames = [
        mp.Hello(mp.PROTOCOL_VERSION, "0123456789abcdef", "K", 1, 2),
        mp.Hello(mp.PROTOCOL_VERSION + 1, "0123456789abcdef", "K", 1, 2),
        mp.Welcome(mp.PROTOCOL_VERSION, "fedcba9876543210", "R", 3, 4, "full"),
        mp.Refuse("malformed", "no"),
        mp.Batch(5, envs),
        mp.Batch(6, []),
        mp.ReceiptFrame([(1, 3), (5, 5)], 1, 2, 3, 4, 5, "normal"),
        mp.Reject([1, 2], "conflict", "x"),
        mp.Ping(7),
        mp.Pong(7, 8, 9),
    ]
    return [mp.encode(f) for f in frames]


def edge_int_frame(rng: random.Random) -> bytes:
    """A frame of a random type, its layout right, each integer an edge value or a plain one."""
    import msgspec

    def n() -> int:
        return rng.choice(EDGE_INTS) if rng.random() < 0.5 else rng.randrange(1, 2**40)

    def env() -> list[object]:
        return [f"id{n() % 1000}", n(), "K", "R", "body", n(), n()]

    version = mp.PROTOCOL_VERSION if rng.random() < 0.7 else n()
    sync = rng.choice(["full", "normal", "fsync", ""])
    builders = [
        lambda: ["hello", version, "0123456789abcdef", "K", n(), n()],
        lambda: ["welcome", version, "fedcba9876543210", "R", n(), n(), sync],
        lambda: ["batch", n(), [env() for _ in range(rng.randint(0, 3))]],
        lambda: ["receipt", [[n(), n()] for _ in range(rng.randint(0, 3))], n(), n(), n(), n(),
                 n(), sync],
        lambda: ["reject", [n() for _ in range(rng.randint(0, 3))], "conflict", "x"],
        lambda: ["ping", n()],
        lambda: ["pong", n(), n(), n()],
        lambda: ["bye", "shutting down"],
        lambda: ["refuse", "malformed", "no"],
    ]
    return msgspec.msgpack.encode(rng.choice(builders)())


def check_in_range(frame: Any) -> None:
    """The decode contract: no integer of a frame's own fields outside signed 64 bits."""
    if isinstance(frame, mp.UncheckedBatch):
        values: list[Any] = [frame.tx_at_ns]
    else:
        values = [getattr(frame, f) for f in frame.__struct_fields__ if f != "messages"]
        if isinstance(frame, mp.Batch):
            values += [v for m in frame.messages for v in (m.seq, m.sent_at_ns, m.hlc)]
    flat: list[Any] = []
    while values:
        v = values.pop()
        if isinstance(v, list | tuple):
            values.extend(v)
        else:
            flat.append(v)
    bad = [v for v in flat if isinstance(v, int) and not INT64_MIN <= v <= INT64_MAX]
    if bad:
        raise AssertionError(f"decode let {type(frame).__name__} through with {bad}")


class Target:
    """One input: byte 0 picks the connection identity; the rest is the frame."""

    IDENTITIES = ("K", "Zed", "R", "")

    def __init__(self) -> None:
        self.listener = mp.Listener(local_name="R", local_node_id="r" * 16,
                                    known_peers=["K", "S"],
                                 max_message_bytes=64 * 1024, sync="full")
        self.hello = mp.encode(mp.Hello(mp.PROTOCOL_VERSION, "k" * 16, "K", 1, 1))
        self.dialer = self.new_dialer()
        self.inputs = 0
        self.crashes = 0

    @staticmethod
    def new_dialer() -> Any:
        return mp.DialerLink(local_name="K", local_node_id="k" * 16, peer="R", window=64,
                             window_bytes=1 << 20, retransmit_initial_s=0.5,
                             retransmit_max_s=5.0, ping_interval_s=1.0, peer_timeout_s=4.0,
                             max_frame_bytes=MAX_FRAME)

    def __call__(self, data: bytes) -> None:
        self.inputs += 1
        if not data:
            data = b"\x00"
        who = self.IDENTITIES[data[0] % len(self.IDENTITIES)]
        frame = data[1:]
        if data[0] & 0x80:  # keep a session open so that batches reach validation
            self.listener.receive("K", self.hello, 1, 1)
        with contextlib.suppress(mp.ProtocolError):  # the only exception decode may raise
            check_in_range(mp.decode(frame, max_bytes=MAX_FRAME))
        self.listener.receive(who, frame, 1, 1)
        for _to, reply in self.listener.frames_to_send():
            mp.encode(reply)
        for event in self.listener.events():
            _ = event
        self.dialer.receive(frame, float(self.inputs), 1, 1)
        self.dialer.poll(float(self.inputs), 1, 1)
        for reply in self.dialer.frames_to_send():
            mp.encode(reply)
        self.dialer.events()
        if self.inputs % 5000 == 0:
            self.dialer = self.new_dialer()
            self.listener = mp.Listener(local_name="R", local_node_id="r" * 16,
                                        known_peers=["K", "S"], max_message_bytes=64 * 1024,
                                        sync="full")


def record_crash(target: Target, data: bytes, exc: BaseException) -> None:
    target.crashes += 1
    CRASH_DIR.mkdir(parents=True, exist_ok=True)
    path = CRASH_DIR / f"crash-{target.crashes:04d}.bin"
    path.write_bytes(data)
    print(f"CRASH {type(exc).__name__}: {exc} (input saved to {path})", file=sys.stderr)
    traceback.print_exception(exc, file=sys.stderr)


# -- the mutation engine --------------------------------------------------------------------

_HEADERS = [b"\xdd\xff\xff\xff\xff", b"\xdb\xff\xff\xff\xff", b"\xc6\xff\xff\xff\xff",
            b"\xdf\xff\xff\xff\xff", b"\xcf\xff\xff\xff\xff\xff\xff\xff\xff",
            b"\xd3\x80\x00\x00\x00\x00\x00\x00\x00", b"\x91" * 64, b"\xc1", b"\xd4\x01\x02",
            b"\xcb\x7f\xf8\x00\x00\x00\x00\x00\x00", b"\xa5hello", b"\xa5batch", b"\xc0"]


def mutate(rng: random.Random, corpus: list[bytes]) -> bytes:
    choice = rng.random()
    if choice < 0.1:
        return bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 64)))
    data = bytearray(rng.choice(corpus))
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        if op == 0 and data:  # flip bits
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
        elif op == 1 and data:  # truncate
            del data[rng.randrange(len(data)) :]
        elif op == 2:  # insert a msgpack header
            i = rng.randint(0, len(data))
            data[i:i] = rng.choice(_HEADERS)
        elif op == 3 and data:  # overwrite a byte with an interesting one
            data[rng.randrange(len(data))] = rng.choice((0x00, 0xFF, 0x7F, 0x80, 0xC0, 0xC1,
                                                         0xDC, 0xDD, 0x90, 0x9F))
        elif op == 4:  # splice with another corpus entry
            other = rng.choice(corpus)
            cut = rng.randint(0, len(data))
            data = data[:cut] + other[rng.randint(0, len(other)) :]
        else:  # duplicate a slice
            if data:
                i = rng.randrange(len(data))
                data[i:i] = data[i : i + rng.randint(1, 16)]
    return bytes([rng.getrandbits(8)]) + bytes(data)


def run_random(target: Target, runs: int, seconds: float, seed: int) -> None:
    rng = random.Random(seed)
    corpus = seed_frames()
    deadline = time.monotonic() + seconds
    next_report = 100_000
    while target.inputs < runs and time.monotonic() < deadline:
        if rng.random() < 0.25:  # a well-formed frame of any type with edge integers
            data = bytes([rng.getrandbits(8) | 0x80]) + edge_int_frame(rng)
        else:
            data = mutate(rng, corpus)
        try:
            target(data)
        except Exception as exc:  # the contract: nothing may escape
            record_crash(target, data, exc)
        if target.inputs >= next_report:
            print(f"inputs={target.inputs} crashes={target.crashes}", file=sys.stderr, flush=True)
            next_report += 100_000
        if len(corpus) < 200 and rng.random() < 0.001:
            corpus.append(data[1:])


def run_atheris(target: Target, runs: int, seconds: float) -> None:
    import atheris

    def one(data: bytes) -> None:
        try:
            target(data)
        except Exception as exc:
            record_crash(target, data, exc)
            raise
        if target.inputs % 100_000 == 0:
            print(f"inputs={target.inputs} crashes={target.crashes}", file=sys.stderr, flush=True)

    corpus = Path(tempfile.mkdtemp(prefix="meshpost-fuzz-corpus-"))
    for i, frame in enumerate(seed_frames()):
        (corpus / f"seed{i}").write_bytes(b"\x80" + frame)
    args = [sys.argv[0], f"-runs={runs}", f"-max_total_time={int(seconds)}",
            "-max_len=4096", "-print_final_stats=1", str(corpus)]
    atheris.Setup(args, one)
    atheris.Fuzz()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=1_000_000)
    p.add_argument("--seconds", type=float, default=3600.0)
    p.add_argument("--engine", choices=["auto", "atheris", "random"], default="auto")
    p.add_argument("--seed", type=int, default=4)
    args = p.parse_args()
    engine = args.engine
    if engine == "auto":
        try:
            import atheris  # noqa: F401
        except ImportError:
            engine = "random"
        else:
            engine = "atheris"
    load(instrument=engine == "atheris")
    target = Target()
    started = time.monotonic()
    print(f"engine={engine}", file=sys.stderr, flush=True)
    runner: Callable[[], None]
    if engine == "atheris":
        runner = lambda: run_atheris(target, args.runs, args.seconds)  # noqa: E731
    else:
        runner = lambda: run_random(target, args.runs, args.seconds, args.seed)  # noqa: E731
    try:
        runner()
    finally:
        elapsed = time.monotonic() - started
        print(f"engine={engine} inputs={target.inputs} crashes={target.crashes} "
              f"seconds={elapsed:.0f}", flush=True)
    return 1 if target.crashes else 0


if __name__ == "__main__":
    sys.exit(main())

"""Which event loop a meshpost process runs: uvloop where it is installed, the standard
library's asyncio loop otherwise or when asked (`--loop asyncio`, `MESHPOST_LOOP=asyncio`).

Rule: only process entry points (`meshpost node`, `host`, the bench's processes) choose and
run a loop, through `run`; the library (`Node` in a user's own asyncio program) works on
whichever loop it is given and never installs one. Importing this module loads no asyncio
(`meshpost --help` builds its `--loop` options from it).
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any, TypeVar

from meshpost.errors import ConfigError

if TYPE_CHECKING:
    import asyncio
    from collections.abc import Callable, Coroutine

T = TypeVar("T")

#: The environment variable that chooses the loop of every meshpost process started with it
#: (children inherit it): `uvloop` or `asyncio`. A `--loop` option wins over it.
LOOP_ENV = "MESHPOST_LOOP"
UVLOOP = "uvloop"
ASYNCIO = "asyncio"
LOOPS = (UVLOOP, ASYNCIO)


def uvloop_available() -> bool:
    """True when uvloop can be imported here (CPython on Linux or macOS with the wheel)."""
    try:
        importlib.import_module(UVLOOP)
    except ImportError:
        return False
    return True


def choose(requested: str | None = None) -> str:
    """The loop to run: `requested` (a `--loop` option), else `MESHPOST_LOOP`, else uvloop
    when installed, else asyncio. Asking for uvloop where it is missing, or for a loop that
    does not exist, is a `ConfigError` that says what to do."""
    where = "--loop"
    if requested is None:
        requested = os.environ.get(LOOP_ENV, "").strip().lower() or None
        where = LOOP_ENV
    if requested is None:
        return UVLOOP if uvloop_available() else ASYNCIO
    if requested not in LOOPS:
        raise ConfigError(f"{where} must be {' or '.join(LOOPS)}, not {requested!r}")
    if requested == UVLOOP and not uvloop_available():
        raise ConfigError(f"{where} asks for uvloop, which is not installed here: "
                          f"`pip install uvloop`, or choose {where} {ASYNCIO}")
    return requested


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """A function making a new loop of kind `name` (one of `LOOPS`)."""
    import asyncio

    if name == UVLOOP:
        factory: Callable[[], asyncio.AbstractEventLoop] = importlib.import_module(
            UVLOOP).new_event_loop
        return factory
    if name == ASYNCIO:
        return asyncio.new_event_loop
    raise ValueError(f"unknown event loop {name!r}")


def run(main: Coroutine[Any, Any, T], loop: str) -> T:
    """`asyncio.run(main)` on a new loop of kind `loop` (`choose` gives one)."""
    import asyncio

    if loop == ASYNCIO:  # exactly as before uvloop (the loop is also the thread's current one)
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=loop_factory(loop)) as runner:
        return runner.run(main)


def loop_name(loop: asyncio.AbstractEventLoop | None = None) -> str:
    """`uvloop` or `asyncio`: the kind of `loop` (default: the running one); another
    library's loop (a user's program may run one) by its class's module and name."""
    import asyncio

    kind = type(loop or asyncio.get_running_loop())
    package = kind.__module__.partition(".")[0]
    return package if package in LOOPS else f"{kind.__module__}.{kind.__qualname__}"

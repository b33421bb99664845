"""The writer's retrying, as status shows it (`GroupCommitWriter.retrying`): how many attempts
failed since the last commit, the delay before the next, for how long, and the last error;
None again once a commit goes through."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from tests.unit.store.support import out
from tests.unit.store.test_writer import failing_first, run, running_writer

from meshpost.clock import FakeClock
from meshpost.errors import StoreFull, StoreLocked
from meshpost.store import GroupCommitWriter


async def until(condition: Callable[[], bool]) -> None:
    """Turn the loop until `condition` holds (the caller's `run` bounds the wait)."""
    while not condition():
        await asyncio.sleep(0.001)


def held_retries(writer: GroupCommitWriter,
                 monkeypatch: pytest.MonkeyPatch) -> list[tuple[float, tuple[Any, ...]]]:
    """The writer's retries are kept here (delay, args) instead of being scheduled: the test
    fires each one itself (`fire`), so it can look at the writer between attempts."""
    loop = asyncio.get_running_loop()
    held: list[tuple[float, tuple[Any, ...]]] = []
    call_later = loop.call_later

    def instead(delay: float, callback: Callable[..., None], *args: Any) -> Any:
        if callback == writer._submit:
            held.append((delay, args))
            return None
        return call_later(delay, callback, *args)

    monkeypatch.setattr(loop, "call_later", instead)
    return held


def test_the_retrying_state_says_how_many_failed_how_long_what_next_and_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = FakeClock()

    async def scenario() -> None:
        async with running_writer(tmp_path, clock) as writer:
            assert writer.retrying is None
            held = held_retries(writer, monkeypatch)
            path = str(writer.store.path)
            failing_first(writer, [StoreLocked(path), StoreFull(path), StoreFull(path)], clock)
            done: list[int] = []
            writer.add_outgoing([out(1)], done.append)
            await until(lambda: len(held) == 1)
            first = writer.retrying
            assert first is not None
            assert (first.attempts, first.delay_s, first.for_s) == (1, 0.05, 0.0)
            assert isinstance(first.error, StoreLocked)
            for attempts in (2, 3):
                clock.advance(0.5)  # the wait before the retry (each failure takes 1 s more)
                writer._submit(*held.pop()[1])
                await until(lambda n=attempts: len(held) == 1 and writer.errors == n)
            retrying = writer.retrying
            assert retrying is not None
            assert retrying.attempts == 3
            assert retrying.delay_s == pytest.approx(0.2)
            assert retrying.for_s == pytest.approx(2 * 1.5)
            assert isinstance(retrying.error, StoreFull)
            writer._submit(*held.pop()[1])  # this one commits
            await writer.flush()
            assert len(done) == 1
            assert writer.retrying is None

    run(scenario)

"""Fixtures for integration tests: real node processes on loopback and ipc://."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from meshpost.store import StoreReader


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short temp dir: ipc:// socket paths must stay under ~100 bytes."""
    path = Path(tempfile.mkdtemp(prefix="mp-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll `predicate` until true; fail the test with `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def store_counts(data_dir: Path) -> dict[str, int]:
    with StoreReader.for_data_dir(data_dir) as reader:
        return reader.counts()

"""Fixtures of the store's unit tests: a data dir, and a store opened in it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from meshpost.store import Store


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "alice"


@pytest.fixture
def store(data_dir: Path) -> Iterator[Store]:
    s = Store.open(data_dir, name="alice")
    yield s
    s.close()

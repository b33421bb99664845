"""Fixtures of the fault battery: short working folders, meshes that are always torn down."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import FAULT_COUNTS_KEY

from .checker import RESULTS, Mesh


async def until_true(what: str, check: Callable[[], bool], timeout_s: float) -> None:
    """Wait (bounded) until `check()`, run off the loop (it reads stores), is true."""
    deadline = time.monotonic() + timeout_s
    while not await asyncio.to_thread(check):
        assert time.monotonic() < deadline, f"not within {timeout_s}s: {what}"
        await asyncio.sleep(0.05)

@pytest.fixture
def workdir() -> Iterator[Path]:
    """A short folder under /tmp (ipc:// paths are limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="mpf-"))
    try:
        yield path
    finally:
        if os.environ.get("MESHPOST_FAULTS_KEEP"):
            print(f"kept {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


MeshFactory = Callable[..., Mesh]


@pytest.fixture
def mesh_factory(workdir: Path, request: pytest.FixtureRequest) -> Iterator[MeshFactory]:
    """`mesh_factory(names, real=..., ...)` builds a `Mesh`; every process is stopped after."""
    meshes: list[Mesh] = []

    def make(names: Sequence[str], **kwargs: Any) -> Mesh:
        test = request.node.name.removeprefix("test_")
        root = workdir / f"m{len(meshes)}"
        mesh = Mesh(root, test, names, **kwargs)
        meshes.append(mesh)
        return mesh

    try:
        yield make
    finally:
        for mesh in meshes:
            mesh.teardown()


def pytest_sessionfinish(session: pytest.Session) -> None:
    # Under pytest-xdist (`make test`) this runs in a worker, whose terminal is not shown:
    # hand the counts to the controller, which prints them (tests/conftest.py).
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput[FAULT_COUNTS_KEY] = list(RESULTS)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if RESULTS:
        terminalreporter.section("fault battery counts")
        for line in RESULTS:
            terminalreporter.write_line(line)

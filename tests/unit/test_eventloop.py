"""`meshpost.eventloop`: which loop a process runs (uvloop by default where installed, asyncio
when asked or where uvloop is missing), how it is asked for, and that it really runs."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from meshpost import eventloop
from meshpost.errors import ConfigError

TIMEOUT_S = 60


@pytest.fixture
def no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(eventloop.LOOP_ENV, raising=False)


@pytest.fixture
def without_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    """As on a machine without uvloop: importing it fails."""
    monkeypatch.setitem(sys.modules, "uvloop", None)  # `import uvloop` raises ImportError


@pytest.mark.usefixtures("no_env")
def test_the_default_is_uvloop_where_installed() -> None:
    pytest.importorskip("uvloop")
    assert eventloop.choose() == "uvloop"


@pytest.mark.usefixtures("no_env", "without_uvloop")
def test_the_default_is_asyncio_without_uvloop() -> None:
    assert not eventloop.uvloop_available()
    assert eventloop.choose() == "asyncio"


@pytest.mark.usefixtures("without_uvloop")
@pytest.mark.parametrize("env", [None, "uvloop"])
def test_asking_for_missing_uvloop_says_what_to_do(monkeypatch: pytest.MonkeyPatch,
                                                   env: str | None) -> None:
    if env is None:
        monkeypatch.delenv(eventloop.LOOP_ENV, raising=False)
        with pytest.raises(ConfigError, match=r"--loop asks for uvloop.*pip install uvloop"):
            eventloop.choose("uvloop")
    else:
        monkeypatch.setenv(eventloop.LOOP_ENV, env)
        with pytest.raises(ConfigError, match=r"MESHPOST_LOOP asks for uvloop.*asyncio"):
            eventloop.choose()


def test_the_environment_chooses_and_an_option_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(eventloop.LOOP_ENV, " AsyncIO ")
    assert eventloop.choose() == "asyncio"
    assert eventloop.choose("asyncio") == "asyncio"
    if eventloop.uvloop_available():
        assert eventloop.choose("uvloop") == "uvloop"
    monkeypatch.setenv(eventloop.LOOP_ENV, "")  # empty: as if unset
    assert eventloop.choose() == ("uvloop" if eventloop.uvloop_available() else "asyncio")


def test_an_unknown_loop_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(eventloop.LOOP_ENV, "tokio")
    with pytest.raises(ConfigError, match=r"MESHPOST_LOOP must be uvloop or asyncio, not 'tokio'"):
        eventloop.choose()
    with pytest.raises(ConfigError, match=r"--loop must be"):
        eventloop.choose("trio")


@pytest.mark.parametrize("name", eventloop.LOOPS)
def test_run_runs_the_coroutine_on_the_loop_asked_for(name: str) -> None:
    if name == "uvloop":
        pytest.importorskip("uvloop")

    async def main() -> tuple[str, str]:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(0)
        return eventloop.loop_name(), type(loop).__module__

    kind, module = eventloop.run(main(), name)
    assert kind == name
    assert module.partition(".")[0] == name
    with pytest.raises(ValueError, match="unknown event loop"):
        eventloop.loop_factory("tokio")


def test_another_librarys_loop_is_named_by_its_class() -> None:
    class OwnLoop(asyncio.SelectorEventLoop):
        pass

    loop = OwnLoop()
    try:
        assert eventloop.loop_name(loop) == f"{__name__}.{OwnLoop.__qualname__}"
    finally:
        loop.close()


def test_importing_meshpost_installs_no_loop() -> None:
    """The library is loop-agnostic: a user's `asyncio.run` keeps the standard loop after
    importing meshpost (only the process entry points choose uvloop)."""
    code = ("import asyncio, meshpost, meshpost.node, meshpost.eventloop; "
            "loop = asyncio.new_event_loop(); print(type(loop).__module__); loop.close()")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=TIMEOUT_S, check=True).stdout.strip()
    assert out.startswith("asyncio")

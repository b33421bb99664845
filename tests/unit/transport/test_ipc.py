"""An `ipc://` path is held by one node: two binders racing for it (the second bind injected
between the first's probe and its bind) end with one bound and the other refused, never with
one silently taking the path over (docs/reliability.md, "Two nodes binding one ipc path")."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

import meshpost.transport.zmq_transport as zmq_transport
from meshpost.errors import EndpointInUse
from meshpost.transport.zmq_transport import ZmqTransport


@pytest.fixture
def ipc_dir() -> Iterator[Path]:
    """A folder short enough for a Unix socket path (tmp_path can be too long)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="mp-ipc-", dir="/tmp") as folder:
        yield Path(folder)


@pytest.fixture
def transports() -> Iterator[list[ZmqTransport]]:
    made: list[ZmqTransport] = []
    yield made
    for transport in made:
        transport.close()


def transport(made: list[ZmqTransport], name: str) -> ZmqTransport:
    made.append(ZmqTransport(name=name, max_frame_bytes=1 << 16))
    return made[-1]


def answers(path: Path, expected: ZmqTransport) -> bool:
    """Whether a connect to `path` reaches `expected`'s ROUTER (a ping over a DEALER)."""
    context = zmq.Context.instance()
    with context.socket(zmq.DEALER) as dealer:
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(f"ipc://{path}")
        dealer.send(b"who")
        router = expected._router
        return bool(router.poll(5_000)) and router.recv_multipart()[-1] == b"who"


def race(monkeypatch: pytest.MonkeyPatch, first: ZmqTransport, second: ZmqTransport,
         endpoint: str) -> list[BaseException | None]:
    """`first` binds `endpoint`; `second` binds it too, just after first's probe found the
    path free and before first's own bind: their outcomes (None: bound)."""
    probe = zmq_transport.check_ipc_path_free
    outcomes: list[BaseException | None] = []

    def probe_then_the_other_binds(path: str) -> None:
        probe(path)
        monkeypatch.setattr(zmq_transport, "check_ipc_path_free", probe)
        outcomes.append(attempt(second, endpoint))

    monkeypatch.setattr(zmq_transport, "check_ipc_path_free", probe_then_the_other_binds)
    outcomes.insert(0, attempt(first, endpoint))
    return outcomes


def attempt(binder: ZmqTransport, endpoint: str) -> BaseException | None:
    try:
        binder.bind([endpoint])
    except EndpointInUse as exc:
        return exc
    return None


def test_a_bind_between_another_binders_probe_and_bind_is_refused(
    monkeypatch: pytest.MonkeyPatch, ipc_dir: Path, transports: list[ZmqTransport],
) -> None:
    """Before: both binds succeeded; the first replaced the second's socket file, so the
    second node ran unreachable (and its exit removed the first's file)."""
    path = ipc_dir / "node.sock"
    first, second = transport(transports, "A"), transport(transports, "B")
    [first_outcome, second_outcome] = race(monkeypatch, first, second, f"ipc://{path}")
    assert first_outcome is None
    assert isinstance(second_outcome, EndpointInUse)
    assert f"{path}.lock" in str(second_outcome)
    assert second.bound == []
    assert answers(path, first)
    # The refused one leaves the path alone: closing it removes nothing of first's.
    second.close()
    transports.remove(second)
    assert path.exists() and answers(path, first)


def test_a_path_is_free_again_once_its_node_closed(
    ipc_dir: Path, transports: list[ZmqTransport],
) -> None:
    path = ipc_dir / "node.sock"
    first = transport(transports, "A")
    first.bind([f"ipc://{path}"])
    assert isinstance(attempt(transport(transports, "B"), f"ipc://{path}"), EndpointInUse)
    first.close()
    transports.remove(first)
    assert not path.exists() and not Path(f"{path}.lock").exists()
    third = transport(transports, "C")
    assert attempt(third, f"ipc://{path}") is None
    assert answers(path, third)


def test_a_lock_file_and_a_socket_file_left_by_a_killed_node_do_not_stop_a_bind(
    ipc_dir: Path, transports: list[ZmqTransport],
) -> None:
    """kill -9 leaves both files; the kernel released the lock with the process."""
    path = ipc_dir / "node.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(path))  # bound, never listening: a connect is refused
    Path(f"{path}.lock").write_bytes(b"")
    binder = transport(transports, "A")
    assert attempt(binder, f"ipc://{path}") is None
    assert answers(path, binder)


def test_a_path_served_by_a_process_without_the_lock_is_still_refused(
    ipc_dir: Path, transports: list[ZmqTransport],
) -> None:
    """The probe stays: a process that takes no lock (an older meshpost, another program)
    answers a connect."""
    path = ipc_dir / "node.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as serving:
        serving.bind(str(path))
        serving.listen(1)
        outcome = attempt(transport(transports, "A"), f"ipc://{path}")
        assert isinstance(outcome, EndpointInUse)
        assert "answered a connect" in str(outcome)
    assert not Path(f"{path}.lock").exists()  # released, and nothing left behind
    os.unlink(path)

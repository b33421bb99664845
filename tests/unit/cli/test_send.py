"""`meshpost send --lines` through a node that exits in the middle: the user is told how many
messages the node answered, so that the rest are not sent again blindly (they may be stored)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from meshpost.cli import main
from meshpost.control import ENDPOINT_FILE

#: A stand-in node in a process of its own: answers the first two send requests as delivered,
#: reads the third, then exits without answering it (as a node killed mid-stream does).
FAKE_NODE = textwrap.dedent("""
    import sys, zmq
    from meshpost.control.messages import SendReply, SendResult, encoder, request_decoder
    endpoint = sys.argv[1]
    socket = zmq.Context().socket(zmq.ROUTER)
    socket.setsockopt(zmq.LINGER, 1000)
    socket.bind(endpoint)
    print("ready", flush=True)
    for n in range(3):
        identity, data = socket.recv_multipart()
        request = request_decoder.decode(data)
        if n < 2:
            result = SendResult("B", f"m-{n}", n + 1, 1, True, 2, 2, "full")
            socket.send_multipart([identity, encoder.encode(SendReply(sent=[result],
                                                                        id=request.id))])
    socket.close()
""")


@contextmanager
def fake_node(data_dir: Path, script: str) -> Iterator[None]:
    """Run `script` as a stand-in node whose control socket is in `data_dir`: started and
    ready on entry (the CLI finds it through the endpoint file), killed on exit."""
    endpoint = f"ipc://{data_dir}/ctl.sock"
    node = subprocess.Popen([sys.executable, "-c", script, endpoint],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert node.stdout is not None
        assert node.stdout.readline() == "ready\n"
        (data_dir / ENDPOINT_FILE).write_text(f"{endpoint}\n{node.pid}\n")
        yield
    finally:
        node.kill()
        node.wait(10)
        if node.stdout is not None:
            node.stdout.close()


def test_send_lines_says_how_many_were_answered_when_the_node_exits_mid_stream(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    lines = tmp_path / "lines.txt"
    lines.write_text("one\ntwo\nthree\nfour\nfive\n", encoding="utf-8")
    with fake_node(tmp_path, FAKE_NODE):
        code = main(["send", "--node", "A", "--data", str(tmp_path), "--to", "B", "-l",
                     "-f", str(lines), "--window", "1"])
    out, err = capsys.readouterr()
    assert code == 4
    assert out.count("✓ delivered to B") == 2
    assert "2 of 5 messages were answered before A stopped; messages 3-5 may or may not" in err
    assert "stopped (process" in err


#: A stand-in node that answers one submit request with two task ids, then exits.
FAKE_VENTILATOR = textwrap.dedent("""
    import sys, zmq
    from meshpost.control.messages import SubmitReply, encoder, request_decoder
    socket = zmq.Context().socket(zmq.ROUTER)
    socket.setsockopt(zmq.LINGER, 1000)
    socket.bind(sys.argv[1])
    print("ready", flush=True)
    identity, data = socket.recv_multipart()
    request = request_decoder.decode(data)
    reply = SubmitReply(task_ids=["t-1", "t-2"], id=request.id)
    socket.send_multipart([identity, encoder.encode(reply)])
    socket.close()
""")


def test_task_prints_the_ids_alone_on_stdout_and_says_where_results_go_on_stderr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    with fake_node(tmp_path, FAKE_VENTILATOR):
        code = main(["task", "--node", "V", "--data", str(tmp_path), "--queue", "upper",
                     "--sink", "S", "hola", "mundo"])
    out, err = capsys.readouterr()
    assert code == 0
    assert out.split() == ["t-1", "t-2"]  # scripts read the ids
    assert "2 task(s) queued on 'upper' (ids above); each result goes to S" in err
    assert "meshpost history --node S" in err and "meshpost queue status upper --node V" in err


def test_task_hints_carry_data_folders_so_they_work_for_a_cluster(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """README's seed 002 on a cluster: `task --node A --data CLUSTER/A --sink D`. The hint
    said `meshpost history --node D` and `queue status upper --node A`, which look in the
    default folders and exit 4; it names the folders now (D's is A's sibling there)."""
    ventilator, sink = tmp_path / "A", tmp_path / "D"
    ventilator.mkdir()
    sink.mkdir()
    (sink / "meshpost.db").touch()
    with fake_node(ventilator, FAKE_VENTILATOR):
        code = main(["task", "--node", "A", "--data", str(ventilator), "--queue", "upper",
                     "--sink", "D", "hola", "mundo"])
    err = capsys.readouterr().err
    assert code == 0
    assert f"`meshpost history --node D --data {sink}`" in err
    assert f"`meshpost queue status upper --node A --data {ventilator}`" in err


def test_task_hint_names_no_sink_folder_it_cannot_see(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    with fake_node(tmp_path, FAKE_VENTILATOR):
        code = main(["task", "--node", "A", "--data", str(tmp_path), "--queue", "upper",
                     "--sink", "D", "hola"])
    err = capsys.readouterr().err
    assert code == 0
    assert "`meshpost history --node D`" in err

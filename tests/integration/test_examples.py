"""examples/ runs: the two-node chat in its non-interactive mode, and the pattern examples
(pair echo, request/reply, push/pull) of issue 18."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: Two nodes, six messages; past this the example hangs, which is a failure.
EXAMPLE_TIMEOUT_S = 60


def test_the_chat_example_carries_every_line_both_ways() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "chat.py"), "--demo"],
                          capture_output=True, text=True, timeout=EXAMPLE_TIMEOUT_S,
                          check=False)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert sorted(line for line in lines if " > " in line) == sorted(
        [*(f"A > hello B, this is line {i}" for i in range(3)),
         *(f"B > hello A, and this is answer {i}" for i in range(3))])
    assert lines.count("  ✓ stored by B") == 3
    assert lines.count("  ✓ stored by A") == 3


def run_example(name: str) -> list[str]:
    done = subprocess.run([sys.executable, str(ROOT / "examples" / name)], capture_output=True,
                          text=True, timeout=EXAMPLE_TIMEOUT_S, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_the_pair_echo_example_gets_every_line_back_as_a_linked_echo() -> None:
    assert run_example("pair_echo.py") == [
        "B > hola  (echo of 'hola')", "B > ¿qué tal?  (echo of '¿qué tal?')",
        "B > adiós  (echo of 'adiós')"]


def test_the_request_reply_example_gets_each_answer() -> None:
    lines = run_example("request_reply.py")
    assert [line.split(" (")[0] for line in lines] == [
        "A asked 2+3, B replied 5", "A asked 40+2, B replied 42", "A asked 1+2+3+4, B replied 10"]


def test_the_push_pull_example_uses_both_workers_and_keeps_each_result_once() -> None:
    lines = run_example("push_pull_upper.py")
    results = sorted(line.split(": ", 1)[1] for line in lines if line.startswith("S < "))
    words = ["hola", "mundo", "cero", "eme", "cu", "ventilador", "trabajador", "sumidero"]
    assert results == sorted(f"{w} -> {w.upper()}" for w in words)
    assert lines[-1] == "every result once: 8 tasks, by worker {'W1': 4, 'W2': 4}"


def test_the_pipeline_example_ends_each_client_at_its_x_over_tcp_and_ipc() -> None:
    lines = run_example("pipeline_tcp_ipc.py")
    # The seed's ten items alternate between A (over tcp) and C (over ipc), in order.
    items = ["1", "2", "3", "Esta es una prueba,1", "Desde zeroMQ,2", "Sigo probando,3",
             "Prueba...,4", "q,5", "1,6", "q,7"]
    assert [line for line in lines if line.startswith("A (tcp): ")] == [
        f"A (tcp): {t}" for t in items[0::2]]
    assert [line for line in lines if line.startswith("C (ipc): ")] == [
        f"C (ipc): {t}" for t in items[1::2]]
    assert "A: got 'x', done" in lines and "C: got 'x', done" in lines
    assert lines[-1] == "every text arrived once, in order"

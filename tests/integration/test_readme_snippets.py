"""Every ```python block of README.md runs, as written, in a fresh interpreter."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: A snippet runs two nodes at most; past this it hangs, which is a failure.
SNIPPET_TIMEOUT_S = 60


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)


SNIPPETS = python_blocks((ROOT / "README.md").read_text(encoding="utf-8"))


def test_the_readme_has_python_snippets() -> None:
    assert SNIPPETS


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[f"snippet-{i}" for i in range(len(SNIPPETS))])
def test_a_readme_snippet_runs(snippet: str, tmp_path: Path) -> None:
    script = tmp_path / "snippet.py"
    script.write_text(snippet, encoding="utf-8")
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=SNIPPET_TIMEOUT_S, check=False)
    assert done.returncode == 0, done.stderr
    if "asyncio.run(main())" in snippet and "print(" in snippet:
        assert done.stdout.strip(), "the snippet printed nothing"


def test_python_blocks_are_found_whole() -> None:
    text = "x\n```python\na = 1\nb = 2\n```\n```sh\nls\n```\n```python\nc = 3\n```\n"
    assert python_blocks(text) == ["a = 1\nb = 2\n", "c = 3\n"]

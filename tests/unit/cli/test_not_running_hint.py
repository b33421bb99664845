"""A cluster node named without its `--data` (README's cluster commands all carry it): the
"not running" / "no store" error adds the `--data` of the cluster's node of that name, so the
user need not guess where `cluster up` put it."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshpost.cli import main
from meshpost.errors import EXIT_NOT_RUNNING


@pytest.fixture
def cluster_node_d(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A default cluster folder with a node D that has run (its store is there)."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    folder = tmp_path / "meshpost" / "cluster" / "D"
    folder.mkdir(parents=True)
    (folder / "meshpost.db").touch()
    return folder


def test_history_of_a_cluster_node_without_data_names_the_folder(
    cluster_node_d: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["history", "--node", "D"]) == EXIT_NOT_RUNNING
    err = capsys.readouterr().err
    assert "no meshpost database at" in err
    assert f"the cluster's node D keeps its data in {cluster_node_d}: add `--data " in err


def test_a_command_to_a_running_node_without_data_names_the_cluster_folder(
    cluster_node_d: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["queue", "status", "--node", "D"]) == EXIT_NOT_RUNNING
    err = capsys.readouterr().err
    assert "node 'D' is not running" in err
    assert f"add `--data {cluster_node_d}`" in err


def test_no_hint_for_a_name_the_cluster_does_not_have_or_with_data_given(
    cluster_node_d: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["queue", "status", "--node", "E"]) == EXIT_NOT_RUNNING
    assert main(["queue", "status", "--node", "D", "--data", str(tmp_path / "D")]) == \
        EXIT_NOT_RUNNING
    assert "the cluster's node" not in capsys.readouterr().err

"""Every error class names its kind and exit code; one mapping serves CLI, server and console."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from meshpost import errors
from meshpost.errors import (
    EXIT_CODES,
    MeshpostError,
    RemoteError,
    exit_code_for,
)

ERRORS_PY = Path(errors.__file__)


def _error_classes() -> list[type[MeshpostError]]:
    return [cls for _, cls in inspect.getmembers(errors, inspect.isclass)
            if issubclass(cls, MeshpostError) and cls.__module__ == errors.__name__]


def test_every_class_in_errors_py_names_its_kind_explicitly() -> None:
    tree = ast.parse(ERRORS_PY.read_text(encoding="utf-8"))
    missing = [node.name for node in ast.walk(tree)
               if isinstance(node, ast.ClassDef) and node.name != "MeshpostError"
               and not any(k.arg == "kind" for k in node.keywords)]
    assert not missing, f"classes without kind=...: {missing}"


def test_kinds_are_unique_and_each_maps_to_its_class_exit_code() -> None:
    classes = _error_classes()
    kinds = [cls.kind for cls in classes]
    assert len(kinds) == len(set(kinds)), sorted(kinds)
    for cls in classes:
        assert EXIT_CODES[cls.kind] == cls.exit_code == exit_code_for(cls.kind), cls


@pytest.mark.parametrize(("name", "code"), [
    ("ConfigError", 2), ("InvalidName", 2), ("UnknownPeer", 2), ("EmptyMessage", 2),
    ("MessageTooLarge", 2), ("InvalidEndpoint", 2), ("ReceiptTimeout", 3),
    ("ControlUnavailable", 4), ("NodeClosed", 4), ("NodeStopped", 4), ("MessageRejected", 5),
    ("StoreError", 6), ("StoreFull", 6), ("StoreLocked", 6), ("NotStored", 6),
    ("EndpointInUse", 7), ("ControlTimeout", 1), ("ProtocolError", 1), ("NoStore", 4),
    ("ClusterNotRunning", 4), ("ClusterAlreadyRunning", 2), ("NodeNotStarted", 8),
])
def test_exit_codes_follow_the_documented_table(name: str, code: int) -> None:
    assert getattr(errors, name).exit_code == code


def test_a_remote_error_carries_the_kind_and_exit_code_of_the_node_side_class() -> None:
    exc = RemoteError("store_full", "database x is full")
    assert (exc.kind, exc.exit_code, str(exc)) == ("store_full", 6, "database x is full")
    assert RemoteError("a_kind_from_a_newer_node", "?").exit_code == 1


def test_a_subclass_elsewhere_gets_a_kind_from_its_name() -> None:
    class SomethingOdd(MeshpostError):
        pass

    assert SomethingOdd.kind == "something_odd"
    assert SomethingOdd.exit_code == 1


def test_cli_has_no_second_mapping_by_class_name() -> None:
    import meshpost.cli

    package = Path(meshpost.cli.__file__).parent
    source = "\n".join(p.read_text(encoding="utf-8") for p in sorted(package.glob("*.py")))
    assert "def main(" in source  # the whole CLI package was read
    assert "_exit_code" not in source
    assert "error_kind in" not in source


def test_protocol_md_lists_every_error_kind_with_its_exit_code() -> None:
    import re

    doc = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text("utf-8")
    section = doc[doc.index("### 14.6"):]
    rows = re.findall(r"^\| `(\w+)` \| (\d+) \| `(\w+)` \|$", section, flags=re.M)
    assert {(kind, int(code), name) for kind, code, name in rows} == {
        (cls.kind, cls.exit_code, cls.__name__) for cls in _error_classes()}

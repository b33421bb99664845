"""The layering of src/meshpost, checked from the source: lower layers never import higher ones.

Every `import` and `from ... import` in every module is read with `ast` (including imports
inside functions and under `if TYPE_CHECKING:`, which are dependencies all the same), so the
rules hold for the code as written, not only for what a test happens to execute.

The layers, top to bottom (docs/architecture.md draws them):

    cli, __main__
    demo, bench               (bench's own modules are layered too: BENCH_RANKS)
    cluster                   (a local mesh: its config, processes and state file)
    processes                 (a `meshpost node` or `meshpost host` child; asks a host through host)
    host, console, remote, timeline
    roles                     (echo, workers, gateways, discovery of a lone or hosted node)
    control (package: messages, server, client), verify, keys, text, gateway, discovery
    node                      (the `meshpost` package facade re-exports it)
    store, transport, rules, eventloop
    protocol
    clock, config
    errors, probes, lazy
"""

from __future__ import annotations

import ast
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = SRC / "meshpost"

#: Rank of every component (first name below `meshpost`); an import must go to a strictly
#: lower rank or stay inside its own component. "" is the package itself (`meshpost/__init__`).
#: A module that is not listed here fails `test_every_module_has_a_layer`: give it one.
RANKS: dict[str, int] = {
    "errors": 0,
    "probes": 0,
    "lazy": 0,  # package exports imported on first use (imports nothing from meshpost)
    "clock": 1,
    "config": 1,
    "protocol": 2,
    "rules": 3,  # the wire's size rule (protocol.frames.oversize) plus the local ones
    "store": 3,
    "transport": 3,
    "eventloop": 3,  # which loop a process runs (uvloop or asyncio); the node never chooses
    "node": 4,
    "": 5,  # the public facade: `from meshpost import Node, NodeConfig, ...`
    "control": 6,
    "verify": 6,
    "keys": 6,
    "text": 6,
    "gateway": 6,
    "discovery": 6,
    "roles": 7,  # what a node runs beside messaging: `meshpost node` and `host` share it
    "host": 8,
    "console": 8,
    "remote": 8,
    "timeline": 8,
    "processes": 9,
    "cluster": 10,
    "demo": 11,
    "pipeline": 11,
    "bench": 11,
    "cli": 12,
    "__main__": 13,
}

#: Standard-library and third-party modules that mean I/O, threads or real time.
IO_MODULES = frozenset(
    {"asyncio", "zmq", "sqlite3", "socket", "time", "threading", "selectors", "subprocess",
     "concurrent"}
)


@dataclasses.dataclass(frozen=True)
class Import:
    module: str  # the importing module, e.g. "meshpost.protocol.codec"
    target: str  # the imported module, e.g. "meshpost.errors" or "msgspec"
    line: int

    def __str__(self) -> str:
        return f"{self.module} imports {self.target} (line {self.line})"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def module_paths() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _resolve_relative(module: str, is_package: bool, level: int, name: str | None) -> str:
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join([*base, name] if name else base)


def imports_of(path: Path) -> Iterator[Import]:
    module = module_name(path)
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(module, alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _resolve_relative(module, path.name == "__init__.py", node.level,
                                         node.module)
            else:
                base = node.module or ""
            yield Import(module, base, node.lineno)
            if base == "meshpost":
                # `from meshpost import node` imports the module meshpost.node; `from meshpost
                # import Node` goes through the facade. Count both the facade and the name.
                for alias in node.names:
                    yield Import(module, f"meshpost.{alias.name}", node.lineno)


ALL_IMPORTS: list[Import] = [imp for path in module_paths() for imp in imports_of(path)]


def component(module: str) -> str:
    """`meshpost.protocol.codec` -> `protocol`; `meshpost` -> `""`."""
    parts = module.split(".")
    assert parts[0] == "meshpost", module
    return parts[1] if len(parts) > 1 else ""


def internal(imp: Import) -> bool:
    return imp.target == "meshpost" or imp.target.startswith("meshpost.")


def top_level(target: str) -> str:
    return target.split(".")[0]


def imports_from(comp: str) -> list[Import]:
    return [imp for imp in ALL_IMPORTS if component(imp.module) == comp]


def meshpost_targets(comp: str) -> set[str]:
    return {component(imp.target) for imp in imports_from(comp) if internal(imp)}


def existing_components() -> set[str]:
    return {component(module_name(p)) for p in module_paths()}


# -- the parser itself --------------------------------------------------------------------


def test_the_import_parser_sees_known_dependencies() -> None:
    """Guard against a parser that finds nothing and so passes every rule vacuously."""
    assert {"transport", "store", "protocol", "clock", "config", "errors"} <= meshpost_targets(
        "node"
    )
    assert "errors" in meshpost_targets("protocol")
    assert "zmq" in {top_level(i.target) for i in imports_from("transport")}
    # cli imports most of its commands lazily, inside functions: those count too.
    assert {"control", "node", "store"} <= meshpost_targets("cli")


def test_relative_imports_resolve_like_python() -> None:
    assert _resolve_relative("meshpost.protocol.codec", False, 1, "frames") == (
        "meshpost.protocol.frames"
    )
    assert _resolve_relative("meshpost.protocol", True, 1, "codec") == "meshpost.protocol.codec"
    assert _resolve_relative("meshpost.store.writer", False, 2, "errors") == "meshpost.errors"


def test_every_module_has_a_layer() -> None:
    unlisted = existing_components() - set(RANKS)
    assert not unlisted, (
        f"modules {sorted(unlisted)} have no layer: add them to RANKS here and to the diagram "
        "in docs/architecture.md"
    )


# -- the general rule ---------------------------------------------------------------------


def test_imports_only_point_down_the_layers() -> None:
    upward = []
    for imp in ALL_IMPORTS:
        if not internal(imp):
            continue
        src, dst = component(imp.module), component(imp.target)
        if src == dst or dst not in RANKS:
            # Inside one package is fine; a target with no rank does not exist yet (an
            # import of a missing module fails at import time, not here).
            continue
        if RANKS[dst] >= RANKS[src]:
            upward.append(f"{imp}: {src or 'meshpost'} (layer {RANKS[src]}) may not import "
                          f"{dst or 'the meshpost facade'} (layer {RANKS[dst]})")
    assert not upward, "\n".join(upward)


# -- the specific rules -------------------------------------------------------------------


def test_protocol_is_sans_io() -> None:
    bad = [str(imp) for imp in imports_from("protocol") if top_level(imp.target) in IO_MODULES]
    assert not bad, "the wire protocol must not do I/O:\n" + "\n".join(bad)


#: The patterns' state machines (issue 18) are protocol modules, sans-IO like the links. Named
#: here so that moving one out of protocol/ (where the rule above would no longer see it)
#: fails this test instead of escaping the rule.
PATTERN_MODULES = ("header", "workqueue", "groups", "requests", "history", "ratelimit")


@pytest.mark.parametrize("name", PATTERN_MODULES)
def test_pattern_state_machines_are_sans_io(name: str) -> None:
    module = f"meshpost.protocol.{name}"
    imports = [imp for imp in ALL_IMPORTS if imp.module == module]
    assert imports, f"{module} is not in src/meshpost/protocol/"
    bad = [str(imp) for imp in imports if top_level(imp.target) in IO_MODULES]
    assert not bad, "the patterns' state machines must not do I/O:\n" + "\n".join(bad)


def test_protocol_imports_only_errors_clock_and_itself() -> None:
    bad = [
        str(imp) for imp in imports_from("protocol")
        if internal(imp) and component(imp.target) not in {"errors", "clock", "protocol"}
    ]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize(
    ("comp", "forbidden"),
    [
        ("store", {"transport", "node", "cli", "console", "control", "cluster", "demo", "bench",
                   "remote", "verify", "keys", ""}),
        ("transport", {"store", "node", "cli", "protocol", "console", "control", "cluster",
                       "demo", "bench", "remote", "verify", ""}),
        ("node", {"cli", "console", "control", "cluster", "demo", "bench", "remote", "verify",
                  ""}),
        ("control", {"cli", "console", "remote", "cluster", "demo", "bench", "timeline",
                     "store", "transport", ""}),
        ("clock", {"config", "protocol", "store", "transport", "node", "cli", ""}),
        ("config", {"clock", "protocol", "store", "transport", "node", "cli", ""}),
    ],
)
def test_component_does_not_import(comp: str, forbidden: set[str]) -> None:
    bad = [str(imp) for imp in imports_from(comp)
           if internal(imp) and component(imp.target) in forbidden]
    assert not bad, "\n".join(bad)


#: The bench package inside, bottom to top: the registry and results are plain data, the
#: scenarios use everything below them (and name `Bench` only for type checkers), the facade
#: re-exports. "" is `meshpost.bench` itself.
BENCH_RANKS: dict[str, int] = {
    "options": 0,
    "results": 0,
    "support": 1,
    "meters": 1,
    "servers": 1,
    "drive": 2,
    "report": 2,
    "hosting": 3,
    "children": 4,
    "runner": 5,
    "scenarios": 6,
    "": 7,
    "__main__": 8,
}


def bench_part(module: str) -> str:
    """`meshpost.bench.scenarios.mesh` -> `scenarios`; `meshpost.bench` -> `""`."""
    parts = module.split(".")
    return parts[2] if len(parts) > 2 else ""


def test_every_bench_module_has_a_layer() -> None:
    parts = {bench_part(module_name(p)) for p in module_paths()
             if component(module_name(p)) == "bench"}
    assert parts == set(BENCH_RANKS), "give each module of meshpost/bench a rank in BENCH_RANKS"


def test_bench_modules_import_only_down() -> None:
    upward = []
    for imp in imports_from("bench"):
        if not imp.target.startswith("meshpost.bench"):
            continue
        src, dst = bench_part(imp.module), bench_part(imp.target)
        if src != dst and BENCH_RANKS[dst] >= BENCH_RANKS[src]:
            upward.append(f"{imp}: bench.{src or '__init__'} may not import bench.{dst}")
    assert not upward, "\n".join(upward)


def test_the_bench_registry_imports_only_the_standard_library() -> None:
    """`meshpost --help` reads it: it must stay as cheap to import as argparse."""
    bad = [str(imp) for imp in ALL_IMPORTS if imp.module == "meshpost.bench.options"
           and top_level(imp.target) not in {"__future__", "argparse", "dataclasses", "sys",
                                             "collections", "pathlib"}]
    assert not bad, "\n".join(bad)


def test_only_the_bench_uses_its_extra() -> None:
    """psutil and matplotlib come with the `bench` extra, not with meshpost itself."""
    bad = [str(imp) for imp in ALL_IMPORTS if top_level(imp.target) in {"psutil", "matplotlib"}
           and component(imp.module) != "bench"]
    assert not bad, "\n".join(bad)


#: The node package inside, bottom to top: the records are plain data, each component (the
#: links, the inbound path, the receipts, the events, the readers and the patterns) uses them,
#: the events own the checks of name claims (claims), core composes the components, the
#: package re-exports. "" is `meshpost.node`.
NODE_RANKS: dict[str, int] = {
    "records": 0,
    "claims": 1,
    "events": 2,
    "groups": 1,
    "inbound": 1,
    "links": 1,
    "readers": 1,
    "receipts": 1,
    "requests": 1,
    "workqueue": 1,
    "core": 3,
    "": 4,
}
#: A component names `Node` in its annotations only (under `if TYPE_CHECKING:`): core
#: imports the components at run time, so the other way round would be a cycle.
NODE_TYPE_ONLY = {("claims", "core"), ("events", "core"), ("groups", "core"), ("inbound", "core"),
                  ("links", "core"), ("readers", "core"), ("receipts", "core"),
                  ("requests", "core"), ("workqueue", "core")}


def node_part(module: str) -> str:
    """`meshpost.node.core` -> `core`; `meshpost.node` -> `""`."""
    parts = module.split(".")
    return parts[2] if len(parts) > 2 else ""


def test_every_node_module_has_a_layer() -> None:
    parts = {node_part(module_name(p)) for p in module_paths()
             if component(module_name(p)) == "node"}
    assert parts == set(NODE_RANKS), "give each module of meshpost/node a rank in NODE_RANKS"


def test_node_modules_import_only_down() -> None:
    upward = []
    for imp in imports_from("node"):
        if not imp.target.startswith("meshpost.node"):
            continue
        src, dst = node_part(imp.module), node_part(imp.target)
        if (src != dst and NODE_RANKS[dst] >= NODE_RANKS[src]
                and (src, dst) not in NODE_TYPE_ONLY):
            upward.append(f"{imp}: node.{src or '__init__'} may not import node.{dst}")
    assert not upward, "\n".join(upward)


def test_node_components_import_core_for_types_only() -> None:
    """Importing a component's module alone does not load core (its import is type-only)."""
    for src, _core in sorted(NODE_TYPE_ONLY):
        source = (PACKAGE / "node" / f"{src}.py").read_text(encoding="utf-8")
        tree = ast.parse(source)
        runtime = [n for n in tree.body if isinstance(n, ast.ImportFrom)
                   and n.module == "meshpost.node.core"]
        assert not runtime, f"meshpost.node.{src} imports node.core at run time"
        guarded = [n for n in tree.body if isinstance(n, ast.If)
                   and ast.unparse(n.test) == "TYPE_CHECKING"
                   and any(isinstance(i, ast.ImportFrom) and i.module == "meshpost.node.core"
                           for i in n.body)]
        assert guarded, f"meshpost.node.{src} should name Node under `if TYPE_CHECKING:`"


#: The store package inside, bottom to top: checksums, connections and the schema; what
#: verifies rows and the pattern tables' SQL; the read side (`StoreReader`); the write side
#: (`Store`, which composes a reader); the WAL's checkpoints and start-overs (`WalKeeper`); the
#: group-commit writer, which composes it; the package re-exports.
STORE_RANKS: dict[str, int] = {
    "checksum": 0,
    "connection": 0,
    "schema": 0,
    "verifier": 1,
    "patterns": 1,
    "reader": 2,
    "sqlite": 3,
    "checkpoints": 4,
    "writer": 5,
    "": 6,
}


def store_part(module: str) -> str:
    """`meshpost.store.reader` -> `reader`; `meshpost.store` -> `""`."""
    parts = module.split(".")
    return parts[2] if len(parts) > 2 else ""


def test_every_store_module_has_a_layer() -> None:
    parts = {store_part(module_name(p)) for p in module_paths()
             if component(module_name(p)) == "store"}
    assert parts == set(STORE_RANKS), "give each module of meshpost/store a rank in STORE_RANKS"


def test_store_modules_import_only_down() -> None:
    """In particular the read side never imports the write side (`reader` is below `sqlite`)."""
    upward = []
    for imp in imports_from("store"):
        if not imp.target.startswith("meshpost.store"):
            continue
        src, dst = store_part(imp.module), store_part(imp.target)
        if src != dst and STORE_RANKS[dst] >= STORE_RANKS[src]:
            upward.append(f"{imp}: store.{src or '__init__'} may not import store.{dst}")
    assert not upward, "\n".join(upward)


#: The protocol package inside, bottom to top: limits and the pure helpers; the pattern
#: header; the frames; the codec, the events and the patterns' machines; a link's outbox
#: (what it holds and sends); its loss recovery (when it resends, probes, redials: composes
#: the RTO estimator); the link state machines (the dialer composes its outbox and its loss
#: recovery); the tables printed from their transitions; the package re-exports. "" is
#: `meshpost.protocol`.
PROTOCOL_RANKS: dict[str, int] = {
    "limits": 0,
    "rto": 0,
    "ratelimit": 0,
    "requests": 0,
    "header": 1,
    "frames": 2,
    "groups": 2,
    "workqueue": 2,  # takes the header's lease limit (MAX_LEASE_MS) for its lease rule
    "history": 2,
    "codec": 3,
    "events": 3,
    "outbox": 3,
    "claims": 4,  # who a keyless name is: the listener's claim book (reports ClaimCheckWanted)
    "recovery": 4,
    "dialer": 5,
    "listener": 5,
    "tables": 6,
    "": 7,
}
#: The loss recovery names `DialerLink` in its annotations only (under `if TYPE_CHECKING:`):
#: the dialer composes it at run time, so the other way round would be a cycle.
PROTOCOL_TYPE_ONLY = {("recovery", "dialer")}


def protocol_part(module: str) -> str:
    """`meshpost.protocol.outbox` -> `outbox`; `meshpost.protocol` -> `""`."""
    parts = module.split(".")
    return parts[2] if len(parts) > 2 else ""


def test_every_protocol_module_has_a_layer() -> None:
    parts = {protocol_part(module_name(p)) for p in module_paths()
             if component(module_name(p)) == "protocol"}
    assert parts == set(PROTOCOL_RANKS), (
        "give each module of meshpost/protocol a rank in PROTOCOL_RANKS")


def test_protocol_modules_import_only_down() -> None:
    """In particular the outbox knows nothing of the link that composes it (no events, no
    codec, no timers: what the peer said reaches it through the dialer)."""
    upward = []
    for imp in imports_from("protocol"):
        if not imp.target.startswith("meshpost.protocol"):
            continue
        src, dst = protocol_part(imp.module), protocol_part(imp.target)
        if (src != dst and PROTOCOL_RANKS[dst] >= PROTOCOL_RANKS[src]
                and (src, dst) not in PROTOCOL_TYPE_ONLY):
            upward.append(f"{imp}: protocol.{src or '__init__'} may not import "
                          f"protocol.{dst}")
    assert not upward, "\n".join(upward)


def test_the_loss_recovery_imports_the_dialer_for_types_only() -> None:
    """Importing the recovery module alone does not load the dialer."""
    for src, dst in sorted(PROTOCOL_TYPE_ONLY):
        tree = ast.parse((PACKAGE / "protocol" / f"{src}.py").read_text(encoding="utf-8"))
        target = f"meshpost.protocol.{dst}"
        runtime = [n for n in tree.body if isinstance(n, ast.ImportFrom) and n.module == target]
        assert not runtime, f"meshpost.protocol.{src} imports protocol.{dst} at run time"
        guarded = [n for n in tree.body if isinstance(n, ast.If)
                   and ast.unparse(n.test) == "TYPE_CHECKING"
                   and any(isinstance(i, ast.ImportFrom) and i.module == target
                           for i in n.body)]
        assert guarded, f"meshpost.protocol.{src} should name {dst} under `if TYPE_CHECKING:`"


def test_the_outbox_imports_only_the_frames() -> None:
    """The outbox is data about messages: it takes frames' types and nothing else of
    meshpost (no clock, no errors: a bad frame never reaches it, the dialer decodes)."""
    bad = [str(imp) for imp in ALL_IMPORTS if imp.module == "meshpost.protocol.outbox"
           and internal(imp) and imp.target != "meshpost.protocol.frames"]
    assert not bad, "\n".join(bad)


#: The console package inside, bottom to top: the command language (pure), the running
#: console that performs its commands, the package re-exports. "" is `meshpost.console`.
CONSOLE_RANKS: dict[str, int] = {
    "commands": 0,
    "app": 1,
    "": 2,
}


def console_part(module: str) -> str:
    """`meshpost.console.commands` -> `commands`; `meshpost.console` -> `""`."""
    parts = module.split(".")
    return parts[2] if len(parts) > 2 else ""


def test_every_console_module_has_a_layer() -> None:
    parts = {console_part(module_name(p)) for p in module_paths()
             if component(module_name(p)) == "console"}
    assert parts == set(CONSOLE_RANKS), (
        "give each module of meshpost/console a rank in CONSOLE_RANKS")


def test_console_modules_import_only_down() -> None:
    upward = []
    for imp in imports_from("console"):
        if not imp.target.startswith("meshpost.console"):
            continue
        src, dst = console_part(imp.module), console_part(imp.target)
        if src != dst and CONSOLE_RANKS[dst] >= CONSOLE_RANKS[src]:
            upward.append(f"{imp}: console.{src or '__init__'} may not import console.{dst}")
    assert not upward, "\n".join(upward)


def test_the_console_command_language_is_pure() -> None:
    """Parsing a line needs no terminal, event loop, node or store: `console.commands` imports
    no prompt_toolkit, rich or I/O module, and of meshpost only the errors."""
    imports = [imp for imp in ALL_IMPORTS if imp.module == "meshpost.console.commands"]
    assert imports, "meshpost.console.commands is not in src/meshpost/console/"
    bad = [str(imp) for imp in imports
           if top_level(imp.target) in IO_MODULES | {"prompt_toolkit", "rich"}
           or (internal(imp) and imp.target != "meshpost.errors")]
    assert not bad, "\n".join(bad)


def test_errors_imports_nothing_from_meshpost() -> None:
    bad = [str(imp) for imp in imports_from("errors") if internal(imp)]
    assert not bad, "\n".join(bad)


def test_control_messages_are_plain_data() -> None:
    """The control records import no I/O: the sync and asyncio clients and the server share
    them, and a test can build any record without a socket."""
    path = PACKAGE / "control" / "messages.py"
    bad = [str(imp) for imp in imports_of(path) if top_level(imp.target) in IO_MODULES]
    assert not bad, "\n".join(bad)

"""docs/architecture.md's layer diagram tells the truth: every arrow is an import in the source.

Reads the one mermaid block of the document; each arrow `a --> b` must be an import from
component `a` to component `b` (as `test_layering` reads them, with `ast`), and every component
of the package must appear in the diagram, so the drawing follows the code when either moves.
"""

from __future__ import annotations

import re
from pathlib import Path

from test_layering import ALL_IMPORTS, RANKS, component, internal

DOC = Path(__file__).resolve().parents[2] / "docs" / "architecture.md"
#: Diagram ids that are not a component's own name.
ALIASES = {"main": "__main__", "api": ""}
ARROW = re.compile(r"^\s*(\w+)(?:\[[^\]]*\])?\s*-->\s*(\w+)(?:\[[^\]]*\])?\s*$")


def diagram_arrows() -> list[tuple[str, str]]:
    blocks = re.findall(r"```mermaid\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    assert len(blocks) == 1, f"docs/architecture.md should hold one diagram, has {len(blocks)}"
    arrows = []
    for line in blocks[0].splitlines():
        found = ARROW.match(line)
        if found:
            source, target = found.groups()
            arrows.append((ALIASES.get(source, source), ALIASES.get(target, target)))
    assert arrows, "no arrows found in the diagram"
    return arrows


def real_imports() -> set[tuple[str, str]]:
    return {
        (component(imp.module), component(imp.target))
        for imp in ALL_IMPORTS
        if internal(imp) and component(imp.module) != component(imp.target)
    }


def test_every_arrow_of_the_diagram_is_an_import() -> None:
    imports = real_imports()
    false = [f"{a or 'meshpost'} --> {b or 'meshpost'}" for a, b in diagram_arrows()
             if (a, b) not in imports]
    assert not false, "arrows with no such import in src/meshpost:\n" + "\n".join(false)


def test_every_component_is_drawn() -> None:
    drawn = {name for arrow in diagram_arrows() for name in arrow}
    missing = sorted(set(RANKS) - drawn)
    assert not missing, f"components missing from the diagram: {missing}"


def test_a_false_arrow_would_be_caught() -> None:
    # The check itself can fail: protocol never imports store.
    assert ("protocol", "store") not in real_imports()
    assert ("node", "store") in real_imports()


#: Imports the diagram leaves out on purpose: every layer raises the package's errors, and
#: `lazy` (deferred imports) and `__version__` carry no dependency worth drawing.
UNDRAWN_TARGETS = {"errors", "lazy", "__version__"}


def test_every_import_between_components_is_drawn() -> None:
    drawn = set(diagram_arrows())
    missing = sorted(f"{a or 'meshpost'} --> {b or 'meshpost'}"
                     for a, b in real_imports() - drawn if b not in UNDRAWN_TARGETS)
    assert not missing, "imports with no arrow in docs/architecture.md:\n" + "\n".join(missing)

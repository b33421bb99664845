"""Package exports imported on first use (a PEP 562 module `__getattr__`).

A `meshpost` command that only talks to a running node needs a few names from `meshpost`,
`meshpost.node` or `meshpost.store`, not SQLite, ZeroMQ and the node behind them: each of those
packages maps its public names to the modules that define them and imports a module when one of
its names is first read. Imports nothing from meshpost.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(
    package: str, exports: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """`__getattr__` and `__dir__` for `package` (its `__name__`), whose public names are
    `exports` (name -> the module that defines it). A name is imported once, then kept in
    the package's namespace, so later lookups never reach `__getattr__`."""
    namespace = sys.modules[package].__dict__

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted([*namespace, *exports])

    return __getattr__, __dir__

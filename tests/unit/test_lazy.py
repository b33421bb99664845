"""lazy_exports: a package's public names imported on first use, then kept."""

from __future__ import annotations

import sys
import types

import pytest

from meshpost.lazy import lazy_exports


def test_a_name_is_imported_on_first_use_and_then_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    package = types.ModuleType("fake_package")
    monkeypatch.setitem(sys.modules, "fake_package", package)
    monkeypatch.delitem(sys.modules, "json.decoder", raising=False)
    getattr_, dir_ = lazy_exports("fake_package", {"JSONDecoder": "json.decoder"})

    assert "JSONDecoder" not in vars(package)
    assert "JSONDecoder" in dir_()
    decoder = getattr_("JSONDecoder")
    assert decoder is sys.modules["json.decoder"].JSONDecoder
    assert vars(package)["JSONDecoder"] is decoder  # later lookups never reach __getattr__


def test_an_unknown_name_is_an_attribute_error_naming_the_package(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "fake_package", types.ModuleType("fake_package"))
    getattr_, _ = lazy_exports("fake_package", {})
    with pytest.raises(AttributeError, match="module 'fake_package' has no attribute 'nope'"):
        getattr_("nope")


def test_the_packages_use_it() -> None:
    import meshpost
    import meshpost.store

    assert meshpost.__getattr__.__module__ == "meshpost.lazy"
    assert meshpost.store.Store.__name__ == "Store"

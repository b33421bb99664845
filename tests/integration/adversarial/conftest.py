"""Fixtures of the adversarial tests: the fault battery's meshes and exact store checker."""

from __future__ import annotations

from tests.integration.faults.conftest import (  # re-exported as this folder's fixtures
    MeshFactory,
    mesh_factory,
    until_true,
    workdir,
)

__all__ = ["MeshFactory", "mesh_factory", "until_true", "workdir"]

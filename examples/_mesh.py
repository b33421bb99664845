"""Shared by the pattern examples: NodeConfigs for a full mesh of a few nodes on ipc://
sockets in one folder (nothing leaves this machine)."""

from __future__ import annotations

from pathlib import Path

from meshpost import NodeConfig, PeerConfig


def mesh(names: list[str], root: Path) -> dict[str, NodeConfig]:
    """One config per name, each node a peer of every other."""
    return {
        name: NodeConfig(
            name=name, bind=(f"ipc://{root}/{name}.sock",),
            peers=tuple(PeerConfig(p, f"ipc://{root}/{p}.sock") for p in names if p != name),
            data_dir=root / name, sync="normal",
        )
        for name in names
    }

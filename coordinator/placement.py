"""Where a model goes. Pure functions: no I/O, no clock, deterministic for the same inputs.

Issue 2's rule is deliberately simple: the first node (by id) whose available memory holds the
model's weights. The unified-memory math (KV cache, OS reserve, wired limit) replaces it later.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from coordinator.registry import NodeId


@dataclass(frozen=True, slots=True)
class NodeCapacity:
    """What placement needs to know of one live node."""

    node_id: NodeId
    available_bytes: int


def weight_bytes(source: str) -> int:
    """Bytes of the safetensors files in a local model folder; 0 when unknown (a hub id)."""
    folder = Path(source)
    if not folder.is_dir():
        return 0
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def first_fit(need_bytes: int, nodes: Sequence[NodeCapacity]) -> NodeId | None:
    """The first node, in id order, with at least need_bytes available."""
    for node in sorted(nodes, key=lambda n: n.node_id):
        if node.available_bytes >= need_bytes:
            return node.node_id
    return None

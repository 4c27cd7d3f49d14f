"""Placement is pure: same inputs, same answer."""

from __future__ import annotations

from pathlib import Path

from coordinator.placement import NodeCapacity, first_fit, weight_bytes
from coordinator.registry import NodeId

GIB = 2**30


def test_first_fit_takes_the_first_node_by_id_that_holds_the_model() -> None:
    nodes = [
        NodeCapacity(NodeId("c"), 64 * GIB),
        NodeCapacity(NodeId("a"), 4 * GIB),
        NodeCapacity(NodeId("b"), 16 * GIB),
    ]
    assert first_fit(8 * GIB, nodes) == "b"
    assert first_fit(8 * GIB, list(reversed(nodes))) == "b"
    assert first_fit(1 * GIB, nodes) == "a"
    assert first_fit(128 * GIB, nodes) is None
    assert first_fit(0, []) is None


def test_weight_bytes_counts_safetensors_only(tmp_path: Path) -> None:
    (tmp_path / "model-00001.safetensors").write_bytes(b"x" * 1000)
    (tmp_path / "model-00002.safetensors").write_bytes(b"x" * 24)
    (tmp_path / "tokenizer.json").write_bytes(b"x" * 5000)
    assert weight_bytes(str(tmp_path)) == 1024
    assert weight_bytes("mlx-community/Qwen2.5-0.5B-Instruct-4bit") == 0

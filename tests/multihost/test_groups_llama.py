"""A group of a model whose mlx-lm architecture has no pipeline(): the 6-layer demo model as a
Llama, over two agents, runs under mlxfleet's own layer split (node_agent/engine/layer_split.py)
and answers as one engine of it does (tests/multihost/test_groups.py has the rest)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import wait_for
from tests.multihost.fleet import Fleet
from tests.multihost.test_groups import (
    READY_TIMEOUT_S,
    chat,
    check_layers,
    serving_group,
    single_engine,
    start_fleet,
)


@pytest.fixture(scope="module")
def fleet_llama(tmp_path_factory: pytest.TempPathFactory, demo_llama_6: Path) -> Iterator[Fleet]:
    """Two agents with room for 4.6 of the 6 layers each: one group of two."""
    yield from start_fleet(tmp_path_factory.mktemp("groups-llama"), demo_llama_6, 2, 4.6)


def test_a_llama_group_serves_as_one_engine_of_it_does(
    fleet_llama: Fleet, demo_llama_6: Path, tmp_path: Path
) -> None:
    assert json.loads((demo_llama_6 / "config.json").read_text())["model_type"] == "llama"
    group = wait_for(lambda: serving_group(fleet_llama, 2), READY_TIMEOUT_S, "a group of two")
    check_layers(group)
    client = fleet_llama.client()
    with single_engine(demo_llama_6, tmp_path) as engine:
        for stream in (False, True):
            assert chat(client, stream) == chat(engine, stream) != ""

"""Groups of architectures other than the demo's Qwen2 (tests/multihost/test_groups.py has the
rest): the 6-layer demo model as a Llama (no pipeline() in mlx-lm) runs under mlxfleet's own
layer split (node_agent/engine/layer_split.py) and answers as one engine of it does; a model no
split can run (Mamba: recurrent state, not a KV cache) fails to load once, says why, and is not
placed as a group again."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import wait_for
from tests.multihost.fleet import MODEL, Fleet
from tests.multihost.test_groups import (
    READY_TIMEOUT_S,
    chat,
    check_layers,
    groups,
    serving_group,
    single_engine,
    start_fleet,
)
from tests.node_agent.engine.test_layer_split import MAMBA, MAMBA_REFUSED, write_model

RETRY_WINDOW_S = 8.0  # the reload backoff would have tried again 3 times by then (0.5, 1, 2 s)


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


@pytest.fixture(scope="module")
def mamba_model(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    vocab = json.loads((demo_model / "config.json").read_text())["vocab_size"]
    folder = tmp_path_factory.mktemp("models") / "mamba"
    return write_model(folder, {**MAMBA, "vocab_size": vocab}, demo_model)


def pending(fleet: Fleet) -> str:
    body = fleet._get("/admin/v1/models", (fleet.home / "admin_token").read_text().strip())
    rows = [r for r in (body or {}).get("models", []) if r["model"] == MODEL]
    return str(rows[0].get("pending") or "") if rows else ""


def test_a_model_no_split_runs_is_tried_once_then_kept_to_single_nodes(
    mamba_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    fleets = start_fleet(tmp_path_factory.mktemp("groups-mamba"), mamba_model, 2, 2.5)
    fleet = next(fleets)
    try:
        wait_for(lambda: MAMBA_REFUSED in pending(fleet), READY_TIMEOUT_S, "the refusal")
        time.sleep(RETRY_WINDOW_S)  # what is tested: no further group is placed meanwhile
        reason = pending(fleet)
        assert "unplaced: needs " in reason and MAMBA_REFUSED in reason, reason
        assert groups(fleet) == [] and fleet.demo_engines() == []
        log = fleet.coordinator_output()
        assert log.count("cannot run as a group: placing it on single nodes only") == 1
        # Each of the two ranks failed to load once, saying why; none was started again.
        assert log.count(MAMBA_REFUSED) == 2, log[-3000:]
    finally:
        fleets.close()

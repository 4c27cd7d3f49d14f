"""A group of three: no two agents' budgets hold the 6-layer demo model, three do
(tests/multihost/test_groups.py has the group of two and its failures)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.conftest import wait_for
from tests.multihost.fleet import Fleet
from tests.multihost.test_groups import (
    READY_TIMEOUT_S,
    chat,
    check_layers,
    engine,
    rank_pids,
    serving_group,
    start_fleet,
)

__all__ = ["engine"]  # a fixture this module uses


@pytest.fixture(scope="module")
def fleet3(tmp_path_factory: pytest.TempPathFactory, demo_model_6: Path) -> Iterator[Fleet]:
    """Three agents with room for 2.4 layers each: no two hold the model, three do."""
    yield from start_fleet(tmp_path_factory.mktemp("groups3"), demo_model_6, 3, 2.4)


def test_a_group_of_three_serves_as_one_engine_does(fleet3: Fleet, engine: openai.OpenAI) -> None:
    group = wait_for(lambda: serving_group(fleet3, 3), READY_TIMEOUT_S, "a group of three")
    check_layers(group)
    assert sorted(rank_pids(group["group"])) == [0, 1, 2]
    client = fleet3.client()
    for stream in (False, True):
        assert chat(client, stream) == chat(engine, stream) != ""


def test_a_coordinator_restart_takes_the_group_back_without_a_reload(
    fleet3: Fleet, engine: openai.OpenAI
) -> None:
    """kill -9 of the coordinator: its successor takes the running group back from what the
    ranks' agents report (each rank's layout), so no rank is started again."""
    group = wait_for(lambda: serving_group(fleet3, 3), READY_TIMEOUT_S, "a group of three")
    pids = rank_pids(group["group"])
    old = fleet3.runtime
    fleet3.kill_coordinator()
    fleet3.start_coordinator((old["gateway_port"], old["grpc_port"], old["enroll_port"]))
    back = wait_for(lambda: serving_group(fleet3, 3), READY_TIMEOUT_S, "the group taken back")
    assert back["group"] == group["group"]
    assert back["members"] == group["members"]  # nodes, ranks, layers and bytes as placed
    assert rank_pids(group["group"]) == pids
    assert "took back group " + group["group"] in fleet3.coordinator_output()
    assert chat(fleet3.client(), False) == chat(engine, False)

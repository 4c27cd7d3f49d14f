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

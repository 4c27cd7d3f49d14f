"""One defaults table for the tier knobs: an engine started by hand with `--tier` reports the
knobs `mlxfleet tiers` shows for that tier on a fresh fleet (they once drifted apart).

Starts a real coordinator (no agent: `mlxfleet tiers` needs none) and two real engines on the
demo model, one per tier, as a person would start them by hand.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from mlxfleet.tiers import DEFAULT_KNOBS, TIERS
from tests.e2e.fleet import Fleet, running_fleet
from tests.node_agent.engine.conftest import start_engine

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def fresh_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    with running_fleet(tmp_path_factory, "", agents=0, ready=()) as fleet:
        yield fleet


def tiers_table(out: str) -> dict[str, dict[str, int]]:
    """`mlxfleet tiers` output (a header row, then a row per tier) as tier -> knob -> value."""
    header, *rows = (line.split() for line in out.strip().splitlines())
    return {
        row[0]: {name: int(v) for name, v in zip(header[1:], row[1:], strict=True)} for row in rows
    }


@pytest.mark.parametrize("tier", TIERS)
def test_engine_started_by_hand_reports_the_fleet_knobs(
    tier: str, fresh_fleet: Fleet, demo_model: Path, tmp_path: Path
) -> None:
    shown = tiers_table(fresh_fleet.cli("tiers"))
    assert set(shown) == set(TIERS)
    engine = start_engine(demo_model, tmp_path / "engine.log", "--tier", tier)
    try:
        stats = engine.stats()
    finally:
        assert engine.proc.stop() == 0, engine.proc.output()[-3000:]
    assert stats["tier"] == tier
    assert stats["knobs"] == shown[tier]
    # ... and both are the one table in mlxfleet/tiers.py.
    assert shown[tier] == DEFAULT_KNOBS[tier].as_dict()  # type: ignore[index]

"""Tier choice per key and header, and knob validation."""

from __future__ import annotations

import pytest

from coordinator.tiers import key_tiers
from mlxfleet.errors import TierError
from mlxfleet.tiers import DEFAULT_KNOBS, apply_knobs


def test_the_seeds_defaults() -> None:
    batch, interactive = DEFAULT_KNOBS["batch"], DEFAULT_KNOBS["interactive"]
    assert (batch.batch_window_ms, batch.max_batch_size) == (80, 12)
    assert (interactive.batch_window_ms, interactive.max_concurrency) == (0, 4)


def test_a_key_uses_its_default_unless_the_header_picks_an_allowed_tier() -> None:
    both = key_tiers("interactive,batch", "interactive")
    assert both.choose(None) == "interactive"
    assert both.choose("Batch") == "batch"
    only_batch = key_tiers("batch", "batch")
    with pytest.raises(TierError, match="may not use the interactive tier"):
        only_batch.choose("interactive")
    with pytest.raises(TierError, match="unknown X-Mlxfleet-Tier value 'turbo'"):
        both.choose("turbo")


@pytest.mark.parametrize(
    ("allowed", "default", "message"),
    [
        ("", "batch", "at least one tier"),
        ("batch", "interactive", "not among"),
        ("gold", "gold", "unknown tier 'gold'"),
    ],
)
def test_bad_key_tiers(allowed: str, default: str, message: str) -> None:
    with pytest.raises(TierError, match=message):
        key_tiers(allowed, default)


def test_knobs_change_one_at_a_time_and_are_checked() -> None:
    batch = DEFAULT_KNOBS["batch"]
    assert apply_knobs(batch, {"batch_window_ms": 200}).batch_window_ms == 200
    assert apply_knobs(batch, {"batch_window_ms": 200}).max_batch_size == 12
    for changes, message in [
        ({"window": 5}, "unknown knob 'window'"),
        ({"batch_window_ms": -1}, "batch_window_ms must be an integer 0-"),
        ({"max_concurrency": True}, "max_concurrency must be"),
        ({"queue_limit": 0}, "queue_limit must be an integer 1-"),
    ]:
        with pytest.raises(TierError, match=message):
            apply_knobs(batch, changes)

"""Tiers and their knobs: one Tier, one defaults table, one validation, for both sides.

The coordinator sends a tier's knobs with every LoadModel and changes them at runtime; an
engine started by hand with `--tier` starts from the same table, so both report the same.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

from mlxfleet.errors import KnobError, TierError

Tier = Literal["interactive", "batch"]
TIERS: tuple[Tier, ...] = get_args(Tier)
TIER_HEADER = "X-Mlxfleet-Tier"  # a request picks its tier with this header
MAX_WINDOW_MS = 10_000
MAX_SLOTS = 256
MAX_QUEUE = 10_000
# Inclusive (low, high) per knob.
KNOB_BOUNDS: Mapping[str, tuple[int, int]] = {
    "max_concurrency": (1, MAX_SLOTS),
    "batch_window_ms": (0, MAX_WINDOW_MS),
    "max_batch_size": (1, MAX_SLOTS),
    "queue_limit": (1, MAX_QUEUE),
}


def check_knob(name: str, value: object) -> int:
    """`value` when it is a valid value of knob `name`; KnobError otherwise."""
    if name not in KNOB_BOUNDS:
        known = ", ".join(sorted(KNOB_BOUNDS))
        raise KnobError(
            name,
            f"is not a knob (known: {known})",
            f"unknown knob {name!r} (expected one of {known})",
        )
    low, high = KNOB_BOUNDS[name]
    # bool is a subclass of int, but `true` is a client bug, not 1.
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise KnobError(name, f"must be an integer {low}-{high}, got {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class Knobs:
    """How an engine admits and batches requests; every instance is valid (checked here)."""

    max_concurrency: int  # sequences decoding together
    batch_window_ms: int  # how long the oldest waiting request may wait for company; 0: none
    max_batch_size: int  # waiting requests admitted together at a window boundary
    queue_limit: int  # requests allowed to wait; beyond it, 429 with Retry-After

    def __post_init__(self) -> None:
        for name in KNOB_BOUNDS:
            check_knob(name, getattr(self, name))

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


# The seeds' defaults: batch window 80 ms and 12 slots (MLX_BATCH_*); interactive 4 slots and
# no window, so a new request joins the running batch at the next decode step.
DEFAULT_KNOBS: Mapping[Tier, Knobs] = {
    "interactive": Knobs(max_concurrency=4, batch_window_ms=0, max_batch_size=4, queue_limit=64),
    "batch": Knobs(max_concurrency=12, batch_window_ms=80, max_batch_size=12, queue_limit=256),
}


def parse_tier(value: Any, where: str = "tier") -> Tier:
    if value not in TIERS:
        raise TierError(f"unknown {where} {value!r} (expected one of {', '.join(TIERS)})")
    return value  # type: ignore[no-any-return]


def apply_knobs(base: Knobs, changes: Mapping[str, Any]) -> Knobs:
    """`base` with `changes` applied; every name and value checked (KnobError names the first)."""
    return dataclasses.replace(
        base, **{name: check_knob(name, value) for name, value in changes.items()}
    )

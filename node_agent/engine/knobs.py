"""Tier knobs (how an engine admits and batches requests) and the pure admission rule."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

from node_agent.engine.errors import BadKnob, InvalidRequest

Tier = Literal["interactive", "batch"]
TIERS: tuple[Tier, ...] = get_args(Tier)
MAX_BATCH_WINDOW_MS = 10_000
# Inclusive (low, high) per knob; None: no upper bound.
KNOB_RANGES: dict[str, tuple[int, int | None]] = {
    "max_concurrency": (1, None),
    "batch_window_ms": (0, MAX_BATCH_WINDOW_MS),
    "max_batch_size": (1, None),
    "queue_limit": (1, None),
}


def check_knob(name: str, value: object) -> int:
    """Return `value` when it is a valid value of knob `name`; raise BadKnob otherwise."""
    if name not in KNOB_RANGES:
        raise BadKnob(name, f"is not a knob (known: {', '.join(KNOB_RANGES)})")
    # bool is a subclass of int, but `true` is a client bug, not 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadKnob(name, f"must be an integer, got {value!r}")
    low, high = KNOB_RANGES[name]
    if value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"{low}-{high}"
        raise BadKnob(name, f"must be {bounds}, got {value}")
    return value


@dataclass(frozen=True, slots=True)
class Knobs:
    """How an engine admits work; every instance is valid (checked on construction)."""

    max_concurrency: int  # sequences decoding together
    batch_window_ms: int  # how long the oldest waiting request may wait for company; 0: none
    max_batch_size: int  # waiting requests admitted together at a window boundary
    queue_limit: int  # requests allowed to wait; beyond it, 429

    def __post_init__(self) -> None:
        for name in KNOB_RANGES:
            check_knob(name, getattr(self, name))

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


# Seed 001: batch window 80 ms, max batch size 12; interactive admits at once.
TIER_DEFAULTS: dict[Tier, Knobs] = {
    "interactive": Knobs(max_concurrency=4, batch_window_ms=0, max_batch_size=12, queue_limit=64),
    "batch": Knobs(max_concurrency=12, batch_window_ms=80, max_batch_size=12, queue_limit=64),
}


def updated_knobs(current: Knobs, body: Mapping[str, Any]) -> Knobs:
    """Apply a POST /v1/engine/knobs body (any subset of the knobs); InvalidRequest names the
    first bad field."""
    try:
        changes = {name: check_knob(name, value) for name, value in body.items()}
        return dataclasses.replace(current, **changes)
    except BadKnob as exc:
        code = "unknown_parameter" if exc.knob not in KNOB_RANGES else "invalid_value"
        raise InvalidRequest(f"Invalid '{exc.knob}': {exc.reason}.", exc.knob, code) from None


def admit_now(waiting_ages_ms: Sequence[float], free_slots: int, knobs: Knobs) -> int:
    """How many of the oldest waiting requests to admit now, as one group.

    `waiting_ages_ms` is oldest first. A group goes when the oldest has waited the batch window
    or when enough wait to fill a group (max_batch_size, or the free slots if fewer), whichever
    comes first; never more than the free slots.
    """
    if not waiting_ages_ms or free_slots <= 0:
        return 0
    group = min(free_slots, knobs.max_batch_size)
    if len(waiting_ages_ms) >= group or waiting_ages_ms[0] >= knobs.batch_window_ms:
        return min(group, len(waiting_ages_ms))
    return 0


def window_remaining_ms(waiting_ages_ms: Sequence[float], knobs: Knobs) -> float | None:
    """How long until the oldest waiting request's window ends (0: now; None: nothing waits)."""
    if not waiting_ages_ms:
        return None
    return max(0.0, knobs.batch_window_ms - waiting_ages_ms[0])

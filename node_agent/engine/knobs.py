"""The engine side of the tier knobs (mlxfleet/tiers.py): runtime updates and the pure
admission rule."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from mlxfleet.errors import ApiError, KnobError
from mlxfleet.tiers import KNOB_BOUNDS, Knobs, apply_knobs


def updated_knobs(current: Knobs, body: Mapping[str, Any]) -> Knobs:
    """Apply a POST /v1/engine/knobs body (any subset of the knobs); ApiError names the
    first bad field."""
    try:
        return apply_knobs(current, body)
    except KnobError as exc:
        code = "unknown_parameter" if exc.knob not in KNOB_BOUNDS else "invalid_value"
        raise ApiError.invalid(f"Invalid '{exc.knob}': {exc.reason}.", exc.knob, code) from None


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

"""Tiers: interactive (IDE completions, chat) and batch (offline jobs), with their knobs.

Each model runs one engine per tier it is configured for, with that tier's knobs; a team key
says which tiers it may use and which is its default; `X-Mlxfleet-Tier` picks among them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, Literal

Tier = Literal["interactive", "batch"]
TIERS: tuple[Tier, ...] = ("interactive", "batch")
TIER_HEADER = "X-Mlxfleet-Tier"
MAX_WINDOW_MS = 10_000
MAX_SLOTS = 256
MAX_QUEUE = 10_000


@dataclass(frozen=True, slots=True)
class Knobs:
    """An engine's batching knobs (node_agent/engine/knobs.py applies them)."""

    max_concurrency: int  # sequences decoding together
    batch_window_ms: int  # how long waiting requests gather before they are admitted
    max_batch_size: int  # requests admitted together at a window boundary
    queue_limit: int  # waiting requests beyond this get 429 with Retry-After


# The seeds' defaults: batch window 80 ms and 12 slots (MLX_BATCH_*), interactive 4 slots and
# no window, so a new request joins the running batch at the next decode step.
DEFAULT_KNOBS: Mapping[Tier, Knobs] = {
    "interactive": Knobs(max_concurrency=4, batch_window_ms=0, max_batch_size=4, queue_limit=64),
    "batch": Knobs(max_concurrency=12, batch_window_ms=80, max_batch_size=12, queue_limit=256),
}
_LIMITS = {
    "max_concurrency": (1, MAX_SLOTS),
    "batch_window_ms": (0, MAX_WINDOW_MS),
    "max_batch_size": (1, MAX_SLOTS),
    "queue_limit": (1, MAX_QUEUE),
}


class TierError(ValueError):
    """A tier or knob value that cannot be used; the message names it."""


def parse_tier(value: Any, where: str = "tier") -> Tier:
    if value not in TIERS:
        raise TierError(f"unknown {where} {value!r} (expected one of {', '.join(TIERS)})")
    return value  # type: ignore[no-any-return]


def apply_knobs(base: Knobs, changes: Mapping[str, Any]) -> Knobs:
    """`base` with `changes` applied; every name and value checked."""
    names = {f.name for f in fields(Knobs)}
    for name, value in changes.items():
        if name not in names:
            raise TierError(f"unknown knob {name!r} (expected one of {', '.join(sorted(names))})")
        low, high = _LIMITS[name]
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise TierError(f"{name} must be an integer {low}-{high}, got {value!r}")
    return replace(base, **changes)


@dataclass(frozen=True, slots=True)
class KeyTiers:
    """What a team key may use."""

    allowed: frozenset[Tier]
    default: Tier

    def choose(self, requested: str | None) -> Tier:
        """The tier for one request: the header's, when allowed; else the key's default."""
        if requested is None or requested == "":
            return self.default
        tier = parse_tier(requested.strip().lower(), f"{TIER_HEADER} value")
        if tier not in self.allowed:
            raise TierError(
                f"this key may not use the {tier} tier (allowed: {', '.join(sorted(self.allowed))})"
            )
        return tier


def key_tiers(allowed: str, default: str) -> KeyTiers:
    """From the stored form: a comma list of tiers and the default."""
    tiers = frozenset(parse_tier(t.strip(), "tier") for t in allowed.split(",") if t.strip())
    if not tiers:
        raise TierError("a key needs at least one tier")
    chosen = parse_tier(default, "default tier")
    if chosen not in tiers:
        raise TierError(f"default tier {chosen} is not among the key's tiers")
    return KeyTiers(tiers, chosen)

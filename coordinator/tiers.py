"""What a team key may use of the tiers (the tiers and their knobs: mlxfleet/tiers.py).

Each model runs one engine per tier it is configured for, with that tier's knobs; a team key
says which tiers it may use and which is its default; `X-Mlxfleet-Tier` picks among them.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlxfleet.errors import TierError
from mlxfleet.tiers import TIER_HEADER, Tier, parse_tier


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

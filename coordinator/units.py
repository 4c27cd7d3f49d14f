"""The units (model × tier) the fleet serves, and those removed at runtime that still run."""

from __future__ import annotations

from collections.abc import Iterable

from coordinator.config import ModelSpec
from coordinator.policy import UnitKey


class Units(dict[UnitKey, ModelSpec]):
    """The units served, by key. A unit removed at runtime stays in `leaving` while engines of
    it exist (its requests in flight finish first), so their memory still counts in placement."""

    def __init__(self, specs: Iterable[ModelSpec]) -> None:
        super().__init__((spec.key, spec) for spec in specs)
        self.leaving: dict[UnitKey, ModelSpec] = {}

    def replace_all(self, specs: Iterable[ModelSpec]) -> tuple[set[UnitKey], set[UnitKey]]:
        """Serve exactly `specs` from now on; the keys (added, removed)."""
        new = {spec.key: spec for spec in specs}
        added, removed = set(new) - set(self), set(self) - set(new)
        self.leaving.update((key, self[key]) for key in removed)
        for key in added:
            self.leaving.pop(key, None)
        self.clear()
        self.update(new)
        return added, removed

    def spec(self, key: UnitKey) -> ModelSpec:
        """A served or leaving unit's spec."""
        return self[key] if key in self else self.leaving[key]

    def known(self, key: UnitKey) -> bool:
        return key in self or key in self.leaving

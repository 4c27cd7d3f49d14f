"""The tier knobs in force at runtime, and the SetKnobs commands that keep engines on them.

They start from the config's tier tables plus the changes stored by the admin API; a change
is stored and sent to every running engine of the tier at once (no reload). While a memory
trigger holds on a node, that node's engines run with half their concurrency.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from coordinator.config import Config, ModelSpec
from coordinator.policy import UnitKey
from coordinator.registry import (
    LIVE_STATES,
    Engine,
    NodeId,
    Registry,
    SetKnobsCommand,
    unit_of,
)
from coordinator.store import Store
from mlxfleet.tiers import Knobs, Tier, apply_knobs


class TierKnobs:
    """Each tier's knobs and each engine's share of them. Use from the event loop."""

    def __init__(
        self,
        config: Config,
        store: Store,
        registry: Registry,
        units: Mapping[UnitKey, ModelSpec],
    ) -> None:
        self._knobs: dict[Tier, Knobs] = dict(config.tiers)
        for tier, changes in store.tier_knobs().items():
            self._knobs[tier] = apply_knobs(self._knobs[tier], changes)  # type: ignore[index]
        self._store = store
        self._registry = registry
        self._units = units
        self._lowered: set[NodeId] = set()  # nodes whose engines run with halved concurrency

    def tier(self, tier: Tier) -> Knobs:
        return self._knobs[tier]

    def set_tier(self, tier: Tier, changes: dict[str, int]) -> Knobs:
        """Change a tier's knobs now: stored, and sent to every running engine of the tier."""
        self._knobs[tier] = apply_knobs(self._knobs[tier], changes)
        self._store.save_tier_knobs(tier, changes)
        for engine, spec in self._live_engines():
            if engine.tier == tier:
                self._send(engine, self.engine(spec, engine.node_id))
        return self._knobs[tier]

    def engine(self, spec: ModelSpec, node_id: NodeId | None = None) -> Knobs:
        """The knobs of one engine of `spec`: its tier's, halved on a lowered node, capped by
        the model's own max_concurrency."""
        knobs = self._knobs[spec.tier]
        if node_id is not None and node_id in self._lowered:
            halved = max(1, knobs.max_concurrency // 2)
            knobs = replace(
                knobs, max_concurrency=halved, max_batch_size=min(knobs.max_batch_size, halved)
            )
        if spec.max_concurrency is not None:
            knobs = replace(
                knobs,
                max_concurrency=spec.max_concurrency,
                max_batch_size=min(knobs.max_batch_size, spec.max_concurrency),
            )
        return knobs

    def set_lowered(self, node_id: NodeId, lowered: bool) -> None:
        """Halve the node's engines' concurrency while the memory trigger holds; restore after."""
        if lowered == (node_id in self._lowered):
            return
        self._lowered.symmetric_difference_update({node_id})
        for engine, spec in self._live_engines():
            if engine.node_id == node_id:
                self._send(engine, self.engine(spec, node_id))

    def _live_engines(self) -> list[tuple[Engine, ModelSpec]]:
        return [
            (engine, spec)
            for engine in self._registry.engines.values()
            if engine.state in LIVE_STATES
            and engine.serves  # a group's rank 0 decides its batch; the others follow it
            and (spec := self._units.get(unit_of(engine)))
        ]

    def _send(self, engine: Engine, knobs: Knobs) -> None:
        self._registry.send(engine.node_id, SetKnobsCommand(engine.engine_id, knobs))

"""What the rest of the coordinator tells the reconciler about units and nodes (the gateway's
requests, engine events, heartbeats); coordinator/reconcile.py's Reconciler is one."""

from __future__ import annotations

import logging

from coordinator.config import ModelSpec
from coordinator.holds import PlacementHolds
from coordinator.policy import Sharding, UnitKey
from coordinator.registry import NodeId, Registry
from coordinator.trigger_actions import TriggerActions
from coordinator.usage import UnitUsage

logger = logging.getLogger(__name__)


class UnitSignals:
    """Inputs from the rest of the coordinator; the state they change is the reconciler's."""

    _holds: PlacementHolds
    _registry: Registry
    _trigger_actions: TriggerActions
    usage: UnitUsage
    load_failures: dict[UnitKey, str]
    unsplittable: dict[str, str]
    cold_starts: list[tuple[UnitKey, float]]

    def engine_failed(self, key: UnitKey, load_failure: str | None = None) -> None:
        """An engine of this unit exited or failed to load: wait before loading it again."""
        if load_failure is not None:
            self.load_failures[key] = load_failure
        self._holds.failed(key)

    def cannot_split(self, spec: ModelSpec, why: str) -> None:
        """A rank of this unit's group found that its model's architecture cannot run split:
        from now on the model's files (its source) run on single nodes only, as with sharding =
        "never", until the coordinator restarts. `why` also stays in its load failure."""
        if spec.source not in self.unsplittable:
            logger.warning(
                "model %s cannot run as a group: placing it on single nodes only", spec.name
            )
        self.unsplittable[spec.source] = why

    def sharding(self, spec: ModelSpec) -> Sharding:
        """The spec's sharding, or "never" once its files are known not to split."""
        return "never" if spec.source in self.unsplittable else spec.sharding

    def engine_ready(self, key: UnitKey) -> None:
        self._holds.ready(key)
        self.load_failures.pop(key, None)
        self.usage.engine_ready(key)

    def begin_request(self, key: UnitKey) -> None:
        self.usage.begin_request(key)

    def end_request(self, key: UnitKey) -> None:
        self.usage.end_request(key)

    def note_cold_start(self, key: UnitKey, waited_s: float) -> None:
        """A request waited `waited_s` for this sleeping unit to load again."""
        self.cold_starts.append((key, waited_s))

    def observe_reading(self, node_id: NodeId) -> None:
        """A heartbeat arrived: evaluate the node's triggers (coordinator/trigger_actions.py)."""
        self._trigger_actions.observe_reading(node_id)

    def observe_ttft(self, node_id: str, ttft_s: float, prefill_tokens: int) -> None:
        """An interactive request's time to first token on this node and the prompt tokens
        its engine prefilled: the prompt less its prefix-cache hit (the tail trigger)."""
        self._trigger_actions.observe_ttft(node_id, ttft_s, prefill_tokens)

    def observe_oom_kill(self, node_id: str) -> None:
        self._trigger_actions.observe_oom_kill(node_id)

    def is_asleep(self, key: UnitKey) -> bool:
        return self.usage.is_asleep(key)

    def wake(self, key: UnitKey) -> None:
        """A request came for a unit unloaded for idleness: load it again."""
        if self.usage.wake(key):
            logger.info("waking %s/%s for a request", *key)
            self._registry.changed.set()

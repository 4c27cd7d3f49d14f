"""Readings into the triggers (coordinator/triggers.py), and what their changes do.

Every change is stored as an event, counted and logged. While `lower_concurrency` holds on a
node its engines run with half their concurrency; `relocate_heaviest` moves the node's
heaviest engine away (the reconciler decides which and where). The other actions (drain,
halt_ramp, move_batch, offload_preferred) are read by the reconciler when it places.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from coordinator.knobs import TierKnobs
from coordinator.metrics import Metrics
from coordinator.registry import NodeId, Registry
from coordinator.store import Store
from coordinator.triggers import Change, Reading, Triggers

logger = logging.getLogger(__name__)


class TriggerActions:
    """Feeds the triggers and carries out their changes. Use from the event loop."""

    def __init__(
        self,
        triggers: Triggers,
        registry: Registry,
        store: Store,
        metrics: Metrics,
        knobs: TierKnobs,
        relocate_heaviest: Callable[[NodeId], None],
    ) -> None:
        self._triggers = triggers
        self._registry = registry
        self._store = store
        self._metrics = metrics
        self._knobs = knobs
        self._relocate_heaviest = relocate_heaviest

    def observe_reading(self, node_id: NodeId) -> None:
        """A heartbeat arrived: evaluate the node's triggers on its reading."""
        node = self._registry.nodes.get(node_id)
        if node is None or node.status is None:
            return
        status, facts = node.status, node.facts
        reading = Reading(
            node_id,
            time.monotonic(),
            facts.ram_bytes,
            status.available_bytes,
            status.swap_used_bytes,
            status.memory_pressure,
            status.thermal_state,
            status.power_source,
            status.low_power_mode,
            facts.role,
        )
        self._apply(self._triggers.observe(reading))

    def observe_ttft(self, node_id: str, ttft_s: float, prefill_tokens: int) -> None:
        """An interactive request's time to first token on this node and the prompt tokens
        its engine prefilled (the tail trigger)."""
        self._apply(self._triggers.observe_ttft(node_id, time.monotonic(), ttft_s, prefill_tokens))

    def observe_oom_kill(self, node_id: str) -> None:
        self._apply(self._triggers.observe_oom_kill(node_id, time.monotonic()))

    def _apply(self, changes: list[Change]) -> None:
        for change in changes:
            level = f" {change.level}" if change.level else ""
            detail = f"{change.trigger}{level}: {change.reading}"
            if change.fired:
                detail += f" -> {', '.join(sorted(change.actions))}"
            kind = "trigger_fired" if change.fired else "trigger_cleared"
            self._store.add_event(change.node_id, kind, detail)
            self._metrics.trigger_changed(change.node_id, change.trigger, change.fired)
            logger.warning("node %s %s %s", change.node_id, kind, detail)
            node_id = NodeId(change.node_id)
            if "relocate_heaviest" in change.actions:
                self._relocate_heaviest(node_id)
            lowered = "lower_concurrency" in self._triggers.actions(node_id)
            self._knobs.set_lowered(node_id, lowered)
        if changes:
            self._registry.changed.set()

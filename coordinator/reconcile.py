"""The reconcile loop: make the engines that run match the models the config asks for."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass

from coordinator.config import ModelSpec
from coordinator.placement import NodeCapacity, first_fit, weight_bytes
from coordinator.registry import Engine, EngineId, LoadCommand, NodeId, Registry
from coordinator.store import Store

logger = logging.getLogger(__name__)

RECONCILE_INTERVAL_S = 1.0  # also woken at once by any registry change
DEAD_AFTER_S = 10.0  # a node silent this long is dropped (suspect/dead states come later)
RELOAD_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)  # after an engine exits or fails to load


@dataclass(slots=True)
class _Backoff:
    failures: int = 0
    not_before: float = 0.0


class Reconciler:
    """Sends load commands for desired models that have no engine. Owns no task itself."""

    def __init__(self, models: tuple[ModelSpec, ...], registry: Registry, store: Store) -> None:
        self._models = models
        self._registry = registry
        self._store = store
        self._backoff: dict[str, _Backoff] = {}
        self.pending: dict[str, str] = {}  # model -> why it is not placed
        self.load_failures: dict[str, str] = {}  # model -> its last load failure, until ready

    def engine_failed(self, model: str, load_failure: str | None = None) -> None:
        """An engine of this model exited or failed to load: wait before loading it again."""
        if load_failure is not None:
            self.load_failures[model] = load_failure
        b = self._backoff.setdefault(model, _Backoff())
        delay = RELOAD_BACKOFF_S[min(b.failures, len(RELOAD_BACKOFF_S) - 1)]
        b.failures += 1
        b.not_before = time.monotonic() + delay

    def engine_ready(self, model: str) -> None:
        self._backoff.pop(model, None)
        self.load_failures.pop(model, None)

    async def run(self) -> None:
        while True:
            self._registry.changed.clear()
            self.step()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._registry.changed.wait(), RECONCILE_INTERVAL_S)

    def step(self) -> None:
        """One pass: drop silent nodes, then place every model that has no live engine."""
        now = time.monotonic()
        for node in list(self._registry.nodes.values()):
            if now - node.last_heartbeat > DEAD_AFTER_S:
                logger.warning("node %s silent for %.0f s: dropping it", node.node_id, DEAD_AFTER_S)
                self._store.add_event(node.node_id, "node_dead", "no heartbeat")
                self._registry.disconnect(node.node_id)
        for spec in self._models:
            if any(e.state in ("starting", "ready") for e in self._registry.engines_of(spec.name)):
                self.pending.pop(spec.name, None)
                continue
            backoff = self._backoff.get(spec.name)
            if backoff and now < backoff.not_before:
                continue
            self._place(spec)

    def _place(self, spec: ModelSpec) -> None:
        need = weight_bytes(spec.source)
        nodes = [
            NodeCapacity(n.node_id, n.status.available_bytes if n.status else 0)
            for n in self._registry.nodes.values()
        ]
        node_id = first_fit(need, nodes)
        if node_id is None:
            best = max(nodes, key=lambda n: n.available_bytes, default=None)
            self.pending[spec.name] = (
                "no node connected"
                if best is None
                else f"needs {need / 2**30:.1f} GiB, best node {best.node_id} has "
                f"{best.available_bytes / 2**30:.1f} GiB available"
            )
            return
        engine_id = EngineId(f"{spec.name.replace('/', '_')}-{uuid.uuid4().hex[:8]}")
        self._load(spec, NodeId(node_id), engine_id)

    def _load(self, spec: ModelSpec, node_id: NodeId, engine_id: EngineId) -> None:
        engine = Engine(engine_id, spec.name, node_id, spec.tier, "starting")
        self._registry.upsert_engine(engine)
        self._store.save_placement(engine_id, spec.name, node_id, spec.tier)
        self._registry.send(
            node_id, LoadCommand(engine_id, spec.name, spec.source, spec.tier, spec.context_length)
        )
        self.pending.pop(spec.name, None)
        logger.info("placing %s on node %s as engine %s", spec.name, node_id, engine_id)

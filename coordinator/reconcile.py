"""The reconcile loop: make the engines that run match the models the config asks for."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from dataclasses import dataclass, replace

from coordinator.config import Config, ModelSpec
from coordinator.placement import NodeCapacity, first_fit, weight_bytes
from coordinator.registry import (
    Engine,
    EngineId,
    LoadCommand,
    NodeId,
    Registry,
    UnloadCommand,
)
from coordinator.store import Store

logger = logging.getLogger(__name__)

RECONCILE_INTERVAL_S = 0.25  # also woken at once by any registry change; bounds liveness lag
# After a restart, a model recorded on a node that has not reconnected yet waits this long
# for it, so an engine that outlived the coordinator is taken back instead of loaded twice.
RESTORE_GRACE_S = 15.0
RELOAD_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)  # after an engine exits or fails to load


@dataclass(slots=True)
class _Backoff:
    failures: int = 0
    not_before: float = 0.0


class Reconciler:
    """Sends load commands for desired models that have no engine. Owns no task itself."""

    def __init__(self, config: Config, registry: Registry, store: Store) -> None:
        self._models = config.models
        self._suspect_after_s = config.suspect_after_s
        self._dead_after_s = config.dead_after_s
        self._registry = registry
        self._store = store
        self._started = time.monotonic()
        self._restoring: dict[str, set[str]] = {}
        for _engine_id, model, node_id, _tier in store.placements():
            self._restoring.setdefault(model, set()).add(node_id)
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
        """One pass: liveness, then every model to exactly one live engine."""
        self._check_liveness()
        wanted = {spec.name for spec in self._models}
        for engine in list(self._registry.engines.values()):
            if engine.model not in wanted and engine.state in ("starting", "ready"):
                self._unload(engine, "not in the config")
        for spec in self._models:
            running = [
                e for e in self._registry.engines_of(spec.name) if e.state in ("starting", "ready")
            ]
            if running:
                self.pending.pop(spec.name, None)
                # Two engines for one replica (a partitioned node came back after its model
                # was placed elsewhere): keep the one serving longest, unload the rest.
                keep = min(
                    running,
                    key=lambda e: (e.state != "ready", e.ready_since or math.inf, e.engine_id),
                )
                for extra in running:
                    if extra is not keep:
                        self._unload(extra, "a second engine of a one-replica model")
                continue
            if self._awaiting_restore(spec.name):
                continue
            backoff = self._backoff.get(spec.name)
            if backoff and time.monotonic() < backoff.not_before:
                continue
            self._place(spec)

    def _check_liveness(self) -> None:
        now = time.monotonic()
        for node in list(self._registry.nodes.values()):
            silent_s = now - node.last_heartbeat
            if silent_s > self._dead_after_s:
                logger.warning("node %s silent for %.1f s: dead", node.node_id, silent_s)
                self._store.add_event(
                    node.node_id, "node_dead", f"no heartbeat for {silent_s:.1f} s"
                )
                self._registry.disconnect(node.node_id)
            elif silent_s > self._suspect_after_s and node.liveness == "live":
                logger.warning("node %s silent for %.1f s: suspect", node.node_id, silent_s)
                self._registry.mark_suspect(node.node_id)  # unroute first, then record it
                self._store.add_event(
                    node.node_id, "node_suspect", f"no heartbeat for {silent_s:.1f} s"
                )

    def _awaiting_restore(self, model: str) -> bool:
        """Whether to hold off placing `model`: a node that ran it may still come back."""
        nodes = self._restoring.get(model)
        if not nodes:
            return False
        nodes -= set(self._registry.nodes)
        if not nodes or time.monotonic() - self._started > RESTORE_GRACE_S:
            del self._restoring[model]
            return False
        self.pending[model] = (
            f"waiting up to {RESTORE_GRACE_S:.0f} s for {', '.join(sorted(nodes))} to reconnect"
        )
        return True

    def _unload(self, engine: Engine, why: str) -> None:
        logger.info(
            "unloading engine %s (%s) on %s: %s",
            engine.engine_id,
            engine.model,
            engine.node_id,
            why,
        )
        self._registry.upsert_engine(replace(engine, state="stopping"))
        self._registry.send(engine.node_id, UnloadCommand(engine.engine_id))

    def _place(self, spec: ModelSpec) -> None:
        need = weight_bytes(spec.source)
        nodes = [
            NodeCapacity(n.node_id, n.status.available_bytes if n.status else 0)
            for n in self._registry.nodes.values()
            if n.liveness == "live"  # no new placements on a node that missed heartbeats
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
            node_id,
            LoadCommand(
                engine_id,
                spec.name,
                spec.source,
                spec.tier,
                spec.context_length,
                spec.max_concurrency,
            ),
        )
        self.pending.pop(spec.name, None)
        logger.info("placing %s on node %s as engine %s", spec.name, node_id, engine_id)

"""The reconcile loop: make the engines that run match the units (model × tier) the config asks for.

Each pass: liveness; size every unit (weights + KV + overhead, coordinator/memory.py); place
missing replicas by policy (coordinator/policy.py) within each node's budget; move replicas
off cordoned nodes and, when a node joins, move idle units that now belong there (a replica
leaves only once its replacement is ready); unload idle unpinned units; evict the least
recently used to make room. Decisions are taken here; the agents carry them out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Literal

from coordinator.config import DEFAULT_CONTEXT_LENGTH, Config, ModelSpec
from coordinator.errors import SizingError
from coordinator.memory import node_budget, size_engine
from coordinator.metrics import Metrics
from coordinator.policy import Demand, Offer, place
from coordinator.registry import (
    Command,
    Engine,
    EngineId,
    LoadCommand,
    Node,
    NodeId,
    Registry,
    SetKnobsCommand,
    UnloadCommand,
)
from coordinator.store import Store
from coordinator.triggers import Change, Reading, Triggers
from mlxfleet.tiers import Knobs, Tier, apply_knobs

logger = logging.getLogger(__name__)

RECONCILE_INTERVAL_S = 0.25  # also woken at once by any registry change; bounds liveness lag
# After a restart, a unit recorded on a node that has not reconnected yet waits this long
# for it, so an engine that outlived the coordinator is taken back instead of loaded twice.
RESTORE_GRACE_S = 15.0
HEAVY_MODEL_BYTES = 8 * 2**30  # offload-preferred nodes get models this big last
RELOAD_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)  # after an engine exits or fails to load
REBALANCE_IDLE_S = 30.0  # a unit with no request for this long may move to a new node

UnitKey = tuple[str, Tier]
LIVE_STATES = ("starting", "ready")


@dataclass(slots=True)
class _Backoff:
    failures: int = 0
    not_before: float = 0.0


@dataclass(slots=True)
class Usage:
    """Requests seen by the gateway for one unit."""

    # time.monotonic() of the last request, or of the last engine becoming ready: idleness
    # counts from whichever is later, so a unit is never unloaded right after it loads.
    last_used: float = field(default_factory=time.monotonic)
    in_flight: int = 0


def unit_of(engine: Engine) -> UnitKey:
    return (engine.model, engine.tier)  # type: ignore[return-value]


class Reconciler:
    """Keeps the fleet matching the config. Use from the event loop; owns no task itself."""

    def __init__(self, config: Config, registry: Registry, store: Store) -> None:
        self._config = config
        self._units: dict[UnitKey, ModelSpec] = {m.key: m for m in config.models}
        self._knobs: dict[Tier, Knobs] = dict(config.tiers)
        for tier, changes in store.tier_knobs().items():
            self._knobs[tier] = apply_knobs(self._knobs[tier], changes)  # type: ignore[index]
        self._registry = registry
        self._store = store
        self.metrics = Metrics()
        for spec in config.models:
            self.metrics.unit_seen(spec.name, spec.tier)
        self._started = time.monotonic()
        self._restoring: dict[UnitKey, set[str]] = {}
        for _engine_id, model, node_id, tier in store.placements():
            self._restoring.setdefault((model, tier), set()).add(node_id)  # type: ignore[arg-type]
        self._backoff: dict[UnitKey, _Backoff] = {}
        self._sizes: dict[UnitKey, int | SizingError] = {}
        self._contexts: dict[UnitKey, int] = {}
        self._asleep: set[UnitKey] = set()  # unloaded for idleness or room; woken on demand
        self._moving: set[EngineId] = set()  # rebalanced away: unloaded once replaced
        self._known_nodes: set[NodeId] = set()
        self.usage: dict[UnitKey, Usage] = {key: Usage() for key in self._units}
        self.pending: dict[UnitKey, str] = {}  # unit -> why it is not (fully) placed
        self.load_failures: dict[UnitKey, str] = {}  # unit -> its last load failure, until ready
        self.cold_starts: list[tuple[UnitKey, float]] = []  # (unit, seconds waited)
        self.triggers = Triggers(config.triggers)
        self._lowered: set[NodeId] = set()  # nodes whose engines run with halved concurrency

    # Inputs from the rest of the coordinator
    def engine_failed(self, key: UnitKey, load_failure: str | None = None) -> None:
        """An engine of this unit exited or failed to load: wait before loading it again."""
        if load_failure is not None:
            self.load_failures[key] = load_failure
        b = self._backoff.setdefault(key, _Backoff())
        delay = RELOAD_BACKOFF_S[min(b.failures, len(RELOAD_BACKOFF_S) - 1)]
        b.failures += 1
        b.not_before = time.monotonic() + delay

    def engine_ready(self, key: UnitKey) -> None:
        self._backoff.pop(key, None)
        self.load_failures.pop(key, None)
        usage = self.usage.setdefault(key, Usage())
        usage.last_used = max(usage.last_used, time.monotonic())

    def begin_request(self, key: UnitKey) -> None:
        usage = self.usage.setdefault(key, Usage())
        usage.in_flight += 1
        usage.last_used = time.monotonic()

    def end_request(self, key: UnitKey) -> None:
        usage = self.usage.setdefault(key, Usage())
        usage.in_flight = max(0, usage.in_flight - 1)
        usage.last_used = time.monotonic()

    # Triggers: readings in, events and actions out
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
        self._apply(self.triggers.observe(reading))

    def observe_ttft(self, node_id: str, ttft_s: float) -> None:
        """An interactive request's time to first token on this node (the tail trigger)."""
        self._apply(self.triggers.observe_ttft(node_id, time.monotonic(), ttft_s))

    def observe_oom_kill(self, node_id: str) -> None:
        self._apply(self.triggers.observe_oom_kill(node_id, time.monotonic()))

    def _apply(self, changes: list[Change]) -> None:
        for change in changes:
            level = f" {change.level}" if change.level else ""
            detail = f"{change.trigger}{level}: {change.reading}"
            if change.fired:
                detail += f" -> {', '.join(sorted(change.actions))}"
            kind = "trigger_fired" if change.fired else "trigger_cleared"
            self._store.add_event(change.node_id, kind, detail)
            self.metrics.trigger_changed(change.node_id, change.trigger, change.fired)
            logger.warning("node %s %s %s", change.node_id, kind, detail)
            node_id = NodeId(change.node_id)
            if "relocate_heaviest" in change.actions:
                self._relocate_heaviest(node_id)
            self._set_lowered(node_id, "lower_concurrency" in self.triggers.actions(node_id))
        if changes:
            self._registry.changed.set()

    def _relocate_heaviest(self, node_id: NodeId) -> None:
        engines = [
            e
            for e in self._registry.engines.values()
            if e.node_id == node_id and e.state in LIVE_STATES and unit_of(e) in self._units
        ]
        if not engines:
            return

        def weight(e: Engine) -> int:
            size = self.size(self._units[unit_of(e)])
            return size if isinstance(size, int) else 0

        heaviest = max(engines, key=lambda e: (weight(e), e.engine_id))
        logger.info("relocating %s, the heaviest engine on %s", heaviest.engine_id, node_id)
        self._moving.add(heaviest.engine_id)

    def _set_lowered(self, node_id: NodeId, lowered: bool) -> None:
        """Halve the node's engines' concurrency while the memory trigger holds; restore after."""
        if lowered == (node_id in self._lowered):
            return
        self._lowered.symmetric_difference_update({node_id})
        for engine in self._registry.engines.values():
            spec = self._units.get(unit_of(engine))
            if engine.node_id == node_id and spec is not None and engine.state in LIVE_STATES:
                knobs = self.engine_knobs(spec, node_id)
                self._send(node_id, SetKnobsCommand(engine.engine_id, knobs))

    def is_asleep(self, key: UnitKey) -> bool:
        return key in self._asleep

    def wake(self, key: UnitKey) -> None:
        """A request came for a unit unloaded for idleness: load it again."""
        if key in self._asleep:
            logger.info("waking %s/%s for a request", *key)
            self._asleep.discard(key)
            self.usage.setdefault(key, Usage()).last_used = time.monotonic()
            self._registry.changed.set()

    def knobs(self, tier: Tier) -> Knobs:
        return self._knobs[tier]

    def set_tier_knobs(self, tier: Tier, changes: dict[str, int]) -> Knobs:
        """Change a tier's knobs now: stored, and sent to every running engine of the tier."""
        self._knobs[tier] = apply_knobs(self._knobs[tier], changes)
        self._store.save_tier_knobs(tier, changes)
        for engine in self._registry.engines.values():
            spec = self._units.get(unit_of(engine))
            if engine.tier == tier and spec is not None and engine.state in LIVE_STATES:
                self._send(
                    engine.node_id, SetKnobsCommand(engine.engine_id, self.engine_knobs(spec))
                )
        self._sizes.clear()  # max_concurrency sizes the KV cache
        self._registry.changed.set()
        return self._knobs[tier]

    def engine_knobs(self, spec: ModelSpec, node_id: NodeId | None = None) -> Knobs:
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

    # The loop
    async def run(self) -> None:
        while True:
            self._registry.changed.clear()
            self.step()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._registry.changed.wait(), RECONCILE_INTERVAL_S)

    def step(self) -> None:
        """One pass over liveness and every unit."""
        self._check_liveness()
        joined = set(self._registry.nodes) - self._known_nodes
        self._known_nodes = set(self._registry.nodes)
        for engine in list(self._registry.engines.values()):
            if unit_of(engine) not in self._units and engine.state in LIVE_STATES:
                self._unload(engine, "not in the config")
        self._unload_idle()
        for spec in sorted(self._units.values(), key=self._order):
            self._reconcile_unit(spec, rebalance=bool(joined))

    def _order(self, spec: ModelSpec) -> tuple[bool, int, str, str]:
        size = self.size(spec)
        return (not spec.pinned, -(size if isinstance(size, int) else 0), spec.name, spec.tier)

    def size(self, spec: ModelSpec) -> int | SizingError:
        """Bytes one engine of this unit needs (cached), or why it cannot be sized."""
        if spec.key not in self._sizes:
            self._sizes[spec.key] = self._measure(spec)
        return self._sizes[spec.key]

    def context_length(self, spec: ModelSpec) -> int:
        """The context in force: the configured one, else the default capped by the model."""
        if spec.context_length is not None:
            return spec.context_length
        self.size(spec)
        return self._contexts.get(spec.key, DEFAULT_CONTEXT_LENGTH)

    def _measure(self, spec: ModelSpec) -> int | SizingError:
        try:
            size, context = size_engine(
                spec.source,
                spec.context_length,
                self.engine_knobs(spec).max_concurrency,
                spec.kv_bits,
                DEFAULT_CONTEXT_LENGTH,
                spec.kv_group_size,
            )
        except SizingError as exc:
            return SizingError(f"{spec.name}: {exc}")
        self._contexts[spec.key] = context
        return size

    def _reconcile_unit(self, spec: ModelSpec, rebalance: bool) -> None:
        key = spec.key
        engines = [
            e
            for e in self._registry.engines.values()
            if unit_of(e) == key and e.state in LIVE_STATES
        ]
        if engines:
            self._asleep.discard(key)
        elif key in self._asleep:
            self.pending.pop(key, None)
            return
        # Leaving: on a cordoned node, or moved by a rebalance; each goes once enough
        # replicas elsewhere are ready.
        leaving = [e for e in engines if self._must_leave(e, spec)]
        staying = [e for e in engines if e not in leaving]
        if any(e.state == "ready" for e in staying):
            # A tripped node's engines leave the router now, not after failures, when another
            # engine can take the traffic (a sole replica serves on until its replacement is
            # ready: a trip never pauses a model). Their in-flight requests finish.
            for engine in leaving:
                if self._tripped(engine, spec):
                    self._registry.unroute(engine.engine_id)
        self._trim(spec, staying)
        size = self.size(spec)
        if isinstance(size, SizingError):
            self.pending[key] = str(size)
            return
        if rebalance and self._idle_for(key, REBALANCE_IDLE_S):
            moved, started = self._rebalance(spec, size, staying)
            self._moving.update(e.engine_id for e in moved)
            leaving += moved
            staying = [e for e in staying if e not in moved] + started
        ready = [e for e in staying if e.state == "ready"]
        if len(ready) >= spec.replicas:
            for engine in leaving:  # replacements are ready: the old ones go (in-flight finish)
                self._unload(engine, "moved off a cordoned node or rebalanced")
        missing = spec.replicas - len(staying)
        if missing <= 0:
            self.pending.pop(key, None)
            return
        if self._awaiting_restore(key) or self._backing_off(key):
            return
        hosting = {e.node_id for e in staying}
        offers = self.offers()
        if size >= HEAVY_MODEL_BYTES:  # heavy models try nodes without repeated OOM kills first
            preferred = [
                o for o in offers if "offload_preferred" not in self.triggers.actions(o.node_id)
            ]
            if place(self._demand(spec, size), preferred, hosting).pending_reason is None:
                offers = preferred
        placement = place(self._demand(spec, size), offers, hosting)
        if placement.pending_reason and self._evict_for(spec, size, hosting):
            placement = place(self._demand(spec, size), self.offers(), hosting)
        for node_id in placement.nodes:
            self._load(spec, NodeId(node_id))
        if placement.pending_reason:
            self.pending[key] = placement.pending_reason
        else:
            self.pending.pop(key, None)

    def _demand(self, spec: ModelSpec, size: int) -> Demand:
        return Demand(
            spec.name,
            spec.tier,
            spec.replicas,
            size,
            spec.required_labels,
            spec.preferred_labels,
            spec.pinned,
        )

    def offers(self) -> list[Offer]:
        """Every live node's room: its budget minus what its engines need."""
        placed: dict[NodeId, int] = {}
        for engine in self._registry.engines.values():
            spec = self._units.get(unit_of(engine))
            if spec is not None and engine.state in (*LIVE_STATES, "stopping"):
                size = self.size(spec)
                placed[engine.node_id] = placed.get(engine.node_id, 0) + (
                    size if isinstance(size, int) else 0
                )
        return [
            self._offer(node, placed.get(node.node_id, 0))
            for node in sorted(self._registry.nodes.values(), key=lambda n: n.node_id)
            if node.liveness == "live"
        ]

    def _offer(self, node: Node, placed: int) -> Offer:
        facts = node.facts
        reserve = facts.os_reserve_bytes or self._config.os_reserve_bytes
        budget = node_budget(facts.ram_bytes, facts.gpu_wired_limit_bytes, placed, reserve)
        role: Literal["laptop", "server"] = "laptop" if facts.role == "laptop" else "server"
        actions = self.triggers.actions(node.node_id)
        return Offer(
            node.node_id,
            role,
            budget,
            dict(facts.labels),
            facts.serve_interactive,
            cordoned=node.cordoned or bool({"halt_ramp", "drain"} & actions),
            batch_closed="move_batch" in actions,
        )

    def _must_leave(self, engine: Engine, spec: ModelSpec) -> bool:
        """Cordoned or drained node, the batch tier moved off it, or moved by a rebalance or a
        memory trigger: the engine goes once enough replicas elsewhere are ready."""
        node = self._registry.nodes.get(engine.node_id)
        return (
            (node is not None and node.cordoned)
            or self._tripped(engine, spec)
            or engine.engine_id in self._moving
        )

    def _tripped(self, engine: Engine, spec: ModelSpec) -> bool:
        """A trigger on its node moves it: drain, or move_batch for a batch engine."""
        actions = self.triggers.actions(engine.node_id)
        return "drain" in actions or (spec.tier == "batch" and "move_batch" in actions)

    def _idle_for(self, key: UnitKey, seconds: float) -> bool:
        usage = self.usage.get(key, Usage())
        return usage.in_flight == 0 and time.monotonic() - usage.last_used >= seconds

    def _rebalance(
        self, spec: ModelSpec, size: int, staying: list[Engine]
    ) -> tuple[list[Engine], list[Engine]]:
        """A node joined: if the policy would now put an idle unit's replica elsewhere, start
        it there; the old engine leaves once the new one is ready. One move per join.
        Returns (engines leaving, engines started)."""
        if not staying:
            return [], []
        current = {e.node_id for e in staying}
        offers = [
            replace(o, free_bytes=o.free_bytes + size) if o.node_id in current else o
            for o in self.offers()
        ]
        best = place(self._demand(spec, size), offers).nodes
        moves = [n for n in best if n not in current]
        if not moves:
            return [], []
        target = moves[0]
        if place(
            replace(self._demand(spec, size), replicas=1),
            [o for o in self.offers() if o.node_id == target],
        ).nodes != (target,):
            return [], []
        old = next(e for e in staying if e.node_id not in best)
        logger.info("rebalancing %s/%s from %s to %s", spec.name, spec.tier, old.node_id, target)
        return [old], [self._load(spec, NodeId(target))]

    def _trim(self, spec: ModelSpec, staying: list[Engine]) -> None:
        """More engines than replicas (a partitioned node came back after its replica was
        placed elsewhere): keep the ones serving longest, unload the rest."""
        extra = len(staying) - spec.replicas
        if extra <= 0:
            return
        by_age = sorted(
            staying, key=lambda e: (e.state != "ready", e.ready_since or math.inf, e.engine_id)
        )
        for engine in by_age[spec.replicas :]:
            self._unload(engine, "more engines than replicas")
            staying.remove(engine)

    def _unload_idle(self) -> None:
        """Unpinned units with no request for idle_unload_s are unloaded (seed 002 §8)."""
        for key, spec in self._units.items():
            if (
                spec.pinned
                or key in self._asleep
                or not self._idle_for(key, self._config.idle_unload_s)
            ):
                continue
            engines = [
                e
                for e in self._registry.engines.values()
                if unit_of(e) == key and e.state in LIVE_STATES
            ]
            if not engines:
                continue
            self._asleep.add(key)
            for engine in engines:
                self._unload(engine, f"idle for {self._config.idle_unload_s:.0f} s")

    def _evict_for(self, spec: ModelSpec, size: int, hosting: set[NodeId]) -> bool:
        """Make room by unloading least recently used unpinned, idle units on one node where
        that lets `spec` fit. True when something was evicted."""
        for offer in self.offers():
            if offer.node_id in hosting or offer.free_bytes >= size:
                continue
            victims = sorted(
                (
                    e
                    for e in self._registry.engines.values()
                    if e.node_id == offer.node_id
                    and e.state in LIVE_STATES
                    and unit_of(e) != spec.key
                    and not self._units[unit_of(e)].pinned
                    and self.usage.get(unit_of(e), Usage()).in_flight == 0
                ),
                key=lambda e: (self.usage.get(unit_of(e), Usage()).last_used, e.engine_id),
            )
            freed, chosen = offer.free_bytes, []
            for victim in victims:
                if freed >= size:
                    break
                victim_size = self.size(self._units[unit_of(victim)])
                freed += victim_size if isinstance(victim_size, int) else 0
                chosen.append(victim)
            if (
                freed < size
                or place(self._demand(spec, size), [replace(offer, free_bytes=freed)]).nodes == ()
            ):
                continue
            for victim in chosen:
                self._asleep.add(unit_of(victim))
                self._unload(victim, f"evicted (least recently used) to make room for {spec.name}")
            return True
        return False

    def _check_liveness(self) -> None:
        now = time.monotonic()
        for node in list(self._registry.nodes.values()):
            silent_s = now - node.last_heartbeat
            if silent_s > self._config.dead_after_s:
                logger.warning("node %s silent for %.1f s: dead", node.node_id, silent_s)
                self._store.add_event(
                    node.node_id, "node_dead", f"no heartbeat for {silent_s:.1f} s"
                )
                self._registry.disconnect(node.node_id)
            elif silent_s > self._config.suspect_after_s and node.liveness == "live":
                logger.warning("node %s silent for %.1f s: suspect", node.node_id, silent_s)
                self._registry.mark_suspect(node.node_id)  # unroute first, then record it
                self._store.add_event(
                    node.node_id, "node_suspect", f"no heartbeat for {silent_s:.1f} s"
                )

    def _awaiting_restore(self, key: UnitKey) -> bool:
        """Whether to hold off placing: a node that ran this unit may still come back."""
        nodes = self._restoring.get(key)
        if not nodes:
            return False
        nodes -= set(self._registry.nodes)
        if not nodes or time.monotonic() - self._started > RESTORE_GRACE_S:
            del self._restoring[key]
            return False
        self.pending[key] = (
            f"waiting up to {RESTORE_GRACE_S:.0f} s for {', '.join(sorted(nodes))} to reconnect"
        )
        return True

    def _backing_off(self, key: UnitKey) -> bool:
        backoff = self._backoff.get(key)
        return backoff is not None and time.monotonic() < backoff.not_before

    def _unload(self, engine: Engine, why: str) -> None:
        logger.info(
            "unloading engine %s (%s/%s) on %s: %s",
            engine.engine_id,
            engine.model,
            engine.tier,
            engine.node_id,
            why,
        )
        self._moving.discard(engine.engine_id)
        self._registry.upsert_engine(replace(engine, state="stopping"))
        self._send(engine.node_id, UnloadCommand(engine.engine_id))

    def _load(self, spec: ModelSpec, node_id: NodeId) -> Engine:
        engine_id = EngineId(f"{spec.name.replace('/', '_')}-{spec.tier[0]}-{uuid.uuid4().hex[:8]}")
        engine = Engine(engine_id, spec.name, node_id, spec.tier, "starting")
        self._registry.upsert_engine(engine)
        self._store.save_placement(engine_id, spec.name, node_id, spec.tier)
        self._send(
            node_id,
            LoadCommand(
                engine_id,
                spec.name,
                spec.source,
                spec.tier,
                self.context_length(spec),
                self.engine_knobs(spec),
                spec.kv_bits,
                spec.kv_group_size,
            ),
        )
        logger.info(
            "placing %s/%s on node %s as engine %s", spec.name, spec.tier, node_id, engine_id
        )
        return engine

    def _send(self, node_id: NodeId, command: Command) -> None:
        self._registry.send(node_id, command)

    def units(self) -> Iterable[ModelSpec]:
        return self._units.values()

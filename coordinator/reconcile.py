"""The reconcile loop: make the engines that run match the units (model × tier) the config asks for.

Each pass: liveness; settle every unit (trim duplicates, let replicas leave cordoned nodes once
their replacements are ready, size it: weights + KV + overhead, coordinator/memory.py, from
files read off the loop, coordinator/model_files.py); place every missing replica with one
`policy.plan()` call over all units (the planner benchmarks/fleet_sim.py measures); evict the
least recently used for what still does not fit; when a node joins, move idle units that now
belong there (a replica leaves only once its replacement is ready); unload idle unpinned
units. Decisions are taken here; the agents carry them out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import Iterable
from dataclasses import replace

from coordinator.config import Config, ModelSpec
from coordinator.errors import SizingError
from coordinator.group_engines import GroupEngines, RunningGroup
from coordinator.groups import Group
from coordinator.holdings import Holdings
from coordinator.holds import RESTORE_WAIT, PlacementHolds
from coordinator.knobs import TierKnobs
from coordinator.liveness import check_liveness
from coordinator.metrics import Metrics
from coordinator.offers import node_offer, placed_bytes
from coordinator.policy import Demand, Offer, Placement, UnitKey, place, plan, victims
from coordinator.registry import (
    LIVE_STATES,
    Engine,
    EngineId,
    LoadCommand,
    NodeId,
    Registry,
    UnloadCommand,
    unit_of,
)
from coordinator.sizing import Sizing
from coordinator.store import Store
from coordinator.trigger_actions import TriggerActions
from coordinator.triggers import Triggers
from coordinator.unit_signals import UnitSignals
from coordinator.units import Units
from coordinator.usage import UnitUsage
from mlxfleet.tiers import Knobs, Tier

logger = logging.getLogger(__name__)

RECONCILE_INTERVAL_S = 0.25  # also woken at once by any registry change; bounds liveness lag
REBALANCE_IDLE_S = 30.0  # a unit with no request for this long may move to a new node
SIZING_PENDING = "sizing: reading the model's files"  # until the read (off the loop) is done
MAKING_ROOM_S = 60.0  # evicted engines exit and free their memory within this


class Reconciler(UnitSignals):
    """Keeps the fleet matching the config. Use from the event loop.

    It owns the tasks that read model files (started by `size`, coordinator/sizing.py);
    `run` cancels them when it ends.
    """

    def __init__(self, config: Config, registry: Registry, store: Store) -> None:
        self._config = config
        self._units = Units(config.models)
        self._registry = registry
        self._store = store
        self.metrics = Metrics()
        for spec in config.models:
            self.metrics.unit_seen(spec.name, spec.tier)
        self._holds = PlacementHolds(store.placements())
        self.groups = GroupEngines(registry, config.stream_stall_s)  # models over several nodes
        self.holdings = Holdings(store)  # where each model's files are (copies, disk)
        self._moving: set[EngineId] = set()  # rebalanced away: unloaded once replaced
        self._loaded_as: dict[EngineId, ModelSpec] = {}  # the spec each engine was loaded with
        self._known_nodes: set[NodeId] = set()
        self.usage = UnitUsage(self._units)
        self.pending: dict[UnitKey, str] = {}  # unit -> why it is not (fully) placed
        self.load_failures: dict[UnitKey, str] = {}  # unit -> its last load failure, until ready
        self.unsplittable: dict[str, str] = {}  # model files (source) that cannot run as groups
        self.cold_starts: list[tuple[UnitKey, float]] = []  # (unit, seconds waited)
        self._making_room: dict[UnitKey, float] = {}  # unit -> when engines were evicted for it
        self._knobs = TierKnobs(config, store, registry, self._units)
        self._sizing = Sizing(self._knobs, registry.changed.set)
        self.triggers = Triggers(config.triggers)
        self._trigger_actions = TriggerActions(
            self.triggers, registry, store, self.metrics, self._knobs, self._relocate_heaviest
        )

    def expecting(self, key: UnitKey) -> bool:
        """Will an engine of this unit be ready without anyone acting? Yes while one is
        starting, while the unit sleeps (a request wakes it), while its replacement waits out
        the backoff after a crash or an OOM kill, while its model files are read, while a node
        that ran it may reconnect, while engines are evicted to make room for it, and until
        the next reconcile step has placed it. No for a unit not in the config, or one no node
        can hold: a request for it is answered at once, not after a wait."""
        if key not in self._units:
            return False
        if self.usage.is_asleep(key) or self._holds.backing_off(key):
            return True
        if any(e.state == "starting" for e in self._live(key)):
            return True
        made_room = self._making_room.get(key)
        if made_room is not None and time.monotonic() - made_room < MAKING_ROOM_S:
            return True
        reason = self.pending.get(key)
        return reason is None or reason == SIZING_PENDING or reason.startswith(RESTORE_WAIT)

    # Tier knobs (coordinator/knobs.py)
    def knobs(self, tier: Tier) -> Knobs:
        return self._knobs.tier(tier)

    def set_tier_knobs(self, tier: Tier, changes: dict[str, int]) -> Knobs:
        """Change a tier's knobs now: stored, and sent to every running engine of the tier."""
        knobs = self._knobs.set_tier(tier, changes)
        self._sizing.knobs_changed()
        self._registry.changed.set()
        return knobs

    def engine_knobs(self, spec: ModelSpec, node_id: NodeId | None = None) -> Knobs:
        return self._knobs.engine(spec, node_id)

    # Sizing (coordinator/sizing.py)
    def size(self, spec: ModelSpec) -> int | SizingError | None:
        """Bytes one engine of this unit needs, why it cannot be sized, or None while its
        model files are being read (off the loop; the registry's `changed` fires after)."""
        return self._sizing.size(spec)

    async def sized(self) -> None:
        """Wait until the model-file reads started so far are done."""
        await self._sizing.settled()

    def context_length(self, spec: ModelSpec) -> int:
        return self._sizing.context_length(spec)

    def _weight(self, key: UnitKey) -> int:
        return self._sizing.weight(self._units.spec(key))

    # The loop
    async def run(self) -> None:
        try:
            while True:
                self._registry.changed.clear()
                self.step()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._registry.changed.wait(), RECONCILE_INTERVAL_S)
        finally:
            self._sizing.close()

    def step(self) -> None:
        """One pass over liveness and every unit; new replicas come from one policy.plan()."""
        check_liveness(self._registry, self._store, self._config)
        for _, engines, why in self.groups.broken(self._unit_demand):  # lives and dies whole
            for engine in engines:
                self._unload(engine, why)
                self.groups.told(engine.engine_id)
        joined = set(self._registry.nodes) - self._known_nodes
        self._known_nodes = set(self._registry.nodes)
        running = {unit_of(e) for e in self._registry.engines.values()}
        for key in self._units.leaving.keys() - running:
            del self._units.leaving[key]  # removed at runtime: its last engine is gone
        for engine in list(self._registry.engines.values()):
            key = unit_of(engine)
            # A group's other ranks go with its rank 0 (or once it is gone: `broken`).
            if key not in self._units and engine.state in LIVE_STATES and engine.serves:
                if self.usage.busy(key):
                    continue  # a model removed at runtime: its requests in flight finish first
                self._unload(engine, "not in the config")
        self._unload_idle()
        units = sorted(self._units.values(), key=self._order)
        demands = {d.key: d for spec in units if (d := self._settle(spec)) is not None}
        for key, placement in plan(list(demands.values()), self.offers()).items():
            self._apply_placement(demands[key], placement)
        if joined:  # a unit given replicas just now is where the plan wants it
            for spec in units:
                if spec.key not in demands:
                    self._rebalance(spec)

    def _order(self, spec: ModelSpec) -> tuple[bool, int, str, str]:
        return (not spec.pinned, -self._weight(spec.key), spec.name, spec.tier)

    def _live(self, key: UnitKey) -> list[Engine]:
        return [
            e
            for e in self._registry.engines.values()
            if unit_of(e) == key and e.state in LIVE_STATES and e.serves
        ]

    def _settle(self, spec: ModelSpec) -> Demand | None:
        """Everything about a unit but new placements; its Demand when replicas are missing
        and may be placed now."""
        key = spec.key
        engines = self._live(key)
        if engines:
            self.usage.awake(key)
        elif self.usage.is_asleep(key):
            self.pending.pop(key, None)
            return None
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
        if size is None or isinstance(size, SizingError):
            self.pending[key] = SIZING_PENDING if size is None else str(size)
            return None
        if sum(e.state == "ready" for e in staying) >= spec.replicas:
            for engine in leaving:  # replacements are ready: the old ones go (in-flight finish)
                self._unload(engine, "moved off a cordoned node or rebalanced")
        if spec.replicas - len(staying) <= 0:
            self.pending.pop(key, None)
            return None
        wait = self._holds.restore_wait(key, self._registry.nodes)
        if wait is not None:
            self.pending[key] = wait
            return None
        if self._holds.backing_off(key):
            return None
        return self._demand(spec, size, staying)

    def _apply_placement(self, demand: Demand, placement: Placement) -> None:
        """Load what the plan placed; for what it could not, evict to make room (it is
        placed once the evicted engines have exited)."""
        spec = self._units[demand.key]
        for node_id in placement.nodes:
            self._load(spec, NodeId(node_id))
        for group in placement.groups:
            self._load_group(spec, group)
        if placement.pending_reason is None:
            self.pending.pop(demand.key, None)
            self._making_room.pop(demand.key, None)
            return
        self._evict_for(demand)
        self.pending[demand.key] = placement.pending_reason

    def _demand(self, spec: ModelSpec, size: int, staying: list[Engine] | None = None) -> Demand:
        """The unit as placement sees it; `staying`: its replicas that stay (a group's by
        its members)."""
        layers, shared = self._sizing.shape(spec) or (0, 0)
        hosted_on = frozenset(e.node_id for e in staying or () if not e.group_id)
        groups = tuple(frozenset(self.groups.nodes(e)) for e in staying or () if e.group_id)
        return Demand(
            spec.name,
            spec.tier,
            spec.replicas,
            size,
            spec.required_labels,
            spec.preferred_labels,
            spec.pinned,
            hosted_on,
            spec.source,
            self.holdings.disk_bytes(spec.source),
            layers,
            shared,
            self.sharding(spec),
            groups,
        )

    def _unit_demand(self, engine: Engine) -> Demand | None:
        """The engine's unit as placement sees it now (None: not in the config, or unsized)."""
        size = self.size(spec) if (spec := self._units.get(unit_of(engine))) else None
        return self._demand(spec, size) if spec is not None and isinstance(size, int) else None

    def offers(self) -> list[Offer]:
        """Every live node's room: its budget minus what its engines need."""
        placed = placed_bytes(
            (e for e in self._registry.engines.values() if self._units.known(unit_of(e))),
            lambda e: self.groups.weight(e) or self._weight(unit_of(e)),  # a group: its share
        )
        return [
            node_offer(
                node,
                placed.get(node.node_id, 0),
                self._config.os_reserve_bytes,
                self.triggers.actions(node.node_id),
                self.holdings,
            )
            for node in sorted(self._registry.nodes.values(), key=lambda n: n.node_id)
            if node.liveness == "live"
        ]

    def _must_leave(self, engine: Engine, spec: ModelSpec) -> bool:
        """Cordoned or drained node, the batch tier moved off it, moved by a rebalance or a
        memory trigger, loaded with what its model's configuration no longer says (changed at
        runtime; a group of a model now on single nodes only): it goes once replaced."""
        nodes = [self._registry.nodes.get(NodeId(n)) for n in self.groups.nodes(engine)]
        return (
            any(node is not None and node.cordoned for node in nodes)
            or self._tripped(engine, spec)
            or engine.engine_id in self._moving
            or self._loaded_as.get(engine.engine_id, spec).engine_args() != spec.engine_args()
            or (bool(engine.group_id) and self.sharding(spec) == "never")
        )

    def _tripped(self, engine: Engine, spec: ModelSpec) -> bool:
        """A trigger on its node (any of its group's) moves it: drain, or move_batch for a
        batch engine."""
        for node_id in self.groups.nodes(engine):
            actions = self.triggers.actions(node_id)
            if "drain" in actions or (spec.tier == "batch" and "move_batch" in actions):
                return True
        return False

    def _relocate_heaviest(self, node_id: NodeId) -> None:
        """A memory trigger asks the node to shed load: its heaviest engine moves away."""
        engines = [
            e
            for e in self._registry.engines.values()
            if e.node_id == node_id and e.state in LIVE_STATES and unit_of(e) in self._units
        ]
        if not engines:
            return
        heaviest = max(engines, key=lambda e: (self._weight(unit_of(e)), e.engine_id))
        logger.info("relocating %s, the heaviest engine on %s", heaviest.engine_id, node_id)
        self._moving.add(EngineId(heaviest.group_id or heaviest.engine_id))  # a group: whole

    def _rebalance(self, spec: ModelSpec) -> None:
        """A node joined: if the policy would now put an idle unit's replica elsewhere, start
        it there; the old engine leaves once the new one is ready. One move per unit and join,
        after the step's new replicas took their room."""
        size = self.size(spec)
        if not isinstance(size, int) or not self.usage.idle_for(spec.key, REBALANCE_IDLE_S):
            return
        staying = [e for e in self._live(spec.key) if not self._must_leave(e, spec)]
        if not staying or any(e.group_id for e in staying):
            return  # a group moves when it breaks or its nodes are drained, not on a join
        current = {e.node_id for e in staying}
        offers = [
            replace(o, free_bytes=o.free_bytes + size) if o.node_id in current else o
            for o in self.offers()
        ]
        best = place(self._demand(spec, size), offers).nodes
        moves = [n for n in best if n not in current]
        if not moves:
            return
        target = moves[0]
        if place(
            replace(self._demand(spec, size), replicas=1),
            [o for o in self.offers() if o.node_id == target],
        ).nodes != (target,):
            return
        old = next(e for e in staying if e.node_id not in best)
        logger.info("rebalancing %s/%s from %s to %s", spec.name, spec.tier, old.node_id, target)
        self._moving.add(old.engine_id)
        self._load(spec, NodeId(target))

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
                or self.usage.is_asleep(key)
                or not self.usage.idle_for(key, self._config.idle_unload_s)
            ):
                continue
            engines = self._live(key)
            if not engines:
                continue
            self.usage.sleep(key)
            for engine in engines:
                self._unload(engine, f"idle for {self._config.idle_unload_s:.0f} s")

    def _evict_for(self, demand: Demand) -> None:
        """Make room by unloading least recently used unpinned, idle units on one node where
        that lets `demand` fit."""
        for offer in self.offers():
            if offer.node_id in demand.hosted_on or offer.free_bytes >= demand.bytes_per_replica:
                continue
            candidates = [
                e
                for e in self._registry.engines.values()
                if e.node_id == offer.node_id
                and e.state in LIVE_STATES
                and not e.group_id  # a group leaves whole, not as one node's victim
                and unit_of(e) != demand.key
                and unit_of(e) in self._units
                and not self._units[unit_of(e)].pinned
                and not self.usage.busy(unit_of(e))
            ]
            lru = lambda e: (self.usage.last_used(unit_of(e)), e.engine_id)  # noqa: E731
            chosen = victims(demand, offer, candidates, lru, lambda e: self._weight(unit_of(e)))
            if chosen is None:
                continue
            self._making_room[demand.key] = time.monotonic()
            for victim in chosen:
                self.usage.sleep(unit_of(victim))
                self._unload(
                    victim, f"evicted (least recently used) to make room for {demand.model}"
                )
            return

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
        self._registry.send(engine.node_id, UnloadCommand(engine.engine_id))
        if engine.group_id and engine.serves:  # rank 0 stops the others once it is done
            for member in self.groups.members(engine.group_id):
                if member.rank != 0 and member.state in LIVE_STATES:
                    self._registry.upsert_engine(replace(member, state="stopping"))

    @staticmethod
    def _new_engine_id(spec: ModelSpec) -> EngineId:
        return EngineId(f"{spec.name.replace('/', '_')}-{spec.tier[0]}-{uuid.uuid4().hex[:8]}")

    def _load(
        self, spec: ModelSpec, node_id: NodeId, group: RunningGroup | None = None, rank: int = 0
    ) -> Engine:
        engine_id = group.engine_id(rank) if group else self._new_engine_id(spec)
        group_id = group.group_id if group else ""
        engine = Engine(
            engine_id, spec.name, node_id, spec.tier, "starting", group_id=group_id, rank=rank
        )
        self._loaded_as[engine_id] = spec
        self._registry.upsert_engine(engine)
        self._store.save_placement(engine_id, spec.name, node_id, spec.tier)
        self._registry.send(
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
                spec.prefix_cache_mib,
                self.holdings.manifest(spec.source),
                tuple(self.holdings.holders(spec.source, self._registry.nodes.values())),
                self.groups.command(group, rank) if group else None,
            ),
        )
        logger.info(
            "placing %s/%s on node %s as engine %s%s",
            spec.name,
            spec.tier,
            node_id,
            engine_id,
            f" (rank {rank} of {len(group.placement.shares)})" if group else "",
        )
        return engine

    def _load_group(self, spec: ModelSpec, group: Group) -> None:
        """Start every rank of a group (coordinator/group_engines.py); rank 0 serves."""
        running = self.groups.add(self._new_engine_id(spec), spec.name, spec.tier, group)
        for share in group.shares:
            self._load(spec, NodeId(share.node_id), running, share.rank)

    def units(self) -> Iterable[ModelSpec]:
        return self._units.values()

    def unit(self, model: str, tier: str) -> ModelSpec | None:
        return self._units.get((model, tier))  # type: ignore[arg-type]

    def set_units(self, specs: Iterable[ModelSpec]) -> None:
        """Serve these units from now on (models changed at runtime): see `step`, `_must_leave`
        for what happens to the engines of removed and changed units."""
        added, removed = self._units.replace_all(specs)
        for key in added:
            self.metrics.unit_seen(*key)
        for key in added | removed:
            self.pending.pop(key, None)
            self.load_failures.pop(key, None)
        engines = self._registry.engines
        self._loaded_as = {e: spec for e, spec in self._loaded_as.items() if e in engines}
        self._registry.changed.set()

"""Groups that run: one model spread over several nodes, as the reconciler placed it.

A group is one replica of its unit. Its rank 0 is the engine that serves (its engine id is the
group's id, and it is the one in the Router); ranks 1.. are engines on the other members with
ids `<group>-r<rank>`. The group lives and dies whole: once any member has exited, failed to
load, or its node left, every other member is unloaded and the unit is placed again (a group
out of lockstep cannot be mended in place; node_agent/engine/group.py). Engines of a group
this coordinator did not place (it restarted) are taken back when every rank reports the same
layout on the nodes it names, and unloaded the same way if not within RESTORE_GRACE_S (the
wait for nodes to reconnect after a restart: coordinator/holds.py). A group unloaded on
purpose (moved, idle) is told through rank 0 only: it finishes its requests, then tells the
other ranks to stop; they are unloaded too once rank 0 has gone.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from coordinator.groups import Group, group_of
from coordinator.holds import RESTORE_GRACE_S
from coordinator.policy import Demand
from coordinator.registry import (
    LIVE_STATES,
    Engine,
    EngineId,
    GroupCommand,
    GroupMemberCommand,
    NodeId,
    Registry,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RunningGroup:
    group_id: str
    model: str
    tier: str
    placement: Group  # coordinator/groups.py: each member's node, rank, layers and bytes

    def engine_id(self, rank: int) -> EngineId:
        return EngineId(self.group_id if rank == 0 else f"{self.group_id}-r{rank}")


class GroupEngines:
    """The groups this coordinator placed, by group id. Use from the event loop."""

    def __init__(self, registry: Registry, stall_s: float) -> None:
        self._registry = registry
        self._stall_s = stall_s
        self.groups: dict[str, RunningGroup] = {}
        self._told: set[EngineId] = set()  # members already told to unload
        self._unknown_since: dict[str, float] = {}  # groups from before a restart: first seen

    def add(self, group_id: str, model: str, tier: str, placement: Group) -> RunningGroup:
        running = RunningGroup(group_id, model, tier, placement)
        self.groups[group_id] = running
        return running

    def command(self, running: RunningGroup, rank: int) -> GroupCommand:
        """What member `rank` is told: every member's node, rank link and layers."""
        nodes = self._registry.nodes
        members = tuple(
            GroupMemberCommand(
                s.rank,
                s.node_id,
                nodes[NodeId(s.node_id)].link_address if NodeId(s.node_id) in nodes else "",
                s.first_layer,
                s.layers,
            )
            for s in running.placement.shares
        )
        return GroupCommand(running.group_id, rank, members, self._stall_s)

    def of(self, engine: Engine) -> RunningGroup | None:
        return self.groups.get(engine.group_id) if engine.group_id else None

    def weight(self, engine: Engine) -> int | None:
        """Bytes a group member's share takes on its node (None: not a group's engine)."""
        running = self.of(engine)
        if running is None:
            return None
        for share in running.placement.shares:
            if share.rank == engine.rank:
                return share.bytes
        return None

    def members(self, group_id: str) -> list[Engine]:
        """The group's engines the registry knows now, rank 0 first."""
        engines = [e for e in self._registry.engines.values() if e.group_id == group_id]
        return sorted(engines, key=lambda e: e.rank)

    def nodes(self, engine: Engine) -> list[str]:
        """The nodes a serving engine runs on: its group's members, or its own node."""
        running = self.of(engine)
        if running is None:
            return [engine.node_id]
        return [s.node_id for s in running.placement.shares]

    def broken(
        self, demand_of: Callable[[Engine], Demand | None] = lambda engine: None
    ) -> list[tuple[str, list[Engine], str]]:
        """Members to unload now: (group id, its engines not yet told, why). A group is broken
        once a member is gone (exited, failed, or its node left) while others remain. A group
        this coordinator does not know (placed before it restarted) is taken back once all its
        ranks report alike (`demand_of`: its unit as placement sees it, to size the shares);
        if not within RESTORE_GRACE_S, its engines go."""
        found: list[tuple[str, list[Engine], str]] = []
        for group_id, running in list(self.groups.items()):
            engines = self.members(group_id)
            if not engines:
                del self.groups[group_id]  # every member has exited: nothing left to do
                continue
            missing = sorted({s.rank for s in running.placement.shares} - {e.rank for e in engines})
            rest = [e for e in engines if e.engine_id not in self._told]
            if missing and rest:
                found.append((group_id, rest, f"rank {missing[0]} of the group is gone"))
        unknown: dict[str, list[Engine]] = {}
        for engine in self._registry.engines.values():
            if (
                engine.group_id
                and engine.group_id not in self.groups
                and engine.engine_id not in self._told
                and engine.state in LIVE_STATES
            ):
                unknown.setdefault(engine.group_id, []).append(engine)
        now = time.monotonic()
        for group_id, engines in unknown.items():
            first = min(engines, key=lambda e: e.rank)
            placement = adopted(engines, demand_of(first))
            if placement is not None:
                self.add(group_id, first.model, first.tier, placement)
                logger.info("took back group %s (%d ranks)", group_id, len(engines))
            elif now - self._unknown_since.setdefault(group_id, now) >= RESTORE_GRACE_S:
                found.append((group_id, engines, "a group this coordinator did not place"))
        self._unknown_since = {g: t for g, t in self._unknown_since.items() if g in unknown}
        return found

    def told(self, engine_id: EngineId) -> None:
        """The member was told to unload (it is not listed by `broken` again)."""
        self._told.add(engine_id)
        self._told &= set(self._registry.engines) | {engine_id}  # forget those that left

    def forget(self, group_id: str) -> None:
        self.groups.pop(group_id, None)


def adopted(engines: list[Engine], demand: Demand | None) -> Group | None:
    """The placement of a group that ran before a coordinator restart, from what its members
    report: every rank 0..n-1 live, each told the same layout, on the node the layout names,
    and layers that are the model's. None while any of that is missing."""
    if demand is None or not engines:
        return None
    split, nodes = engines[0].group_split, engines[0].group_nodes
    by_rank = {e.rank: e for e in engines}
    if not split or len(split) != len(nodes) or sorted(by_rank) != list(range(len(split))):
        return None
    if sum(split) != demand.layers or any(
        (e.group_split, e.group_nodes, e.node_id) != (split, nodes, nodes[e.rank]) for e in engines
    ):
        return None
    return group_of(demand, list(zip(nodes, split, strict=True)))

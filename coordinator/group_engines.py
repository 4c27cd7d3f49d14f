"""Groups that run: one model spread over several nodes, as the reconciler placed it.

A group is one replica of its unit. Its rank 0 is the engine that serves (its engine id is the
group's id, and it is the one in the Router); ranks 1.. are engines on the other members with
ids `<group>-r<rank>`. The group lives and dies whole: once any member has exited, failed to
load, or its node left, every other member is unloaded and the unit is placed again (a group
out of lockstep cannot be mended in place; node_agent/engine/group.py). Engines of a group
this coordinator did not place (it restarted) are unloaded the same way. A group unloaded on
purpose (moved, idle) is told through rank 0 only: it finishes its requests, then tells the
other ranks to stop; they are unloaded too once rank 0 has gone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from coordinator.groups import Group
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

    def broken(self) -> list[tuple[str, list[Engine], str]]:
        """Members to unload now: (group id, its engines not yet told, why). A group is broken
        once a member is gone (exited, failed, or its node left) while others remain; engines
        of groups this coordinator does not know (placed before it restarted) go too."""
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
        found += [(g, e, "a group this coordinator did not place") for g, e in unknown.items()]
        return found

    def told(self, engine_id: EngineId) -> None:
        """The member was told to unload (it is not listed by `broken` again)."""
        self._told.add(engine_id)
        self._told &= set(self._registry.engines) | {engine_id}  # forget those that left

    def forget(self, group_id: str) -> None:
        self.groups.pop(group_id, None)

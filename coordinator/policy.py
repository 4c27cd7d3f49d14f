"""The placement policy: which nodes get a model's replicas. Pure and deterministic.

- batch replicas go to server-role nodes (always-on Mac minis / Studios), packed: the node
  with the least room that still fits (best fit), so big gaps stay free for big models;
- interactive replicas spread: the node with the most headroom first; laptops only when
  their agent opted in;
- required labels filter, preferred labels rank; then nodes that already hold the model's
  files (no copy to wait for); node id breaks every tie;
- a node without disk room for the files it lacks is not eligible;
- a heavy model avoids nodes whose triggers ask to offload it while the others can take it;
- a replica that no single node can hold runs as a pipeline group over the fewest nodes that
  can (coordinator/groups.py), unless its model says sharding = "never".
A model that fits nowhere is pending with a reason that names the shortfall. `plan()` is what
the reconciler calls for every step's new replicas (and what benchmarks/fleet_sim.py measures).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal, TypeVar

from mlxfleet.tiers import Tier

if TYPE_CHECKING:
    from coordinator.groups import Group

T = TypeVar("T")

GIB = 2**30
HEAVY_MODEL_BYTES = 8 * GIB  # replicas this big go to offload-preferred nodes last
UnitKey = tuple[str, Tier]  # the unit of placement: a model in one tier
Sharding = Literal["auto", "never"]  # may a replica run as a pipeline group over several nodes
SHARDING: tuple[Sharding, ...] = ("auto", "never")


@dataclass(frozen=True, slots=True)
class Demand:
    """One unit's desired state, sized."""

    model: str
    tier: Tier
    replicas: int
    bytes_per_replica: int
    required_labels: Mapping[str, str] = field(default_factory=dict)
    preferred_labels: Mapping[str, str] = field(default_factory=dict)
    pinned: bool = False
    # Nodes already running a replica: they count towards `replicas` and take no second one.
    hosted_on: frozenset[str] = frozenset()
    source: str = ""  # the model's files: a node holding them needs no copy and no disk
    disk_bytes: int = 0  # the files' bytes on disk (0: not known yet, not counted)
    # A replica as a pipeline group: each member holds `shared_bytes` (embeddings, LM head,
    # engine overhead) and its layers' share of the rest (coordinator/groups.py).
    layers: int = 0  # transformer layers; 0: not known, never a group
    shared_bytes: int = 0
    sharding: Sharding = "auto"
    # Groups already running a replica, by their members: each counts as one replica, and
    # its members take no other replica or share.
    hosted_groups: tuple[frozenset[str], ...] = ()

    @property
    def key(self) -> UnitKey:
        return (self.model, self.tier)

    @property
    def running_on(self) -> frozenset[str]:
        """Nodes running a replica or a group member of this unit."""
        return self.hosted_on.union(*self.hosted_groups)


@dataclass(frozen=True, slots=True)
class Offer:
    """One live node as placement sees it."""

    node_id: str
    role: Literal["laptop", "server"]
    free_bytes: int  # node budget minus what is already placed there
    labels: Mapping[str, str] = field(default_factory=dict)
    interactive_on_laptop: bool = False  # the laptop's agent opted in
    cordoned: bool = False  # drained or halted by a trigger: no new placements
    batch_closed: bool = False  # a trigger moved the batch tier away from this node
    offload_preferred: bool = False  # repeated OOM kills: heavy models go elsewhere first
    disk_room: int | None = None  # bytes of model files it can take; None: not reported
    holds: frozenset[str] = frozenset()  # sources whose files it holds, complete and verified


@dataclass(frozen=True, slots=True)
class Placement:
    """Where new replicas go, one node each (ids, in order) or as pipeline groups, and why
    the rest could not be placed."""

    nodes: tuple[str, ...]
    pending_reason: str | None = None
    groups: tuple[Group, ...] = ()

    @property
    def placed(self) -> int:
        """New replicas: one per node, one per group."""
        return len(self.nodes) + len(self.groups)


def eligible(demand: Demand, offer: Offer) -> str | None:
    """None when the node may take this model, else why not."""
    if offer.cordoned:
        return "cordoned"
    if demand.tier == "batch" and offer.role != "server":
        return "batch runs on server-role nodes only"
    if demand.tier == "batch" and offer.batch_closed:
        return "batch tier moved away by a trigger"
    if demand.tier == "interactive" and offer.role == "laptop" and not offer.interactive_on_laptop:
        return "laptop has not opted in to serve"
    for key, value in demand.required_labels.items():
        if offer.labels.get(key) != value:
            return f"lacks label {key}={value}"
    if offer.disk_room is not None and _copy_bytes(demand, offer) > offer.disk_room:
        return f"needs {_size(demand.disk_bytes)} of disk, has {_size(offer.disk_room)} free"
    return None


def _size(n: int) -> str:
    """41.2 GiB; below a tenth of a GiB in MiB (a small model's files, a nearly full disk)."""
    return f"{n / GIB:.1f} GiB" if n >= GIB // 10 else f"{n / 2**20:.1f} MiB"


def _copy_bytes(demand: Demand, offer: Offer) -> int:
    """Bytes of model files the node must copy before it can run the demand."""
    return 0 if demand.source in offer.holds else demand.disk_bytes


def preference(demand: Demand, offer: Offer) -> tuple[int, bool]:
    """Lower is better: more preferred labels matched, then holding the files already."""
    labels = sum(offer.labels.get(k) == v for k, v in demand.preferred_labels.items())
    return -labels, _copy_bytes(demand, offer) > 0


def _taken(offer: Offer, demand: Demand, memory: int) -> Offer:
    """The offer once a replica of `demand` (or a group's share: `memory` bytes) is placed
    there: its memory, and the disk its copy of the files takes (it holds them from then on)."""
    disk = offer.disk_room
    if disk is not None:
        disk -= _copy_bytes(demand, offer)
    return replace(
        offer,
        free_bytes=offer.free_bytes - memory,
        disk_room=disk,
        holds=offer.holds | {demand.source} if demand.source else offer.holds,
    )


def place(demand: Demand, offers: Sequence[Offer]) -> Placement:
    """Nodes for the replicas `demand` still lacks (`demand.hosted_on` run one each). A heavy
    replica takes offload-preferred nodes only when the others cannot take them all."""
    if demand.bytes_per_replica >= HEAVY_MODEL_BYTES:
        placement = _place(demand, [o for o in offers if not o.offload_preferred])
        if placement.pending_reason is None:
            return placement
    return _place(demand, offers)


def _place(demand: Demand, offers: Sequence[Offer]) -> Placement:
    used = set(demand.running_on)
    # A group listed once per member is still one group: no two share all their nodes.
    missing = demand.replicas - len(demand.hosted_on) - len(set(demand.hosted_groups))
    if missing <= 0:
        return Placement(())
    candidates = [o for o in offers if o.node_id not in used and eligible(demand, o) is None]
    chosen: list[str] = []
    groups: list[Group] = []
    group_reason = None
    free = {o.node_id: o.free_bytes for o in candidates}
    for _ in range(missing):
        fitting = [
            o
            for o in candidates
            if o.node_id not in used and free[o.node_id] >= demand.bytes_per_replica
        ]
        if fitting:
            chosen.append(_best(demand, fitting, free).node_id)
            used.add(chosen[-1])
            free[chosen[-1]] -= demand.bytes_per_replica
            continue
        open_nodes = [o for o in candidates if o.node_id not in used]
        if demand.sharding != "auto" or demand.layers < 2 or len(open_nodes) < 2:
            break
        from coordinator.groups import place_group  # groups.py builds on this module

        group = place_group(demand, open_nodes)
        if isinstance(group, str):
            group_reason = group
            break
        groups.append(group)
        used.update(group.nodes)
    if len(chosen) + len(groups) == missing:
        return Placement(tuple(chosen), None, tuple(groups))
    placed = demand.replicas - missing + len(chosen) + len(groups)
    reason = _shortfall(demand, offers, used, placed, group_reason)
    return Placement(tuple(chosen), reason, tuple(groups))


def _best(demand: Demand, fitting: Sequence[Offer], free: Mapping[str, int]) -> Offer:
    if demand.tier == "batch":  # pack: least room left after placing, then id
        return min(fitting, key=lambda o: (preference(demand, o), free[o.node_id], o.node_id))
    # spread: most headroom, then id
    return min(fitting, key=lambda o: (preference(demand, o), -free[o.node_id], o.node_id))


def _shortfall(
    demand: Demand, offers: Sequence[Offer], used: set[str], placed: int, group: str | None
) -> str:
    need = f"needs {demand.bytes_per_replica / GIB:.1f} GiB"
    lacking = f"{demand.replicas - placed} of {demand.replicas} replicas unplaced: "
    if not offers:
        return lacking + "no node is connected"
    if group is not None:
        return lacking + group
    open_nodes = [o for o in offers if eligible(demand, o) is None and o.node_id not in used]
    if not open_nodes:
        reasons = sorted(
            {f"{o.node_id}: {eligible(demand, o) or 'already runs it'}" for o in offers}
        )
        return lacking + f"{need}, no eligible node ({'; '.join(reasons)})"
    best = max(open_nodes, key=lambda o: (o.free_bytes, o.node_id))
    return lacking + f"{need}, best node {best.node_id} has {best.free_bytes / GIB:.1f} GiB free"


def plan_order(demand: Demand) -> tuple[bool, int, str, str]:
    """Pinned first, then larger replicas first, then by model and tier."""
    return (not demand.pinned, -demand.bytes_per_replica, demand.model, demand.tier)


def plan(demands: Sequence[Demand], offers: Sequence[Offer]) -> dict[UnitKey, Placement]:
    """Place many units at once in `plan_order`, each seeing the room the previous ones took
    (a group's members each the bytes of their share). Keyed by unit, in that order;
    deterministic for the same inputs."""
    room = {o.node_id: o for o in offers}
    result: dict[UnitKey, Placement] = {}
    for demand in sorted(demands, key=plan_order):
        placement = place(demand, sorted(room.values(), key=lambda o: o.node_id))
        for node_id in placement.nodes:
            room[node_id] = _taken(room[node_id], demand, demand.bytes_per_replica)
        for group in placement.groups:
            for share in group.shares:
                room[share.node_id] = _taken(room[share.node_id], demand, share.bytes)
        result[demand.key] = placement
    return result


def victims(
    demand: Demand,
    offer: Offer,
    candidates: Sequence[T],
    order: Callable[[T], tuple[float, str]],
    weight: Callable[[T], int],
) -> list[T] | None:
    """The first of `candidates` (engines on the offer's node that may go), in `order` (least
    recently used first), to unload so that `demand` fits there; None when even all of them
    would not make room."""
    size = demand.bytes_per_replica
    freed, chosen = offer.free_bytes, []
    for victim in sorted(candidates, key=order):
        if freed >= size:
            break
        freed += weight(victim)
        chosen.append(victim)
    if freed < size or place(demand, [replace(offer, free_bytes=freed)]).nodes == ():
        return None
    return chosen

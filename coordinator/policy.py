"""The placement policy: which nodes get a model's replicas. Pure and deterministic.

- batch replicas go to server-role nodes (always-on Mac minis / Studios), packed: the node
  with the least room that still fits (best fit), so big gaps stay free for big models;
- interactive replicas spread: the node with the most headroom first; laptops only when
  their agent opted in;
- required labels filter, preferred labels rank; node id breaks every tie.
A model that fits nowhere is pending with a reason that names the shortfall.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

GIB = 2**30
from mlxfleet.tiers import Tier  # noqa: E402


@dataclass(frozen=True, slots=True)
class Demand:
    """One model's desired state, sized."""

    model: str
    tier: Tier
    replicas: int
    bytes_per_replica: int
    required_labels: Mapping[str, str] = field(default_factory=dict)
    preferred_labels: Mapping[str, str] = field(default_factory=dict)
    pinned: bool = False


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


@dataclass(frozen=True, slots=True)
class Placement:
    """Where new replicas go (node ids, in order) and why the rest could not be placed."""

    nodes: tuple[str, ...]
    pending_reason: str | None = None


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
    return None


def _preference(demand: Demand, offer: Offer) -> int:
    return sum(offer.labels.get(k) == v for k, v in demand.preferred_labels.items())


def place(demand: Demand, offers: Sequence[Offer], hosting: Iterable[str] = ()) -> Placement:
    """Nodes for the replicas `demand` still lacks (`hosting` already run one each)."""
    hosting = set(hosting)
    missing = demand.replicas - len(hosting)
    if missing <= 0:
        return Placement(())
    candidates = [o for o in offers if o.node_id not in hosting and eligible(demand, o) is None]
    chosen: list[str] = []
    free = {o.node_id: o.free_bytes for o in candidates}
    for _ in range(missing):
        fitting = [
            o
            for o in candidates
            if o.node_id not in chosen and free[o.node_id] >= demand.bytes_per_replica
        ]
        if not fitting:
            break
        if demand.tier == "batch":  # pack: least room left after placing, then id
            best = min(fitting, key=lambda o: (-_preference(demand, o), free[o.node_id], o.node_id))
        else:  # spread: most headroom, then id
            best = min(
                fitting, key=lambda o: (-_preference(demand, o), -free[o.node_id], o.node_id)
            )
        chosen.append(best.node_id)
        free[best.node_id] -= demand.bytes_per_replica
    if len(chosen) == missing:
        return Placement(tuple(chosen))
    return Placement(tuple(chosen), _shortfall(demand, offers, hosting, chosen))


def _shortfall(
    demand: Demand, offers: Sequence[Offer], hosting: set[str], chosen: list[str]
) -> str:
    need = f"needs {demand.bytes_per_replica / GIB:.1f} GiB"
    placed = len(hosting) + len(chosen)
    lacking = f"{demand.replicas - placed} of {demand.replicas} replicas unplaced: "
    if not offers:
        return lacking + "no node is connected"
    open_nodes = [
        o
        for o in offers
        if eligible(demand, o) is None and o.node_id not in hosting and o.node_id not in chosen
    ]
    if not open_nodes:
        reasons = sorted(
            {f"{o.node_id}: {eligible(demand, o) or 'already runs it'}" for o in offers}
        )
        return lacking + f"{need}, no eligible node ({'; '.join(reasons)})"
    best = max(open_nodes, key=lambda o: (o.free_bytes, o.node_id))
    return lacking + f"{need}, best node {best.node_id} has {best.free_bytes / GIB:.1f} GiB free"


def plan(demands: Sequence[Demand], offers: Sequence[Offer]) -> dict[str, Placement]:
    """Place many models at once: pinned first, then larger replicas first (then by name),
    each seeing the room the previous ones took. Deterministic for the same inputs."""
    order = sorted(demands, key=lambda d: (not d.pinned, -d.bytes_per_replica, d.model))
    room = {o.node_id: o for o in offers}
    result: dict[str, Placement] = {}
    for demand in order:
        placement = place(demand, sorted(room.values(), key=lambda o: o.node_id))
        for node_id in placement.nodes:
            room[node_id] = replace(
                room[node_id], free_bytes=room[node_id].free_bytes - demand.bytes_per_replica
            )
        result[demand.model] = placement
    return result

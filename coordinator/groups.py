"""Pipeline groups: one replica of a model that no single node can hold, split by layers over
several nodes as an MLX pipeline group (node_agent/engine/group.py runs it). Pure and
deterministic.

Every member holds the model's shared bytes (embeddings, LM head, engine overhead) and, for
each of its layers, that layer's weights, KV cache and prefix cache share. A group takes the
fewest eligible nodes whose room holds it; among as many, the most preferred: preferred
labels, servers over laptops, nodes holding the files, most free memory, node id. Layers go
in proportion to each member's free bytes, never past what it can hold. Rank 0, which serves
HTTP, is the most preferred member; as mlx-lm's `pipeline()` splits them, it runs the last
layers and the highest rank the first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from coordinator.policy import GIB, Demand, Offer, eligible, preference


@dataclass(frozen=True, slots=True)
class Share:
    """One member of a group: its rank, its layers and the bytes its budget is charged."""

    node_id: str
    rank: int
    first_layer: int  # rank r runs layers [sum(split[r+1:]), + layers): rank 0 the last ones
    layers: int
    bytes: int  # shared bytes + layers × bytes per layer


@dataclass(frozen=True, slots=True)
class Group:
    """One replica over several nodes."""

    shares: tuple[Share, ...]  # by rank, rank 0 first

    @property
    def split(self) -> list[int]:
        """Layers per rank, as mlx-lm's `model.pipeline(group, split)` takes them."""
        return [s.layers for s in self.shares]

    @property
    def nodes(self) -> tuple[str, ...]:
        """Member node ids by rank."""
        return tuple(s.node_id for s in self.shares)


def layer_bytes(demand: Demand) -> int:
    """What one layer costs the member that runs it (rounded up; at least a byte)."""
    rest = max(0, demand.bytes_per_replica - demand.shared_bytes)
    return max(1, -(-rest // max(1, demand.layers)))


def layer_cap(demand: Demand, free: int) -> int:
    """The most layers a member with `free` bytes of room can run (0: not even one)."""
    return max(0, (free - demand.shared_bytes) // layer_bytes(demand))


def group_of(demand: Demand, members: Sequence[tuple[str, int]]) -> Group:
    """The group of `members` (node id, layers), rank 0 first, with mlx-lm's layer order."""
    per_layer, first, shares = layer_bytes(demand), demand.layers, []
    for rank, (node_id, layers) in enumerate(members):
        first -= layers
        shares.append(Share(node_id, rank, first, layers, demand.shared_bytes + layers * per_layer))
    return Group(tuple(shares))


def split_layers(layers: int, budgets: Sequence[int], caps: Sequence[int]) -> list[int]:
    """`layers` over members in proportion to `budgets` (largest remainder), at least one each
    and never above `caps`: a member that would pass its cap runs its cap, and the others share
    the rest in proportion again. Needs every cap ≥ 1 and len(caps) ≤ layers ≤ sum(caps)."""
    split = [0] * len(budgets)
    open_members = list(range(len(budgets)))
    left = layers
    while True:
        shares = _proportional(left, [budgets[i] for i in open_members])
        over = [i for i, n in zip(open_members, shares, strict=True) if n > caps[i]]
        if not over:
            for i, n in zip(open_members, shares, strict=True):
                split[i] = n
            return split
        for i in over:
            split[i] = caps[i]
            left -= caps[i]
        open_members = [i for i in open_members if i not in over]


def _proportional(total: int, weights: Sequence[int]) -> list[int]:
    """`total` in proportion to `weights` by largest remainder (ties: the earlier member), then
    a layer each to members left with none, taken from the largest shares."""
    whole = sum(weights)
    shares = [total * w // whole for w in weights]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(total * weights[i] % whole), i))
    for i in by_remainder[: total - sum(shares)]:
        shares[i] += 1
    for i, n in enumerate(shares):
        if n == 0:
            largest = max(range(len(shares)), key=lambda j: (shares[j], -j))
            shares[largest] -= 1
            shares[i] = 1
    return shares


def place_group(demand: Demand, offers: Sequence[Offer]) -> Group | str:
    """A group for one replica of `demand` over `offers` (the caller found no single node that
    holds one), or why there is none. Nodes already running the unit take no share."""
    if demand.sharding != "auto":
        return f"sharding is {demand.sharding} for this model"
    if demand.layers < 2:
        return "its layer count is not known, so it cannot be split"
    running = demand.running_on
    open_nodes = [o for o in offers if o.node_id not in running and eligible(demand, o) is None]
    ranked = sorted(open_nodes, key=lambda o: _rank(demand, o))
    caps = {o.node_id: layer_cap(demand, o.free_bytes) for o in ranked}
    usable = [o for o in ranked if caps[o.node_id] >= 1]
    largest = sorted((caps[o.node_id] for o in usable), reverse=True)
    for size in range(2, min(len(usable), demand.layers) + 1):
        if sum(largest[:size]) >= demand.layers:
            members = _members(demand.layers, size, usable, caps)
            split = split_layers(
                demand.layers, [o.free_bytes for o in members], [caps[o.node_id] for o in members]
            )
            return group_of(demand, [(o.node_id, n) for o, n in zip(members, split, strict=True)])
    return _no_group(demand, open_nodes)


def _rank(demand: Demand, offer: Offer) -> tuple[int, bool, bool, int, str]:
    """Lower is better: preferred labels, a server, holding the files, free bytes, node id."""
    labels, copies = preference(demand, offer)
    return labels, offer.role != "server", copies, -offer.free_bytes, offer.node_id


def _members(layers: int, size: int, ranked: Sequence[Offer], caps: dict[str, int]) -> list[Offer]:
    """The `size` nodes, in preference order, that hold `layers` between them, taking each
    node in turn when the best of those after it can still complete the group."""
    chosen: list[Offer] = []
    held = 0
    for i, offer in enumerate(ranked):
        if len(chosen) == size:
            break
        need = size - len(chosen) - 1
        after = sorted((caps[o.node_id] for o in ranked[i + 1 :]), reverse=True)[:need]
        if len(after) == need and held + caps[offer.node_id] + sum(after) >= layers:
            chosen.append(offer)
            held += caps[offer.node_id]
    return chosen


def _no_group(demand: Demand, open_nodes: Sequence[Offer]) -> str:
    free = sum(max(0, o.free_bytes) for o in open_nodes)
    nodes = f"{len(open_nodes)} eligible node" + (" has" if len(open_nodes) == 1 else "s have")
    detail = f"{nodes} {free / GIB:.1f} GiB free together"
    if free >= demand.bytes_per_replica and demand.shared_bytes > 0:
        detail += f"; each member also holds {demand.shared_bytes / GIB:.1f} GiB shared"
    return (
        f"needs {demand.bytes_per_replica / GIB:.1f} GiB, "
        f"no group of eligible nodes holds it ({detail})"
    )

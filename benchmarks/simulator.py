"""A fleet simulator for the placement policy. Pure and deterministic per seed.

Random fleets of real Mac models, random demands for real model shapes (some larger than any
single node: those run as pipeline groups), and an exact solver that places as many replicas
as the policy's own constraints allow, so `plan()` (the planner the reconciler calls) can be
measured against the optimum (benchmarks/fleet_sim.py).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from coordinator.groups import group_of, layer_bytes, split_layers
from coordinator.memory import (
    GIB,
    estimated_weight_bytes,
    footprint,
    node_budget,
    pipeline_shape,
)
from coordinator.policy import Demand, Offer, Placement, UnitKey, eligible
from mlxfleet.tiers import Tier


@dataclass(frozen=True, slots=True)
class MacModel:
    """One Mac product line: chip, memory bandwidth and the RAM it ships with."""

    product: str
    chip: str
    bandwidth_gbps: int  # seed 002 §10
    ram_gib: tuple[int, ...]  # configurations Apple sold; 8 GiB ones are left out (not viable)
    role: Literal["laptop", "server"]


# Seed 002 §10 bandwidths; RAM tiers per product. Binned Max chips ship only with 36 GiB.
MACS: tuple[MacModel, ...] = (
    MacModel("MacBook Air", "M2", 100, (16, 24), "laptop"),
    MacModel("MacBook Air", "M3", 100, (16, 24), "laptop"),
    MacModel("MacBook Air", "M4", 120, (16, 24, 32), "laptop"),
    MacModel("MacBook Pro", "M2 Pro", 200, (16, 32), "laptop"),
    MacModel("MacBook Pro", "M3 Pro", 150, (18, 36), "laptop"),
    MacModel("MacBook Pro", "M4 Pro", 273, (24, 48, 64), "laptop"),
    MacModel("MacBook Pro", "M3 Max (14C)", 300, (36,), "laptop"),
    MacModel("MacBook Pro", "M3 Max (16C)", 400, (48, 64, 128), "laptop"),
    MacModel("MacBook Pro", "M4 Max (14C)", 410, (36,), "laptop"),
    MacModel("MacBook Pro", "M4 Max (16C)", 546, (48, 64, 128), "laptop"),
    MacModel("Mac mini", "M4", 120, (16, 24, 32), "server"),
    MacModel("Mac mini", "M4 Pro", 273, (24, 48, 64), "server"),
    MacModel("Mac Studio", "M2 Max", 400, (32, 64, 96), "server"),
    MacModel("Mac Studio", "M2 Ultra", 800, (64, 128, 192), "server"),
    MacModel("Mac Studio", "M4 Max (16C)", 546, (48, 64, 128), "server"),
    MacModel("Mac Studio", "M3 Ultra", 800, (96, 256, 512), "server"),
)
LAPTOP_OPT_IN_P = 0.5  # share of laptops whose agent opted in to serve interactive models

# macOS default GPU wired limit when iogpu.wired_limit_mb = 0 (as node_agent/probes/macos.py).
WIRED_SMALL_MAX_BYTES = 36 * GIB
WIRED_FRACTION_SMALL = 2 / 3
WIRED_FRACTION_LARGE = 3 / 4


def default_wired_limit(ram_bytes: int) -> int:
    """macOS's default GPU wired limit: 2/3 of RAM up to 36 GiB, 3/4 above."""
    small = ram_bytes <= WIRED_SMALL_MAX_BYTES
    return int(ram_bytes * (WIRED_FRACTION_SMALL if small else WIRED_FRACTION_LARGE))


def random_fleet(n: int, seed: int) -> list[Offer]:
    """`n` Macs drawn uniformly from MACS (then a RAM tier), nothing placed yet."""
    rng = random.Random(seed)
    offers = []
    for i in range(n):
        mac = rng.choice(MACS)
        ram = rng.choice(mac.ram_gib) * GIB
        opted_in = mac.role == "laptop" and rng.random() < LAPTOP_OPT_IN_P
        offers.append(
            Offer(
                node_id=f"node-{i:03d}",
                role=mac.role,
                free_bytes=node_budget(ram, default_wired_limit(ram), 0),
                labels={"product": mac.product, "chip": mac.chip, "ram_gib": str(ram // GIB)},
                interactive_on_laptop=opted_in,
            )
        )
    return offers


def _qwen2(hidden: int, inter: int, layers: int, heads: int, kv: int, tie: bool) -> dict[str, Any]:
    vocab = 151936 if tie else 152064  # the tied small Qwen2.5 models have the shorter vocab
    return {
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "vocab_size": vocab,
        "max_position_embeddings": 32768,
        "tie_word_embeddings": tie,
        "use_sliding_window": False,  # sliding_window is set but off: full-context KV
    }


LLAMA3_8B = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "tie_word_embeddings": False,
}
# config.json values of the Hugging Face releases (the fields sizing reads).
MODELS: Mapping[str, Mapping[str, Any]] = {
    "qwen2.5-0.5b": _qwen2(896, 4864, 24, 14, 2, tie=True),
    "qwen2.5-1.5b": _qwen2(1536, 8960, 28, 12, 2, tie=True),
    "qwen2.5-3b": _qwen2(2048, 11008, 36, 16, 2, tie=True),
    "qwen2.5-7b": _qwen2(3584, 18944, 28, 28, 4, tie=False),
    "qwen2.5-14b": _qwen2(5120, 13824, 48, 40, 8, tie=False),
    "qwen2.5-32b": _qwen2(5120, 27648, 64, 40, 8, tie=False),
    "llama-3-8b": LLAMA3_8B,
    "llama-3-70b": {
        **LLAMA3_8B,
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
    },
    # Larger than any Mac's budget at 8 bits (~400 GiB of weights): only a group runs it.
    "llama-3.1-405b": {
        **LLAMA3_8B,
        "hidden_size": 16384,
        "intermediate_size": 53248,
        "num_hidden_layers": 126,
        "num_attention_heads": 128,
        "max_position_embeddings": 131072,
    },
    "mixtral-8x7b": {
        **LLAMA3_8B,
        "vocab_size": 32000,
        "max_position_embeddings": 32768,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "sliding_window": None,
    },
}
QUANT_BITS = (4, 8)  # mlx-community conversions, group size 64
CONTEXTS = (4096, 8192, 16384, 32768)
SEQUENCES: Mapping[Tier, int] = {"interactive": 4, "batch": 12}  # concurrent sequences


def _config(model: str, bits: int) -> dict[str, Any]:
    return {**MODELS[model], "quantization": {"bits": bits, "group_size": 64}}


def replica_bytes(model: str, bits: int, context: int, sequences: int) -> int:
    """Weights + KV cache + engine overhead of one replica (context capped at the model's)."""
    config = _config(model, bits)
    context = min(context, int(config["max_position_embeddings"]))
    return footprint(estimated_weight_bytes(config), config, context, sequences).total


def random_demands(m: int, seed: int) -> list[Demand]:
    """`m` models drawn from MODELS × QUANT_BITS with a random tier, 1–3 replicas and context;
    layers and shared bytes as coordinator/sizing.py gives them, so any may run as a group."""
    rng = random.Random(seed)
    demands = []
    for i in range(m):
        model = rng.choice(sorted(MODELS))
        bits = rng.choice(QUANT_BITS)
        tier: Tier = rng.choice(("interactive", "batch"))
        replicas = rng.randint(1, 3)
        context = rng.choice(CONTEXTS)
        size = replica_bytes(model, bits, context, SEQUENCES[tier])
        layers, shared = pipeline_shape(size, _config(model, bits))
        name = f"m{i:02d}-{model}-{bits}bit"
        demands.append(Demand(name, tier, replicas, size, layers=layers, shared_bytes=shared))
    return demands


def placed_replicas(plan_result: Mapping[Any, Placement]) -> int:
    """Replicas placed: one per node, one per group."""
    return sum(p.placed for p in plan_result.values())


def placed_groups(plan_result: Mapping[Any, Placement]) -> int:
    return sum(len(p.groups) for p in plan_result.values())


def placed_fraction(plan_result: Mapping[UnitKey, Placement], demands: Sequence[Demand]) -> float:
    """Placed replicas / requested replicas (1.0 when nothing is requested)."""
    requested = sum(d.replicas for d in demands)
    return placed_replicas(plan_result) / requested if requested else 1.0


EXACT_MAX_NODES = 8  # the exact search is exponential; refuse what it cannot finish quickly
EXACT_MAX_MODELS = 8
Members = tuple[int, ...]  # offer indices: one for a single replica, two or more for a group
GroupChoice = tuple[Demand, Members, int]  # a group the search placed, with its layer bytes


class SearchLimit(Exception):
    """The exact search did its `max_steps` steps without finishing."""


def _groupable(d: Demand) -> bool:
    return d.sharding == "auto" and d.layers >= 2


def _compositions(total: int, caps: Sequence[int]) -> Iterator[tuple[int, ...]]:
    """Every way to write `total` as one part per cap, each part 1..cap."""
    if not caps:
        if total == 0:
            yield ()
        return
    rest = sum(caps[1:])
    for first in range(max(1, total - rest), min(caps[0], total - len(caps) + 1) + 1):
        for tail in _compositions(total - first, caps[1:]):
            yield (first, *tail)


def _may_fit(groups: Sequence[GroupChoice], room: Sequence[int]) -> bool:
    """Necessary conditions for a split: every node holds a layer of each of its groups, each
    group's members hold its layers, and (Hall's condition on bytes, beyond one layer per
    member) every set of groups fits in the room of their members together."""
    nodes = {j for _, m, _ in groups for j in m}
    spare = {j: room[j] - sum(pl for _, m, pl in groups if j in m) for j in nodes}
    if any(left < 0 for left in spare.values()):
        return False
    if any(sum(room[j] // pl for j in m) < d.layers for d, m, pl in groups):
        return False
    rest = [((d.layers - len(m)) * pl, m) for d, m, pl in groups]
    for size in range(2, len(rest) + 1):
        for some in itertools.combinations(rest, size):
            members = {j for _, m in some for j in m}
            if sum(need for need, _ in some) > sum(spare[j] for j in members):
                return False
    return True


def _most_items(items: Sequence[tuple[int, int]], room: int) -> int:
    """The most items that `room` bytes hold, given as (bytes, how many): smallest first."""
    count = 0
    for size, cap in sorted(items):
        take = min(cap, room // size) if size > 0 else cap
        count += take
        room -= take * size
        if take < cap:
            break
    return count


class _Exact:
    """Branch and bound over every model's replicas: each a node, or a group of nodes whose
    layer split is left open and checked exactly (`_splits`) as the search goes."""

    def __init__(self, demands: Sequence[Demand], offers: Sequence[Offer], max_steps: int | None):
        # Large replicas first: they branch least and fix the most capacity early.
        self.order = sorted(demands, key=lambda d: (-d.bytes_per_replica, d.model))
        self.free = [o.free_bytes for o in offers]
        self.pool = sum(f for f in self.free if f > 0)
        self.allowed = [
            [j for j, o in enumerate(offers) if eligible(d, o) is None] for d in self.order
        ]
        self.per_layer = {d.model: layer_bytes(d) for d in self.order}
        self.singles = [0] * len(offers)  # bytes of single replicas per node
        self.groups: list[GroupChoice] = []
        self.chosen: list[list[Members]] = [[] for _ in self.order]
        self.best: list[list[Members]] = [[] for _ in self.order]
        self.best_splits: list[list[int]] = []
        self.best_count = -1
        self.known: dict[tuple[object, ...], list[list[int]] | None] = {}
        self.steps, self.max_steps = 0, max_steps

    def step(self) -> None:
        self.steps += 1
        if self.max_steps is not None and self.steps > self.max_steps:
            raise SearchLimit(f"exact search passed {self.max_steps} steps")

    def least(self, j: int) -> int:
        """Node j's free bytes less its singles and its groups' smallest shares."""
        taken = sum(d.shared_bytes + pl for d, m, pl in self.groups if j in m)
        return self.free[j] - self.singles[j] - taken

    def feasible(self) -> list[list[int]] | None:
        """A split of every group placed so far (by `_splits`), or None if none fits."""
        room = [f - s for f, s in zip(self.free, self.singles, strict=True)]
        for d, members, _ in self.groups:
            for j in members:
                room[j] -= d.shared_bytes
        in_groups = sorted({j for _, m, _ in self.groups for j in m})
        if any(room[j] < 0 for j in in_groups) or any(
            room[j] < 0 for j, b in enumerate(self.singles) if b
        ):
            return None
        # Singles on nodes outside every group leave the splits as they were.
        key = (*((d.model, m) for d, m, _ in self.groups), *(room[j] for j in in_groups))
        if key not in self.known:
            self.known[key] = self.splits(self.groups, room)
        return self.known[key]

    def splits(self, groups: Sequence[GroupChoice], room: list[int]) -> list[list[int]] | None:
        """Layers per member of each group such that every node's layers fit its `room` (free
        bytes less singles and the groups' shared bytes), or None when no split does.

        Exact: on a member that no later group uses, how its layers fall does not matter to
        the others; on one that later groups use, fewer is never worse, so the group gives
        those members the fewest layers in total that the rest can complete, in every
        distribution."""
        self.step()
        if not groups:
            return []
        if not _may_fit(groups, room):
            return None
        d, members, per_layer = groups[0]
        later = {j for _, m, _ in groups[1:] for j in m}
        caps = [room[j] // per_layer for j in members]
        shared = [i for i, j in enumerate(members) if j in later]
        own = [i for i, j in enumerate(members) if j not in later]
        total = max(len(shared), d.layers - sum(caps[i] for i in own)) if own else d.layers
        if d.layers - total < len(own):
            return None
        for parts in _compositions(total, [caps[i] for i in shared]):
            for i, n in zip(shared, parts, strict=True):
                room[members[i]] -= n * per_layer
            tail = self.splits(groups[1:], room)
            for i, n in zip(shared, parts, strict=True):
                room[members[i]] += n * per_layer
            if tail is not None:
                split = [0] * len(members)
                for i, n in zip(shared, parts, strict=True):
                    split[i] = n
                rest = split_layers(
                    d.layers - total, [room[members[i]] for i in own], [caps[i] for i in own]
                )
                for i, n in zip(own, rest, strict=True):
                    split[i] = n
                return [split, *tail]
        return None

    def bound(self, k: int) -> int:
        """Most replicas units k.. can still get. Relaxation: each model's replicas capped by
        its nodes (one that holds a replica, or a pair that can hold a layer each), sharing
        pooled free bytes (a group costs at least a replica's bytes): the fleet's, and that of
        each set of nodes some models are limited to (the batch tier's servers, a label)."""
        room = [self.least(j) for j in range(len(self.free))]
        items: dict[frozenset[int], list[tuple[int, int]]] = {}
        for d, nodes, chosen in zip(self.order[k:], self.allowed[k:], self.chosen[k:], strict=True):
            fits = sum(room[j] >= d.bytes_per_replica for j in nodes)
            if _groupable(d):
                part = d.shared_bytes + self.per_layer[d.model]
                fits += sum(part <= room[j] < d.bytes_per_replica for j in nodes) // 2
            cap = min(d.replicas - len(chosen), fits)
            items.setdefault(frozenset(nodes), []).append((d.bytes_per_replica, cap))
        used = sum(self.singles) + sum(
            len(m) * d.shared_bytes + d.layers * pl for d, m, pl in self.groups
        )
        fleet = _most_items([c for group in items.values() for c in group], self.pool - used)
        by_nodes = sum(
            _most_items(group, sum(max(0, room[j]) for j in nodes))
            for nodes, group in items.items()
        )
        return min(fleet, by_nodes)

    def options(self, k: int) -> list[Members]:
        """Unit k's possible next replicas: single nodes, then groups, fewest members first."""
        d, allowed = self.order[k], self.allowed[k]
        room = {j: self.least(j) for j in allowed}
        found: list[Members] = [(j,) for j in allowed if room[j] >= d.bytes_per_replica]
        if _groupable(d):
            caps = {j: (room[j] - d.shared_bytes) // self.per_layer[d.model] for j in allowed}
            usable = [j for j in allowed if caps[j] >= 1]
            for size in range(2, min(len(usable), d.layers) + 1):
                for members in itertools.combinations(usable, size):
                    if sum(caps[j] for j in members) >= d.layers:
                        found.append(members)
        return found

    def search(
        self, k: int, start: int, placed: int, taken: frozenset[int], opts: list[Members]
    ) -> None:
        self.step()
        if placed + self.bound(k) <= self.best_count:
            return
        if k == len(self.order):
            self.best_count, self.best = placed, [list(c) for c in self.chosen]
            self.best_splits = self.feasible() or []
            return
        d = self.order[k]
        if len(self.chosen[k]) < d.replicas:
            for i in range(start, len(opts)):
                members = opts[i]
                if taken.intersection(members):
                    continue
                if len(members) == 1:
                    self.singles[members[0]] += d.bytes_per_replica
                else:
                    self.groups.append((d, members, self.per_layer[d.model]))
                if self.feasible() is not None:
                    self.chosen[k].append(members)
                    self.search(k, i + 1, placed + 1, taken.union(members), opts)
                    self.chosen[k].pop()
                if len(members) == 1:
                    self.singles[members[0]] -= d.bytes_per_replica
                else:
                    self.groups.pop()
        following = self.options(k + 1) if k + 1 < len(self.order) else []
        self.search(k + 1, 0, placed, frozenset(), following)


def exact_assignment(
    demands: Sequence[Demand], offers: Sequence[Offer], max_steps: int | None = None
) -> dict[str, Placement]:
    """A placement with the most replicas under the policy's constraints (eligibility, free
    bytes, one replica or group member of a model per node; a replica of a model that may be
    split can run as a group of 2 or more eligible nodes with any split of its layers that
    fits), by branch and bound. Keyed by model. Small instances only; SearchLimit past
    `max_steps` steps (states visited and split checks)."""
    if len(offers) > EXACT_MAX_NODES or len(demands) > EXACT_MAX_MODELS:
        raise ValueError(
            f"exact search is for ≤ {EXACT_MAX_NODES} nodes × ≤ {EXACT_MAX_MODELS} models, "
            f"got {len(offers)} × {len(demands)}"
        )
    exact = _Exact(demands, offers, max_steps)
    exact.search(0, 0, 0, frozenset(), exact.options(0) if exact.order else [])
    result: dict[str, Placement] = {}
    layers = iter(exact.best_splits)
    for d, picks in zip(exact.order, exact.best, strict=True):
        nodes = tuple(offers[m[0]].node_id for m in picks if len(m) == 1)
        groups = tuple(
            group_of(d, list(zip((offers[j].node_id for j in m), next(layers), strict=True)))
            for m in picks
            if len(m) > 1
        )  # ranked by offer order
        result[d.model] = Placement(nodes, None, groups)
    return result


def exact_plan(demands: Sequence[Demand], offers: Sequence[Offer]) -> int:
    """The most replicas any placement can place under the policy's constraints."""
    return placed_replicas(exact_assignment(demands, offers))

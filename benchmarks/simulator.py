"""A fleet simulator for the placement policy. Pure and deterministic per seed.

Random fleets of real Mac models, random demands for real model shapes, and an exact solver
that places as many replicas as the policy's own constraints allow, so `plan()` (the planner
the reconciler calls) can be measured against the optimum (benchmarks/fleet_sim.py).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from coordinator.memory import GIB, estimated_weight_bytes, footprint, node_budget
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


def replica_bytes(model: str, bits: int, context: int, sequences: int) -> int:
    """Weights + KV cache + engine overhead of one replica (context capped at the model's)."""
    config = {**MODELS[model], "quantization": {"bits": bits, "group_size": 64}}
    context = min(context, int(config["max_position_embeddings"]))
    return footprint(estimated_weight_bytes(config), config, context, sequences).total


def random_demands(m: int, seed: int) -> list[Demand]:
    """`m` models drawn from MODELS × QUANT_BITS with a random tier, 1–3 replicas and context."""
    rng = random.Random(seed)
    demands = []
    for i in range(m):
        model = rng.choice(sorted(MODELS))
        bits = rng.choice(QUANT_BITS)
        tier: Tier = rng.choice(("interactive", "batch"))
        replicas = rng.randint(1, 3)
        context = rng.choice(CONTEXTS)
        size = replica_bytes(model, bits, context, SEQUENCES[tier])
        demands.append(Demand(f"m{i:02d}-{model}-{bits}bit", tier, replicas, size))
    return demands


def placed_replicas(plan_result: Mapping[UnitKey, Placement]) -> int:
    return sum(len(p.nodes) for p in plan_result.values())


def placed_fraction(plan_result: Mapping[UnitKey, Placement], demands: Sequence[Demand]) -> float:
    """Placed replicas / requested replicas (1.0 when nothing is requested)."""
    requested = sum(d.replicas for d in demands)
    return placed_replicas(plan_result) / requested if requested else 1.0


EXACT_MAX_NODES = 8  # the exact search is exponential; refuse what it cannot finish quickly
EXACT_MAX_MODELS = 8


def exact_assignment(
    demands: Sequence[Demand], offers: Sequence[Offer]
) -> dict[str, tuple[str, ...]]:
    """A placement with the most replicas under the policy's constraints (eligibility,
    free bytes, one replica of a model per node), by branch and bound. Small instances only."""
    if len(offers) > EXACT_MAX_NODES or len(demands) > EXACT_MAX_MODELS:
        raise ValueError(
            f"exact search is for ≤ {EXACT_MAX_NODES} nodes × ≤ {EXACT_MAX_MODELS} models, "
            f"got {len(offers)} × {len(demands)}"
        )
    # Large replicas first: they branch least and fix the most capacity early.
    order = sorted(demands, key=lambda d: (-d.bytes_per_replica, d.model))
    free = [o.free_bytes for o in offers]
    allowed = [[j for j, o in enumerate(offers) if eligible(d, o) is None] for d in order]
    chosen: list[tuple[int, ...]] = [() for _ in order]
    best: list[tuple[int, ...]] = list(chosen)
    best_count = -1

    def bound(k: int) -> int:
        # Relaxation: each model's replicas capped by its fitting nodes, all of them sharing
        # the fleet's pooled free bytes; smallest first maximises the count.
        caps = []
        for d, nodes in zip(order[k:], allowed[k:], strict=True):
            fits = sum(free[j] >= d.bytes_per_replica for j in nodes)
            caps.append((d.bytes_per_replica, min(d.replicas, fits)))
        pool, count = sum(f for f in free if f > 0), 0
        for size, cap in sorted(caps):
            take = min(cap, pool // size) if size > 0 else cap
            count += take
            pool -= take * size
            if take < cap:
                break
        return count

    def search(k: int, placed: int) -> None:
        nonlocal best_count, best
        if placed + bound(k) <= best_count:
            return
        if k == len(order):
            best_count, best = placed, list(chosen)
            return
        d = order[k]
        fitting = [j for j in allowed[k] if free[j] >= d.bytes_per_replica]
        for size in range(min(d.replicas, len(fitting)), -1, -1):
            for nodes in itertools.combinations(fitting, size):
                for j in nodes:
                    free[j] -= d.bytes_per_replica
                chosen[k] = nodes
                search(k + 1, placed + size)
                for j in nodes:
                    free[j] += d.bytes_per_replica
        chosen[k] = ()

    search(0, 0)
    return {
        d.model: tuple(offers[j].node_id for j in nodes)
        for d, nodes in zip(order, best, strict=True)
    }


def exact_plan(demands: Sequence[Demand], offers: Sequence[Offer]) -> int:
    """The most replicas any placement can place under the policy's constraints."""
    return sum(len(nodes) for nodes in exact_assignment(demands, offers).values())

"""The fleet simulator: deterministic random fleets and demands, and an exact solver that is
checked against brute force (pipeline groups included), against hand-computed optima and
against the policy."""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace

import pytest

from benchmarks.simulator import (
    MACS,
    MODELS,
    SEQUENCES,
    SearchLimit,
    default_wired_limit,
    exact_assignment,
    exact_plan,
    placed_fraction,
    placed_groups,
    placed_replicas,
    random_demands,
    random_fleet,
    replica_bytes,
)
from coordinator.groups import group_of, layer_bytes
from coordinator.memory import (
    GIB,
    engine_overhead,
    node_budget,
    shared_weight_bytes,
)
from coordinator.policy import Demand, Offer, Placement, eligible, plan


def server(node_id: str, free_gib: float, **labels: str) -> Offer:
    return Offer(node_id, "server", int(free_gib * GIB), labels=labels)


def batch(model: str, gib: float, replicas: int = 1, **labels: str) -> Demand:
    return Demand(model, "batch", replicas, int(gib * GIB), required_labels=labels)


def nodes_of(assignment: Mapping[str, Placement]) -> dict[str, tuple[str, ...]]:
    return {model: p.nodes for model, p in assignment.items()}


def valid(
    assignment: Mapping[str, Placement], demands: Sequence[Demand], offers: Sequence[Offer]
) -> bool:
    """The policy's constraints, checked independently of the solver: eligible nodes, each
    taking one replica or group member of a model, groups of 2+ members running every layer
    (1+ each) in mlx-lm's order, and no node given more than its free bytes."""
    by_id = {o.node_id: o for o in offers}
    used = dict.fromkeys(by_id, 0)
    for d in demands:
        placement = assignment.get(d.model, Placement(()))
        members = [n for g in placement.groups for n in g.nodes]
        nodes = [*placement.nodes, *members]
        if len(set(nodes)) != len(nodes) or placement.placed > d.replicas:
            return False
        if any(eligible(d, by_id[node_id]) is not None for node_id in nodes):
            return False
        for node_id in placement.nodes:
            used[node_id] += d.bytes_per_replica
        for group in placement.groups:
            split = group.split
            if len(split) < 2 or sum(split) != d.layers or min(split) < 1:
                return False
            for rank, share in enumerate(group.shares):
                if share.rank != rank or share.first_layer != sum(split[rank + 1 :]):
                    return False
                if share.bytes != d.shared_bytes + share.layers * layer_bytes(d):
                    return False
                used[share.node_id] += share.bytes
    return all(used[n] <= by_id[n].free_bytes for n in by_id)


def replica_options(d: Demand, ids: Sequence[str]) -> Iterator[tuple[tuple[str, int], ...]]:
    """Every way to run one replica: a node, or a group of 2+ nodes with every split."""
    yield from (((node_id, d.layers),) for node_id in ids)
    for size in range(2, len(ids) + 1 if d.layers >= 2 else 0):
        for members in itertools.combinations(ids, size):
            for cuts in itertools.combinations(range(1, d.layers), size - 1):
                bounds = (0, *cuts, d.layers)
                yield tuple(zip(members, map(int.__sub__, bounds[1:], bounds), strict=True))


def brute_force(demands: Sequence[Demand], offers: Sequence[Offer]) -> int:
    """Every assignment of every model to every set of replicas (nodes, or groups with every
    split): the optimum by definition."""
    ids = [o.node_id for o in offers]
    options = []
    for d in demands:
        one = list(replica_options(d, ids))
        options.append([c for k in range(d.replicas + 1) for c in itertools.combinations(one, k)])
    best = 0
    for choice in itertools.product(*options):
        assignment = {}
        for d, replicas in zip(demands, choice, strict=True):
            nodes = tuple(r[0][0] for r in replicas if len(r) == 1)
            groups = tuple(group_of(d, list(r)) for r in replicas if len(r) > 1)
            assignment[d.model] = Placement(nodes, None, groups)
        if valid(assignment, demands, offers):
            best = max(best, sum(len(c) for c in choice))
    return best


def test_default_wired_limit_is_two_thirds_up_to_36_gib_then_three_quarters() -> None:
    assert default_wired_limit(24 * GIB) == 16 * GIB
    assert default_wired_limit(36 * GIB) == 24 * GIB
    assert default_wired_limit(48 * GIB) == 36 * GIB
    assert default_wired_limit(512 * GIB) == 384 * GIB


def test_random_fleet_is_deterministic_per_seed_and_valid() -> None:
    fleet = random_fleet(40, seed=7)
    assert fleet == random_fleet(40, seed=7)
    assert fleet != random_fleet(40, seed=8)
    assert len({o.node_id for o in fleet}) == 40
    known = {(m.product, m.chip): m for m in MACS}
    for o in fleet:
        mac = known[(o.labels["product"], o.labels["chip"])]
        ram_gib = int(o.labels["ram_gib"])
        assert ram_gib in mac.ram_gib
        assert o.role == ("laptop" if o.labels["product"].startswith("MacBook") else "server")
        assert o.role == mac.role
        ram = ram_gib * GIB
        assert o.free_bytes == node_budget(ram, default_wired_limit(ram), 0) > 0
        assert not o.cordoned
        assert not o.interactive_on_laptop or o.role == "laptop"
    # 40 draws see both roles and both laptop choices.
    assert {o.role for o in fleet} == {"laptop", "server"}
    assert {o.interactive_on_laptop for o in fleet if o.role == "laptop"} == {True, False}


def test_smallest_mac_budget_is_ram_less_reserve() -> None:
    # 16 GiB: min(16 − 8 reserve, 2/3 × 16) = 8 GiB.
    assert node_budget(16 * GIB, default_wired_limit(16 * GIB), 0) == 8 * GIB


def test_random_demands_are_deterministic_and_sized_from_memory_math() -> None:
    demands = random_demands(30, seed=3)
    assert demands == random_demands(30, seed=3)
    assert len({d.model for d in demands}) == 30
    for d in demands:
        assert 1 <= d.replicas <= 3
        assert d.tier in ("interactive", "batch")
        assert d.bytes_per_replica > 0
        model = d.model.split("-", 1)[1].rsplit("-", 1)[0]
        assert d.layers == MODELS[model]["num_hidden_layers"]
        config = {**MODELS[model], "quantization": {"bits": int(d.model[-4]), "group_size": 64}}
        assert d.shared_bytes == shared_weight_bytes(config) + engine_overhead(config)
        assert 0 < d.shared_bytes < d.bytes_per_replica
    # One by hand: Qwen2.5-7B at 4 bits, 8K context, 4 sequences of 16-bit KV.
    kv = 2 * 28 * 4 * 128 * 2 * 8192 * 4  # layers × kv_heads × head_dim × bytes × tokens × seqs
    assert replica_bytes("qwen2.5-7b", 4, 8192, SEQUENCES["interactive"]) > kv
    # Llama-3's context is capped at its 8K maximum rather than rejected.
    assert replica_bytes("llama-3-8b", 4, 32768, 1) == replica_bytes("llama-3-8b", 4, 8192, 1)


def test_count_beats_size_order_the_policy_places_the_big_model_first() -> None:
    # One 10 GiB server; 6 + 5 + 5. Larger-first places 6 and then neither 5; the optimum is 5 + 5.
    offers = [server("s", 10)]
    demands = [batch("big", 6), batch("a", 5), batch("b", 5)]
    assert placed_replicas(plan(demands, offers)) == 1
    assert exact_plan(demands, offers) == 2
    assert nodes_of(exact_assignment(demands, offers)) == {"big": (), "a": ("s",), "b": ("s",)}


def test_best_fit_decreasing_is_not_optimal_but_the_solver_is() -> None:
    # Two 10 GiB servers, items 5 4 3 3 3 2 (20 GiB): best fit leaves 2 out; 5+3+2 | 4+3+3 fits all.
    offers = [server("a", 10), server("b", 10)]
    demands = [batch(f"m{i}-{gib}", gib) for i, gib in enumerate((5, 4, 3, 3, 3, 2))]
    assert placed_replicas(plan(demands, offers)) == 5
    assert exact_plan(demands, offers) == 6 == brute_force(demands, offers)
    assert valid(exact_assignment(demands, offers), demands, offers)


def test_spreading_interactive_can_block_batch() -> None:
    # Interactive spreads to the most headroom (the server), leaving no room for the batch model,
    # which may only run on a server; the optimum puts the interactive model on the laptop.
    offers = [
        Offer("laptop", "laptop", 10 * GIB, interactive_on_laptop=True),
        server("studio", 12),
    ]
    demands = [Demand("chat", "interactive", 1, 8 * GIB), batch("jobs", 6)]
    assert placed_replicas(plan(demands, offers)) == 1
    assert nodes_of(exact_assignment(demands, offers)) == {
        "chat": ("laptop",),
        "jobs": ("studio",),
    }


def test_solver_respects_eligibility_and_one_replica_per_node() -> None:
    offers = [
        server("s1", 100, rack="a"),
        server("s2", 100, rack="a"),
        server("s3", 100, rack="b"),  # wrong label
        Offer("s4", "server", 100 * GIB, labels={"rack": "a"}, cordoned=True),
        Offer("l1", "laptop", 100 * GIB, labels={"rack": "a"}),  # batch never runs on laptops
        Offer("l2", "laptop", 100 * GIB, labels={"rack": "a"}),  # not opted in to interactive
    ]
    demands = [
        batch("jobs", 1, replicas=3, rack="a"),
        Demand("chat", "interactive", 3, GIB, required_labels={"rack": "a"}),
    ]
    # Plenty of room, but only s1 and s2 qualify, and each takes one replica of each model.
    assert exact_plan(demands, offers) == 4
    assert nodes_of(exact_assignment(demands, offers)) == {
        "jobs": ("s1", "s2"),
        "chat": ("s1", "s2"),
    }
    assert placed_replicas(plan(demands, offers)) == 4


def test_solver_equals_brute_force_on_tiny_random_instances() -> None:
    """Real model shapes without groups (their dozens of layers make every split too many to
    enumerate), then small made-up ones with groups."""
    for seed in range(40):
        offers = random_fleet(3, seed)
        demands = [replace(d, layers=0) for d in random_demands(3, 5000 + seed)]
        assert exact_plan(demands, offers) == brute_force(demands, offers), seed
    grouped = 0
    for seed in range(30):
        offers, demands = tiny_instance(seed)
        assignment = exact_assignment(demands, offers)
        assert valid(assignment, demands, offers), seed
        assert placed_replicas(assignment) == brute_force(demands, offers), seed
        grouped += placed_groups(assignment) > 0
    assert grouped >= 10  # the instances do need groups


def tiny_instance(seed: int) -> tuple[list[Offer], list[Demand]]:
    """3 nodes of 4–16 GiB; 2 models of 6–20 GiB, 2–5 layers, 0.5–2 GiB shared, 1–2 replicas."""
    rng = random.Random(seed)
    offers = [
        Offer(
            f"n{i}",
            rng.choice(["server", "laptop"]),
            rng.randint(4, 16) * GIB,
            interactive_on_laptop=rng.random() < 0.5,
        )  # fmt: skip
        for i in range(3)
    ]
    demands = [
        Demand(
            f"m{i}",
            rng.choice(["interactive", "batch"]),
            rng.randint(1, 2),
            rng.randint(6, 20) * GIB,
            layers=rng.randint(2, 5),
            shared_bytes=rng.randint(1, 4) * GIB // 2,
        )  # fmt: skip
        for i in range(2)
    ]
    return offers, demands


def test_the_policy_reaches_the_optimum_where_only_groups_fit() -> None:
    # 49 GiB of 12 layers and 1 GiB shared on 20 GiB nodes (4 layers each): a group of three.
    offers = [server(f"s{i}", 20) for i in range(4)]
    big = Demand("big", "batch", 2, 49 * GIB, layers=12, shared_bytes=GIB)
    small = batch("small", 2)
    for demands in ([big], [big, small]):
        assert placed_replicas(plan(demands, offers)) == exact_plan(demands, offers)
    assignment = exact_assignment([big, small], offers)
    assert [g.split for g in assignment["big"].groups] == [[4, 4, 4]]  # a 2nd needs 3 more nodes
    assert assignment["small"].placed == 1
    result = plan([big, small], offers)
    assert [g.split for g in result["big", "batch"].groups] == [[4, 4, 4]]
    assert placed_replicas(result) == 2
    # 405B at 8 bits fits no Mac at all; a fleet of M3 Ultras runs it as a group.
    assert replica_bytes("llama-3.1-405b", 8, 4096, 1) > 384 * GIB


def test_solver_is_at_least_the_policy_and_valid_on_small_random_instances() -> None:
    beaten = 0
    grouped: list[float] = []  # policy / optimum where the policy placed a group
    for seed in range(60):
        offers = random_fleet(5, seed)
        demands = random_demands(5, 1_000_000 + seed)
        assignment = exact_assignment(demands, offers)
        assert valid(assignment, demands, offers), seed
        best = placed_replicas(assignment)
        result = plan(demands, offers)
        policy = placed_replicas(result)
        assert best >= policy, seed
        beaten += best > policy
        if placed_groups(result):
            grouped.append(policy / best)
    assert beaten > 0  # the random instances do exercise cases the greedy misses
    assert len(grouped) >= 10  # and ones where the policy places groups
    # Larger units first: a group for a big model can take the room of several small ones.
    assert sum(grouped) / len(grouped) >= 0.75


def test_placed_fraction() -> None:
    offers = [server("s", 10)]
    demands = [batch("a", 4, replicas=2), batch("b", 4)]  # 3 requested; a's 2nd needs a 2nd node
    assert placed_fraction(plan(demands, offers), demands) == pytest.approx(2 / 3)
    assert placed_fraction({}, []) == 1.0


def test_exact_search_refuses_large_instances() -> None:
    with pytest.raises(ValueError, match="exact search"):
        exact_plan(random_demands(3, 0), random_fleet(50, 0))
    with pytest.raises(SearchLimit, match="passed 10 steps"):
        exact_assignment(random_demands(5, 1_000_000), random_fleet(5, 0), max_steps=10)

"""Pipeline groups: one replica over several nodes when no single node holds it. Pure."""

from __future__ import annotations

import random
from dataclasses import replace

from coordinator.groups import Group, Share, layer_bytes, place_group, split_layers
from coordinator.policy import GIB, Demand, Offer, Placement, place, plan


def big(gib: float, layers: int, shared_gib: float, **kwargs: object) -> Demand:
    """A replica of `gib` GiB: `shared_gib` on every member, the rest split over `layers`."""
    return Demand(
        "big",
        "interactive",
        1,
        int(gib * GIB),
        layers=layers,
        shared_bytes=int(shared_gib * GIB),
        **kwargs,  # type: ignore[arg-type]
    )


def server(node_id: str, free_gib: float, **kwargs: object) -> Offer:
    return Offer(node_id, "server", int(free_gib * GIB), **kwargs)  # type: ignore[arg-type]


def test_two_nodes_hold_what_neither_holds_alone() -> None:
    # 48 GiB: 4 GiB shared + 8 layers of 5.5 GiB; each node can run 5 layers (4 + 5 × 5.5 ≤ 32).
    demand = big(48, 8, 4)
    offers = [server("mini-a", 32), server("mini-b", 32)]
    assert place(demand, offers).nodes == ()  # no single node
    group = place_group(demand, offers)
    assert group == Group(
        (
            Share("mini-a", rank=0, first_layer=4, layers=4, bytes=26 * GIB),
            Share("mini-b", rank=1, first_layer=0, layers=4, bytes=26 * GIB),
        )
    )
    assert group.split == [4, 4]
    assert group.nodes == ("mini-a", "mini-b")
    placement = place(demand, offers)
    assert (placement.nodes, placement.groups, placement.pending_reason) == ((), (group,), None)
    assert placement.placed == 1


def test_layers_follow_each_members_budget() -> None:
    # 22 GiB = 1 GiB shared + 6 layers of 3.5 GiB; budgets 20 and 10 GiB: layers 4 and 2.
    demand = big(22, 6, 1)
    group = place_group(demand, [server("b-small", 10), server("a-large", 20)])
    assert isinstance(group, Group)
    assert group.shares == (
        Share("a-large", 0, first_layer=2, layers=4, bytes=15 * GIB),  # 1 + 4 × 3.5
        Share("b-small", 1, first_layer=0, layers=2, bytes=8 * GIB),  # 1 + 2 × 3.5
    )
    assert layer_bytes(demand) == int(3.5 * GIB)


def test_three_nodes_when_two_are_not_enough_rank_0_runs_the_last_layers() -> None:
    # 49 GiB = 1 shared + 12 layers of 4; a 20 GiB node runs 4 layers: two run 8, three 12.
    demand = big(49, 12, 1)
    group = place_group(demand, [server("n1", 20), server("n2", 20), server("n3", 20)])
    assert isinstance(group, Group)
    assert [(s.node_id, s.rank, s.first_layer, s.layers) for s in group.shares] == [
        ("n1", 0, 8, 4),
        ("n2", 1, 4, 4),
        ("n3", 2, 0, 4),
    ]
    assert {s.bytes for s in group.shares} == {17 * GIB}


def test_the_fewest_nodes_come_before_preferences() -> None:
    demand = big(49, 12, 1, preferred_labels={"site": "east"})  # caps: 40 GiB → 9, 10 GiB → 2
    offers = [
        server("east-small", 10, labels={"site": "east"}),
        server("w1", 40),
        server("w2", 40),
        server("w3", 40),
    ]
    group = place_group(demand, offers)
    assert isinstance(group, Group)
    # The preferred node plus any other runs 2 + 9 < 12 layers: two others run all 12.
    assert group.nodes == ("w1", "w2")
    assert group.split == [6, 6]
    # Once the preferred node can complete a pair, it is in it, as rank 0.
    roomy = [replace(offers[0], free_bytes=30 * GIB), *offers[1:]]
    group = place_group(demand, roomy)
    assert isinstance(group, Group)
    assert group.nodes == ("east-small", "w1")
    assert group.split == [5, 7]  # 12 × 30/70 = 5.14 and 12 × 40/70 = 6.86


def test_servers_then_nodes_holding_the_files_are_preferred() -> None:
    demand = big(49, 12, 1, source="hub/big", disk_bytes=60 * GIB)  # caps: 40 → 9, 30 → 7
    laptop = Offer("a-laptop", "laptop", 40 * GIB, interactive_on_laptop=True)
    copier = server("b-server", 30)
    holder = server("c-holder", 30, holds=frozenset({"hub/big"}))
    full = server("d-full-disk", 40, disk_room=10 * GIB)  # cannot take the 60 GiB copy
    group = place_group(demand, [laptop, copier, holder, full])
    assert isinstance(group, Group)
    assert group.nodes == ("c-holder", "b-server")
    assert group.split == [6, 6]
    # Preferred labels come first of all: the laptop, then the holder.
    east = replace(demand, preferred_labels={"site": "east"})
    group = place_group(east, [replace(laptop, labels={"site": "east"}), copier, holder])
    assert isinstance(group, Group)
    assert group.nodes == ("a-laptop", "c-holder")
    assert group.split == [7, 5]


def test_no_member_runs_more_layers_than_it_holds() -> None:
    # 31 GiB = 6 shared + 10 layers of 2.5. In proportion to 30:10 GiB the small node would run
    # 2.5 layers, but it holds one (6 + 2.5 ≤ 10): it runs 1 and the large node the other 9.
    demand = big(31, 10, 6)
    group = place_group(demand, [server("large", 30), server("small", 10)])
    assert isinstance(group, Group)
    assert group.shares == (
        Share("large", 0, first_layer=1, layers=9, bytes=int(28.5 * GIB)),
        Share("small", 1, first_layer=0, layers=1, bytes=int(8.5 * GIB)),
    )
    assert all(s.bytes <= o for s, o in zip(group.shares, (30 * GIB, 10 * GIB), strict=True))


def test_split_layers_in_proportion_within_caps() -> None:
    assert split_layers(6, [20, 10], [5, 2]) == [4, 2]
    assert split_layers(12, [10, 40, 20], [2, 12, 12]) == [2, 7, 3]  # largest remainders
    # The first member's cap is 1: the others share the other 11 in proportion (40:20).
    assert split_layers(12, [10, 40, 20], [1, 12, 12]) == [1, 7, 4]
    # Every member runs a layer even when its share rounds to none.
    assert split_layers(3, [1, 1000, 1000], [5, 5, 5]) == [1, 1, 1]
    assert split_layers(80, [1, 99], [80, 80]) == [1, 79]


def test_sharding_never_keeps_the_single_node_reason() -> None:
    demand = big(48, 8, 4, sharding="never")
    offers = [server("mini-a", 32), server("mini-b", 32)]
    placement = place(demand, offers)
    assert (placement.nodes, placement.groups) == ((), ())
    assert placement.pending_reason == (
        "1 of 1 replicas unplaced: needs 48.0 GiB, best node mini-b has 32.0 GiB free"
    )
    assert place_group(demand, offers) == "sharding is never for this model"
    unknown = big(48, 0, 4)  # layers not known (no config.json yet): never a group either
    assert place(unknown, offers).pending_reason == placement.pending_reason


def test_cordoned_and_laptops_not_opted_in_take_no_share() -> None:
    demand = big(49, 12, 1)
    offers = [
        server("a-cordoned", 40, cordoned=True),
        Offer("b-laptop", "laptop", 40 * GIB),  # not opted in
        server("c", 30),
        server("d", 30),
    ]
    group = place_group(demand, offers)
    assert isinstance(group, Group)
    assert group.nodes == ("c", "d")
    assert place_group(demand, offers[:3]) == (
        "needs 49.0 GiB, no group of eligible nodes holds it "
        "(1 eligible node has 30.0 GiB free together)"
    )
    batch = replace(demand, tier="batch")  # servers only
    assert place_group(batch, [*offers, Offer("e-laptop", "laptop", 40 * GIB)]) == group
    assert place_group(batch, [Offer("l", "laptop", 99 * GIB), server("s", 30)]) == (
        "needs 49.0 GiB, no group of eligible nodes holds it "
        "(1 eligible node has 30.0 GiB free together)"
    )


def test_pending_reason_when_no_group_fits() -> None:
    demand = big(41.2, 8, 1)
    offers = [server("s1", 10), server("s2", 10), server("s3", 10.1)]
    assert place(demand, offers).pending_reason == (
        "1 of 1 replicas unplaced: needs 41.2 GiB, no group of eligible nodes holds it "
        "(3 eligible nodes have 30.1 GiB free together)"
    )
    # Room enough in total, but each member also holds the 6 GiB shared: 1 layer of 8.8 each.
    shared = big(41.2, 4, 6)
    placement = place(shared, [server("s1", 16), server("s2", 16), server("s3", 16)])
    assert placement.groups == ()
    assert placement.pending_reason == (
        "1 of 1 replicas unplaced: needs 41.2 GiB, no group of eligible nodes holds it "
        "(3 eligible nodes have 48.0 GiB free together; each member also holds 6.0 GiB shared)"
    )


def test_plan_charges_each_member_its_share() -> None:
    group_unit = big(48, 8, 4)  # 26 GiB on each of the two nodes: 6 GiB left on each
    small = Demand("small", "interactive", 1, 8 * GIB)
    fits = Demand("fits", "batch", 1, 5 * GIB)
    result = plan([small, fits, group_unit], [server("mini-a", 32), server("mini-b", 32)])
    assert [g.nodes for g in result["big", "interactive"].groups] == [("mini-a", "mini-b")]
    assert result["small", "interactive"].pending_reason == (
        "1 of 1 replicas unplaced: needs 8.0 GiB, best node mini-b has 6.0 GiB free"
    )
    assert result["fits", "batch"].nodes == ("mini-a",)


def test_replicas_as_groups_count_and_never_share_a_node() -> None:
    two = replace(big(48, 8, 4), replicas=2)
    offers = [server(f"n{i}", 32) for i in range(5)]
    placement = place(two, offers)
    assert [g.nodes for g in placement.groups] == [("n0", "n1"), ("n2", "n3")]
    assert placement.pending_reason is None
    # A running group counts as one replica; its members take no share of the next.
    running = replace(two, hosted_groups=(frozenset({"n0", "n1"}),))
    placement = place(running, offers)
    assert [g.nodes for g in placement.groups] == [("n2", "n3")]
    assert place(replace(running, replicas=1), offers) == Placement(())  # nothing missing
    twice = replace(running, hosted_groups=running.hosted_groups * 2)  # listed per member
    assert place(twice, offers) == placement
    # One replica on a node that holds it alone, the other as a group of the rest.
    mixed = [server("studio", 60), *offers[:2]]
    placement = place(two, mixed)
    assert placement.nodes == ("studio",)
    assert [g.nodes for g in placement.groups] == [("n0", "n1")]
    three = replace(two, replicas=3)
    reason = place(three, mixed).pending_reason
    assert reason == (
        "1 of 3 replicas unplaced: needs 48.0 GiB, no eligible node "
        "(n0: already runs it; n1: already runs it; studio: already runs it)"
    )


def test_groups_are_deterministic_and_never_overcommit() -> None:
    rng = random.Random(11)
    offers = [
        Offer(
            f"n{i:02}",
            rng.choice(["server", "laptop"]),
            rng.randint(8, 64) * GIB,
            interactive_on_laptop=rng.random() < 0.5,
        )  # fmt: skip
        for i in range(12)
    ]
    demands = [
        Demand(
            f"m{i}",
            rng.choice(["interactive", "batch"]),
            rng.randint(1, 2),
            rng.randint(20, 120) * GIB,
            layers=rng.randint(2, 80),
            shared_bytes=rng.randint(1, 4) * GIB,
        )  # fmt: skip
        for i in range(8)
    ]
    first = plan(demands, offers)
    assert plan(list(reversed(demands)), list(reversed(offers))) == first
    assert sum(len(p.groups) for p in first.values()) >= 2
    used = {o.node_id: 0 for o in offers}
    for d in demands:
        placement = first[d.key]
        for node_id in placement.nodes:
            used[node_id] += d.bytes_per_replica
        for group in placement.groups:
            assert sum(group.split) == d.layers and min(group.split) >= 1
            assert [s.rank for s in group.shares] == list(range(len(group.shares)))
            for share in group.shares:
                assert share.first_layer == sum(group.split[share.rank + 1 :])
                assert share.bytes == d.shared_bytes + share.layers * layer_bytes(d)
                used[share.node_id] += share.bytes
        members = [n for g in placement.groups for n in g.nodes] + list(placement.nodes)
        assert len(members) == len(set(members))
    assert all(used[o.node_id] <= o.free_bytes for o in offers)

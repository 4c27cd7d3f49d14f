"""The placement policy: pure, deterministic, and honest about why something is pending."""

from __future__ import annotations

import random
from dataclasses import replace

from coordinator.policy import GIB, HEAVY_MODEL_BYTES, Demand, Offer, place, plan

STUDIO = Offer("studio-1", "server", 60 * GIB)
MINI_A = Offer("mini-a", "server", 20 * GIB)
MINI_B = Offer("mini-b", "server", 12 * GIB)
LAPTOP = Offer("laptop-1", "laptop", 30 * GIB)
OPTED_IN = Offer("laptop-2", "laptop", 40 * GIB, interactive_on_laptop=True)


def test_batch_packs_onto_servers_best_fit() -> None:
    demand = Demand("qwen-7b", "batch", replicas=1, bytes_per_replica=10 * GIB)
    assert place(demand, [STUDIO, MINI_A, MINI_B, OPTED_IN]).nodes == ("mini-b",)
    two = Demand("qwen-7b", "batch", replicas=2, bytes_per_replica=10 * GIB)
    assert place(two, [STUDIO, MINI_A, MINI_B]).nodes == ("mini-b", "mini-a")


def test_interactive_spreads_to_the_most_headroom_and_skips_laptops_unless_opted_in() -> None:
    demand = Demand("chat", "interactive", replicas=2, bytes_per_replica=10 * GIB)
    assert place(demand, [MINI_A, LAPTOP, STUDIO]).nodes == ("studio-1", "mini-a")
    assert place(demand, [MINI_A, LAPTOP, OPTED_IN]).nodes == ("laptop-2", "mini-a")


def test_required_and_preferred_labels() -> None:
    east = Offer("mini-east", "server", 16 * GIB, labels={"site": "east"})
    west = Offer("mini-west", "server", 64 * GIB, labels={"site": "west"})
    required = Demand("m", "interactive", 1, 8 * GIB, required_labels={"site": "east"})
    assert place(required, [east, west]).nodes == ("mini-east",)
    preferred = Demand("m", "interactive", 1, 8 * GIB, preferred_labels={"site": "east"})
    assert place(preferred, [west, east]).nodes == ("mini-east",)


def test_pending_names_the_shortfall() -> None:
    big = Demand("llama-70b", "interactive", 1, int(41.2 * GIB))
    placement = place(big, [Offer("studio-2", "server", int(30.1 * GIB)), MINI_A])
    assert placement.nodes == ()
    assert placement.pending_reason == (
        "1 of 1 replicas unplaced: needs 41.2 GiB, best node studio-2 has 30.1 GiB free"
    )
    batch = Demand("m", "batch", 1, GIB)
    reason = place(batch, [LAPTOP]).pending_reason
    assert reason is not None and "laptop-1: batch runs on server-role nodes only" in reason
    assert place(batch, []).pending_reason == "1 of 1 replicas unplaced: no node is connected"


def test_replicas_never_share_a_node_and_existing_ones_count() -> None:
    demand = Demand("m", "interactive", replicas=3, bytes_per_replica=GIB)
    placement = place(replace(demand, hosted_on=frozenset({"mini-a"})), [MINI_A, MINI_B])
    assert placement.nodes == ("mini-b",)
    assert placement.pending_reason is not None
    assert placement.pending_reason.startswith("1 of 3 replicas unplaced")
    assert place(replace(demand, hosted_on=frozenset({"x", "y", "z"})), [MINI_A]).nodes == ()


def test_cordoned_nodes_get_nothing() -> None:
    demand = Demand("m", "batch", 1, GIB)
    cordoned = Offer("mini-a", "server", 20 * GIB, cordoned=True)
    assert place(demand, [cordoned, MINI_B]).nodes == ("mini-b",)


def test_plan_is_deterministic_and_never_overcommits() -> None:
    rng = random.Random(7)
    offers = [
        Offer(
            f"n{i:02}",
            rng.choice(["server", "laptop"]),
            rng.randint(8, 120) * GIB,
            interactive_on_laptop=rng.random() < 0.5,
        )
        for i in range(30)
    ]
    demands = [
        Demand(
            f"m{i:02}",
            rng.choice(["interactive", "batch"]),
            rng.randint(1, 3),
            rng.randint(2, 45) * GIB,
            pinned=rng.random() < 0.2,
        )
        for i in range(20)
    ]
    first = plan(demands, offers)
    assert plan(list(reversed(demands)), list(reversed(offers))) == first
    used = {o.node_id: 0 for o in offers}
    for demand in demands:
        for node_id in first[demand.key].nodes:
            used[node_id] += demand.bytes_per_replica
    assert all(used[o.node_id] <= o.free_bytes for o in offers)
    assert any(p.nodes for p in first.values())


def test_plan_takes_pinned_then_larger_units_first_each_in_the_room_left() -> None:
    """The order the reconciler relies on: pinned, then bytes, then model and tier."""
    small_pinned = Demand("z-pinned", "interactive", 1, 8 * GIB, pinned=True)
    big = Demand("a-big", "interactive", 1, 14 * GIB)
    mid = Demand("m", "interactive", 1, 10 * GIB)
    result = plan([mid, big, small_pinned], [MINI_A])  # 20 GiB: the pinned one, then big won't fit
    assert list(result) == [
        ("z-pinned", "interactive"),
        ("a-big", "interactive"),
        ("m", "interactive"),
    ]
    assert result["z-pinned", "interactive"].nodes == ("mini-a",)
    assert result["a-big", "interactive"].nodes == ()
    assert result["m", "interactive"].nodes == ("mini-a",)  # 12 GiB left after the pinned one
    reason = result["a-big", "interactive"].pending_reason
    assert reason == "1 of 1 replicas unplaced: needs 14.0 GiB, best node mini-a has 12.0 GiB free"


def test_plan_keys_units_by_model_and_tier_and_counts_hosted_replicas() -> None:
    chat = Demand("m", "interactive", 2, 4 * GIB, hosted_on=frozenset({"studio-1"}))
    jobs = Demand("m", "batch", 1, 4 * GIB)
    result = plan([chat, jobs], [STUDIO, MINI_A, MINI_B])
    assert result["m", "interactive"].nodes == ("mini-a",)  # studio-1 already runs one
    assert result["m", "batch"].nodes == ("mini-b",)
    done = Demand("m", "interactive", 1, 4 * GIB, hosted_on=frozenset({"studio-1"}))
    assert plan([done], [STUDIO])["m", "interactive"].nodes == ()


def test_heavy_units_avoid_offload_preferred_nodes_while_others_fit() -> None:
    oomed = Offer("studio-oom", "server", 100 * GIB, offload_preferred=True)
    heavy = Demand("big", "interactive", 1, HEAVY_MODEL_BYTES)
    assert place(heavy, [oomed, MINI_A]).nodes == ("mini-a",)
    tiny = Offer("mini-c", "server", 6 * GIB)
    assert place(heavy, [oomed, tiny]).nodes == ("studio-oom",)  # nowhere else fits
    light = Demand("small", "interactive", 1, HEAVY_MODEL_BYTES - 1)
    assert place(light, [oomed, MINI_A]).nodes == ("studio-oom",)  # the most headroom


def test_a_node_without_disk_room_for_the_files_is_never_chosen() -> None:
    """Issue 18: disk is a resource. A node that must copy 41.2 GiB of files but has 30.1 GiB
    of room is not eligible, and the pending reason says so; one that holds them needs none."""
    demand = Demand(
        "llama-70b", "interactive", 1, 8 * GIB, source="hub/llama", disk_bytes=int(41.2 * GIB)
    )
    full = Offer("vm-2", "server", 60 * GIB, disk_room=int(30.1 * GIB))
    placement = place(demand, [full])
    assert placement.nodes == ()
    assert placement.pending_reason == (
        "1 of 1 replicas unplaced: needs 8.0 GiB, no eligible node "
        "(vm-2: needs 41.2 GiB of disk, has 30.1 GiB free)"
    )
    holding = replace(full, holds=frozenset({"hub/llama"}))
    assert place(demand, [holding]).nodes == ("vm-2",)
    unknown = replace(full, disk_room=None)  # an agent that reports no disk: not constrained
    assert place(demand, [unknown]).nodes == ("vm-2",)


def test_nodes_holding_the_files_are_preferred_and_plan_counts_the_disk_copies_take() -> None:
    demand = Demand("m", "interactive", 1, 4 * GIB, source="hub/m", disk_bytes=10 * GIB)
    roomy = Offer("a-roomy", "server", 60 * GIB, disk_room=100 * GIB)
    holder = Offer("b-holder", "server", 20 * GIB, disk_room=0, holds=frozenset({"hub/m"}))
    # Spread would pick the most headroom (a-roomy); holding the files wins over headroom.
    assert place(demand, [roomy, holder]).nodes == ("b-holder",)
    # Preferred labels still come first.
    labelled = replace(demand, preferred_labels={"site": "east"})
    east = replace(roomy, labels={"site": "east"})
    assert place(labelled, [east, holder]).nodes == ("a-roomy",)
    # Two models copied to one node: the second sees the room the first copy took.
    one = Demand("one", "batch", 1, GIB, source="hub/one", disk_bytes=60 * GIB)
    two = Demand("two", "batch", 1, GIB, source="hub/two", disk_bytes=60 * GIB)
    placements = plan([one, two], [roomy])
    assert placements[("one", "batch")].nodes == ("a-roomy",)
    assert placements[("two", "batch")].nodes == ()
    assert "needs 60.0 GiB of disk, has 40.0 GiB free" in str(
        placements[("two", "batch")].pending_reason
    )
    # Both tiers of one model share its files: the second unit copies nothing more.
    batch = Demand("m", "batch", 1, GIB, source="hub/m", disk_bytes=60 * GIB)
    inter = replace(batch, tier="interactive")
    both = plan([batch, inter], [roomy])
    assert both[("m", "batch")].nodes == ("a-roomy",) and both[("m", "interactive")].nodes == (
        "a-roomy",
    )

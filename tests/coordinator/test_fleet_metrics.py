"""The coordinator's metrics: fleet gauges read at scrape time, and the agents' scrape targets."""

from __future__ import annotations

from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from coordinator.config import ModelSpec
from coordinator.fleet_metrics import FleetCollector, pending_code, sd_targets
from coordinator.grpc_service import metrics_target
from coordinator.registry import NodeId
from tests.coordinator.test_placement_units import GIB, Fleet, facts, model_folder


def samples(fleet: Fleet) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    metrics = fleet.reconciler.metrics
    metrics.watch(FleetCollector(fleet.reconciler, fleet.registry, fleet.routing, fleet.store))
    text = metrics.render().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(found: dict, name: str, **labels: str) -> float | None:
    return found.get((name, frozenset(labels.items())))


def test_nodes_units_pending_reasons_and_placements(tmp_path: Path) -> None:
    big = model_folder(tmp_path, "big", 40 * GIB)
    small = model_folder(tmp_path, "small", GIB)
    fleet = Fleet(
        tmp_path,
        ModelSpec("big", big),
        ModelSpec("small", small),
        ModelSpec("missing", str(tmp_path / "nowhere")),
    )
    fleet.join("studio", facts(48))
    fleet.join("laptop", facts(16, role="laptop"))
    fleet.registry.nodes[NodeId("laptop")].cordoned = True
    fleet.store.save_node("gone", "gone-host", {"role": "server"})  # enrolled, not connected
    fleet.reconciler.step()
    found = samples(fleet)

    assert value(found, "mlxfleet_nodes", state="live", role="server") == 1
    assert value(found, "mlxfleet_nodes", state="cordoned", role="laptop") == 1
    assert value(found, "mlxfleet_nodes", state="offline", role="server") == 1
    assert value(found, "mlxfleet_nodes", state="suspect", role="server") == 0
    assert (
        value(
            found, "mlxfleet_node_info", node="studio", role="server", chip="Apple M2", state="live"
        )
        == 1
    )
    # big fits nowhere (weights + KV over the budget), missing cannot be sized
    assert (
        value(
            found,
            "mlxfleet_unit_pending",
            model="big",
            tier="interactive",
            reason="insufficient_memory",
        )
        == 1
    )
    assert (
        value(
            found,
            "mlxfleet_unit_pending",
            model="missing",
            tier="interactive",
            reason="sizing_error",
        )
        == 1
    )
    assert not [k for k in found if k[0] == "mlxfleet_unit_pending" and ("model", "small") in k[1]]
    [engine] = [e for e in fleet.registry.engines.values() if e.model == "small"]
    assert (
        value(
            found,
            "mlxfleet_placements",
            node="studio",
            model="small",
            tier="interactive",
            state="starting",
        )
        == 1
    )
    assert value(found, "mlxfleet_units", model="small", tier="interactive", state="loading") == 1
    assert value(found, "mlxfleet_units", model="big", tier="interactive", state="pending") == 1
    assert value(found, "mlxfleet_unit_replicas", model="small", tier="interactive") == 1

    fleet.ready(engine.engine_id)
    found = samples(fleet)
    assert value(found, "mlxfleet_units", model="small", tier="interactive", state="ready") == 1
    # a loopback engine is order 1 (local)
    assert (
        value(found, "mlxfleet_router_deployments", model="small", tier="interactive", order="1")
        == 1
    )
    assert value(found, "mlxfleet_router_cooldowns", model="small", tier="interactive") == 0


def test_tier_knobs_and_zeroed_unit_series_exist_before_any_traffic(tmp_path: Path) -> None:
    small = model_folder(tmp_path, "small", GIB)
    fleet = Fleet(tmp_path, ModelSpec("small", small, "batch"))
    found = samples(fleet)
    assert value(found, "mlxfleet_tier_batch_window_seconds", tier="batch") == 0.08
    assert value(found, "mlxfleet_tier_max_batch_size", tier="batch") == 12
    assert value(found, "mlxfleet_tier_max_concurrency", tier="interactive") == 4
    zero_tokens = {"model": "small", "tier": "batch", "key": ""}  # no key has used it yet
    assert value(found, "mlxfleet_generation_tokens_total", **zero_tokens) == 0
    assert (
        value(found, "mlxfleet_failovers_total", model="small", tier="batch", cause="continued")
        == 0
    )
    assert value(found, "mlxfleet_ttft_seconds_count", model="small", tier="batch") == 0


def test_request_metrics_count_tokens_and_split_ttft_from_decode(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path)
    metrics = fleet.reconciler.metrics
    metrics.request_done("m", "interactive", 200, 1.5, (12, 30), "messages", "etl")
    metrics.request_done("", "", 401, None, None, "chat")
    metrics.stream_timing("m", "interactive", 0.2, 1.16, 30)  # 29 gaps of 40 ms
    found = samples(fleet)
    ok = {"model": "m", "tier": "interactive", "status": "200", "api": "messages", "key": "etl"}
    assert value(found, "mlxfleet_requests_total", **ok) == 1
    refused = {"model": "", "tier": "", "status": "401", "api": "chat", "key": ""}
    assert value(found, "mlxfleet_requests_total", **refused) == 1
    unit = {"model": "m", "tier": "interactive", "key": "etl"}
    assert value(found, "mlxfleet_prompt_tokens_total", **unit) == 12
    assert value(found, "mlxfleet_generation_tokens_total", **unit) == 30
    assert (
        value(found, "mlxfleet_ttft_seconds_bucket", model="m", tier="interactive", le="0.25") == 1
    )
    assert (
        value(found, "mlxfleet_ttft_seconds_bucket", model="m", tier="interactive", le="0.15") == 0
    )
    tpot_sum = value(
        found, "mlxfleet_time_per_output_token_seconds_sum", model="m", tier="interactive"
    )
    assert tpot_sum is not None and abs(tpot_sum - 0.04) < 1e-9
    assert (
        value(found, "mlxfleet_request_duration_seconds_sum", model="m", tier="interactive") == 1.5
    )


def test_every_placement_shortfall_maps_to_a_reason_code() -> None:
    # the texts coordinator/policy.py and the reconciler write
    assert pending_code("1 of 1 replicas unplaced: no node is connected") == "no_node"
    assert (
        pending_code("1 of 2 replicas unplaced: needs 9.4 GiB, no eligible node (a: laptop)")
        == "no_eligible_node"
    )
    assert (
        pending_code("1 of 1 replicas unplaced: needs 45.0 GiB, best node s has 40.0 GiB free")
        == "insufficient_memory"
    )
    assert pending_code("waiting up to 15 s for mini-1 to reconnect") == "restoring"
    assert pending_code("something new") == "other"


def test_agents_are_scrape_targets_at_the_address_their_stream_came_from(tmp_path: Path) -> None:
    assert metrics_target("ipv4:10.0.0.7:53122", 8402) == "10.0.0.7:8402"
    assert metrics_target("ipv6:[::1]:53122", 9100) == "[::1]:9100"
    assert metrics_target("ipv4:10.0.0.7:53122", 0) == ""  # it serves no metrics
    assert metrics_target("unix:/tmp/sock", 8402) == ""
    fleet = Fleet(tmp_path)
    fleet.join("mini-1", facts(32))
    fleet.join("mini-2", facts(16, role="laptop"))
    fleet.registry.nodes[NodeId("mini-1")].metrics_target = "10.0.0.7:8402"
    assert sd_targets(fleet.registry) == [
        {"targets": ["10.0.0.7:8402"], "labels": {"node": "mini-1", "role": "server"}}
    ]


def test_group_members_are_their_shares_by_node_rank_and_layers(tmp_path: Path) -> None:
    """A model no node can hold alone runs as a group over two: one series per member."""
    big = model_folder(tmp_path, "big", 40 * GIB)  # 32 layers; ~45 GiB, a budget is 40 GiB
    fleet = Fleet(tmp_path, ModelSpec("big", big))
    fleet.join("studio-1", facts(48))
    fleet.join("studio-2", facts(48))
    assert not [k for k in samples(fleet) if k[0] == "mlxfleet_group_member_bytes"]
    fleet.reconciler.step()
    [(group_id, running)] = fleet.reconciler.groups.groups.items()
    found = samples(fleet)

    members = {
        labels: v for (name, labels), v in found.items() if name == "mlxfleet_group_member_bytes"
    }
    unit = {"model": "big", "tier": "interactive", "group": group_id}
    rank_0 = {"node": "studio-1", "rank": "0", "first_layer": "16", "layers": "16"}
    rank_1 = {"node": "studio-2", "rank": "1", "first_layer": "0", "layers": "16"}
    [share_0, share_1] = running.placement.shares
    assert members == {
        frozenset({**unit, **rank_0}.items()): share_0.bytes,
        frozenset({**unit, **rank_1}.items()): share_1.bytes,
    }
    # each holds half the layers and every member's shared bytes: more than half, under 40 GiB
    assert 20 * GIB < share_0.bytes == share_1.bytes < 40 * GIB

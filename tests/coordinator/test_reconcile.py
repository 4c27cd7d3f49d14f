"""The reconcile loop's decisions, driven step by step on the real registry and router."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pytest

from coordinator import policy, reconcile
from coordinator.config import Config, ModelSpec
from coordinator.pki import FleetPki
from coordinator.policy import Demand, Offer
from coordinator.reconcile import SIZING_PENDING, Reconciler
from coordinator.registry import Engine, EngineId, NodeId, NodeStatus, Registry, UnloadCommand
from coordinator.routing import Routing
from coordinator.store import Store
from mlxfleet.facts import NodeFacts
from tests.coordinator.test_placement_units import GIB, Fleet, facts, model_folder

FACTS = NodeFacts("h", "M2", "macOS", 32 * 2**30, 8, 0, 0.0, 0, "server")
STATUS = NodeStatus(20 * 2**30, 0, "normal", "nominal", "ac", False)


def fleet(tmp_path: Path) -> tuple[Registry, Routing, Reconciler]:
    routing = Routing(FleetPki.load_or_create(tmp_path).ca_cert_pem)
    registry = Registry(routing)
    config = Config(home=tmp_path, models=(ModelSpec("demo", str(tmp_path)),))
    return registry, routing, Reconciler(config, registry, Store(tmp_path / "s.sqlite3"))


def test_a_returning_node_cannot_unseat_the_engine_that_is_serving(tmp_path: Path) -> None:
    """A partitioned node comes back with its old engine after the model moved elsewhere:
    the engine serving since the move stays, the returning one is unloaded."""
    registry, routing, reconciler = fleet(tmp_path)
    for node in ("a", "b"):
        registry.connect(NodeId(node), FACTS, [])
        registry.heartbeat(NodeId(node), STATUS, {})
    serving = Engine(
        EngineId("zzz-serving"),
        "demo",
        NodeId("b"),
        "interactive",
        "ready",
        url="http://127.0.0.1:1",
    )
    registry.upsert_engine(serving)
    time.sleep(0.01)
    returning = Engine(
        EngineId("aaa-returning"),
        "demo",
        NodeId("a"),
        "interactive",
        "ready",
        url="http://127.0.0.1:2",
    )
    registry.connect(NodeId("a"), FACTS, [returning])  # its Hello lists the old engine
    reconciler.step()
    assert registry.engines[EngineId("zzz-serving")].state == "ready"
    assert registry.engines[EngineId("aaa-returning")].state == "stopping"
    assert registry.nodes[NodeId("a")].outbox.get_nowait() == UnloadCommand(
        EngineId("aaa-returning")
    )
    assert routing.models() == ["demo"]


def test_silent_nodes_turn_suspect_then_dead(tmp_path: Path) -> None:
    registry, routing, reconciler = fleet(tmp_path)
    registry.connect(NodeId("a"), FACTS, [])
    registry.heartbeat(NodeId("a"), STATUS, {})
    registry.upsert_engine(
        Engine(EngineId("e"), "demo", NodeId("a"), "interactive", "ready", url="http://127.0.0.1:1")
    )
    assert routing.models() == ["demo"]
    node = registry.nodes[NodeId("a")]
    node.last_heartbeat -= 4.0  # 4 s without a heartbeat
    reconciler.step()
    assert node.liveness == "suspect" and routing.models() == []
    registry.heartbeat(NodeId("a"), STATUS, {})  # heard again: routed again
    assert node.liveness == "live" and routing.models() == ["demo"]
    node.last_heartbeat -= 11.0
    reconciler.step()
    assert NodeId("a") not in registry.nodes and routing.models() == []


def test_a_tripped_node_leaves_the_router_at_once_when_another_replica_serves(
    tmp_path: Path,
) -> None:
    registry, routing, reconciler = fleet(tmp_path)
    spec = ModelSpec("demo", str(tmp_path), replicas=2)
    reconciler = Reconciler(
        Config(home=tmp_path, models=(spec,)), registry, Store(tmp_path / "t.sqlite3")
    )
    for node in ("a", "b"):
        registry.connect(NodeId(node), FACTS, [])
        registry.heartbeat(NodeId(node), STATUS, {})
        registry.upsert_engine(
            Engine(
                EngineId(f"e-{node}"),
                "demo",
                NodeId(node),
                "interactive",
                "ready",
                url=f"http://127.0.0.1:{ord(node)}",
            )
        )
    reconciler.step()
    assert routing.units() == {("demo", "interactive")}
    registry.heartbeat(NodeId("a"), replace(STATUS, memory_pressure="critical"), {})
    reconciler.observe_reading(NodeId("a"))
    reconciler.step()
    # Unrouted now, before its replacement is even placed: only b takes new requests.
    targets = {t.engine_id for t in routing._targets.values()}
    assert targets == {"e-b"}
    assert registry.engines[EngineId("e-a")].state == "ready"  # still finishing its requests


def test_new_replicas_come_from_one_policy_plan_over_every_unit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The planner benchmarks/fleet_sim.py measures is the one that places: each step hands
    policy.plan() every unit still missing replicas, with the nodes already hosting them."""
    source = model_folder(tmp_path, "m", GIB)
    fleet = Fleet(tmp_path, ModelSpec("two", source, replicas=2), ModelSpec("one", source, "batch"))
    calls: list[tuple[list[Demand], list[str]]] = []

    def spy(demands: Sequence[Demand], offers: Sequence[Offer]) -> dict:
        calls.append((list(demands), [o.node_id for o in offers]))
        return policy.plan(demands, offers)

    monkeypatch.setattr(reconcile, "plan", spy)
    fleet.join("a", facts(64))
    fleet.reconciler.step()
    [(demands, offers)] = calls
    assert offers == ["a"]
    assert sorted((d.key, d.replicas, d.hosted_on) for d in demands) == [
        (("one", "batch"), 1, frozenset()),
        (("two", "interactive"), 2, frozenset()),
    ]
    loads = fleet.loads()["a"]
    assert sorted(c.model for c in loads) == ["one", "two"]
    assert fleet.reconciler.pending[("two", "interactive")].startswith("1 of 2 replicas")
    fleet.join("b", facts(64))
    fleet.reconciler.step()
    demands, offers = calls[-1]
    assert offers == ["a", "b"]
    [two] = demands  # "one" has its replica; "two" has one on a and lacks one
    assert (two.key, two.hosted_on) == (("two", "interactive"), frozenset({"a"}))
    assert [c.model for c in fleet.loads()["b"]] == ["two"]
    assert fleet.reconciler.pending == {}


async def test_on_the_loop_a_unit_waits_for_its_files_then_places(tmp_path: Path) -> None:
    """The step never reads model files on the loop: a first step starts the read and the
    unit is pending 'sizing'; when the read is done the registry wakes the loop."""
    source = model_folder(tmp_path, "m", GIB)
    fleet = Fleet(tmp_path, ModelSpec("m", source))
    fleet.join("a", facts(64))
    fleet.registry.changed.clear()
    fleet.reconciler.step()
    assert fleet.reconciler.pending == {("m", "interactive"): SIZING_PENDING}
    assert fleet.reconciler.size(fleet.config.models[0]) is None
    assert fleet.loads()["a"] == []
    await asyncio.wait_for(fleet.registry.changed.wait(), 5)  # the read is done
    await fleet.reconciler.sized()
    fleet.reconciler.step()
    assert [c.model for c in fleet.loads()["a"]] == ["m"]
    assert fleet.reconciler.pending == {}
    assert isinstance(fleet.reconciler.size(fleet.config.models[0]), int)

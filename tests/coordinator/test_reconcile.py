"""The reconcile loop's decisions, driven step by step on the real registry and router."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from coordinator.config import Config, ModelSpec
from coordinator.pki import FleetPki
from coordinator.reconcile import Reconciler
from coordinator.registry import Engine, EngineId, NodeId, NodeStatus, Registry, UnloadCommand
from coordinator.routing import Routing
from coordinator.store import Store
from mlxfleet.facts import NodeFacts

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

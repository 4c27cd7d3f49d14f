"""Enrollment and the control stream over real gRPC on 127.0.0.1 (in-process server)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from coordinator.grpc_service import FleetService
from coordinator.reconcile import Reconciler
from coordinator.registry import Engine, EngineId, NodeId, Registry
from coordinator.routing import Routing
from coordinator.store import Store
from mlxfleet.v1 import fleet_pb2 as pb
from mlxfleet.v1 import fleet_pb2_grpc

TOKEN = "join-me-0123456789"


@dataclass
class Coord:
    target: str
    store: Store
    registry: Registry
    routing: Routing
    reconciler: Reconciler


@pytest.fixture
async def coord(tmp_path: Path) -> AsyncIterator[Coord]:
    store = Store(tmp_path / "s.sqlite3")
    routing = Routing()
    registry = Registry(routing)
    reconciler = Reconciler((), registry, store)
    server = grpc.aio.server()
    fleet_pb2_grpc.add_FleetServicer_to_server(
        FleetService(TOKEN, store, registry, reconciler), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield Coord(f"127.0.0.1:{port}", store, registry, routing, reconciler)
    await server.stop(0)
    store.close()


FACTS = pb.NodeFacts(
    hostname="Mini One", chip="Apple M2 Pro", ram_bytes=32 * 2**30, role=pb.ROLE_SERVER
)


async def enroll(target: str, token: str) -> pb.EnrollResponse:
    async with grpc.aio.insecure_channel(target) as channel:
        return await fleet_pb2_grpc.FleetStub(channel).Enroll(
            pb.EnrollRequest(token=token, facts=FACTS), timeout=5
        )


async def test_wrong_token_is_refused(coord: Coord) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await enroll(coord.target, "not-the-token")
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert coord.store.events() == []


async def test_enroll_stores_only_the_key_hash(coord: Coord) -> None:
    reply = await enroll(coord.target, TOKEN)
    assert reply.node_id.startswith("mini-one-")
    assert len(reply.node_key) >= 40
    assert coord.store.node_key_matches(reply.node_id, reply.node_key)
    [event] = coord.store.events()
    assert event.kind == "node_enrolled" and "Apple M2 Pro" in event.detail


async def test_stream_refused_without_a_valid_node_key(coord: Coord) -> None:
    reply = await enroll(coord.target, TOKEN)
    async with grpc.aio.insecure_channel(coord.target) as channel:
        call = fleet_pb2_grpc.FleetStub(channel).Connect(
            iter([pb.AgentMessage(hello=pb.Hello(facts=FACTS))]),
            metadata=(("x-mlxfleet-node-id", reply.node_id), ("x-mlxfleet-node-key", "forged")),
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in call:
                pass
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert coord.registry.nodes == {}


async def test_stream_carries_status_and_engine_events(coord: Coord) -> None:
    reply = await enroll(coord.target, TOKEN)
    node_id = NodeId(reply.node_id)
    outbound: asyncio.Queue[pb.AgentMessage | None] = asyncio.Queue()

    async def requests() -> AsyncIterator[pb.AgentMessage]:
        yield pb.AgentMessage(hello=pb.Hello(facts=FACTS))
        while (message := await outbound.get()) is not None:
            yield message

    async def until(check, what: str) -> None:
        for _ in range(200):
            if check():
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"timed out waiting for {what}")

    async with grpc.aio.insecure_channel(coord.target) as channel:
        call = fleet_pb2_grpc.FleetStub(channel).Connect(
            requests(),
            metadata=(("x-mlxfleet-node-id", node_id), ("x-mlxfleet-node-key", reply.node_key)),
        )
        await until(lambda: node_id in coord.registry.nodes, "the node to connect")
        assert coord.registry.nodes[node_id].facts.chip == "Apple M2 Pro"
        assert coord.registry.nodes[node_id].facts.role == "server"

        outbound.put_nowait(
            pb.AgentMessage(
                status=pb.NodeStatus(
                    seq=1,
                    available_bytes=20 * 2**30,
                    swap_used_bytes=2**20,
                    memory_pressure=pb.MEMORY_PRESSURE_WARNING,
                    thermal_state=pb.THERMAL_STATE_FAIR,
                    power_source=pb.POWER_SOURCE_AC,
                )
            )
        )
        await until(lambda: coord.registry.nodes[node_id].status is not None, "a status")
        status = coord.registry.nodes[node_id].status
        assert status is not None
        assert (status.available_bytes, status.memory_pressure, status.thermal_state) == (
            20 * 2**30,
            "warning",
            "fair",
        )

        # The coordinator placed an engine; the agent reports it ready, then killed.
        engine_id = EngineId("demo-1")
        coord.registry.upsert_engine(Engine(engine_id, "demo", node_id, "interactive", "starting"))
        info = pb.EngineInfo(
            engine_id=engine_id,
            model="demo",
            tier=pb.TIER_INTERACTIVE,
            state=pb.ENGINE_STATE_READY,
            url="http://127.0.0.1:9",
            secret="s",
        )
        outbound.put_nowait(
            pb.AgentMessage(event=pb.EngineEvent(kind=pb.EngineEvent.KIND_READY, engine=info))
        )
        await until(lambda: coord.routing.models() == ["demo"], "the engine to be routed")
        target = await coord.routing.pick("demo")
        assert target is not None and (target.url, target.secret) == ("http://127.0.0.1:9", "s")

        outbound.put_nowait(
            pb.AgentMessage(
                event=pb.EngineEvent(
                    kind=pb.EngineEvent.KIND_EXITED,
                    engine=info,
                    exit_reason=pb.EXIT_REASON_SIGKILL,
                    signal=9,
                )
            )
        )
        await until(lambda: coord.routing.models() == [], "the engine to leave the router")
        assert engine_id not in coord.registry.engines
        assert await coord.routing.pick("demo") is None
        assert coord.store.events()[0].kind == "engine_exited"
        assert "sigkill" in coord.store.events()[0].detail

        outbound.put_nowait(None)  # the agent closes its side
        async for _ in call:
            pass
    await until(lambda: node_id not in coord.registry.nodes, "the node to disconnect")

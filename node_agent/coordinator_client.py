"""The agent's side of the gRPC contract. The only node_agent module that imports *_pb2."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from importlib import metadata

import grpc

from mlxfleet.v1 import fleet_pb2 as pb
from mlxfleet.v1 import fleet_pb2_grpc
from node_agent.probes.base import NodeFacts, NodeReading
from node_agent.supervisor import EngineEvent, EngineInfo, EngineState, LoadRequest

logger = logging.getLogger(__name__)

HEARTBEAT_INTERVAL_S = 1.0  # the one heartbeat constant; the coordinator's timeouts build on it
ENROLL_TIMEOUT_S = 10.0


class EnrollRefused(Exception):
    """The coordinator refused our token or node key."""


@dataclass(frozen=True, slots=True)
class Identity:
    node_id: str
    node_key: str


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return ""


def facts_to_pb(f: NodeFacts) -> pb.NodeFacts:
    return pb.NodeFacts(
        hostname=f.hostname,
        chip=f.chip,
        os=f.os,
        ram_bytes=f.ram_bytes,
        performance_cores=f.performance_cores,
        gpu_cores=f.gpu_cores,
        memory_bandwidth_gbps=f.memory_bandwidth_gbps,
        gpu_wired_limit_bytes=f.gpu_wired_limit_bytes,
        mlx_version=_version("mlx"),
        mlx_lm_version=_version("mlx-lm"),
        agent_version=_version("mlxfleet"),
        role=pb.Role.Value(f"ROLE_{f.role.upper()}"),
    )


def _enum(enum: type, prefix: str, name: str) -> int:
    try:
        return int(enum.Value(f"{prefix}{name.upper()}"))  # type: ignore[attr-defined]
    except ValueError:
        return 0  # UNSPECIFIED: "unknown" has no member of its own


def engine_to_pb(e: EngineInfo, with_secret: bool) -> pb.EngineInfo:
    return pb.EngineInfo(
        engine_id=e.engine_id,
        model=e.model,
        tier=_enum(pb.Tier, "TIER_", e.tier),
        state=_enum(pb.EngineState, "ENGINE_STATE_", e.state),
        url=e.url,
        secret=e.secret if with_secret else "",
        context_length=e.context_length,
    )


def status_to_pb(
    seq: int, r: NodeReading, engines: dict[str, tuple[EngineState, int, int]]
) -> pb.NodeStatus:
    return pb.NodeStatus(
        seq=seq,
        unix_time=time.time(),
        available_bytes=r.available_bytes,
        swap_used_bytes=r.swap_used_bytes,
        memory_pressure=_enum(pb.MemoryPressure, "MEMORY_PRESSURE_", r.memory_pressure),
        thermal_state=_enum(pb.ThermalState, "THERMAL_STATE_", r.thermal_state),
        power_source=_enum(pb.PowerSource, "POWER_SOURCE_", r.power_source),
        low_power_mode=r.low_power_mode,
        engines=[
            pb.EngineStatus(
                engine_id=eid,
                state=_enum(pb.EngineState, "ENGINE_STATE_", state),
                rss_bytes=rss,
                pid=pid,
            )
            for eid, (state, rss, pid) in engines.items()
        ],
    )


def event_to_pb(e: EngineEvent) -> pb.AgentMessage:
    return pb.AgentMessage(
        event=pb.EngineEvent(
            kind=_enum(pb.EngineEvent.Kind, "KIND_", e.kind),
            engine=engine_to_pb(e.engine, with_secret=e.kind == "ready"),
            exit_reason=_enum(pb.ExitReason, "EXIT_REASON_", e.exit_reason or ""),
            exit_code=e.exit_code,
            signal=e.signal,
            detail=e.detail,
        )
    )


async def enroll(target: str, token: str, node_id: str, facts: NodeFacts) -> Identity:
    """Exchange the join token for a node id and key."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = fleet_pb2_grpc.FleetStub(channel)
        try:
            reply = await stub.Enroll(
                pb.EnrollRequest(token=token, node_id=node_id, facts=facts_to_pb(facts)),
                timeout=ENROLL_TIMEOUT_S,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INVALID_ARGUMENT):
                raise EnrollRefused(exc.details() or str(exc.code())) from None
            raise
    return Identity(reply.node_id, reply.node_key)


class Session:
    """One connection's control stream: Hello, heartbeats and events up, commands down.

    `outbound` carries engine events; the session owns its heartbeat task.
    """

    def __init__(
        self,
        target: str,
        identity: Identity,
        facts: NodeFacts,
        read: Callable[[], NodeReading],
        engines: Callable[[], list[EngineInfo]],
        engine_rss: Callable[[], dict[str, tuple[EngineState, int, int]]],
    ) -> None:
        self._target = target
        self._identity = identity
        self._facts = facts
        self._read = read
        self._engines = engines
        self._engine_rss = engine_rss
        self.outbound: asyncio.Queue[pb.AgentMessage] = asyncio.Queue()
        self.connected = asyncio.Event()
        self.was_connected = False  # the agent resets its reconnect backoff after a real session

    def send_event(self, event: EngineEvent) -> None:
        self.outbound.put_nowait(event_to_pb(event))

    async def _requests(self) -> AsyncIterator[pb.AgentMessage]:
        hello = pb.Hello(
            facts=facts_to_pb(self._facts),
            engines=[engine_to_pb(e, with_secret=True) for e in self._engines()],
        )
        yield pb.AgentMessage(hello=hello)
        while True:
            yield await self.outbound.get()

    async def _heartbeats(self) -> None:
        seq = 0
        while True:
            reading = await asyncio.to_thread(self._read)
            seq += 1
            status = status_to_pb(seq, reading, self._engine_rss())
            self.outbound.put_nowait(pb.AgentMessage(status=status))
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)

    async def run(self, on_command: Callable[[pb.CoordinatorMessage], None]) -> None:
        """Hold the stream until it ends; raises grpc.aio.AioRpcError when it breaks."""
        metadata_ = (
            ("x-mlxfleet-node-id", self._identity.node_id),
            ("x-mlxfleet-node-key", self._identity.node_key),
        )
        async with grpc.aio.insecure_channel(self._target) as channel:
            stub = fleet_pb2_grpc.FleetStub(channel)
            call = stub.Connect(self._requests(), metadata=metadata_)
            heartbeat = asyncio.create_task(self._heartbeats(), name="heartbeat")
            try:
                await call.wait_for_connection()
                self.connected.set()
                self.was_connected = True
                logger.info(
                    "connected to coordinator %s as %s", self._target, self._identity.node_id
                )
                async for command in call:
                    on_command(command)
            finally:
                self.connected.clear()
                heartbeat.cancel()
                call.cancel()


def load_request(message: pb.LoadModel) -> LoadRequest:
    tier = pb.Tier.Name(message.tier).removeprefix("TIER_").lower()
    return LoadRequest(
        message.engine_id, message.model, message.source, tier, message.context_length
    )

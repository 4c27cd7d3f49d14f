"""The agent's side of the gRPC contract. The only node_agent module that imports *_pb2."""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field, replace

import grpc

from mlxfleet.engines import EngineState
from mlxfleet.facts import NodeFacts
from mlxfleet.join import COORDINATOR_TLS_NAME, JoinToken, new_key_pem
from mlxfleet.kv import DEFAULT_KV_GROUP_SIZE, DEFAULT_PREFIX_CACHE_MIB, UNQUANTIZED_KV_BITS
from mlxfleet.manifest import Manifest, ManifestError
from mlxfleet.v1 import fleet_pb2 as pb
from mlxfleet.v1 import fleet_pb2_grpc
from mlxfleet.version import package_version
from mlxfleet.wire import enum_value, facts_to_pb
from node_agent.engine_info import EngineEvent, EngineInfo, LoadRequest
from node_agent.errors import CoordinatorUnreachable, EnrollRefused
from node_agent.groups import GroupRole
from node_agent.identity import NodeIdentity, make_csr
from node_agent.model_store import ModelStore
from node_agent.peer_copy import Holder
from node_agent.probes.base import NodeReading
from node_agent.rank_link import Member

logger = logging.getLogger(__name__)

HEARTBEAT_INTERVAL_S = 1.0  # the one heartbeat constant; the coordinator's timeouts build on it
ENROLL_TIMEOUT_S = 10.0


# Whatever address the agent dials, the coordinator's certificate names itself this way.
TLS_NAME_OPTION = (("grpc.ssl_target_name_override", COORDINATOR_TLS_NAME),)


@dataclass(frozen=True, slots=True)
class NodeProfile:
    """What the agent's own config adds to the probed facts."""

    labels: Mapping[str, str] = field(default_factory=dict)
    serve_interactive: bool = False  # a laptop opts in to interactive replicas
    os_reserve_bytes: int = 0  # 0: the fleet's default reserve


def facts_message(facts: NodeFacts, profile: NodeProfile | None = None) -> pb.NodeFacts:
    """The probed facts, plus the agent's config and the versions it runs."""
    profile = profile or NodeProfile()
    return facts_to_pb(
        replace(
            facts,
            labels=dict(profile.labels),
            serve_interactive=profile.serve_interactive,
            os_reserve_bytes=profile.os_reserve_bytes,
            mlx_version=package_version("mlx"),
            mlx_lm_version=package_version("mlx-lm"),
            agent_version=package_version("mlxfleet"),
        )
    )


def engine_to_pb(e: EngineInfo, with_secret: bool) -> pb.EngineInfo:
    return pb.EngineInfo(
        engine_id=e.engine_id,
        model=e.model,
        tier=enum_value(pb.Tier, "TIER_", e.tier),
        state=enum_value(pb.EngineState, "ENGINE_STATE_", e.state),
        url=e.url,
        secret=e.secret if with_secret else "",
        context_length=e.context_length,
        group_id=e.group_id,
        rank=e.rank,
        group_split=e.group_split,
        group_nodes=e.group_nodes,
    )


def status_to_pb(
    seq: int,
    r: NodeReading,
    engines: dict[str, tuple[EngineState, int, int]],
    store: ModelStore | None = None,
) -> pb.NodeStatus:
    status = pb.NodeStatus(
        seq=seq,
        unix_time=time.time(),
        available_bytes=r.available_bytes,
        swap_used_bytes=r.swap_used_bytes,
        memory_pressure=enum_value(pb.MemoryPressure, "MEMORY_PRESSURE_", r.memory_pressure),
        thermal_state=enum_value(pb.ThermalState, "THERMAL_STATE_", r.thermal_state),
        power_source=enum_value(pb.PowerSource, "POWER_SOURCE_", r.power_source),
        low_power_mode=r.low_power_mode,
        engines=[
            pb.EngineStatus(
                engine_id=eid,
                state=enum_value(pb.EngineState, "ENGINE_STATE_", state),
                rss_bytes=rss,
                pid=pid,
            )
            for eid, (state, rss, pid) in engines.items()
        ],
    )
    if store is not None:
        add_files(status, store)
    return status


def add_files(status: pb.NodeStatus, store: ModelStore) -> None:
    """The heartbeat's model files: disk room, what the node holds, copies under way."""
    status.disk_room_bytes = store.disk_room()
    status.held_models.extend(
        pb.HeldModel(
            source=h.source,
            manifest_sha256=h.digest,
            bytes=h.bytes,
            in_use=h.in_use,
            evictable=h.evictable,
        )
        for h in store.held()
    )
    status.copies.extend(
        pb.ModelCopy(
            source=c.source,
            bytes_done=c.bytes_done,
            bytes_total=c.bytes_total,
            bytes_per_s=c.bytes_per_s,
            origin=c.origin,
            from_nodes=c.from_nodes,
        )
        for c in store.copies()
    )


def event_to_pb(e: EngineEvent) -> pb.AgentMessage:
    return pb.AgentMessage(
        event=pb.EngineEvent(
            kind=enum_value(pb.EngineEvent.Kind, "KIND_", e.kind),
            engine=engine_to_pb(e.engine, with_secret=e.kind == "ready"),
            exit_reason=enum_value(pb.ExitReason, "EXIT_REASON_", e.exit_reason or ""),
            exit_code=e.exit_code,
            signal=e.signal,
            detail=e.detail,
        )
    )


def fetch_certificate(host: str, port: int) -> bytes:
    """The certificate a TLS server presents, unverified: the caller pins it by fingerprint."""
    return ssl.get_server_certificate((host, port), timeout=ENROLL_TIMEOUT_S).encode()


async def enroll(
    host: str,
    enroll_port: int,
    token: JoinToken,
    previous_id: str,
    facts: NodeFacts,
    profile: NodeProfile | None = None,
) -> NodeIdentity:
    """Enroll: pin the coordinator by the token's fingerprint, send a CSR, get a certificate."""
    try:
        coordinator_cert = await asyncio.to_thread(fetch_certificate, host, enroll_port)
    except (OSError, ssl.SSLError) as exc:
        raise CoordinatorUnreachable(f"cannot reach {host}:{enroll_port}: {exc}") from None
    if not token.pins(coordinator_cert):
        raise EnrollRefused(
            f"the coordinator at {host}:{enroll_port} did not make this join token "
            "(its certificate fingerprint differs): wrong address, or someone in between"
        )
    key_pem = new_key_pem()
    credentials = grpc.ssl_channel_credentials(root_certificates=coordinator_cert)
    async with grpc.aio.secure_channel(
        f"{host}:{enroll_port}", credentials, options=TLS_NAME_OPTION
    ) as channel:
        stub = fleet_pb2_grpc.FleetStub(channel)
        request = pb.EnrollRequest(
            token=token.secret,
            node_id=previous_id,
            facts=facts_message(facts, profile),
            csr_pem=make_csr(key_pem),
        )
        try:
            reply = await stub.Enroll(request, timeout=ENROLL_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INVALID_ARGUMENT):
                raise EnrollRefused(exc.details() or str(exc.code())) from None
            raise CoordinatorUnreachable(exc.details() or str(exc.code())) from None
    return NodeIdentity(
        node_id=reply.node_id,
        key_pem=key_pem,
        cert_pem=reply.certificate_pem,
        coordinator_cert_pem=coordinator_cert,
        fleet_ca_pem=reply.fleet_ca_pem,
    )


class Session:
    """One connection's control stream: Hello, heartbeats and events up, commands down.

    `outbound` carries engine events; the session owns its heartbeat task.
    """

    def __init__(
        self,
        target: str,
        identity: NodeIdentity,
        facts: NodeFacts,
        read: Callable[[], NodeReading],
        engines: Callable[[], list[EngineInfo]],
        engine_rss: Callable[[], dict[str, tuple[EngineState, int, int]]],
        on_reading: Callable[[NodeReading], None] | None = None,
        profile: NodeProfile | None = None,
        metrics_port: int = 0,  # where this agent serves /metrics; 0: it does not
        store: ModelStore | None = None,  # the node's model files, reported each heartbeat
        files_url: str = "",  # where this node serves model files; "": it does not
        link_address: str = "",  # where it relays groups' rank traffic; "": it does not
    ) -> None:
        self._link_address = link_address
        self._profile = profile
        self._metrics_port = metrics_port
        self._store = store
        self._files_url = files_url
        self._manifests_sent: set[str] = set()  # digests sent on this connection
        self._on_reading = on_reading
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
            facts=facts_message(self._facts, self._profile),
            engines=[engine_to_pb(e, with_secret=True) for e in self._engines()],
            metrics_port=self._metrics_port,
            files_url=self._files_url,
            link_address=self._link_address,
        )
        yield pb.AgentMessage(hello=hello)
        while True:
            yield await self.outbound.get()

    async def _heartbeats(self) -> None:
        seq = 0
        while True:
            reading = await asyncio.to_thread(self._read)
            if self._on_reading is not None:
                self._on_reading(reading)
            seq += 1
            self._send_manifests()
            status = status_to_pb(seq, reading, self._engine_rss(), self._store)
            self.outbound.put_nowait(pb.AgentMessage(status=status))
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)

    def _send_manifests(self) -> None:
        """The manifest of each model the node holds, once per connection: the coordinator
        keeps the first of each source, and copies from this node are verified against it.
        Sent before the heartbeat that lists the holding."""
        for manifest in self._store.manifests() if self._store is not None else []:
            if manifest.digest not in self._manifests_sent:
                self._manifests_sent.add(manifest.digest)
                self.outbound.put_nowait(pb.AgentMessage(manifest=manifest.to_pb()))

    async def run(self, on_command: Callable[[pb.CoordinatorMessage], None]) -> None:
        """Hold the stream until it ends; raises grpc.aio.AioRpcError when it breaks."""
        credentials = grpc.ssl_channel_credentials(
            root_certificates=self._identity.coordinator_cert_pem,  # pinned at enrollment
            private_key=self._identity.key_pem,
            certificate_chain=self._identity.cert_pem,
        )
        async with grpc.aio.secure_channel(
            self._target, credentials, options=TLS_NAME_OPTION
        ) as channel:
            stub = fleet_pb2_grpc.FleetStub(channel)
            call = stub.Connect(self._requests())
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


def knobs_from_pb(knobs: pb.TierKnobs) -> dict[str, int]:
    """The knobs the coordinator set, all four; none (the engine's tier defaults) when it sent
    none. A batch window of 0 is a real value, so "unset" is max_concurrency 0."""
    if knobs.max_concurrency == 0:
        return {}
    names = ("max_concurrency", "batch_window_ms", "max_batch_size", "queue_limit")
    return {name: getattr(knobs, name) for name in names}


def manifest_from_pb(message: pb.LoadModel) -> Manifest | None:
    """The fleet's manifest of the model, if any; None (and a warning) for one that cannot be
    trusted: the files are then fetched without it, never copied from peers."""
    try:
        return Manifest.from_pb(message.manifest)
    except ManifestError as exc:
        logger.warning("ignoring the manifest of %s: %s", message.source, exc)
        return None


def load_request(message: pb.LoadModel) -> LoadRequest:
    tier = pb.Tier.Name(message.tier).removeprefix("TIER_").lower()
    return LoadRequest(
        message.engine_id,
        message.model,
        message.source,
        tier,
        message.context_length,
        knobs_from_pb(message.knobs),
        kv_bits=message.kv_bits or UNQUANTIZED_KV_BITS,
        kv_group_size=message.kv_group_size or DEFAULT_KV_GROUP_SIZE,
        # 0 is a real value (no prefix cache), so "unset" is the field's absence.
        prefix_cache_mib=message.prefix_cache_mib
        if message.HasField("prefix_cache_mib")
        else DEFAULT_PREFIX_CACHE_MIB,
        manifest=manifest_from_pb(message),
        holders=tuple(Holder(h.node_id, h.url) for h in message.holders),
        group=group_role(message.group) if message.HasField("group") else None,
    )


def group_role(message: pb.EngineGroup) -> GroupRole:
    members = sorted(message.members, key=lambda m: m.rank)
    return GroupRole(
        message.group_id,
        message.rank,
        tuple(Member(m.rank, m.node_id, m.link_address) for m in members),
        tuple(m.layers for m in members),
        message.stall_s,
    )

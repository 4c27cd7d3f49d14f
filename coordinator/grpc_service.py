"""The agent-facing gRPC service. The only coordinator module that imports *_pb2."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator

import grpc

from coordinator.errors import EnrollmentError, StreamRefused
from coordinator.holdings import FileCopy, HeldFiles
from coordinator.pki import FleetPki
from coordinator.reconcile import Reconciler, unit_of
from coordinator.registry import (
    Command,
    Engine,
    EngineId,
    GroupCommand,
    LoadCommand,
    NodeId,
    NodeStatus,
    Registry,
    SetKnobsCommand,
    UnloadCommand,
)
from coordinator.store import Store
from mlxfleet.engines import EXIT_CANNOT_SPLIT
from mlxfleet.facts import NodeFacts
from mlxfleet.manifest import Manifest, ManifestError
from mlxfleet.tiers import Knobs
from mlxfleet.v1 import fleet_pb2 as pb
from mlxfleet.v1 import fleet_pb2_grpc
from mlxfleet.wire import enum_name, facts_from_pb

logger = logging.getLogger(__name__)

HELLO_TIMEOUT_S = 10.0  # a stream must say Hello this soon after opening
# Heartbeats come at 1 Hz and events are rare: a stream sending more than this in a second is
# cut (a runaway or hostile agent must not starve the other nodes' streams).
MAX_MESSAGES_PER_S = 50
MAX_MESSAGE_BYTES = 1 * 1024 * 1024  # larger agent messages are refused by gRPC itself
NODE_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


def status_from_pb(s: pb.NodeStatus) -> NodeStatus:
    return NodeStatus(
        available_bytes=s.available_bytes,
        swap_used_bytes=s.swap_used_bytes,
        memory_pressure=enum_name(pb.MemoryPressure, s.memory_pressure, "MEMORY_PRESSURE_"),
        thermal_state=enum_name(pb.ThermalState, s.thermal_state, "THERMAL_STATE_"),
        power_source=enum_name(pb.PowerSource, s.power_source, "POWER_SOURCE_"),
        low_power_mode=s.low_power_mode,
        disk_room_bytes=s.disk_room_bytes if s.HasField("disk_room_bytes") else None,
        held=tuple(
            HeldFiles(h.source, h.manifest_sha256, h.bytes, h.in_use, h.evictable)
            for h in s.held_models
        ),
        copies=tuple(
            FileCopy(
                c.source, c.bytes_done, c.bytes_total, c.bytes_per_s, c.origin, tuple(c.from_nodes)
            )
            for c in s.copies
        ),
    )


def engine_from_pb(node_id: NodeId, e: pb.EngineInfo) -> Engine:
    state = enum_name(pb.EngineState, e.state, "ENGINE_STATE_")
    return Engine(
        engine_id=EngineId(e.engine_id),
        model=e.model,
        node_id=node_id,
        tier=enum_name(pb.Tier, e.tier, "TIER_"),
        state=state if state in ("starting", "ready", "stopping") else "exited",  # type: ignore[arg-type]
        url=e.url,
        secret=e.secret,
        context_length=e.context_length,
        group_id=e.group_id,
        rank=e.rank,
        group_split=tuple(e.group_split),
        group_nodes=tuple(e.group_nodes),
    )


def knobs_to_pb(knobs: Knobs) -> pb.TierKnobs:
    return pb.TierKnobs(
        max_concurrency=knobs.max_concurrency,
        batch_window_ms=knobs.batch_window_ms,
        max_batch_size=knobs.max_batch_size,
        queue_limit=knobs.queue_limit,
    )


def command_to_pb(command: Command) -> pb.CoordinatorMessage:
    if isinstance(command, LoadCommand):
        return pb.CoordinatorMessage(
            load=pb.LoadModel(
                engine_id=command.engine_id,
                model=command.model,
                source=command.source,
                tier=pb.Tier.Value(f"TIER_{command.tier.upper()}"),
                context_length=command.context_length,
                knobs=knobs_to_pb(command.knobs),
                kv_bits=command.kv_bits,
                kv_group_size=command.kv_group_size,
                prefix_cache_mib=command.prefix_cache_mib,
                manifest=command.manifest.to_pb() if command.manifest else None,
                holders=[pb.FileHolder(node_id=n, url=u) for n, u in command.holders],
                group=group_to_pb(command.group) if command.group else None,
            )
        )
    if isinstance(command, SetKnobsCommand):
        return pb.CoordinatorMessage(
            set_knobs=pb.SetKnobs(engine_id=command.engine_id, knobs=knobs_to_pb(command.knobs))
        )
    return pb.CoordinatorMessage(unload=pb.UnloadModel(engine_id=command.engine_id))


def group_to_pb(group: GroupCommand) -> pb.EngineGroup:
    return pb.EngineGroup(
        group_id=group.group_id,
        rank=group.rank,
        members=[
            pb.GroupMember(
                rank=m.rank,
                node_id=m.node_id,
                link_address=m.link_address,
                first_layer=m.first_layer,
                layers=m.layers,
            )
            for m in group.members
        ],
        stall_s=group.stall_s,
    )


class FleetService(fleet_pb2_grpc.FleetServicer):
    """Enrollment and the per-node control stream."""

    def __init__(
        self, pki: FleetPki, store: Store, registry: Registry, reconciler: Reconciler
    ) -> None:
        self._pki = pki
        self._store = store
        self._registry = registry
        self._reconciler = reconciler

    async def Enroll(self, request: pb.EnrollRequest, context: grpc.aio.ServicerContext):
        refusal = self._store.consume_join_token(request.token)
        if refusal is not None:
            logger.warning("refused enrollment from %s: %s", context.peer(), refusal)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, refusal)
        node_id = request.node_id
        # A node may keep its old id only if nobody holds it: a token is not a licence to
        # take over another node's identity.
        if not node_id or not NODE_ID_RE.match(node_id) or self._store.node_known(node_id):
            node_id = f"{_slug(request.facts.hostname)}-{secrets.token_hex(3)}"
        try:
            certificate = self._pki.issue_node_certificate(node_id, request.csr_pem)
        except EnrollmentError as exc:
            logger.warning("refused enrollment from %s: %s", context.peer(), exc)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        facts = facts_from_pb(request.facts)
        self._store.save_node(node_id, facts.hostname, _facts_dict(facts))
        self._store.add_event(node_id, "node_enrolled", f"{facts.hostname} ({facts.chip})")
        logger.info("enrolled node %s (%s)", node_id, facts.hostname)
        return pb.EnrollResponse(
            node_id=node_id, certificate_pem=certificate, fleet_ca_pem=self._pki.ca_cert_pem
        )

    async def Connect(
        self, request_iterator: AsyncIterator[pb.AgentMessage], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.CoordinatorMessage]:
        # The TLS layer verified the client certificate against the fleet CA; its CN is the
        # node. No certificate (the enrollment port) or a revoked node: refused here.
        names = (context.auth_context() or {}).get("x509_common_name") or [b""]
        node_id = NodeId(names[0].decode())
        if not node_id or not self._store.node_is_active(node_id):
            reason = "no client certificate" if not node_id else f"node {node_id} is not enrolled"
            logger.warning("refused stream from %s: %s", context.peer(), reason)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)
        messages = aiter(request_iterator)
        try:
            first = await asyncio.wait_for(anext(messages), HELLO_TIMEOUT_S)
        except (TimeoutError, StopAsyncIteration):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "stream must open with hello")
        if first.WhichOneof("body") != "hello":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "stream must open with hello")
        hello = first.hello
        engines = [engine_from_pb(node_id, e) for e in hello.engines]
        node = self._registry.connect(node_id, facts_from_pb(hello.facts), engines)
        node.cordoned = self._store.node_cordoned(node_id)
        node.metrics_target = metrics_target(context.peer(), hello.metrics_port)
        node.files_url = hello.files_url
        node.link_address = hello.link_address
        self._store.touch_node(node_id)
        logger.info("node %s connected with %d running engine(s)", node_id, len(engines))
        reader = asyncio.create_task(self._read(node_id, messages))
        try:
            while True:
                get = asyncio.create_task(node.outbox.get())
                done, _ = await asyncio.wait({get, reader}, return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    get.cancel()
                    break
                command = get.result()
                if command is None:
                    break
                yield command_to_pb(command)
            error = reader.exception() if reader.done() and not reader.cancelled() else None
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            self._registry.disconnect(node_id, only=node)
        if isinstance(error, StreamRefused):
            logger.warning("cut node %s stream: %s", node_id, error)
            self._store.add_event(node_id, "stream_cut", str(error))
            # Ending the generator with a status (not abort()) reaches the client as sent,
            # even with its unread messages still in flight.
            context.set_code(error.code)
            context.set_details(str(error))
        elif error is not None:
            logger.warning("node %s stream broke: %s", node_id, error)

    async def _read(self, node_id: NodeId, messages: AsyncIterator[pb.AgentMessage]) -> None:
        window_start, count = time.monotonic(), 0
        async for message in messages:
            now = time.monotonic()
            if now - window_start >= 1.0:
                window_start, count = now, 0
            count += 1
            if count > MAX_MESSAGES_PER_S:
                raise StreamRefused(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"more than {MAX_MESSAGES_PER_S} messages in a second",
                )
            kind = message.WhichOneof("body")
            if kind == "status":
                rss = {e.engine_id: e.rss_bytes for e in message.status.engines}
                self._registry.heartbeat(node_id, status_from_pb(message.status), rss)
                self._reconciler.observe_reading(node_id)
            elif kind == "event":
                self._on_event(node_id, message.event)
            elif kind == "manifest":
                self._on_manifest(node_id, message.manifest)
            else:
                raise StreamRefused(
                    grpc.StatusCode.INVALID_ARGUMENT, f"unexpected {kind or 'empty'} message"
                )

    def _on_manifest(self, node_id: NodeId, message: pb.ModelManifest) -> None:
        """A node recorded a model's files. A manifest that cannot be trusted (a path outside
        the folder, a malformed hash) is refused with an event; the stream stays up."""
        try:
            manifest = Manifest.from_pb(message)
        except ManifestError as exc:
            detail = f"refused the manifest of {message.source[:200]!r}: {exc}"
            logger.warning("node %s: %s", node_id, detail)
            self._store.add_event(node_id, "manifest_refused", detail)
            return
        if manifest is not None:
            self._reconciler.holdings.note_manifest(node_id, manifest)

    def _on_event(self, node_id: NodeId, event: pb.EngineEvent) -> None:
        kind = enum_name(pb.EngineEvent.Kind, event.kind, "KIND_")
        engine = engine_from_pb(node_id, event.engine)
        if kind in ("started", "ready"):
            known = self._registry.engines.get(engine.engine_id)
            if known is None or known.node_id != node_id:
                # Not placed there, or forgotten (its node's stream broke while it loaded):
                # nothing would ever route to it or unload it, so it goes now.
                logger.info("node %s: unloading unknown engine %s", node_id, engine.engine_id)
                self._registry.send(node_id, UnloadCommand(engine.engine_id))
                return
            self._registry.upsert_engine(engine)
            if kind == "ready" and engine.serves:
                self._reconciler.engine_ready(unit_of(engine))
                self._store.add_event(node_id, "engine_ready", f"{engine.model} {engine.url}")
            return
        reason = enum_name(pb.ExitReason, event.exit_reason, "EXIT_REASON_")
        detail = f"{engine.model} engine {engine.engine_id}: {reason}"
        if event.detail:
            detail += f": {event.detail}"
        self._store.add_event(node_id, f"engine_{kind}", detail)
        self._reconciler.metrics.engine_exited(
            node_id, engine.model, engine.tier, "load_failed" if kind == "load_failed" else reason
        )
        logger.warning("node %s: %s", node_id, detail)
        self._registry.drop_engine(engine.engine_id)
        self._store.delete_placement(engine.engine_id)
        if reason == "oom":
            self._reconciler.observe_oom_kill(node_id)
        spec = self._reconciler.unit(engine.model, engine.tier)
        if engine.group_id and event.exit_code == EXIT_CANNOT_SPLIT and spec is not None:
            self._reconciler.cannot_split(spec, detail)
        if reason != "clean":
            self._reconciler.engine_failed(
                unit_of(engine), detail if kind == "load_failed" else None
            )


def metrics_target(peer: str, port: int) -> str:
    """Where Prometheus scrapes an agent: the address its stream came from, at the metrics
    port it reported ("" for none). gRPC peers read "ipv4:10.0.0.7:53122" or "ipv6:[::1]:53122"."""
    kind, _, address = peer.partition(":")
    if not port or kind not in ("ipv4", "ipv6"):
        return ""
    host = address.rpartition(":")[0]
    return f"{host}:{port}"


def _slug(hostname: str) -> str:
    slug = re.sub(r"[^a-z0-9-]+", "-", hostname.lower()).strip("-")[:40]
    return slug or "node"


def _facts_dict(facts: NodeFacts) -> dict[str, object]:
    return {name: getattr(facts, name) for name in facts.__slots__}  # type: ignore[attr-defined]

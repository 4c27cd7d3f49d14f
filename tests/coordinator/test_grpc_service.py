"""Enrollment and the control stream over real gRPC and real TLS on 127.0.0.1.

The server is the production one (`build_grpc_server`: mutual TLS on one port, enrollment on
the other) in this process; agents are the production client code (`enroll`, `Session`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import pytest

from coordinator.config import Config
from coordinator.grpc_service import MAX_MESSAGES_PER_S, FleetService
from coordinator.pki import FleetPki
from coordinator.reconcile import Reconciler
from coordinator.registry import Engine, EngineId, NodeId, Registry
from coordinator.routing import Routing
from coordinator.server import build_grpc_server
from coordinator.store import Store
from mlxfleet.facts import NodeFacts
from mlxfleet.join import FINGERPRINT_HEX_CHARS, JoinToken
from mlxfleet.v1 import fleet_pb2 as pb
from mlxfleet.v1 import fleet_pb2_grpc
from node_agent.coordinator_client import TLS_NAME_OPTION, enroll
from node_agent.errors import EnrollRefused
from node_agent.identity import NodeIdentity, certificate_cn

FACTS = NodeFacts(
    hostname="Mini One",
    chip="Apple M2 Pro",
    os="macOS 15.1",
    ram_bytes=32 * 2**30,
    performance_cores=8,
    gpu_cores=19,
    memory_bandwidth_gbps=200.0,
    gpu_wired_limit_bytes=24 * 2**30,
    role="server",
)


@dataclass
class Coord:
    grpc_port: int
    enroll_port: int
    pki: FleetPki
    store: Store
    registry: Registry
    routing: Routing

    def token(self, ttl_s: float = 3600, uses: int = 1) -> JoinToken:
        secret = self.store.create_join_token(ttl_s, uses)
        return JoinToken(self.pki.server_fingerprint[:FINGERPRINT_HEX_CHARS], secret)

    async def enroll(self, token: JoinToken) -> NodeIdentity:
        return await enroll("127.0.0.1", self.enroll_port, token, "", FACTS)

    def channel(self, identity: NodeIdentity | None, port: int | None = None) -> grpc.aio.Channel:
        """A channel pinned to the coordinator, presenting `identity`'s certificate if any."""
        credentials = grpc.ssl_channel_credentials(
            root_certificates=self.pki.server_cert_pem,
            private_key=identity.key_pem if identity else None,
            certificate_chain=identity.cert_pem if identity else None,
        )
        return grpc.aio.secure_channel(
            f"127.0.0.1:{port or self.grpc_port}", credentials, options=TLS_NAME_OPTION
        )


@pytest.fixture
async def coord(tmp_path: Path) -> AsyncIterator[Coord]:
    pki = FleetPki.load_or_create(tmp_path)
    store = Store(tmp_path / "s.sqlite3")
    routing = Routing(pki.ca_cert_pem)
    registry = Registry(routing)
    service = FleetService(pki, store, registry, Reconciler(Config(home=tmp_path), registry, store))
    server, grpc_port, enroll_port = build_grpc_server(service, pki, "127.0.0.1", 0, 0)
    await server.start()
    yield Coord(grpc_port, enroll_port, pki, store, registry, routing)
    await server.stop(0)
    store.close()


async def until(check: Callable[[], object], what: str, timeout_s: float = 5.0) -> None:
    for _ in range(int(timeout_s / 0.01)):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


async def test_enrollment_issues_a_certificate_named_by_the_node_id(coord: Coord) -> None:
    identity = await coord.enroll(coord.token())
    assert identity.node_id.startswith("mini-one-")
    assert certificate_cn(identity.cert_pem) == identity.node_id
    assert identity.coordinator_cert_pem == coord.pki.server_cert_pem
    assert identity.fleet_ca_pem == coord.pki.ca_cert_pem
    assert coord.store.node_is_active(identity.node_id)
    [event] = coord.store.events()
    assert event.kind == "node_enrolled" and "Apple M2 Pro" in event.detail


@pytest.mark.parametrize(
    ("make_token", "message"),
    [
        (lambda c: replace(c.token(), secret="not-a-real-secret"), "unknown join token"),
        (lambda c: c.token(ttl_s=-1), "join token expired"),
    ],
    ids=["wrong", "expired"],
)
async def test_bad_tokens_are_refused(
    coord: Coord, make_token: Callable[[Coord], JoinToken], message: str
) -> None:
    with pytest.raises(EnrollRefused, match=message):
        await coord.enroll(make_token(coord))
    assert coord.store.enrolled_nodes() == []


async def test_a_used_token_cannot_be_replayed(coord: Coord) -> None:
    token = coord.token(uses=2)
    first, second = await coord.enroll(token), await coord.enroll(token)
    assert first.node_id != second.node_id
    with pytest.raises(EnrollRefused, match="join token used up"):
        await coord.enroll(token)
    assert len(coord.store.enrolled_nodes()) == 2


async def test_a_token_from_another_coordinator_is_refused_before_sending_it(
    coord: Coord, tmp_path: Path
) -> None:
    """The agent checks the coordinator's certificate against the token's fingerprint, so a
    token never reaches a coordinator (or a man in the middle) that did not make it."""
    other = FleetPki.load_or_create(tmp_path / "other")
    token = replace(coord.token(), fingerprint_prefix=other.server_fingerprint[:32])
    with pytest.raises(EnrollRefused, match="did not make this join token"):
        await coord.enroll(token)
    assert coord.store.consume_join_token(token.secret) is None  # still unused


async def stream_hello(channel: grpc.aio.Channel) -> None:
    """Open a stream that the coordinator is expected to refuse, and raise its status.

    It reads before it writes: the coordinator refuses before reading anything, and a Hello
    racing that refusal can surface as INTERNAL ("Failed execute_batch") instead of the
    status the coordinator sent (seen once in CI).
    """
    call = fleet_pb2_grpc.FleetStub(channel).Connect()
    await call.read()
    await call.write(pb.AgentMessage(hello=pb.Hello(facts=pb.NodeFacts(hostname="x"))))
    async for _ in call:
        pass


async def test_stream_refused_without_a_certificate(coord: Coord) -> None:
    """The enrollment port takes no client certificate; a stream opened there is refused."""
    async with coord.channel(None, port=coord.enroll_port) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stream_hello(channel)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "no client certificate" in (err.value.details() or "")
    async with coord.channel(None) as channel:  # the mutual-TLS port: the handshake fails
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stream_hello(channel)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert coord.registry.nodes == {}


async def test_stream_refused_with_a_certificate_from_another_ca(
    coord: Coord, tmp_path: Path
) -> None:
    other = FleetPki.load_or_create(tmp_path / "other")
    genuine = await coord.enroll(coord.token())
    from node_agent.identity import make_csr

    forged = replace(
        genuine, cert_pem=other.issue_node_certificate(genuine.node_id, make_csr(genuine.key_pem))
    )
    async with coord.channel(forged) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stream_hello(channel)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # refused in the TLS handshake
    assert coord.registry.nodes == {}


async def test_a_revoked_node_is_refused(coord: Coord) -> None:
    identity = await coord.enroll(coord.token())
    assert coord.store.revoke_node(identity.node_id)
    async with coord.channel(identity) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stream_hello(channel)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "not enrolled" in (err.value.details() or "")


class Agent:
    """A raw control stream: the test decides every message."""

    def __init__(self, coord: Coord, identity: NodeIdentity) -> None:
        self.outbound: asyncio.Queue[pb.AgentMessage | None] = asyncio.Queue()
        self.channel = coord.channel(identity)
        self.call = fleet_pb2_grpc.FleetStub(self.channel).Connect(self._requests())

    async def _requests(self) -> AsyncIterator[pb.AgentMessage]:
        yield pb.AgentMessage(hello=pb.Hello(facts=pb.NodeFacts(hostname="mini", chip="M2")))
        while (message := await self.outbound.get()) is not None:
            yield message

    def status(self, seq: int = 1) -> None:
        self.outbound.put_nowait(
            pb.AgentMessage(
                status=pb.NodeStatus(
                    seq=seq,
                    available_bytes=20 * 2**30,
                    memory_pressure=pb.MEMORY_PRESSURE_WARNING,
                    thermal_state=pb.THERMAL_STATE_FAIR,
                    power_source=pb.POWER_SOURCE_AC,
                )
            )
        )

    async def finish(self) -> grpc.StatusCode:
        """Close our side; the status the coordinator ended the stream with."""
        self.outbound.put_nowait(None)
        try:
            async for _ in self.call:
                pass
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        finally:
            await self.channel.close()
        return grpc.StatusCode.OK


async def test_stream_carries_status_and_engine_events(coord: Coord) -> None:
    identity = await coord.enroll(coord.token())
    node_id = NodeId(identity.node_id)
    agent = Agent(coord, identity)
    await until(lambda: node_id in coord.registry.nodes, "the node to connect")
    assert coord.registry.nodes[node_id].facts.chip == "M2"
    agent.status()
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
        url="https://10.0.0.7:9",
        secret="s",
    )
    agent.outbound.put_nowait(
        pb.AgentMessage(event=pb.EngineEvent(kind=pb.EngineEvent.KIND_READY, engine=info))
    )
    await until(lambda: coord.routing.models() == ["demo"], "the engine to be routed")
    target = await coord.routing.pick("demo", "interactive")
    assert target is not None
    assert (target.url, target.secret, target.node_id, target.tls) == (
        "https://10.0.0.7:9",
        "s",
        node_id,
        True,
    )

    agent.outbound.put_nowait(
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
    assert coord.store.events()[0].kind == "engine_exited"
    assert "sigkill" in coord.store.events()[0].detail
    assert await agent.finish() == grpc.StatusCode.OK
    await until(lambda: node_id not in coord.registry.nodes, "the node to disconnect")


async def test_garbage_and_floods_are_cut_without_disturbing_other_nodes(coord: Coord) -> None:
    token = coord.token(uses=3)
    calm, noisy, flooder = [Agent(coord, await coord.enroll(token)) for _ in range(3)]
    await until(lambda: len(coord.registry.nodes) == 3, "three nodes")
    noisy.outbound.put_nowait(pb.AgentMessage(hello=pb.Hello()))  # a second hello is garbage
    for seq in range(MAX_MESSAGES_PER_S * 3):
        flooder.status(seq)
    assert await noisy.finish() == grpc.StatusCode.INVALID_ARGUMENT
    # The flooder is still writing when the stream ends, so its client may report its own
    # failed send (INTERNAL) instead of the coordinator's status: the coordinator's record of
    # the cut is the thing to check.
    assert await flooder.finish() != grpc.StatusCode.OK
    await until(lambda: len(coord.registry.nodes) == 1, "the two offenders to be dropped")
    cuts = sorted(e.detail for e in coord.store.events() if e.kind == "stream_cut")
    assert cuts == [
        f"more than {MAX_MESSAGES_PER_S} messages in a second",
        "unexpected hello message",
    ]
    calm.status(seq=7)
    [node] = coord.registry.nodes.values()
    await until(lambda: node.status is not None, "the calm node's status")
    assert await calm.finish() == grpc.StatusCode.OK


async def test_oversized_and_malformed_messages_are_refused(coord: Coord) -> None:
    """Bytes that are not a protobuf, and a message over the 1 MiB limit, end only their own
    stream; the coordinator keeps serving another node."""
    token = coord.token(uses=3)
    calm = Agent(coord, await coord.enroll(token))
    await until(lambda: len(coord.registry.nodes) == 1, "the calm node")

    raw_identity = await coord.enroll(token)
    async with coord.channel(raw_identity) as channel:
        connect = channel.stream_stream(
            "/mlxfleet.v1.Fleet/Connect",
            request_serializer=lambda b: b,
            response_deserializer=pb.CoordinatorMessage.FromString,
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in connect(iter([b"\xff\xff\xff\xff not a protobuf"])):
                pass
    assert err.value.code() != grpc.StatusCode.OK

    big_identity = await coord.enroll(token)
    big = pb.Hello(facts=pb.NodeFacts(hostname="x" * (2 * 1024 * 1024)))
    async with coord.channel(big_identity) as channel:
        call = fleet_pb2_grpc.FleetStub(channel).Connect(iter([pb.AgentMessage(hello=big)]))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in call:
                pass
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    assert list(coord.registry.nodes) == [calm_id := next(iter(coord.registry.nodes))]
    calm.status(seq=3)
    await until(lambda: coord.registry.nodes[calm_id].status is not None, "the calm status")
    assert await calm.finish() == grpc.StatusCode.OK


async def test_manifests_are_recorded_and_a_bad_one_is_refused_without_cutting_the_stream(
    coord: Coord,
) -> None:
    """Issue 18: a node sends the manifest of files it got first; one naming a path outside
    the model folder is refused with an event, and the node's stream stays up."""
    identity = await coord.enroll(coord.token())
    agent = Agent(coord, identity)
    await until(lambda: len(coord.registry.nodes) == 1, "the node")
    good = pb.ModelManifest(
        source="org/model", files=[pb.ModelFile(path="model.safetensors", size=7, sha256="c" * 64)]
    )
    bad = pb.ModelManifest(
        source="org/evil", files=[pb.ModelFile(path="../../etc/passwd", size=7, sha256="c" * 64)]
    )
    agent.outbound.put_nowait(pb.AgentMessage(manifest=bad))
    agent.outbound.put_nowait(pb.AgentMessage(manifest=good))
    await until(lambda: "org/model" in coord.store.manifests(), "the manifest to be stored")
    assert list(coord.store.manifests()) == ["org/model"]
    [refused] = [e for e in coord.store.events() if e.kind == "manifest_refused"]
    assert refused.node_id == identity.node_id and "'../../etc/passwd'" in refused.detail
    agent.status()
    [node] = coord.registry.nodes.values()
    await until(lambda: node.status is not None, "a status after the refusal")
    assert await agent.finish() == grpc.StatusCode.OK


async def test_an_engine_the_coordinator_does_not_know_is_unloaded(coord: Coord) -> None:
    """An engine reported ready that nobody placed there (its node's stream broke while it
    copied its files, and the coordinator forgot it) would run unrouted forever: it is told
    to go."""
    identity = await coord.enroll(coord.token())
    agent = Agent(coord, identity)
    await until(lambda: len(coord.registry.nodes) == 1, "the node")
    info = pb.EngineInfo(
        engine_id="stray-1", model="demo", tier=pb.TIER_INTERACTIVE, state=pb.ENGINE_STATE_READY
    )
    agent.outbound.put_nowait(
        pb.AgentMessage(event=pb.EngineEvent(kind=pb.EngineEvent.KIND_READY, engine=info))
    )
    command = await asyncio.wait_for(agent.call.read(), 5)
    assert command.WhichOneof("body") == "unload" and command.unload.engine_id == "stray-1"
    assert coord.routing.models() == [] and EngineId("stray-1") not in coord.registry.engines
    agent.outbound.put_nowait(None)
    assert await agent.call.read() == grpc.aio.EOF  # nothing more, the stream ended cleanly
    assert await agent.call.code() == grpc.StatusCode.OK
    await agent.channel.close()

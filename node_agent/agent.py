"""The node agent process: probe the Mac, enroll, hold the control stream, run engines."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import random
import signal
import socket
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc

from mlxfleet.facts import NodeFacts, Role
from mlxfleet.join import JoinToken
from mlxfleet.v1 import fleet_pb2 as pb
from mlxfleet.version import package_version
from node_agent import peer_copy
from node_agent.advertise import Advertiser, NodeRecord
from node_agent.cgroup import MemoryLimiter
from node_agent.coordinator_client import NodeProfile, Session, enroll, knobs_from_pb, load_request
from node_agent.discover import find_coordinator
from node_agent.engine_info import EngineEvent, EngineInfo, EngineNetwork, EngineTls
from node_agent.errors import AgentError, CoordinatorUnreachable, EnrollRefused
from node_agent.file_server import FileServerProcess, server_context
from node_agent.identity import NodeIdentity
from node_agent.liveness import DEFAULT_ENGINE_STALL_S
from node_agent.metrics import AgentMetrics
from node_agent.model_store import ModelStore
from node_agent.probes import local_probe
from node_agent.probes.base import NodeReading, Probe
from node_agent.rank_link import RankLink
from node_agent.supervisor import Supervisor

logger = logging.getLogger(__name__)

DEFAULT_GRPC_PORT = 8401
DEFAULT_ENROLL_PORT = 8403
DEFAULT_METRICS_PORT = 8402  # GET /metrics for Prometheus
RECONNECT_BASE_S = 0.5  # first retry after a lost stream; doubles up to the max, with jitter
RECONNECT_MAX_S = 5.0
MDNS_SEARCH_S = 5.0  # one round of looking for a coordinator on the LAN
GIB = 2**30


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """Everything the agent process needs."""

    home: Path  # MLXFLEET_HOME/agent: identity and engine logs
    coordinator: str | None = None  # host[:port] of the control stream; None = saved or mDNS
    token: str | None = None  # a join token, needed only to enroll
    enroll_port: int = DEFAULT_ENROLL_PORT
    advertise: bool = True  # announce this node on mDNS
    role: Role | None = None  # overrides the probe (laptop when a battery is present)
    profile: NodeProfile = field(default_factory=NodeProfile)  # labels, opt-in, OS reserve
    engine_memory_limit_bytes: int | None = None  # per engine, by a memory cgroup (Linux)
    engine_stall_s: float = DEFAULT_ENGINE_STALL_S  # a ready engine silent this long is killed
    metrics_host: str = "0.0.0.0"
    metrics_port: int = DEFAULT_METRICS_PORT  # 0: any free port
    models_dir: Path | None = None  # the model store; None: <home>/models
    disk_budget_bytes: int | None = None  # the store's most; None: the disk (less a reserve)
    serve_rate_mib_s: float = 0  # cap on serving model files to peers; 0: none
    files_port: int = 0  # where model files are served to peers; 0: any free port
    link_port: int = 0  # where groups' rank traffic is relayed (node_agent/groups.py); 0: any


def split_host_port(address: str, default_port: int) -> tuple[str, int]:
    host, _, port = address.rpartition(":") if ":" in address else (address, "", "")
    if not port:
        return address, default_port
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise AgentError(f"--coordinator {address!r}: expected HOST or HOST:PORT")
    return host, int(port)


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


def outbound_ip(host: str, port: int) -> str:
    """The local address the kernel would use to reach host (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, port))
        return str(s.getsockname()[0])


class Agent:
    """Owns the supervisor, the mDNS advertiser and the reconnect loop; one session at a time."""

    def __init__(self, config: AgentConfig, probe: Probe | None = None) -> None:
        self.config = config
        self.probe = probe or local_probe()
        self.session: Session | None = None
        self.identity: NodeIdentity | None = None
        limit = config.engine_memory_limit_bytes
        self.store = ModelStore(
            config.models_dir or config.home / "models",
            config.disk_budget_bytes,
            hash_cache=config.home / "hashes.json",
        )
        self.supervisor = Supervisor(
            self.probe,
            self._on_event,
            config.home / "logs",
            limiter=MemoryLimiter.for_this_process(limit) if limit else None,
            stall_s=config.engine_stall_s,
            store=self.store,
        )
        self._files: FileServerProcess | None = None  # serves model files to fleet members
        self._files_where: tuple[str, str, bytes] = ("", "", b"")  # (bind, url host, cert)
        self.files_url = ""
        self._link: RankLink | None = None  # relays groups' rank traffic to other members
        self._link_where: tuple[str, str, bytes] = ("", "", b"")
        self.link_address = ""
        self._advertiser: Advertiser | None = None
        self._facts: NodeFacts | None = None
        self._metrics: AgentMetrics | None = None
        self.metrics_port = 0  # the port /metrics is served on; 0 until serve() binds it
        self._stop = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._dropping: asyncio.Task[None] | None = None  # engines dropping their prefix caches

    def request_stop(self) -> None:
        self._stop.set()

    def _on_event(self, event: EngineEvent) -> None:
        # Events while disconnected are not queued: the next Hello lists running engines.
        if self.session is not None and self.session.connected.is_set():
            self.session.send_event(event)

    def _on_command(self, message: pb.CoordinatorMessage) -> None:
        kind = message.WhichOneof("body")
        if kind == "load":
            request = load_request(message.load)
            me = self.identity.node_id if self.identity is not None else ""
            holders = tuple(h for h in request.holders if h.node_id != me)  # not from itself
            problem = request.group.problem(me) if request.group else None
            if problem is not None:  # a group this node cannot join: refused, in one line
                info = EngineInfo(request.engine_id, request.model, request.tier, "exited")
                self._on_event(EngineEvent("load_failed", info, "crash", detail=problem))
                return
            coro = self.supervisor.load(replace(request, holders=holders))
        elif kind == "unload":
            coro = self.supervisor.unload(message.unload.engine_id)
        elif kind == "drain":
            coro = self.supervisor.stop_all()
        elif kind == "set_knobs":
            coro = self.supervisor.set_knobs(
                message.set_knobs.engine_id, knobs_from_pb(message.set_knobs.knobs)
            )
        else:
            logger.warning("ignoring unknown command %r", kind)
            return
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def serve(self, install_signals: bool = True) -> None:
        if install_signals:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self._stop.set)
        facts = await asyncio.to_thread(self.probe.facts)
        if self.config.role is not None:
            facts = replace(facts, role=self.config.role)
        self._facts = facts
        self._metrics = AgentMetrics(facts, self.probe, self.supervisor, self._connected)
        self.metrics_port = await self._serve_metrics(self._metrics)
        stopper = asyncio.create_task(self._stop.wait())
        try:
            await self._run(facts, stopper)
        finally:
            stopper.cancel()
            await self.supervisor.stop_all()
            await self.store.close()
            if self._files is not None:
                await self._files.stop()
            if self._link is not None:
                await self._link.close()
            if self._advertiser is not None:
                await self._advertiser.close()
            await self._metrics.stop()

    def _connected(self) -> bool:
        return self.session is not None and self.session.connected.is_set()

    async def _serve_metrics(self, metrics: AgentMetrics) -> int:
        """Start GET /metrics and return its port; 0 (and one warning) when it cannot listen."""
        host, port = self.config.metrics_host, self.config.metrics_port
        try:
            bound = await metrics.start(host, port)
        except OSError as exc:
            # "Address already in use": asyncio's own message repeats the address, in words.
            reason = os.strerror(exc.errno) if exc.errno else exc
            logger.warning("not serving metrics: cannot listen on %s:%d (%s)", host, port, reason)
            return 0
        logger.info("metrics on http://%s:%d/metrics", host, bound)
        return bound

    async def _run(self, facts: NodeFacts, stopper: asyncio.Task[bool]) -> None:
        delay = RECONNECT_BASE_S
        while not self._stop.is_set():
            try:
                identity = await self._identity(facts)
                host, port = split_host_port(identity.coordinator, DEFAULT_GRPC_PORT)
                self._configure_engines(identity, host, port)
                await self._serve_files(identity)
                await self._serve_link(identity)
                await self._advertise(identity, facts)
                self.session = Session(
                    identity.coordinator,
                    identity,
                    facts,
                    self.probe.reading,
                    self.supervisor.infos,
                    self.supervisor.rss,
                    self._on_reading,
                    self.config.profile,
                    metrics_port=self.metrics_port,
                    store=self.store,
                    files_url=self.files_url,
                    link_address=self.link_address,
                )
                run = asyncio.create_task(self.session.run(self._on_command))
                await asyncio.wait({run, stopper}, return_when=asyncio.FIRST_COMPLETED)
                if not run.done():
                    run.cancel()
                    break
                run.result()
                logger.warning("coordinator closed the stream")
            except EnrollRefused as exc:
                raise AgentError(f"enrollment refused: {exc}") from None
            except CoordinatorUnreachable as exc:
                logger.warning("%s", exc)
            except grpc.aio.AioRpcError as exc:
                self._on_stream_error(exc)
            if self.session is not None and self.session.was_connected:
                delay = RECONNECT_BASE_S
            # Jitter spreads a fleet's reconnects after a coordinator restart; downward only,
            # so no wait is longer than RECONNECT_MAX_S.
            sleep_s = delay * random.uniform(0.5, 1.0)
            delay = min(delay * 2, RECONNECT_MAX_S)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(stopper), sleep_s)

    def _on_stream_error(self, exc: grpc.aio.AioRpcError) -> None:
        if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
            # Revoked, or the coordinator lost its store: only a new token gets us back in.
            NodeIdentity.forget(self.config.home)
            self.identity = None
            if not self.config.token:
                raise AgentError(f"the coordinator refused this node: {exc.details()}")
            logger.warning("coordinator refused this node (%s): enrolling again", exc.details())
        else:
            logger.warning("coordinator unreachable: %s", exc.details() or exc.code())

    async def _identity(self, facts: NodeFacts) -> NodeIdentity:
        """The saved identity, else enroll with the join token (once)."""
        if self.identity is not None:
            return self.identity
        saved = NodeIdentity.load(self.config.home)
        if saved is not None:
            if self.config.coordinator:
                saved = replace(saved, coordinator=self.config.coordinator)
            self.identity = saved
            return saved
        if not self.config.token:
            raise AgentError("this node has not enrolled yet: pass --token (mlxfleet token create)")
        try:
            token = JoinToken.parse(self.config.token)
        except ValueError as exc:
            raise AgentError(f"--token: {exc}") from None
        host, grpc_port, enroll_port = await self._locate()
        identity = await enroll(host, enroll_port, token, "", facts, self.config.profile)
        identity = replace(identity, coordinator=f"{host}:{grpc_port}")
        identity.save(self.config.home)
        logger.info("enrolled as %s with the coordinator at %s", identity.node_id, host)
        self.identity = identity
        return identity

    async def _locate(self) -> tuple[str, int, int]:
        """(host, control port, enrollment port) from --coordinator, else from mDNS."""
        if self.config.coordinator:
            host, port = split_host_port(self.config.coordinator, DEFAULT_GRPC_PORT)
            return host, port, self.config.enroll_port
        logger.info("no --coordinator: looking for one on the LAN (mDNS)")
        while not self._stop.is_set():
            found = await find_coordinator(MDNS_SEARCH_S)
            if found is not None:
                logger.info("found a coordinator at %s:%d by mDNS", found.host, found.grpc_port)
                return found.host, found.grpc_port, found.enroll_port
        raise AgentError("stopped while looking for a coordinator")

    def _configure_engines(self, identity: NodeIdentity, host: str, port: int) -> None:
        """Loopback engines for a local coordinator; TLS on the LAN address otherwise."""
        if is_loopback(host):
            self.supervisor.network = EngineNetwork()
            return
        home = self.config.home
        self.supervisor.network = EngineNetwork(
            bind_host="0.0.0.0",
            url_host=outbound_ip(host, port),
            tls=EngineTls(
                home / "node.crt", home / "node.key", identity.fleet_ca_pem, identity.node_id
            ),
        )

    async def _serve_files(self, identity: NodeIdentity) -> None:
        """Serve this node's model files to fleet members (node_agent/file_server.py), on the
        engines' address and with the node certificate; and copy from them with it too.
        Started once, again only if the address or certificate changed (a new enrollment).
        A node that cannot listen still runs engines: it just serves no copies."""
        home = self.config.home
        cert, key, ca = home / "node.crt", home / "node.key", home / "fleet-ca.crt"
        self.store.peer_tls = peer_copy.client_context(cert, key, identity.fleet_ca_pem)
        network = self.supervisor.network
        where = (network.bind_host, network.url_host, identity.cert_pem)
        if self._files is not None and where == self._files_where:
            return
        if self._files is not None:
            await self._files.stop()
            self._files, self.files_url = None, ""
        (home / "logs").mkdir(parents=True, exist_ok=True)
        try:
            files = await FileServerProcess.start(
                self.store.index_path,
                cert,
                key,
                ca,
                network.bind_host,
                self.config.files_port,
                rate_mib_s=self.config.serve_rate_mib_s,
                log_path=home / "logs" / "file-server.log",
            )
        except (OSError, RuntimeError) as exc:
            logger.warning("not serving model files to other nodes: %s", exc)
            return
        self._files, self._files_where = files, where
        self.files_url = f"https://{network.url_host}:{files.port}"
        logger.info("serving model files to fleet members at %s", self.files_url)

    async def _serve_link(self, identity: NodeIdentity) -> None:
        """Relay groups' MLX rank traffic to and from other members (node_agent/groups.py),
        on the engines' address, with the node certificate both ways. Started once, again
        only if the address or certificate changed; without it this node joins no group."""
        home = self.config.home
        network = self.supervisor.network
        where = (network.bind_host, network.url_host, identity.cert_pem)
        if self._link is not None and where == self._link_where:
            return
        if self._link is not None:
            await self._link.close()
            self._link, self.link_address = None, ""
        cert, key = home / "node.crt", home / "node.key"
        link = RankLink(
            server_context(cert, key, home / "fleet-ca.crt"),
            peer_copy.client_context(cert, key, identity.fleet_ca_pem),
            identity.node_id,
            network.bind_host,
            self.config.link_port,
        )
        try:
            port = await link.start()
        except OSError as exc:
            logger.warning("not relaying group traffic: %s", exc)
            return
        self._link, self._link_where = link, where
        self.supervisor.link = link
        self.link_address = f"{network.url_host}:{port}"
        logger.info("relaying group rank traffic at %s", self.link_address)

    def _on_reading(self, reading: NodeReading) -> None:
        """Each heartbeat's reading feeds /metrics and the mDNS record (rate-limited there);
        under memory pressure the engines drop their prefix caches, every heartbeat while it
        lasts (before the coordinator moves any model)."""
        if self._metrics is not None:
            self._metrics.note_reading(reading)
        if reading.memory_pressure in ("warning", "critical") and self._dropping is None:
            self._dropping = task = asyncio.create_task(self.supervisor.drop_prefix_caches())
            self._tasks.add(task)
            task.add_done_callback(self._dropped)
        if self._advertiser is None or self.identity is None or self._facts is None:
            return
        task = asyncio.create_task(
            self._advertiser.update(self._record(self.identity, self._facts, reading))
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _dropped(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._dropping = None

    async def _advertise(self, identity: NodeIdentity, facts: NodeFacts) -> None:
        if not self.config.advertise or self._advertiser is not None:
            return
        reading = await asyncio.to_thread(self.probe.reading)
        advertiser = Advertiser()
        try:
            await advertiser.start(self._record(identity, facts, reading))
        except (OSError, ValueError) as exc:
            logger.warning("not advertising on mDNS: %s", exc)
            await advertiser.close()
            return
        self._advertiser = advertiser

    def _record(self, identity: NodeIdentity, facts: NodeFacts, reading: NodeReading) -> NodeRecord:
        return NodeRecord(
            node_id=identity.node_id,
            version=_version(),
            metrics_port=self.metrics_port,
            chip=facts.chip[:64],
            ram_gib=max(1, round(facts.ram_bytes / GIB)),
            role=facts.role,
            avail_gib=round(reading.available_bytes / GIB, 1),
            thermal=reading.thermal_state,
        )


def _version() -> str:
    return package_version("mlxfleet") or "0"

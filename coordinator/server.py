"""The coordinator process: startup -> serve -> shutdown (uvicorn's shape)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
from aiohttp import web

from coordinator import __version__
from coordinator.catalog import Catalog
from coordinator.config import Config
from coordinator.discovery import CoordinatorAdvertiser, Discovery
from coordinator.errors import ConfigError
from coordinator.fleet_metrics import FleetCollector
from coordinator.gateway.app import Gateway
from coordinator.gateway.tls_site import TlsSite, server_context
from coordinator.grpc_service import MAX_MESSAGE_BYTES, FleetService
from coordinator.pki import FleetPki
from coordinator.reconcile import Reconciler
from coordinator.registry import Registry
from coordinator.routing import Routing
from coordinator.store import Store
from coordinator.tls import is_loopback
from mlxfleet.join import FINGERPRINT_HEX_CHARS, JoinToken
from mlxfleet.tiers import TIERS
from mlxfleet.v1 import fleet_pb2_grpc

logger = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 5.0  # in-flight requests get this long to finish on shutdown
ADMIN_TOKEN_FILE = "admin_token"
RUNTIME_FILE = "coordinator.json"
MODEL_POLL_S = 0.05


@dataclass(frozen=True, slots=True)
class Bound:
    """The ports the coordinator really listens on (a configured 0 picks a free one)."""

    gateway_port: int
    grpc_port: int
    enroll_port: int


def create_join_token(config: Config, ttl_s: float, uses: int) -> str:
    """A join token for this coordinator: its certificate's fingerprint and a stored secret."""
    pki = FleetPki.load_or_create(config.home)
    store = Store(config.db_path)
    try:
        secret = store.create_join_token(ttl_s, uses)
    finally:
        store.close()
    return str(JoinToken(pki.server_fingerprint[:FINGERPRINT_HEX_CHARS], secret))


def reload_on_signal(catalog: Catalog) -> None:
    """SIGHUP: re-read fleet.toml; a bad one leaves the running configuration, said in one
    line."""
    try:
        catalog.reload()
    except ConfigError as exc:
        logger.error("reload refused, the running configuration stays: %s", exc)


def load_admin_token(home: Path) -> str:
    """The local admin token (file mode 600): what `mlxfleet nodes` uses on this host."""
    path = home / ADMIN_TOKEN_FILE
    if path.exists():
        return path.read_text().strip()
    home.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    path.write_text(token + "\n")
    path.chmod(0o600)
    return token


def build_grpc_server(
    service: FleetService, pki: FleetPki, host: str, grpc_port: int, enroll_port: int
) -> tuple[grpc.aio.Server, int, int]:
    """The agents' gRPC server on two ports; returns it (not started) and the bound ports."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ]
    )
    fleet_pb2_grpc.add_FleetServicer_to_server(service, server)
    identity = [(pki.server_key_pem, pki.server_cert_pem)]
    # Control streams: a client certificate from the fleet CA is required.
    mtls = grpc.ssl_server_credentials(identity, pki.ca_cert_pem, require_client_auth=True)
    # Enrollment: a new node has no certificate yet; it pins ours by the token's fingerprint.
    # (grpc never asks for a client certificate when it is optional, hence two ports.)
    tls = grpc.ssl_server_credentials(identity)
    bound_grpc = server.add_secure_port(f"{host}:{grpc_port}", mtls)
    bound_enroll = server.add_secure_port(f"{host}:{enroll_port}", tls)
    if bound_grpc == 0 or bound_enroll == 0:
        raise OSError(f"cannot listen on {host}:{grpc_port} and {host}:{enroll_port}")
    return server, bound_grpc, bound_enroll


def write_runtime_file(config: Config, bound: Bound, gateway_cert: Path | None) -> None:
    """Publish the real ports (config may say 0) and the gateway's scheme, with the certificate
    it serves over https, for the CLI, tests and tools on this host."""
    path = config.home / RUNTIME_FILE
    tmp = path.with_suffix(".tmp")
    runtime = {"pid": os.getpid(), "host": config.host, **asdict(bound)}
    runtime["gateway_scheme"] = config.tls.scheme
    if gateway_cert is not None:
        runtime["gateway_cert"] = str(gateway_cert.resolve())
    tmp.write_text(json.dumps(runtime))
    tmp.replace(path)  # atomic: a reader never sees half a file


class Server:
    """Owns every coordinator task: gRPC, gateway and the reconcile loop."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.started = asyncio.Event()
        self.bound: Bound | None = None
        self.routing: Routing | None = None
        self.reconciler: Reconciler | None = None
        self.registry: Registry | None = None
        self._stop = asyncio.Event()

    def request_stop(self) -> None:
        self._stop.set()

    async def wait_model(self, model: str, timeout_s: float) -> str | None:
        """None once `model` is routable; else why not (its load failure, or the timeout)."""
        await self.started.wait()
        deadline = asyncio.get_running_loop().time() + timeout_s
        while asyncio.get_running_loop().time() < deadline:
            if self.routing is not None and model in self.routing.models():
                return None
            if self.reconciler is not None:
                failure = next(
                    (
                        why
                        for (name, _tier), why in self.reconciler.load_failures.items()
                        if name == model
                    ),
                    None,
                )
                if failure is not None:
                    return failure
            await asyncio.sleep(MODEL_POLL_S)
        return f"not ready after {timeout_s:.0f} s"

    def _max_parallel(self, tier: str) -> int:
        """A deployment's max_parallel_requests: its tier's max_concurrency (0: unknown)."""
        if self.reconciler is None or tier not in TIERS:
            return 0
        return self.reconciler.knobs(tier).max_concurrency  # type: ignore[arg-type]

    async def serve(self, install_signals: bool = True) -> None:
        config = self.config
        pki = FleetPki.load_or_create(config.home)
        tls = server_context(config.tls, config.host, pki, config.home)  # bad files: fail first
        store = Store(config.db_path)
        routing = self.routing = Routing(
            pki.ca_cert_pem,
            prefer_local=config.prefer_local,
            cache_affinity=config.cache_affinity,
            max_parallel=self._max_parallel,
        )
        registry = self.registry = Registry(routing)
        reconciler = self.reconciler = Reconciler(config, registry, store)
        reconciler.metrics.watch(FleetCollector(reconciler, registry, routing, store))
        catalog = Catalog(config, store, reconciler, routing)
        catalog.apply()  # fleet.toml's models with the changes made at runtime over them
        service = FleetService(pki, store, registry, reconciler)

        grpc_server, grpc_port, enroll_port = build_grpc_server(
            service, pki, config.host, config.grpc_port, config.enroll_port
        )
        await grpc_server.start()

        gateway = Gateway(
            config, store, routing, registry, reconciler, catalog, load_admin_token(config.home)
        )
        runner = web.AppRunner(gateway.app(), access_log=None, handle_signals=False)
        await runner.setup()
        if tls is None:
            site: web.TCPSite | TlsSite = web.TCPSite(runner, config.host, config.gateway_port)
            if not is_loopback(config.host):
                logger.warning(
                    "the gateway serves plain HTTP beyond this host (on %s): keys and prompts "
                    "cross the network unencrypted; --tls serves HTTPS",
                    config.host,
                )
        else:
            site = TlsSite(runner, config.host, config.gateway_port, tls[0])
        await site.start()
        gateway_port = site.port
        self.bound = Bound(gateway_port, grpc_port, enroll_port)
        write_runtime_file(config, self.bound, None if tls is None else tls[1])
        logger.info(
            "gateway on %s://%s:%d/v1; agents on %s:%d (enroll :%d)",
            config.tls.scheme,
            config.host,
            gateway_port,
            config.host,
            grpc_port,
            enroll_port,
        )

        if install_signals:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self._stop.set)
            loop.add_signal_handler(signal.SIGHUP, reload_on_signal, catalog)

        async with contextlib.AsyncExitStack() as stack:
            if config.mdns_enabled:
                await self._start_mdns(stack, gateway, pki.server_fingerprint)
            reconcile = asyncio.create_task(reconciler.run(), name="reconcile")
            self.started.set()
            try:
                await self._stop.wait()
            finally:
                logger.info("shutting down")
                reconcile.cancel()
                await grpc_server.stop(SHUTDOWN_GRACE_S)
                await runner.shutdown()
                await runner.cleanup()
                store.close()
                (config.home / RUNTIME_FILE).unlink(missing_ok=True)

    async def _start_mdns(
        self, stack: contextlib.AsyncExitStack, gateway: Gateway, server_fingerprint: str
    ) -> None:
        """Announce the coordinator and watch for agents on the LAN (discovery, not admission)."""
        assert self.bound is not None
        bound = self.bound
        advertiser = CoordinatorAdvertiser(
            __version__, bound.grpc_port, bound.gateway_port, server_fingerprint, bound.enroll_port
        )
        discovery = Discovery()
        try:
            await advertiser.start()
            stack.push_async_callback(advertiser.close)
            await discovery.start()
            stack.push_async_callback(discovery.close)
        except OSError as exc:  # no multicast-capable interface: the fleet still works by address
            logger.warning("mDNS unavailable: %s", exc)
            return
        gateway.set_discovery(discovery)

"""The coordinator process: startup -> serve -> shutdown (uvicorn's shape)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import signal
from dataclasses import dataclass

import grpc
from aiohttp import web

from coordinator.config import Config
from coordinator.gateway import Gateway
from coordinator.grpc_service import MAX_MESSAGE_BYTES, FleetService
from coordinator.reconcile import Reconciler
from coordinator.registry import Registry
from coordinator.routing import Routing
from coordinator.store import Store
from mlxfleet.v1 import fleet_pb2_grpc

logger = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 5.0  # in-flight requests get this long to finish on shutdown
JOIN_TOKEN_FILE = "join_token"
RUNTIME_FILE = "coordinator.json"
MODEL_POLL_S = 0.05


@dataclass(frozen=True, slots=True)
class Bound:
    """The ports the coordinator really listens on (a configured 0 picks a free one)."""

    gateway_port: int
    grpc_port: int


def load_join_token(config: Config) -> str:
    """The configured join token, else the one kept in MLXFLEET_HOME (created on first start)."""
    if config.join_token:
        return config.join_token
    path = config.home / JOIN_TOKEN_FILE
    if path.exists():
        return path.read_text().strip()
    config.home.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(24)
    path.write_text(token + "\n")
    path.chmod(0o600)
    return token


def write_runtime_file(config: Config, bound: Bound) -> None:
    """Publish the real ports (config may say 0) for the CLI, tests and tools on this host."""
    path = config.home / RUNTIME_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(
        json.dumps(
            {
                "pid": os.getpid(),
                "host": config.host,
                "gateway_port": bound.gateway_port,
                "grpc_port": bound.grpc_port,
            }
        )
    )
    tmp.replace(path)  # atomic: a reader never sees half a file


class Server:
    """Owns every coordinator task: gRPC, gateway and the reconcile loop."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.started = asyncio.Event()
        self.bound: Bound | None = None
        self.routing: Routing | None = None
        self.reconciler: Reconciler | None = None
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
            if self.reconciler is not None and model in self.reconciler.load_failures:
                return self.reconciler.load_failures[model]
            await asyncio.sleep(MODEL_POLL_S)
        return f"not ready after {timeout_s:.0f} s"

    async def serve(self, install_signals: bool = True) -> None:
        config = self.config
        store = Store(config.db_path)
        routing = self.routing = Routing()
        registry = Registry(routing)
        reconciler = self.reconciler = Reconciler(config.models, registry, store)
        service = FleetService(load_join_token(config), store, registry, reconciler)

        grpc_server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ]
        )
        fleet_pb2_grpc.add_FleetServicer_to_server(service, grpc_server)
        grpc_port = grpc_server.add_insecure_port(f"{config.host}:{config.grpc_port}")
        if grpc_port == 0:
            raise OSError(f"cannot bind gRPC on {config.host}:{config.grpc_port}")
        await grpc_server.start()

        gateway = Gateway(config, store, routing)
        runner = web.AppRunner(gateway.app(), access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, config.host, config.gateway_port)
        await site.start()
        gateway_port = runner.addresses[0][1]
        self.bound = Bound(gateway_port=gateway_port, grpc_port=grpc_port)
        write_runtime_file(config, self.bound)
        logger.info(
            "gateway on http://%s:%d/v1, agents on %s:%d",
            config.host,
            gateway_port,
            config.host,
            grpc_port,
        )

        if install_signals:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self._stop.set)

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

"""The node agent process: probe the Mac, enroll, hold the control stream, run engines."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import signal
from dataclasses import dataclass
from pathlib import Path

import grpc

from mlxfleet.v1 import fleet_pb2 as pb
from node_agent.coordinator_client import EnrollRefused, Identity, Session, enroll, load_request
from node_agent.probes import local_probe
from node_agent.probes.base import NodeFacts, Probe
from node_agent.supervisor import EngineEvent, Supervisor

logger = logging.getLogger(__name__)

RECONNECT_BASE_S = 0.5  # first retry after a lost stream; doubles up to the max, with jitter
RECONNECT_MAX_S = 10.0


class AgentError(Exception):
    """The agent cannot run (no token, refused enrollment); one line at the CLI."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "agent error"


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """Everything the agent process needs."""

    coordinator: str  # host:port of the coordinator's gRPC
    home: Path  # MLXFLEET_HOME/agent: identity and engine logs
    token: str | None = None
    engine_host: str = "127.0.0.1"


def load_identity(path: Path) -> Identity | None:
    try:
        raw = json.loads(path.read_text())
        return Identity(raw["node_id"], raw["node_key"])
    except (OSError, ValueError, KeyError):
        return None


def save_identity(path: Path, identity: Identity) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"node_id": identity.node_id, "node_key": identity.node_key}))
    path.chmod(0o600)


class Agent:
    """Owns the supervisor and the reconnect loop; one session at a time."""

    def __init__(self, config: AgentConfig, probe: Probe | None = None) -> None:
        self.config = config
        self.probe = probe or local_probe()
        self.session: Session | None = None
        self.supervisor = Supervisor(
            self.probe, self._on_event, config.home / "logs", config.engine_host
        )
        self._stop = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    def request_stop(self) -> None:
        self._stop.set()

    def _on_event(self, event: EngineEvent) -> None:
        # Events while disconnected are not queued: the next Hello lists running engines.
        if self.session is not None and self.session.connected.is_set():
            self.session.send_event(event)

    def _on_command(self, message: pb.CoordinatorMessage) -> None:
        kind = message.WhichOneof("body")
        if kind == "load":
            coro = self.supervisor.load(load_request(message.load))
        elif kind == "unload":
            coro = self.supervisor.unload(message.unload.engine_id)
        elif kind == "drain":
            coro = self.supervisor.stop_all()
        else:
            logger.warning("ignoring unknown command %r", kind)
            return
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _identity(self, facts: NodeFacts) -> Identity:
        path = self.config.home / "identity.json"
        identity = load_identity(path)
        if identity is not None:
            return identity
        if not self.config.token:
            raise AgentError("this node has not enrolled yet: pass --token (mlxfleet token create)")
        identity = await enroll(self.config.coordinator, self.config.token, "", facts)
        save_identity(path, identity)
        logger.info("enrolled as %s (%s)", identity.node_id, facts.hostname)
        return identity

    async def serve(self, install_signals: bool = True) -> None:
        if install_signals:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self._stop.set)
        facts = await asyncio.to_thread(self.probe.facts)
        stopper = asyncio.create_task(self._stop.wait())
        try:
            await self._connect_loop(facts, stopper)
        finally:
            stopper.cancel()
            await self.supervisor.stop_all()

    async def _connect_loop(self, facts: NodeFacts, stopper: asyncio.Task[bool]) -> None:
        delay = RECONNECT_BASE_S
        while not self._stop.is_set():
            try:
                identity = await self._identity(facts)
                self.session = Session(
                    self.config.coordinator,
                    identity,
                    facts,
                    self.probe.reading,
                    self.supervisor.infos,
                    self.supervisor.rss,
                )
                run = asyncio.create_task(self.session.run(self._on_command))
                await asyncio.wait({run, stopper}, return_when=asyncio.FIRST_COMPLETED)
                if not run.done():
                    run.cancel()
                    break
                run.result()
                logger.warning("coordinator closed the stream")
                delay = RECONNECT_BASE_S
            except EnrollRefused as exc:
                raise AgentError(f"enrollment refused: {exc}") from None
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.UNAUTHENTICATED and self.config.token:
                    logger.warning("coordinator no longer knows this node: enrolling again")
                    (self.config.home / "identity.json").unlink(missing_ok=True)
                elif exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                    raise AgentError(f"coordinator refused this node: {exc.details()}") from None
                else:
                    logger.warning(
                        "coordinator %s unreachable: %s",
                        self.config.coordinator,
                        exc.details() or exc.code(),
                    )
            if self.session is not None and self.session.was_connected:
                delay = RECONNECT_BASE_S
            # Jitter spreads a fleet's reconnects after a coordinator restart.
            sleep_s = delay * random.uniform(0.5, 1.5)
            delay = min(delay * 2, RECONNECT_MAX_S)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(stopper), sleep_s)

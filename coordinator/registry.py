"""Live nodes and engines as the coordinator knows them. Use from the event loop only."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field, replace
from typing import Literal, NewType, Protocol

from coordinator.holdings import FileCopy, HeldFiles
from coordinator.policy import UnitKey
from mlxfleet.engines import EngineState
from mlxfleet.facts import NodeFacts
from mlxfleet.kv import DEFAULT_PREFIX_CACHE_MIB
from mlxfleet.manifest import Manifest
from mlxfleet.tiers import Knobs

logger = logging.getLogger(__name__)

NodeId = NewType("NodeId", str)
EngineId = NewType("EngineId", str)
Liveness = Literal["live", "suspect"]


@dataclass(frozen=True, slots=True)
class NodeStatus:
    """A node's latest heartbeat reading."""

    available_bytes: int
    swap_used_bytes: int
    memory_pressure: str
    thermal_state: str
    power_source: str
    low_power_mode: bool
    disk_room_bytes: int | None = None  # room for model files; None: the agent predates it
    held: tuple[HeldFiles, ...] = ()
    copies: tuple[FileCopy, ...] = ()


@dataclass(frozen=True, slots=True)
class Engine:
    """One engine process: a model served on a node."""

    engine_id: EngineId
    model: str
    node_id: NodeId
    tier: str
    state: EngineState
    url: str = ""
    secret: str = ""
    context_length: int = 0
    rss_bytes: int = 0
    ready_since: float = 0.0  # monotonic time this coordinator first saw it ready
    # One rank of a model spread over several nodes (coordinator/group_engines.py): the
    # group's id is its rank 0's engine id; only rank 0 serves, and counts as the replica.
    group_id: str = ""
    rank: int = 0
    # The group as its agent reports it (layers and node ids by rank): a coordinator that
    # restarted takes the group back from these.
    group_split: tuple[int, ...] = ()
    group_nodes: tuple[str, ...] = ()

    @property
    def serves(self) -> bool:
        """Whether it takes requests: a whole model, or a group's rank 0."""
        return self.rank == 0


LIVE_STATES: tuple[EngineState, ...] = ("starting", "ready")  # running, or about to


def unit_of(engine: Engine) -> UnitKey:
    """The unit (model × tier) an engine serves."""
    return (engine.model, engine.tier)  # type: ignore[return-value]


@dataclass(frozen=True, slots=True)
class LoadCommand:
    engine_id: EngineId
    model: str
    source: str
    tier: str
    context_length: int
    knobs: Knobs
    kv_bits: int = 16  # 8 or 4: a quantized KV cache (batch tier, one request at a time)
    kv_group_size: int = 64
    prefix_cache_mib: int = DEFAULT_PREFIX_CACHE_MIB  # the engine's prefix cache; 0: none
    manifest: Manifest | None = None  # the model's files as the fleet recorded them
    holders: tuple[tuple[str, str], ...] = ()  # (node id, files URL) to copy them from
    group: GroupCommand | None = None  # one rank of a group; None: the whole model


@dataclass(frozen=True, slots=True)
class GroupMemberCommand:
    rank: int
    node_id: str
    link_address: str  # its agent's rank link, "host:port"
    first_layer: int
    layers: int


@dataclass(frozen=True, slots=True)
class GroupCommand:
    """This rank's place in its group, as LoadModel carries it."""

    group_id: str
    rank: int
    members: tuple[GroupMemberCommand, ...]  # rank 0 first
    stall_s: float


@dataclass(frozen=True, slots=True)
class SetKnobsCommand:
    engine_id: EngineId
    knobs: Knobs


@dataclass(frozen=True, slots=True)
class UnloadCommand:
    engine_id: EngineId


Command = LoadCommand | UnloadCommand | SetKnobsCommand


@dataclass(slots=True)
class Node:
    """A connected node. `outbox` feeds its control stream."""

    node_id: NodeId
    facts: NodeFacts
    status: NodeStatus | None = None
    last_heartbeat: float = field(default_factory=time.monotonic)
    liveness: Liveness = "live"
    connected_at: float = field(default_factory=time.time)
    cordoned: bool = False  # drained: its replicas move off and nothing new lands
    metrics_target: str = ""  # "host:port" of its agent's /metrics; "" when it serves none
    files_url: str = ""  # where its agent serves model files to fleet members; "": it does not
    link_address: str = ""  # where its agent relays groups' rank traffic; "": it does not
    # None tells the stream writer that this connection was replaced or dropped.
    outbox: asyncio.Queue[Command | None] = field(default_factory=asyncio.Queue)


class RouteTable(Protocol):
    """What the registry tells the router (coordinator/routing.py implements it)."""

    def add_engine(self, engine: Engine) -> None: ...

    def remove_engine(self, engine_id: EngineId, *, drain: bool = False) -> None: ...


class Registry:
    """Nodes and engines. Every change that affects routing goes to the route table at once."""

    def __init__(self, routes: RouteTable) -> None:
        self.nodes: dict[NodeId, Node] = {}
        self.engines: dict[EngineId, Engine] = {}
        self._routes = routes
        self.changed = asyncio.Event()  # wakes the reconcile loop

    def connect(self, node_id: NodeId, facts: NodeFacts, engines: list[Engine]) -> Node:
        """A node opened its stream; engines it still runs are taken back, not reloaded."""
        self.disconnect(node_id)
        node = Node(node_id=node_id, facts=facts)
        self.nodes[node_id] = node
        for engine in engines:
            self.upsert_engine(engine)
        self.changed.set()
        return node

    def disconnect(self, node_id: NodeId, only: Node | None = None) -> None:
        """The node's stream ended or went silent: nothing on it is routable any more.

        With `only`, act only if that connection is still the current one, so an old
        stream closing late cannot drop the node's newer connection.
        """
        node = self.nodes.get(node_id)
        if node is None or (only is not None and node is not only):
            return
        del self.nodes[node_id]
        node.outbox.put_nowait(None)
        for engine in [e for e in self.engines.values() if e.node_id == node_id]:
            self.drop_engine(engine.engine_id)
        logger.info("node %s disconnected", node_id)
        self.changed.set()

    def heartbeat(self, node_id: NodeId, status: NodeStatus, rss: dict[str, int]) -> None:
        node = self.nodes.get(node_id)
        if node is None:
            return
        if node.status is None:
            self.changed.set()  # placement waits for a node's first reading
        node.status = status
        node.last_heartbeat = time.monotonic()
        if node.liveness == "suspect":
            node.liveness = "live"
            logger.info("node %s is back: routing its engines again", node_id)
            for ready in self.engines.values():
                if ready.node_id == node_id and ready.state == "ready" and ready.serves:
                    self._routes.add_engine(ready)
            self.changed.set()
        for engine_id, rss_bytes in rss.items():
            engine = self.engines.get(EngineId(engine_id))
            if engine is not None and engine.rss_bytes != rss_bytes:
                self.engines[engine.engine_id] = replace(engine, rss_bytes=rss_bytes)

    def mark_suspect(self, node_id: NodeId) -> None:
        """The node missed heartbeats: route nothing to it until it is heard again."""
        node = self.nodes.get(node_id)
        if node is None or node.liveness == "suspect":
            return
        node.liveness = "suspect"
        for engine in self.engines.values():
            if engine.node_id == node_id:
                self._routes.remove_engine(engine.engine_id)
        self.changed.set()

    def upsert_engine(self, engine: Engine) -> None:
        """Record an engine's new state; a ready engine on a live node becomes routable."""
        known = self.engines.get(engine.engine_id)
        if engine.state == "ready":
            since = known.ready_since if known and known.ready_since else time.monotonic()
            engine = replace(engine, ready_since=since)
        self.engines[engine.engine_id] = engine
        node = self.nodes.get(engine.node_id)
        if engine.state == "ready" and node is not None and node.liveness == "live":
            if engine.serves:  # a group's other ranks take no requests
                self._routes.add_engine(engine)
        else:
            # A stopping engine was told to stop: it finishes what it serves, then exits.
            self._routes.remove_engine(engine.engine_id, drain=engine.state == "stopping")
        self.changed.set()

    def drop_engine(self, engine_id: EngineId) -> Engine | None:
        """Forget an engine (it exited or its node left) and unroute it."""
        engine = self.engines.pop(engine_id, None)
        self._routes.remove_engine(engine_id)
        self.changed.set()
        return engine

    def set_cordoned(self, node_id: NodeId, cordoned: bool) -> None:
        """An operator drained (True) or uncordoned a node; placement acts on it at once."""
        node = self.nodes.get(node_id)
        if node is not None:
            node.cordoned = cordoned
        self.changed.set()

    def unroute(self, engine_id: EngineId) -> None:
        """Route nothing new to a ready engine that is about to move; what it serves finishes."""
        self._routes.remove_engine(engine_id, drain=True)

    def engines_of(self, model: str) -> list[Engine]:
        return [e for e in self.engines.values() if e.model == model]

    def send(self, node_id: NodeId, command: Command) -> bool:
        node = self.nodes.get(node_id)
        if node is None:
            return False
        node.outbox.put_nowait(command)
        return True

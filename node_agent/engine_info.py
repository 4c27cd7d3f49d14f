"""What the supervisor (node_agent/supervisor.py) is asked to run and reports: load requests,
engines as reported up the stream, their events, and how engines are reached."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from mlxfleet.engines import EngineState, EventKind, ExitReason
from mlxfleet.kv import DEFAULT_KV_GROUP_SIZE, DEFAULT_PREFIX_CACHE_MIB, UNQUANTIZED_KV_BITS
from mlxfleet.manifest import Manifest
from node_agent.peer_copy import Holder

if TYPE_CHECKING:
    from node_agent.groups import GroupRole


@dataclass(frozen=True, slots=True)
class EngineTls:
    """The node certificate an engine serves when the gateway is on another host."""

    cert_path: Path
    key_path: Path
    fleet_ca_pem: bytes
    node_id: str  # the certificate's name, which the gateway (and our health poll) checks


@dataclass(frozen=True, slots=True)
class EngineNetwork:
    """Where engines listen and how the gateway reaches them."""

    bind_host: str = "127.0.0.1"  # loopback when the coordinator is on this host
    url_host: str = "127.0.0.1"  # the address the gateway dials
    tls: EngineTls | None = None

    def url(self, port: int) -> str:
        return f"{'https' if self.tls else 'http'}://{self.url_host}:{port}"


@dataclass(frozen=True, slots=True)
class LoadRequest:
    """What the coordinator asked this node to run."""

    engine_id: str
    model: str
    source: str
    tier: str
    context_length: int
    knobs: dict[str, int] = field(default_factory=dict)  # tier knobs; empty: engine defaults
    kv_bits: int = UNQUANTIZED_KV_BITS  # 8 or 4: quantized (the engine runs one request at a time)
    kv_group_size: int = DEFAULT_KV_GROUP_SIZE
    prefix_cache_mib: int = DEFAULT_PREFIX_CACHE_MIB  # the budget placement counted; 0: none
    manifest: Manifest | None = None  # the model's files as the fleet knows them
    holders: tuple[Holder, ...] = ()  # the nodes to copy them from, best first
    group: GroupRole | None = None  # one rank of a model spread over nodes (node_agent/groups.py)


@dataclass(frozen=True, slots=True)
class EngineInfo:
    """An engine as reported up the stream; `secret` goes only in Hello and READY."""

    engine_id: str
    model: str
    tier: str
    state: EngineState
    url: str = ""
    secret: str = ""
    context_length: int = 0
    pid: int = 0
    group_id: str = ""  # one rank of this group ("": a whole model)
    rank: int = 0
    group_split: tuple[int, ...] = ()  # the group as told: layers and nodes by rank
    group_nodes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class EngineEvent:
    kind: EventKind
    engine: EngineInfo
    exit_reason: ExitReason | None = None
    exit_code: int = 0
    signal: int = 0
    detail: str = ""

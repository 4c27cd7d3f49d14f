"""What a node is, as both sides see it: the machine facts a probe reads once at agent start,
plus what the agent's config and installed versions add (all sent up in Hello)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

Role = Literal["laptop", "server"]
MemoryPressure = Literal["normal", "warning", "critical", "unknown"]
# The macOS ProcessInfo.ThermalState scale; Linux maps thermal zones onto it.
ThermalState = Literal["nominal", "fair", "serious", "critical", "unknown"]
PowerSource = Literal["ac", "battery", "unknown"]


@dataclass(frozen=True, slots=True)
class NodeFacts:
    """What a machine is: read once by the agent's probe; versions and config added in Hello."""

    hostname: str
    chip: str
    os: str
    ram_bytes: int
    performance_cores: int
    gpu_cores: int  # 0 = unknown
    memory_bandwidth_gbps: float  # 0.0 = unknown
    gpu_wired_limit_bytes: int  # 0 = no separate GPU limit (Linux)
    role: Role
    mlx_version: str = ""
    mlx_lm_version: str = ""
    agent_version: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    serve_interactive: bool = False  # a laptop that opted in to interactive replicas
    os_reserve_bytes: int = 0  # the node's own reserve; 0 = the fleet default

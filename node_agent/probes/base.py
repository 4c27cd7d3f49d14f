"""What a probe reports about its machine: facts once, readings every heartbeat."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from mlxfleet.facts import MemoryPressure, NodeFacts, PowerSource, ThermalState


@dataclass(frozen=True, slots=True)
class NodeReading:
    """The machine's state now; read every heartbeat."""

    available_bytes: int
    swap_used_bytes: int
    wired_bytes: int  # memory the kernel cannot page out (macOS wired; Linux Unevictable)
    compressed_bytes: int  # memory holding compressed pages (macOS compressor; Linux zswap)
    memory_pressure: MemoryPressure
    thermal_state: ThermalState
    power_source: PowerSource
    low_power_mode: bool
    # Total kernel out-of-memory kills seen so far in the agent's cgroup tree; the
    # supervisor compares it before and after an engine's SIGKILL.
    oom_kills: int


class Probe(Protocol):
    """Reads one operating system. Implementations live in probes/<os>.py."""

    def facts(self) -> NodeFacts: ...

    def reading(self) -> NodeReading: ...

    def oom_kills(self, cgroup_path: str | None = None) -> int:
        """Kernel OOM kills recorded for that cgroup (or the whole machine when None)."""
        ...

    def memory_kill(self, pid: int) -> str | None:
        """Why the kernel killed this (SIGKILLed) process for memory, if a log says so
        (macOS jetsam); None where kill counters answer instead (Linux)."""
        ...

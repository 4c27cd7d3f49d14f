"""The Linux probe: reads /proc, /sys and the cgroup tree; roots are injectable for tests."""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import socket
from pathlib import Path

from mlxfleet.facts import MemoryPressure, NodeFacts, PowerSource, Role, ThermalState
from node_agent.probes.base import NodeReading

logger = logging.getLogger(__name__)

KIB_BYTES = 1024

# PSI (/proc/pressure/memory): share of the last 10 s that tasks stalled waiting for memory.
# "some" >= 10 %: at least one task lost a tenth of its time to reclaim, latency suffers;
# "full" >= 10 %: every runnable task stalled together a tenth of the time, i.e. thrashing.
PSI_SOME_AVG10_WARNING_PCT = 10.0
PSI_FULL_AVG10_CRITICAL_PCT = 10.0

# Thermal zone trip types, mapped onto the macOS scale: passive = the kernel starts
# throttling, hot = the platform's own alarm, critical = the kernel shuts down at this point.
TRIP_STATES: dict[str, ThermalState] = {"passive": "fair", "hot": "serious", "critical": "critical"}
THERMAL_ORDER: tuple[ThermalState, ...] = ("unknown", "nominal", "fair", "serious", "critical")


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def parse_keyed(text: str) -> dict[str, int]:
    """Integer values of "Key: 123 kB" or "key 123" lines (meminfo, vmstat, memory.events)."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.replace(":", " ").split()
        if len(parts) >= 2 and parts[1].isdigit():
            values[parts[0]] = int(parts[1])
    return values


def parse_psi(text: str) -> MemoryPressure:
    """Memory pressure from /proc/pressure/memory."""
    avg10: dict[str, float] = {}
    for line in text.splitlines():
        kind, _, fields = line.partition(" ")
        for field in fields.split():
            key, _, value = field.partition("=")
            if key == "avg10":
                with contextlib.suppress(ValueError):  # a bad field leaves that line out
                    avg10[kind] = float(value)
    if "some" not in avg10:
        logger.warning("no PSI some avg10 in %r", text[:200])
        return "unknown"
    if avg10.get("full", 0.0) >= PSI_FULL_AVG10_CRITICAL_PCT:
        return "critical"
    if avg10["some"] >= PSI_SOME_AVG10_WARNING_PCT:
        return "warning"
    return "normal"


def zone_state(zone: Path) -> ThermalState:
    """One thermal zone's state: the highest passive/hot/critical trip its temperature reached."""
    temp_text = _read(zone / "temp")
    try:
        temp = int(temp_text.strip()) if temp_text else None
    except ValueError:
        temp = None
    if temp is None:
        return "unknown"
    state: ThermalState = "nominal"
    for trip_type_path in zone.glob("trip_point_*_type"):
        trip_state = TRIP_STATES.get((_read(trip_type_path) or "").strip())
        trip_text = _read(zone / trip_type_path.name.replace("_type", "_temp"))
        if trip_state is None or trip_text is None:
            continue  # "active" trips start fans; they say nothing about throttling.
        try:
            trip = int(trip_text.strip())
        except ValueError:
            continue
        if temp >= trip and THERMAL_ORDER.index(trip_state) > THERMAL_ORDER.index(state):
            state = trip_state
    return state


class LinuxProbe:
    """Reads a Linux machine; pass other roots to read a prepared tree instead."""

    def __init__(
        self,
        proc_root: str = "/proc",
        sys_root: str = "/sys",
        cgroup_root: str = "/sys/fs/cgroup",
        cgroup_path: str | None = None,
    ) -> None:
        self._proc = Path(proc_root)
        self._sys = Path(sys_root)
        self._cgroup = Path(cgroup_root)
        # The agent's cgroup, whose OOM kills reading() reports; None = the whole machine.
        self._cgroup_path = cgroup_path

    def facts(self) -> NodeFacts:
        """What this machine is."""
        meminfo = parse_keyed(_read(self._proc / "meminfo") or "")
        return NodeFacts(
            hostname=socket.gethostname(),
            chip=self._cpu_model(),
            os=f"Linux {platform.release()}",
            ram_bytes=meminfo.get("MemTotal", 0) * KIB_BYTES,
            performance_cores=os.cpu_count() or 0,
            gpu_cores=0,
            memory_bandwidth_gbps=0.0,
            gpu_wired_limit_bytes=0,
            role=self._role(),
        )

    def reading(self) -> NodeReading:
        """This machine's state now."""
        meminfo = parse_keyed(_read(self._proc / "meminfo") or "")
        if "MemAvailable" not in meminfo:
            logger.warning("no MemAvailable in %s", self._proc / "meminfo")
        swap_used = meminfo.get("SwapTotal", 0) - meminfo.get("SwapFree", 0)
        psi = _read(self._proc / "pressure" / "memory")
        return NodeReading(
            available_bytes=meminfo.get("MemAvailable", 0) * KIB_BYTES,
            swap_used_bytes=max(swap_used, 0) * KIB_BYTES,
            wired_bytes=meminfo.get("Unevictable", 0) * KIB_BYTES,
            compressed_bytes=meminfo.get("Zswap", 0) * KIB_BYTES,  # no line without zswap
            memory_pressure=parse_psi(psi) if psi is not None else "unknown",
            thermal_state=self._thermal_state(),
            power_source=self._power_source(),
            low_power_mode=False,
            oom_kills=self.oom_kills(self._cgroup_path),
        )

    def memory_kill(self, pid: int) -> str | None:
        """None: on Linux the OOM-kill counters (oom_kills) tell."""
        return None

    def oom_kills(self, cgroup_path: str | None = None) -> int:
        """Kernel OOM kills in that cgroup and its children, or on the whole machine when None."""
        if cgroup_path is None:
            return self._machine_oom_kills()
        directory = self._cgroup_dir(cgroup_path)
        if directory is None:
            logger.warning("no memory cgroup %r under %s", cgroup_path, self._cgroup)
            return 0
        events = _read(directory / "memory.events")
        if events is not None:
            # cgroup v2 counts descendants' kills too (memory.events.local would not).
            return parse_keyed(events).get("oom_kill", 0)
        # cgroup v1 counts only the cgroup's own kills, so add up the subtree to match v2.
        total = 0
        for control in directory.rglob("memory.oom_control"):
            total += parse_keyed(_read(control) or "").get("oom_kill", 0)
        return total

    def _machine_oom_kills(self) -> int:
        # /proc/vmstat counts every kernel OOM kill, global or cgroup-limited. The cgroup
        # roots are no substitute: v2's root has no memory.events and v1's root oom_control
        # counts only processes living directly in the root cgroup.
        vmstat = parse_keyed(_read(self._proc / "vmstat") or "")
        if "oom_kill" in vmstat:
            return vmstat["oom_kill"]
        logger.warning("no oom_kill in %s (kernel older than 4.13?)", self._proc / "vmstat")
        return 0

    def _cgroup_dir(self, cgroup_path: str) -> Path | None:
        given = Path(cgroup_path)
        relative = cgroup_path.lstrip("/")
        # A full directory path, then the path inside v1's memory hierarchy, v2's unified
        # mount, or the unified half of a hybrid (v1 + v2) layout.
        candidates = [given] if given.is_absolute() else []
        candidates += [
            self._cgroup / "memory" / relative,
            self._cgroup / relative,
            self._cgroup / "unified" / relative,
        ]
        for directory in candidates:
            if (directory / "memory.events").is_file() or (
                directory / "memory.oom_control"
            ).is_file():
                return directory
        return None

    def _cpu_model(self) -> str:
        for line in (_read(self._proc / "cpuinfo") or "").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
        return platform.machine() or "unknown"  # ARM cpuinfo has no "model name".

    def _supplies(self) -> list[Path]:
        return sorted((self._sys / "class" / "power_supply").glob("*"))

    def _role(self) -> Role:
        for supply in self._supplies():
            if (_read(supply / "type") or "").strip() == "Battery":
                return "laptop"
        return "server"

    def _power_source(self) -> PowerSource:
        mains_online = False
        battery_seen = False
        for supply in self._supplies():
            kind = (_read(supply / "type") or "").strip()
            if kind == "Battery":
                battery_seen = True
                if (_read(supply / "status") or "").strip() == "Discharging":
                    return "battery"
            elif (_read(supply / "online") or "").strip() == "1":
                mains_online = True  # Mains, USB and wireless chargers all report online.
        # A battery that is not discharging is being held up by external power.
        if mains_online or battery_seen:
            return "ac"
        # A server with no supply entries is probably on mains, but that is a guess.
        return "unknown"

    def _thermal_state(self) -> ThermalState:
        zones = sorted((self._sys / "class" / "thermal").glob("thermal_zone*"))
        states = [zone_state(zone) for zone in zones]
        return max(states, key=THERMAL_ORDER.index, default="unknown")

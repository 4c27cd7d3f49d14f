"""The macOS probe: small pure parsers over command output, and a thin command runner."""

from __future__ import annotations

import logging
import re
import socket
import subprocess
from collections.abc import Callable

from mlxfleet.facts import MemoryPressure, NodeFacts, PowerSource, Role, ThermalState
from node_agent.probes.base import NodeReading

logger = logging.getLogger(__name__)

Runner = Callable[[list[str]], str]

COMMAND_TIMEOUT_S = 2.0
MIB_BYTES = 1024 * 1024
GIB_BYTES = 1024 * MIB_BYTES

# iogpu.wired_limit_mb = 0 means "macOS default": about 2/3 of RAM on Macs with up to 36 GB,
# 3/4 on larger ones (DESIGN.md, "GPU wired limit", from seed 002 §1). Apple does not publish
# the rule and it has moved between releases, so these are placement estimates, not readings.
DEFAULT_WIRED_FRACTION_SMALL = 2 / 3
DEFAULT_WIRED_FRACTION_LARGE = 3 / 4
DEFAULT_WIRED_SMALL_MAX_BYTES = 36 * GIB_BYTES

# kern.memorystatus_vm_pressure_level: the kernel's own levels (what Activity Monitor colours).
PRESSURE_LEVELS: dict[int, MemoryPressure] = {1: "normal", 2: "warning", 4: "critical"}

# `pmset -g therm` CPU_Speed_Limit is the % of full clock macOS currently allows. Our cut-offs:
# any cap is "fair"; below 80 % the machine is visibly slower ("serious", shed batch work);
# below 50 % it is crawling ("critical", drain). Apple silicon usually prints no limit at all.
SPEED_LIMIT_FULL_PCT = 100
SPEED_LIMIT_SERIOUS_BELOW_PCT = 80
SPEED_LIMIT_CRITICAL_BELOW_PCT = 50

# Memory bandwidth by chip, GB/s, from seed 002 §10 ("Memory bandwidth per chip").
BANDWIDTH_GBPS: dict[str, float] = {
    "Apple M1": 68.0,
    "Apple M2": 100.0,
    "Apple M3": 100.0,
    "Apple M4": 120.0,
    "Apple M5": 150.0,
    "Apple M1 Pro": 200.0,
    "Apple M2 Pro": 200.0,
    "Apple M3 Pro": 150.0,
    "Apple M4 Pro": 273.0,
    "Apple M1 Max": 400.0,
    "Apple M2 Max": 400.0,
    "Apple M1 Ultra": 800.0,
    "Apple M2 Ultra": 800.0,
    "Apple M3 Ultra": 800.0,
}
# M3/M4 Max come binned (14-core CPU, 10 P-cores) or full (16-core, 12 P-cores) with
# different bandwidth; the P-core count tells them apart.
MAX_BANDWIDTH_BY_P_CORES_GBPS: dict[str, dict[int, float]] = {
    "Apple M3 Max": {10: 300.0, 12: 400.0},
    "Apple M4 Max": {10: 410.0, 12: 546.0},
}


# XNU's jetsam kill lines (kern_memorystatus.c): "memorystatus: killing_specific_process pid 994
# [KeyboardSpike] (per-process-limit 100 12s ...)", also killing_top_process(_elevated...).
JETSAM_KILL_RE = re.compile(
    r"memorystatus: killing_(?:specific|top)_process\w* pid (\d+) \[([^\]]*)\] \(([^\s),]+)"
)
# Jetsam kills in the unified log over the last minutes; run right after an engine's SIGKILL.
JETSAM_LOG_CMD = [
    "log",
    "show",
    "--last",
    "5m",
    "--style",
    "compact",
    "--predicate",
    'eventMessage CONTAINS "memorystatus: killing_"',
]


def parse_jetsam_kills(text: str) -> dict[int, str]:
    """pid -> jetsam cause ("per-process-limit", "vm-pageshortage", ...) from kernel log lines."""
    return {int(m.group(1)): m.group(3) for m in JETSAM_KILL_RE.finditer(text)}


def run(cmd: list[str]) -> str:
    """Run one command and return its stdout, or "" when it fails or hangs."""
    try:
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        logger.warning("probe command %s failed: %s", cmd, exc)
        return ""
    if done.returncode != 0:
        logger.warning("probe command %s exited %d: %s", cmd, done.returncode, done.stderr.strip())
        return ""
    return done.stdout


def sysctl_value(text: str, name: str) -> str | None:
    """The value in `sysctl -n NAME` ("8") or `sysctl NAME` ("NAME: 8") output."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    for line in lines:
        if line.startswith(name + ":"):
            return line[len(name) + 1 :].strip()
    # `-n` prints the bare value; a lone line that names another key is not ours.
    if len(lines) == 1 and not re.match(r"^[\w.]+:\s", lines[0]):
        return lines[0]
    logger.warning("no %s in sysctl output %r", name, text[:200])
    return None


def _sysctl_int(text: str, name: str) -> int | None:
    value = sysctl_value(text, name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        logger.warning("sysctl %s is not an integer: %r", name, value)
        return None


def parse_memsize(text: str) -> int:
    """Bytes of RAM from `sysctl -n hw.memsize`; 0 when unreadable."""
    value = _sysctl_int(text, "hw.memsize")
    return value if value and value > 0 else 0


def parse_perf_cores(text: str) -> int:
    """Performance-core count from `sysctl -n hw.perflevel0.physicalcpu`; 0 when unreadable."""
    value = _sysctl_int(text, "hw.perflevel0.physicalcpu")
    return value if value and value > 0 else 0


def parse_brand_string(text: str) -> str:
    """The chip name from `sysctl -n machdep.cpu.brand_string`; "" when unreadable."""
    return sysctl_value(text, "machdep.cpu.brand_string") or ""


def parse_pressure_level(text: str) -> MemoryPressure:
    """Memory pressure from `sysctl -n kern.memorystatus_vm_pressure_level`."""
    level = _sysctl_int(text, "kern.memorystatus_vm_pressure_level")
    if level is None:
        return "unknown"
    if level not in PRESSURE_LEVELS:
        logger.warning("unexpected memory pressure level %d", level)
        return "unknown"
    return PRESSURE_LEVELS[level]


def parse_wired_limit_mb(text: str) -> int | None:
    """`sysctl -n iogpu.wired_limit_mb`: MiB, 0 = macOS default, None when unreadable."""
    value = _sysctl_int(text, "iogpu.wired_limit_mb")
    return value if value is not None and value >= 0 else None


def wired_limit_bytes(limit_mb: int | None, ram_bytes: int) -> int:
    """The GPU wired limit: the sysctl when set, else macOS's default share of RAM."""
    if limit_mb:
        return limit_mb * MIB_BYTES
    if ram_bytes <= DEFAULT_WIRED_SMALL_MAX_BYTES:
        return int(ram_bytes * DEFAULT_WIRED_FRACTION_SMALL)
    return int(ram_bytes * DEFAULT_WIRED_FRACTION_LARGE)


_SIZE_UNITS = {"K": 1024, "M": MIB_BYTES, "G": GIB_BYTES}


def parse_swap_used(text: str) -> int | None:
    """Bytes of swap in use from `sysctl vm.swapusage`; None when unreadable."""
    # Some locales print a decimal comma ("used = 379,25M").
    match = re.search(r"used = ([\d.,]+)([KMG])", text)
    if match is None:
        logger.warning("no swap usage in %r", text[:200])
        return None
    number = float(match.group(1).replace(",", "."))
    return int(round(number * _SIZE_UNITS[match.group(2)]))


def parse_memory_pressure(text: str) -> tuple[int, int] | None:
    """(free percentage, total bytes or 0) from the `memory_pressure` command."""
    pct = re.search(r"System-wide memory free percentage:\s*(\d+)%", text)
    if pct is None or not 0 <= int(pct.group(1)) <= 100:
        logger.warning("no free percentage in memory_pressure output %r", text[:200])
        return None
    total = re.search(r"The system has (\d+)", text)
    return int(pct.group(1)), int(total.group(1)) if total else 0


# The page counts `memory_pressure` prints (the same counters as vm_stat, which calls the
# compressor's "Pages occupied by compressor").
PAGE_SIZE_RE = re.compile(r"page size of (\d+)")
WIRED_PAGES_RE = re.compile(r"^Pages wired down:\s*(\d+)", re.MULTILINE)
COMPRESSOR_PAGES_RE = re.compile(r"^Pages (?:used|occupied) by compressor:\s*(\d+)", re.MULTILINE)


def parse_wired_compressed(text: str) -> tuple[int, int]:
    """(wired bytes, compressor bytes) from `memory_pressure` (or vm_stat); 0 when absent."""
    page = PAGE_SIZE_RE.search(text)
    if page is None:
        return 0, 0
    page_bytes = int(page.group(1))
    wired = WIRED_PAGES_RE.search(text)
    compressed = COMPRESSOR_PAGES_RE.search(text)
    return (
        int(wired.group(1)) * page_bytes if wired else 0,
        int(compressed.group(1)) * page_bytes if compressed else 0,
    )


def available_bytes(free_pct: int, ram_bytes: int) -> int:
    """Memory a new model could take without pushing the machine into pressure."""
    # The free percentage is the kernel's own count of memory it can hand out without
    # pressure (free plus reclaimable pages); "Pages free" alone stays near zero by design.
    return ram_bytes * free_pct // 100


def parse_therm(text: str) -> ThermalState:
    """Thermal state from `pmset -g therm`."""
    speed = re.search(r"CPU_Speed_Limit\s*=\s*(\d+)", text)
    if speed is not None:
        limit = int(speed.group(1))
        if limit >= SPEED_LIMIT_FULL_PCT:
            state: ThermalState = "nominal"
        elif limit >= SPEED_LIMIT_SERIOUS_BELOW_PCT:
            state = "fair"
        elif limit >= SPEED_LIMIT_CRITICAL_BELOW_PCT:
            state = "serious"
        else:
            state = "critical"
    elif "warning level" in text or "CPU power status" in text:
        state = "nominal"
    else:
        logger.warning("unrecognised pmset -g therm output %r", text[:200])
        return "unknown"
    # A recorded warning level without the "No" prefix: we have no captured sample of its
    # wording, so only raise a nominal reading to "fair" rather than guess its scale.
    warned = re.search(r"^(?!.*\bNo\b).*warning level", text, re.MULTILINE | re.IGNORECASE)
    if warned and state == "nominal":
        logger.warning("pmset reports a warning level: %r", warned.group(0))
        return "fair"
    return state


def parse_batt(text: str) -> tuple[PowerSource, bool]:
    """(power source, has an internal battery) from `pmset -g batt`."""
    source = re.search(r"Now drawing from '([^']+)'", text)
    has_battery = "InternalBattery" in text
    if source is None:
        logger.warning("no power source in pmset -g batt output %r", text[:200])
        return "unknown", has_battery
    name = source.group(1)
    if name == "AC Power":
        return "ac", has_battery
    if name in ("Battery Power", "UPS Power"):
        return "battery", has_battery
    logger.warning("unknown power source %r", name)
    return "unknown", has_battery


def parse_low_power_mode(text: str) -> bool:
    """Whether Low Power Mode is on, from `pmset -g` ("lowpowermode" or newer "powermode")."""
    # powermode: 0 automatic, 1 low power, 2 high power.
    match = re.search(r"^\s*(?:low)?powermode\s+(\d+)", text, re.MULTILINE)
    return match is not None and match.group(1) == "1"


def parse_sw_vers(text: str) -> str:
    """The macOS version from `sw_vers`; "" when unreadable."""
    match = re.search(r"ProductVersion:\s*([\d.]+)", text)
    return match.group(1) if match else ""


def bandwidth_gbps(chip: str, performance_cores: int) -> float:
    """Memory bandwidth for a chip from seed 002's table; 0.0 when unknown."""
    if chip in MAX_BANDWIDTH_BY_P_CORES_GBPS:
        return MAX_BANDWIDTH_BY_P_CORES_GBPS[chip].get(performance_cores, 0.0)
    return BANDWIDTH_GBPS.get(chip, 0.0)


class MacProbe:
    """Reads a Mac through sysctl, memory_pressure and pmset; `runner` is swappable for tests."""

    def __init__(self, runner: Runner = run) -> None:
        self._run = runner
        self._ram_bytes = 0

    def facts(self) -> NodeFacts:
        """What this Mac is."""
        ram = self._ram()
        chip = parse_brand_string(self._run(["sysctl", "-n", "machdep.cpu.brand_string"]))
        p_cores = parse_perf_cores(self._run(["sysctl", "-n", "hw.perflevel0.physicalcpu"]))
        limit_mb = parse_wired_limit_mb(self._run(["sysctl", "-n", "iogpu.wired_limit_mb"]))
        _, has_battery = parse_batt(self._run(["pmset", "-g", "batt"]))
        version = parse_sw_vers(self._run(["sw_vers"]))
        role: Role = "laptop" if has_battery else "server"
        return NodeFacts(
            hostname=socket.gethostname(),
            chip=chip or "unknown",
            os=f"macOS {version}" if version else "macOS",
            ram_bytes=ram,
            performance_cores=p_cores,
            # GPU cores would come from system_profiler, too slow for a 2 s budget and
            # without a captured sample yet: 0 = unknown.
            gpu_cores=0,
            memory_bandwidth_gbps=bandwidth_gbps(chip, p_cores),
            gpu_wired_limit_bytes=wired_limit_bytes(limit_mb, ram) if ram else 0,
            role=role,
        )

    def reading(self) -> NodeReading:
        """This Mac's state now."""
        ram = self._ram()
        pressure_text = self._run(["memory_pressure"])
        parsed = parse_memory_pressure(pressure_text)
        wired, compressed = parse_wired_compressed(pressure_text)
        available = 0
        if parsed is not None:
            free_pct, total = parsed
            available = available_bytes(free_pct, ram or total)
        swap = parse_swap_used(self._run(["sysctl", "vm.swapusage"]))
        power, _ = parse_batt(self._run(["pmset", "-g", "batt"]))
        return NodeReading(
            available_bytes=available,
            swap_used_bytes=swap or 0,
            wired_bytes=wired,
            compressed_bytes=compressed,
            memory_pressure=parse_pressure_level(
                self._run(["sysctl", "-n", "kern.memorystatus_vm_pressure_level"])
            ),
            thermal_state=parse_therm(self._run(["pmset", "-g", "therm"])),
            power_source=power,
            low_power_mode=parse_low_power_mode(self._run(["pmset", "-g"])),
            oom_kills=self.oom_kills(),
        )

    def oom_kills(self, cgroup_path: str | None = None) -> int:
        """Always 0: macOS has no kill counter; see memory_kill for jetsam."""
        return 0

    def memory_kill(self, pid: int) -> str | None:
        """The jetsam cause if the kernel killed `pid` for memory (the unified log says so)."""
        return parse_jetsam_kills(self._run(JETSAM_LOG_CMD)).get(pid)

    def _ram(self) -> int:
        # RAM does not change while the agent runs; ask once.
        if not self._ram_bytes:
            self._ram_bytes = parse_memsize(self._run(["sysctl", "-n", "hw.memsize"]))
        return self._ram_bytes

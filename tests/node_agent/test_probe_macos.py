"""MacProbe against real captured macOS outputs (tests/fixtures/macos, sources in SOURCES.md)."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import pytest

from mlxfleet.facts import NodeFacts
from node_agent.probes import macos
from node_agent.probes.base import NodeReading
from node_agent.probes.macos import MacProbe

FIXTURES = Path(__file__).parents[1] / "fixtures" / "macos"
MIB = 1024 * 1024
GIB = 1024 * MIB
# What the probe reads when no command answers; the other readings differ from it as stated.
NOTHING_READ = NodeReading(
    available_bytes=0,
    swap_used_bytes=0,
    wired_bytes=0,
    compressed_bytes=0,
    memory_pressure="unknown",
    thermal_state="unknown",
    power_source="unknown",
    low_power_mode=False,
    oom_kills=0,
)


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


def fake_runner(outputs: dict[tuple[str, ...], str]) -> macos.Runner:
    """A runner that answers each command with a fixture file; unknown commands fail ("")."""

    def runner(cmd: list[str]) -> str:
        name = outputs.get(tuple(cmd))
        return fixture(name) if name else ""

    return runner


def test_every_fixture_has_a_source_line():
    sources = fixture("SOURCES.md")
    for path in FIXTURES.glob("*.txt"):
        assert f"`{path.name}`" in sources


@pytest.mark.parametrize(
    ("name", "used_bytes"),
    [
        ("sysctl-vm.swapusage-px80.txt", round(2743.50 * MIB)),
        ("sysctl-vm.swapusage-memo.txt", round(1462.50 * MIB)),
        ("sysctl-vm.swapusage-comma.txt", round(379.25 * MIB)),
        ("sysctl-vm.swapusage-lab4.txt", 2825062973),
    ],
)
def test_parse_swap_used(name, used_bytes):
    assert macos.parse_swap_used(fixture(name)) == used_bytes


def test_parse_memsize_bare_and_named():
    assert macos.parse_memsize(fixture("sysctl-hw.memsize-lab4.txt")) == 24 * GIB
    assert macos.parse_memsize(fixture("sysctl-hw.memsize-m2pro-mini.txt")) == 32 * GIB


def test_parse_pressure_level():
    normal = fixture("sysctl-kern.memorystatus_vm_pressure_level-normal.txt")
    critical = fixture("sysctl-kern.memorystatus_vm_pressure_level-critical.txt")
    assert macos.parse_pressure_level(normal) == "normal"
    assert macos.parse_pressure_level(critical) == "critical"


def test_parse_perf_cores():
    assert macos.parse_perf_cores(fixture("sysctl-hw.perflevel0.physicalcpu-m1pro.txt")) == 8


@pytest.mark.parametrize(
    ("name", "chip"),
    [
        ("sysctl-machdep.cpu.brand_string-m1pro.txt", "Apple M1 Pro"),
        ("sysctl-machdep.cpu.brand_string-m1.txt", "Apple M1"),
        ("sysctl-machdep.cpu.brand_string-intel.txt", "Intel(R) Core(TM) i7-3820QM CPU @ 2.70GHz"),
    ],
)
def test_parse_brand_string(name, chip):
    assert macos.parse_brand_string(fixture(name)) == chip


def test_wired_limit_default_is_a_share_of_ram():
    limit_mb = macos.parse_wired_limit_mb(fixture("sysctl-iogpu.wired_limit_mb-default.txt"))
    assert limit_mb == 0
    # 0 = macOS default: 2/3 up to 36 GB, 3/4 above (seed 002 §1).
    assert macos.wired_limit_bytes(limit_mb, 32 * GIB) == int(32 * GIB * 2 / 3)
    assert macos.wired_limit_bytes(limit_mb, 36 * GIB) == 24 * GIB
    assert macos.wired_limit_bytes(limit_mb, 64 * GIB) == 48 * GIB
    assert macos.wired_limit_bytes(26000, 32 * GIB) == 26000 * MIB


def test_parse_memory_pressure_full_and_summary():
    assert macos.parse_memory_pressure(fixture("memory_pressure-mini2.txt")) == (86, 32 * GIB)
    assert macos.parse_memory_pressure(fixture("memory_pressure-q-lab4.txt")) == (80, 24 * GIB)
    assert macos.available_bytes(86, 32 * GIB) == 29549374996


def test_parse_wired_and_compressed_pages():
    # mini2: "Pages wired down: 127722", "Pages used by compressor: 153447", 16 KiB pages.
    full = fixture("memory_pressure-mini2.txt")
    assert macos.parse_wired_compressed(full) == (2092597248, 2514075648)
    assert macos.parse_wired_compressed(full) == (127722 * 16384, 153447 * 16384)
    # vm_stat names the compressor's pages differently; the counter is the same.
    vm_stat = full.replace("Pages used by compressor", "Pages occupied by compressor")
    assert macos.parse_wired_compressed(vm_stat)[1] == 153447 * 16384
    # `memory_pressure -Q` prints no page counts.
    assert macos.parse_wired_compressed(fixture("memory_pressure-q-lab4.txt")) == (0, 0)


def test_parse_therm():
    assert macos.parse_therm(fixture("pmset-therm-no-warning.txt")) == "nominal"
    # CPU_Speed_Limit = 35: below the 50 % critical line.
    assert macos.parse_therm(fixture("pmset-therm-speed-limit.txt")) == "critical"


@pytest.mark.parametrize(
    ("limit", "state"),
    [
        (100, "nominal"),
        (99, "fair"),
        (80, "fair"),
        (79, "serious"),
        (50, "serious"),
        (49, "critical"),
    ],
)
def test_therm_speed_limit_thresholds(limit, state):
    # Synthetic: only the number in a real line's shape changes, to pin each threshold.
    text = fixture("pmset-therm-speed-limit.txt").replace("= 35", f"= {limit}")
    assert macos.parse_therm(text) == state


@pytest.mark.parametrize(
    ("name", "source", "has_battery"),
    [
        ("pmset-batt-ac-charging.txt", "ac", True),
        ("pmset-batt-ac-attached.txt", "ac", True),
        ("pmset-batt-battery.txt", "battery", True),
        ("pmset-batt-desktop.txt", "ac", False),
    ],
)
def test_parse_batt(name, source, has_battery):
    assert macos.parse_batt(fixture(name)) == (source, has_battery)


def test_parse_low_power_mode_and_version():
    assert macos.parse_low_power_mode(fixture("pmset-g-aldente.txt")) is False
    assert macos.parse_sw_vers(fixture("sw_vers-sonoma.txt")) == "14.2.1"


def test_bandwidth_from_seed_table():
    assert macos.bandwidth_gbps("Apple M1 Pro", 8) == 200.0
    assert macos.bandwidth_gbps("Apple M3 Max", 10) == 300.0
    assert macos.bandwidth_gbps("Apple M4 Max", 12) == 546.0
    assert macos.bandwidth_gbps("Intel(R) Core(TM) i7-3820QM CPU @ 2.70GHz", 4) == 0.0


@pytest.mark.parametrize("bad", ["", "garbage\n", "sysctl: unknown oid 'x'\n", "\x00\xff"])
def test_bad_output_gives_unknown_and_logs(bad, caplog):
    with caplog.at_level(logging.WARNING, logger="node_agent.probes.macos"):
        assert macos.parse_memsize(bad) == 0
        assert macos.parse_perf_cores(bad) == 0
        assert macos.parse_brand_string(bad) in ("", bad.strip())
        assert macos.parse_pressure_level(bad) == "unknown"
        assert macos.parse_swap_used(bad) is None
        assert macos.parse_memory_pressure(bad) is None
        assert macos.parse_therm(bad) == "unknown"
        assert macos.parse_batt(bad) == ("unknown", False)
        assert macos.parse_low_power_mode(bad) is False
    assert caplog.records


def test_run_returns_empty_for_a_missing_command(caplog):
    with caplog.at_level(logging.WARNING, logger="node_agent.probes.macos"):
        assert macos.run(["/nonexistent/sysctl", "-n", "hw.memsize"]) == ""
    assert "failed" in caplog.text


LAPTOP = {
    ("sysctl", "-n", "hw.memsize"): "sysctl-hw.memsize-lab4.txt",
    ("sysctl", "-n", "machdep.cpu.brand_string"): "sysctl-machdep.cpu.brand_string-m1pro.txt",
    ("sysctl", "-n", "hw.perflevel0.physicalcpu"): "sysctl-hw.perflevel0.physicalcpu-m1pro.txt",
    ("sysctl", "-n", "iogpu.wired_limit_mb"): "sysctl-iogpu.wired_limit_mb-default.txt",
    ("sysctl", "-n", "kern.memorystatus_vm_pressure_level"): (
        "sysctl-kern.memorystatus_vm_pressure_level-normal.txt"
    ),
    ("sysctl", "vm.swapusage"): "sysctl-vm.swapusage-lab4.txt",
    ("memory_pressure",): "memory_pressure-q-lab4.txt",
    ("pmset", "-g", "batt"): "pmset-batt-battery.txt",
    ("pmset", "-g", "therm"): "pmset-therm-no-warning.txt",
    ("pmset", "-g"): "pmset-g-aldente.txt",
    ("sw_vers",): "sw_vers-sonoma.txt",
}


def test_mac_probe_laptop_end_to_end(monkeypatch):
    monkeypatch.setattr(macos.socket, "gethostname", lambda: "mbp")
    probe = MacProbe(runner=fake_runner(LAPTOP))
    assert probe.facts() == NodeFacts(
        hostname="mbp",
        chip="Apple M1 Pro",
        os="macOS 14.2.1",
        ram_bytes=24 * GIB,
        performance_cores=8,
        gpu_cores=0,
        memory_bandwidth_gbps=200.0,
        gpu_wired_limit_bytes=16 * GIB,
        role="laptop",
    )
    assert probe.reading() == replace(
        NOTHING_READ,  # wired and compressed stay 0: the -Q summary has no page counts
        available_bytes=20615843020,
        swap_used_bytes=2825062973,
        memory_pressure="normal",
        thermal_state="nominal",
        power_source="battery",
    )


def test_mac_probe_desktop_with_failed_commands(monkeypatch, caplog):
    """A Mac mini on mains, throttled; perflevel and pressure level fail to answer."""
    monkeypatch.setattr(macos.socket, "gethostname", lambda: "mini")
    outputs = {
        ("sysctl", "-n", "hw.memsize"): "sysctl-hw.memsize-m2pro-mini.txt",
        ("sysctl", "-n", "machdep.cpu.brand_string"): "sysctl-machdep.cpu.brand_string-intel.txt",
        ("sysctl", "-n", "iogpu.wired_limit_mb"): "sysctl-iogpu.wired_limit_mb-default.txt",
        ("sysctl", "vm.swapusage"): "sysctl-vm.swapusage-memo.txt",
        ("memory_pressure",): "memory_pressure-mini2.txt",
        ("pmset", "-g", "batt"): "pmset-batt-desktop.txt",
        ("pmset", "-g", "therm"): "pmset-therm-speed-limit.txt",
    }
    probe = MacProbe(runner=fake_runner(outputs))
    with caplog.at_level(logging.WARNING, logger="node_agent.probes.macos"):
        facts = probe.facts()
        reading = probe.reading()
    assert facts.role == "server"
    assert facts.os == "macOS"
    assert facts.performance_cores == 0
    assert facts.memory_bandwidth_gbps == 0.0
    assert facts.gpu_wired_limit_bytes == 22906492245
    assert reading == replace(
        NOTHING_READ,  # memory pressure stays unknown: its sysctl failed
        available_bytes=29549374996,
        swap_used_bytes=round(1462.50 * MIB),
        wired_bytes=127722 * 16384,
        compressed_bytes=153447 * 16384,
        thermal_state="critical",
        power_source="ac",
    )
    assert "hw.perflevel0.physicalcpu" in caplog.text


def test_mac_probe_when_every_command_fails():
    probe = MacProbe(runner=lambda cmd: "")
    facts = probe.facts()
    reading = probe.reading()
    assert (facts.chip, facts.ram_bytes, facts.gpu_wired_limit_bytes) == ("unknown", 0, 0)
    assert reading == NOTHING_READ


@pytest.mark.parametrize(
    ("name", "kills"),
    [
        ("log-jetsam-per-process-limit-ios26.txt", {994: "per-process-limit"}),
        ("log-jetsam-per-process-limit-ios14.txt", {449: "per-process-limit"}),
        ("memory_pressure-mini2.txt", {}),  # no kill lines: nothing
    ],
)
def test_parse_jetsam_kills(name: str, kills: dict[int, str]) -> None:
    assert macos.parse_jetsam_kills(fixture(name)) == kills


def test_memory_kill_reads_the_unified_log_for_that_pid() -> None:
    log = fixture("log-jetsam-per-process-limit-ios26.txt")
    probe = macos.MacProbe(runner=lambda cmd: log if cmd == macos.JETSAM_LOG_CMD else "")
    assert probe.memory_kill(994) == "per-process-limit"
    assert probe.memory_kill(995) is None  # a SIGKILL with no jetsam line is not an OOM

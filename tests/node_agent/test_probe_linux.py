"""LinuxProbe against prepared /proc and /sys trees, and against this machine's own."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from node_agent.errors import UnsupportedPlatformError
from node_agent.probes import PROBES, local_probe
from node_agent.probes.linux import LinuxProbe, parse_psi
from node_agent.probes.macos import MacProbe

KIB = 1024

MEMINFO = """MemTotal:       24684084 kB
MemFree:         1000000 kB
MemAvailable:   12000000 kB
SwapCached:            0 kB
SwapTotal:       2097148 kB
SwapFree:        1048572 kB
Unevictable:        8192 kB
"""
PSI_CALM = """some avg10=0.00 avg60=0.00 avg300=0.00 total=0
full avg10=0.00 avg60=0.00 avg300=0.00 total=0
"""


V1_OOM_CONTROL = "oom_kill_disable 0\nunder_oom 0\noom_kill {kills}\n"
V2_MEMORY_EVENTS = "low 0\nhigh 0\nmax 4\noom 2\noom_kill 2\noom_group_kill 0\n"


def write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def zone(number: int, temp: int, trips: list[tuple[str, int]]) -> dict[str, str]:
    files = {f"sys/class/thermal/thermal_zone{number}/temp": f"{temp}\n"}
    for i, (kind, trip) in enumerate(trips):
        base = f"sys/class/thermal/thermal_zone{number}/trip_point_{i}"
        files[f"{base}_type"] = f"{kind}\n"
        files[f"{base}_temp"] = f"{trip}\n"
    return files


def probe_for(root: Path, **kwargs) -> LinuxProbe:
    return LinuxProbe(
        proc_root=str(root / "proc"),
        sys_root=str(root / "sys"),
        cgroup_root=str(root / "cgroup"),
        **kwargs,
    )


@pytest.fixture
def laptop(tmp_path: Path) -> Path:
    write(
        tmp_path,
        {
            "proc/meminfo": MEMINFO,
            "proc/cpuinfo": "processor\t: 0\nmodel name\t: AMD Ryzen 7 7840U\n",
            "proc/pressure/memory": PSI_CALM,
            "proc/vmstat": "nr_free_pages 1\noom_kill 3\n",
            "sys/class/power_supply/AC/type": "Mains\n",
            "sys/class/power_supply/AC/online": "0\n",
            "sys/class/power_supply/BAT0/type": "Battery\n",
            "sys/class/power_supply/BAT0/status": "Discharging\n",
            **zone(0, 45000, [("critical", 105000), ("passive", 95000)]),
            **zone(1, 72000, [("active", 60000), ("passive", 70000), ("hot", 90000)]),
        },
    )
    return tmp_path


def test_facts_from_a_laptop_tree(laptop):
    facts = probe_for(laptop).facts()
    assert facts.chip == "AMD Ryzen 7 7840U"
    assert facts.ram_bytes == 24684084 * KIB
    assert facts.os.startswith("Linux ")
    assert facts.performance_cores == os.cpu_count()
    assert (facts.gpu_cores, facts.memory_bandwidth_gbps, facts.gpu_wired_limit_bytes) == (
        0,
        0.0,
        0,
    )
    assert facts.role == "laptop"


def test_reading_from_a_laptop_tree(laptop):
    reading = probe_for(laptop).reading()
    assert reading.available_bytes == 12000000 * KIB
    assert reading.swap_used_bytes == (2097148 - 1048572) * KIB
    assert reading.wired_bytes == 8192 * KIB
    assert reading.compressed_bytes == 0  # no Zswap line: zswap is not built in
    assert reading.memory_pressure == "normal"
    # zone1 is past its passive trip (70 °C) but not its hot one; the active trip is ignored.
    assert reading.thermal_state == "fair"
    assert reading.power_source == "battery"
    assert reading.low_power_mode is False
    assert reading.oom_kills == 3


@pytest.mark.parametrize(
    ("temp", "state"),
    [(40000, "nominal"), (95000, "fair"), (100000, "serious"), (105000, "critical")],
)
def test_thermal_trip_points(tmp_path, temp, state):
    write(tmp_path, zone(0, temp, [("passive", 95000), ("hot", 100000), ("critical", 105000)]))
    assert probe_for(tmp_path).reading().thermal_state == state


def test_no_thermal_zones_or_supplies_or_psi_is_unknown(tmp_path):
    write(tmp_path, {"proc/meminfo": MEMINFO})
    reading = probe_for(tmp_path).reading()
    assert reading.thermal_state == "unknown"
    assert reading.power_source == "unknown"
    assert reading.memory_pressure == "unknown"
    assert probe_for(tmp_path).facts().role == "server"


def test_zswap_pool_is_the_compressed_memory(tmp_path):
    zswap = "Zswap:             40960 kB\nZswapped:         163840 kB\n"  # pool, pages' size
    write(tmp_path, {"proc/meminfo": MEMINFO + zswap})
    assert probe_for(tmp_path).reading().compressed_bytes == 40960 * KIB


def test_mains_online_is_ac(tmp_path):
    write(
        tmp_path,
        {
            "sys/class/power_supply/AC/type": "Mains\n",
            "sys/class/power_supply/AC/online": "1\n",
            "sys/class/power_supply/BAT0/type": "Battery\n",
            "sys/class/power_supply/BAT0/status": "Charging\n",
        },
    )
    assert probe_for(tmp_path).reading().power_source == "ac"


@pytest.mark.parametrize(
    ("some", "full", "pressure"),
    [
        ("0.00", "0.00", "normal"),
        ("9.99", "0.00", "normal"),
        ("10.00", "2.00", "warning"),
        ("35.10", "12.50", "critical"),
    ],
)
def test_psi_thresholds(some, full, pressure):
    text = (
        f"some avg10={some} avg60=0.00 avg300=0.00 total=1\n"
        f"full avg10={full} avg60=0.00 avg300=0.00 total=1\n"
    )
    assert parse_psi(text) == pressure


def test_garbage_files_give_unknown_and_zero(tmp_path, caplog):
    write(
        tmp_path,
        {
            "proc/meminfo": "garbage\n",
            "proc/pressure/memory": "nonsense\n",
            "proc/vmstat": "",
            "proc/cpuinfo": "",
            "sys/class/thermal/thermal_zone0/temp": "hot\n",
        },
    )
    probe = probe_for(tmp_path)
    with caplog.at_level(logging.WARNING, logger="node_agent.probes.linux"):
        reading = probe.reading()
        facts = probe.facts()
    assert (reading.available_bytes, reading.swap_used_bytes, reading.oom_kills) == (0, 0, 0)
    assert reading.memory_pressure == "unknown"
    assert reading.thermal_state == "unknown"
    assert facts.ram_bytes == 0
    assert facts.chip != ""
    assert "MemAvailable" in caplog.text
    assert "oom_kill" in caplog.text


def test_oom_kills_per_cgroup_v1_sums_the_subtree(tmp_path):
    write(
        tmp_path,
        {
            "cgroup/memory/mlxfleet/memory.oom_control": V1_OOM_CONTROL.format(kills=1),
            "cgroup/memory/mlxfleet/engine-a/memory.oom_control": V1_OOM_CONTROL.format(kills=2),
        },
    )
    probe = probe_for(tmp_path)
    assert probe.oom_kills("/mlxfleet") == 3
    assert probe.oom_kills("mlxfleet/engine-a") == 2
    assert probe.oom_kills(str(tmp_path / "cgroup/memory/mlxfleet/engine-a")) == 2


def test_oom_kills_per_cgroup_v2_and_missing(tmp_path, caplog):
    write(
        tmp_path,
        {"cgroup/agent.slice/memory.events": V2_MEMORY_EVENTS},
    )
    probe = probe_for(tmp_path, cgroup_path="/agent.slice")
    assert probe.oom_kills("agent.slice") == 2
    assert probe.reading().oom_kills == 2
    with caplog.at_level(logging.WARNING, logger="node_agent.probes.linux"):
        assert probe.oom_kills("/gone") == 0
    assert "/gone" in caplog.text


def test_probe_table_and_local_probe():
    assert PROBES["linux"] is LinuxProbe
    assert PROBES["darwin"] is MacProbe
    assert isinstance(local_probe("linux"), LinuxProbe)
    assert isinstance(local_probe("darwin", runner=lambda cmd: ""), MacProbe)
    with pytest.raises(UnsupportedPlatformError, match="win32"):
        local_probe("win32")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the real /proc")
def test_this_machine():
    """Reads the real /proc and /sys of the machine running the tests."""
    probe = local_probe()
    facts = probe.facts()
    reading = probe.reading()
    assert facts.ram_bytes > 0
    assert 0 < reading.available_bytes <= facts.ram_bytes
    assert reading.swap_used_bytes >= 0
    assert facts.performance_cores >= 1
    assert facts.chip
    assert reading.memory_pressure in ("normal", "warning", "critical", "unknown")
    assert reading.thermal_state in ("nominal", "fair", "serious", "critical", "unknown")
    assert reading.power_source in ("ac", "battery", "unknown")
    assert reading.oom_kills >= 0


V1_MEMORY = Path("/sys/fs/cgroup/memory")


@pytest.mark.skipif(
    not (V1_MEMORY / "memory.oom_control").is_file() or not os.access(V1_MEMORY, os.W_OK),
    reason="needs a writable cgroup v1 memory controller (root)",
)
def test_real_oom_kill_is_counted(tmp_path):
    """Needs root and a real process: the kernel OOM-kills a child in a 64 MiB cgroup."""
    cgroup = V1_MEMORY / f"mlxfleet-probe-test-{os.getpid()}"
    cgroup.mkdir()
    try:
        (cgroup / "memory.limit_in_bytes").write_text(str(64 * 1024 * 1024))
        if (cgroup / "memory.memsw.limit_in_bytes").exists():
            (cgroup / "memory.memsw.limit_in_bytes").write_text(str(64 * 1024 * 1024))
        probe = LinuxProbe()
        machine_before = probe.oom_kills()
        assert probe.oom_kills(cgroup.name) == 0
        # The child joins the cgroup, then touches 512 MiB; the kernel kills it (SIGKILL).
        hog = f"open('{cgroup}/cgroup.procs', 'w').write('0');b = bytearray(512 * 1024 * 1024)"
        done = subprocess.run([sys.executable, "-c", hog], timeout=60, check=False)
        assert done.returncode == -9
        assert probe.oom_kills(cgroup.name) == 1
        assert probe.oom_kills(str(cgroup)) == 1
        assert probe.oom_kills() >= machine_before + 1
    finally:
        cgroup.rmdir()

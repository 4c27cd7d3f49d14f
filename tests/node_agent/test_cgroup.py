"""Per-engine memory cgroups: parsing (pure) and, as root, real cgroups and a real OOM kill."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from node_agent import cgroup as cg
from node_agent.cgroup import (
    MIB,
    MemoryLimiter,
    cgroup_name,
    memory_cgroup_dir,
    memory_cgroup_path,
    memory_mount,
    parse_oom_kills,
)

# Captured from this development machine (cgroup v1 hierarchies beside a v2 mount).
PROC_CGROUP_V1 = """\
9:name=systemd:/
4:memory:/process_api/1912217ed729f577c5d7b7dd71a94691
2:cpuacct:/
1:cpu:/
0::/
"""
PROC_CGROUP_V2 = "0::/user.slice/user-1000.slice/session-3.scope\n"
MOUNTINFO_HOST = """\
25 30 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
35 25 0:30 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
39 35 0:34 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
42 35 0:37 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
48 35 0:43 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
# Docker with cgroup v1: the mount shows only the container's subtree.
MOUNTINFO_CONTAINER = (
    "610 601 0:48 /docker/0123abcd /sys/fs/cgroup/memory ro,nosuid master:23 - cgroup cgroup "
    "rw,memory\n"
)
MOUNTINFO_V2 = "30 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec - cgroup2 cgroup2 rw\n"
OOM_CONTROL = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n"


def test_the_memory_line_of_proc_cgroup_gives_the_path() -> None:
    assert memory_cgroup_path(PROC_CGROUP_V1) == "/process_api/1912217ed729f577c5d7b7dd71a94691"
    assert memory_cgroup_path("5:cpuacct,memory:/a/b\n") == "/a/b"  # co-mounted controllers
    assert memory_cgroup_path(PROC_CGROUP_V2) is None  # v2 only: no v1 memory hierarchy


def test_mountinfo_gives_the_memory_hierarchy_mount() -> None:
    assert memory_mount(MOUNTINFO_HOST) == ("/", Path("/sys/fs/cgroup/memory"))
    assert memory_mount(MOUNTINFO_CONTAINER) == ("/docker/0123abcd", Path("/sys/fs/cgroup/memory"))
    assert memory_mount(MOUNTINFO_V2) is None
    spaced = "42 35 0:37 / /mnt/cg\\040mem rw - cgroup cgroup rw,memory\n"
    assert memory_mount(spaced) == ("/", Path("/mnt/cg mem"))  # mountinfo escapes a space


def test_the_cgroup_directory_joins_mount_and_path() -> None:
    assert memory_cgroup_dir(PROC_CGROUP_V1, MOUNTINFO_HOST) == Path(
        "/sys/fs/cgroup/memory/process_api/1912217ed729f577c5d7b7dd71a94691"
    )
    in_container = "4:memory:/docker/0123abcd/agent\n"
    assert memory_cgroup_dir(in_container, MOUNTINFO_CONTAINER) == Path(
        "/sys/fs/cgroup/memory/agent"
    )
    outside = "4:memory:/elsewhere\n"  # not under the mounted subtree: unreachable
    assert memory_cgroup_dir(outside, MOUNTINFO_CONTAINER) is None
    assert memory_cgroup_dir(PROC_CGROUP_V2, MOUNTINFO_V2) is None


def test_oom_kills_come_from_the_oom_kill_line() -> None:
    assert parse_oom_kills(OOM_CONTROL) == 3
    assert parse_oom_kills("oom_kill_disable 0\nunder_oom 0\n") == 0  # kernels before 4.13


@pytest.mark.parametrize(
    ("engine_id", "name"),
    [
        ("demo-i-1a2b3c4d", "mlxfleet-demo-i-1a2b3c4d"),
        ("org_model-b-00ff", "mlxfleet-org_model-b-00ff"),
        ("../../etc", "mlxfleet-.._.._etc"),  # never leaves the agent's cgroup
        ("", "mlxfleet-_"),
    ],
)
def test_engine_ids_become_safe_directory_names(engine_id: str, name: str) -> None:
    assert cgroup_name(engine_id) == name


def test_no_limit_and_one_warning_off_linux(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(cg.sys, "platform", "darwin")
    with caplog.at_level(logging.WARNING):
        assert MemoryLimiter.for_this_process(256 * MIB) is None
    [record] = caplog.records
    assert "256 MiB not applied" in record.getMessage() and "darwin" in record.getMessage()


def test_no_limit_and_one_warning_without_a_memory_hierarchy(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "self").mkdir()
    (tmp_path / "self" / "cgroup").write_text(PROC_CGROUP_V2)
    (tmp_path / "self" / "mountinfo").write_text(MOUNTINFO_V2)
    with caplog.at_level(logging.WARNING):
        assert MemoryLimiter.for_this_process(64 * MIB, proc_root=str(tmp_path)) is None
    [record] = caplog.records
    assert "no cgroup v1 memory controller" in record.getMessage()


def test_creating_under_a_missing_parent_raises(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        MemoryLimiter(tmp_path / "absent", 64 * MIB).create("e1")


@pytest.fixture
def limiter() -> Iterator[MemoryLimiter]:
    """A real limiter under this process's memory cgroup (root with cgroup v1 only)."""
    found = MemoryLimiter.for_this_process(32 * MIB) if os.geteuid() == 0 else None
    if found is None:
        pytest.skip("needs root and a writable cgroup v1 memory controller")
    yield found
    for left in found.parent.glob("mlxfleet-test-*"):
        left.rmdir()


def test_a_real_cgroup_gets_the_limit_and_is_removed(limiter: MemoryLimiter) -> None:
    made = limiter.create("test-limits")
    assert made.path == limiter.parent / "mlxfleet-test-limits"
    assert int((made.path / "memory.limit_in_bytes").read_text()) == 32 * MIB
    memsw = made.path / "memory.memsw.limit_in_bytes"
    if memsw.exists():
        assert int(memsw.read_text()) == 32 * MIB
    assert made.oom_kills() == 0
    assert limiter.create("test-limits") == made  # an empty leftover is made afresh
    made.remove()
    assert not made.path.exists()
    made.remove()  # already gone: no error


def test_a_process_over_the_limit_is_killed_by_the_kernel(limiter: MemoryLimiter) -> None:
    """The child joins the cgroup before exec (EngineCgroup.wrap), touches 256 MiB and is
    OOM-killed; the cgroup's own counter records it. A real process: the kill is the kernel's."""
    made = limiter.create("test-oom")
    try:
        child = subprocess.run(
            made.wrap([sys.executable, "-c", "b = b'x' * (256 * 2**20)"]), timeout=60
        )
        assert child.returncode == -signal.SIGKILL
        assert made.oom_kills() == 1
        idle = subprocess.run(
            made.wrap([sys.executable, "-c", "print(open('/proc/self/cgroup').read())"]),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert idle.returncode == 0
        path = memory_cgroup_path(idle.stdout)
        assert path is not None and path.endswith("/" + made.path.name)
        assert made.oom_kills() == 1  # a process under the limit adds nothing
    finally:
        made.remove()
    assert not made.path.exists()

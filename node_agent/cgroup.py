"""Per-engine memory limits through the cgroup v1 memory controller (Linux, as root).

Each engine gets its own child of the agent's memory cgroup, `mlxfleet-<engine id>`, with
memory.limit_in_bytes (and memory.memsw.limit_in_bytes, so swap is no way around it). The
kernel then OOM-kills the engine, and only the engine, when it goes over; that cgroup's own
oom_kill counter says the SIGKILL was the kernel's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

logger = logging.getLogger(__name__)

MIB = 2**20
CGROUP_PREFIX = "mlxfleet-"
LIMIT_FILES = ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes")  # this order: memsw >= mem
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def memory_cgroup_path(proc_cgroup: str) -> str | None:
    """The process's path in the v1 memory hierarchy, from /proc/<pid>/cgroup; None without one."""
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3 and "memory" in parts[1].split(","):
            return parts[2]
    return None


def _unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash as \040, \011, \012, \134.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def memory_mount(mountinfo: str) -> tuple[str, Path] | None:
    """(root inside the hierarchy, mount point) of the v1 memory controller, from mountinfo."""
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or len(tail) < 3:
            continue
        if tail[0] == "cgroup" and "memory" in tail[2].split(","):
            return _unescape(fields[3]), Path(_unescape(fields[4]))
    return None


def memory_cgroup_dir(proc_cgroup: str, mountinfo: str) -> Path | None:
    """The directory of a process's v1 memory cgroup; None when there is no such hierarchy."""
    path, mount = memory_cgroup_path(proc_cgroup), memory_mount(mountinfo)
    if path is None or mount is None:
        return None
    root, mount_point = mount
    # In a container the mount shows only the container's subtree: its root is cut off.
    try:
        relative = PurePosixPath(path).relative_to(root)
    except ValueError:
        return None
    return mount_point / relative


def parse_oom_kills(oom_control: str) -> int:
    """The `oom_kill N` line of memory.oom_control (kills in this cgroup alone); 0 if absent."""
    for line in oom_control.splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill" and value.strip().isdigit():
            return int(value)
    return 0


def cgroup_name(engine_id: str) -> str:
    """A directory name for an engine's cgroup; the id comes from the coordinator."""
    return CGROUP_PREFIX + (_UNSAFE.sub("_", engine_id) or "_")


@dataclass(frozen=True, slots=True)
class EngineCgroup:
    """One engine's memory cgroup: made before the spawn, removed after the exit."""

    path: Path
    limit_bytes: int

    def wrap(self, argv: list[str]) -> list[str]:
        """argv run by a shell that first moves itself into this cgroup, then execs argv, so
        the engine is limited from its first allocation. Not a preexec_fn: engines start by
        posix_spawn (node_agent/spawn.py), which runs no code of ours in the child; a fork()
        to run one would let gRPC's fork handlers abort the child
        ("ev_epoll1_linux.cc: Check failed: next_worker->state == KICKED")."""
        # "0" written to cgroup.procs moves the writing process: the shell, which exec keeps.
        join = 'echo 0 > "$0" && exec "$@"'
        return ["/bin/sh", "-c", join, str(self.path / "cgroup.procs"), *argv]

    def oom_kills(self) -> int:
        """Kernel OOM kills in this cgroup; 0 when it cannot be read."""
        try:
            return parse_oom_kills((self.path / "memory.oom_control").read_text())
        except OSError:
            return 0

    def remove(self) -> None:
        """rmdir the cgroup; its engine has exited. A leftover is logged, not raised."""
        try:
            self.path.rmdir()
        except FileNotFoundError:
            pass
        except OSError as exc:
            logger.warning("could not remove memory cgroup %s: %s", self.path, exc)


class MemoryLimiter:
    """Makes a limited memory cgroup per engine under `parent` (the agent's own cgroup)."""

    def __init__(self, parent: Path, limit_bytes: int) -> None:
        self.parent = parent
        self.limit_bytes = limit_bytes

    @classmethod
    def for_this_process(cls, limit_bytes: int, proc_root: str = "/proc") -> MemoryLimiter | None:
        """A limiter under this process's memory cgroup, tried once; None (and one warning)
        where there is no writable cgroup v1 memory controller."""
        parent, reason = _own_memory_cgroup(Path(proc_root))
        if parent is not None:
            limiter = cls(parent, limit_bytes)
            try:
                limiter.create(f"check-{os.getpid()}").remove()
                return limiter
            except OSError as exc:
                reason = f"cannot create a memory cgroup under {parent}: {exc}"
        logger.warning(
            "engine memory limit %d MiB not applied, engines run unlimited: %s",
            limit_bytes // MIB,
            reason,
        )
        return None

    def create(self, engine_id: str) -> EngineCgroup:
        """The engine's cgroup with its limit set; raises OSError when it cannot be made."""
        cgroup = EngineCgroup(self.parent / cgroup_name(engine_id), self.limit_bytes)
        with contextlib.suppress(OSError):
            cgroup.path.rmdir()  # an empty leftover of a killed agent, with its old limits
        cgroup.path.mkdir(exist_ok=True)
        try:
            for name in LIMIT_FILES:
                if (cgroup.path / name).exists():  # memsw: only with swap accounting on
                    (cgroup.path / name).write_text(str(cgroup.limit_bytes))
        except OSError:
            cgroup.remove()
            raise
        return cgroup


def _own_memory_cgroup(proc: Path) -> tuple[Path | None, str]:
    """This process's v1 memory cgroup directory, or None and why not."""
    if not sys.platform.startswith("linux"):
        return None, f"{sys.platform} has no cgroups"
    try:
        found = memory_cgroup_dir(
            (proc / "self" / "cgroup").read_text(), (proc / "self" / "mountinfo").read_text()
        )
    except OSError as exc:
        return None, str(exc)
    return found, "no cgroup v1 memory controller (cgroup v2 only?)"

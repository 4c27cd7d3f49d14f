"""This machine, as the bench reads it: the probe it is handed and the process table.

The probe is passed in (the CLI passes the node agent's), so coordinator.bench never imports
the agent; MachineProbe is the part of the agent's Probe the bench uses.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from coordinator.bench.results import ProcessMemory
from mlxfleet.facts import NodeFacts

logger = logging.getLogger(__name__)

TOP_PROCESSES = 5
PS_TIMEOUT_S = 5.0
KIB = 1024


class MemoryReading(Protocol):
    """The part of a probe's reading the bench samples."""

    @property
    def available_bytes(self) -> int: ...

    @property
    def swap_used_bytes(self) -> int: ...


class MachineProbe(Protocol):
    """This machine's probe, as the bench uses it (node_agent.probes' probes are ones)."""

    def facts(self) -> NodeFacts: ...

    def reading(self) -> MemoryReading: ...


@dataclass(frozen=True, slots=True)
class ProcessRow:
    """One process of this machine's process table."""

    pid: int
    ppid: int
    rss_bytes: int
    name: str


def parse_ps(text: str) -> list[ProcessRow]:
    """Rows of `ps -axo pid=,ppid=,rss=,comm=` (macOS: rss in KiB, comm an executable path)."""
    rows = []
    for line in text.splitlines():
        parts = line.split(None, 3)
        if len(parts) < 4:
            continue
        try:
            pid, ppid, rss_kib = int(parts[0]), int(parts[1]), int(parts[2])
        except ValueError:
            continue
        rows.append(ProcessRow(pid, ppid, rss_kib * KIB, os.path.basename(parts[3].strip())))
    return rows


def linux_processes(proc_root: str = "/proc") -> list[ProcessRow]:
    """Rows from /proc/<pid>/status (Name, PPid, VmRSS); kernel threads have no VmRSS."""
    rows = []
    for status in Path(proc_root).glob("[0-9]*/status"):
        try:
            text = status.read_text(errors="replace")
        except OSError:  # it exited while we looked
            continue
        keyed = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        if "VmRSS" not in keyed:
            continue
        try:
            ppid, rss_kib = int(keyed["PPid"]), int(keyed["VmRSS"].split()[0])
        except (KeyError, ValueError, IndexError):
            continue
        name = keyed.get("Name", "").strip()
        rows.append(ProcessRow(int(status.parent.name), ppid, rss_kib * KIB, name))
    return rows


def process_table(system: str | None = None) -> list[ProcessRow]:
    """This machine's processes (`system`: a sys.platform value); [] where ps fails."""
    if (system if system is not None else sys.platform).startswith("linux"):
        return linux_processes()
    try:
        done = subprocess.run(
            ["ps", "-axo", "pid=,ppid=,rss=,comm="],
            capture_output=True,
            text=True,
            timeout=PS_TIMEOUT_S,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        logger.warning("cannot list processes: %s", exc)
        return []
    return parse_ps(done.stdout)


def top_processes(rows: Iterable[ProcessRow], n: int = TOP_PROCESSES) -> list[ProcessMemory]:
    """The n largest by RSS, largest first (pid breaks ties)."""
    ordered = sorted(rows, key=lambda r: (-r.rss_bytes, r.pid))[:n]
    return [ProcessMemory(r.pid, r.name, r.rss_bytes) for r in ordered]


def tree_rss(rows: Iterable[ProcessRow], pid: int) -> int:
    """RSS of a process and all its descendants; 0 when it is not in the table."""
    table = list(rows)
    children: dict[int, list[ProcessRow]] = {}
    for row in table:
        children.setdefault(row.ppid, []).append(row)
    todo = [r for r in table if r.pid == pid]
    total = 0
    while todo:
        row = todo.pop()
        total += row.rss_bytes
        todo.extend(children.get(row.pid, []))
    return total

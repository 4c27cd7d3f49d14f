"""A reading source a test can steer: the real probe, with fields overridden from a JSON file.

Only the OS readings are substituted (thermal state, swap, pressure, power...); the agent,
coordinator, router and engines stay real. Set MLXFLEET_READINGS_FILE to a file holding e.g.
{"thermal_state": "serious", "swap_used_bytes": 900000000}; it is re-read every heartbeat,
and a missing or malformed file means the real readings.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from mlxfleet.facts import NodeFacts
from node_agent.probes.base import NodeReading, Probe

logger = logging.getLogger(__name__)

READINGS_FILE_ENV = "MLXFLEET_READINGS_FILE"
FIELDS = {f.name: f.type for f in dataclasses.fields(NodeReading)}


class OverrideProbe:
    """Wraps a real probe; readings come from it, then the file's fields replace theirs."""

    def __init__(self, inner: Probe, path: Path) -> None:
        self._inner = inner
        self._path = path

    def facts(self) -> NodeFacts:
        return self._inner.facts()

    def memory_kill(self, pid: int) -> str | None:
        return self._inner.memory_kill(pid)

    def oom_kills(self, cgroup_path: str | None = None) -> int:
        return self._inner.oom_kills(cgroup_path)

    def reading(self) -> NodeReading:
        reading = self._inner.reading()
        try:
            raw = json.loads(self._path.read_text())
        except (OSError, ValueError):
            return reading
        if not isinstance(raw, dict):
            return reading
        changes = {k: v for k, v in raw.items() if k in FIELDS}
        if set(raw) - set(FIELDS):
            logger.warning("ignoring unknown reading fields %s", sorted(set(raw) - set(FIELDS)))
        return dataclasses.replace(reading, **changes)

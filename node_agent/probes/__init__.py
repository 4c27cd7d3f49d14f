"""Probes per operating system, chosen by name."""

from __future__ import annotations

import sys
from typing import Any

from node_agent.probes.base import Probe
from node_agent.probes.errors import UnsupportedPlatformError
from node_agent.probes.linux import LinuxProbe
from node_agent.probes.macos import MacProbe

# A later "file override" probe (readings from a file, for tests) registers here too.
PROBES: dict[str, type[LinuxProbe] | type[MacProbe]] = {"linux": LinuxProbe, "darwin": MacProbe}


def local_probe(platform: str | None = None, **kwargs: Any) -> Probe:
    """The probe for this machine (or for `platform`, a sys.platform value)."""
    name = platform if platform is not None else sys.platform
    # sys.platform is "linux" today but was "linux2" on old Pythons; match on the prefix.
    for key, probe_class in PROBES.items():
        if name.startswith(key):
            return probe_class(**kwargs)
    raise UnsupportedPlatformError(f"no probe for platform {name!r}")

"""Probes per operating system, chosen by name."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from node_agent.errors import UnsupportedPlatformError
from node_agent.probes.base import Probe
from node_agent.probes.linux import LinuxProbe
from node_agent.probes.macos import MacProbe
from node_agent.probes.override import READINGS_FILE_ENV, OverrideProbe

PROBES: dict[str, type[LinuxProbe] | type[MacProbe]] = {"linux": LinuxProbe, "darwin": MacProbe}


def local_probe(platform: str | None = None, **kwargs: Any) -> Probe:
    """The probe for this machine (or for `platform`, a sys.platform value)."""
    name = platform if platform is not None else sys.platform
    # sys.platform is "linux" today but was "linux2" on old Pythons; match on the prefix.
    for key, probe_class in PROBES.items():
        if name.startswith(key):
            probe: Probe = probe_class(**kwargs)
            override = os.environ.get(READINGS_FILE_ENV)
            return OverrideProbe(probe, Path(override)) if override else probe
    raise UnsupportedPlatformError(f"no probe for platform {name!r}")

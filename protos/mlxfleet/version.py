"""Installed package versions, as both sides report them (Hello, bench snapshots)."""

from __future__ import annotations

from importlib import metadata


def package_version(dist: str) -> str:
    """An installed distribution's version; "" when it is not installed."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return ""

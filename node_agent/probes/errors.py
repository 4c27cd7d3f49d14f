"""Errors raised by the probes package."""


class Error(Exception):
    """Base class for probe errors."""


class UnsupportedPlatformError(Error):
    """No probe exists for this operating system."""

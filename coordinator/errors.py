"""Errors the coordinator raises; each maps to one clear line at the CLI or one HTTP status."""

from __future__ import annotations

import grpc


class Error(Exception):
    """Base class for every expected coordinator failure."""


class ConfigError(Error):
    """The config file, an environment variable or a CLI argument is invalid."""


class StoreError(Error):
    """The state store cannot be opened or written."""


class EnrollmentError(Error):
    """A node presented a wrong token or an unknown node key."""


class ServiceError(Error):
    """A service file cannot be rendered, written or loaded (launchd, systemd)."""


class SizingError(Error, ValueError):
    """A model folder or config that cannot be sized."""


class CloudFailed(Error):
    """The cloud provider refused or failed a request."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class StreamRefused(Error):
    """An agent's stream broke the contract (garbage, flooding); the reason is logged."""

    def __init__(self, code: grpc.StatusCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code

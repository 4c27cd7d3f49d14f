"""Errors the coordinator raises; each maps to one clear line at the CLI or one HTTP status."""

from __future__ import annotations


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


class ApiError(Error):
    """An error answered at the HTTP edge as OpenAI-shaped JSON."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, object]:
        """The OpenAI error object."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

"""Errors of the shared contract; each names the bad value in its message."""

from __future__ import annotations


class Error(Exception):
    """Base class for every failure raised by the shared contract."""


class ApiError(Error):
    """An error answered at an HTTP edge (gateway or engine) as OpenAI-shaped JSON."""

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

    @classmethod
    def invalid(
        cls,
        message: str,
        param: str | None,
        code: str | None = None,
        status: int = 400,
        type: str = "invalid_request_error",
    ) -> ApiError:
        """A request refused for its content (400 unless `status` says otherwise)."""
        return cls(status, message, type=type, param=param, code=code)

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


class TierError(Error, ValueError):
    """A tier or knob value that cannot be used; the message names it."""


class KnobError(TierError):
    """A tier knob that is unknown or out of its range; `knob` names it, `reason` says why."""

    def __init__(self, knob: str, reason: str, message: str | None = None) -> None:
        super().__init__(message or f"{knob} {reason}")
        self.knob = knob
        self.reason = reason


class KvCacheError(Error, ValueError):
    """A KV cache setting that cannot be used (bits, group size, sequences)."""


class MalformedRecordError(Error, ValueError):
    """An mDNS TXT record does not follow the mlxfleet contract."""


class JoinTokenError(Error, ValueError):
    """A join token that cannot be parsed."""

"""Errors of the engine package."""

from __future__ import annotations


class Error(Exception):
    """Base class of engine errors."""


class InvalidRequest(Error):
    """A client request the engine (or gateway) refuses; carries its OpenAI error fields."""

    def __init__(
        self,
        message: str,
        param: str | None,
        code: str | None = None,
        status: int = 400,
        type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.status = status
        self.type = type


class QueueFull(Error):
    """The engine holds as many requests as it may queue; the client should retry later."""


class ModelLoadFailed(Error):
    """The model could not be loaded or warmed up."""


class BadKnob(Error):
    """A tier knob that is unknown or out of its range; `knob` names it."""

    def __init__(self, knob: str, reason: str) -> None:
        super().__init__(f"{knob} {reason}")
        self.knob = knob
        self.reason = reason

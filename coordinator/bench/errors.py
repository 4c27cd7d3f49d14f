"""Errors `mlxfleet bench` raises; the CLI prints each as one line and exits 2."""

from __future__ import annotations

from coordinator.errors import Error


class BenchError(Error):
    """`mlxfleet bench` cannot run or read its input (one line at the CLI)."""


class EndpointUnreachable(BenchError):
    """Nothing answers at the endpoint's address."""


class KeyRefused(BenchError):
    """The endpoint refused the API key (HTTP 401 or 403)."""


class ModelMissing(BenchError):
    """The endpoint does not serve the model."""


class NotStreaming(BenchError):
    """The endpoint answered a streaming request with something other than server-sent events."""


class PromptLengthError(BenchError):
    """A prompt length cannot be built or is refused by the endpoint."""

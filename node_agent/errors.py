"""Errors the node agent and its engines raise; each is one clear line at the CLI or one status."""

from __future__ import annotations


class Error(Exception):
    """Base class for every expected node-agent failure."""


class AgentError(Error):
    """The agent cannot run (no token, refused enrollment); one line at the CLI."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "agent error"


class EnrollRefused(Error):
    """The coordinator refused the join token, or is not the one that made it."""


class CoordinatorUnreachable(Error):
    """No answer from the coordinator's enrollment port (worth retrying)."""


class UnsupportedPlatformError(Error):
    """No probe exists for this operating system."""


class ConfigError(Error):
    """The command line or environment cannot start an engine."""


class QueueFull(Error):
    """The engine holds as many requests as it may queue; the client should retry later."""


class ModelLoadFailed(Error):
    """The model could not be loaded or warmed up."""


class SplitError(Error, ValueError):
    """This model cannot run under mlxfleet's layer split (engine/layer_split.py; the message
    says why, in one line)."""


class CannotSplit(ModelLoadFailed):
    """A group's rank: the model's architecture cannot run split over several engines."""

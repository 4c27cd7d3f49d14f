"""The CLI's one error: a bad argument or a failed start, printed as one line (exit 2)."""

from __future__ import annotations

from coordinator.errors import Error


class CliError(Error):
    """A bad argument, a failed start or a failed admin call; printed as one line."""

"""How an engine's exit is classified (the supervisor's report to the coordinator)."""

from __future__ import annotations

import os
import signal

import pytest

from node_agent.supervisor import classify_exit, rss_bytes


@pytest.mark.parametrize(
    ("returncode", "before", "after", "reason"),
    [
        (0, 0, 0, "clean"),
        (1, 0, 0, "crash"),
        (-signal.SIGSEGV, 0, 0, "crash"),
        (-signal.SIGKILL, 3, 3, "sigkill"),
        (-signal.SIGKILL, 3, 4, "oom"),
    ],
)
def test_classify_exit(returncode: int, before: int, after: int, reason: str) -> None:
    assert classify_exit(returncode, before, after) == reason


def test_rss_of_this_process_is_plausible() -> None:
    rss = rss_bytes(os.getpid())
    assert 10 * 2**20 < rss < 8 * 2**30
    assert rss_bytes(2**22 + 7) == 0  # no such pid

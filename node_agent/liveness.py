"""When a ready engine counts as hung: it has stopped answering its health check.

A stopped (SIGSTOP) or swapping engine still has its socket: connections are accepted by the
kernel and then nothing comes back. The supervisor kills such an engine (SIGKILL: a stopped
process ignores SIGTERM) and reports the exit as `hung`, which the coordinator treats like a
crash (unrouted, started again).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

HEALTH_CHECK_INTERVAL_S = 1.0  # one GET /health per ready engine this often
DEFAULT_ENGINE_STALL_S = 5.0  # no answer for this long: hung (the agent's --engine-stall-s)
MISSES_FOR_HUNG = 2  # checks in a row; one miss after the agent's own loop stalled is not enough


async def until_hung(
    answers: Callable[[float], Awaitable[bool]],
    stall_s: float,
    interval_s: float = HEALTH_CHECK_INTERVAL_S,
) -> float:
    """Check `answers(timeout_s)` every interval; return the seconds since the last answer
    once none came for `stall_s` and the last MISSES_FOR_HUNG checks all went unanswered.

    Runs as long as the engine answers: the caller cancels it when the engine exits or is
    being stopped. A check may wait up to the stall deadline, so a slow answer still counts.
    An engine silenced right after an answer is found between stall_s and stall_s + interval_s
    later.
    """
    last_answer = time.monotonic()
    misses = 0
    while True:
        sent = time.monotonic()
        if await answers(max(interval_s, last_answer + stall_s - sent)):
            last_answer, misses = time.monotonic(), 0
        else:
            misses += 1
            silent_s = time.monotonic() - last_answer
            if misses >= MISSES_FOR_HUNG and silent_s >= stall_s:
                return silent_s
        await asyncio.sleep(max(0.0, sent + interval_s - time.monotonic()))


async def health_silence(
    url: str,
    headers: dict[str, str],
    tls_options: dict[str, Any],
    stall_s: float,
    interval_s: float = HEALTH_CHECK_INTERVAL_S,
) -> float:
    """GET an engine's /health (`url`, with its secret in `headers`) until it counts as hung;
    the seconds it went unanswered. Only a 200 is an answer."""

    async def answers(timeout_s: float) -> bool:
        try:
            async with session.get(
                url, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout_s), **tls_options
            ) as r:
                return r.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    async with aiohttp.ClientSession() as session:
        return await until_hung(answers, stall_s, interval_s)

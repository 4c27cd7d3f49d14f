"""When a ready engine counts as hung (node_agent/liveness.py), with scripted health checks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from node_agent.liveness import until_hung

INTERVAL_S = 0.05
STALL_S = 0.25
SLACK_S = 0.25  # this machine's scheduling, on top of the promised bound


def scripted(answer: Callable[[int, float], bool | None]) -> Callable[[float], Awaitable[bool]]:
    """A check that answers answer(n, timeout): True/False at once, None: no answer (it waits
    out its timeout, as a request to a stopped engine does)."""
    calls = 0

    async def check(timeout_s: float) -> bool:
        nonlocal calls
        calls += 1
        result = answer(calls, timeout_s)
        if result is None:
            await asyncio.sleep(timeout_s)
            return False
        return result

    return check


async def test_an_engine_that_answers_is_never_hung() -> None:
    watch = asyncio.ensure_future(until_hung(scripted(lambda n, t: True), STALL_S, INTERVAL_S))
    await asyncio.sleep(STALL_S * 5)
    assert not watch.done()
    watch.cancel()


async def test_a_silent_engine_is_hung_within_stall_plus_one_interval() -> None:
    last_answer: list[float] = []

    def answer(n: int, timeout_s: float) -> bool | None:
        if n > 3:
            return None  # stopped: every later check waits out its timeout
        last_answer.append(time.monotonic())
        return True

    silent_s = await until_hung(scripted(answer), STALL_S, INTERVAL_S)
    found_after_s = time.monotonic() - last_answer[-1]
    assert STALL_S <= silent_s <= STALL_S + INTERVAL_S + SLACK_S
    assert STALL_S <= found_after_s <= STALL_S + INTERVAL_S + SLACK_S


async def test_a_slow_answer_within_the_stall_limit_counts() -> None:
    """Each check may wait up to the stall deadline: an engine that answers every check after
    80 % of the limit is slow, not hung."""

    async def slow(timeout_s: float) -> bool:
        assert timeout_s >= INTERVAL_S
        await asyncio.sleep(min(timeout_s, STALL_S * 0.8))
        return timeout_s >= STALL_S * 0.8

    watch = asyncio.ensure_future(until_hung(slow, STALL_S, INTERVAL_S))
    await asyncio.sleep(STALL_S * 6)
    assert not watch.done()
    watch.cancel()


async def test_one_miss_after_a_long_silence_is_not_enough() -> None:
    """The agent's own loop can stall past the limit (a slow disk, a long GC): the first check
    after it may miss, but an engine that answers the next one is not killed."""

    async def check(timeout_s: float) -> bool:
        nonlocal calls
        calls += 1
        if calls == 2:
            time.sleep(STALL_S * 2)  # the whole loop stalls, as the agent's might
            return False
        return True

    calls = 0
    watch = asyncio.ensure_future(until_hung(check, STALL_S, INTERVAL_S))
    await asyncio.sleep(STALL_S * 4)
    assert not watch.done() and calls > 3
    watch.cancel()

"""The model thread → event loop handoff: events that pile up are taken as one."""

from __future__ import annotations

import asyncio
import threading

from node_agent.engine.generator import Event
from node_agent.engine.respond import Handle, merge_events


def test_merge_events_joins_text_and_ids_and_keeps_the_last_end() -> None:
    merged = merge_events([Event("a", [1]), Event("", [2]), Event("bc", [3, 4], "length", 4, None)])
    assert merged == Event("abc", [1, 2, 3, 4], "length", 4, None)


async def test_events_pushed_while_the_loop_is_busy_arrive_merged_with_one_wakeup() -> None:
    loop = asyncio.get_running_loop()
    handle = Handle(7, loop)
    wakeups = 0
    real = loop.call_soon_threadsafe

    def counting(callback, *args):  # type: ignore[no-untyped-def]
        nonlocal wakeups
        wakeups += 1
        return real(callback, *args)

    loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
    try:
        pusher = threading.Thread(
            target=lambda: [handle.push(Event(str(i), [i])) for i in range(5)]
        )
        pusher.start()
        pusher.join()
        first = await handle.next()
        assert (first.text, first.token_ids, wakeups) == ("01234", [0, 1, 2, 3, 4], 1)
        assert not handle.done

        threading.Thread(target=handle.push, args=(Event("", [9], "stop", 6),)).start()
        last = await asyncio.wait_for(handle.next(), 5)
        assert (last.token_ids, last.finish_reason, wakeups) == ([9], "stop", 2)
        assert handle.done
    finally:
        del loop.call_soon_threadsafe

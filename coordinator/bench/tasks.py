"""The one background task an `async with` block of the bench owns (progress, sampler)."""

from __future__ import annotations

import asyncio
from typing import Any


async def stop(task: asyncio.Task[Any] | None) -> None:
    """Cancel `task` and wait until it has ended; its cancellation or error is dropped (the
    task is only a redraw or a sampling loop), a cancellation of the caller is not."""
    if task is not None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

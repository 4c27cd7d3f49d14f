"""The progress line `mlxfleet bench` keeps on stderr while it measures."""

from __future__ import annotations

import asyncio
import time
from typing import TextIO

from coordinator.bench.tasks import stop

PROGRESS_REDRAW_S = 0.5  # on a terminal
PROGRESS_PLAIN_S = 10.0  # stderr is a file or a pipe: one plain line this often


class ProgressLine:
    """One progress line on `stream`: cells done, requests, elapsed time. Rewritten in place
    on a terminal, else printed every PROGRESS_PLAIN_S. Use from the event loop: `async with`
    owns the task that redraws it."""

    def __init__(self, stream: TextIO, cells: int, tty: bool | None = None) -> None:
        self._stream = stream
        self._tty = stream.isatty() if tty is None else tty
        self._cells = cells
        self._cell = 0
        self._label = "preflight and prompt calibration"
        self._requests = 0
        self._failed = 0
        self._started = time.monotonic()
        self._task: asyncio.Task[None] | None = None

    def start_cell(self, label: str) -> None:
        self._cell += 1
        self._label = label
        if not self._tty:
            self._write()

    def request_done(self, ok: bool) -> None:
        self._requests += 1
        self._failed += not ok

    def note(self, text: str) -> None:
        self._stream.write(("\r\033[K" if self._tty else "") + text + "\n")
        self._stream.flush()

    def line(self) -> str:
        elapsed = int(time.monotonic() - self._started)
        failed = f" ({self._failed} failed)" if self._failed else ""
        return (
            f"bench: cell {self._cell}/{self._cells} ({self._label}), "
            f"{self._requests} requests{failed}, {elapsed // 60}:{elapsed % 60:02d} elapsed"
        )

    def _write(self) -> None:
        if self._tty:
            self._stream.write("\r\033[K" + self.line())
        else:
            self._stream.write(self.line() + "\n")
        self._stream.flush()

    async def _redraw(self) -> None:
        while True:
            await asyncio.sleep(PROGRESS_REDRAW_S if self._tty else PROGRESS_PLAIN_S)
            if self._tty or self._cell:
                self._write()

    async def __aenter__(self) -> ProgressLine:
        self._task = asyncio.create_task(self._redraw(), name="bench-progress")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await stop(self._task)
        self._task = None
        if self._tty and self._cell:
            self._write()
            self._stream.write("\n")
        elif self._tty:
            self._stream.write("\r\033[K")
        self._stream.flush()

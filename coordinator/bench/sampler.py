"""The memory sampled while a benchmark runs: the fleet's agents, or this machine."""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp

from coordinator.bench.errors import BenchError
from coordinator.bench.gates import longest_stretch_s
from coordinator.bench.machine import MachineProbe, process_table, tree_rss
from coordinator.bench.results import Resources
from coordinator.bench.snapshot import scrape_agents
from coordinator.bench.tasks import stop

logger = logging.getLogger(__name__)


def _percent(part: int, whole: int) -> float:
    return 100.0 * part / whole if whole > 0 else 0.0


class ResourceSampler:
    """Samples RSS and swap every `interval_s` while entered (`async with sampler:`).

    Use from the event loop; it owns one background task, started on enter and ended on exit.
    Fleet: per node the sum of its engines' RSS (% of that node's RAM) and its swap; a point
    holds the largest node's values. Local: the RSS of `pid` and its descendants when given,
    else the memory in use (ram_bytes - available), and this machine's swap, read by `probe`
    (without one every local sample fails). A failed sample
    or agent scrape is counted in `failures`; sampling goes on.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        root: str,
        fleet: bool,
        ram_bytes: int,
        swap_limit_bytes: int,
        interval_s: float = 1.0,
        pid: int | None = None,
        *,
        probe: MachineProbe | None = None,
    ) -> None:
        self._session = session
        self._root = root.rstrip("/")
        self._fleet = fleet
        self._ram_bytes = ram_bytes
        self._swap_limit_bytes = swap_limit_bytes
        self._interval_s = interval_s
        self._pid = pid
        self._probe = probe  # this machine's; None: a local sample fails (counted)
        self.failures = 0
        self._series: list[tuple[float, int, int]] = []  # (s since enter, rss, swap)
        self._peak_percent = 0.0
        self._t0 = time.monotonic()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> ResourceSampler:
        self._t0 = time.monotonic()
        self._task = asyncio.create_task(self._sample_forever(), name="bench-resources")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await stop(self._task)
        self._task = None

    @property
    def samples(self) -> int:
        return len(self._series)

    async def _sample_forever(self) -> None:
        while True:
            began = time.monotonic()
            try:
                await self.sample()
            except Exception as exc:  # one bad sample must not end the run
                self.failures += 1
                logger.debug("resource sample failed: %r", exc)
            await asyncio.sleep(max(0.0, self._interval_s - (time.monotonic() - began)))

    async def sample(self) -> None:
        """Take one sample now (the background task calls this every interval)."""
        t = round(time.monotonic() - self._t0, 3)
        if self._fleet:
            readings, failed = await scrape_agents(self._session, self._root)
            self.failures += failed
            if not readings:
                return
            rss = max(a.engine_rss_bytes for a in readings)
            swap = max(a.swap_bytes for a in readings)
            percent = max(
                _percent(a.engine_rss_bytes, a.ram_bytes or self._ram_bytes) for a in readings
            )
        else:
            rss, swap = await asyncio.to_thread(self._local)
            percent = _percent(rss, self._ram_bytes)
        self._series.append((t, rss, swap))
        self._peak_percent = max(self._peak_percent, percent)

    def _local(self) -> tuple[int, int]:
        """(rss, swap) of this machine now; runs in a thread (the probe and /proc block)."""
        if self._probe is None:
            raise BenchError("no probe reads this machine's memory")
        reading = self._probe.reading()
        if self._pid is not None:
            rss = tree_rss(process_table(), self._pid)
        else:
            rss = max(0, self._ram_bytes - reading.available_bytes)
        return rss, reading.swap_used_bytes

    def result(self) -> Resources | None:
        """What was sampled so far; None before the first good sample. Series times are
        seconds since the sampler was entered."""
        if not self._series:
            return None
        series = list(self._series)
        return Resources(
            source="fleet" if self._fleet else "local",
            samples=len(series),
            rss_peak_bytes=max(rss for _, rss, _ in series),
            rss_peak_percent=self._peak_percent,
            swap_peak_bytes=max(swap for _, _, swap in series),
            swap_over_limit_s=longest_stretch_s(series, self._swap_limit_bytes) or 0.0,
            series=series,
        )

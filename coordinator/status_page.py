"""The status page at GET /ui: nodes, units and their groups, tier knobs, events and live TTFT and
tokens per second.

Read-only and unauthenticated, like /metrics: it shows what `mlxfleet nodes` / `models` show
(coordinator/nodes.py builds the rows) and never a key, a token or an engine's secret.
The page is one self-contained file, coordinator/status_page.html (no external assets: fleets
run offline), that polls GET /ui/status.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import asdict, dataclass
from importlib import resources

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric

from coordinator.discovery import Discovery
from coordinator.nodes import model_rows, node_rows
from coordinator.reconcile import Reconciler
from coordinator.registry import Registry
from coordinator.routing import Routing
from coordinator.store import Store
from mlxfleet.tiers import TIERS

logger = logging.getLogger(__name__)

STATUS_SAMPLE_S = 2.0  # one chart point per tier this often
STATUS_WINDOW_S = 600.0  # the charts show the last 10 minutes
STATUS_EVENTS = 20
TTFT_BUCKET_SAMPLE = "mlxfleet_ttft_seconds_bucket"
TOKENS_SAMPLE = "mlxfleet_generation_tokens_total"
# Inline script and style only; fetches go to this origin (the page loads nothing else).
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; "
    "style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}

Buckets = list[tuple[float, float]]  # (upper bound, cumulative count), sorted, ending at +Inf


@dataclass(frozen=True, slots=True)
class Totals:
    """One tier's cumulative counters at one instant, summed over its models."""

    ttft_buckets: Mapping[float, float]  # upper bound (le) -> cumulative count
    generation_tokens: float


@dataclass(frozen=True, slots=True)
class Point:
    """One tier's chart point: what happened in the interval that ends at `t`."""

    t: float  # Unix time, seconds
    ttft_p50_s: float | None  # None: no streamed request got its first token in the interval
    ttft_p95_s: float | None
    tokens_per_s: float


def read_totals(families: Iterable[Metric]) -> dict[str, Totals]:
    """Per tier, the TTFT histogram's buckets and the generated tokens so far."""
    buckets: dict[str, dict[float, float]] = {tier: {} for tier in TIERS}
    tokens: dict[str, float] = dict.fromkeys(TIERS, 0.0)
    for family in families:
        for sample in family.samples:
            tier = sample.labels.get("tier", "")
            if tier not in buckets:
                continue
            if sample.name == TTFT_BUCKET_SAMPLE:
                le = float(sample.labels["le"])
                buckets[tier][le] = buckets[tier].get(le, 0.0) + sample.value
            elif sample.name == TOKENS_SAMPLE:
                tokens[tier] += sample.value
    return {tier: Totals(buckets[tier], tokens[tier]) for tier in TIERS}


def bucket_deltas(now: Mapping[float, float], before: Mapping[float, float]) -> Buckets:
    """The cumulative buckets of the observations made between two readings.

    A count that went down means the histogram started again: all of `now` is new.
    """
    if any(now.get(le, 0.0) < count for le, count in before.items()):
        before = {}
    return sorted((le, count - before.get(le, 0.0)) for le, count in now.items())


def histogram_quantile(q: float, buckets: Buckets) -> float | None:
    """The q-quantile by linear interpolation within a bucket, as Prometheus computes it.

    None where Prometheus answers NaN: no observations, or no +Inf bucket. A rank in the
    +Inf bucket answers the highest finite bound; the first bucket starts at 0.
    """
    if len(buckets) < 2 or not math.isinf(buckets[-1][0]):
        return None
    total = buckets[-1][1]
    if total <= 0:
        return None
    rank = q * total
    # The first bucket whose cumulative count reaches the rank (+Inf if none before it).
    b = next((i for i, (_, count) in enumerate(buckets[:-1]) if count >= rank), len(buckets) - 1)
    if b == len(buckets) - 1:
        return buckets[-2][0]
    end, count = buckets[b]
    if b == 0 and end <= 0:
        return end
    start = 0.0
    if b > 0:
        start, below = buckets[b - 1]
        count -= below
        rank -= below
    if count <= 0:  # only for q == 0 with an empty first bucket
        return start
    return start + (end - start) * (rank / count)


def counter_rate(now: float, before: float, interval_s: float) -> float:
    """Per second over the interval; a counter that went down started again from 0."""
    if interval_s <= 0:
        return 0.0
    delta = now - before if now >= before else now
    return delta / interval_s


def sample_point(t: float, before: Totals, now: Totals, interval_s: float) -> Point:
    """The chart point of one tier for the interval between two readings."""
    buckets = bucket_deltas(now.ttft_buckets, before.ttft_buckets)
    p50, p95 = histogram_quantile(0.5, buckets), histogram_quantile(0.95, buckets)
    return Point(
        round(t, 3),
        None if p50 is None else round(p50, 6),
        None if p95 is None else round(p95, 6),
        round(counter_rate(now.generation_tokens, before.generation_tokens, interval_s), 3),
    )


class StatusPage:
    """GET /ui and GET /ui/status. Use from the event loop; the app's startup and cleanup
    start and stop its sampler task (add_routes registers both)."""

    def __init__(
        self,
        metrics: CollectorRegistry,
        reconciler: Reconciler,
        registry: Registry,
        routing: Routing,
        store: Store,
        discovery: Discovery | None = None,
    ) -> None:
        self._metrics = metrics
        self._reconciler = reconciler
        self._registry = registry
        self._routing = routing
        self._store = store
        self.discovery = discovery  # may be set later: mDNS starts after the gateway
        points = max(1, round(STATUS_WINDOW_S / STATUS_SAMPLE_S))
        self.series: dict[str, deque[Point]] = {tier: deque(maxlen=points) for tier in TIERS}
        self._last: tuple[float, dict[str, Totals]] | None = None  # (monotonic, totals)
        self._html: bytes | None = None

    def set_discovery(self, discovery: Discovery) -> None:
        """mDNS started (after the gateway): node rows show what it found."""
        self.discovery = discovery

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/ui", self.page)
        app.router.add_get("/ui/status", self.status_json)
        app.cleanup_ctx.append(self._sampling)

    async def page(self, _request: web.Request) -> web.Response:
        if self._html is None:
            self._html = resources.files("coordinator").joinpath("status_page.html").read_bytes()
        return web.Response(
            body=self._html, content_type="text/html", charset="utf-8", headers=PAGE_HEADERS
        )

    async def status_json(self, _request: web.Request) -> web.Response:
        return web.json_response(self.status(), headers={"Cache-Control": "no-store"})

    def status(self) -> dict[str, object]:
        """What the page shows, as JSON-ready values."""
        reconciler = self._reconciler
        return {
            "time": round(time.time(), 3),
            "sample_s": STATUS_SAMPLE_S,
            "window_s": STATUS_WINDOW_S,
            "nodes": node_rows(self._registry, self._store, self.discovery),
            "models": model_rows(reconciler, self._registry, self._routing),
            "tiers": {tier: asdict(reconciler.knobs(tier)) for tier in TIERS},
            "events": [asdict(e) for e in self._store.events(STATUS_EVENTS)],
            "series": {tier: [asdict(p) for p in points] for tier, points in self.series.items()},
        }

    def read(self) -> tuple[float, dict[str, Totals]]:
        """The counters now, and when (monotonic). Any thread: prometheus-client takes locks."""
        return time.monotonic(), read_totals(self._metrics.collect())

    def record(self, at: float, totals: dict[str, Totals]) -> None:
        """Append one point per tier since the last reading (the first only sets the base).
        On the loop, which also reads the series."""
        if self._last is not None:
            then, before = self._last
            t = time.time()
            for tier in TIERS:
                self.series[tier].append(sample_point(t, before[tier], totals[tier], at - then))
        self._last = (at, totals)

    async def _sampling(self, _app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(self._sample_forever(), name="status-sampler")
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def _sample_forever(self) -> None:
        while True:
            try:
                # Off the loop: thousands of histogram buckets at fleet scale (like /metrics).
                self.record(*await asyncio.to_thread(self.read))
            except Exception:  # a bad sample must not stop the charts for good
                logger.exception("status page sample failed")
            await asyncio.sleep(STATUS_SAMPLE_S)

"""The agent's GET /metrics: this node and its engines as Prometheus metrics, built per scrape.

Served by aiohttp on the agent's event loop (no prometheus-client thread). The node's numbers
come from the probe facts and the heartbeat's latest reading, engines from the supervisor, and
each ready engine's queue, batch and counters from its GET /v1/engine/stats, asked just before
rendering. Labels are bounded (model, tier, state, source; a group's id, rank and layers): no
node label (Prometheus service discovery adds node and role), and never an engine secret.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from mlxfleet.engines import EngineState
from mlxfleet.facts import NodeFacts
from mlxfleet.version import package_version
from node_agent.probes.base import NodeReading, Probe
from node_agent.supervisor import Supervisor

logger = logging.getLogger(__name__)

ENGINE_STATS_TIMEOUT_S = 1.0  # a scrape waits at most this long for an engine's stats
# Heartbeats read the probe every second while connected; an older reading means no session,
# so a scrape reads the probe itself rather than show stale memory.
READING_MAX_AGE_S = 5.0
MS_PER_S = 1000
PRESSURE_LEVELS = {"normal": 0, "warning": 1, "critical": 2}
THERMAL_LEVELS = {"nominal": 0, "fair": 1, "serious": 2, "critical": 3}
UNIT = ["model", "tier"]
RANK = [*UNIT, "group", "rank"]
ORIGINS = ("hub", "peer")  # where model files come from


@dataclass(frozen=True, slots=True)
class GroupStatsView:
    """One rank's part of its group, from the stats' `group` block (node_agent/engine/group.py)."""

    group_id: str
    rank: int
    first_layer: int
    layers: int
    steps: int
    step_seconds_total: float


@dataclass(frozen=True, slots=True)
class EngineStatsView:
    """What the metrics show of an engine's GET /v1/engine/stats."""

    queued: int
    active: int
    max_batch_size: int
    batch_window_s: float
    max_concurrency: int
    kv_bits: int
    requests_total: int
    generated_tokens_total: int
    # The prefix cache (an engine with none reports zeros).
    cache_bytes: int = 0
    cache_budget_bytes: int = 0
    cache_entries: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    cache_tokens_saved: int = 0
    group: GroupStatsView | None = None  # None: a whole model


def parse_stats(text: str) -> EngineStatsView | None:
    """The stats in an engine's JSON answer; None (and a warning) when it has another shape."""
    try:
        body = json.loads(text)
        knobs = body["knobs"]
        cache = body.get("prefix_cache") or {}
        group = body.get("group")
        return EngineStatsView(
            queued=int(body["queued"]),
            active=int(body["active"]),
            max_batch_size=int(knobs["max_batch_size"]),
            batch_window_s=int(knobs["batch_window_ms"]) / MS_PER_S,
            max_concurrency=int(knobs["max_concurrency"]),
            kv_bits=int(body["kv_bits"]),
            requests_total=int(body["requests_total"]),
            generated_tokens_total=int(body["generated_tokens_total"]),
            cache_bytes=int(cache.get("bytes", 0)),
            cache_budget_bytes=int(cache.get("budget_bytes", 0)),
            cache_entries=int(cache.get("entries", 0)),
            cache_hits=int(cache.get("hits", 0)),
            cache_misses=int(cache.get("misses", 0)),
            cache_tokens_saved=int(cache.get("tokens_saved", 0)),
            group=None if group is None else _group_stats(group),
        )
    except (ValueError, KeyError, TypeError) as exc:
        logger.warning("unexpected engine stats %r: %s", text[:200], exc)
        return None


def _group_stats(group: dict[str, Any]) -> GroupStatsView:
    return GroupStatsView(
        group_id=str(group["group_id"]),
        rank=int(group["rank"]),
        first_layer=int(group["first_layer"]),
        layers=int(group["layers"]),
        steps=int(group["steps"]),
        step_seconds_total=float(group["step_seconds_total"]),
    )


# (metric, help, field); gauges of one (model, tier) add up, knobs take the largest.
ENGINE_GAUGES = (
    ("mlxfleet_engine_queue_depth", "Requests submitted, not yet admitted.", "queued"),
    ("mlxfleet_engine_batch_size", "Sequences decoding now.", "active"),
    ("mlxfleet_engine_max_batch_size", "Max batch size in force (knob).", "max_batch_size"),
    ("mlxfleet_engine_batch_window_seconds", "Batch window in force (knob).", "batch_window_s"),
    ("mlxfleet_engine_max_concurrency", "Max concurrency in force (knob).", "max_concurrency"),
    (
        "mlxfleet_engine_kv_quantization",
        "Width of KV cache values in bits: 16 unquantized, 8 or 4 quantized.",
        "kv_bits",
    ),
    ("mlxfleet_engine_prefix_cache_bytes", "KV bytes the prefix cache holds.", "cache_bytes"),
    (
        "mlxfleet_engine_prefix_cache_budget_bytes",
        "The prefix cache's byte budget (counted by placement).",
        "cache_budget_bytes",
    ),
    ("mlxfleet_engine_prefix_cache_entries", "Sequences the prefix cache holds.", "cache_entries"),
)
SUMMED = {"queued", "active", "cache_bytes", "cache_entries"}
ENGINE_COUNTERS = (
    ("mlxfleet_engine_requests", "Requests the engine accepted.", "requests_total"),
    ("mlxfleet_engine_generation_tokens", "Tokens the engine generated.", "generated_tokens_total"),
    (
        "mlxfleet_engine_prefix_cache_hits",
        "Requests that started from a cached prefix.",
        "cache_hits",
    ),
    (
        "mlxfleet_engine_prefix_cache_misses",
        "Requests that found no cached prefix.",
        "cache_misses",
    ),
    (
        "mlxfleet_engine_prefix_cache_saved_tokens",
        "Prompt tokens not prefilled thanks to the prefix cache.",
        "cache_tokens_saved",
    ),
)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


class AgentCollector(Collector):
    """Builds the agent's metrics from its sources when collected; collected on the event loop.

    `reading` and `stats` are set by AgentMetrics before each collection.
    """

    def __init__(
        self, facts: NodeFacts, supervisor: Supervisor, connected: Callable[[], bool]
    ) -> None:
        self._facts = facts
        self._supervisor = supervisor
        self._connected = connected
        self._versions = [package_version(d) for d in ("mlx", "mlx-lm", "mlxfleet")]
        self.reading: NodeReading | None = None
        self.stats: dict[str, EngineStatsView] = {}  # engine id -> its latest answer

    def collect(self) -> Iterator[Metric]:
        yield from self._node()
        if self.reading is not None:
            yield from self._reading(self.reading)
        rss = self._supervisor.rss()  # engine id -> (state, bytes, pid); read once (ps on macOS)
        yield from self._engines(rss)
        yield from self._groups(rss)
        yield from self._model_files()

    def _model_files(self) -> Iterator[Metric]:
        """The node's model files (node_agent/model_store.py); the coordinator shows the same
        per node and model, from the heartbeats."""
        store = self._supervisor.store
        copied = CounterMetricFamily(
            "mlxfleet_agent_copy_bytes",
            "Model file bytes received, by origin (peer: another node; hub: Hugging Face), "
            "bytes fetched again after a failed check included.",
            labels=["origin"],
        )
        fetched = store.fetched_bytes()
        for origin in ORIGINS:  # both from the start: a rate needs the 0 before the first copy
            copied.add_metric([origin], fetched.get(origin, 0))
        yield copied
        yield _gauge(
            "mlxfleet_agent_disk_room_bytes",
            "Bytes of model files this node could take now (unused store models counted free).",
            store.disk_room(),
        )
        yield _gauge(
            "mlxfleet_agent_model_files_bytes",
            "Bytes of complete, verified model files this node holds (store and in place).",
            sum(h.bytes for h in store.held()),
        )

    def _node(self) -> Iterator[Metric]:
        f = self._facts
        info = GaugeMetricFamily(
            "mlxfleet_agent_info",
            "1, labelled with the node's chip, OS and software versions.",
            labels=["chip", "os", "mlx_version", "mlx_lm_version", "agent_version"],
        )
        info.add_metric([f.chip, f.os, *self._versions], 1)
        yield info
        yield _gauge("mlxfleet_node_memory_total_bytes", "Physical memory.", f.ram_bytes)
        yield _gauge(
            "mlxfleet_node_gpu_wired_limit_bytes",
            "Memory the GPU may wire (0 = no separate GPU limit).",
            f.gpu_wired_limit_bytes,
        )
        yield _gauge(
            "mlxfleet_agent_asyncio_tasks",
            "Tasks alive on the agent's event loop (a leak shows as growth).",
            _loop_tasks(),
        )
        yield _gauge(
            "mlxfleet_agent_connected",
            "1 while the control stream to the coordinator is up.",
            int(self._connected()),
        )

    def _reading(self, r: NodeReading) -> Iterator[Metric]:
        yield _gauge(
            "mlxfleet_node_memory_available_bytes",
            "Memory a new model could take without memory pressure.",
            r.available_bytes,
        )
        yield _gauge(
            "mlxfleet_node_memory_wired_bytes",
            "Memory that cannot be paged out (macOS wired; Linux Unevictable).",
            r.wired_bytes,
        )
        yield _gauge(
            "mlxfleet_node_memory_compressed_bytes",
            "Memory holding compressed pages (macOS compressor; Linux zswap).",
            r.compressed_bytes,
        )
        yield _gauge("mlxfleet_node_swap_used_bytes", "Swap in use.", r.swap_used_bytes)
        if r.memory_pressure in PRESSURE_LEVELS:
            yield _gauge(
                "mlxfleet_node_memory_pressure_level",
                "0 normal, 1 warning, 2 critical.",
                PRESSURE_LEVELS[r.memory_pressure],
            )
        if r.thermal_state in THERMAL_LEVELS:
            yield _gauge(
                "mlxfleet_node_thermal_level",
                "0 nominal, 1 fair, 2 serious, 3 critical.",
                THERMAL_LEVELS[r.thermal_state],
            )
        power = GaugeMetricFamily(
            "mlxfleet_node_power_source", "1 for the current source.", labels=["source"]
        )
        power.add_metric([r.power_source], 1)
        yield power
        yield _gauge("mlxfleet_node_low_power_mode", "1 in Low Power Mode.", int(r.low_power_mode))
        yield CounterMetricFamily(
            "mlxfleet_node_oom_kills", "Kernel OOM kills seen.", value=r.oom_kills
        )

    def _engines(self, rss_by_id: dict[str, tuple[EngineState, int, int]]) -> Iterator[Metric]:
        # One engine per (model, tier) as a rule; while one replaces another both show, so
        # their values add up into one series rather than repeat it.
        states: Counter[tuple[str, str, str]] = Counter()
        rss: Counter[tuple[str, str]] = Counter()
        answers: dict[tuple[str, str], list[EngineStatsView]] = {}
        for info in self._supervisor.infos():
            unit = (info.model, info.tier)
            states[(*unit, info.state)] += 1
            rss[unit] += rss_by_id.get(info.engine_id, (info.state, 0, 0))[1]
            if info.engine_id in self.stats:
                answers.setdefault(unit, []).append(self.stats[info.engine_id])
        state = GaugeMetricFamily(
            "mlxfleet_engine_state", "1 for each engine's current state.", labels=[*UNIT, "state"]
        )
        for key, count in sorted(states.items()):
            state.add_metric(list(key), count)
        memory = GaugeMetricFamily(
            "mlxfleet_engine_rss_bytes", "Resident memory of the engine process.", labels=UNIT
        )
        for unit, total in sorted(rss.items()):
            memory.add_metric(list(unit), total)
        families: list[Metric] = [state, memory]
        for name, documentation, field in ENGINE_GAUGES:
            gauge = GaugeMetricFamily(name, documentation, labels=UNIT)
            pick = sum if field in SUMMED else max
            for unit, views in sorted(answers.items()):
                gauge.add_metric(list(unit), pick(getattr(v, field) for v in views))
            families.append(gauge)
        for name, documentation, field in ENGINE_COUNTERS:
            counter = CounterMetricFamily(name, documentation, labels=UNIT)
            for unit, views in sorted(answers.items()):
                counter.add_metric(list(unit), sum(getattr(v, field) for v in views))
            families.append(counter)
        yield from (family for family in families if family.samples)

    def _groups(self, rss_by_id: dict[str, tuple[EngineState, int, int]]) -> Iterator[Metric]:
        """The ranks of groups on this node (node_agent/engine/group.py): layers, memory and
        decode steps per rank, and each group's traffic through this node's rank link. A rank
        other than 0 serves no requests, but its stats answer all the same."""
        info = GaugeMetricFamily(
            "mlxfleet_group_rank_info",
            "1 per rank of a group on this node, labelled with the layers it runs.",
            labels=[*RANK, "first_layer", "layers"],
        )
        memory = GaugeMetricFamily(
            "mlxfleet_group_rank_rss_bytes", "Resident memory of a group's rank.", labels=RANK
        )
        steps = CounterMetricFamily("mlxfleet_group_steps", "Decode steps a rank ran.", labels=RANK)
        seconds = CounterMetricFamily(
            "mlxfleet_group_step_seconds",
            "Seconds a rank spent in decode steps (over steps: the mean step time).",
            labels=RANK,
        )
        link = CounterMetricFamily(
            "mlxfleet_group_link_bytes",
            "Bytes of a group's rank traffic this node's rank link sent to other members' "
            "agents or received from them.",
            labels=[*UNIT, "group", "direction"],
        )
        traffic: dict[tuple[str, str, str], tuple[int, int]] = {}
        for e in self._supervisor.infos():
            if not e.group_id:
                continue
            labels = [e.model, e.tier, e.group_id, str(e.rank)]
            if e.engine_id in rss_by_id:
                memory.add_metric(labels, rss_by_id[e.engine_id][1])
            view = self.stats.get(e.engine_id)
            if view is not None and view.group is not None:
                g = view.group
                info.add_metric([*labels, str(g.first_layer), str(g.layers)], 1)
                steps.add_metric(labels, g.steps)
                seconds.add_metric(labels, g.step_seconds_total)
            key = (e.model, e.tier, e.group_id)
            if self._supervisor.link is not None and key not in traffic:
                with contextlib.suppress(KeyError):  # not open (yet, or any more) on the link
                    counted = self._supervisor.link.stats(e.group_id)
                    traffic[key] = (counted.bytes_sent, counted.bytes_received)
        for key, (sent, received) in sorted(traffic.items()):
            link.add_metric([*key, "sent"], sent)
            link.add_metric([*key, "received"], received)
        families: list[Metric] = [info, memory, steps, seconds, link]
        yield from (family for family in families if family.samples)


class AgentMetrics:
    """Serves GET /metrics; use from the agent's event loop. Each heartbeat's reading is
    handed in (note_reading) so a scrape does not run the probe again."""

    def __init__(
        self,
        facts: NodeFacts,
        probe: Probe,
        supervisor: Supervisor,
        connected: Callable[[], bool],
    ) -> None:
        self._probe = probe
        self._supervisor = supervisor
        self._collector = AgentCollector(facts, supervisor, connected)
        self.registry = CollectorRegistry()
        self.registry.register(self._collector)
        self._read_at = 0.0  # time.monotonic() of the collector's reading
        self._runner: web.AppRunner | None = None

    def note_reading(self, reading: NodeReading) -> None:
        self._collector.reading = reading
        self._read_at = time.monotonic()

    async def start(self, host: str, port: int) -> int:
        """Listen on host:port (0: any free port) and return the port; OSError when busy."""
        app = web.Application()
        app.router.add_get("/metrics", self._handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        return int(runner.addresses[0][1])

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def render(self) -> bytes:
        """The exposition text: refresh engine stats (and a stale reading), then collect."""
        await asyncio.gather(self._refresh_reading(), self._refresh_stats())
        return generate_latest(self.registry)

    async def _handle(self, request: web.Request) -> web.Response:
        return web.Response(body=await self.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _refresh_reading(self) -> None:
        if self._collector.reading is None or time.monotonic() - self._read_at > READING_MAX_AGE_S:
            self.note_reading(await asyncio.to_thread(self._probe.reading))

    async def _refresh_stats(self) -> None:
        ready = [info.engine_id for info in self._supervisor.infos() if info.state == "ready"]
        answers = await asyncio.gather(*(self._engine_stats(engine_id) for engine_id in ready))
        self._collector.stats = {e: s for e, s in zip(ready, answers, strict=True) if s is not None}

    async def _engine_stats(self, engine_id: str) -> EngineStatsView | None:
        """An engine's stats; None when it does not answer in time (its gauges are left out)."""
        try:
            reply = await self._supervisor.engine_request(
                engine_id, "GET", "/v1/engine/stats", timeout_s=ENGINE_STATS_TIMEOUT_S
            )
        except (aiohttp.ClientError, TimeoutError) as exc:
            logger.debug("no stats from engine %s: %s", engine_id, exc)
            return None
        if reply is None or reply[0] != 200:
            return None
        return parse_stats(reply[1])


def _loop_tasks() -> int:
    """Tasks alive on the running event loop; 0 when collected outside one (in tests)."""
    try:
        return len(asyncio.all_tasks())
    except RuntimeError:
        return 0

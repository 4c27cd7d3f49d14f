"""What the Prometheus metrics (issue 6) cost: the coordinator's scrape of simulated fleets, the
gateway's per-request instrumentation and its token counting, in process; then real scrapes of
an agent and of the coordinator over loopback, idle and under streaming load.

Parts 1-3 build the coordinator's real objects (registry, LiteLLM router, store, reconciler and
its metrics) with no network. Part 4 starts the real coordinator and one agent
(`--metrics-port 0`) serving the offline demo model on 127.0.0.1, and stops them at the end,
also on error or Ctrl-C. Every comparison is made within one run.

    python -m benchmarks.metrics_cost [--write-docs]
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import math
import os
import random
import statistics
import struct
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, cast

import aiohttp
import httpx
from aiohttp import web

from benchmarks import harness
from benchmarks.fleet import MODEL, Fleet, demo_model, model_toml
from benchmarks.simulator import MODELS as MODEL_CONFIGS
from coordinator.config import Config, ModelSpec
from coordinator.fleet_metrics import FleetCollector
from coordinator.gateway.relay import SSE_DONE, StreamRelay
from coordinator.metrics import Metrics
from coordinator.pki import FleetPki
from coordinator.reconcile import Reconciler
from coordinator.registry import Engine, EngineId, NodeId, NodeStatus, Registry
from coordinator.routing import Routing
from coordinator.store import Store
from mlxfleet.facts import NodeFacts
from mlxfleet.openai.responses import ResponseHeader, Usage, chunk, sse

SECTION = "## Metrics cost (issue 6)"
GIB = 2**30
MS_PER_S = 1000
US_PER_S = 1_000_000

# Part 1: the coordinator's render() on simulated fleets
FLEET_SIZES = (10, 100, 500)  # nodes; node i runs 1 + i % 2 engines
MODELS = 25  # each in both tiers: 50 configured units
TIERS = ("interactive", "batch")
CHIPS = ("Apple M2 Pro", "Apple M3 Max", "Apple M4 Pro", "Apple M2 Ultra")
ENGINE_PORT_BASE = 20_000  # engine URLs http://127.0.0.1:port: order 1 in the Router
RENDER_WARMUP = 3
RENDER_RUNS = 100  # timed render() calls per variant, in rounds
RECORDED_REQUESTS = 10_000
SCRAPE_INTERVAL_S = 15.0
NO_TRAFFIC = "no traffic yet"
RECORDED = f"after {RECORDED_REQUESTS:,} requests"

# Parts 2 and 3: the request path, µs per call
BATCHES = 200  # rounds; each times a batch of calls of every function in turn
REQUEST_CALLS = 200  # calls per batch
TTFT_REFERENCE_MS = 100.0
BASELINE = "empty function call (baseline)"
PER_REQUEST = "all of it, per streamed request"
PROMPT_TOKENS = 40
STREAM_TOKENS = (256, 1500)
USAGE_CALLS = 100  # calls per batch of the cheap usage(); completion_tokens() once per batch
PUMPS = 30  # whole streams relayed, for scale

# Part 4: real processes
SCRAPES = 200  # sequential GETs of each target per condition, alternating agent and coordinator
SCRAPE_WARMUP = 3
CHAT_STREAMS = 4  # concurrent streaming chats: the interactive tier's max_concurrency
CHAT_MAX_TOKENS = 256
IDLE = "idle"
BUSY = f"{CHAT_STREAMS} streaming chats"
HTTP_TIMEOUT_S = 30.0


class Spread(NamedTuple):
    """Median and 95th percentile of n timings."""

    p50: float
    p95: float
    n: int


def spread(values: list[float]) -> Spread:
    p95 = statistics.quantiles(values, n=20, method="inclusive")[18]
    return Spread(statistics.median(values), p95, len(values))


def load_avg() -> float:
    return os.getloadavg()[0]


# Part 1: the coordinator's scrape, in process


def model_folder(root: Path, name: str, weight_bytes: int) -> str:
    """A Llama-3-8B config and a safetensors header claiming the weights' size: sizing reads
    headers only (as tests/coordinator/test_placement_units.py does)."""
    folder = root / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(MODEL_CONFIGS["llama-3-8b"]))
    header = json.dumps(
        {"w": {"dtype": "U8", "shape": [weight_bytes], "data_offsets": [0, weight_bytes]}}
    ).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    return str(folder)


@dataclass
class SimFleet:
    nodes: int
    engines: int
    reconciler: Reconciler
    collector: FleetCollector

    @property
    def metrics(self) -> Metrics:
        return self.reconciler.metrics


def sim_fleet(root: Path, nodes: int) -> SimFleet:
    """The coordinator's objects as server.py wires them, with `nodes` connected nodes whose
    engines are all ready; each unit wants the replicas it has, so nothing is pending."""
    root.mkdir(parents=True)
    sources = {
        f"model-{i:02d}": model_folder(root, f"model-{i:02d}", (1 + i % 8) * GIB)
        for i in range(MODELS)
    }
    units = [(model, tier) for model in sources for tier in TIERS]
    hosted = [n for n in range(nodes) for _ in range(1 + n % 2)]
    placed = [(n, units[i % len(units)]) for i, n in enumerate(hosted)]
    replicas = Counter(unit for _, unit in placed)
    specs = tuple(
        ModelSpec(model, sources[model], tier, replicas=max(1, replicas[model, tier]))
        for model, tier in units
    )
    routing = Routing(FleetPki.load_or_create(root).ca_cert_pem)
    registry = Registry(routing)
    store = Store(root / "state.sqlite3")
    reconciler = Reconciler(Config(home=root, models=specs), registry, store)
    collector = FleetCollector(reconciler, registry, routing, store)
    reconciler.metrics.watch(collector)
    status = NodeStatus(20 * GIB, 0, "normal", "nominal", "ac", False)
    for n in range(nodes):
        node_id = NodeId(f"node-{n:03d}")
        role = "laptop" if n % 4 == 0 else "server"
        ram = (64 if n % 3 else 128) * GIB
        facts = NodeFacts(f"host-{n:03d}", CHIPS[n % len(CHIPS)], "macOS", ram, 8, 0, 0.0, 0, role)
        store.save_node(node_id, facts.hostname, {"role": role})  # enrolled: the offline count
        registry.connect(node_id, facts, [])
        registry.heartbeat(node_id, status, {})
    for i, (n, (model, tier)) in enumerate(placed):
        engine_id = EngineId(f"{model}-{tier[0]}-{n:03d}")
        url = f"http://127.0.0.1:{ENGINE_PORT_BASE + i}"
        node_id = NodeId(f"node-{n:03d}")
        registry.upsert_engine(Engine(engine_id, model, node_id, tier, "ready", url, "bench"))
        reconciler.engine_ready((model, tier))  # type: ignore[arg-type]
    return SimFleet(nodes, len(placed), reconciler, collector)


def record_traffic(metrics: Metrics, units: list[tuple[str, str]]) -> None:
    """Requests spread over the units as the gateway records them: mostly 200s with TTFT and
    decode times, some 429, 499 and 502, and 401s before a unit is known."""
    rng = random.Random(6)
    for i in range(RECORDED_REQUESTS):
        model, tier = units[i % len(units)]
        roll = rng.random()
        if roll < 0.01:
            metrics.request_done("", "", 401, None, None, "chat")
            continue
        status = 429 if roll < 0.03 else 499 if roll < 0.04 else 502 if roll < 0.045 else 200
        if status == 429:
            metrics.request_done(model, tier, status, None, None, "chat")
            continue
        tokens = rng.randint(1, 1500)
        ttft_s = rng.lognormvariate(math.log(0.1), 0.6)
        decode_s = rng.lognormvariate(math.log(0.02), 0.5) * (tokens - 1)
        usage = (PROMPT_TOKENS, tokens) if status == 200 else None
        metrics.request_done(model, tier, status, ttft_s + decode_s, usage, "chat")
        metrics.stream_timing(model, tier, ttft_s, decode_s, tokens)


@dataclass(frozen=True, slots=True)
class RenderRow:
    nodes: int
    engines: int
    state: str
    ms: Spread  # render(): the whole exposition
    loop_ms: Spread  # of which render_fleet(), the part the gateway renders on its event loop
    kib: float
    samples: int
    buckets: int  # of the samples, histogram buckets
    load: float


def time_renders(variants: list[tuple[SimFleet, str]]) -> list[RenderRow]:
    """The two halves of a scrape of every variant, RENDER_RUNS rounds of one call each in
    turn after warm-ups, so load from other work falls on all of them alike."""
    load = load_avg()
    renders: list[list[float]] = [[] for _ in variants]
    collects: list[list[float]] = [[] for _ in variants]
    bodies = [b""] * len(variants)
    for run in range(RENDER_WARMUP + RENDER_RUNS):
        for i, (fleet, _state) in enumerate(variants):
            t0 = time.perf_counter()
            counted = fleet.metrics.render_counted()
            t1 = time.perf_counter()
            bodies[i] = counted + fleet.metrics.render_fleet()
            t2 = time.perf_counter()
            if run >= RENDER_WARMUP:
                renders[i].append((t2 - t0) * MS_PER_S)
                collects[i].append((t2 - t1) * MS_PER_S)
    rows = []
    for (fleet, state), render, collect, body in zip(
        variants, renders, collects, bodies, strict=True
    ):
        lines = [line for line in body.splitlines() if line and not line.startswith(b"#")]
        rows.append(
            RenderRow(
                fleet.nodes,
                fleet.engines,
                state,
                spread(render),
                spread(collect),
                len(body) / 1024,
                len(lines),
                sum(1 for line in lines if b"_bucket{" in line),
                load,
            )
        )
        print(f"render: {rows[-1]}", file=sys.stderr)
    return rows


def coordinator_scrapes(workdir: Path) -> list[RenderRow]:
    """Two fleets of each size, one with recorded traffic, all timed in the same rounds."""
    variants = []
    for nodes in FLEET_SIZES:
        variants.append((sim_fleet(workdir / f"idle-{nodes}", nodes), NO_TRAFFIC))
        busy = sim_fleet(workdir / f"busy-{nodes}", nodes)
        record_traffic(busy.metrics, [spec.key for spec in busy.reconciler.units()])
        variants.append((busy, RECORDED))
    gc.collect()  # the fleets' construction garbage, not the renders'
    return time_renders(variants)


# Parts 2 and 3: the request path, in process


def per_call_us(fns: dict[str, tuple[Callable[[], object], int]]) -> dict[str, Spread]:
    """µs per call of each function: BATCHES rounds, each timing a batch of `calls` calls of
    every function in turn, so whatever else loads the machine falls on all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(BATCHES):
        for name, (fn, calls) in fns.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            times[name].append((time.perf_counter() - t0) / calls * US_PER_S)
    return {name: spread(values) for name, values in times.items()}


def request_path(metrics: Metrics, model: str, tier: str) -> None:
    """What coordinator/gateway/record.py records for one finished stream."""
    in_flight = metrics.in_flight.labels(model, tier)
    in_flight.inc()
    metrics.request_done(model, tier, 200, 2.0, (PROMPT_TOKENS, 256), "chat")
    metrics.stream_timing(model, tier, 0.1, 1.9, 256)
    in_flight.dec()


def nothing(_metrics: Metrics, _model: str, _tier: str) -> None:
    """The baseline: a call with the same arguments that does nothing."""


def request_costs() -> dict[str, Spread]:
    metrics = Metrics()
    units = [(f"model-{i:02d}", tier) for i in range(MODELS) for tier in TIERS]
    for model, tier in units:
        metrics.unit_seen(model, tier)
    record_traffic(metrics, units)
    model, tier = units[0]
    in_flight = metrics.in_flight.labels(model, tier)

    def gauge() -> None:
        in_flight.inc()
        in_flight.dec()

    return per_call_us(
        {
            BASELINE: (
                lambda: nothing(metrics, model, tier),
                REQUEST_CALLS,
            ),
            "in_flight inc + dec (labels looked up once)": (gauge, REQUEST_CALLS),
            "request_done": (
                lambda: metrics.request_done(model, tier, 200, 2.0, (PROMPT_TOKENS, 256), "chat"),
                REQUEST_CALLS,
            ),
            "stream_timing": (
                lambda: metrics.stream_timing(model, tier, 0.1, 1.9, 256),
                REQUEST_CALLS,
            ),
            PER_REQUEST: (lambda: request_path(metrics, model, tier), REQUEST_CALLS),
        }
    )


def chat_events(tokens: int) -> list[bytes]:
    """An engine's chat stream as node_agent/engine/server.py writes it: the role chunk, one
    event per token with its id, the finishing event carrying `mlxfleet.usage`, [DONE]."""
    header = ResponseHeader("chat", "chatcmpl-" + "0" * 24, 1_700_000_000, MODEL)
    words = (" the", " quick", " brown", " fox", " jumps", " over", " a", " lazy", " dog", ".")
    events = [sse(chunk(header, "", first=True))]
    events += [
        sse(chunk(header, words[i % len(words)], None, [100 + i % 1400])) for i in range(tokens)
    ]
    events.append(sse(chunk(header, "", "length", usage=Usage(PROMPT_TOKENS, tokens))))
    return [*events, SSE_DONE]


class _Client:
    """Takes what the relay writes to the client, as an aiohttp response would."""

    async def write(self, _data: bytes) -> None:
        return None


class _Upstream:
    """An engine response whose body arrives one event per chunk."""

    def __init__(self, events: list[bytes]) -> None:
        self._events = events
        self.content = self

    async def iter_any(self) -> AsyncIterator[bytes]:
        for event in self._events:
            yield event


async def relayed(events: list[bytes], runs: int) -> tuple[StreamRelay, list[float]]:
    """Relay the stream `runs` times; the last relay and µs per whole stream."""
    times = []
    relay = None
    for _ in range(runs):
        relay = StreamRelay(cast(web.StreamResponse, _Client()), None, time.monotonic())
        t0 = time.perf_counter()
        done = await relay.pump(cast(aiohttp.ClientResponse, _Upstream(events)))
        times.append((time.perf_counter() - t0) * US_PER_S)
        if not done:
            raise RuntimeError("the relay did not see [DONE]")
    assert relay is not None
    return relay, times


@dataclass(frozen=True, slots=True)
class CountRow:
    tokens: int
    usage: Spread
    counted: Spread
    pump: Spread


def token_counting() -> list[CountRow]:
    rows = []
    for tokens in STREAM_TOKENS:
        relay, pumps = asyncio.run(relayed(chat_events(tokens), PUMPS))
        if relay.usage() != (PROMPT_TOKENS, tokens) or relay.completion_tokens() != tokens:
            raise RuntimeError(f"wrong counts: {relay.usage()}, {relay.completion_tokens()}")
        found = per_call_us(
            {"usage": (relay.usage, USAGE_CALLS), "count": (relay.completion_tokens, 1)}
        )
        rows.append(CountRow(tokens, found["usage"], found["count"], spread(pumps)))
        print(f"token counting: {rows[-1]}", file=sys.stderr)
    return rows


# Part 4: real scrapes over loopback


@dataclass(frozen=True, slots=True)
class Live:
    base: str  # the gateway
    key: str
    agent_metrics: str  # the agent's /metrics URL, from service discovery


def agent_target(base: str) -> str | None:
    with contextlib.suppress(httpx.HTTPError, ValueError):
        targets = httpx.get(f"{base}/prometheus/targets", timeout=5).json()
        if targets:
            return str(targets[0]["targets"][0])
    return None


@contextlib.contextmanager
def live_fleet(workdir: Path) -> Iterator[Live]:
    """The real coordinator (the demo model, interactive, pinned) and one agent."""
    config = model_toml(demo_model(workdir), tiers=["interactive"], pinned=True)
    with Fleet(workdir, config) as f:
        f.start_agent("agent", "--role", "server")
        started, ready = harness.START_TIMEOUT_S, harness.READY_TIMEOUT_S
        target = harness.wait_for(lambda: agent_target(f.base), started, "/prometheus/targets")
        harness.wait_for(f.routable, ready, "the demo model to be ready")
        yield Live(f.base, f.key, f"http://{target}/metrics")


class ChatLoad:
    """CHAT_STREAMS threads, each streaming chats through the gateway back to back, every
    stream read to [DONE]. `stop` lets each thread finish the stream it is reading."""

    def __init__(self, live: Live) -> None:
        self._live = live
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.flowing: set[int] = set()  # threads that have received generated text
        self.completed = self.failed = 0
        self._threads = [
            threading.Thread(target=self._loop, args=(i,), name=f"chat-{i}", daemon=True)
            for i in range(CHAT_STREAMS)
        ]

    def __enter__(self) -> ChatLoad:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(HTTP_TIMEOUT_S)

    def counts(self) -> tuple[int, int]:
        with self._lock:
            return self.completed, self.failed

    def _loop(self, i: int) -> None:
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": f"Tell me a long story, number {i}."}],
            "max_tokens": CHAT_MAX_TOKENS,
            "temperature": 0,
            "stream": True,
        }
        with httpx.Client(timeout=HTTP_TIMEOUT_S) as http:
            while not self._stop.is_set():
                try:
                    ok = self._chat(http, body, i)
                except httpx.HTTPError:
                    ok = False
                with self._lock:
                    self.completed += ok
                    self.failed += not ok

    def _chat(self, http: httpx.Client, body: dict[str, object], i: int) -> bool:
        """One streamed chat read to its end: ok when it answered 200, had no error event
        and ended with [DONE]."""
        url = f"{self._live.base}/v1/chat/completions"
        headers = {"Authorization": f"Bearer {self._live.key}"}
        with http.stream("POST", url, json=body, headers=headers) as r:
            ok, done = r.status_code == 200, False
            for line in r.iter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith('data: {"error"'):
                    ok = False
                elif '"content":"' in line:
                    with self._lock:
                        self.flowing.add(i)
        return ok and done


@dataclass(frozen=True, slots=True)
class ScrapeRow:
    target: str
    condition: str
    ms: Spread
    kib: float
    load: float


def scrape_both(live: Live, condition: str) -> list[ScrapeRow]:
    """SCRAPES sequential GET /metrics of the agent and of the coordinator, alternating, on
    kept-alive connections as Prometheus's are."""
    urls = {"agent": live.agent_metrics, "coordinator": f"{live.base}/metrics"}
    times: dict[str, list[float]] = {name: [] for name in urls}
    sizes: dict[str, int] = {}
    load = load_avg()
    with httpx.Client(timeout=HTTP_TIMEOUT_S) as http:
        for n in range(SCRAPE_WARMUP + SCRAPES):
            for name, url in urls.items():
                t0 = time.perf_counter()
                r = http.get(url)
                elapsed = (time.perf_counter() - t0) * MS_PER_S
                if r.status_code != 200:
                    raise RuntimeError(f"GET {url}: HTTP {r.status_code}")
                sizes[name] = len(r.content)
                if n >= SCRAPE_WARMUP:
                    times[name].append(elapsed)
    return [
        ScrapeRow(name, condition, spread(times[name]), sizes[name] / 1024, load) for name in urls
    ]


def live_scrapes(workdir: Path) -> tuple[list[ScrapeRow], tuple[int, int]]:
    with live_fleet(workdir) as live:
        rows = scrape_both(live, IDLE)
        with ChatLoad(live) as load:
            harness.wait_for(
                lambda: len(load.flowing) == CHAT_STREAMS, HTTP_TIMEOUT_S, "chats to flow"
            )
            before = load.counts()
            rows += scrape_both(live, BUSY)
            after = load.counts()
        for row in rows:
            print(f"scrape: {row}", file=sys.stderr)
        return rows, (after[0] - before[0], after[1] - before[1])


# Report


def table(head: list[str], align: str, rows: list[list[str]]) -> str:
    """A markdown table; `align` has one letter per column, l or r."""
    rule = "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|"
    return "\n".join(
        ["| " + " | ".join(head) + " |", rule, *("| " + " | ".join(r) + " |" for r in rows)]
    )


def report(
    renders: list[RenderRow],
    requests: dict[str, Spread],
    counts: list[CountRow],
    scrapes: list[ScrapeRow],
    chats: tuple[int, int],
    command: str,
    when: str,
) -> str:
    interval_ms = SCRAPE_INTERVAL_S * MS_PER_S
    table_render = table(
        [
            "nodes",
            "engines",
            "metrics state",
            "render p50 (ms)",
            "p95 (ms)",
            "of which on the loop p50 / p95 (ms)",
            "body (KiB)",
            "samples (histogram buckets)",
            "p50 / 15 s",
            "load avg",
        ],
        "rrlrrrrrrr",
        [
            [
                str(r.nodes),
                str(r.engines),
                r.state,
                f"{r.ms.p50:.1f}",
                f"{r.ms.p95:.1f}",
                f"{r.loop_ms.p50:.1f} / {r.loop_ms.p95:.1f}",
                f"{r.kib:.0f}",
                f"{r.samples:,} ({r.buckets:,})",
                f"{r.ms.p50 / interval_ms:.2%}",
                f"{r.load:.1f}",
            ]
            for r in renders
        ],
    )
    baseline = requests[BASELINE]
    table_request = table(
        ["per request", "p50 (µs)", "p95 (µs)", "p50 minus the baseline's (µs)"],
        "lrrr",
        [
            [
                name,
                f"{s.p50:.2f}",
                f"{s.p95:.2f}",
                "—" if name == BASELINE else f"{s.p50 - baseline.p50:.2f}",
            ]
            for name, s in requests.items()
        ],
    )
    table_count = table(
        [
            "stream",
            "`usage()` p50 / p95 (µs)",
            "`completion_tokens()` p50 / p95 (µs)",
            "ratio of p50s",
            "relaying the whole stream, p50 (µs)",
        ],
        "lrrrr",
        [
            [
                f"{c.tokens} tokens",
                f"{c.usage.p50:.1f} / {c.usage.p95:.1f}",
                f"{c.counted.p50:,.0f} / {c.counted.p95:,.0f}",
                f"{c.counted.p50 / c.usage.p50:,.0f}×",
                f"{c.pump.p50:,.0f}",
            ]
            for c in counts
        ],
    )
    table_scrape = table(
        ["GET /metrics of", "condition", "p50 (ms)", "p95 (ms)", "body (KiB)", "load avg"],
        "llrrrr",
        [
            [
                s.target,
                s.condition,
                f"{s.ms.p50:.1f}",
                f"{s.ms.p95:.1f}",
                f"{s.kib:.1f}",
                f"{s.load:.1f}",
            ]
            for s in scrapes
        ],
    )
    recorded = [r for r in renders if r.state == RECORDED]
    small, large = recorded[0], recorded[-1]
    per_request = requests[PER_REQUEST].p50 - baseline.p50
    ttft_us = TTFT_REFERENCE_MS * US_PER_S / MS_PER_S
    idle, busy = (
        next(s for s in scrapes if s.target == "agent" and s.condition == c) for c in (IDLE, BUSY)
    )
    longest = counts[-1]
    return f"""{SECTION}

Measured {when} with `{command}`.

- Machine: {harness.machine()}
- Versions: {harness.versions("prometheus-client", "aiohttp", "litellm", "httpx", "mlx", "mlx-lm")}
- Every comparison is between numbers of this one run. The {os.cpu_count()} cores were shared
  with other work: the load avg column is the 1-minute load average as each group started.

Method, coordinator scrape (in process, no network): the coordinator's real objects as
`coordinator/server.py` wires them (Routing with its LiteLLM Router, Registry, Store,
Reconciler, `FleetCollector` watched by the reconciler's metrics), {MODELS} models in both tiers
({MODELS * len(TIERS)} units; model folders hold a safetensors header only) and N nodes
connected, heartbeating and enrolled in the store. Node i runs 1 + i mod 2 ready engines at
`http://127.0.0.1:port` (each a Router deployment), units dealt round-robin, each unit wanting
the replicas it has. Two such fleets of each size are built side by side; one of them records
{RECORDED_REQUESTS:,} requests across its units (`request_done` + `stream_timing`: mostly 200s
with lognormal TTFT and per-token times, some 401, 429, 499 and 502). GET /metrics renders in
two halves: `render_fleet()` (the `FleetCollector` gauges, which read loop-owned state) on the
gateway's event loop, and `render_counted()` (counters, gauges, histograms: prometheus-client
takes locks) in a worker thread, so only the first blocks the loop (the thread still competes
for the GIL, in 5 ms switch intervals). `_created` series are off (process-wide, in
`coordinator/metrics.py`). All variants are timed in the same {RENDER_RUNS} rounds (after
{RENDER_WARMUP}), each rendering every variant once in turn with `time.perf_counter` around
each half. p50 / 15 s: the share of one core a scrape every {SCRAPE_INTERVAL_S:.0f} s takes.

{table_render}

Method, request path: µs per call in {BATCHES} rounds, each timing a batch of {REQUEST_CALLS}
calls of every row in turn; p50 and p95 over the rounds' per-call means. The `Metrics` holds
the {MODELS * len(TIERS)} units' series and {RECORDED_REQUESTS:,} recorded requests. The last row
is what the gateway records per streamed request: `in_flight.labels(...)`, `inc()`,
`request_done(...)`, `stream_timing(...)`, `dec()`; the baseline calls an empty function with
the same arguments.

{table_request}

Method, token counting: a `StreamRelay` relays an engine's chat stream built with
`node_agent/engine/responses.py` (role chunk, one event per token carrying its id, the
finishing event carrying `mlxfleet.usage`, `[DONE]`), one event per upstream chunk, to an
in-memory client. Then `usage()` (reads the usage on the finishing event: what the gateway does
now) and `completion_tokens()` (parses every event sent and counts the ids: the old way, still
used for a stream that did not finish) are timed in {BATCHES} rounds of {USAGE_CALLS} calls of
`usage()` and one of `completion_tokens()`; both return the stream's token count. For scale,
the time `pump` takes to relay the whole stream (median of {PUMPS}).

{table_count}

Method, real scrapes: the real coordinator and one real agent (`--metrics-port 0`,
`--role server`) with the offline demo model (interactive, pinned) on 127.0.0.1; the agent's
address comes from the coordinator's `GET /prometheus/targets`. {SCRAPES} sequential GETs of
the agent's `/metrics` (each asks every ready engine for `/v1/engine/stats` over loopback
before rendering) alternate with GETs of the coordinator's `/metrics`, on kept-alive httpx
connections after {SCRAPE_WARMUP} warm-ups, timed from request to whole body: first idle, then
while {CHAT_STREAMS} threads stream chats (`max_tokens: {CHAT_MAX_TOKENS}`) through the gateway
back to back, all flowing before timing starts ({chats[0]} chats completed and {chats[1]}
failed during the timed scrapes). Client, coordinator, agent and engine share the
{os.cpu_count()} cores.

{table_scrape}

Reading:
- A render's cost follows its sample count, and most samples are the units' histogram buckets
  ({small.buckets:,} of {small.samples:,} at {small.nodes} nodes), there at any fleet size.
  After traffic, p50 {small.ms.p50:.0f} ms at {small.nodes} nodes and {large.ms.p50:.0f} ms
  (p95 {large.ms.p95:.0f} ms) at {large.nodes}; of that, the loop is blocked
  {large.loop_ms.p50:.1f} ms (p95 {large.loop_ms.p95:.1f} ms): the fleet's gauges, which grow
  with engines. At a {SCRAPE_INTERVAL_S:.0f} s interval a scrape is
  {large.ms.p50 / interval_ms:.1%} of one core.
- Recording one streamed request costs {per_request:.1f} µs, {per_request / ttft_us:.3%} of a
  {TTFT_REFERENCE_MS:.0f} ms TTFT. Reading the usage off the finishing event takes
  {longest.usage.p50:.0f} µs for a {longest.tokens}-token stream, where parsing the stream takes
  {longest.counted.p50 / MS_PER_S:.1f} ms. An agent scrape takes {idle.ms.p50:.1f} ms idle and
  {busy.ms.p50:.1f} ms (p95 {busy.ms.p95:.1f} ms) under {CHAT_STREAMS} streams.
"""


def main() -> int:
    args = harness.parser(__doc__).parse_args()
    command, when = harness.command_line(), harness.now_utc()
    with tempfile.TemporaryDirectory(prefix="mlxfleet-metrics-") as tmp:
        renders = coordinator_scrapes(Path(tmp) / "sim")
        requests = request_costs()
        print(f"request path: {requests}", file=sys.stderr)
        counts = token_counting()
        scrapes, chats = live_scrapes(Path(tmp) / "live")
    section = report(renders, requests, counts, scrapes, chats, command, when)
    harness.publish(SECTION, section, args.write_docs)
    return 0


if __name__ == "__main__":
    harness.run_script(main)

"""Prometheus metrics of the coordinator (prometheus-client, one registry per coordinator).

Served at GET /metrics on the gateway port. This module holds what the coordinator counts as
it happens (requests, latencies, tokens, failovers, engine exits, triggers); the fleet's state
(nodes, placements, pending units, router deployments) is read at scrape time by
coordinator/fleet_metrics.py. Labels carry node ids, configured model names, tiers, status
codes, reason codes and team keys' names (chosen by the operator, one value per key): never a
prompt, a key or a secret, and never a string a client chose.
"""

from __future__ import annotations

import prometheus_client
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.registry import Collector

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

# Interactive TTFT targets sit around 0.1-0.5 s; batch and cold starts reach tens of seconds.
TTFT_BUCKETS_S = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1, 2.5, 5, 10, 30, 60)
# 1 ms/token is 1000 tok/s (a small model on an M-series GPU); 0.5 s/token is a swapping Mac.
TPOT_BUCKETS_S = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1)
DURATION_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
WAIT_BUCKETS_S = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)
FAILOVER_CAUSES = ("retry", "continued", "cloud")

# Process-wide: no dashboard reads the `_created` series, and they are ~12 % of a scrape's body
# and of its render time (docs/benchmarks.md, Metrics cost).
prometheus_client.disable_created_metrics()


class Metrics:
    """The coordinator's metrics; fresh registries each, so several can live in one process.

    `registry` holds what is counted as it happens: prometheus-client's metrics take locks, so
    it may be rendered in a thread while the loop records. Collectors given to `watch` read
    state only the event loop may touch, so `render_fleet` must run on the loop."""

    def __init__(self) -> None:
        self._fleet = CollectorRegistry()
        self.registry = r = CollectorRegistry()
        unit = ["model", "tier"]
        self.requests = Counter(
            "mlxfleet_requests",
            "Completion requests by model, tier, HTTP status (499: the client left; 502: a "
            "stream no engine could finish), API (chat, completions, messages, responses) and "
            "team key name. Model and tier are empty when refused before they were known, key "
            "without a valid key.",
            [*unit, "status", "api", "key"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "mlxfleet_prompt_tokens",
            "Prompt tokens of answered requests, by team key name too.",
            [*unit, "key"],
            registry=r,
        )
        self.generation_tokens = Counter(
            "mlxfleet_generation_tokens",
            "Tokens generated for clients, by team key name too.",
            [*unit, "key"],
            registry=r,
        )
        self.failovers = Counter(
            "mlxfleet_failovers",
            "Requests moved off an engine: retry (it failed before the first byte), continued "
            "(a stream went on elsewhere), cloud (served by the cloud fallback).",
            [*unit, "cause"],
            registry=r,
        )
        self.engine_exits = Counter(
            "mlxfleet_engine_exits",
            "Engine exits reported by agents, by reason (oom, crash, sigkill, clean, load_failed).",
            ["node", *unit, "reason"],
            registry=r,
        )
        self.trigger_events = Counter(
            "mlxfleet_trigger_events",
            "Offload trigger firings and clearings (coordinator/triggers.py), by node.",
            ["node", "trigger", "event"],
            registry=r,
        )
        self.trigger_active = Gauge(
            "mlxfleet_trigger_active",
            "1 while a trigger is fired on a node, 0 once it cleared.",
            ["node", "trigger"],
            registry=r,
        )
        self.ttft = Histogram(
            "mlxfleet_ttft_seconds",
            "Time to first token of streams: request arrival at the gateway to the first "
            "generated text sent to the client.",
            unit,
            buckets=TTFT_BUCKETS_S,
            registry=r,
        )
        self.tpot = Histogram(
            "mlxfleet_time_per_output_token_seconds",
            "Decode time per token of streams with two or more tokens: (last token - first "
            "token) / (tokens - 1). One over it is a slot's decode tokens/s.",
            unit,
            buckets=TPOT_BUCKETS_S,
            registry=r,
        )
        self.duration = Histogram(
            "mlxfleet_request_duration_seconds",
            "End-to-end time of requests that reached an engine, arrival to last byte.",
            unit,
            buckets=DURATION_BUCKETS_S,
            registry=r,
        )
        self.in_flight = Gauge(
            "mlxfleet_in_flight_requests",
            "Requests the gateway is serving now.",
            unit,
            registry=r,
        )
        self.waiting = Gauge(
            "mlxfleet_waiting_requests",
            "Requests waiting for an engine of their unit to be ready (a reload after idleness, "
            "a restart after a crash or an OOM kill, a re-placement); streams parked mid-answer "
            "included.",
            unit,
            registry=r,
        )
        self.engine_wait = Histogram(
            "mlxfleet_engine_wait_seconds",
            "How long requests waited for an engine of their unit, by outcome: served (one "
            "came) or unavailable (the deadline passed, nothing was coming, the client left).",
            [*unit, "outcome"],
            buckets=WAIT_BUCKETS_S,
            registry=r,
        )

    def watch(self, collector: Collector) -> None:
        """Add a collector read at scrape time (the fleet's state), on the event loop."""
        self._fleet.register(collector)

    def unit_seen(self, model: str, tier: str) -> None:
        """Create a unit's series at zero, so rates and ratios have data before traffic."""
        for family in (self.in_flight, self.waiting):
            family.labels(model, tier)
        for tokens in (self.prompt_tokens, self.generation_tokens):
            tokens.labels(model, tier, "")  # the key of none yet
        for cause in FAILOVER_CAUSES:
            self.failovers.labels(model, tier, cause)
        for histogram in (self.ttft, self.tpot, self.duration):
            histogram.labels(model, tier)

    def trigger_changed(self, node_id: str, trigger: str, fired: bool) -> None:
        event = "fired" if fired else "cleared"
        self.trigger_events.labels(node_id, trigger, event).inc()
        self.trigger_active.labels(node_id, trigger).set(1 if fired else 0)

    def engine_exited(self, node_id: str, model: str, tier: str, reason: str) -> None:
        self.engine_exits.labels(node_id, model, tier, reason).inc()

    def request_done(
        self,
        model: str,
        tier: str,
        status: int,
        duration_s: float | None,
        usage: tuple[int, int] | None,
        api: str,
        key: str = "",
    ) -> None:
        """One finished request: its status, and for those an engine served, time and tokens.
        `api` is the route's dialect: chat, completions, messages or responses; `key` the
        team key's name ("" when it had no valid key)."""
        self.requests.labels(model, tier, str(status), api, key).inc()
        if duration_s is not None:
            self.duration.labels(model, tier).observe(duration_s)
        if usage is not None:
            self.prompt_tokens.labels(model, tier, key).inc(usage[0])
            self.generation_tokens.labels(model, tier, key).inc(usage[1])

    def in_flight_began(self, model: str, tier: str) -> None:
        self.in_flight.labels(model, tier).inc()

    def in_flight_ended(self, model: str, tier: str) -> None:
        self.in_flight.labels(model, tier).dec()

    def waiting_began(self, model: str, tier: str) -> None:
        self.waiting.labels(model, tier).inc()

    def waiting_ended(self, model: str, tier: str, waited_s: float, served: bool) -> None:
        self.waiting.labels(model, tier).dec()
        outcome = "served" if served else "unavailable"
        self.engine_wait.labels(model, tier, outcome).observe(waited_s)

    def failover(self, model: str, tier: str, cause: str) -> None:
        """A request moved off an engine (cause: one of FAILOVER_CAUSES)."""
        self.failovers.labels(model, tier, cause).inc()

    def stream_timing(
        self, model: str, tier: str, ttft_s: float | None, decode_s: float, tokens: int
    ) -> None:
        """A stream's TTFT, and its time per output token when it decoded two or more."""
        if ttft_s is not None:
            self.ttft.labels(model, tier).observe(ttft_s)
        if tokens >= 2:
            self.tpot.labels(model, tier).observe(decode_s / (tokens - 1))

    def render_fleet(self) -> bytes:
        """The watched collectors' text. On the event loop."""
        return generate_latest(self._fleet)

    def render_counted(self) -> bytes:
        """The counters', gauges' and histograms' text. Any thread (the gateway uses one, so
        the loop is not blocked for the ~50 ms thousands of histogram buckets take)."""
        return generate_latest(self.registry)

    def render(self) -> bytes:
        """The whole exposition, on the event loop."""
        return self.render_counted() + self.render_fleet()

"""Prometheus metrics of the coordinator (prometheus-client, one registry per coordinator).

Served at GET /metrics on the gateway port. Labels carry node ids, models and trigger names,
never keys or secrets.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]


class Metrics:
    """The coordinator's metrics; a fresh registry each, so several can live in one process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.trigger_events = Counter(
            "mlxfleet_trigger_events",
            "Offload trigger firings and clearings (coordinator/triggers.py), by node.",
            ["node", "trigger", "event"],
            registry=self.registry,
        )
        self.trigger_active = Gauge(
            "mlxfleet_trigger_active",
            "1 while a trigger is fired on a node, 0 once it cleared.",
            ["node", "trigger"],
            registry=self.registry,
        )

    def trigger_changed(self, node_id: str, trigger: str, fired: bool) -> None:
        event = "fired" if fired else "cleared"
        self.trigger_events.labels(node_id, trigger, event).inc()
        self.trigger_active.labels(node_id, trigger).set(1 if fired else 0)

    def render(self) -> bytes:
        return generate_latest(self.registry)

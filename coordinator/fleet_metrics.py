"""The fleet's state as Prometheus gauges, read at scrape time, and the agents' scrape targets.

Nodes, units, placements, pending reasons, router deployments and tier knobs already live in
the registry, the reconciler and the router; copying them into gauges on every change would
be a second copy to keep in step. A collector reads them when Prometheus asks instead.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from coordinator.errors import SizingError
from coordinator.nodes import unit_state
from coordinator.reconcile import SIZING_PENDING, Reconciler, unit_of
from coordinator.registry import Node, Registry
from coordinator.routing import Routing
from coordinator.store import Store
from mlxfleet.tiers import TIERS

NODE_STATES = ("live", "suspect", "cordoned", "offline")
ROLES = ("laptop", "server")
UNIT_STATES = ("ready", "asleep", "loading", "pending")
MS_PER_S = 1000


def pending_code(reason: str) -> str:
    """A bounded label for a placement's free-text shortfall (coordinator/policy.py)."""
    if "GiB of disk" in reason:
        return "insufficient_disk"
    if reason.endswith("no node is connected"):
        return "no_node"
    if "no eligible node" in reason:
        return "no_eligible_node"
    if "free" in reason and "best node" in reason:
        return "insufficient_memory"
    if reason.startswith("waiting up to"):
        return "restoring"
    if reason == SIZING_PENDING:
        return "sizing"
    return "other"


def node_state(node: Node) -> str:
    return "cordoned" if node.cordoned else node.liveness


def sd_targets(registry: Registry) -> list[dict[str, Any]]:
    """Prometheus http_sd_configs: one target per connected agent that serves metrics."""
    return [
        {
            "targets": [node.metrics_target],
            "labels": {"node": node.node_id, "role": node.facts.role},
        }
        for node in sorted(registry.nodes.values(), key=lambda n: n.node_id)
        if node.metrics_target
    ]


class FleetCollector(Collector):
    """Gauges of the fleet's state. Collected on the event loop (the gateway's /metrics)."""

    def __init__(
        self, reconciler: Reconciler, registry: Registry, routing: Routing, store: Store
    ) -> None:
        self._reconciler = reconciler
        self._registry = registry
        self._routing = routing
        self._store = store

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield from self._nodes()
        yield from self._units()
        yield from self._router()
        yield from self._tiers()
        yield from self._files()
        yield from self._groups()
        yield GaugeMetricFamily(
            "mlxfleet_coordinator_asyncio_tasks",
            "Tasks alive on the coordinator's event loop (a leak shows as growth).",
            value=_loop_tasks(),
        )

    def _nodes(self) -> Iterator[GaugeMetricFamily]:
        counts = {(state, role): 0 for state in NODE_STATES for role in ROLES}
        info = GaugeMetricFamily(
            "mlxfleet_node_info",
            "1 per connected node, with its role, chip and state.",
            labels=["node", "role", "chip", "state"],
        )
        for node in self._registry.nodes.values():
            state = node_state(node)
            counts[state, node.facts.role] = counts.get((state, node.facts.role), 0) + 1
            info.add_metric([node.node_id, node.facts.role, node.facts.chip, state], 1)
        for node_id, _hostname, facts, _seen in self._store.enrolled_nodes():
            if node_id not in self._registry.nodes:
                role = str(facts.get("role", ""))
                counts["offline", role] = counts.get(("offline", role), 0) + 1
        nodes = GaugeMetricFamily(
            "mlxfleet_nodes",
            "Enrolled nodes by state (live, suspect: silent past 3 s, cordoned: drained, "
            "offline: not connected) and role.",
            labels=["state", "role"],
        )
        for (state, role), count in sorted(counts.items()):
            nodes.add_metric([state, role], count)
        yield nodes
        yield info

    def _units(self) -> Iterator[GaugeMetricFamily]:
        units = GaugeMetricFamily(
            "mlxfleet_units",
            "1 per configured model x tier, labelled with its state.",
            labels=["model", "tier", "state"],
        )
        replicas = GaugeMetricFamily(
            "mlxfleet_unit_replicas", "Replicas wanted per unit.", labels=["model", "tier"]
        )
        pending = GaugeMetricFamily(
            "mlxfleet_unit_pending",
            "1 per unit not fully placed, with why: no_node, no_eligible_node, "
            "insufficient_memory, insufficient_disk, restoring, sizing (files being read), "
            "sizing_error, load_failed, other.",
            labels=["model", "tier", "reason"],
        )
        placements = GaugeMetricFamily(
            "mlxfleet_placements",
            "1 per engine the coordinator placed, with its node and state.",
            labels=["node", "model", "tier", "state"],
        )
        rec = self._reconciler
        routable = self._routing.units()
        engines = list(self._registry.engines.values())
        for engine in engines:
            placements.add_metric([engine.node_id, engine.model, engine.tier, engine.state], 1)
        for spec in rec.units():
            mine = [e for e in engines if unit_of(e) == spec.key]
            state = unit_state(spec.key, rec, routable, mine)
            units.add_metric([spec.name, spec.tier, state], 1)
            replicas.add_metric([spec.name, spec.tier], spec.replicas)
            if spec.key in rec.load_failures:
                code = "load_failed"
            elif isinstance(rec.size(spec), SizingError):
                code = "sizing_error"
            elif spec.key in rec.pending:
                code = pending_code(rec.pending[spec.key])
            else:
                continue
            pending.add_metric([spec.name, spec.tier, code], 1)
        yield from (units, replicas, pending, placements)

    def _router(self) -> Iterator[GaugeMetricFamily]:
        deployments = GaugeMetricFamily(
            "mlxfleet_router_deployments",
            "Deployments in the LiteLLM Router by order (1 local, 2 remote, 3 cloud).",
            labels=["model", "tier", "order"],
        )
        cooldowns = GaugeMetricFamily(
            "mlxfleet_router_cooldowns",
            "Deployments LiteLLM is cooling down now (only the cloud fallback can: engines "
            "that fail leave the Router at once).",
            labels=["model", "tier"],
        )
        by_order: dict[tuple[str, str, int], int] = {}
        cooling: dict[tuple[str, str], int] = {}
        for target, cooled in self._routing.deployments():
            key = (target.model, target.tier, target.order)
            by_order[key] = by_order.get(key, 0) + 1
            unit = (target.model, target.tier)
            cooling[unit] = cooling.get(unit, 0) + int(cooled)
        for (model, tier, order), count in sorted(by_order.items()):
            deployments.add_metric([model, tier, str(order)], count)
        for (model, tier), count in sorted(cooling.items()):
            cooldowns.add_metric([model, tier], count)
        yield deployments
        yield cooldowns

    def _tiers(self) -> Iterator[GaugeMetricFamily]:
        families = {
            "max_concurrency": GaugeMetricFamily(
                "mlxfleet_tier_max_concurrency",
                "Sequences one engine decodes at once, per tier (knob in force).",
                labels=["tier"],
            ),
            "batch_window_ms": GaugeMetricFamily(
                "mlxfleet_tier_batch_window_seconds",
                "How long an engine waits to admit requests together, per tier.",
                labels=["tier"],
            ),
            "max_batch_size": GaugeMetricFamily(
                "mlxfleet_tier_max_batch_size",
                "Most requests admitted in one batch, per tier.",
                labels=["tier"],
            ),
            "queue_limit": GaugeMetricFamily(
                "mlxfleet_tier_queue_limit",
                "Requests an engine queues before answering 429, per tier.",
                labels=["tier"],
            ),
        }
        for tier in TIERS:
            knobs = self._reconciler.knobs(tier)
            for name, family in families.items():
                value = getattr(knobs, name)
                family.add_metric([tier], value / MS_PER_S if name.endswith("_ms") else value)
        yield from families.values()

    def _files(self) -> Iterator[GaugeMetricFamily]:
        """Model files: each node's disk room, the files it holds and its copies under way.
        Labelled by model name (a source no configured model names is left out: a local
        folder's path is nobody's business on a dashboard)."""
        room = GaugeMetricFamily(
            "mlxfleet_node_disk_room_bytes",
            "Bytes of model files a node can take now (free disk within its budget, unused "
            "files counted as free).",
            labels=["node"],
        )
        held = GaugeMetricFamily(
            "mlxfleet_model_files_bytes",
            "Bytes of a model's files a node holds, complete and verified.",
            labels=["node", "model"],
        )
        labels = ["node", "model", "origin"]
        done = GaugeMetricFamily(
            "mlxfleet_model_copy_bytes",
            "Bytes a copy under way has so far (origin: peer or hub).",
            labels=labels,
        )
        total = GaugeMetricFamily(
            "mlxfleet_model_copy_size_bytes", "Bytes a copy under way will have.", labels=labels
        )
        rate = GaugeMetricFamily(
            "mlxfleet_model_copy_rate_bytes_per_second",
            "A copy's rate over the last few seconds.",
            labels=labels,
        )
        names: dict[str, str] = {}
        for spec in sorted(self._reconciler.units(), key=lambda s: s.name, reverse=True):
            names[spec.source] = spec.name
        for node in sorted(self._registry.nodes.values(), key=lambda n: n.node_id):
            status = node.status
            if status is None:
                continue
            if status.disk_room_bytes is not None:
                room.add_metric([node.node_id], status.disk_room_bytes)
            for h in status.held:
                if h.source in names:
                    held.add_metric([node.node_id, names[h.source]], h.bytes)
            for c in status.copies:
                if c.source in names:
                    values = [node.node_id, names[c.source], c.origin]
                    done.add_metric(values, c.bytes_done)
                    total.add_metric(values, c.bytes_total)
                    rate.add_metric(values, c.bytes_per_s)
        yield from (room, held, done, total, rate)

    def _groups(self) -> Iterator[GaugeMetricFamily]:
        """Models spread over several nodes as the reconciler placed them
        (coordinator/group_engines.py): each member's node, rank, layers and share in bytes."""
        members = GaugeMetricFamily(
            "mlxfleet_group_member_bytes",
            "Bytes of a group member's share on its node (its layers' weights and KV, and what "
            "every member holds), labelled with its node, rank and layers.",
            labels=["model", "tier", "group", "node", "rank", "first_layer", "layers"],
        )
        groups = self._reconciler.groups.groups
        for group_id, running in sorted(groups.items()):
            for s in running.placement.shares:
                labels = [running.model, running.tier, group_id, s.node_id, str(s.rank)]
                members.add_metric([*labels, str(s.first_layer), str(s.layers)], s.bytes)
        yield members


def _loop_tasks() -> int:
    """Tasks alive on the running event loop; 0 when collected outside one (in tests)."""
    try:
        return len(asyncio.all_tasks())
    except RuntimeError:
        return 0

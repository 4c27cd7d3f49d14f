"""What `mlxfleet nodes` shows: live, suspect, offline (enrolled) and discovered (mDNS only)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Literal

from coordinator.discovery import Discovery
from coordinator.reconcile import Reconciler, UnitKey, unit_of
from coordinator.registry import Engine, Registry
from coordinator.routing import Routing
from coordinator.store import Store

GIB = 2**30


def node_rows(
    registry: Registry, store: Store, discovery: Discovery | None
) -> list[dict[str, object]]:
    """One row per node the coordinator knows of, enrolled first, sorted by id."""
    rows: dict[str, dict[str, object]] = {}
    for node_id, hostname, facts, _last_seen in store.enrolled_nodes():
        rows[node_id] = {
            "id": node_id,
            "hostname": hostname,
            "chip": facts.get("chip", ""),
            "ram_gib": round(int(facts.get("ram_bytes", 0)) / GIB),  # type: ignore[call-overload]
            "role": facts.get("role", ""),
            "version": facts.get("agent_version", ""),
            "state": "offline",
            "thermal": "",
            "available_gib": None,
            "models": [],
        }
    for node in registry.nodes.values():
        row = rows.setdefault(node.node_id, {"id": node.node_id, "hostname": node.facts.hostname})
        row.update(
            chip=node.facts.chip,
            ram_gib=round(node.facts.ram_bytes / GIB),
            role=node.facts.role,
            version=node.facts.agent_version,  # the mlxfleet the agent runs
            state=node.liveness,
            cordoned=node.cordoned,
            files_url=node.files_url,  # where its agent serves model files to fleet members
            link_address=node.link_address,  # where it relays groups' rank traffic
            thermal=node.status.thermal_state if node.status else "",
            available_gib=round(node.status.available_bytes / GIB, 1) if node.status else None,
            models=sorted(
                f"{e.model} ({e.state})"
                for e in registry.engines.values()
                if e.node_id == node.node_id
            ),
        )
    for found in discovery.nodes.values() if discovery else ():
        if found.node_id in rows:
            continue  # enrolled: the gRPC stream is the truth, mDNS only found it
        rows[found.node_id] = {
            "id": found.node_id,
            "hostname": ",".join(found.addresses),
            "chip": found.chip,
            "ram_gib": found.ram_gib,
            "role": found.role,
            "state": "discovered",  # seen on the LAN, never enrolled: never routed to
            "thermal": found.thermal,
            "available_gib": found.avail_gib,
            "models": [],
        }
    return [rows[k] for k in sorted(rows)]


UnitState = Literal["ready", "asleep", "loading", "pending"]


def unit_state(
    key: UnitKey,
    reconciler: Reconciler,
    routable: set[tuple[str, str]],
    engines: Iterable[Engine],
) -> UnitState:
    """Ready (routable), asleep (idle-unloaded; a request wakes it), loading, or pending."""
    if key in routable:
        return "ready"
    if reconciler.is_asleep(key):
        return "asleep"
    if any(e.state == "starting" for e in engines):
        return "loading"
    return "pending"


def group_rows(reconciler: Reconciler, key: UnitKey) -> list[dict[str, object]]:
    return [
        {
            "group": g.group_id,
            "members": [
                {
                    "node": s.node_id,
                    "rank": s.rank,
                    "layers": f"{s.first_layer}-{s.first_layer + s.layers - 1}",
                    "bytes": s.bytes,
                }
                for s in g.placement.shares
            ],
        }
        for g in sorted(reconciler.groups.groups.values(), key=lambda g: g.group_id)
        if (g.model, g.tier) == key
    ]


def model_rows(
    reconciler: Reconciler, registry: Registry, routing: Routing
) -> list[dict[str, object]]:
    """One row per unit (model × tier): state, where it runs, why not, its size and knobs."""
    rows = []
    routable = routing.units()
    for spec in sorted(reconciler.units(), key=lambda s: s.key):
        engines = sorted(
            (e for e in registry.engines.values() if unit_of(e) == spec.key),
            key=lambda e: e.engine_id,
        )
        size = reconciler.size(spec)
        usage = reconciler.usage.get(spec.key)
        files_on, copies = reconciler.holdings.where(spec.source, registry.nodes.values())
        rows.append(
            {
                "model": spec.name,
                "tier": spec.tier,
                "state": unit_state(spec.key, reconciler, routable, engines),
                "replicas": spec.replicas,
                "pinned": spec.pinned,
                "engines": [
                    f"{e.node_id}: {e.state}{f' (rank {e.rank})' if e.group_id else ''}"
                    for e in engines
                ],
                # Replicas spread over several nodes: each member's rank, layers and bytes.
                "groups": group_rows(reconciler, spec.key),
                # Why replicas are missing, and the last load failure until an engine is ready
                # (a copy's bad file, a download refused): both, when both are known.
                "pending": "; ".join(
                    r
                    for r in (
                        reconciler.pending.get(spec.key),
                        reconciler.load_failures.get(spec.key),
                    )
                    if r
                )
                or None,
                "size_gib": round(size / GIB, 2) if isinstance(size, int) else None,
                "knobs": {
                    k: getattr(reconciler.engine_knobs(spec), k)
                    for k in ("max_concurrency", "batch_window_ms", "max_batch_size", "queue_limit")
                },
                "idle_s": round(time.monotonic() - usage.last_used)
                if usage and usage.last_used
                else None,
                "cold_starts": sum(1 for key, _ in reconciler.cold_starts if key == spec.key),
                "files_on": files_on,  # nodes holding its files, complete and verified
                "copies": [f"{node}: {copy}" for node, copy in copies.items()],
            }
        )
    return rows

"""What `mlxfleet nodes` shows: live, suspect, offline (enrolled) and discovered (mDNS only)."""

from __future__ import annotations

from coordinator.discovery import Discovery
from coordinator.registry import Registry
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
            state=node.liveness,
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

"""The /admin/v1 routes of the local `mlxfleet nodes|tiers|models` CLI (the admin token)."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict

from aiohttp import web

from coordinator.discovery import Discovery
from coordinator.gateway.auth import Auth
from coordinator.nodes import model_rows, node_rows
from coordinator.reconcile import Reconciler
from coordinator.registry import NodeId, Registry
from coordinator.routing import Routing
from coordinator.store import Store
from mlxfleet.errors import ApiError, TierError
from mlxfleet.tiers import TIERS, parse_tier

logger = logging.getLogger(__name__)


class AdminRoutes:
    """Every /admin/v1 route; each needs the admin token. Create and use from the event loop."""

    def __init__(
        self,
        auth: Auth,
        store: Store,
        registry: Registry,
        reconciler: Reconciler,
        routing: Routing,
    ) -> None:
        self._auth = auth
        self._store = store
        self._registry = registry
        self._reconciler = reconciler
        self._routing = routing
        self._discovery: Discovery | None = None

    def set_discovery(self, discovery: Discovery) -> None:
        """mDNS started (after the gateway): node rows show what it found."""
        self._discovery = discovery

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/admin/v1/nodes", self.nodes)
        app.router.add_delete("/admin/v1/nodes/{node_id}", self.remove_node)
        app.router.add_post("/admin/v1/nodes/{node_id}/drain", self.drain)
        app.router.add_post("/admin/v1/nodes/{node_id}/uncordon", self.uncordon)
        app.router.add_get("/admin/v1/tiers", self.tiers)
        app.router.add_post("/admin/v1/tiers/{tier}", self.set_tier)
        app.router.add_get("/admin/v1/models", self.models)

    async def nodes(self, request: web.Request) -> web.Response:
        self._auth.admin(request)
        rows = node_rows(self._registry, self._store, self._discovery)
        return web.json_response({"nodes": rows})

    async def remove_node(self, request: web.Request) -> web.Response:
        """Revoke a node: its certificate is refused from now on and its models move."""
        self._auth.admin(request)
        node_id = request.match_info["node_id"]
        if not self._store.revoke_node(node_id):
            raise ApiError(404, f"no enrolled node {node_id!r}", code="node_not_found")
        self._registry.disconnect(NodeId(node_id))
        self._store.add_event(node_id, "node_removed", "revoked by an operator")
        logger.warning("node %s revoked", node_id)
        return web.json_response({"removed": node_id})

    async def drain(self, request: web.Request) -> web.Response:
        """Cordon a node: its replicas move elsewhere (each leaves once its replacement is
        ready; in-flight requests finish) and nothing new is placed there."""
        return self._cordon(request, True)

    async def uncordon(self, request: web.Request) -> web.Response:
        return self._cordon(request, False)

    def _cordon(self, request: web.Request, cordoned: bool) -> web.Response:
        self._auth.admin(request)
        node_id = request.match_info["node_id"]
        if not self._store.set_cordoned(node_id, cordoned):
            raise ApiError(404, f"no enrolled node {node_id!r}", code="node_not_found")
        self._registry.set_cordoned(NodeId(node_id), cordoned)
        self._store.add_event(node_id, "node_drained" if cordoned else "node_uncordoned", "")
        return web.json_response({"node": node_id, "cordoned": cordoned})

    async def tiers(self, request: web.Request) -> web.Response:
        self._auth.admin(request)
        return web.json_response({tier: asdict(self._reconciler.knobs(tier)) for tier in TIERS})

    async def set_tier(self, request: web.Request) -> web.Response:
        """Change a tier's knobs at runtime; running engines apply them without reloading."""
        self._auth.admin(request)
        try:
            tier = parse_tier(request.match_info["tier"])
            changes = await request.json()
            if not isinstance(changes, dict) or not changes:
                raise TierError("send a JSON object with the knobs to change")
            knobs = self._reconciler.set_tier_knobs(tier, changes)
        except (TierError, json.JSONDecodeError) as exc:
            raise ApiError(400, str(exc), code="invalid_knobs") from None
        return web.json_response({tier: asdict(knobs)})

    async def models(self, request: web.Request) -> web.Response:
        self._auth.admin(request)
        return web.json_response(
            {"models": model_rows(self._reconciler, self._registry, self._routing)}
        )

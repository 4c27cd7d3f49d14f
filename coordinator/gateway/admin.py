"""The /admin/v1 routes of `mlxfleet nodes|tiers|models` (local admin or operator token)."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from dataclasses import asdict
from typing import Any

from aiohttp import web

from coordinator.catalog import Catalog, ModelExists, ModelNotFound
from coordinator.discovery import Discovery
from coordinator.errors import ConfigError, SizingError
from coordinator.gateway.auth import Auth
from coordinator.model_files import read_model_files
from coordinator.nodes import model_rows, node_rows
from coordinator.reconcile import Reconciler
from coordinator.registry import NodeId, Registry
from coordinator.request_log import USAGE_GROUPS, RequestLog
from coordinator.routing import Routing
from coordinator.store import Store
from mlxfleet.errors import ApiError, TierError
from mlxfleet.tiers import TIERS, parse_tier

logger = logging.getLogger(__name__)

USAGE_SINCE_S = 7 * 86400.0
AUDIT_SINCE_S = 86400.0
AUDIT_LIMIT = 100
MAX_AUDIT_LIMIT = 100_000


class AdminRoutes:
    """Every /admin/v1 route; each needs an admin token (Auth.admin). Use from the event loop."""

    def __init__(
        self,
        auth: Auth,
        store: Store,
        registry: Registry,
        reconciler: Reconciler,
        routing: Routing,
        request_log: RequestLog,
        catalog: Catalog,
    ) -> None:
        self._auth = auth
        self._log = request_log
        self._catalog = catalog
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
        app.router.add_post("/admin/v1/models", self.add_model)
        app.router.add_patch("/admin/v1/models/{name:.+}", self.set_model)
        app.router.add_delete("/admin/v1/models/{name:.+}", self.remove_model)
        app.router.add_delete("/admin/v1/model_changes/{name:.+}", self.reset_model)
        app.router.add_post("/admin/v1/reload", self.reload)
        app.router.add_get("/admin/v1/usage", self.usage)
        app.router.add_get("/admin/v1/audit", self.audit)

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

    async def add_model(self, request: web.Request) -> web.Response:
        """A new model from its fleet.toml table (JSON): served without a restart."""
        self._auth.admin(request)
        table = await _json_object(request)
        await _check_source(table.get("source"))
        try:
            units = self._catalog.add(table)
        except ModelExists as exc:
            raise ApiError(409, str(exc), code="model_exists") from None
        except ConfigError as exc:
            raise ApiError(400, str(exc), code="invalid_model") from None
        return web.json_response({"model": table["name"], "tiers": [u.tier for u in units]})

    async def set_model(self, request: web.Request) -> web.Response:
        """Change a model's table fields (JSON): running engines that were started otherwise
        are replaced, each once its replacement is ready."""
        self._auth.admin(request)
        name = request.match_info["name"]
        changes = await _json_object(request)
        if "name" in changes and changes["name"] != name:
            raise ApiError(
                400, "a model cannot be renamed: add it under the new name", param="name"
            )
        if "source" in changes:
            await _check_source(changes["source"])
        try:
            units = self._catalog.set(name, changes)
        except ModelNotFound:
            raise _not_found(name) from None
        except ConfigError as exc:
            raise ApiError(400, str(exc), code="invalid_model") from None
        return web.json_response({"model": name, "tiers": [u.tier for u in units]})

    async def remove_model(self, request: web.Request) -> web.Response:
        """Stop serving a model: 404 for new requests now; its streams in flight finish, then
        its engines are unloaded."""
        self._auth.admin(request)
        name = request.match_info["name"]
        try:
            self._catalog.remove(name)
        except ModelNotFound:
            raise _not_found(name) from None
        except ConfigError as exc:  # a change that no longer fits: nothing was removed
            raise ApiError(400, str(exc), code="invalid_model") from None
        return web.json_response({"removed": name})

    async def reset_model(self, request: web.Request) -> web.Response:
        """Forget a model's runtime change: fleet.toml's tables of it apply again."""
        self._auth.admin(request)
        name = request.match_info["name"]
        try:
            self._catalog.reset(name)
        except ModelNotFound:
            raise ApiError(
                404, f"model {name!r} has no runtime change", code="model_not_found"
            ) from None
        except ConfigError as exc:
            raise ApiError(400, str(exc), code="invalid_model") from None
        return web.json_response({"reset": name, "served": name in self._catalog.tables()})

    async def reload(self, request: web.Request) -> web.Response:
        """Re-read fleet.toml: its models apply now; 400 with the reason (nothing changes)
        when it does not load."""
        self._auth.admin(request)
        try:
            later = self._catalog.reload()
        except ConfigError as exc:
            raise ApiError(400, f"not reloaded: {exc}", code="invalid_config") from None
        catalog = self._catalog
        return web.json_response(
            {
                "models": sorted(catalog.tables()),
                "needs_restart": later,
                "overridden": catalog.overridden(),
            }
        )

    async def usage(self, request: web.Request) -> web.Response:
        """Totals since `since` (unix seconds, default 7 days ago) `by` key, model, tier or
        day: requests, answered (2xx) and tokens."""
        self._auth.admin(request)
        by = request.query.get("by", "key")
        if by not in USAGE_GROUPS:
            raise ApiError(400, f"by={by!r}: one of {', '.join(USAGE_GROUPS)}", param="by")
        since = _since(request, USAGE_SINCE_S)
        rows = await asyncio.to_thread(self._log.usage, since, by)
        return web.json_response({"since": since, "by": by, "rows": rows})

    async def audit(self, request: web.Request) -> web.Response:
        """The newest request records (`limit`, default 100) since `since` (default a day
        ago), of one `key` (name or id) and one `model` if given: never prompt or answer."""
        self._auth.admin(request)
        since = _since(request, AUDIT_SINCE_S)
        limit = _int_query(request, "limit", AUDIT_LIMIT, MAX_AUDIT_LIMIT)
        key, model = request.query.get("key"), request.query.get("model")
        rows = await asyncio.to_thread(self._log.audit, since, key, model, limit)
        return web.json_response({"since": since, "rows": rows})


def _int_query(request: web.Request, name: str, default: int, most: int) -> int:
    text = request.query.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 0 < value <= most:
        raise ApiError(400, f"{name}={text!r}: a whole number in 1-{most}", param=name)
    return value


def _since(request: web.Request, default_s: float) -> float:
    """`since` as unix seconds (400 unless a number); absent: `default_s` ago."""
    text = request.query.get("since")
    if text is None:
        return time.time() - default_s
    try:
        since = float(text)
    except ValueError:
        since = math.nan
    if not math.isfinite(since):
        raise ApiError(400, f"since={text!r}: unix seconds", param="since")
    return since


async def _json_object(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        body = None
    if not isinstance(body, dict):
        raise ApiError(400, "send a JSON object: the model's fleet.toml fields")
    return body


async def _check_source(source: object) -> None:
    """400 unless `source` is a readable model folder or a Hugging Face id (one not in this
    host's cache is fetched by the nodes)."""
    if not isinstance(source, str) or not source:
        raise ApiError(400, "'source' must be a model folder or a Hugging Face id", param="source")
    try:
        await asyncio.to_thread(read_model_files, source)
    except (SizingError, OSError) as exc:
        raise ApiError(
            400, f"source {source!r}: {exc}", param="source", code="invalid_source"
        ) from None


def _not_found(name: str) -> ApiError:
    return ApiError(404, f"no model {name!r} is configured", code="model_not_found")

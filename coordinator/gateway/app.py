"""The gateway's aiohttp application: middlewares, the route table and the `Gateway` facade.

Every refusal happens before any engine work, as JSON in the route's dialect (Anthropic's
shape on /v1/messages, OpenAI's everywhere else). An OpenAI client's response body is the
engine's own bytes, streamed as they arrive; another dialect's is its adapter's mapping.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from aiohttp import web

from coordinator import __version__
from coordinator.catalog import Catalog
from coordinator.config import Config
from coordinator.discovery import Discovery
from coordinator.fleet_metrics import sd_targets
from coordinator.gateway import anthropic
from coordinator.gateway.admin import AdminRoutes
from coordinator.gateway.admission import Admission
from coordinator.gateway.anthropic import AnthropicRoutes
from coordinator.gateway.auth import Auth
from coordinator.gateway.flights import Flights
from coordinator.gateway.forward import Forwarder
from coordinator.gateway.front import Front
from coordinator.gateway.limits import KeyLimits, Reservation
from coordinator.gateway.openai import OpenAIRoutes
from coordinator.gateway.record import Recorder
from coordinator.gateway.responses import ResponsesRoutes
from coordinator.metrics import CONTENT_TYPE_LATEST
from coordinator.reconcile import Reconciler
from coordinator.registry import EngineId, Registry
from coordinator.request_log import RequestLog
from coordinator.routing import Routing
from coordinator.status_page import StatusPage
from coordinator.store import Store
from mlxfleet.dialects.anthropic_request import error_body as anthropic_error
from mlxfleet.errors import ApiError

MAX_BODY_KEY = web.AppKey("max_body_bytes", int)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(err: ApiError, path: str = "") -> web.Response:
    """The error in the dialect of the route it happened on."""
    if path in anthropic.PATHS:
        status, body = anthropic_error(err)
        return web.json_response(body, status=status, headers=err.headers)
    return web.json_response(err.body(), status=err.status, headers=err.headers)


@web.middleware
async def api_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every failure at this edge into an error in the route's dialect, never a
    traceback."""
    try:
        return await handler(request)
    except ApiError as err:
        return error_response(err, request.path)
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[MAX_BODY_KEY]
        too_large = f"request body over the {limit}-byte limit"
        return error_response(ApiError(413, too_large, code="request_too_large"), request.path)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        refused = ApiError(exc.status, exc.reason, type="invalid_request_error")
        return error_response(refused, request.path)


class Gateway:
    """The HTTP edge: builds the rooms (auth, admission, forward path, dialects, admin) and
    the application serving them. Create and use from the event loop."""

    def __init__(
        self,
        config: Config,
        store: Store,
        routing: Routing,
        registry: Registry,
        reconciler: Reconciler,
        catalog: Catalog,
        admin_token: str,
    ) -> None:
        self._config = config
        self._registry = registry
        self._metrics = metrics = reconciler.metrics
        auth = Auth(store, admin_token)
        self.limits = KeyLimits()
        self.limiter = self.limits.limiter
        self._flights = Flights()
        routing.on_engine_removed(self.abort_engine)
        self._forwarder = Forwarder(
            config, routing, reconciler, metrics, self.limits, self._flights
        )
        self.request_log = RequestLog(
            config.db_path, config.usage_retention_days, config.usage_max_rows
        )
        recorder = Recorder(metrics, self.request_log)
        front = Front(auth, Admission(config, reconciler, self.limits), self._forwarder, recorder)
        self.openai = OpenAIRoutes(front, routing, reconciler)
        self.anthropic = AnthropicRoutes(front)
        self.responses = ResponsesRoutes(front)
        self.admin = AdminRoutes(
            auth, store, registry, reconciler, routing, self.request_log, catalog
        )
        self.status_page = StatusPage(metrics.registry, reconciler, registry, routing, store)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[api_errors], client_max_size=self._config.max_body_bytes)
        app[MAX_BODY_KEY] = self._config.max_body_bytes
        self.openai.add_routes(app)
        self.anthropic.add_routes(app)
        self.responses.add_routes(app)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/prometheus/targets", self.prometheus_targets)
        self.admin.add_routes(app)
        self.status_page.add_routes(app)
        app.on_startup.append(self._open)
        app.on_cleanup.append(self._close)
        return app

    def set_discovery(self, discovery: Discovery) -> None:
        """mDNS runs (it starts after the gateway): admin rows and the status page use it."""
        self.admin.set_discovery(discovery)
        self.status_page.set_discovery(discovery)

    def settle_usage(
        self, reservation: Reservation | None, prompt_tokens: int, completion_tokens: int
    ) -> None:
        """Charge a request's real usage to its key's tpm window in place of the estimate
        (`request.get(RESERVATION_KEY)`; None: the key has no rate limits). Call it once the
        usage is known; with 0, 0 when no engine generated anything."""
        self.limits.settle_usage(reservation, prompt_tokens, completion_tokens)

    def abort_engine(self, engine_id: EngineId) -> None:
        """The engine left the router: fail the requests in flight to it (see Flights.abort)."""
        self._flights.abort(engine_id)

    async def _open(self, _app: web.Application) -> None:
        await self._forwarder.open()

    async def _close(self, _app: web.Application) -> None:
        await self._forwarder.close()
        await asyncio.to_thread(self.request_log.close)  # what is queued gets written

    async def health(self, _request: web.Request) -> web.Response:
        """Unauthenticated, like /metrics: the version tells an operator what answers there."""
        return web.json_response({"status": "ok", "version": __version__})

    async def metrics(self, _request: web.Request) -> web.Response:
        """Prometheus text format; unauthenticated, like any scrape target (no secrets in it)."""
        fleet = self._metrics.render_fleet()  # reads loop-owned state: here, on the loop
        counted = await asyncio.to_thread(self._metrics.render_counted)
        return web.Response(body=counted + fleet, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def prometheus_targets(self, _request: web.Request) -> web.Response:
        """Prometheus HTTP service discovery: every connected agent's metrics address, with
        its node id and role as target labels. Unauthenticated, like /metrics."""
        return web.json_response(sd_targets(self._registry))

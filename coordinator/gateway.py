"""The OpenAI-compatible HTTP edge: parse, check, let the Router pick, pass the engine's bytes on.

Every refusal is OpenAI-shaped JSON and happens before any engine work. The response body is
the engine's own bytes, streamed as they arrive: the gateway never re-encodes a chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass

import aiohttp
from aiohttp import web

from coordinator.cloud import serve_cloud
from coordinator.config import RETRY_AFTER_S, Config
from coordinator.discovery import Discovery
from coordinator.fleet_metrics import sd_targets
from coordinator.limits import (
    BYTES_PER_TOKEN,
    Limiter,
    Reservation,
    check_model,
    estimate_tokens,
)
from coordinator.metrics import CONTENT_TYPE_LATEST
from coordinator.nodes import model_rows, node_rows
from coordinator.reconcile import Reconciler, UnitKey
from coordinator.registry import EngineId, NodeId, Registry
from coordinator.relay import SSE_DONE, StreamRelay
from coordinator.routing import Routing, Target
from coordinator.status_page import StatusPage
from coordinator.store import ApiKey, Store
from coordinator.tiers import KeyTiers, key_tiers
from mlxfleet.errors import ApiError, TierError
from mlxfleet.openai.protocol import parse_chat_request, parse_completion_request
from mlxfleet.tiers import TIER_HEADER, TIERS, parse_tier

logger = logging.getLogger(__name__)

CLIENT_GONE = 499  # the status nginx made common for "the client closed the connection"
STREAM_FAILED = 502  # a stream no engine could finish (it ends with an error event)
ATTEMPTS = 3  # engines tried for one request before answering 503 (only before any byte is sent)
ENGINE_CONNECT_TIMEOUT_S = 5.0
WAKE_POLL_S = 0.05
MAX_BODY_KEY = web.AppKey("max_body_bytes", int)
# The request's tpm charge, when its key has rate limits: hand it to Gateway.settle_usage.
RESERVATION_KEY = web.RequestKey("mlxfleet_reservation", Reservation)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(err: ApiError) -> web.Response:
    return web.json_response(err.body(), status=err.status, headers=err.headers)


def unavailable(model: str, tier: str) -> ApiError:
    return ApiError(
        503,
        f"model {model!r} has no engine ready in the {tier} tier; retry shortly",
        type="service_unavailable",
        code="model_unavailable",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


@web.middleware
async def openai_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every failure at this edge into an OpenAI-shaped error, never a traceback."""
    try:
        return await handler(request)
    except ApiError as err:
        return error_response(err)
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[MAX_BODY_KEY]
        return error_response(
            ApiError(413, f"request body over the {limit}-byte limit", code="request_too_large")
        )
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(ApiError(exc.status, exc.reason, type="invalid_request_error"))


class Gateway:
    """Routes /v1 requests to engines. Create and use from the event loop."""

    def __init__(
        self,
        config: Config,
        store: Store,
        routing: Routing,
        registry: Registry,
        reconciler: Reconciler,
        admin_token: str,
    ) -> None:
        self._config = config
        self._store = store
        self._routing = routing
        self._registry = registry
        self._reconciler = reconciler
        self._admin_token = admin_token
        self.limiter = Limiter()
        self.discovery: Discovery | None = None  # set when mDNS runs
        self.status_page = StatusPage(
            reconciler.metrics.registry, reconciler, registry, routing, store
        )
        self._flights: dict[EngineId, set[_Flight]] = {}
        routing.on_remove.append(self.abort_engine)
        self._session: aiohttp.ClientSession | None = None

    def app(self) -> web.Application:
        app = web.Application(
            middlewares=[openai_errors], client_max_size=self._config.max_body_bytes
        )
        app[MAX_BODY_KEY] = self._config.max_body_bytes
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/prometheus/targets", self.prometheus_targets)
        app.router.add_get("/admin/v1/nodes", self.admin_nodes)
        app.router.add_delete("/admin/v1/nodes/{node_id}", self.admin_remove_node)
        app.router.add_post("/admin/v1/nodes/{node_id}/drain", self.admin_drain)
        app.router.add_post("/admin/v1/nodes/{node_id}/uncordon", self.admin_uncordon)
        app.router.add_get("/admin/v1/tiers", self.admin_tiers)
        app.router.add_post("/admin/v1/tiers/{tier}", self.admin_set_tier)
        app.router.add_get("/admin/v1/models", self.admin_models)
        self.status_page.add_routes(app)
        app.on_startup.append(self._open)
        app.on_cleanup.append(self._close)
        return app

    async def _open(self, _app: web.Application) -> None:
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=ENGINE_CONNECT_TIMEOUT_S)
        self._session = aiohttp.ClientSession(connector=connector, timeout=timeout)

    async def _close(self, _app: web.Application) -> None:
        if self._session is not None:
            await self._session.close()

    # Handlers
    async def health(self, _request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def metrics(self, _request: web.Request) -> web.Response:
        """Prometheus text format; unauthenticated, like any scrape target (no secrets in it)."""
        metrics = self._reconciler.metrics
        fleet = metrics.render_fleet()  # reads loop-owned state: here, on the loop
        counted = await asyncio.to_thread(metrics.render_counted)
        return web.Response(body=counted + fleet, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def prometheus_targets(self, _request: web.Request) -> web.Response:
        """Prometheus HTTP service discovery: every connected agent's metrics address, with
        its node id and role as target labels. Unauthenticated, like /metrics."""
        return web.json_response(sd_targets(self._registry))

    async def models(self, request: web.Request) -> web.Response:
        """Models this key may use, with their state per tier. A unit is listed when it has a
        ready engine or sleeps (idle-unloaded: a request wakes it); a unit whose engine died
        or that cannot be placed is not."""
        record, key = self._authenticate(request)
        allowed = key.allowed
        routable = self._routing.units()
        tiers: dict[str, dict[str, str]] = {}
        for spec in self._reconciler.units():
            if spec.tier not in allowed or (record.models and spec.name not in record.models):
                continue
            if spec.key in routable:
                tiers.setdefault(spec.name, {})[spec.tier] = "ready"
            elif self._reconciler.is_asleep(spec.key):
                tiers.setdefault(spec.name, {})[spec.tier] = "asleep"
        created = int(time.time())
        data = [
            {
                "id": name,
                "object": "model",
                "created": created,
                "owned_by": "mlxfleet",
                "mlxfleet": {"tiers": states},
            }
            for name, states in sorted(tiers.items())
        ]
        return web.json_response({"object": "list", "data": data})

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "chat")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "completion")

    # Admin (the local `mlxfleet nodes` CLI; token in MLXFLEET_HOME/admin_token)
    def _authenticate_admin(self, request: web.Request) -> None:
        header = request.headers.get("Authorization", "")
        token = header.removeprefix("Bearer ").strip()
        if not header.startswith("Bearer ") or not hmac.compare_digest(
            token.encode(), self._admin_token.encode()
        ):
            raise ApiError(401, "missing or invalid admin token", code="invalid_admin_token")

    async def admin_nodes(self, request: web.Request) -> web.Response:
        self._authenticate_admin(request)
        return web.json_response({"nodes": node_rows(self._registry, self._store, self.discovery)})

    async def admin_remove_node(self, request: web.Request) -> web.Response:
        """Revoke a node: its certificate is refused from now on and its models move."""
        self._authenticate_admin(request)
        node_id = request.match_info["node_id"]
        if not self._store.revoke_node(node_id):
            raise ApiError(404, f"no enrolled node {node_id!r}", code="node_not_found")
        self._registry.disconnect(NodeId(node_id))
        self._store.add_event(node_id, "node_removed", "revoked by an operator")
        logger.warning("node %s revoked", node_id)
        return web.json_response({"removed": node_id})

    async def admin_drain(self, request: web.Request) -> web.Response:
        """Cordon a node: its replicas move elsewhere (each leaves once its replacement is
        ready; in-flight requests finish) and nothing new is placed there."""
        return self._cordon(request, True)

    async def admin_uncordon(self, request: web.Request) -> web.Response:
        return self._cordon(request, False)

    def _cordon(self, request: web.Request, cordoned: bool) -> web.Response:
        self._authenticate_admin(request)
        node_id = request.match_info["node_id"]
        if not self._store.set_cordoned(node_id, cordoned):
            raise ApiError(404, f"no enrolled node {node_id!r}", code="node_not_found")
        node = self._registry.nodes.get(NodeId(node_id))
        if node is not None:
            node.cordoned = cordoned
        self._registry.changed.set()
        self._store.add_event(node_id, "node_drained" if cordoned else "node_uncordoned", "")
        return web.json_response({"node": node_id, "cordoned": cordoned})

    async def admin_tiers(self, request: web.Request) -> web.Response:
        self._authenticate_admin(request)
        return web.json_response({tier: asdict(self._reconciler.knobs(tier)) for tier in TIERS})

    async def admin_set_tier(self, request: web.Request) -> web.Response:
        """Change a tier's knobs at runtime; running engines apply them without reloading."""
        self._authenticate_admin(request)
        try:
            tier = parse_tier(request.match_info["tier"])
            changes = await request.json()
            if not isinstance(changes, dict) or not changes:
                raise TierError("send a JSON object with the knobs to change")
            knobs = self._reconciler.set_tier_knobs(tier, changes)
        except (TierError, json.JSONDecodeError) as exc:
            raise ApiError(400, str(exc), code="invalid_knobs") from None
        return web.json_response({tier: asdict(knobs)})

    async def admin_models(self, request: web.Request) -> web.Response:
        self._authenticate_admin(request)
        return web.json_response(
            {"models": model_rows(self._reconciler, self._registry, self._routing)}
        )

    # The request path
    def _authenticate(self, request: web.Request) -> tuple[ApiKey, KeyTiers]:
        """The request's team key (401 without a valid one) and the tiers it may use."""
        header = request.headers.get("Authorization", "")
        key = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else ""
        record = self._store.api_key(key) if key else None
        if record is None:
            raise ApiError(
                401,
                "missing or invalid API key (send Authorization: Bearer <team key>)",
                code="invalid_api_key",
            )
        return record, key_tiers(record.tiers, record.default_tier)

    def settle_usage(
        self, reservation: Reservation | None, prompt_tokens: int, completion_tokens: int
    ) -> None:
        """Charge a request's real usage to its key's tpm window in place of the estimate
        (`request.get(RESERVATION_KEY)`; None: the key has no rate limits). Call it once the
        usage is known; with 0, 0 when no engine generated anything."""
        if reservation is not None:
            self.limiter.settle(reservation, prompt_tokens + completion_tokens)

    async def _generate(self, request: web.Request, kind: str) -> web.StreamResponse:
        """Serve one completion request and record it in the metrics, however it ends."""
        outcome = _Outcome(time.monotonic())
        try:
            response = await self._serve(request, kind, outcome)
            outcome.status = outcome.status or response.status
            return response
        except ApiError as err:
            outcome.status = err.status
            raise
        except web.HTTPException as exc:
            outcome.status = exc.status
            raise
        except (asyncio.CancelledError, ConnectionResetError):
            outcome.status = CLIENT_GONE
            raise
        except Exception:
            outcome.status = 500
            raise
        finally:
            self._record(outcome)

    def _record(self, outcome: _Outcome) -> None:
        metrics = self._reconciler.metrics
        model, tier = outcome.model, outcome.tier
        duration = time.monotonic() - outcome.started if outcome.served else None
        metrics.request_done(model, tier, outcome.status, duration, outcome.usage)
        relay = outcome.relay
        if relay is not None and relay.first_content_at is not None:
            tokens = outcome.usage[1] if outcome.usage else 0
            metrics.stream_timing(
                model,
                tier,
                relay.first_content_at - outcome.started,
                relay.last_content_at - relay.first_content_at,
                tokens,
            )

    async def _serve(
        self, request: web.Request, kind: str, outcome: _Outcome
    ) -> web.StreamResponse:
        record, key = self._authenticate(request)
        try:
            tier = key.choose(request.headers.get(TIER_HEADER))
        except TierError as exc:
            status = 403 if "may not use" in str(exc) else 400
            raise ApiError(
                status,
                str(exc),
                type="permission_error" if status == 403 else "invalid_request_error",
                param=TIER_HEADER,
                code="tier_not_allowed" if status == 403 else "invalid_tier",
            ) from None
        raw = await request.read()
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ApiError(400, f"request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "request body must be a JSON object")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise ApiError(400, "'model' must be a non-empty string", param="model")
        check_model(record.models, model)
        spec = self._config.unit(model, tier)
        if spec is not None:
            outcome.model, outcome.tier = spec.name, spec.tier  # configured: bounded labels
        if spec is None:
            served = sorted(s.tier for s in self._reconciler.units() if s.name == model)
            where = f" in the {tier} tier (it is served in: {', '.join(served)})" if served else ""
            raise ApiError(
                404,
                f"model {model!r} does not exist{where}",
                param="model",
                code="model_not_found",
            )
        parse = parse_chat_request if kind == "chat" else parse_completion_request
        try:
            parsed = parse(body)
        except ApiError as exc:
            raise ApiError(
                exc.status, exc.message, type=exc.type, param=exc.param, code=exc.code
            ) from None
        max_tokens = parsed.params.max_tokens
        # The prompt is tokenized on the engine (it holds the tokenizer), which refuses an
        # over-long prompt before generating; a max_tokens that alone fills the context is
        # refused here without engine work.
        context = self._reconciler.context_length(spec)
        if max_tokens is not None and max_tokens >= context:
            raise ApiError(
                400,
                f"max_tokens {max_tokens} leaves no room for the prompt in "
                f"{model!r}'s context of {context} tokens",
                param="max_tokens",
                code="context_length_exceeded",
            )
        estimate = estimate_tokens(max_tokens, len(raw))
        reservation = self.limiter.acquire(record.name, record.rpm, record.tpm, estimate)
        if reservation is not None:
            request[RESERVATION_KEY] = reservation
        self._reconciler.begin_request(spec.key)
        in_flight = self._reconciler.metrics.in_flight.labels(*spec.key)
        in_flight.inc()
        try:
            await self._wake(spec.key)
            return await self._forward(request, spec.key, raw, parsed.stream, outcome)
        finally:
            in_flight.dec()
            self._reconciler.end_request(spec.key)

    async def _wake(self, key: UnitKey) -> None:
        """A unit unloaded for idleness is loaded again; the request waits for it, bounded."""
        if not self._reconciler.is_asleep(key) or key in self._routing.units():
            return
        started = time.monotonic()
        self._reconciler.wake(key)
        deadline = started + self._config.reload_wait_s
        while key not in self._routing.units() and time.monotonic() < deadline:
            await asyncio.sleep(WAKE_POLL_S)
        waited = time.monotonic() - started
        self._reconciler.cold_starts.append((key, waited))
        logger.info("cold start of %s/%s: %.2f s", *key, waited)

    async def _forward(
        self, request: web.Request, key: UnitKey, raw: bytes, stream: bool, outcome: _Outcome
    ) -> web.StreamResponse:
        """Try engines until one answers. Before the client has a byte, a failing engine is
        simply replaced; after, a stream that breaks is continued on the next engine."""
        relay: StreamRelay | None = None
        body = raw
        failovers = self._reconciler.metrics.failovers
        for _ in range(ATTEMPTS):
            target = await self._routing.pick(*key, self._in_flight_count)
            if target is None:
                break
            if target.cloud:
                if relay is not None:  # a provider cannot continue our engine's tokens
                    break
                failovers.labels(*key, "cloud").inc()
                response, usage = await serve_cloud(request, self._routing, target, raw, key[1])
                outcome.served, outcome.usage = True, usage
                self._settle(request, usage)
                return response
            with self._in_flight(target.engine_id) as flight:
                try:
                    upstream = await flight.run(self._post(target, request.path, body))
                except (aiohttp.ClientConnectionError, TimeoutError) as exc:
                    logger.warning(
                        "engine %s unreachable (%s): unrouting it", target.engine_id, exc
                    )
                    self._routing.remove_engine(target.engine_id)
                    failovers.labels(*key, "retry").inc()
                    continue
                flight.upstream = upstream
                async with upstream:
                    first = b""
                    if relay is None:
                        try:
                            if upstream.status != 200 or not stream:
                                data = await upstream.read()
                                outcome.served, outcome.usage = True, _body_usage(data)
                                self._settle(request, outcome.usage)
                                return web.Response(
                                    body=data,
                                    status=upstream.status,
                                    content_type="application/json",
                                    headers={
                                        **_passthrough_headers(upstream),
                                        TIER_HEADER: key[1],
                                    },
                                )
                            # The client gets its headers with the first chunk, so an engine
                            # that fails before that is retried elsewhere unnoticed.
                            first = await upstream.content.readany()
                            if not first:
                                raise aiohttp.ClientPayloadError("stream ended before a chunk")
                        except aiohttp.ClientError as exc:
                            logger.warning(
                                "engine %s failed before answering: %s", target.engine_id, exc
                            )
                            self._routing.remove_engine(target.engine_id)
                            failovers.labels(*key, "retry").inc()
                            continue
                        relay = outcome.relay = await self._open_stream(
                            request, key[1], target, outcome.started
                        )
                        outcome.served = True
                    elif upstream.status != 200:
                        logger.warning(
                            "engine %s refused a continuation (%d)",
                            target.engine_id,
                            upstream.status,
                        )
                        continue
                    try:
                        if await relay.pump(upstream, first):
                            await relay.finish()
                            self._settle_stream(request, relay, outcome)
                            return relay.response
                    except ConnectionResetError:
                        # The client left: closing upstream (on return) frees the engine's slot.
                        outcome.status = CLIENT_GONE
                        self._settle_stream(request, relay, outcome)
                        return relay.response
            # The engine broke the stream midway (died, left the router, sent an error).
            logger.warning("engine %s broke a stream: continuing elsewhere", target.engine_id)
            if not relay.engine_error:  # an engine that answered with an error event is alive
                self._routing.remove_engine(target.engine_id)
            continued = relay.continuation(raw)
            if continued is None:  # the client has everything but [DONE]
                with contextlib.suppress(ConnectionResetError):
                    await relay.response.write(SSE_DONE)
                    await relay.finish()
                self._settle_stream(request, relay, outcome)
                return relay.response
            failovers.labels(*key, "continued").inc()
            body = continued
        if relay is None:
            self._settle(request, (0, 0))
            raise unavailable(*key)
        await relay.fail()
        outcome.status = STREAM_FAILED
        self._settle_stream(request, relay, outcome)
        return relay.response

    async def _open_stream(
        self, request: web.Request, tier: str, target: Target, started: float
    ) -> StreamRelay:
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                TIER_HEADER: tier,  # which tier served it
            }
        )
        await response.prepare(request)
        # Interactive TTFT feeds the tail trigger of the node that answered first.
        on_first: Callable[[float], None] | None = None
        if tier == "interactive":
            node_id = target.node_id
            on_first = lambda ttft_s: self._reconciler.observe_ttft(node_id, ttft_s)  # noqa: E731
        return StreamRelay(response, on_first, started)

    def _settle(self, request: web.Request, usage: tuple[int, int] | None) -> None:
        reservation = request.get(RESERVATION_KEY)
        if reservation is not None and usage is not None:
            self.settle_usage(reservation, *usage)

    def _settle_stream(self, request: web.Request, relay: StreamRelay, outcome: _Outcome) -> None:
        """A stream's usage: the engine's, else (a stream that did not finish) the tokens the
        client got; the key's tpm is charged the prompt estimate, the metrics no prompt."""
        usage = relay.usage()
        if usage is None:
            completion = relay.completion_tokens()
            prompt_estimate = (request.content_length or 0) // BYTES_PER_TOKEN
            outcome.usage = (0, completion)
            self._settle(request, (prompt_estimate, completion))
        else:
            outcome.usage = usage
            self._settle(request, usage)

    async def _post(self, target: Target, path: str, raw: bytes) -> aiohttp.ClientResponse:
        assert self._session is not None
        return await self._session.post(
            f"{target.url}{path}",
            data=raw,
            headers={
                "Authorization": f"Bearer {target.secret}",
                "Content-Type": "application/json",
            },
            # A remote engine must present its node's certificate (CN = node id).
            ssl=self._routing.engine_tls if target.tls else True,
            server_hostname=target.node_id if target.tls else None,
        )

    @contextlib.contextmanager
    def _in_flight(self, engine_id: EngineId) -> Iterator[_Flight]:
        """Track a request so that an engine leaving the router aborts it (see abort_engine)."""
        flight = _Flight()
        flights = self._flights.setdefault(engine_id, set())
        flights.add(flight)
        try:
            yield flight
        finally:
            flights.discard(flight)
            if not flights:
                self._flights.pop(engine_id, None)

    def _in_flight_count(self, engine_id: EngineId) -> int:
        return len(self._flights.get(engine_id, ()))

    def abort_engine(self, engine_id: EngineId) -> None:
        """The engine left the router (its node went silent, it exited, it was unloaded):
        requests waiting on it must not hang. Aborting fails them, which retries those that
        sent nothing to the client and ends the others with an error event."""
        for flight in list(self._flights.get(engine_id, ())):
            flight.abort()


@dataclass(slots=True)
class _Outcome:
    """What the metrics record of one request, filled in as it goes."""

    started: float  # time.monotonic() at arrival
    model: str = ""  # set once the request names a configured unit
    tier: str = ""
    status: int = 0  # 0: the response's own status
    served: bool = False  # an engine (or the cloud) answered
    usage: tuple[int, int] | None = None  # (prompt, completion) tokens
    relay: StreamRelay | None = None


class _Flight:
    """One request to one engine, abortable while it waits for headers or reads the body."""

    def __init__(self) -> None:
        self.aborted = asyncio.Event()
        self.upstream: aiohttp.ClientResponse | None = None

    def abort(self) -> None:
        self.aborted.set()
        if self.upstream is not None:
            self.upstream.close()  # a pending read now raises ClientConnectionError

    async def run(self, post: Awaitable[aiohttp.ClientResponse]) -> aiohttp.ClientResponse:
        """Await the response headers unless aborted first (then ClientConnectionError)."""
        task = asyncio.ensure_future(post)
        aborted = asyncio.ensure_future(self.aborted.wait())
        try:
            await asyncio.wait({task, aborted}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # the client went away: no orphaned request
            task.cancel()
            raise
        finally:
            aborted.cancel()
        if not task.done():
            task.cancel()
            raise aiohttp.ClientConnectionError("engine left the router")
        return task.result()


def _passthrough_headers(upstream: aiohttp.ClientResponse) -> dict[str, str]:
    retry_after = upstream.headers.get("Retry-After")
    return {"Retry-After": retry_after} if retry_after else {}


def _body_usage(data: bytes) -> tuple[int, int] | None:
    """(prompt, completion) tokens of a non-streamed response body, if it has them."""
    try:
        usage = json.loads(data).get("usage") or {}
        return int(usage["prompt_tokens"]), int(usage["completion_tokens"])
    except (ValueError, AttributeError, KeyError, TypeError):
        return None

"""The one forward path under every dialect: pick a deployment, post, fail over, relay.

The request's own bytes go to the engine and the engine's bytes come back unchanged (for a
client of another dialect, its adapter's mapping of them: `Reply`). Before the client has a
byte, a failing engine is simply replaced; after, a stream that breaks is continued on the next
engine (relay.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from coordinator.affinity import NO_PREFIX, Prefix
from coordinator.cloud import serve_cloud
from coordinator.config import RETRY_AFTER_S, Config
from coordinator.gateway.flights import Flights
from coordinator.gateway.limits import BYTES_PER_TOKEN, KeyLimits
from coordinator.gateway.record import CLIENT_GONE, Outcome
from coordinator.gateway.relay import SSE_DONE, StreamRelay, cached_tokens
from coordinator.metrics import Metrics
from coordinator.reconcile import Reconciler, UnitKey
from coordinator.registry import EngineId
from coordinator.routing import Routing, Target
from mlxfleet.dialects.chat_answer import Translator
from mlxfleet.errors import ApiError
from mlxfleet.tiers import TIER_HEADER

logger = logging.getLogger(__name__)

STREAM_FAILED = 502  # a stream no engine could finish (it ends with an error event)
ATTEMPTS = 3  # engines tried for one request before answering 503 (only before any byte is sent)
ENGINE_CONNECT_TIMEOUT_S = 5.0
WAIT_POLL_S = 0.05  # how often a request waiting for an engine looks for one
WARM_UP_STREAMS = 8  # an engine's first interactive streams do not feed the tail trigger
MAX_WARMING_ENGINES = 4096


@dataclass(frozen=True, slots=True)
class Reply:
    """How an admitted request is answered: the engine route it is posted to and, for a client
    of another dialect, how the engines' chat answer becomes that dialect's."""

    api: str  # the metrics' api label: chat, completions, messages or responses
    path: str  # the engine route
    whole: Callable[[dict[str, Any]], dict[str, Any]] | None = None  # None: the body as it came
    translator: Callable[[], Translator] | None = None  # None: the chat events as they came
    cloud: bool = True  # whether the cloud fallback may answer it (not a token count)


@dataclass(frozen=True, slots=True)
class Admitted:
    """A dialect's validated request: what admission checks and what the engines get."""

    max_tokens: int | None
    stream: bool
    body: bytes  # posted to the engine at reply.path
    reply: Reply
    prefix: Prefix = NO_PREFIX  # its keys for cache-aware routing (affinity.py)


def engine_refusal(status: int, data: bytes, headers: dict[str, str]) -> ApiError:
    """An engine's OpenAI-shaped error body as an ApiError, for a client of another dialect."""
    try:
        error = json.loads(data)["error"]
        message, kind = str(error["message"]), str(error.get("type") or "invalid_request_error")
    except (ValueError, KeyError, TypeError):
        message, kind = data.decode(errors="replace")[:200], "server_error"
    return ApiError(status, message, type=kind, headers=headers)


def unavailable(model: str, tier: str) -> ApiError:
    return ApiError(
        503,
        f"model {model!r} has no engine ready in the {tier} tier; retry shortly",
        type="service_unavailable",
        code="model_unavailable",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


class Forwarder:
    """Serves admitted requests from engines. Create and use from the event loop, between
    `open` and `close` (they own the HTTP client session to the engines)."""

    def __init__(
        self,
        config: Config,
        routing: Routing,
        reconciler: Reconciler,
        metrics: Metrics,
        limits: KeyLimits,
        flights: Flights,
    ) -> None:
        self._config = config
        self._routing = routing
        self._reconciler = reconciler
        self._metrics = metrics
        self._limits = limits
        self._flights = flights
        self._session: aiohttp.ClientSession | None = None
        # Interactive streams each engine has answered, up to WARM_UP_STREAMS (tail trigger).
        self._warming: dict[EngineId, int] = {}

    async def open(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=ENGINE_CONNECT_TIMEOUT_S)
        self._session = aiohttp.ClientSession(connector=connector, timeout=timeout)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def serve(
        self, request: web.Request, key: UnitKey, admitted: Admitted, outcome: Outcome
    ) -> web.StreamResponse:
        """Answer an admitted request from unit `key`, counted in flight for the unit while
        it runs."""
        self._reconciler.begin_request(key)
        self._metrics.in_flight_began(*key)
        try:
            return await self._forward(request, key, admitted, outcome)
        finally:
            self._metrics.in_flight_ended(*key)
            self._reconciler.end_request(key)

    async def _target(self, request: web.Request, key: UnitKey, prefix: Prefix) -> Target | None:
        """The deployment for the request; when the unit has none but one is on its way (a
        reload after idleness, a restart after a crash, a re-placement), the request waits for
        it, up to engine_wait_s. None: nothing is coming, the wait ran out, or the client left
        (then there is no one to answer)."""
        target = await self._routing.pick(*key, self._flights.count, prefix)
        if target is not None or not self._reconciler.expecting(key):
            return target
        asleep = self._reconciler.is_asleep(key)
        self._reconciler.wake(key)
        started = time.monotonic()
        deadline = started + self._config.engine_wait_s
        self._metrics.waiting_began(*key)
        try:
            while target is None and time.monotonic() < deadline:
                if request.transport is None or request.transport.is_closing():
                    break  # the client left: stop waiting for it
                if not self._reconciler.expecting(key):
                    break  # e.g. no node can hold it after all
                await asyncio.sleep(WAIT_POLL_S)
                target = await self._routing.pick(*key, self._flights.count, prefix)
        finally:
            waited = time.monotonic() - started
            self._metrics.waiting_ended(*key, waited, served=target is not None)
        if asleep:
            self._reconciler.note_cold_start(key, waited)
        logger.info(
            "%s/%s: waited %.2f s for an engine: %s",
            *key,
            waited,
            "one is ready" if target is not None else "none came",
        )
        return target

    async def _forward(
        self, request: web.Request, key: UnitKey, admitted: Admitted, outcome: Outcome
    ) -> web.StreamResponse:
        """Try engines until one answers (at most ATTEMPTS)."""
        relay: StreamRelay | None = None
        raw, stream, reply = admitted.body, admitted.stream, admitted.reply
        body = raw
        for _ in range(ATTEMPTS):
            # A continuation keeps the request's keys (its prompt begins the same way), and
            # waits like a new request when the unit's only engine is gone: the stream parks.
            target = await self._target(request, key, admitted.prefix)
            if target is None:
                break
            if target.cloud:
                if relay is not None or not reply.cloud:  # a provider cannot continue our
                    break  # engine's tokens, nor count them with our tokenizer
                self._metrics.failover(*key, "cloud")
                response, usage = await serve_cloud(
                    request, self._routing, target, raw, key[1], reply
                )
                outcome.served, outcome.usage, outcome.target = True, usage, target
                self._limits.settle(request, usage)
                return response
            with self._flights.track(target.engine_id) as flight:
                posted = time.monotonic()
                try:
                    upstream = await flight.run(self._post(target, reply.path, body))
                except (aiohttp.ClientConnectionError, TimeoutError) as exc:
                    logger.warning(
                        "engine %s unreachable (%s): unrouting it", target.engine_id, exc
                    )
                    self._unroute(target, key)
                    continue
                flight.reading(upstream)
                outcome.target = target  # answering, for now: the audit log's route
                async with upstream:
                    first = b""
                    if relay is None:
                        try:
                            if upstream.status != 200 or not stream:
                                return await self._whole(request, upstream, key, outcome, reply)
                            # The client gets its headers with the first chunk, so an engine
                            # that fails before that is retried elsewhere unnoticed.
                            first = await upstream.content.readany()
                            if not first:
                                raise aiohttp.ClientPayloadError("stream ended before a chunk")
                        except aiohttp.ClientError as exc:
                            logger.warning(
                                "engine %s failed before answering: %s", target.engine_id, exc
                            )
                            self._unroute(target, key)
                            continue
                        relay = outcome.relay = await self._open_stream(
                            request, key[1], target, outcome.started, reply
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
                        if await relay.pump(upstream, first, self._config.stream_stall_s):
                            self._tail_sample(key, target, relay, posted)
                            await relay.finish()
                            self._settle_stream(request, relay, outcome)
                            return relay.response
                    except ConnectionResetError:
                        # The client left: closing upstream (on return) frees the engine's slot.
                        outcome.status = CLIENT_GONE
                        self._settle_stream(request, relay, outcome)
                        return relay.response
            # The engine broke the stream midway (died, left the router, sent an error, or
            # sent nothing for stream_stall_s: hung).
            logger.warning(
                "engine %s %s a stream: continuing elsewhere",
                target.engine_id,
                "stalled" if relay.stalled else "broke",
            )
            if not relay.engine_error:  # an engine that answered with an error event is alive
                self._routing.remove_engine(target.engine_id)
            continued = relay.continuation(raw)
            if continued is None:  # the client has everything but [DONE]
                return await self._end_stream(request, relay, outcome)
            self._metrics.failover(*key, "continued")
            body = continued
        if relay is None:
            self._limits.settle(request, (0, 0))
            raise unavailable(*key)
        await relay.fail()
        outcome.status = STREAM_FAILED
        self._settle_stream(request, relay, outcome)
        return relay.response

    def _unroute(self, target: Target, key: UnitKey) -> None:
        """An engine failed before the client had a byte: out of the router, try the next."""
        self._routing.remove_engine(target.engine_id)
        self._metrics.failover(*key, "retry")

    async def _whole(
        self,
        request: web.Request,
        upstream: aiohttp.ClientResponse,
        key: UnitKey,
        outcome: Outcome,
        reply: Reply,
    ) -> web.Response:
        """A non-streamed answer (or an engine's refusal), passed on as it came or mapped to
        the client's dialect."""
        data = await upstream.read()
        outcome.usage, outcome.cached_tokens = _body_usage(data)
        outcome.served = True
        self._limits.settle(request, outcome.usage)
        if reply.whole is not None:
            if upstream.status != 200:
                raise engine_refusal(upstream.status, data, _passthrough_headers(upstream))
            data = json.dumps(reply.whole(json.loads(data))).encode()
        return web.Response(
            body=data,
            status=upstream.status,
            content_type="application/json",
            headers={**_passthrough_headers(upstream), TIER_HEADER: key[1]},
        )

    async def _open_stream(
        self, request: web.Request, tier: str, target: Target, started: float, reply: Reply
    ) -> StreamRelay:
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                TIER_HEADER: tier,  # which tier served it
            }
        )
        await response.prepare(request)
        translator = reply.translator() if reply.translator is not None else None
        return StreamRelay(response, None, started, translator)

    def _tail_sample(self, key: UnitKey, target: Target, relay: StreamRelay, posted: float) -> None:
        """An interactive stream one engine answered start to finish feeds its node's tail
        trigger: TTFT from posting to that engine, and the prompt tokens it prefilled (the
        prompt less its prefix-cache hit), from the usage on its finishing event."""
        if key[1] != "interactive" or relay.continuations or relay.first_content_at is None:
            return
        prefilled = relay.prefilled_tokens()
        if prefilled is None or self._warming_up(target.engine_id):
            return
        ttft_s = relay.first_content_at - posted
        self._reconciler.observe_ttft(target.node_id, ttft_s, prefilled)

    def _warming_up(self, engine_id: EngineId) -> bool:
        """Whether this stream is among the engine's first WARM_UP_STREAMS: MLX compiles its
        kernels for each new shape (batch size, length) on first use, so a new engine's first
        streams are slow whatever else runs (seen on the H200: the first 4 of 328 at 3-11x the
        median, enough to fire the trigger on its first 20 samples). Counts up to the limit."""
        seen = self._warming.get(engine_id, 0)
        if seen >= WARM_UP_STREAMS:
            return False
        self._warming[engine_id] = seen + 1
        if len(self._warming) > MAX_WARMING_ENGINES:  # engines come and go: forget the oldest
            del self._warming[next(iter(self._warming))]
        return True

    async def _end_stream(
        self, request: web.Request, relay: StreamRelay, outcome: Outcome
    ) -> web.StreamResponse:
        """The client has every event but [DONE] (the engine broke right after its finish)."""
        with contextlib.suppress(ConnectionResetError):
            await relay.write(SSE_DONE)
            await relay.finish()
        self._settle_stream(request, relay, outcome)
        return relay.response

    def _settle_stream(self, request: web.Request, relay: StreamRelay, outcome: Outcome) -> None:
        """A stream's usage: the engine's, else (a stream that did not finish) the tokens the
        client got; the key's tpm is charged the prompt estimate, the metrics no prompt."""
        usage = relay.usage()
        if usage is None:
            completion = relay.completion_tokens()
            prompt_estimate = (request.content_length or 0) // BYTES_PER_TOKEN
            outcome.usage = (0, completion)
            self._limits.settle(request, (prompt_estimate, completion))
        else:
            outcome.usage = usage
            outcome.cached_tokens = relay.cached_tokens()
            self._limits.settle(request, usage)

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


def _passthrough_headers(upstream: aiohttp.ClientResponse) -> dict[str, str]:
    retry_after = upstream.headers.get("Retry-After")
    return {"Retry-After": retry_after} if retry_after else {}


def _body_usage(data: bytes) -> tuple[tuple[int, int] | None, int]:
    """(prompt, completion) tokens of a non-streamed response body, if it has them, and the
    prompt tokens the prefix cache served (0 if absent)."""
    try:
        usage = json.loads(data).get("usage") or {}
    except (ValueError, AttributeError):
        return None, 0
    if not isinstance(usage, dict):
        return None, 0
    try:
        counts = int(usage["prompt_tokens"]), int(usage["completion_tokens"])
    except (ValueError, KeyError, TypeError):
        counts = None
    return counts, cached_tokens(usage)

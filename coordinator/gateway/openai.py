"""The OpenAI dialect: /v1/chat/completions, /v1/completions, /v1/models and /v1/models/{id}.

Each completion route parses and validates the body with the shared OpenAI wire code (the
same the engine runs), so every refusal happens before engine work, then hands the original
bytes to the forward path. Another dialect is one more module like this one over the same
Auth, Admission and Forwarder.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from coordinator.gateway.admission import Admission
from coordinator.gateway.auth import Auth, choose_tier
from coordinator.gateway.forward import Forwarder
from coordinator.gateway.record import Outcome, Recorder
from coordinator.reconcile import Reconciler
from coordinator.routing import Routing
from mlxfleet.errors import ApiError
from mlxfleet.openai.protocol import (
    ChatRequest,
    CompletionRequest,
    parse_chat_request,
    parse_completion_request,
)

Parser = Callable[[dict[str, Any]], ChatRequest | CompletionRequest]
PARSERS: dict[str, Parser] = {"chat": parse_chat_request, "completion": parse_completion_request}


def json_object(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object (400 otherwise)."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    return body


class OpenAIRoutes:
    """The OpenAI-compatible routes. Create and use from the event loop."""

    def __init__(
        self,
        auth: Auth,
        admission: Admission,
        forwarder: Forwarder,
        recorder: Recorder,
        routing: Routing,
        reconciler: Reconciler,
    ) -> None:
        self._auth = auth
        self._admission = admission
        self._forwarder = forwarder
        self._recorder = recorder
        self._routing = routing
        self._reconciler = reconciler

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/models/{model}", self.model)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "chat")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "completion")

    def _model_objects(self, request: web.Request) -> list[dict[str, Any]]:
        """Models this key may use, with their state per tier. A unit is listed when it has a
        ready engine or sleeps (idle-unloaded: a request wakes it); a unit whose engine died
        or that cannot be placed is not."""
        record, key = self._auth.team_key(request)
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
        return [
            {
                "id": name,
                "object": "model",
                "created": created,
                "owned_by": "mlxfleet",
                "mlxfleet": {"tiers": states},
            }
            for name, states in sorted(tiers.items())
        ]

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": self._model_objects(request)})

    async def model(self, request: web.Request) -> web.Response:
        """One model of the list (OpenAI's retrieve); 404 in OpenAI's shape for any other."""
        name = request.match_info["model"]
        for model in self._model_objects(request):
            if model["id"] == name:
                return web.json_response(model)
        raise ApiError(
            404,
            f"The model '{name}' does not exist or is not available to this key.",
            param="model",
            code="model_not_found",
        )

    async def _generate(self, request: web.Request, kind: str) -> web.StreamResponse:
        """Serve one completion request and record it in the metrics, however it ends."""
        with self._recorder.measure() as outcome:
            response = await self._serve(request, kind, outcome)
            outcome.status = outcome.status or response.status
            return response

    async def _serve(self, request: web.Request, kind: str, outcome: Outcome) -> web.StreamResponse:
        record, key = self._auth.team_key(request)
        tier = choose_tier(key, request)
        raw = await request.read()
        body = json_object(raw)
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise ApiError(400, "'model' must be a non-empty string", param="model")
        spec = self._admission.unit(record, model, tier, outcome)
        parsed = PARSERS[kind](body)  # raises an OpenAI-shaped ApiError
        self._admission.admit(request, record, spec, parsed.params.max_tokens, len(raw))
        return await self._forwarder.serve(request, spec.key, raw, parsed.stream, outcome)

"""The OpenAI dialect: /v1/chat/completions, /v1/completions, /v1/models and /v1/models/{id}.

Each completion route parses and validates the body with the shared OpenAI wire code (the
same the engine runs), so every refusal happens before engine work, then hands the original
bytes to the one forward path (front.py). The other dialects are modules like this one.
"""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from coordinator.affinity import chat_prefix, prompt_prefix
from coordinator.gateway.forward import Admitted, Reply
from coordinator.gateway.front import CHAT_PATH, Front
from coordinator.reconcile import Reconciler
from coordinator.routing import Routing
from mlxfleet.errors import ApiError
from mlxfleet.openai.protocol import parse_chat_request, parse_completion_request

CHAT = Reply("chat", CHAT_PATH)
COMPLETIONS = Reply("completions", "/v1/completions")


def adapt_chat(body: dict[str, Any], raw: bytes) -> Admitted:
    parsed = parse_chat_request(body)  # raises an OpenAI-shaped ApiError
    return Admitted(parsed.params.max_tokens, parsed.stream, raw, CHAT, chat_prefix(body))


def adapt_completion(body: dict[str, Any], raw: bytes) -> Admitted:
    parsed = parse_completion_request(body)
    prefix = prompt_prefix(body.get("prompt"))
    return Admitted(parsed.params.max_tokens, parsed.stream, raw, COMPLETIONS, prefix)


class OpenAIRoutes:
    """The OpenAI-compatible routes. Create and use from the event loop."""

    def __init__(self, front: Front, routing: Routing, reconciler: Reconciler) -> None:
        self._front = front
        self._routing = routing
        self._reconciler = reconciler

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/models/{model}", self.model)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._front.generate(request, "chat", adapt_chat)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._front.generate(request, "completions", adapt_completion)

    def _model_objects(self, request: web.Request) -> list[dict[str, Any]]:
        """Models this key may use, with their state per tier. A unit is listed when it has a
        ready engine or sleeps (idle-unloaded: a request wakes it); a unit whose engine died
        or that cannot be placed is not."""
        record, key = self._front.auth.team_key(request)
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

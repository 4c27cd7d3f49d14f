"""The steps every dialect's completion route shares: key, tier, body, unit, limits, forward.

A dialect module supplies an `Adapter`: it validates the body in the dialect's own terms and
says what the engines get (a chat or completion body) and how their answer goes back
(`Reply`). Everything else (key checks, tiers, limits, routing order, continuation on engine
failure, metrics) is this one path, so it applies to every dialect unchanged.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from coordinator.config import ModelSpec
from coordinator.gateway.admission import Admission
from coordinator.gateway.auth import Auth, choose_tier
from coordinator.gateway.forward import Admitted, Forwarder
from coordinator.gateway.record import Outcome, Recorder
from coordinator.store import ApiKey
from mlxfleet.errors import ApiError
from mlxfleet.openai.protocol import parse_chat_request

Adapter = Callable[[dict[str, Any], bytes], Admitted]  # (the JSON body, its bytes)
CHAT_PATH = "/v1/chat/completions"  # the engines' route every other dialect is mapped onto


def checked_chat(chat: dict[str, Any], in_own_terms: Callable[[ApiError], ApiError]) -> bytes:
    """A dialect's mapped chat body, checked as the engine will check it (a refusal named in
    the dialect's own terms), as the bytes to post."""
    try:
        parse_chat_request(chat)
    except ApiError as err:
        raise in_own_terms(err) from None
    return json.dumps(chat).encode()


def json_object(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object (400 otherwise)."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    return body


@dataclass(frozen=True, slots=True)
class Front:
    """Serves completion requests of any dialect. Create and use from the event loop."""

    auth: Auth
    admission: Admission
    forwarder: Forwarder
    recorder: Recorder

    async def generate(self, request: web.Request, api: str, adapt: Adapter) -> web.StreamResponse:
        """Serve one completion request and record it in the metrics (label `api`), however
        it ends."""
        with self.recorder.measure() as outcome:
            outcome.api = api
            response = await self._serve(request, adapt, outcome, charge=True)
            outcome.status = outcome.status or response.status
            return response

    async def count(self, request: web.Request, adapt: Adapter) -> web.StreamResponse:
        """Serve a request that generates nothing (a token count): the key and the model are
        checked, no limit is charged, no completion is recorded."""
        return await self._serve(request, adapt, Outcome(time.monotonic()), charge=False)

    async def _serve(
        self, request: web.Request, adapt: Adapter, outcome: Outcome, *, charge: bool
    ) -> web.StreamResponse:
        record, spec, body, raw = await self._unit(request, outcome)
        admitted = adapt(body, raw)  # raises the dialect's refusal as an ApiError
        if charge:
            self.admission.admit(request, record, spec, admitted.max_tokens, len(raw))
        return await self.forwarder.serve(request, spec.key, admitted, outcome)

    async def _unit(
        self, request: web.Request, outcome: Outcome
    ) -> tuple[ApiKey, ModelSpec, dict[str, Any], bytes]:
        record, key = self.auth.team_key(request)
        outcome.key_name, outcome.key_id = record.name, record.key_id
        tier = choose_tier(key, request)
        raw = await request.read()
        body = json_object(raw)
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise ApiError(400, "'model' must be a non-empty string", param="model")
        return record, self.admission.unit(record, model, tier, outcome), body, raw

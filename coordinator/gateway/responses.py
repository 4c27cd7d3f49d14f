"""The OpenAI Responses dialect: POST /v1/responses, stateless (Codex CLI's and the OpenAI Agents
SDK's default API).

The body is validated in the Responses API's terms (mlxfleet/dialects/responses_request.py),
mapped onto a chat body, checked once more by the shared chat validation the engines run, and
answered by the one forward path. Errors are OpenAI-shaped, as for chat completions.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from coordinator.affinity import chat_prefix
from coordinator.gateway.forward import Admitted, Reply
from coordinator.gateway.front import CHAT_PATH, Front, checked_chat
from mlxfleet.dialects.chat_answer import read_answer
from mlxfleet.dialects.responses_answer import ResponsesStream, whole_response
from mlxfleet.dialects.responses_request import in_responses_terms, parse_responses_request


def adapt_responses(body: dict[str, Any], raw: bytes) -> Admitted:
    request = parse_responses_request(body)
    chat = checked_chat(request.chat, in_responses_terms)
    model, echo, summary = request.model, request.echo, request.summary
    reply = Reply(
        "responses",
        CHAT_PATH,
        whole=lambda answer: whole_response(read_answer(answer), model, echo, summary),
        translator=lambda: ResponsesStream(model, echo, summary),
    )
    return Admitted(request.max_tokens, request.stream, chat, reply, chat_prefix(request.chat))


class ResponsesRoutes:
    """The Responses route. Create and use from the event loop."""

    def __init__(self, front: Front) -> None:
        self._front = front

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/responses", self.responses)

    async def responses(self, request: web.Request) -> web.StreamResponse:
        return await self._front.generate(request, "responses", adapt_responses)

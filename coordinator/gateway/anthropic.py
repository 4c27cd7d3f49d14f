"""The Anthropic dialect: POST /v1/messages and /v1/messages/count_tokens (Claude Code's API).

The body is validated in Anthropic's terms (mlxfleet/dialects/anthropic_request.py), mapped onto
a chat body, checked once more by the shared chat validation the engines run, and answered by
the one forward path; errors come in Anthropic's shape (app.py picks it by route).
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from coordinator.gateway.forward import Admitted, Reply
from coordinator.gateway.front import Front
from mlxfleet.dialects.anthropic_answer import MessagesStream, count_tokens_body, whole_message
from mlxfleet.dialects.anthropic_request import (
    MessagesRequest,
    in_anthropic_terms,
    parse_messages_request,
)
from mlxfleet.dialects.chat_answer import read_answer
from mlxfleet.errors import ApiError
from mlxfleet.openai.protocol import parse_chat_request

PATHS = ("/v1/messages", "/v1/messages/count_tokens")
CHAT_PATH = "/v1/chat/completions"
COUNT_PATH = "/v1/engine/count_tokens"  # the engine's tokenizer and chat template


def _mapped(request: MessagesRequest) -> bytes:
    """The chat body, checked as the engine will check it (refusals named in Anthropic's terms)."""
    try:
        parse_chat_request(request.chat)
    except ApiError as err:
        raise in_anthropic_terms(err) from None
    return json.dumps(request.chat).encode()


def adapt_messages(body: dict[str, Any], raw: bytes) -> Admitted:
    request = parse_messages_request(body)
    model, show = request.model, request.show_thinking
    reply = Reply(
        "messages",
        CHAT_PATH,
        whole=lambda answer: whole_message(read_answer(answer), model, show),
        translator=lambda: MessagesStream(model, show),
    )
    return Admitted(request.max_tokens, request.stream, _mapped(request), reply)


def adapt_count(body: dict[str, Any], raw: bytes) -> Admitted:
    request = parse_messages_request(body, count_only=True)
    reply = Reply("messages", COUNT_PATH, whole=count_tokens_body, cloud=False)
    return Admitted(None, False, _mapped(request), reply)


class AnthropicRoutes:
    """The Anthropic Messages routes. Create and use from the event loop."""

    def __init__(self, front: Front) -> None:
        self._front = front

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/messages", self.messages)
        app.router.add_post("/v1/messages/count_tokens", self.count_tokens)

    async def messages(self, request: web.Request) -> web.StreamResponse:
        return await self._front.generate(request, "messages", adapt_messages)

    async def count_tokens(self, request: web.Request) -> web.StreamResponse:
        return await self._front.count(request, adapt_count)

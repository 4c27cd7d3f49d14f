"""The Anthropic dialect: POST /v1/messages and /v1/messages/count_tokens (Claude Code's API).

The body is validated in Anthropic's terms (mlxfleet/dialects/anthropic_request.py), mapped onto
a chat body, checked once more by the shared chat validation the engines run, and answered by
the one forward path; errors come in Anthropic's shape (app.py picks it by route).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from coordinator.affinity import chat_prefix
from coordinator.gateway.forward import Admitted, Reply
from coordinator.gateway.front import CHAT_PATH, Front, checked_chat
from mlxfleet.dialects.anthropic_answer import MessagesStream, count_tokens_body, whole_message
from mlxfleet.dialects.anthropic_request import in_anthropic_terms, parse_messages_request
from mlxfleet.dialects.chat_answer import read_answer

PATHS = ("/v1/messages", "/v1/messages/count_tokens")
COUNT_PATH = "/v1/engine/count_tokens"  # the engine's tokenizer and chat template


def adapt_messages(body: dict[str, Any], raw: bytes) -> Admitted:
    request = parse_messages_request(body)
    model, show = request.model, request.show_thinking
    reply = Reply(
        "messages",
        CHAT_PATH,
        whole=lambda answer: whole_message(read_answer(answer), model, show),
        translator=lambda: MessagesStream(model, show),
    )
    chat = checked_chat(request.chat, in_anthropic_terms)
    return Admitted(request.max_tokens, request.stream, chat, reply, chat_prefix(request.chat))


def adapt_count(body: dict[str, Any], raw: bytes) -> Admitted:
    request = parse_messages_request(body, count_only=True)
    reply = Reply("messages", COUNT_PATH, whole=count_tokens_body, cloud=False)
    return Admitted(None, False, checked_chat(request.chat, in_anthropic_terms), reply)


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

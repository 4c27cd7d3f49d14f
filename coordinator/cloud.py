"""Serve one request from the [cloud] fallback: LiteLLM calls the provider, we answer OpenAI-shaped.

Our engines' bytes are passed through unchanged; a provider's response comes back as LiteLLM
objects, so here each chunk is encoded again as a server-sent event (and, for a client of
another dialect, mapped to it by the same adapter as an engine's answer).
"""

from __future__ import annotations

import contextlib
import json
import logging
from typing import TYPE_CHECKING, Any

from aiohttp import web

from coordinator.errors import CloudFailed
from coordinator.gateway.relay import SSE_DONE
from coordinator.routing import Routing, Target
from mlxfleet.errors import ApiError
from mlxfleet.openai.responses import sse
from mlxfleet.tiers import TIER_HEADER

if TYPE_CHECKING:
    from coordinator.gateway.forward import Reply

logger = logging.getLogger(__name__)

ROUTE_HEADER = "X-Mlxfleet-Route"  # "cloud" on answers that came from the cloud fallback
# Passed to the provider as the client sent them (LiteLLM translates them for the provider).
# The rest is dropped: our own fields (mlxfleet_continuation) and the vLLM-style extensions
# OpenAI's API has no place for (top_k, min_p, repetition_penalty, ignore_eos); the field table
# in docs/operations.md says so.
FORWARDED = (
    "messages",
    "prompt",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "seed",
    "stop",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "logprobs",
    "top_logprobs",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "response_format",
    "stream",
    "stream_options",
)


def cloud_params(body: dict[str, Any]) -> dict[str, Any]:
    return {k: body[k] for k in FORWARDED if k in body}


async def serve_cloud(
    request: web.Request, routing: Routing, target: Target, raw: bytes, tier: str, reply: Reply
) -> tuple[web.StreamResponse, tuple[int, int] | None]:
    """The response, and (prompt, completion) tokens when the provider said."""
    body = json.loads(raw)
    kind = "chat" if reply.path.endswith("/chat/completions") else "completion"
    params = cloud_params(body)
    headers = {TIER_HEADER: tier, ROUTE_HEADER: "cloud"}
    try:
        result = await routing.call_cloud(target, kind, params)
    except CloudFailed as exc:
        logger.warning("cloud fallback for %s failed (%d)", target.model, exc.status)
        raise ApiError(
            exc.status if 400 <= exc.status < 600 else 502,
            f"the cloud fallback failed: {exc}",
            type="server_error",
            code="cloud_failed",
        ) from None
    if not params.get("stream"):
        answer = result.model_dump(exclude_none=True)
        usage = answer.get("usage") or {}
        counted = (usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0))
        if reply.whole is not None:
            answer = reply.whole(answer)
        return web.json_response(answer, headers=headers), counted
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", **headers}
    )
    await response.prepare(request)
    translator = reply.translator() if reply.translator is not None else None
    tokens: tuple[int, int] | None = None
    with contextlib.suppress(ConnectionResetError):
        try:
            async for chunk in result:
                payload = chunk.model_dump(exclude_none=True)
                if usage := payload.get("usage"):
                    tokens = (usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0))
                event = sse(payload)
                await response.write(translator.feed(event) if translator else event)
        except Exception as exc:  # the provider broke the stream: say so, never a silent close
            logger.warning("cloud fallback stream for %s broke: %s", target.model, exc)
            err = ApiError(502, "the cloud fallback stopped before finishing", type="server_error")
            await response.write(translator.failed(err) if translator else sse(err.body()))
        await response.write(translator.feed(SSE_DONE) if translator else SSE_DONE)
        await response.write_eof()
    return response, tokens

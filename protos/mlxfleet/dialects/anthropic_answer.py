"""Chat answers as Anthropic Messages: a `message` object, or its SSE event sequence.

The stream follows Anthropic's order: message_start, ping, then per content block (thinking,
text, tool_use) content_block_start / content_block_delta... / content_block_stop, then
message_delta (stop_reason, usage) and message_stop.
"""

from __future__ import annotations

import json
from typing import Any

from mlxfleet.dialects.anthropic_request import error_body
from mlxfleet.dialects.chat_answer import (
    CallArguments,
    CallHead,
    ChatAnswer,
    Text,
    Translator,
    named_sse,
)
from mlxfleet.errors import ApiError

STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "content_filter": "refusal",
}


def stop_reason(finish_reason: str, stop_sequence: str | None) -> str:
    return "stop_sequence" if stop_sequence else STOP_REASONS.get(finish_reason, "end_turn")


def message_id(chat_id: str) -> str:
    return "msg_" + chat_id.split("-", 1)[-1]


def usage(prompt_tokens: int, completion_tokens: int, cached: int = 0) -> dict[str, int]:
    """Anthropic's usage: input_tokens counts what was not read from the cache."""
    if not cached:
        return {"input_tokens": prompt_tokens, "output_tokens": completion_tokens}
    return {
        "input_tokens": prompt_tokens - cached,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
        "output_tokens": completion_tokens,
    }


def tool_input(arguments: str) -> dict[str, Any]:
    """A call's arguments as the tool_use block's `input` object."""
    try:
        value = json.loads(arguments or "{}")
    except json.JSONDecodeError:
        raise ApiError(
            502, "the model's tool call arguments are not JSON", type="server_error"
        ) from None
    if not isinstance(value, dict):
        raise ApiError(
            502, "the model's tool call arguments are not an object", type="server_error"
        )
    return value


def whole_message(answer: ChatAnswer, model: str, show_thinking: bool = True) -> dict[str, Any]:
    """A non-streamed chat answer as Anthropic's message object."""
    content: list[dict[str, Any]] = []
    if answer.reasoning:
        thinking = answer.reasoning if show_thinking else ""
        content.append({"type": "thinking", "thinking": thinking, "signature": ""})
    if answer.content:
        content.append({"type": "text", "text": answer.content})
    for call in answer.calls:
        block = {"type": "tool_use", "id": call.id, "name": call.name}
        content.append(block | {"input": tool_input(call.arguments)})
    return {
        "id": message_id(answer.id),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason(answer.finish_reason, answer.stop_sequence),
        "stop_sequence": answer.stop_sequence,
        "usage": usage(answer.prompt_tokens, answer.completion_tokens, answer.cached_tokens),
    }


def count_tokens_body(engine_body: dict[str, Any]) -> dict[str, Any]:
    """The engine's /v1/engine/count_tokens answer as Anthropic's."""
    return {"input_tokens": int(engine_body["prompt_tokens"])}


class MessagesStream(Translator):
    """A chat stream as Anthropic's Messages events (see the module docstring)."""

    def __init__(self, model: str, show_thinking: bool = True) -> None:
        super().__init__()
        self._model = model
        self._show_thinking = show_thinking
        self._blocks = 0  # content blocks opened so far
        self._open: str | None = None  # the open block's type
        self._open_call: int | None = None  # the streamed index of the open tool_use block

    def start(self) -> bytes:
        s = self.state
        message: dict[str, Any] = {
            "id": message_id(s.id),
            "type": "message",
            "role": "assistant",
            "model": self._model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": usage(s.prompt_tokens, 0),
        }
        return named_sse(
            "message_start", {"type": "message_start", "message": message}
        ) + named_sse("ping", {"type": "ping"})

    def _begin(self, block: dict[str, Any]) -> bytes:
        out = self._close()
        self._open = block["type"]
        event = {"type": "content_block_start", "index": self._blocks, "content_block": block}
        return out + named_sse("content_block_start", event)

    def _delta(self, delta: dict[str, Any]) -> bytes:
        event = {"type": "content_block_delta", "index": self._blocks, "delta": delta}
        return named_sse("content_block_delta", event)

    def _close(self) -> bytes:
        if self._open is None:
            return b""
        event = {"type": "content_block_stop", "index": self._blocks}
        self._blocks += 1
        self._open, self._open_call = None, None
        return named_sse("content_block_stop", event)

    def text_literal(self, literal: bytes) -> bytes | None:
        if self._open != "text":
            return None  # a text block opens first: the slow path does that
        return (
            b'event: content_block_delta\ndata: {"type":"content_block_delta","index":%d,'
            b'"delta":{"type":"text_delta","text":%s}}\n\n' % (self._blocks, literal)
        )

    def piece(self, piece: Text | CallHead | CallArguments) -> bytes:
        out = b""
        if isinstance(piece, Text) and piece.reasoning:
            if self._open != "thinking":
                out = self._begin({"type": "thinking", "thinking": "", "signature": ""})
            if self._show_thinking:
                out += self._delta({"type": "thinking_delta", "thinking": piece.text})
        elif isinstance(piece, Text):
            if self._open != "text":
                out = self._begin({"type": "text", "text": ""})
            out += self._delta({"type": "text_delta", "text": piece.text})
        elif isinstance(piece, CallHead):
            block = {"type": "tool_use", "id": piece.id, "name": piece.name, "input": {}}
            out = self._begin(block)
            self._open_call = piece.index
        elif self._open_call == piece.index:
            out = self._delta({"type": "input_json_delta", "partial_json": piece.text})
        return out

    def end(self) -> bytes:
        s = self.state
        finish = s.finish
        reason, stop = (finish.reason, finish.stop_sequence) if finish else ("stop", None)
        delta = {
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason(reason, stop), "stop_sequence": stop},
            "usage": usage(s.prompt_tokens, s.completion_tokens, s.cached_tokens),
        }
        return (
            self._close()
            + named_sse("message_delta", delta)
            + named_sse("message_stop", {"type": "message_stop"})
        )

    def failed(self, err: ApiError) -> bytes:
        self.state.ended = True
        return named_sse("error", error_body(err)[1])

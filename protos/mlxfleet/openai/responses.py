"""OpenAI-shaped response bodies, stream chunks and errors; pure, no engine state.

Bodies and chunks may carry `"mlxfleet": {"token_ids": [...]}`, the generated ids they hold, so
the gateway can continue a stream elsewhere from ids rather than re-tokenized text. An answer cut
by one of the request's stop strings names it in its choice's `stop_reason` (vLLM's field), which
Anthropic's `stop_sequence` needs.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from mlxfleet.openai.tools import ToolCall

Kind = Literal["chat", "completion"]

SSE_DONE = b"data: [DONE]\n\n"
_ID_PREFIX = {"chat": "chatcmpl-", "completion": "cmpl-"}
_OBJECT = {"chat": "chat.completion", "completion": "text_completion"}
_CHUNK_OBJECT = {"chat": "chat.completion.chunk", "completion": "text_completion"}


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of one request."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # of the prompt, whose KV came from the engine's prefix cache

    def as_dict(self) -> dict[str, Any]:
        usage: dict[str, Any] = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }
        if self.cached_tokens:  # OpenAI's field, for a prompt the cache served
            usage["prompt_tokens_details"] = {"cached_tokens": self.cached_tokens}
        return usage


@dataclass(frozen=True, slots=True)
class ResponseHeader:
    """The fields every body and chunk of one response shares."""

    kind: Kind
    id: str
    created: int
    model: str

    @classmethod
    def new(cls, kind: Kind, model: str) -> ResponseHeader:
        return cls(kind, _ID_PREFIX[kind] + uuid.uuid4().hex[:24], int(time.time()), model)

    def fields(self, *, chunk: bool) -> dict[str, Any]:
        objects = _CHUNK_OBJECT if chunk else _OBJECT
        return {
            "id": self.id,
            "object": objects[self.kind],
            "created": self.created,
            "model": self.model,
        }


@dataclass(frozen=True, slots=True)
class Logprob:
    """One generated token's log probability as text: the token, its value, and the most likely
    alternatives at its place (most likely first)."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


def _token(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode())}


def logprobs_field(kind: Kind, entries: list[Logprob] | None, offset: int = 0) -> Any:
    """A choice's `logprobs`: chat's `{"content": [...]}` (each token with `bytes` and
    `top_logprobs`), or the completions API's parallel lists, `text_offset` counted from
    `offset` (the characters of the completion before these tokens). None when not asked."""
    if entries is None:
        return None
    if kind == "chat":
        content = [
            _token(e.token, e.logprob) | {"top_logprobs": [_token(t, lp) for t, lp in e.top]}
            for e in entries
        ]
        return {"content": content}
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e.token)
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [dict(e.top) for e in entries] if any(e.top for e in entries) else None,
        "text_offset": offsets,
    }


def full_response(
    header: ResponseHeader,
    text: str,
    finish_reason: str | None,
    usage: Usage,
    token_ids: list[int] | None = None,
    logprobs: list[Logprob] | None = None,
    reasoning: str = "",
    calls: list[ToolCall] | None = None,
    stop_reason: str | None = None,
) -> dict[str, Any]:
    """A non-streamed response body. A chat answer's thinking goes to `reasoning_content`
    (vLLM's and DeepSeek's field), its calls to `tool_calls` (content null when it said
    nothing else, as OpenAI's)."""
    lp = logprobs_field(header.kind, logprobs)
    if header.kind == "chat":
        message: dict[str, Any] = {
            "role": "assistant",
            "content": (text or None) if calls else text,
        }
        if reasoning:
            message["reasoning_content"] = reasoning
        if calls:
            message["tool_calls"] = [c.whole() for c in calls]
        choice: dict[str, Any] = {
            "index": 0,
            "message": message,
            "logprobs": lp,
            "finish_reason": finish_reason,
        }
    else:
        choice = {"index": 0, "text": text, "logprobs": lp, "finish_reason": finish_reason}
    if stop_reason is not None:
        choice["stop_reason"] = stop_reason
    body = header.fields(chunk=False) | {"choices": [choice], "usage": usage.as_dict()}
    if token_ids is not None:
        body["mlxfleet"] = {"token_ids": token_ids}
    return body


def chunk(
    header: ResponseHeader,
    text: str,
    finish_reason: str | None = None,
    token_ids: list[int] | None = None,
    *,
    first: bool = False,
    usage: Usage | None = None,
    logprobs: Any = None,
    reasoning: str = "",
    tool_calls: list[dict[str, Any]] | None = None,
    stop_reason: str | None = None,
    prompt_tokens: int | None = None,
) -> dict[str, Any]:
    """One streamed chunk; the first chat chunk also carries the assistant role (and the
    prompt's size as `mlxfleet.prompt_tokens`, which Anthropic's message_start tells), and the
    finishing one the whole answer's usage as `mlxfleet.usage` (the gateway's token counts).
    `logprobs` is the chunk's tokens' `logprobs_field`; `reasoning` goes to
    `delta.reasoning_content`, `tool_calls` (Call.stream_head / stream_arguments pieces) to
    `delta.tool_calls`."""
    if header.kind == "chat":
        delta: dict[str, Any] = {"role": "assistant", "content": text} if first else {}
        if text and not first:
            delta["content"] = text
        if reasoning:
            delta["reasoning_content"] = reasoning
        if tool_calls:
            delta["tool_calls"] = tool_calls
        choice: dict[str, Any] = {"index": 0, "delta": delta}
    else:
        choice = {"index": 0, "text": text}
    choice["logprobs"] = logprobs
    choice["finish_reason"] = finish_reason
    if stop_reason is not None:
        choice["stop_reason"] = stop_reason
    body = header.fields(chunk=True) | {"choices": [choice]}
    if token_ids is not None:
        body["mlxfleet"] = {"token_ids": token_ids}
    if prompt_tokens is not None:
        body.setdefault("mlxfleet", {})["prompt_tokens"] = prompt_tokens
    if usage is not None:
        body.setdefault("mlxfleet", {})["usage"] = usage.as_dict()
    return body


def usage_chunk(header: ResponseHeader, usage: Usage) -> dict[str, Any]:
    """The final chunk for `stream_options.include_usage`: empty choices, usage set."""
    return header.fields(chunk=True) | {"choices": [], "usage": usage.as_dict()}


def error_body(
    message: str,
    type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    """OpenAI's error envelope."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# One compact encoder for every event: json.dumps with non-default separators builds one per call.
encode_json = json.JSONEncoder(separators=(",", ":")).encode


def sse(payload: dict[str, Any]) -> bytes:
    """One server-sent event carrying `payload` as JSON."""
    return b"data: " + encode_json(payload).encode() + b"\n\n"

"""OpenAI-shaped response bodies, stream chunks and errors; pure, no engine state.

Bodies and chunks may carry `"mlxfleet": {"token_ids": [...]}`, the generated ids they hold, so
the gateway can continue a stream elsewhere from ids rather than re-tokenized text.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

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

    def as_dict(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


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


def full_response(
    header: ResponseHeader,
    text: str,
    finish_reason: str | None,
    usage: Usage,
    token_ids: list[int] | None = None,
) -> dict[str, Any]:
    """A non-streamed response body."""
    if header.kind == "chat":
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": finish_reason,
        }
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
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
) -> dict[str, Any]:
    """One streamed chunk; the first chat chunk also carries the assistant role, and the
    finishing one the whole answer's usage as `mlxfleet.usage` (the gateway's token counts)."""
    if header.kind == "chat":
        delta: dict[str, Any] = {"role": "assistant", "content": text} if first else {}
        if text and not first:
            delta["content"] = text
        choice: dict[str, Any] = {"index": 0, "delta": delta}
    else:
        choice = {"index": 0, "text": text}
    choice["logprobs"] = None
    choice["finish_reason"] = finish_reason
    body = header.fields(chunk=True) | {"choices": [choice]}
    if token_ids is not None:
        body["mlxfleet"] = {"token_ids": token_ids}
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


def sse(payload: dict[str, Any]) -> bytes:
    """One server-sent event carrying `payload` as JSON."""
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"

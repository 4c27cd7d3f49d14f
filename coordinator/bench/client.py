"""The benchmark's HTTP client: one streaming chat request timed as a `Sample`, and the
preflight that turns a bad endpoint, key, model or a non-streaming server into one line.

Any OpenAI-compatible endpoint: only standard fields are sent (plus, on request, the body
fields `Endpoint.extra_body` names, such as vLLM's `ignore_eos`). The tier header is a header,
which other servers ignore; the mlxfleet gateway routes on it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from coordinator.bench.errors import (
    BenchError,
    EndpointUnreachable,
    KeyRefused,
    ModelMissing,
    NotStreaming,
)
from coordinator.bench.results import Sample
from mlxfleet.tiers import TIER_HEADER

CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 600.0  # the longest silence inside a response (a long prefill on a slow Mac)
PREFLIGHT_TIMEOUT_S = 120.0  # a 1-token request may wait for a cold model to load
ERROR_CHARS = 300  # an endpoint's error message is cut to this length
REASONING_FIELDS = ("reasoning_content", "reasoning")  # generated text some servers split off


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where requests go and what every one of them carries."""

    base_url: str  # ends in /v1, as an OpenAI client's base_url
    key: str | None
    model: str
    tier: str  # the workload class; the mlxfleet gateway's X-Mlxfleet-Tier
    extra_body: dict[str, Any] = field(default_factory=dict)

    def headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", TIER_HEADER: self.tier}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        return headers

    def chat_body(self, messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
        return {
            "model": self.model,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
            **self.extra_body,
        }


@dataclass(slots=True)
class _Stream:
    """What one SSE response carried, as it was read."""

    first_byte_s: float | None = None
    ttft_s: float | None = None
    content_chunks: int = 0
    token_ids: int | None = None
    usage: dict[str, Any] | None = None
    finish_reason: str | None = None
    done: bool = False  # [DONE] arrived
    error: str | None = None  # an error event inside the stream


def one_line(text: str) -> str:
    """An endpoint's message as one short line."""
    return " ".join(text.split())[:ERROR_CHARS]


def error_message(status: int, body: bytes) -> str:
    """`HTTP 404: model 'x' does not exist`, from an OpenAI-shaped error or any body."""
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    message: Any = None
    if isinstance(data, dict):
        error = data.get("error", data.get("detail"))
        message = error.get("message") if isinstance(error, dict) else error
    text = str(message) if message else body.decode(errors="replace")
    return f"HTTP {status}: {one_line(text)}" if text.strip() else f"HTTP {status}"


def _feed(stream: _Stream, line: bytes, now_s: float) -> None:
    """Take one SSE line: `data: {json}`, `data: [DONE]`; comments and other fields skipped."""
    if not line.startswith(b"data:"):
        return
    data = line[len(b"data:") :].strip()
    if data == b"[DONE]":
        stream.done = True
        return
    try:
        payload = json.loads(data)
    except ValueError:
        stream.error = f"not JSON in the stream: {one_line(data.decode(errors='replace'))}"
        return
    if not isinstance(payload, dict):
        return
    if payload.get("error"):
        error = payload["error"]
        message = error.get("message") if isinstance(error, dict) else error
        stream.error = f"error event: {one_line(str(message))}"
        return
    if payload.get("usage"):
        stream.usage = payload["usage"]
    ids = (payload.get("mlxfleet") or {}).get("token_ids")
    if isinstance(ids, list):
        stream.token_ids = (stream.token_ids or 0) + len(ids)
    for choice in payload.get("choices") or ():
        delta = choice.get("delta") or {}
        if delta.get("content") or any(delta.get(k) for k in REASONING_FIELDS):
            stream.content_chunks += 1
            if stream.ttft_s is None:
                stream.ttft_s = now_s
        if choice.get("finish_reason"):
            stream.finish_reason = choice["finish_reason"]


async def _read(response: aiohttp.ClientResponse, sent: float) -> _Stream:
    """Read a whole SSE response; times are seconds from `sent` (time.perf_counter)."""
    stream = _Stream()
    pending = b""
    async for chunk in response.content.iter_any():
        now_s = time.perf_counter() - sent
        if stream.first_byte_s is None:
            stream.first_byte_s = now_s
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            _feed(stream, line.rstrip(b"\r"), now_s)
            if stream.error is not None or stream.done:
                return stream
    if pending:
        _feed(stream, pending.rstrip(b"\r"), time.perf_counter() - sent)
    return stream


async def stream_chat(
    session: aiohttp.ClientSession,
    endpoint: Endpoint,
    messages: list[dict[str, str]],
    max_tokens: int,
    concurrency: int,
    prompt_tokens_wanted: int,
    t0: float,
) -> Sample:
    """One streaming chat request as the client saw it; a failure is a Sample with `error`
    set, never an exception (cancellation excepted). `t0`: time.perf_counter() at run start."""
    sent = time.perf_counter()
    stream = _Stream()
    error: str | None = None
    try:
        async with session.post(
            f"{endpoint.base_url}/chat/completions",
            json=endpoint.chat_body(messages, max_tokens),
            headers=endpoint.headers(),
        ) as response:
            if response.status != 200:
                error = error_message(response.status, await response.read())
            elif not response.content_type.startswith("text/event-stream"):
                error = f"not a stream: Content-Type {response.content_type!r}"
            else:
                stream = await _read(response, sent)
                error = stream.error
                if error is None and not stream.done and stream.finish_reason is None:
                    error = "the stream ended before the answer finished"
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        error = f"{type(exc).__name__}: {one_line(str(exc))}".rstrip(": ")
    usage = stream.usage or {}
    return Sample(
        concurrency=concurrency,
        prompt_tokens_wanted=prompt_tokens_wanted,
        started_s=sent - t0,
        first_byte_s=stream.first_byte_s,
        ttft_s=stream.ttft_s,
        total_s=time.perf_counter() - sent,
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=int(usage.get("completion_tokens") or 0),
        content_chunks=stream.content_chunks,
        finish_reason=stream.finish_reason,
        error=error,
        tokens_counted=stream.token_ids,
    )


async def preflight(session: aiohttp.ClientSession, endpoint: Endpoint) -> None:
    """One clear BenchError before anything is measured: nothing answers, the key is refused,
    the model is not served, the endpoint does not stream or sends no usage to count with."""
    base = endpoint.base_url
    timeout = aiohttp.ClientTimeout(total=PREFLIGHT_TIMEOUT_S, sock_connect=CONNECT_TIMEOUT_S)
    stream: _Stream | None = None  # the answer, when it was a stream
    reply = b""  # the answer's body, when it was not
    try:
        async with session.get(
            f"{base}/models", headers=endpoint.headers(), timeout=timeout
        ) as response:
            models_status, models_body = response.status, await response.read()
        body = endpoint.chat_body([{"role": "user", "content": "Hello"}], 1)
        async with session.post(
            f"{base}/chat/completions", json=body, headers=endpoint.headers(), timeout=timeout
        ) as response:
            status, content_type = response.status, response.content_type
            if status == 200 and content_type.startswith("text/event-stream"):
                stream = await _read(response, time.perf_counter())
            else:
                reply = await response.read()
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        reason = one_line(str(exc)) or type(exc).__name__
        raise EndpointUnreachable(f"cannot reach {base}: {reason}") from None
    for code, text in ((models_status, models_body), (status, reply)):
        if code in (401, 403):
            raise KeyRefused(f"{base} refused the API key ({error_message(code, text)})")
    listed = _model_ids(models_body) if models_status == 200 else None
    if status == 404 and models_status == 404:
        raise BenchError(f"no OpenAI-compatible API at {base} (GET /models: HTTP 404)")
    if status == 404 or (status >= 400 and listed is not None and endpoint.model not in listed):
        lists = f" (it lists: {', '.join(listed) or 'nothing'})" if listed is not None else ""
        raise ModelMissing(
            f"{base} does not serve model {endpoint.model!r}: {error_message(status, reply)}"
            + lists
        )
    if status != 200:
        raise BenchError(f"{base} refused a 1-token chat request: {error_message(status, reply)}")
    if stream is None:
        raise NotStreaming(
            f"{base} does not stream: a stream=true request got Content-Type "
            f"{content_type!r}, not text/event-stream"
        )
    if stream.error is not None:
        raise BenchError(f"{base} failed a 1-token chat request: {stream.error}")
    if not stream.usage or not stream.usage.get("prompt_tokens"):
        raise BenchError(
            f"{base} sends no usage in its stream (stream_options.include_usage): "
            "the prompt and completion tokens cannot be counted"
        )


def _model_ids(body: bytes) -> list[str] | None:
    """The ids of an OpenAI /models list; None when the body is not one."""
    try:
        data = json.loads(body).get("data")
        return [str(m["id"]) for m in data]
    except (ValueError, AttributeError, TypeError, KeyError):
        return None

"""A small OpenAI-compatible server for the bench's unit tests, on 127.0.0.1:0.

Its "tokenizer" counts a message's words plus TEMPLATE_TOKENS, with the words in `two_token`
counted twice, so prompt calibration has something real to search. Streams send one content
chunk per token (with mlxfleet token ids), then the usage chunk and [DONE].
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

TEMPLATE_TOKENS = 7


@dataclass
class Behaviour:
    """What the fake does; tests change it between requests."""

    key: str | None = "secret"
    models: tuple[str, ...] = ("fake",)
    stream: bool = True  # False: answers stream=true with a JSON body
    usage: bool = True
    token_delay_s: float = 0.0
    first_token_delay_s: float = 0.0
    status: int = 200  # anything else: an OpenAI error with this status
    stop_after: int | None = None  # finish_reason "stop" after this many tokens
    cut_after: int | None = None  # close the stream after this many tokens, unfinished
    two_token: frozenset[str] = frozenset()
    requests: list[dict[str, Any]] = field(default_factory=list)


def count_tokens(messages: list[dict[str, str]], two_token: frozenset[str]) -> int:
    words = [w for m in messages for w in m["content"].split()]
    return TEMPLATE_TOKENS + sum(2 if w in two_token else 1 for w in words)


def _error(status: int, message: str) -> web.Response:
    body = {"error": {"message": message, "type": "invalid_request_error"}}
    return web.json_response(body, status=status)


def app(behaviour: Behaviour) -> web.Application:
    def authorized(request: web.Request) -> bool:
        return behaviour.key is None or (
            request.headers.get("Authorization") == f"Bearer {behaviour.key}"
        )

    async def models(request: web.Request) -> web.Response:
        if not authorized(request):
            return _error(401, "invalid API key")
        return web.json_response({"data": [{"id": m} for m in behaviour.models]})

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        behaviour.requests.append({"body": body, "headers": dict(request.headers)})
        if not authorized(request):
            return _error(401, "invalid API key")
        if body["model"] not in behaviour.models:
            return _error(404, f"model {body['model']!r} does not exist")
        if behaviour.status != 200:
            return _error(behaviour.status, "overloaded")
        prompt = count_tokens(body["messages"], behaviour.two_token)
        n = body["max_tokens"]
        if behaviour.stop_after is not None:
            n = min(n, behaviour.stop_after)
        if not behaviour.stream:
            return web.json_response({"choices": [{"message": {"content": "x" * n}}]})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b": keepalive\n\n")
        await asyncio.sleep(behaviour.first_token_delay_s)
        for i in range(n):
            if behaviour.cut_after is not None and i == behaviour.cut_after:
                return response
            finish = ("length" if n == body["max_tokens"] else "stop") if i == n - 1 else None
            chunk = {
                "choices": [{"index": 0, "delta": {"content": f"t{i} "}, "finish_reason": finish}],
                "mlxfleet": {"token_ids": [i]},
            }
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
            await asyncio.sleep(behaviour.token_delay_s)
        if behaviour.usage:
            usage = {"prompt_tokens": prompt, "completion_tokens": n, "total_tokens": prompt + n}
            await response.write(
                f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode()
            )
        await response.write(b"data: [DONE]\n\n")
        return response

    application = web.Application()
    application.router.add_get("/v1/models", models)
    application.router.add_post("/v1/chat/completions", chat)
    return application


@contextlib.asynccontextmanager
async def serving(behaviour: Behaviour) -> AsyncIterator[str]:
    """The fake on a free port; yields its base URL (…/v1)."""
    runner = web.AppRunner(app(behaviour), handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        await runner.cleanup()


@contextlib.contextmanager
def serving_in_thread(behaviour: Behaviour) -> Iterator[str]:
    """The fake on its own event loop in a thread, for code that runs asyncio.run itself."""
    started: queue.Queue[str] = queue.Queue()
    stop = threading.Event()

    async def main() -> None:
        async with serving(behaviour) as base:
            started.put(base)
            while not stop.is_set():
                await asyncio.sleep(0.02)

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.start()
    try:
        yield started.get(timeout=10)
    finally:
        stop.set()
        thread.join(10)

"""Server behaviour on model-thread failures and a full queue, with a fake model thread."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
from aiohttp.test_utils import TestServer

from mlxfleet.tiers import DEFAULT_KNOBS
from node_agent.engine.config import EngineConfig
from node_agent.engine.generator import EngineStats, Event, Job
from node_agent.engine.server import EngineServer
from node_agent.errors import QueueFull

SECRET = "test-secret"
HEADERS = {"Authorization": f"Bearer {SECRET}"}
BODY = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


class FakeTokenizer:
    """What the server asks of mlx-lm's tokenizer wrapper, for a model with no think or tool
    markers."""

    has_thinking = False
    has_tool_calling = False
    tool_parser = tool_call_start = tool_call_end = None

    def apply_chat_template(self, messages: list, add_generation_prompt: bool) -> list[int]:
        return [1, 2, 3]


class FakeModelThread:
    """Answers every job with one text event, then fails it, as a broken decode step would."""

    def __init__(self, full: bool = False) -> None:
        self.tokenizer = FakeTokenizer()
        self.context_length = 100
        self.vocab_size = 10
        self.full = full
        self.cancelled: list[int] = []

    def submit(self, job: Job) -> None:
        if self.full:
            raise QueueFull("full")
        job.sink(Event("partial", [4]))
        job.sink(Event("", [], "error", 1, "internal error during generation"))

    def cancel(self, request_id: int) -> None:
        self.cancelled.append(request_id)

    def stats(self) -> EngineStats:
        return EngineStats(0, 0, 0, 0, 0, 0, 0, DEFAULT_KNOBS["interactive"])


async def serve(model: FakeModelThread) -> TestServer:
    config = EngineConfig(Path("/unused"), "demo", SECRET)
    engine = EngineServer(config)
    engine._model = model  # type: ignore[assignment]
    engine._ready = True
    server = TestServer(engine.build_app())
    await server.start_server()
    return server


async def test_stream_failure_ends_with_an_error_event_then_done() -> None:
    server = await serve(FakeModelThread())
    try:
        async with httpx.AsyncClient(base_url=str(server.make_url(""))) as client:
            response = await client.post(
                "/v1/chat/completions", json=BODY | {"stream": True}, headers=HEADERS
            )
        events = [e for e in response.text.split("\n\n") if e]
        assert events[-1] == "data: [DONE]"
        error = json.loads(events[-2].removeprefix("data: "))
        assert error["error"]["type"] == "server_error"
        assert "internal error" in error["error"]["message"]
        assert json.loads(events[1].removeprefix("data: "))["choices"][0]["delta"] == {
            "content": "partial"
        }
    finally:
        await server.close()


async def test_non_stream_failure_is_a_500_error() -> None:
    server = await serve(FakeModelThread())
    try:
        async with httpx.AsyncClient(base_url=str(server.make_url(""))) as client:
            response = await client.post("/v1/chat/completions", json=BODY, headers=HEADERS)
        assert response.status_code == 500
        assert response.json()["error"]["type"] == "server_error"
    finally:
        await server.close()


async def test_full_queue_is_429_with_retry_after() -> None:
    server = await serve(FakeModelThread(full=True))
    try:
        async with httpx.AsyncClient(base_url=str(server.make_url(""))) as client:
            response = await client.post("/v1/chat/completions", json=BODY, headers=HEADERS)
        assert response.status_code == 429
        assert response.headers["Retry-After"] == "1"
        assert response.json()["error"]["code"] == "rate_limit_exceeded"
    finally:
        await server.close()


async def test_tools_for_a_model_without_tool_calling_are_refused() -> None:
    """The fake tokenizer is a model whose template has no tool calling."""
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    server = await serve(FakeModelThread())
    try:
        async with httpx.AsyncClient(base_url=str(server.make_url(""))) as client:
            refused = await client.post(
                "/v1/chat/completions", json=BODY | {"tools": [tool]}, headers=HEADERS
            )
            unused = await client.post(
                "/v1/chat/completions",
                json=BODY | {"tools": [tool], "tool_choice": "none"},
                headers=HEADERS,
            )
        assert refused.status_code == 400
        assert refused.json()["error"]["param"] == "tools"
        assert unused.status_code == 500  # served (this fake model then fails every request)
    finally:
        await server.close()

"""The bench's HTTP client against a fake OpenAI-compatible server: one request timed and
counted, and the preflight's one-line errors for each kind of bad endpoint."""

from __future__ import annotations

import socket
import time

import aiohttp
import pytest

from coordinator.bench.client import Endpoint, error_message, preflight, stream_chat
from coordinator.bench.errors import (
    BenchError,
    EndpointUnreachable,
    KeyRefused,
    ModelMissing,
    NotStreaming,
)
from mlxfleet.tiers import TIER_HEADER
from tests.coordinator.fake_endpoint import TEMPLATE_TOKENS, Behaviour, serving

HELLO = [{"role": "user", "content": "one two three"}]


def endpoint(base: str, **changes: object) -> Endpoint:
    fields: dict = {"base_url": base, "key": "secret", "model": "fake", "tier": "batch"}
    return Endpoint(**(fields | changes))


async def test_a_streamed_answer_is_timed_and_counted() -> None:
    behaviour = Behaviour(first_token_delay_s=0.05, token_delay_s=0.01)
    async with serving(behaviour) as base, aiohttp.ClientSession() as session:
        t0 = time.perf_counter() - 5.0  # the run began 5 s ago
        sample = await stream_chat(session, endpoint(base), HELLO, 8, 4, 10, t0)
    assert sample.ok, sample.error
    assert (sample.concurrency, sample.prompt_tokens_wanted) == (4, 10)
    assert sample.started_s == pytest.approx(5.0, abs=0.5)
    assert sample.first_byte_s is not None and sample.ttft_s is not None
    assert sample.first_byte_s < 0.05 <= sample.ttft_s < sample.total_s  # keepalive came first
    assert (sample.prompt_tokens, sample.completion_tokens) == (TEMPLATE_TOKENS + 3, 8)
    assert sample.content_chunks == 8 and sample.tokens_counted == 8
    assert sample.finish_reason == "length"
    [request] = behaviour.requests
    body = request["body"]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["max_tokens"] == 8 and body["temperature"] == 0
    assert "ignore_eos" not in body  # unknown to an OpenAI endpoint: only when asked for
    assert request["headers"]["Authorization"] == "Bearer secret"
    assert request["headers"][TIER_HEADER] == "batch"


async def test_extra_body_fields_are_sent_only_when_configured() -> None:
    behaviour = Behaviour()
    async with serving(behaviour) as base, aiohttp.ClientSession() as session:
        target = endpoint(base, extra_body={"ignore_eos": True})
        await stream_chat(session, target, HELLO, 2, 1, 10, time.perf_counter())
    assert behaviour.requests[0]["body"]["ignore_eos"] is True


@pytest.mark.parametrize(
    ("behaviour", "error"),
    [
        (Behaviour(status=503), "HTTP 503: overloaded"),
        (Behaviour(stream=False), "not a stream: Content-Type 'application/json'"),
        (Behaviour(cut_after=3), "the stream ended before the answer finished"),
    ],
)
async def test_a_failed_request_is_a_sample_with_its_error(
    behaviour: Behaviour, error: str
) -> None:
    async with serving(behaviour) as base, aiohttp.ClientSession() as session:
        sample = await stream_chat(session, endpoint(base), HELLO, 8, 1, 10, time.perf_counter())
    assert not sample.ok and sample.error == error
    assert sample.decode_tokens_per_s is None


async def test_an_early_stop_is_recorded_as_its_finish_reason() -> None:
    async with serving(Behaviour(stop_after=3)) as base, aiohttp.ClientSession() as session:
        sample = await stream_chat(session, endpoint(base), HELLO, 8, 1, 10, time.perf_counter())
    assert sample.ok and sample.finish_reason == "stop" and sample.completion_tokens == 3


def test_error_messages_are_one_line_from_openai_or_any_body() -> None:
    assert error_message(404, b'{"error": {"message": "no\\n such model"}}') == (
        "HTTP 404: no such model"
    )
    assert error_message(404, b'{"error": "Model not found"}') == "HTTP 404: Model not found"
    assert error_message(502, b"<html>Bad\n gateway</html>") == "HTTP 502: <html>Bad gateway</html>"
    assert error_message(500, b"") == "HTTP 500"


async def test_preflight_passes_a_good_endpoint() -> None:
    async with serving(Behaviour()) as base, aiohttp.ClientSession() as session:
        await preflight(session, endpoint(base))


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed when the block ends: nothing listens


async def test_preflight_names_an_unreachable_endpoint() -> None:
    base = f"http://127.0.0.1:{closed_port()}/v1"
    async with aiohttp.ClientSession() as session:
        with pytest.raises(EndpointUnreachable, match=f"cannot reach {base}: "):
            await preflight(session, endpoint(base))


@pytest.mark.parametrize(
    ("behaviour", "changes", "error", "message"),
    [
        (Behaviour(), {"key": "wrong"}, KeyRefused, r"refused the API key \(HTTP 401: invalid"),
        (Behaviour(), {"key": None}, KeyRefused, "refused the API key"),
        (
            Behaviour(models=("a", "b")),
            {"model": "c"},
            ModelMissing,
            r"does not serve model 'c': HTTP 404: model 'c' does not exist \(it lists: a, b\)",
        ),
        (Behaviour(stream=False), {}, NotStreaming, "got Content-Type 'application/json'"),
        (Behaviour(usage=False), {}, BenchError, "sends no usage in its stream"),
        (Behaviour(status=500), {}, BenchError, "refused a 1-token chat request: HTTP 500"),
    ],
)
async def test_preflight_refuses_a_bad_endpoint_in_one_line(
    behaviour: Behaviour, changes: dict, error: type[Exception], message: str
) -> None:
    async with serving(behaviour) as base, aiohttp.ClientSession() as session:
        with pytest.raises(error, match=message) as caught:
            await preflight(session, endpoint(base, **changes))
    assert "\n" not in str(caught.value)

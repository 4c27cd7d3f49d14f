"""The real engine process on the demo model, driven with the official openai client.

These tests need a process: the CLI contract, signals, and the model thread are the point.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import wait_for
from tests.node_agent.engine.clients import async_client, long_completion
from tests.node_agent.engine.conftest import Engine, start_engine

CHAT = [{"role": "user", "content": "Tell me about the garden."}]


def client(engine: Engine, secret: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=engine.base_url + "/v1", api_key=secret or engine.secret, max_retries=0
    )


def token_ids(item: object) -> list[int]:
    extra = item.model_extra or {}  # type: ignore[attr-defined]
    return list((extra.get("mlxfleet") or {}).get("token_ids") or [])


def greedy_chat(engine: Engine, max_tokens: int = 32, **kwargs: object) -> object:
    return client(engine).chat.completions.create(
        model="demo", messages=CHAT, temperature=0, max_tokens=max_tokens, **kwargs
    )


def test_engine_starts_quickly_and_lists_its_model(engine: Engine) -> None:
    assert engine.startup_s < 15.0
    models = client(engine).models.list()
    assert [m.id for m in models.data] == ["demo"]
    assert engine.get("/health").json() == {"status": "ready"}


def test_chat_non_stream_reports_usage_and_token_ids(engine: Engine) -> None:
    response = greedy_chat(engine, max_tokens=12)
    assert response.id.startswith("chatcmpl-")
    assert response.model == "demo"
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].finish_reason in ("stop", "length")
    assert response.usage.prompt_tokens > 5
    assert response.usage.completion_tokens == len(token_ids(response))
    assert response.usage.total_tokens == (
        response.usage.prompt_tokens + response.usage.completion_tokens
    )


def test_chat_stream_with_usage_matches_non_stream(engine: Engine) -> None:
    expected = greedy_chat(engine, max_tokens=24)
    chunks = stream_chunks(engine, max_tokens=24)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    ids = [t for c in chunks for t in token_ids(c)]
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == len(ids)
    assert chunks[-1].usage.prompt_tokens == expected.usage.prompt_tokens
    assert text == expected.choices[0].message.content
    assert ids == token_ids(expected)
    assert finish == [expected.choices[0].finish_reason]


def test_completions_stream_and_non_stream(engine: Engine) -> None:
    c = client(engine)
    full = c.completions.create(
        model="demo", prompt="The quick brown", max_tokens=10, temperature=0
    )
    assert full.id.startswith("cmpl-") and full.object == "text_completion"
    assert full.choices[0].finish_reason in ("stop", "length")
    chunks = list(
        c.completions.create(
            model="demo", prompt="The quick brown", max_tokens=10, temperature=0, stream=True
        )
    )
    assert "".join(ch.choices[0].text for ch in chunks) == full.choices[0].text
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert sum(len(token_ids(ch)) for ch in chunks) == full.usage.completion_tokens
    # the finishing chunk carries the whole usage for the gateway's counts, asked or not
    assert chunks[-1].model_extra["mlxfleet"]["usage"] == full.usage.model_dump(exclude_none=True)


def test_temperature_zero_is_deterministic(engine: Engine) -> None:
    first = greedy_chat(engine, max_tokens=20).choices[0].message.content
    second = greedy_chat(engine, max_tokens=20).choices[0].message.content
    assert first == second and first


def test_seed_makes_sampling_reproducible(engine: Engine) -> None:
    c = client(engine)

    def sample(seed: int) -> str:
        response = c.chat.completions.create(
            model="demo", messages=CHAT, temperature=1.0, seed=seed, max_tokens=20
        )
        return response.choices[0].message.content

    assert sample(7) == sample(7)
    assert len({sample(1), sample(2), sample(3)}) > 1


def test_max_tokens_is_honoured(engine: Engine) -> None:
    response = greedy_chat(engine, max_tokens=7)
    if response.choices[0].finish_reason == "length":
        assert response.usage.completion_tokens == 7
    assert response.usage.completion_tokens <= 7


def test_stop_string_cuts_the_text(engine: Engine) -> None:
    full = greedy_chat(engine, max_tokens=40).choices[0].message.content
    stop = full[12:16]
    assert len(stop.strip()) > 0, full
    expected = full[: full.index(stop)]
    response = greedy_chat(engine, max_tokens=40, stop=[stop])
    assert response.choices[0].message.content == expected
    assert response.choices[0].finish_reason == "stop"
    stream = greedy_chat(engine, max_tokens=40, stop=stop, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_wrong_or_missing_secret_is_refused(engine: Engine) -> None:
    with pytest.raises(openai.AuthenticationError) as info:
        client(engine, secret="not-the-secret").chat.completions.create(model="demo", messages=CHAT)
    assert info.value.code == "invalid_api_key"
    for path in ("/health", "/v1/models", "/v1/engine/stats"):
        assert httpx.get(engine.base_url + path).status_code == 401
        assert engine.get(path, secret="wrong").status_code == 401


def test_bad_requests_get_openai_shaped_errors(engine: Engine) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        greedy_chat(engine, max_tokens=5000)
    assert (info.value.code, info.value.param) == ("context_length_exceeded", "messages")
    with pytest.raises(openai.BadRequestError) as info:
        greedy_chat(engine, n=2)
    assert info.value.code == "unsupported_parameter"
    headers = {"Authorization": f"Bearer {engine.secret}"}
    bad = httpx.post(engine.base_url + "/v1/chat/completions", content=b"{nope", headers=headers)
    assert bad.status_code == 400
    assert bad.json()["error"]["code"] == "invalid_json"
    big = httpx.post(
        engine.base_url + "/v1/completions", content=b" " * (5 * 2**20), headers=headers
    )
    assert big.status_code == 413
    assert big.json()["error"]["code"] == "request_too_large"
    assert engine.get("/health").status_code == 200


async def test_concurrent_streams_are_batched(engine: Engine) -> None:
    c = async_client(engine)

    async def one(i: int) -> tuple[int, str | None]:
        stream = await c.chat.completions.create(
            model="demo",
            messages=[{"role": "user", "content": f"Story number {i}"}],
            temperature=0,
            max_tokens=48,
            stream=True,
            stream_options={"include_usage": True},
        )
        finish, usage = None, 0
        async for ch in stream:
            if ch.choices and ch.choices[0].finish_reason:
                finish = ch.choices[0].finish_reason
            if ch.usage:
                usage = ch.usage.completion_tokens
        return usage, finish

    started = time.monotonic()
    results = await asyncio.gather(*(one(i) for i in range(8)))
    elapsed = time.monotonic() - started
    tokens = sum(u for u, _ in results)
    print(f"8 streams: {tokens} tokens in {elapsed:.2f} s = {tokens / elapsed:.0f} tokens/s")
    assert all(finish in ("stop", "length") for _, finish in results)
    stats = engine.stats()
    assert stats["max_batch_seen"] > 1
    assert stats["active"] == 0 and stats["queued"] == 0
    await c.close()


async def test_late_request_joins_a_running_batch_and_disconnect_frees_it(engine: Engine) -> None:
    c = async_client(engine)
    long_stream = await long_completion(c)
    received = 0
    async for ch in long_stream:
        received += len(ch.choices[0].text) if ch.choices else 0
        if received > 20:
            break
    assert engine.stats()["active"] == 1
    started = time.monotonic()
    short = await c.completions.create(
        model="demo", prompt="Hello", temperature=0, max_tokens=4, stream=True
    )
    first_token_s = None
    async for ch in short:
        if first_token_s is None and ch.choices and ch.choices[0].text:
            first_token_s = time.monotonic() - started
    # The long request is still decoding: it has a slot and has not finished.
    assert engine.stats()["active"] == 1
    assert first_token_s is not None and first_token_s < 2.0
    print(f"first token while another request decodes: {first_token_s * 1000:.0f} ms")
    await long_stream.close()  # the client goes away mid-stream
    wait_for(lambda: engine.stats()["active"] == 0, 10.0, "the cancelled stream's slot to free")
    await c.close()


def test_missing_secret_exits_2_with_one_line(demo_model: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "MLXFLEET_ENGINE_SECRET"}
    for secret in (None, ""):
        if secret is not None:
            env["MLXFLEET_ENGINE_SECRET"] = secret
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "node_agent.engine",
                "--model-path",
                str(demo_model),
                "--model-name",
                "demo",
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert done.returncode == 2
        assert done.stdout == ""
        assert len(done.stderr.strip().splitlines()) == 1
        assert "MLXFLEET_ENGINE_SECRET" in done.stderr


def test_sigterm_drains_in_flight_requests(demo_model: Path, tmp_path: Path) -> None:
    engine = start_engine(demo_model, tmp_path / "engine.log", "--max-concurrency", "2")
    try:
        stream = client(engine).completions.create(
            model="demo", prompt="The sun", temperature=0, max_tokens=150, stream=True
        )
        chunks = iter(stream)
        first = next(chunks)
        engine.proc.popen.terminate()
        rest = list(chunks)
        assert (rest or [first])[-1].choices[0].finish_reason in ("stop", "length")
        assert engine.proc.popen.wait(20) == 0
        assert engine.secret not in engine.proc.output()
    finally:
        engine.proc.stop()


def stream_chunks(engine: Engine, max_tokens: int = 48, **extra: object) -> list:  # type: ignore[type-arg]
    """A greedy chat stream with usage, read to the end; `extra` goes in the request body."""
    stream = client(engine).chat.completions.create(
        model="demo",
        messages=CHAT,
        temperature=0,
        max_tokens=max_tokens,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=extra or None,
    )
    return list(stream)


def content(chunks: list) -> str:  # type: ignore[type-arg]
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


@pytest.mark.parametrize("cut", [1, 17, 47, 48])
def test_a_continued_stream_ends_as_the_uninterrupted_one_does(engine: Engine, cut: int) -> None:
    whole = stream_chunks(engine)
    # What a client had when the first engine died: the chunks whose ids add up to `cut` tokens.
    sent, ids = [], []
    for c in whole:
        if len(ids) + len(token_ids(c)) > cut:
            break
        sent.append(c)
        ids += token_ids(c)
    rest = stream_chunks(
        engine,
        mlxfleet_continuation={"token_ids": ids, "id": whole[0].id, "created": whole[0].created},
    )
    assert content(sent) + content(rest) == content(whole)
    assert [t for c in sent + rest for t in token_ids(c)] == [
        t for c in whole for t in token_ids(c)
    ]
    assert {c.id for c in rest} == {whole[0].id}
    assert all(c.choices[0].delta.role is None for c in rest if c.choices)  # no second role chunk
    # The usage of the whole answer (the continuation's prompt may come from the prefix cache,
    # where the uninterrupted run left its KV: only its cached_tokens would say so).
    totals = ("prompt_tokens", "completion_tokens", "total_tokens")
    assert [getattr(rest[-1].usage, k) for k in totals] == [
        getattr(whole[-1].usage, k) for k in totals
    ]


def test_a_bad_continuation_is_refused(engine: Engine) -> None:
    with pytest.raises(openai.BadRequestError, match="mlxfleet_continuation.token_ids"):
        stream_chunks(engine, mlxfleet_continuation={"token_ids": "x", "id": "a", "created": 1})

"""A batch-tier engine with a quantized KV cache, as a real process driven by the openai client.

This needs a process: the flags, the model thread's choice of decoder and the HTTP contract are
the point. The demo model's head_dim is 32, so the group size is 32 (mlx-lm's 64 cannot divide it).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from mlxfleet.kv import DEFAULT_KV_GROUP_SIZE, DEFAULT_PREFIX_CACHE_BYTES
from mlxfleet.tiers import DEFAULT_KNOBS
from node_agent.engine.config import load_config
from node_agent.errors import ConfigError
from tests.node_agent.engine.conftest import Engine, start_engine
from tests.node_agent.engine.test_engine_prefix_cache import cached_tokens, turn

BASE_ARGV = ["--model-path", "/m", "--model-name", "demo"]
SECRET_ENV = {"MLXFLEET_ENGINE_SECRET": "s"}


@pytest.fixture(scope="module")
def quantized(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    log = tmp_path_factory.mktemp("quantized-engine") / "engine.log"
    running = start_engine(
        demo_model, log, "--tier", "batch", "--kv-bits", "8", "--kv-group-size", "32"
    )
    yield running
    assert running.proc.stop() == 0, running.proc.output()[-3000:]


async def test_completions_run_one_at_a_time_over_an_8_bit_cache(quantized: Engine) -> None:
    stats = quantized.stats()
    assert (stats["tier"], stats["kv_bits"], stats["kv_group_size"]) == ("batch", 8, 32)
    assert stats["knobs"]["max_concurrency"] == 1
    async with openai.AsyncOpenAI(
        base_url=quantized.base_url + "/v1", api_key=quantized.secret, max_retries=0
    ) as client:

        async def complete() -> tuple[str, str | None, int]:
            r = await client.completions.create(
                model="demo", prompt="The quick brown", temperature=0, max_tokens=12
            )
            return r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens

        results = await asyncio.gather(*(complete() for _ in range(3)))
    text, finish, tokens = results[0]
    assert text and finish in ("stop", "length") and 0 < tokens <= 12
    assert results == [results[0]] * 3  # greedy: the same text for each
    stats = quantized.stats()
    assert (stats["max_batch_seen"], stats["requests_total"]) == (1, 3)
    assert (stats["active"], stats["queued"]) == (0, 0)


def test_a_follow_up_turn_starts_from_the_prefix_cache_and_answers_as_without_it(
    quantized: Engine,
) -> None:
    """The quantized engine keeps a prefix cache too (the default budget). The same follow-up
    once from the cache and once after emptying it gives the same greedy answer."""
    client = openai.OpenAI(
        base_url=quantized.base_url + "/v1", api_key=quantized.secret, max_retries=0
    )

    def chat(question: str) -> Any:
        return client.chat.completions.create(
            model="demo", messages=turn(question), max_tokens=16, temperature=0
        )

    assert cached_tokens(chat("What is the weather?")) == 0
    follow = chat("And tomorrow?")
    stats = quantized.stats()["prefix_cache"]
    assert follow.usage.prompt_tokens > 600
    assert 0.9 * follow.usage.prompt_tokens <= cached_tokens(follow) < follow.usage.prompt_tokens
    assert stats["budget_bytes"] == DEFAULT_PREFIX_CACHE_BYTES and stats["hits"] == 1
    headers = {"Authorization": f"Bearer {quantized.secret}"}
    dropped = httpx.post(
        quantized.base_url + "/v1/engine/prefix_cache/drop", headers=headers, timeout=10
    )
    assert dropped.status_code == 200 and quantized.stats()["prefix_cache"]["entries"] == 0
    uncached = chat("And tomorrow?")
    assert cached_tokens(uncached) == 0
    assert follow.choices[0].message.content == uncached.choices[0].message.content


def test_knobs_cannot_raise_max_concurrency(quantized: Engine) -> None:
    headers = {"Authorization": f"Bearer {quantized.secret}"}
    url = quantized.base_url + "/v1/engine/knobs"
    refused = httpx.post(url, json={"max_concurrency": 4}, headers=headers, timeout=10)
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "max_concurrency"
    ok = httpx.post(url, json={"queue_limit": 8}, headers=headers, timeout=10)
    assert ok.status_code == 200
    assert (ok.json()["max_concurrency"], ok.json()["queue_limit"]) == (1, 8)


def test_kv_flags_make_a_batch_engine_of_one_slot() -> None:
    config = load_config([*BASE_ARGV, "--tier", "batch", "--kv-bits", "4"], SECRET_ENV)
    assert (config.kv_bits, config.kv_group_size) == (4, DEFAULT_KV_GROUP_SIZE)
    assert (config.knobs.max_concurrency, config.knobs.max_batch_size) == (1, 1)
    assert config.knobs.queue_limit == DEFAULT_KNOBS["batch"].queue_limit
    plain = load_config([*BASE_ARGV, "--tier", "batch"], SECRET_ENV)
    assert (plain.kv_bits, plain.knobs) == (None, DEFAULT_KNOBS["batch"])


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--kv-bits", "8"], "--kv-bits 8 is for the batch tier only"),
        (["--tier", "batch", "--kv-bits", "3"], "--kv-bits must be one of 8, 4, got '3'"),
        (["--tier", "batch", "--kv-bits", "8", "--kv-group-size", "16"], "one of 32, 64, 128"),
        (["--tier", "batch", "--kv-bits", "4", "--max-concurrency", "2"], "must be 1, got 2"),
        (["--tier", "batch", "--kv-group-size", "32"], "--kv-group-size needs --kv-bits"),
    ],
)
def test_bad_kv_flags_are_one_line_errors(flags: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config([*BASE_ARGV, *flags], SECRET_ENV)

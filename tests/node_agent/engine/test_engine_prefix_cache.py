"""The prefix cache inside the real engine (demo model): a follow-up turn starts from the KV of
the turn before, says so in its usage, and answers exactly what an engine without a cache
answers, alone, concurrently with another request sharing the prefix, and when sampled.

Needs processes: two engines, one with the cache and one without, compared request by request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.node_agent.engine.conftest import Engine, start_engine

# A long shared beginning (a system prompt an agent resends every turn): ~600 tokens.
SYSTEM = "You are the team's assistant. " + " ".join(f"rule {i}: be kind." for i in range(120))


def turn(question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]


@pytest.fixture(scope="module")
def engines(
    demo_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Engine, Engine]]:
    logs = tmp_path_factory.mktemp("prefix")
    cached = start_engine(demo_model, logs / "cached.log")
    plain = start_engine(demo_model, logs / "plain.log", "--prefix-cache-mib", "0")
    yield cached, plain
    for engine in (cached, plain):
        assert engine.proc.stop() == 0, engine.proc.output()[-3000:]


def chat(engine: Engine, messages: list[dict[str, str]], **extra: Any) -> Any:
    client = openai.OpenAI(base_url=engine.base_url + "/v1", api_key=engine.secret, max_retries=0)
    body = {"max_tokens": 16, "temperature": 0} | extra
    return client.chat.completions.create(model="demo", messages=messages, **body)


def cached_tokens(reply: Any) -> int:
    details = reply.usage.prompt_tokens_details
    return details.cached_tokens if details is not None else 0


def test_a_follow_up_turn_reuses_the_prefix_and_answers_the_same(
    engines: tuple[Engine, Engine],
) -> None:
    cached, plain = engines
    first = chat(cached, turn("What is the weather?"))
    assert cached_tokens(first) == 0
    before = cached.stats()["prefix_cache"]
    follow = chat(cached, turn("And tomorrow?"))
    after = cached.stats()["prefix_cache"]
    # Everything up to where the questions differ came from the cache.
    assert follow.usage.prompt_tokens > 600
    assert 0.9 * follow.usage.prompt_tokens <= cached_tokens(follow) < follow.usage.prompt_tokens
    assert after["hits"] == before["hits"] + 1
    assert after["tokens_saved"] - before["tokens_saved"] == cached_tokens(follow)
    assert 0 < after["bytes"] <= after["budget_bytes"]
    reference = chat(plain, turn("And tomorrow?"))
    assert cached_tokens(reference) == 0 and plain.stats()["prefix_cache"]["entries"] == 0
    assert follow.choices[0].message.content == reference.choices[0].message.content


def test_the_same_prefix_twice_in_one_batch_corrupts_neither(
    engines: tuple[Engine, Engine],
) -> None:
    cached, plain = engines
    chat(cached, turn("Warm the cache."))
    questions = ["Who are you?", "What is MLX?"]

    async def both() -> list[Any]:
        client = openai.AsyncOpenAI(
            base_url=cached.base_url + "/v1", api_key=cached.secret, max_retries=0
        )
        replies = await asyncio.gather(
            *(
                client.chat.completions.create(
                    model="demo", messages=turn(q), max_tokens=24, temperature=0
                )
                for q in questions
            )
        )
        await client.close()
        return list(replies)

    together = asyncio.run(both())
    assert all(cached_tokens(r) > 600 for r in together)
    for question, reply in zip(questions, together, strict=True):
        alone = chat(plain, turn(question), max_tokens=24)
        assert reply.choices[0].message.content == alone.choices[0].message.content


def test_a_cached_prefix_still_samples_as_asked(engines: tuple[Engine, Engine]) -> None:
    cached, plain = engines
    chat(cached, turn("Seed the cache."))
    sampled = {"temperature": 1.0, "top_p": 0.9, "seed": 42, "max_tokens": 24}
    reply = chat(cached, turn("Tell me a story."), **sampled)
    assert cached_tokens(reply) > 600
    assert (
        reply.choices[0].message.content
        == chat(plain, turn("Tell me a story."), **sampled).choices[0].message.content
    )


def test_a_continued_stream_starts_from_the_cache_of_the_engine_that_continues_it(
    engines: tuple[Engine, Engine],
) -> None:
    """Failover continuation: the next engine gets the prompt plus the ids the client already
    has; where its cache holds the prompt, only the sent ids and the rest are prefilled."""
    cached, plain = engines
    messages = turn("Continue this story.")
    chat(cached, turn("Fill the cache with this prefix."))  # the shared system prompt is held
    whole = chat(plain, messages, max_tokens=24, logprobs=False)
    ids = (whole.model_extra or {})["mlxfleet"]["token_ids"]
    before = cached.stats()["prefix_cache"]
    rest = chat(
        cached,
        messages,
        max_tokens=24,
        extra_body={
            "mlxfleet_continuation": {"token_ids": ids[:8], "id": "chatcmpl-x", "created": 1}
        },
    )
    after = cached.stats()["prefix_cache"]
    assert after["hits"] == before["hits"] + 1
    assert after["tokens_saved"] - before["tokens_saved"] > 600  # the system prompt at least
    # The continuation answers what the uninterrupted run did after its first 8 tokens.
    assert (rest.model_extra or {})["mlxfleet"]["token_ids"] == ids[8:]
    assert 600 < cached_tokens(rest) <= rest.usage.prompt_tokens

"""The async openai client of an engine under test, and a stream that keeps one slot busy."""

from __future__ import annotations

import openai
from openai.types import Completion

from tests.node_agent.engine.conftest import Engine


def async_client(engine: Engine) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=engine.base_url + "/v1", api_key=engine.secret, max_retries=0
    )


async def long_completion(c: openai.AsyncOpenAI) -> openai.AsyncStream[Completion]:
    """A sampled completion of up to 3000 tokens: it decodes until the test closes it."""
    return await c.completions.create(
        model="demo",
        prompt="Once upon a time",
        temperature=1.0,
        seed=5,
        max_tokens=3000,
        stream=True,
    )

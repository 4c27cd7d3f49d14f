"""Constrained decoding on the real engine: a grammar must force valid output even from the
random demo model's weights, sampled at temperature 1, inside a batch."""

from __future__ import annotations

import asyncio
import json

import jsonschema
import openai
import pytest

from tests.agent_model import CARD_FORMAT, CARD_SCHEMA
from tests.node_agent.engine.clients import async_client
from tests.node_agent.engine.conftest import Engine
from tests.node_agent.engine.test_engine_server import CHAT, client, token_ids

SCHEMA = CARD_SCHEMA


def card(engine: Engine, **extra: object):  # type: ignore[no-untyped-def]
    """The chat question, answered greedily as a card (CARD_SCHEMA)."""
    return client(engine).chat.completions.create(
        model="demo",
        messages=CHAT,
        temperature=0,
        max_tokens=200,
        response_format=CARD_FORMAT,
        **extra,
    )


async def test_json_schema_output_validates_in_every_sampled_request(engine: Engine) -> None:
    async with async_client(engine) as c:

        async def one(seed: int) -> tuple[str, str]:
            r = await c.chat.completions.create(
                model="demo",
                messages=CHAT,
                temperature=1.0,
                seed=seed,
                max_tokens=200,
                response_format=CARD_FORMAT,  # type: ignore[arg-type]
            )
            return r.choices[0].message.content or "", r.choices[0].finish_reason

        answers = await asyncio.gather(*(one(seed) for seed in range(16)))
    for content, finish in answers:
        assert finish == "stop", content
        jsonschema.validate(json.loads(content), SCHEMA)
    assert len({content for content, _ in answers}) > 1  # sampled, not one forced answer


def test_json_object_starts_as_an_object_even_from_random_weights(engine: Engine) -> None:
    """Any object: the random model tends to write one long key until max_tokens, so here the
    grammar shows in the first character (the trained model's whole answer is checked in
    test_engine_tools.py)."""
    for seed in range(3):
        text, finish = "", None
        for chunk in client(engine).chat.completions.create(
            model="demo",
            messages=CHAT,
            temperature=1.0,
            seed=seed,
            max_tokens=24,
            response_format={"type": "json_object"},
            stream=True,
        ):
            for choice in chunk.choices:
                text += choice.delta.content or ""
                finish = choice.finish_reason or finish
        assert text.startswith("{"), text
        if finish == "stop":  # it ended: a whole object
            assert isinstance(json.loads(text), dict), text


def test_a_continued_constrained_stream_resumes_its_grammar(engine: Engine) -> None:
    """Failover: the next engine feeds the grammar the tokens already sent, then goes on."""
    whole = card(engine)
    ids = token_ids(whole)
    cut = len(ids) // 2
    continuation = {"token_ids": ids[:cut], "id": "chatcmpl-x", "created": 1}
    rest = card(engine, extra_body={"mlxfleet_continuation": continuation})
    assert ids[:cut] + token_ids(rest) == ids
    jsonschema.validate(json.loads(whole.choices[0].message.content or ""), SCHEMA)


@pytest.mark.parametrize(
    ("fmt", "param"),
    [
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}},
            "response_format",
        ),
        (
            {"type": "json_schema", "json_schema": {"schema": {"type": "object"}}},
            "response_format.json_schema.name",
        ),
        ({"type": "xml"}, "response_format.type"),
    ],
)
def test_a_bad_response_format_is_refused_naming_the_problem(
    engine: Engine, fmt: dict, param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client(engine).chat.completions.create(model="demo", messages=CHAT, response_format=fmt)  # type: ignore[arg-type]
    assert info.value.body["param"] == param  # type: ignore[index]
    if param == "response_format":
        assert "nonsense" in info.value.body["message"]  # type: ignore[index]

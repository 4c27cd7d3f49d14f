"""Every sampling control, per request inside the running batch, on the real engine process.

The demo model's weights are random, so the tests compare requests with one another (greedy
against biased, sampled against filtered) rather than against fixed text.
"""

from __future__ import annotations

import asyncio
import math

import openai
import pytest

from tests.node_agent.engine.clients import async_client
from tests.node_agent.engine.conftest import Engine
from tests.node_agent.engine.test_engine_server import CHAT, client, token_ids


def same_text(tokens: str, text: str) -> bool:
    """The tokens' text is the answer's, but for the leading space of the first token, which
    mlx-lm's detokenizer drops from the text and which stays in the token (it is the token)."""
    return tokens == text or tokens == " " + text


def greedy_ids(engine: Engine, max_tokens: int = 16, **extra: object) -> list[int]:
    response = client(engine).chat.completions.create(
        model="demo", messages=CHAT, temperature=0, max_tokens=max_tokens, **extra
    )
    return token_ids(response)


def test_logit_bias_minus_100_on_the_greedy_first_token_changes_it(engine: Engine) -> None:
    first = greedy_ids(engine)[0]
    biased = greedy_ids(engine, logit_bias={str(first): -100})
    assert biased[0] != first
    # +100 on another (ordinary, not end-of-text) token makes it the greedy choice.
    favourite = 50 if first != 50 else 51
    assert greedy_ids(engine, logit_bias={str(favourite): 100})[:3] == [favourite] * 3


def test_top_k_1_and_min_p_1_sample_the_greedy_tokens(engine: Engine) -> None:
    greedy = greedy_ids(engine, max_tokens=24)
    for filters in ({"top_k": 1}, {"min_p": 1.0}):
        response = client(engine).chat.completions.create(
            model="demo",
            messages=CHAT,
            temperature=1.0,
            seed=3,
            max_tokens=24,
            extra_body=filters,
        )
        assert token_ids(response) == greedy, filters
    sampled = client(engine).chat.completions.create(
        model="demo", messages=CHAT, temperature=1.0, seed=3, max_tokens=24
    )
    assert token_ids(sampled) != greedy  # the filters, not the seed, made them greedy


def test_penalties_change_a_repetitive_greedy_answer(engine: Engine) -> None:
    plain = greedy_ids(engine, max_tokens=48)
    assert len(set(plain)) < len(plain)  # the random model repeats itself
    for penalty in (
        {"presence_penalty": 2.0},
        {"frequency_penalty": 2.0},
        {"extra_body": {"repetition_penalty": 2.0}},
    ):
        penalised = greedy_ids(engine, max_tokens=48, **penalty)  # type: ignore[arg-type]
        assert penalised != plain, penalty


def test_top_logprobs_returns_three_alternatives_per_token(engine: Engine) -> None:
    response = client(engine).chat.completions.create(
        model="demo", messages=CHAT, temperature=0, max_tokens=12, logprobs=True, top_logprobs=3
    )
    entries = response.choices[0].logprobs.content
    assert len(entries) == response.usage.completion_tokens == 12
    assert same_text("".join(e.token for e in entries), response.choices[0].message.content)
    for e in entries:
        assert len(e.top_logprobs) == 3
        values = [t.logprob for t in e.top_logprobs]
        assert values == sorted(values, reverse=True) and all(v <= 0 for v in values)
        # Greedy: the chosen token is the most likely one, with the same log probability.
        assert (e.top_logprobs[0].token, e.top_logprobs[0].logprob) == (e.token, e.logprob)
        assert e.bytes == list(e.token.encode())
    assert sum(math.exp(t.logprob) for t in entries[0].top_logprobs) <= 1.0 + 1e-4


def test_logprobs_alone_report_the_chosen_token_without_alternatives(engine: Engine) -> None:
    response = client(engine).chat.completions.create(
        model="demo", messages=CHAT, temperature=1.0, seed=9, max_tokens=8, logprobs=True
    )
    entries = response.choices[0].logprobs.content
    assert len(entries) == 8 and all(e.top_logprobs == [] and e.logprob <= 0 for e in entries)
    plain = client(engine).chat.completions.create(
        model="demo", messages=CHAT, temperature=0, max_tokens=4
    )
    assert plain.choices[0].logprobs is None


def test_streamed_logprobs_ride_on_the_chunks_of_their_tokens(engine: Engine) -> None:
    stream = client(engine).chat.completions.create(
        model="demo",
        messages=CHAT,
        temperature=0,
        max_tokens=20,
        logprobs=True,
        top_logprobs=2,
        stream=True,
        stream_options={"include_usage": True},
    )
    texts, entries, usage = [], [], None
    for c in stream:
        if c.usage is not None:
            usage = c.usage
        for choice in c.choices:
            if choice.delta.content:
                texts.append(choice.delta.content)
                assert choice.logprobs is not None and choice.logprobs.content
                entries.extend(choice.logprobs.content)
    assert usage is not None and len(entries) == usage.completion_tokens == 20
    assert same_text("".join(e.token for e in entries), "".join(texts))
    assert all(len(e.top_logprobs) == 2 for e in entries)
    whole = client(engine).chat.completions.create(
        model="demo", messages=CHAT, temperature=0, max_tokens=20, logprobs=True, top_logprobs=2
    )
    assert [(e.token, round(e.logprob, 4)) for e in whole.choices[0].logprobs.content] == [
        (e.token, round(e.logprob, 4)) for e in entries
    ]


def test_completions_logprobs_use_the_legacy_shape(engine: Engine) -> None:
    response = client(engine).completions.create(
        model="demo", prompt="The garden", temperature=0, max_tokens=10, logprobs=2
    )
    lp = response.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 10
    assert same_text("".join(lp.tokens), response.choices[0].text)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(10)]
    assert all(len(top) <= 2 and lp.tokens[i] in top for i, top in enumerate(lp.top_logprobs))


async def test_controls_are_per_request_inside_one_batch(engine: Engine) -> None:
    """Four requests decoded together, each with its own controls: each answer is the one it
    gets alone."""
    async with async_client(engine) as c:
        first = greedy_ids(engine)[0]
        variants: list[dict[str, object]] = [
            {},
            {"logit_bias": {str(first): -100}},
            {"presence_penalty": 2.0},
            {"logprobs": True, "top_logprobs": 1},
        ]

        async def run(extra: dict[str, object]) -> list[int]:
            r = await c.chat.completions.create(
                model="demo", messages=CHAT, temperature=0, max_tokens=16, **extra
            )
            return token_ids(r)

        together = await asyncio.gather(*(run(v) for v in variants))
    alone = [greedy_ids(engine, **v) for v in variants]  # type: ignore[arg-type]
    assert together == alone
    assert together[1][0] != first and together[0] == together[3]


def test_a_logit_bias_outside_the_vocabulary_is_refused(engine: Engine) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        greedy_ids(engine, logit_bias={"999999": 5})
    assert info.value.body["param"] == "logit_bias"  # type: ignore[index]
    assert "outside the vocabulary" in info.value.body["message"]  # type: ignore[index]


def test_a_model_is_retrieved_by_id(engine: Engine) -> None:
    c = client(engine)
    assert c.models.retrieve("demo").id == "demo"
    with pytest.raises(openai.NotFoundError) as info:
        c.models.retrieve("other")
    assert info.value.body["code"] == "model_not_found"  # type: ignore[index]


@pytest.mark.parametrize("cut", [3, 17])
def test_a_continued_stream_keeps_its_penalties_and_logprobs(engine: Engine, cut: int) -> None:
    """Failover: the next engine prefills the ids already sent, so the penalties see the same
    window, and it reports logprobs for what it generates."""
    controls = {
        "presence_penalty": 1.5,
        "logit_bias": {"7": 3},
        "logprobs": True,
        "top_logprobs": 2,
    }
    whole = client(engine).chat.completions.create(
        model="demo", messages=CHAT, temperature=0, max_tokens=32, **controls
    )
    ids = token_ids(whole)
    continuation = {"token_ids": ids[:cut], "id": "chatcmpl-x", "created": 1}
    rest = client(engine).chat.completions.create(
        model="demo",
        messages=CHAT,
        temperature=0,
        max_tokens=32,
        extra_body={"mlxfleet_continuation": continuation},
        **controls,
    )
    assert ids[:cut] + token_ids(rest) == ids
    entries = rest.choices[0].logprobs.content
    assert len(entries) == len(ids) - cut and all(len(e.top_logprobs) == 2 for e in entries)
    original = whole.choices[0].logprobs.content[cut:]
    assert [e.token for e in entries] == [e.token for e in original]

"""Claude Code's and Codex's dialects on the one endpoint: the official `anthropic` SDK
(Messages) and `openai` SDK (Responses) against a real coordinator, agent and engine serving
the trained fixture model (tests/agent_model.py) with our team key. (The Agents SDK's
Responses model runs in test_agents.py.)"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import jsonschema
import openai
import pytest

import tests.agent_model as fixture
from tests.e2e.fleet import Fleet, model_toml, running_fleet

MODEL = "agent"
GREEDY = {"temperature": 0}  # Anthropic's SDK no longer names temperature: it goes as extra_body
FUNCTION = fixture.WEATHER_TOOL["function"]
# The weather tool as each dialect declares it (the same schema the model was trained with).
ANTHROPIC_TOOL = {
    "name": FUNCTION["name"],
    "description": FUNCTION["description"],
    "input_schema": FUNCTION["parameters"],
    "strict": True,
}
RESPONSES_TOOL = {"type": "function", **FUNCTION}
QUESTION = fixture.WEATHER_QUESTION[0]["content"]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, agent_model: Path) -> Iterator[Fleet]:
    config = model_toml(agent_model, MODEL, pinned=True)
    with running_fleet(tmp_path_factory, config, ready=[(MODEL, "interactive")]) as f:
        yield f


@pytest.fixture(scope="module")
def claude(fleet: Fleet) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=fleet.base, api_key=fleet.key, max_retries=0)


def weather(**fields: Any) -> dict[str, Any]:
    """A greedy Messages request: the weather question with its tool, unless fields say."""
    return {
        "model": MODEL,
        "max_tokens": 64,
        "messages": [{"role": "user", "content": QUESTION}],
        "tools": [ANTHROPIC_TOOL],
        "extra_body": GREEDY,
    } | fields


def weather_turn(claude: anthropic.Anthropic) -> anthropic.types.Message:
    return claude.messages.create(**weather())


def test_messages_tool_use_and_the_tool_result_turn(claude: anthropic.Anthropic) -> None:
    reply = weather_turn(claude)
    assert reply.type == "message" and reply.role == "assistant" and reply.model == MODEL
    assert reply.stop_reason == "tool_use"
    [block] = reply.content
    assert (block.type, block.name, block.input) == ("tool_use", "get_weather", {"city": "Paris"})
    assert reply.usage.input_tokens > 0 and reply.usage.output_tokens > 0
    result = {"type": "tool_result", "tool_use_id": block.id, "content": fixture.WEATHER_RESULT}
    history = [
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": [block.model_dump(exclude_none=True)]},
        {"role": "user", "content": [result]},
    ]
    follow = claude.messages.create(**weather(messages=history))
    assert follow.stop_reason == "end_turn"
    assert [(b.type, b.text) for b in follow.content] == [("text", fixture.WEATHER_ANSWER)]
    # A stop sequence the answer reaches: the text before it, and which one it was.
    cut = claude.messages.create(**weather(messages=history, stop_sequences=["sunny", "rain"]))
    assert (cut.stop_reason, cut.stop_sequence) == ("stop_sequence", "sunny")
    assert [b.text for b in cut.content] == [fixture.WEATHER_ANSWER.split("sunny")[0]]  # type: ignore[union-attr]


def test_messages_streamed_is_the_same_message_in_anthropic_events(
    fleet: Fleet, claude: anthropic.Anthropic
) -> None:
    whole = weather_turn(claude)
    with claude.messages.stream(**weather()) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    # The same blocks (a call's id is new on every answer).
    assert [b.model_dump(exclude={"id"}) for b in final.content] == [
        b.model_dump(exclude={"id"}) for b in whole.content
    ]
    assert (final.stop_reason, final.usage.input_tokens) == ("tool_use", whole.usage.input_tokens)
    assert final.usage.output_tokens == whole.usage.output_tokens
    assert "input_json" in kinds  # the SDK's own event for each input_json_delta
    # On the wire, Anthropic's event sequence (the SDK does not hand out the ping).
    body = {
        "model": MODEL,
        "max_tokens": 64,
        "messages": [{"role": "user", "content": QUESTION}],
        "tools": [ANTHROPIC_TOOL],
        "stream": True,
        **GREEDY,
    }
    headers = {"x-api-key": fleet.key, "anthropic-version": "2023-06-01"}
    with httpx.stream(
        "POST", f"{fleet.base}/v1/messages", json=body, headers=headers, timeout=60
    ) as r:
        names = [line[7:] for line in r.iter_lines() if line.startswith("event: ")]
    assert r.headers["content-type"].startswith("text/event-stream")
    deltas = names.count("content_block_delta")
    assert deltas >= 1
    assert names == [
        "message_start",
        "ping",
        "content_block_start",
        *["content_block_delta"] * deltas,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]


def test_messages_thinking_maps_onto_the_think_section(claude: anthropic.Anthropic) -> None:
    thinking = {"type": "enabled", "budget_tokens": 1024}
    request = weather(max_tokens=2048, messages=fixture.THINK_QUESTION, tools=[], thinking=thinking)
    reply = claude.messages.create(**request)
    assert [b.type for b in reply.content] == ["thinking", "text"]
    assert reply.content[0].thinking.strip() == fixture.THOUGHT
    assert reply.content[1].text.strip() == fixture.THINK_ANSWER
    with claude.messages.stream(**request) as stream:
        deltas = [e.delta.type for e in stream if e.type == "content_block_delta"]
        final = stream.get_final_message()
    assert "thinking_delta" in deltas and "text_delta" in deltas
    assert [b.model_dump() for b in final.content] == [b.model_dump() for b in reply.content]


def test_a_forced_tool_gives_input_valid_against_its_schema(claude: anthropic.Anthropic) -> None:
    """Constrained decoding makes the call where the model would have answered in words."""
    forced = {"type": "tool", "name": "get_weather"}
    reply = claude.messages.create(
        **weather(max_tokens=256, messages=fixture.THINK_QUESTION, tool_choice=forced)
    )
    [block] = [b for b in reply.content if b.type == "tool_use"]
    assert block.name == "get_weather"
    jsonschema.validate(block.input, FUNCTION["parameters"])
    assert reply.stop_reason == "tool_use"


def test_count_tokens_is_the_prompt_the_engine_runs(claude: anthropic.Anthropic) -> None:
    reply = weather_turn(claude)
    counted = claude.messages.count_tokens(
        model=MODEL, messages=[{"role": "user", "content": QUESTION}], tools=[ANTHROPIC_TOOL]
    )
    # The whole prompt; the answer's usage splits it into what the prefix cache served and the
    # rest, as Anthropic's does.
    usage = reply.usage
    assert counted.input_tokens == usage.input_tokens + (usage.cache_read_input_tokens or 0)
    bare = claude.messages.count_tokens(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert 0 < bare.input_tokens < counted.input_tokens


def test_bad_messages_requests_are_refused_in_anthropic_shape(
    fleet: Fleet, claude: anthropic.Anthropic
) -> None:
    user = {"role": "user", "content": QUESTION}
    cases = [
        (
            [user, {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "x"}]}],
            "tool_use_id",
        ),
        ([{"role": "user", "content": [{"type": "video", "url": "x"}]}], "unknown content block"),
        (
            [
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "image",
                            "source": {"type": "base64", "media_type": "image/png", "data": "AA=="},
                        }
                    ],
                }
            ],
            "text-only",
        ),
    ]
    for messages, words in cases:
        with pytest.raises(anthropic.BadRequestError) as info:
            claude.messages.create(model=MODEL, max_tokens=8, messages=messages)
        assert info.value.status_code == 400
        assert info.value.body["type"] == "error"  # type: ignore[index]
        assert info.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
        assert words in info.value.body["error"]["message"], messages  # type: ignore[index]
    # The SDK insists on max_tokens; a raw client shows the server does too.
    r = httpx.post(
        f"{fleet.base}/v1/messages",
        json={"model": MODEL, "messages": [user]},
        headers={"x-api-key": fleet.key, "anthropic-version": "2023-06-01"},
        timeout=30,
    )
    assert r.status_code == 400
    assert r.json() == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "max_tokens: Field required"},
    }
    with pytest.raises(anthropic.AuthenticationError) as auth:
        anthropic.Anthropic(base_url=fleet.base, api_key="nope", max_retries=0).messages.create(
            model=MODEL, max_tokens=8, messages=[user]
        )
    assert auth.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    with pytest.raises(anthropic.NotFoundError) as missing:
        claude.messages.create(model="no-such-model", max_tokens=8, messages=[user])
    assert missing.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]


def test_responses_function_call_round_trip(fleet: Fleet) -> None:
    client = fleet.client()
    reply = client.responses.create(
        model=MODEL, input=QUESTION, tools=[RESPONSES_TOOL], temperature=0, store=False
    )
    assert reply.status == "completed" and reply.object == "response"
    [call] = reply.output
    assert call.type == "function_call" and call.name == "get_weather"
    assert json.loads(call.arguments) == {"city": "Paris"}
    assert reply.usage is not None and reply.usage.input_tokens > 0
    follow = client.responses.create(
        model=MODEL,
        input=[
            {"role": "user", "content": QUESTION},
            {
                "type": "function_call",
                "call_id": call.call_id,
                "name": call.name,
                "arguments": call.arguments,
            },
            {
                "type": "function_call_output",
                "call_id": call.call_id,
                "output": fixture.WEATHER_RESULT,
            },
        ],
        tools=[RESPONSES_TOOL],
        temperature=0,
    )
    assert follow.output_text == fixture.WEATHER_ANSWER
    assert [item.type for item in follow.output] == ["message"]


def test_responses_streamed_events_build_the_same_response(fleet: Fleet) -> None:
    client = fleet.client()
    question = fixture.THINK_QUESTION[0]["content"]
    whole = client.responses.create(model=MODEL, input=question, temperature=0)
    assert [item.type for item in whole.output] == ["reasoning", "message"]
    assert whole.output[0].content[0].text.strip() == fixture.THOUGHT  # type: ignore[union-attr]
    assert whole.output_text.strip() == fixture.THINK_ANSWER
    with client.responses.stream(model=MODEL, input=question, temperature=0) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.completed"
    assert "response.reasoning_text.delta" in kinds and "response.output_text.delta" in kinds
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert final.output_text == whole.output_text
    assert [i.type for i in final.output] == ["reasoning", "message"]
    # Streamed function call: arguments arrive as deltas, then the done item.
    with client.responses.stream(
        model=MODEL, input=QUESTION, tools=[RESPONSES_TOOL], temperature=0
    ) as stream:
        kinds = [e.type for e in stream]
        [call] = stream.get_final_response().output
    assert "response.function_call_arguments.delta" in kinds
    assert call.type == "function_call" and json.loads(call.arguments) == {"city": "Paris"}


def test_responses_text_format_json_schema(fleet: Fleet) -> None:
    schema = fixture.CARD_SCHEMA
    reply = fleet.client().responses.create(
        model=MODEL,
        input="Describe a card.",
        text={"format": {"type": "json_schema", "name": "card", "schema": schema, "strict": True}},
        max_output_tokens=200,
    )
    jsonschema.validate(json.loads(reply.output_text), schema)


def test_bad_responses_requests_are_refused_in_openai_shape(fleet: Fleet) -> None:
    client = fleet.client()
    cases: list[tuple[dict[str, Any], str]] = [
        ({"input": "hi", "previous_response_id": "resp_1"}, "previous_response_id"),
        ({"input": "hi", "store": True}, "store"),
        (
            {"input": [{"type": "function_call_output", "call_id": "c9", "output": "x"}]},
            "input[0].call_id",
        ),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
            "input[0].content[0]",
        ),
        ({"input": "hi", "tools": [{"type": "web_search"}]}, "tools[0].type"),
    ]
    for extra, param in cases:
        with pytest.raises(openai.BadRequestError) as info:
            client.responses.create(model=MODEL, **extra)
        assert info.value.body["param"] == param, extra  # type: ignore[index]
        assert info.value.status_code == 400


def test_each_dialect_is_counted_under_its_api_label(fleet: Fleet) -> None:
    def counted(api: str) -> float:
        text = httpx.get(f"{fleet.base}/metrics", timeout=10).text
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("mlxfleet_requests_total{") and f'api="{api}"' in line
        )

    before = {api: counted(api) for api in ("chat", "messages", "responses")}
    client = fleet.client()
    client.chat.completions.create(model=MODEL, messages=fixture.JSON_QUESTION, max_tokens=4)
    client.responses.create(model=MODEL, input="hi", max_output_tokens=4)
    claude = anthropic.Anthropic(base_url=fleet.base, api_key=fleet.key, max_retries=0)
    claude.messages.create(model=MODEL, max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    claude.messages.count_tokens(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert {api: counted(api) - before[api] for api in before} == {
        "chat": 1,
        "messages": 1,  # count_tokens generates nothing and is not a completion
        "responses": 1,
    }

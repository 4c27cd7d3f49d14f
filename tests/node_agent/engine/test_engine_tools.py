"""Tool calls and reasoning on the real engine, with the trained fixture model
(tests/agent_model.py): its real chat template, mlx-lm's tool parser and think markers."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest

from tests.agent_model import (
    JSON_ANSWER,
    JSON_QUESTION,
    THINK_ANSWER,
    THINK_QUESTION,
    THOUGHT,
    WEATHER_ANSWER,
    WEATHER_CALL,
    WEATHER_QUESTION,
    WEATHER_TOOL,
    weather_history,
)
from tests.node_agent.engine.conftest import Engine, start_engine
from tests.node_agent.engine.test_engine_server import client, token_ids


@pytest.fixture(scope="module")
def agent(agent_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    running = start_engine(agent_model, tmp_path_factory.mktemp("agent") / "engine.log")
    yield running
    assert running.proc.stop() == 0, running.proc.output()[-3000:]


def chat(engine: Engine, messages: list, **extra: object):  # type: ignore[no-untyped-def]
    return client(engine).chat.completions.create(
        model="demo", messages=messages, temperature=0, max_tokens=64, **extra
    )


def weather_stream(engine: Engine, **extra: object):  # type: ignore[no-untyped-def]
    """The weather question with its tool, streamed greedily."""
    return chat(engine, WEATHER_QUESTION, tools=[WEATHER_TOOL], stream=True, **extra)


def test_the_fixture_model_answers_as_trained(agent: Engine) -> None:
    assert chat(agent, JSON_QUESTION).choices[0].message.content == JSON_ANSWER
    # The grammar lets its own JSON through unchanged (json.dumps spacing).
    constrained = chat(agent, JSON_QUESTION, response_format={"type": "json_object"})
    assert constrained.choices[0].message.content == JSON_ANSWER


def test_a_tool_call_comes_back_as_tool_calls(agent: Engine) -> None:
    reply = chat(agent, WEATHER_QUESTION, tools=[WEATHER_TOOL])
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == WEATHER_CALL["name"]
    assert json.loads(call.function.arguments) == WEATHER_CALL["arguments"]


def test_the_follow_up_turn_with_the_tool_result(agent: Engine) -> None:
    reply = chat(agent, weather_history(), tools=[WEATHER_TOOL])
    assert reply.choices[0].message.content == WEATHER_ANSWER
    assert reply.choices[0].finish_reason == "stop" and not reply.choices[0].message.tool_calls


def test_streamed_tool_calls_are_assembled_by_the_official_client(agent: Engine) -> None:
    stream = weather_stream(agent)
    pieces, finish, ids = [], None, []
    for chunk in stream:
        ids += token_ids(chunk)
        for choice in chunk.choices:
            pieces += choice.delta.tool_calls or []
            assert not choice.delta.content  # the call's text never leaks into content
            finish = choice.finish_reason or finish
    assert finish == "tool_calls"
    head, rest = pieces
    assert (head.index, head.type, head.function.name) == (0, "function", "get_weather")
    assert head.id.startswith("call_") and rest.id is None and rest.index == 0
    assert (
        json.loads(head.function.arguments + rest.function.arguments) == WEATHER_CALL["arguments"]
    )
    assert ids == token_ids(chat(agent, WEATHER_QUESTION, tools=[WEATHER_TOOL]))


def test_tool_choice_none_leaves_the_tools_out(agent: Engine) -> None:
    reply = chat(agent, WEATHER_QUESTION, tools=[WEATHER_TOOL], tool_choice="none")
    assert not reply.choices[0].message.tool_calls
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_thinking_goes_to_reasoning_content_only(agent: Engine) -> None:
    reply = chat(agent, THINK_QUESTION)
    message = reply.choices[0].message
    assert (message.model_extra or {})["reasoning_content"] == f"\n{THOUGHT}\n"
    assert message.content == f"\n\n{THINK_ANSWER}" and "think>" not in message.content
    reasoning, content = "", ""
    for chunk in client(agent).chat.completions.create(
        model="demo", messages=THINK_QUESTION, temperature=0, max_tokens=64, stream=True
    ):
        for choice in chunk.choices:
            reasoning += (choice.delta.model_extra or {}).get("reasoning_content") or ""
            content += choice.delta.content or ""
    assert (reasoning, content) == (f"\n{THOUGHT}\n", f"\n\n{THINK_ANSWER}")


def test_chat_template_kwargs_reach_the_template(agent: Engine) -> None:
    """enable_thinking false: the template closes the think section itself, so the answer
    starts outside it."""
    reply = chat(
        agent, THINK_QUESTION, extra_body={"chat_template_kwargs": {"enable_thinking": False}}
    )
    assert "reasoning_content" not in (reply.choices[0].message.model_extra or {})
    plain = chat(agent, THINK_QUESTION)
    assert reply.usage.prompt_tokens > plain.usage.prompt_tokens  # the closed think section


def test_parallel_tool_calls_false_allows_one_call(agent: Engine) -> None:
    reply = chat(agent, WEATHER_QUESTION, tools=[WEATHER_TOOL], parallel_tool_calls=False)
    assert len(reply.choices[0].message.tool_calls) == 1
    assert reply.choices[0].finish_reason == "tool_calls"
    # The answer ends at the call: its tokens are the call's, counted in the usage.
    whole = chat(agent, WEATHER_QUESTION, tools=[WEATHER_TOOL])
    assert token_ids(reply) == token_ids(whole)
    assert reply.usage.completion_tokens == len(token_ids(reply)) == whole.usage.completion_tokens
    streamed = list(weather_stream(agent, parallel_tool_calls=False))
    assert [c.choices[0].finish_reason for c in streamed if c.choices][-1] == "tool_calls"
    assert sum(len(c.choices[0].delta.tool_calls or []) for c in streamed if c.choices) == 2


@pytest.mark.parametrize("cut", [1, 6, 20])
def test_a_stream_continued_inside_a_tool_call_still_makes_the_call(
    agent: Engine, cut: int
) -> None:
    """Failover: another engine sent `cut` of the answer's tokens (inside the call's text); this
    one resumes the call from those ids, and the client gets the whole call once."""
    whole = chat(agent, WEATHER_QUESTION, tools=[WEATHER_TOOL])
    ids = token_ids(whole)
    assert len(ids) > 20
    continuation = {"token_ids": ids[:cut], "id": "chatcmpl-continued", "created": 1}
    stream = weather_stream(agent, extra_body={"mlxfleet_continuation": continuation})
    pieces, finish, rest_ids = [], None, []
    for chunk in stream:
        assert chunk.id == "chatcmpl-continued"
        rest_ids += token_ids(chunk)
        for choice in chunk.choices:
            assert not choice.delta.content and choice.delta.role is None
            pieces += choice.delta.tool_calls or []
            finish = choice.finish_reason or finish
    assert finish == "tool_calls" and ids[:cut] + rest_ids == ids
    assert pieces[0].function.name == "get_weather" and pieces[0].index == 0
    arguments = "".join(p.function.arguments or "" for p in pieces)
    assert json.loads(arguments) == WEATHER_CALL["arguments"]


TIME_TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "maxLength": 12}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
NAMED = {"type": "function", "function": {"name": "get_time"}}


@pytest.mark.parametrize("stream", [False, True])
def test_a_named_tool_choice_forces_a_valid_call_of_that_function(
    agent: Engine, stream: bool
) -> None:
    """The model was taught to call get_weather here; the grammar makes it call get_time, with
    arguments its schema accepts."""
    extra = {"tools": [WEATHER_TOOL, TIME_TOOL], "tool_choice": NAMED}
    if not stream:
        [call] = chat(agent, WEATHER_QUESTION, **extra).choices[0].message.tool_calls
        name, arguments = call.function.name, call.function.arguments
    else:
        pieces = [
            piece
            for chunk in chat(agent, WEATHER_QUESTION, stream=True, **extra)
            for choice in chunk.choices
            for piece in choice.delta.tool_calls or []
        ]
        name = pieces[0].function.name
        arguments = "".join(p.function.arguments or "" for p in pieces)
    assert name == "get_time"
    jsonschema.validate(json.loads(arguments), TIME_TOOL["function"]["parameters"])


def test_tool_choice_required_makes_a_call_where_the_model_would_answer(agent: Engine) -> None:
    assert not chat(agent, THINK_QUESTION, tools=[WEATHER_TOOL]).choices[0].message.tool_calls
    reply = chat(agent, THINK_QUESTION, tools=[WEATHER_TOOL], tool_choice="required")
    [call] = reply.choices[0].message.tool_calls
    assert reply.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER_TOOL["function"]["parameters"])


def test_structured_output_comes_after_the_models_think_section(agent: Engine) -> None:
    """The grammar leaves the thinking free and constrains the answer that follows it."""
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["answer"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "sum", "schema": schema}}
    message = chat(agent, THINK_QUESTION, response_format=fmt).choices[0].message
    assert (message.model_extra or {})["reasoning_content"] == f"\n{THOUGHT}\n"
    jsonschema.validate(json.loads(message.content), schema)

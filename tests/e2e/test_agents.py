"""An agent's traffic through the one endpoint: real coordinator, agent and engine serving the
trained fixture model (tests/agent_model.py), driven by the official `openai` client and by the
OpenAI Agents SDK with its Chat Completions model and its default, Responses, model."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from agents import (
    Agent,
    ModelSettings,
    OpenAIChatCompletionsModel,
    OpenAIResponsesModel,
    Runner,
    function_tool,
    set_tracing_disabled,
)

import tests.agent_model as fixture
from tests.e2e.fleet import Fleet, model_toml, running_fleet

MODEL = "agent"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, agent_model: Path) -> Iterator[Fleet]:
    config = model_toml(agent_model, MODEL, pinned=True)
    with running_fleet(tmp_path_factory, config, ready=[(MODEL, "interactive")]) as f:
        yield f


def test_tool_calls_and_the_follow_up_turn_through_the_gateway(fleet: Fleet) -> None:
    client = fleet.client()
    reply = client.chat.completions.create(
        model=MODEL, messages=fixture.WEATHER_QUESTION, tools=[fixture.WEATHER_TOOL], temperature=0
    )
    [call] = reply.choices[0].message.tool_calls
    assert reply.choices[0].finish_reason == "tool_calls"
    assert (call.function.name, json.loads(call.function.arguments)) == (
        fixture.WEATHER_CALL["name"],
        fixture.WEATHER_CALL["arguments"],
    )
    # The SDK assembles the streamed pieces into the same call.
    pieces = [
        piece
        for chunk in client.chat.completions.create(
            model=MODEL,
            messages=fixture.WEATHER_QUESTION,
            tools=[fixture.WEATHER_TOOL],
            temperature=0,
            stream=True,
        )
        for choice in chunk.choices
        for piece in choice.delta.tool_calls or []
    ]
    assert pieces[0].function.name == "get_weather"
    assert json.loads("".join(p.function.arguments or "" for p in pieces)) == {"city": "Paris"}
    # Second turn: the call's id and the tool's answer in the history.
    follow = client.chat.completions.create(
        model=MODEL,
        messages=fixture.weather_history(call.id),
        tools=[fixture.WEATHER_TOOL],
        temperature=0,
    )
    assert follow.choices[0].message.content == fixture.WEATHER_ANSWER


def test_reasoning_arrives_only_in_reasoning_content(fleet: Fleet) -> None:
    reply = fleet.client().chat.completions.create(
        model=MODEL, messages=fixture.THINK_QUESTION, temperature=0
    )
    message = reply.choices[0].message
    assert (message.model_extra or {})["reasoning_content"].strip() == fixture.THOUGHT
    assert message.content.strip() == fixture.THINK_ANSWER


def test_bad_tool_requests_are_refused_before_any_engine_work(fleet: Fleet) -> None:
    client = fleet.client()
    nameless = {"type": "function", "function": {"parameters": {"type": "object"}}}
    array_schema = {"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}
    cases = [
        ({"tools": [nameless]}, "tools[0].function.name"),
        ({"tools": [array_schema]}, "tools[0].function.parameters"),
        ({"tools": [fixture.WEATHER_TOOL, fixture.WEATHER_TOOL]}, "tools"),
        (
            {
                "tools": [fixture.WEATHER_TOOL],
                "tool_choice": {"type": "function", "function": {"name": "get_time"}},
            },
            "tool_choice",
        ),
    ]
    for extra, param in cases:
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=MODEL, messages=fixture.WEATHER_QUESTION, **extra)
        assert info.value.body["param"] == param, extra  # type: ignore[index]
    history = fixture.weather_history()
    del history[-1]["tool_call_id"]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=history, tools=[fixture.WEATHER_TOOL])
    assert info.value.body["param"] == "messages[2].tool_call_id"  # type: ignore[index]


@pytest.mark.parametrize("model_class", [OpenAIChatCompletionsModel, OpenAIResponsesModel])
async def test_an_openai_agents_sdk_turn_uses_the_tool(fleet: Fleet, model_class: type) -> None:
    """Both of the SDK's models: Chat Completions, and Responses (its default), which goes
    through the gateway's Responses adapter."""
    set_tracing_disabled(True)  # no export to OpenAI's tracing service from here
    calls: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """The weather in a city now."""
        calls.append(city)
        return fixture.WEATHER_RESULT

    client = openai.AsyncOpenAI(base_url=fleet.base + "/v1", api_key=fleet.key, max_retries=0)
    agent = Agent(
        name="weather",
        model=model_class(model=MODEL, openai_client=client),
        model_settings=ModelSettings(temperature=0),
        tools=[get_weather],
    )
    result = await Runner.run(agent, fixture.WEATHER_QUESTION[0]["content"])
    assert calls == ["Paris"]
    assert result.final_output == fixture.WEATHER_ANSWER
    await client.close()

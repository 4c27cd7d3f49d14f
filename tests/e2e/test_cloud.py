"""The cloud fallback (Router order 3) through the real coordinator and LiteLLM.

Offline, the "provider" is an OpenAI-compatible server we can run: one of our engines,
addressed as LiteLLM's `openai/<model>` with an api_base, its secret as the provider key
(read from the environment variable [cloud] names). No agent runs, so no engine of the fleet
can serve: every request falls through orders 1 and 2 to the cloud.
"""

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

from tests.agent_model import CARD_FORMAT, CARD_SCHEMA
from tests.e2e.fleet import running_fleet
from tests.node_agent.engine.conftest import Engine, start_engine

KEY_ENV = "MLXFLEET_TEST_CLOUD_KEY"
BODY = {
    "model": "demo",
    "messages": [{"role": "user", "content": "Tell me about the garden."}],
    "max_tokens": 24,
    "temperature": 0,
}


@pytest.fixture(scope="module")
def provider(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    log = tmp_path_factory.mktemp("provider") / "engine.log"
    engine = start_engine(demo_model, log)
    yield engine
    engine.proc.stop()


@pytest.fixture(scope="module")
def gateway(
    provider: Engine, demo_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str]]:
    config = (
        f'[[models]]\nname = "demo"\nsource = "{demo_model}"\n\n'
        f'[cloud]\nmodel = "openai/demo"\napi_key_env = "{KEY_ENV}"\n'
        f'api_base = "{provider.base_url}/v1"\n'
    )
    with running_fleet(
        tmp_path_factory, config, agents=0, ready=(), coordinator_env={KEY_ENV: provider.secret}
    ) as fleet:
        yield fleet.base, fleet.key
        assert provider.secret not in fleet.coordinator.output()  # the provider key is never logged


def direct(provider: Engine) -> str:
    r = httpx.post(
        provider.base_url + "/v1/chat/completions",
        json=BODY,
        headers={"Authorization": f"Bearer {provider.secret}"},
        timeout=60,
    )
    return str(r.json()["choices"][0]["message"]["content"])


def test_with_no_engine_left_a_request_is_served_by_the_cloud(
    gateway: tuple[str, str], provider: Engine
) -> None:
    base, key = gateway
    before = provider.stats()["requests_total"]
    r = httpx.post(
        f"{base}/v1/chat/completions",
        json=BODY,
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert r.headers["X-Mlxfleet-Route"] == "cloud"
    assert r.json()["choices"][0]["message"]["content"] == direct(provider)
    assert r.json()["usage"]["completion_tokens"] == 24
    assert provider.stats()["requests_total"] == before + 2  # ours, then the direct one


def test_a_cloud_stream_is_relayed_as_server_sent_events(
    gateway: tuple[str, str], provider: Engine
) -> None:
    base, key = gateway
    with httpx.stream(
        "POST",
        f"{base}/v1/chat/completions",
        json=BODY | {"stream": True},
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
    ) as stream:
        assert stream.status_code == 200 and stream.headers["X-Mlxfleet-Route"] == "cloud"
        events = [line[6:] for line in stream.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert not [c for c in chunks if "error" in c]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == direct(provider)


def test_tools_response_format_and_max_completion_tokens_reach_the_cloud(
    gateway: tuple[str, str],
) -> None:
    """LiteLLM passes them to the provider (here one of our engines, which honours them): a
    forced call comes back as tool_calls, a schema's JSON validates, the token cap holds."""
    base, key = gateway
    headers = {"Authorization": f"Bearer {key}"}
    messages = BODY["messages"]
    tool = {
        "type": "function",
        "function": {
            "name": "lookup",
            "parameters": {
                "type": "object",
                "properties": {"days": {"type": "integer", "minimum": 1, "maximum": 9}},
                "required": ["days"],
                "additionalProperties": False,
            },
        },
    }
    forced = {"type": "function", "function": {"name": "lookup"}}
    body = {"model": "demo", "messages": messages, "tools": [tool], "tool_choice": forced}
    r = httpx.post(f"{base}/v1/chat/completions", json=body, headers=headers, timeout=60)
    assert r.status_code == 200 and r.headers["X-Mlxfleet-Route"] == "cloud", r.text
    [call] = r.json()["choices"][0]["message"]["tool_calls"]
    assert call["function"]["name"] == "lookup"
    assert 1 <= json.loads(call["function"]["arguments"])["days"] <= 9
    body = {"model": "demo", "messages": messages, "response_format": CARD_FORMAT}
    r = httpx.post(f"{base}/v1/chat/completions", json=body, headers=headers, timeout=60)
    jsonschema.validate(json.loads(r.json()["choices"][0]["message"]["content"]), CARD_SCHEMA)
    body = {"model": "demo", "messages": messages, "max_completion_tokens": 3, "temperature": 0}
    r = httpx.post(f"{base}/v1/chat/completions", json=body, headers=headers, timeout=60)
    assert r.json()["usage"]["completion_tokens"] == 3


def test_the_cloud_serves_the_anthropic_and_responses_dialects(
    gateway: tuple[str, str], provider: Engine
) -> None:
    """The adapters map the provider's chat answer (LiteLLM's objects) as they map an
    engine's: a Messages body and stream, a Responses stream, each the provider's text."""
    base, key = gateway
    expected = direct(provider)
    claude = anthropic.Anthropic(base_url=base, api_key=key, max_retries=0)
    request: dict[str, Any] = {
        "model": "demo",
        "max_tokens": 24,
        "messages": BODY["messages"],
        "extra_body": {"temperature": 0},
    }
    message = claude.messages.create(**request)
    assert [(b.type, b.text) for b in message.content] == [("text", expected)]  # type: ignore[union-attr]
    assert (message.stop_reason, message.usage.output_tokens) == ("max_tokens", 24)
    with claude.messages.stream(**request) as stream:
        assert "".join(stream.text_stream) == expected
        assert stream.get_final_message().stop_reason == "max_tokens"
    client = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0)
    with client.responses.stream(
        model="demo", input=BODY["messages"], max_output_tokens=24, temperature=0
    ) as responses:
        events = list(responses)
    assert events[-1].type == "response.incomplete"  # it ran to max_output_tokens
    assert events[-1].response.output_text == expected  # type: ignore[union-attr]
    # A token count needs our tokenizer: the cloud cannot answer it, and says so in Anthropic's
    # words (529 overloaded, as for any request no engine can serve).
    with pytest.raises(anthropic.APIStatusError) as info:
        claude.messages.count_tokens(model="demo", messages=BODY["messages"])
    assert info.value.status_code == 529
    assert info.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]

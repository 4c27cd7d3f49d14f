"""The whole path, real processes on 127.0.0.1: coordinator, agent, engine with the demo model.

Clients are the official `openai` client and httpx, through the gateway only.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.agent_model import CARD_FORMAT, CARD_SCHEMA
from tests.conftest import Proc, wait_for
from tests.e2e.fleet import READY_TIMEOUT_S, Fleet, model_toml, running_fleet

MODEL = "demo"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> Iterator[Fleet]:
    config = model_toml(demo_model, MODEL, context_length=2048)
    with running_fleet(tmp_path_factory, config) as f:
        yield f


def test_chat_non_stream_has_usage(fleet: Fleet) -> None:
    reply = fleet.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=8, temperature=0
    )
    assert reply.model == MODEL
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage is not None
    assert reply.usage.prompt_tokens > 0
    assert 1 <= reply.usage.completion_tokens <= 8
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_chat_stream_matches_non_stream_and_reports_usage(fleet: Fleet) -> None:
    client = fleet.client()
    messages = [{"role": "user", "content": "Tell me about Macs"}]
    whole = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=16, temperature=0
    )
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    usage = chunks[-1].usage
    assert usage is not None and chunks[-1].choices == []
    assert usage.completion_tokens == whole.usage.completion_tokens
    assert usage.prompt_tokens == whole.usage.prompt_tokens


def test_completions_stream_and_not(fleet: Fleet) -> None:
    client = fleet.client()
    whole = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=6, temperature=0)
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=MODEL, prompt="Once upon", max_tokens=6, temperature=0, stream=True
        )
        if c.choices
    )
    assert streamed == whole.choices[0].text
    assert whole.usage.completion_tokens == 6 or whole.choices[0].finish_reason == "stop"


def test_models_lists_the_ready_model(fleet: Fleet) -> None:
    listed = fleet.client().models.list()
    assert [m.id for m in listed.data] == [MODEL]
    one = fleet.client().models.retrieve(MODEL)
    assert (one.id, one.object) == (MODEL, "model")
    assert (one.model_extra or {})["mlxfleet"]["tiers"] == {"interactive": "ready"}
    with pytest.raises(openai.NotFoundError) as info:
        fleet.client().models.retrieve("no-such-model")
    assert info.value.body["code"] == "model_not_found"  # type: ignore[index]


def test_sampling_controls_and_logprobs_pass_through_the_gateway(fleet: Fleet) -> None:
    """logit_bias -100 on the greedy first token changes it; top_logprobs 3 gives three
    alternatives per token, streamed and not (the official client parses both)."""
    client = fleet.client()

    def ask(**extra: object):  # type: ignore[no-untyped-def]
        messages = [{"role": "user", "content": "Tell me about Macs"}]
        return client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=8, temperature=0, **extra
        )

    greedy = ask(logprobs=True, top_logprobs=3)
    entries = greedy.choices[0].logprobs.content
    assert len(entries) == 8 and all(len(e.top_logprobs) == 3 for e in entries)
    first = (greedy.model_extra or {})["mlxfleet"]["token_ids"][0]  # the engine's ids
    biased = ask(logit_bias={str(first): -100})
    assert (biased.model_extra or {})["mlxfleet"]["token_ids"][0] != first
    chunks = list(ask(logprobs=True, top_logprobs=3, stream=True))
    streamed = [e for c in chunks for ch in c.choices if ch.logprobs for e in ch.logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in entries]


def _post(
    fleet: Fleet, path: str, body: bytes | dict, key: str | None = "default", timeout_s: float = 30
):
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {fleet.key if key == 'default' else key}"
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{fleet.base}{path}", content=content, headers=headers, timeout=timeout_s)


def _chat(**extra: object) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **extra}


BAD_REQUESTS = [
    # (id, path, body, key, status, code, param)
    ("no key", "/v1/chat/completions", _chat(), None, 401, "invalid_api_key", None),
    ("wrong key", "/v1/chat/completions", _chat(), "mlxf-wrong", 401, "invalid_api_key", None),
    (
        "unknown model",
        "/v1/chat/completions",
        {**_chat(), "model": "nope"},
        "default",
        404,
        "model_not_found",
        "model",
    ),
    ("malformed json", "/v1/chat/completions", b'{"model": ', "default", 400, None, None),
    ("body not an object", "/v1/chat/completions", b"[1, 2]", "default", 400, None, None),
    (
        "messages not a list",
        "/v1/chat/completions",
        {**_chat(), "messages": "hi"},
        "default",
        400,
        None,
        "messages",
    ),
    (
        "messages empty",
        "/v1/chat/completions",
        {**_chat(), "messages": []},
        "default",
        400,
        None,
        "messages",
    ),
    (
        "unknown role",
        "/v1/chat/completions",
        {**_chat(), "messages": [{"role": "wizard", "content": "x"}]},
        "default",
        400,
        None,
        "messages[0].role",
    ),
    (
        "negative max_tokens",
        "/v1/chat/completions",
        _chat(max_tokens=-1),
        "default",
        400,
        None,
        "max_tokens",
    ),
    (
        "fractional max_tokens",
        "/v1/chat/completions",
        _chat(max_tokens=1.5),
        "default",
        400,
        None,
        "max_tokens",
    ),
    (
        "temperature above 2",
        "/v1/chat/completions",
        _chat(temperature=3),
        "default",
        400,
        None,
        "temperature",
    ),
    ("n above 1", "/v1/chat/completions", _chat(n=2), "default", 400, None, "n"),
    (
        "max_tokens fills the context",
        "/v1/chat/completions",
        _chat(max_tokens=4096),
        "default",
        400,
        "context_length_exceeded",
        "max_tokens",
    ),
    (
        "prompt longer than the context",
        "/v1/chat/completions",
        {**_chat(), "messages": [{"role": "user", "content": "word " * 5000}]},
        "default",
        400,
        "context_length_exceeded",
        "messages",
    ),
    (
        "completion prompt missing",
        "/v1/completions",
        {"model": MODEL},
        "default",
        400,
        None,
        "prompt",
    ),
]


@pytest.mark.parametrize(
    ("path", "body", "key", "status", "code", "param"),
    [case[1:] for case in BAD_REQUESTS],
    ids=[case[0] for case in BAD_REQUESTS],
)
def test_bad_requests_get_openai_errors(
    fleet: Fleet,
    path: str,
    body: bytes | dict,
    key: str | None,
    status: int,
    code: str | None,
    param: str | None,
) -> None:
    r = _post(fleet, path, body, key)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if code is not None:
        assert error["code"] == code
    if param is not None:
        assert error["param"] == param


def test_oversized_body_is_413_and_the_gateway_keeps_serving(fleet: Fleet) -> None:
    big = json.dumps(_chat(padding="x" * (5 * 1024 * 1024))).encode()
    r = _post(fleet, "/v1/chat/completions", big)
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "request_too_large"
    ok = _post(fleet, "/v1/chat/completions", _chat(max_tokens=2))
    assert ok.status_code == 200
    assert ok.json()["usage"]["completion_tokens"] >= 1


def test_a_request_while_the_only_engine_restarts_waits_for_it(fleet: Fleet) -> None:
    """Kill -9 the only engine: /v1/models drops the model, and a request that comes before
    the coordinator has it loaded again waits for the new engine instead of a 503."""
    [engine_pid] = wait_for(fleet.engine_pids, 10, "the engine process")
    os.kill(engine_pid, signal.SIGKILL)
    wait_for(lambda: MODEL not in fleet.models(), 10, "the model to leave /v1/models")
    started = time.monotonic()
    r = _post(fleet, "/v1/chat/completions", _chat(max_tokens=2), timeout_s=120)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1
    print(f"served after {time.monotonic() - started:.1f} s of waiting for the restart")
    new_pids = fleet.engine_pids()
    assert new_pids and engine_pid not in new_pids
    waits = metric_samples(fleet, "mlxfleet_engine_wait_seconds_count")
    served = frozenset({"model": MODEL, "tier": "interactive", "outcome": "served"}.items())
    assert waits.get(served, 0) >= 1


def test_engine_exits_when_its_agent_is_killed(tmp_path: Path, demo_model: Path) -> None:
    """An agent killed with SIGKILL must not leave an engine holding memory: the engine
    notices its parent is gone and exits. Starts a real agent-like parent process."""
    parent = Proc(
        [
            sys.executable,
            "-c",
            "import os, subprocess, sys, time\n"
            "env = {**os.environ, 'MLXFLEET_ENGINE_SECRET': 'orphan-test-secret', "
            "'MLXFLEET_PARENT_PID': str(os.getpid())}\n"
            f"p = subprocess.Popen([sys.executable, '-m', 'node_agent.engine', '--model-path', "
            f"'{demo_model}', '--model-name', 'demo'], env=env, start_new_session=True)\n"
            "print(p.pid, flush=True)\n"
            "time.sleep(600)\n",
        ],
        tmp_path / "parent.log",
    )
    try:
        engine_pid = int(
            wait_for(lambda: parent.output().split("\n", 1)[0].strip(), 30, "the engine pid")
        )
        os.kill(parent.popen.pid, signal.SIGKILL)
        parent.popen.wait()
        wait_for(
            lambda: (
                not Path(f"/proc/{engine_pid}").exists()
                or "zombie" in Path(f"/proc/{engine_pid}/status").read_text().lower()
                or " Z " in Path(f"/proc/{engine_pid}/stat").read_text()
            ),
            30,
            "the orphaned engine to exit",
        )
    finally:
        parent.stop()


def test_a_stream_whose_only_engine_is_killed_parks_and_continues_on_its_restart(
    fleet: Fleet,
) -> None:
    """Kills the real engine process mid-stream, with no other replica: the stream waits for
    the engine the coordinator starts again and ends exactly as an uninterrupted run does."""
    wait_for(lambda: MODEL in fleet.models(), READY_TIMEOUT_S, "the model to be routable")
    body = _chat(max_tokens=300, temperature=0, stream=True, ignore_eos=True)
    reference = stream_text(fleet, body)
    [engine_pid] = wait_for(fleet.engine_pids, 10, "the engine process")
    events = stream_events(fleet, body, kill_after=3, pid=engine_pid)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert not any("error" in c for c in chunks)
    assert "".join(delta_text(c) for c in chunks) == reference
    assert engine_pid not in fleet.engine_pids()


def stream_events(fleet: Fleet, body: dict, kill_after: int = 0, pid: int = 0) -> list[str]:
    """The data lines of one stream; with `kill_after`, kill -9 `pid` after that many."""
    events: list[str] = []
    with httpx.stream(
        "POST",
        f"{fleet.base}/v1/chat/completions",
        json=body,
        timeout=120,
        headers={"Authorization": f"Bearer {fleet.key}"},
    ) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            events.append(line.removeprefix("data: "))
            if kill_after and len(events) == kill_after:
                os.kill(pid, signal.SIGKILL)
    return events


def delta_text(chunk: dict) -> str:
    return "".join((c.get("delta") or {}).get("content") or "" for c in chunk.get("choices") or ())


def stream_text(fleet: Fleet, body: dict) -> str:
    events = stream_events(fleet, body)
    return "".join(delta_text(json.loads(e)) for e in events[:-1])


def metric_samples(fleet: Fleet, name: str) -> dict[frozenset[tuple[str, str]], float]:
    """The gateway's samples of one metric, by their labels."""
    text = httpx.get(f"{fleet.base}/metrics", timeout=10).text
    return {
        frozenset(s.labels.items()): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    }


def test_a_request_to_a_node_that_goes_silent_waits_for_it_to_come_back(fleet: Fleet) -> None:
    """Freezes the real agent and engine (SIGSTOP): heartbeats stop, the engine cannot answer.
    When the node turns suspect its engine leaves the router and the request in flight is
    aborted; with no other engine, and the node not yet dead, it waits. SIGCONT after 5 s:
    heartbeats resume, the same engine is routed again and answers it (nothing reloaded)."""
    wait_for(lambda: MODEL in fleet.models(), READY_TIMEOUT_S, "the model to be routable")
    [engine_pid] = wait_for(fleet.engine_pids, 10, "the engine process")
    frozen = [fleet.agent.popen.pid, engine_pid]
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    thaw = threading.Timer(5.0, lambda: [os.kill(pid, signal.SIGCONT) for pid in frozen])
    thaw.start()
    try:
        started = time.monotonic()
        r = _post(fleet, "/v1/chat/completions", _chat(max_tokens=2, stream=True), timeout_s=60)
        waited = time.monotonic() - started
    finally:
        thaw.join()
    assert r.status_code == 200, r.text
    assert "data: [DONE]" in r.text and '"error"' not in r.text
    assert waited >= 4.0  # it was held until the node came back
    assert fleet.engine_pids() == [engine_pid]


async def test_json_schema_validates_in_100_of_100_requests_at_temperature_1(fleet: Fleet) -> None:
    client = openai.AsyncOpenAI(base_url=fleet.base + "/v1", api_key=fleet.key, max_retries=0)

    in_flight = asyncio.Semaphore(8)  # twice the tier's max_concurrency, well inside its queue

    async def one(i: int) -> str:
        async with in_flight:
            r = await client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": f"Card {i}"}],
                temperature=1.0,
                max_tokens=120,
                response_format=CARD_FORMAT,  # type: ignore[arg-type]
            )
        assert r.choices[0].finish_reason == "stop"
        return r.choices[0].message.content or ""

    answers = await asyncio.gather(*(one(i) for i in range(100)))
    await client.close()
    for answer in answers:
        jsonschema.validate(json.loads(answer), CARD_SCHEMA)
    assert len(set(answers)) > 10


LOOKUP = {
    "type": "function",
    "function": {
        "name": "lookup",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 16},
                "days": {"type": "integer", "minimum": 1, "maximum": 14},
            },
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}


@pytest.mark.parametrize("stream", [False, True])
def test_a_named_tool_choice_on_the_demo_model_returns_a_valid_call(
    fleet: Fleet, stream: bool
) -> None:
    """The random demo model, forced by the grammar: a call of that function whose arguments
    validate against its schema (the official client assembles the streamed one)."""
    other = {"type": "function", "function": {"name": "other", "parameters": {"type": "object"}}}
    reply = fleet.client().chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Weather?"}],
        tools=[other, LOOKUP],
        tool_choice={"type": "function", "function": {"name": "lookup"}},
        max_tokens=64,
        stream=stream,
    )
    if stream:
        pieces = [p for chunk in reply for ch in chunk.choices for p in ch.delta.tool_calls or []]
        name, arguments = (
            pieces[0].function.name,
            "".join(p.function.arguments or "" for p in pieces),
        )
    else:
        assert reply.choices[0].finish_reason == "tool_calls"
        [call] = reply.choices[0].message.tool_calls
        name, arguments = call.function.name, call.function.arguments
    assert name == "lookup"
    jsonschema.validate(json.loads(arguments), LOOKUP["function"]["parameters"])

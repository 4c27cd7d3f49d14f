"""No lost requests: a real coordinator, two real agents with one engine each, streaming load,
and `kill -9` of an engine or of an agent in the middle of it.

Every client stream must end as an uninterrupted one does: `data: [DONE]`, no error event, all
its tokens, and (temperature 0) the same text as a reference run of the same request. Streams
cut by the kill are continued on the other engine by the gateway (coordinator/gateway/relay.py).
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import httpx
import jsonschema
import openai
import pytest

from tests.conftest import Proc, engines_of, wait_for
from tests.e2e.fleet import READY_TIMEOUT_S, Fleet, model_toml, running_fleet
from tests.stream_load import (
    Stream,
    StreamLoad,
    assert_all_completed,
    reference_texts,
    serving,
    stream_completion,
)

PROMPTS = ["failover one", "failover two", "failover three", "failover four"]
MAX_TOKENS = 400  # about a second of decoding per stream at 4 streams: always some in flight
LOAD_FLOWING = 4  # completed streams before the fault
AFTER_FAULT = 4  # streams started after the fault that must complete before the load stops
FAULT_TIMEOUT_S = 60.0
ENGINE_EXIT_S = 10.0  # an orphaned engine polls its parent every ~0.5 s, then drains
BROKE = "broke a stream: continuing elsewhere"  # coordinator/gateway/forward.py, per continuation
AGENT_ARGS = ("--role", "server")


def engine_pids(agent: Proc) -> list[int]:
    return engines_of(agent.popen.pid)


def placed(fleet: Fleet) -> list[str]:
    """Nodes with a ready demo engine, from the admin API `mlxfleet models` reads (cheap
    enough to poll; a CLI process per poll would take the cores the engines need)."""
    admin = (fleet.home / "admin_token").read_text().strip()
    r = httpx.get(
        f"{fleet.base}/admin/v1/models", headers={"Authorization": f"Bearer {admin}"}, timeout=10
    )
    [row] = r.json()["models"]
    return sorted(e.split(":")[0] for e in row["engines"] if e.endswith(": ready"))


def both_ready(fleet: Fleet) -> bool:
    return placed(fleet) == sorted(fleet.node_id(a) for a in fleet.agents)


def continuations(fleet: Fleet) -> int:
    return fleet.coordinator.output().count(BROKE)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> Iterator[Fleet]:
    config = model_toml(demo_model, tiers=["interactive"], replicas=2, pinned=True)
    with running_fleet(tmp_path_factory, config, agents=2, agent_args=AGENT_ARGS, ready=()) as f:
        wait_for(lambda: both_ready(f), READY_TIMEOUT_S, "a ready demo engine on each agent")
        yield f


@pytest.fixture(scope="module")
def reference(fleet: Fleet) -> dict[str, str]:
    """Each prompt's text from an uninterrupted stream, with no fault anywhere."""
    texts = reference_texts(fleet.base, fleet.key, PROMPTS, MAX_TOKENS)
    assert len(set(texts.values())) == len(PROMPTS)  # distinct texts: a mix-up would show
    return texts


@dataclass
class Fault:
    streams: list[Stream]
    t_kill: float
    agent: Proc | None  # the agent killed, None when only an engine was
    engines: list[int]  # the engine pids killed or orphaned


def run_with_fault(fleet: Fleet, fault: str) -> Fault:
    """Stream PROMPTS in loops, `kill -9` the engine generating most ("engine") or its agent
    ("agent") once the load flows, and stop once streams started after the kill completed."""
    wait_for(lambda: both_ready(fleet), READY_TIMEOUT_S, "two ready engines before the fault")
    before = continuations(fleet)
    with StreamLoad(fleet.base, fleet.key, PROMPTS, MAX_TOKENS) as load:
        wait_for(lambda: len(load.done()) >= LOAD_FLOWING, FAULT_TIMEOUT_S, "load to flow")
        wait_for(load.all_decoding, FAULT_TIMEOUT_S, "every stream to be mid-decode")
        owner = {p: a for a in fleet.agents for p in engine_pids(a)}
        victim = serving(dict.fromkeys(owner, "127.0.0.1"))
        killed = owner[victim] if fault == "agent" else None
        engines = engine_pids(killed) if killed else [victim]
        t_kill = time.monotonic()
        os.kill(killed.popen.pid if killed else victim, signal.SIGKILL)
        wait_for(
            lambda: len(load.ok_started_after(t_kill)) >= AFTER_FAULT or load.failures(),
            FAULT_TIMEOUT_S,
            "streams started after the kill to complete",
        )
    assert continuations(fleet) > before, "no stream was in flight on the killed engine"
    return Fault(load.done(), t_kill, killed, engines)


def check_streams(streams: list[Stream], reference: dict[str, str], t_kill: float) -> None:
    stalls = [g for s in streams if (g := s.stall_after(t_kill)) is not None]
    print(
        f"{len(streams)} streams, {len(stalls)} streaming at the kill; "
        f"stalls {', '.join(f'{g * 1000:.0f} ms' for g in sorted(stalls))}"
    )
    assert_all_completed(streams, reference, MAX_TOKENS)
    assert any(s.spans(t_kill) for s in streams)


def _exited(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")  # an orphan's zombie waits for init to reap it


def test_kill_9_of_a_serving_engine_loses_no_request(
    fleet: Fleet, reference: dict[str, str]
) -> None:
    """Needs processes: SIGKILL of a real engine subprocess while it streams to clients."""
    fault = run_with_fault(fleet, "engine")
    check_streams(fault.streams, reference, fault.t_kill)
    wait_for(lambda: both_ready(fleet), READY_TIMEOUT_S, "the lost replica to be placed again")


def test_kill_9_of_an_agent_loses_no_request(fleet: Fleet, reference: dict[str, str]) -> None:
    """Needs processes: SIGKILL of a real agent; its engines exit on their own and the
    coordinator drops the node when its gRPC stream breaks."""
    fault = run_with_fault(fleet, "agent")
    killed = fault.agent
    assert killed is not None
    check_streams(fault.streams, reference, fault.t_kill)
    wait_for(
        lambda: all(_exited(p) for p in fault.engines),
        ENGINE_EXIT_S,
        "the killed agent's engines to exit",
    )
    # The same home: the agent comes back with its identity and gets its replica again.
    killed.stop()
    fleet.agents.remove(killed)
    fleet.start_agent(*AGENT_ARGS, home=fleet.agent_home(killed))
    wait_for(lambda: both_ready(fleet), READY_TIMEOUT_S, "the lost replica to be placed again")


def test_a_client_leaving_mid_stream_leaves_the_engines_routed(fleet: Fleet) -> None:
    """Needs processes: the client's socket closes under the real gateway mid-relay."""
    wait_for(lambda: both_ready(fleet), READY_TIMEOUT_S, "two ready engines")
    before = _gateway_marks(fleet)
    for prompt in PROMPTS:
        # Greedy, as the references are: each prompt runs all MAX_TOKENS (sampled, the random
        # demo model may pick its end-of-text token within the first events).
        body = {
            "model": "demo",
            "prompt": prompt,
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
            "stream": True,
        }
        headers = {"Authorization": f"Bearer {fleet.key}"}
        with httpx.stream(
            "POST", f"{fleet.base}/v1/completions", json=body, headers=headers, timeout=30
        ) as r:
            assert r.status_code == 200, r.read()
            lines = (line for line in r.iter_lines() if line.startswith("data: {"))
            assert [next(lines) for _ in range(3)]  # some events, then the client hangs up
    # Both engines keep serving; a stream that ran on each still completes.
    with httpx.Client(timeout=60) as http:
        for prompt in PROMPTS:
            s = stream_completion(http, fleet.base, fleet.key, prompt, 8)
            assert s.ok and s.completion_tokens == 8, s.error
    assert _gateway_marks(fleet) == before
    assert both_ready(fleet)


def _gateway_marks(fleet: Fleet) -> tuple[int, int, int]:
    """Continuations, engines unrouted and tracebacks so far, from the coordinator's log."""
    log = fleet.coordinator.output()
    return log.count(BROKE), log.count("left the router"), log.count("Traceback")


WORDS = {
    "type": "object",
    "properties": {
        "words": {
            "type": "array",
            "items": {"type": "string", "maxLength": 10},
            "minItems": 40,
            "maxItems": 40,
        }
    },
    "required": ["words"],
    "additionalProperties": False,
}


def test_kill_9_mid_json_answer_continues_under_the_same_grammar(fleet: Fleet) -> None:
    """Needs processes: a json_schema stream whose engine is SIGKILLed midway is continued on the
    other engine, which resumes the grammar from the tokens already sent: the client's text is
    the uninterrupted answer, valid against the schema."""
    wait_for(lambda: both_ready(fleet), READY_TIMEOUT_S, "two ready engines")
    body = {
        "model": "demo",
        "messages": [{"role": "user", "content": "forty words"}],
        "max_tokens": 400,
        "temperature": 0,
        "response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": WORDS}},
    }
    headers = {"Authorization": f"Bearer {fleet.key}"}
    whole = httpx.post(f"{fleet.base}/v1/chat/completions", json=body, headers=headers, timeout=60)
    reference = whole.json()["choices"][0]["message"]["content"]
    assert len(json.loads(reference)["words"]) == 40
    before = continuations(fleet)
    texts: list[str] = []
    with httpx.stream(
        "POST",
        f"{fleet.base}/v1/chat/completions",
        json=body | {"stream": True},
        headers=headers,
        timeout=60,
    ) as r:
        events = (json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {"))
        killed = False
        for event in events:
            assert "error" not in event, event
            texts += [c["delta"].get("content") or "" for c in event["choices"]]
            if not killed and sum(bool(t) for t in texts) >= 5:  # under way: kill its engine
                owner = {p: a for a in fleet.agents for p in engine_pids(a)}
                os.kill(serving(dict.fromkeys(owner, "127.0.0.1")), signal.SIGKILL)
                killed = True
    assert continuations(fleet) > before, "the stream was not continued"
    assert "".join(texts) == reference
    jsonschema.validate(json.loads(reference), WORDS)
    wait_for(lambda: both_ready(fleet), READY_TIMEOUT_S, "the lost replica to be placed again")


def kill_the_serving_engine(fleet: Fleet) -> None:
    owner = {p: a for a in fleet.agents for p in engine_pids(a)}
    os.kill(serving(dict.fromkeys(owner, "127.0.0.1")), signal.SIGKILL)


KILL_AFTER = 5  # text events the client has before its engine is killed


def test_kill_9_mid_anthropic_stream_is_one_well_formed_message(fleet: Fleet) -> None:
    """Needs processes: a Messages stream (the official anthropic SDK) whose engine is
    SIGKILLed midway is continued on the other engine; the SDK assembles one message equal to
    the uninterrupted answer."""
    wait_for(lambda: both_ready(fleet), READY_TIMEOUT_S, "two ready engines")
    claude = anthropic.Anthropic(base_url=fleet.base, api_key=fleet.key, max_retries=0)
    request: dict[str, Any] = {
        "model": "demo",
        "max_tokens": MAX_TOKENS,
        "messages": [{"role": "user", "content": "failover in Anthropic's dialect"}],
        "extra_body": {"temperature": 0},
    }
    whole = claude.messages.create(**request)
    [reference] = whole.content
    before = continuations(fleet)
    kinds: list[str] = []
    texts: list[str] = []
    with claude.messages.stream(**request) as stream:
        for event in stream:
            kinds.append(event.type)
            if event.type == "text":
                texts.append(event.text)
                if len(texts) == KILL_AFTER:
                    kill_the_serving_engine(fleet)
        final = stream.get_final_message()
    assert continuations(fleet) > before, "the stream was not continued"
    assert "".join(texts) == reference.text == final.content[0].text  # type: ignore[union-attr]
    assert (final.stop_reason, final.usage.output_tokens) == (
        whole.stop_reason,
        whole.usage.output_tokens,
    )
    assert (kinds[0], kinds.count("message_start"), kinds[-1]) == (
        "message_start",
        1,
        "message_stop",
    )
    assert kinds.count("content_block_start") == kinds.count("content_block_stop") == 1
    wait_for(lambda: both_ready(fleet), READY_TIMEOUT_S, "the lost replica to be placed again")


def test_kill_9_mid_responses_stream_is_one_well_formed_response(fleet: Fleet) -> None:
    """Needs processes: the same for a Responses stream (the official openai SDK): one
    response, every event numbered in order, its text the uninterrupted answer's."""
    wait_for(lambda: both_ready(fleet), READY_TIMEOUT_S, "two ready engines")
    client = openai.OpenAI(base_url=fleet.base + "/v1", api_key=fleet.key, max_retries=0)
    request: dict[str, Any] = {
        "model": "demo",
        "max_output_tokens": MAX_TOKENS,
        "input": "failover in the Responses dialect",
        "temperature": 0,
    }
    whole = client.responses.create(**request)
    before = continuations(fleet)
    events = []
    texts: list[str] = []
    with client.responses.stream(**request) as stream:
        for event in stream:
            events.append(event)
            if event.type == "response.output_text.delta":
                texts.append(event.delta)
                if len(texts) == KILL_AFTER:
                    kill_the_serving_engine(fleet)
    # The last event carries the whole response: response.completed, or response.incomplete
    # when it ran to max_output_tokens (the SDK's get_final_response knows only the former).
    final = events[-1].response
    assert continuations(fleet) > before, "the stream was not continued"
    assert "".join(texts) == whole.output_text == final.output_text
    assert final.usage is not None and whole.usage is not None
    assert (final.status, final.usage.output_tokens) == (whole.status, whole.usage.output_tokens)
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert (
        kinds[-1] == f"response.{whole.status}" and kinds.count("response.output_item.added") == 1
    )
    assert [e.sequence_number for e in events] == list(range(len(events)))
    wait_for(lambda: both_ready(fleet), READY_TIMEOUT_S, "the lost replica to be placed again")

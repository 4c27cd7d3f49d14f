"""Cache-aware routing on a real fleet: a coordinator and two agents on 127.0.0.1, one replica
of the demo model on each, and conversations through the gateway with the official client.

Needs processes: which replica holds a conversation's prefix is only visible in what the real
engines report (usage.prompt_tokens_details.cached_tokens and each agent's /metrics)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import wait_for
from tests.e2e.fleet import READY_TIMEOUT_S, Fleet, model_toml, running_fleet

pytestmark = pytest.mark.e2e

MODEL = "demo"
CONVERSATIONS = 8
TURNS = 6
MAX_TOKENS = 12
IN_FLIGHT = 2  # requests at a time (an engine's interactive tier decodes 4 together)
METRICS_LINE_RE = re.compile(r"metrics on http://[\d.]+:(\d+)/metrics")
# What every conversation shares (a team's agent instructions), then what makes it its own.
SYSTEM = "You are the team's coding agent. " + " ".join(f"Rule {i}: be brief." for i in range(40))


def engine_samples(port: int) -> dict[str, float]:
    """The interactive demo engine's samples on one agent's /metrics, by name."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    unit = {"model": MODEL, "tier": "interactive"}
    samples = {
        s.name: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if {k: v for k, v in s.labels.items() if k != "state"} == unit
        and s.labels.get("state", "ready") == "ready"
    }
    return samples


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> Iterator[Fleet]:
    config = model_toml(demo_model, tiers=["interactive"], replicas=2, pinned=True)
    with running_fleet(
        tmp_path_factory, config, agents=2, agent_args=("--role", "server"), ready=()
    ) as f:
        yield f


def metrics_ports(fleet: Fleet) -> list[int]:
    return [
        int(wait_for(lambda a=a: METRICS_LINE_RE.search(a.output()), 30, "metrics").group(1))
        for a in fleet.agents
    ]


def next_turn(fleet: Fleet, messages: list[dict[str, str]]) -> tuple[int, int]:
    """Ask the conversation's next question; (prompt tokens, cached tokens) of that turn."""
    n = len(messages) // 2
    code = " ".join(f"v{n}_{i} = g(v{n}_{i - 1})" for i in range(12))  # what an agent adds
    topic = messages[0]["content"][-10:]
    messages.append({"role": "user", "content": f"Question {n} on {topic} {code}"})
    reply = fleet.client().chat.completions.create(
        model=MODEL, messages=messages, max_tokens=MAX_TOKENS, temperature=0
    )
    assert reply.usage is not None
    messages.append({"role": "assistant", "content": reply.choices[0].message.content or ""})
    details = reply.usage.prompt_tokens_details  # absent when nothing was cached
    return reply.usage.prompt_tokens, details.cached_tokens if details else 0


def test_follow_up_turns_find_their_prefix_on_the_replica_that_served_them(fleet: Fleet) -> None:
    ports = metrics_ports(fleet)
    wait_for(
        lambda: all(engine_samples(p).get("mlxfleet_engine_state") == 1 for p in ports),
        READY_TIMEOUT_S,
        "a ready demo engine on each agent",
    )
    talks = [
        [{"role": "system", "content": f"{SYSTEM} Project {topic}: parser."}]
        for topic in range(CONVERSATIONS)
    ]
    conversations: list[list[tuple[int, int]]] = [[] for _ in talks]
    # Turn by turn, two requests in flight: the replicas are never full, so without affinity
    # the Router's shuffle would send about half the follow-ups to the other replica.
    with ThreadPoolExecutor(IN_FLIGHT) as pool:
        for _ in range(TURNS):
            turns = pool.map(lambda m: next_turn(fleet, m), talks)
            for usage, turn in zip(conversations, turns, strict=True):
                usage.append(turn)
    follow_ups = [
        (previous[0], now[1])
        for usage in conversations
        for previous, now in zip(usage, usage[1:], strict=False)
    ]
    hits = [cached >= 0.9 * previous for previous, cached in follow_ups]
    rate = sum(hits) / len(hits)
    missed = [f for f, hit in zip(follow_ups, hits, strict=True) if not hit]
    print("missed (previous prompt, cached):", missed)
    print(f"{sum(hits)} of {len(hits)} follow-up turns found ≥ 90 % of the turn before cached")
    assert len(follow_ups) == CONVERSATIONS * (TURNS - 1)
    assert rate >= 0.9
    # Both replicas served conversations: affinity kept them, it did not pile them on one.
    served = [engine_samples(p)["mlxfleet_engine_prefix_cache_hits_total"] for p in ports]
    assert all(hits >= TURNS - 1 for hits in served), served
    assert sum(served) >= sum(hits)

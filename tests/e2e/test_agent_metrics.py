"""A real agent's GET /metrics while the demo model is ready: coordinator, agent and engine are
real processes on 127.0.0.1 (the agent on --metrics-port 0); Prometheus's view via httpx."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import wait_for
from tests.e2e.fleet import running_fleet

pytestmark = pytest.mark.e2e

MODEL = "demo"
MAX_BATCH_SIZE = 3  # the interactive tier's knob in this fleet (the default is 4)
METRICS_LINE_RE = re.compile(r"metrics on http://[\d.]+:(\d+)/metrics")


def mem_total_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no MemTotal in /proc/meminfo")


def test_a_real_agent_serves_its_node_and_engine(
    tmp_path_factory: pytest.TempPathFactory, demo_model: Path
) -> None:
    config = (
        f'[[models]]\nname = "{MODEL}"\nsource = "{demo_model}"\ncontext_length = 2048\n'
        f"[tiers.interactive]\nmax_batch_size = {MAX_BATCH_SIZE}\n"
    )
    with running_fleet(tmp_path_factory, config) as fleet:
        base = fleet.base
        found = wait_for(
            lambda: METRICS_LINE_RE.search(fleet.agent.output()), 30, "the agent's metrics log line"
        )
        port = int(found.group(1))

        # The real port went up in Hello: the coordinator's service discovery lists it.
        targets = httpx.get(f"{base}/prometheus/targets").json()
        assert [t["targets"] for t in targets] == [[f"127.0.0.1:{port}"]]

        reply = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
        assert reply.status_code == 200
        samples = {
            (s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(reply.text)
            for s in family.samples
        }
        unit = frozenset({("model", MODEL), ("tier", "interactive")})
        assert samples["mlxfleet_engine_state", unit | {("state", "ready")}] == 1
        assert samples["mlxfleet_engine_rss_bytes", unit] > 0
        assert samples["mlxfleet_engine_max_batch_size", unit] == MAX_BATCH_SIZE
        assert samples["mlxfleet_node_memory_total_bytes", frozenset()] == mem_total_bytes()
        assert samples["mlxfleet_agent_connected", frozenset()] == 1


def engine_samples(port: int) -> dict[str, float]:
    """The interactive demo engine's samples on the agent's /metrics, by name."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    unit = {"model": MODEL, "tier": "interactive"}
    return {
        s.name: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.labels == unit
    }


def test_memory_pressure_empties_the_prefix_caches_before_any_model_moves(
    tmp_path_factory: pytest.TempPathFactory, demo_model: Path
) -> None:
    """Needs processes: a real agent reads pressure `warning` (its readings file) and has its
    real engine drop the prefix cache that real requests filled; the model stays placed."""
    config = f'[[models]]\nname = "{MODEL}"\nsource = "{demo_model}"\npinned = true\n'
    with running_fleet(tmp_path_factory, config, agents=0, ready=()) as fleet:
        home = tmp_path_factory.mktemp("agent")
        readings = home / "readings.json"
        readings.write_text("{}")
        agent = fleet.start_agent(home=home, env={"MLXFLEET_READINGS_FILE": str(readings)})
        fleet.wait_ready([(MODEL, "interactive")])
        port = int(wait_for(lambda: METRICS_LINE_RE.search(agent.output()), 30, "metrics").group(1))
        system = "Team rules. " + " ".join(f"rule {i}: be kind." for i in range(60))
        for question in ("First question?", "Second question?"):
            reply = fleet.client().chat.completions.create(
                model=MODEL,
                messages=[
                    {"role": "system", "content": system},
                    {"role": "user", "content": question},
                ],
                max_tokens=4,
                temperature=0,
            )
        assert reply.usage is not None and reply.usage.prompt_tokens_details is not None
        assert reply.usage.prompt_tokens_details.cached_tokens > 0  # the second turn hit
        held = engine_samples(port)
        assert held["mlxfleet_engine_prefix_cache_bytes"] > 0
        assert held["mlxfleet_engine_prefix_cache_hits_total"] >= 1
        readings.write_text('{"memory_pressure": "warning"}')
        wait_for(
            lambda: engine_samples(port)["mlxfleet_engine_prefix_cache_bytes"] == 0,
            10,
            "the prefix cache to be dropped",
        )
        assert engine_samples(port)["mlxfleet_engine_prefix_cache_entries"] == 0
        assert fleet.models()[MODEL] == {"interactive": "ready"}  # nothing moved for it

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

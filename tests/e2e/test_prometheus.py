"""A real Prometheus scrapes a real fleet through the shipped config, and every dashboard
panel's PromQL returns data from it.

Processes: coordinator, agent, engines with the demo model (one unit per tier, plus one model
that can never load), and Debian's `prometheus`, with deploy/prometheus/prometheus.yml
rewritten only for the test's ports and a 1 s scrape interval.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from mlxfleet.tiers import TIER_HEADER
from tests.conftest import REPO, Proc, wait_for
from tests.e2e.fleet import Fleet, running_fleet

pytestmark = pytest.mark.e2e

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
SHIPPED_CONFIG = REPO / "deploy" / "prometheus" / "prometheus.yml"
DASHBOARDS = sorted((REPO / "dashboards").glob("*.json"))
RATE_WINDOW = "30s"  # $__rate_interval: at a 1 s scrape interval, 30 samples
TRAFFIC_S = 12.0
NEVER_LOADS = "ghost"  # a model whose folder does not exist: pending, never loaded
OK_REQUESTS = 'sum(mlxfleet_requests_total{model="demo", status="200"})'


def require(tool: str | None, name: str) -> str:
    if tool is None:
        print(f"SKIP: {name} is not installed (.ci/run installs Debian's prometheus package)")
        pytest.skip(f"{name} is not installed")
    return tool


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape_config(gateway_port: int) -> str:
    """The shipped config with the test's gateway address and a 1 s scrape interval."""
    text = SHIPPED_CONFIG.read_text()
    changes = [
        ("localhost:8400", f"127.0.0.1:{gateway_port}"),
        (r"scrape_interval: \d+s", "scrape_interval: 1s"),
        (r"refresh_interval: \d+s", "refresh_interval: 1s"),
    ]
    for pattern, replacement in changes:
        text, count = re.subn(pattern, replacement, text)
        assert count >= 1, f"{pattern!r} is no longer in {SHIPPED_CONFIG}"
    return text


def promtool_check_metrics(body: bytes) -> None:
    done = subprocess.run(
        [require(PROMTOOL, "promtool"), "check", "metrics"],
        input=body,
        capture_output=True,
        timeout=30,
    )
    assert done.returncode == 0, (done.stdout + done.stderr).decode()[-2000:]


def panel_exprs(dashboard: dict) -> Iterator[tuple[str, str]]:
    """(panel title, expr) for every target of every panel, rows' nested panels included."""
    stack = list(dashboard.get("panels", []))
    while stack:
        panel = stack.pop()
        stack.extend(panel.get("panels", []))
        for target in panel.get("targets", []):
            if target.get("expr"):
                yield panel.get("title", "?"), target["expr"]


def substitute(expr: str, node: str) -> str:
    """Grafana's part: the dashboard variables, with one concrete value each."""
    values = {"__rate_interval": RATE_WINDOW, "node": node, "model": "demo", "tier": "interactive"}
    out = re.sub(r"\$\{?(\w+)\}?", lambda m: values.get(m.group(1), m.group(0)), expr)
    assert "$" not in out, f"unknown variable left in {expr!r}"
    return out


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> Iterator[Fleet]:
    config = "".join(
        f'[[models]]\nname = "demo"\nsource = "{demo_model}"\ntier = "{tier}"\n'
        "context_length = 2048\n"
        for tier in ("interactive", "batch")
    )
    config += f'[[models]]\nname = "{NEVER_LOADS}"\nsource = "/nonexistent/{NEVER_LOADS}"\n'
    with running_fleet(
        tmp_path_factory, config, ready=[("demo", "interactive"), ("demo", "batch")]
    ) as f:
        yield f


@pytest.fixture(scope="module")
def prometheus(fleet: Fleet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = require(PROMETHEUS, "prometheus")
    work = tmp_path_factory.mktemp("prometheus")
    config = work / "prometheus.yml"
    config.write_text(scrape_config(fleet.runtime["gateway_port"]))
    port = free_port()
    proc = Proc(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={work / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        work / "prometheus.log",
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _get(f"{base}/-/ready") == 200, 30, "Prometheus to be ready")
        yield base
    except BaseException:
        print("--- prometheus log ---\n" + proc.output()[-4000:])
        raise
    finally:
        proc.stop()


def _get(url: str) -> int:
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.HTTPError:
        return 0


def query(prometheus: str, expr: str) -> dict:
    r = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=10)
    body = r.json()
    assert body["status"] == "success", f"{expr}: {body.get('error')}"
    return body["data"]


def targets_up(prometheus: str) -> dict[str, list[dict]]:
    active = httpx.get(f"{prometheus}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
    jobs: dict[str, list[dict]] = {}
    for target in active:
        if target["health"] == "up":
            jobs.setdefault(target["labels"]["job"], []).append(target)
    return jobs


def serve_traffic(fleet: Fleet, seconds: float) -> list[int]:
    """Streaming chats in both tiers from two threads, plus one refused request; returns the
    completion tokens each stream's usage reported."""
    tokens: list[int] = []
    stop = time.monotonic() + seconds

    def loop(tier: str) -> None:
        client = fleet.client()
        while time.monotonic() < stop:
            stream = client.chat.completions.create(
                model="demo",
                messages=[{"role": "user", "content": f"Count to ten ({tier})"}],
                max_tokens=24,
                stream=True,
                stream_options={"include_usage": True},
                extra_headers={TIER_HEADER: tier},
            )
            usage = [c.usage for c in stream if c.usage is not None]
            tokens.append(usage[-1].completion_tokens)

    threads = [threading.Thread(target=loop, args=(t,)) for t in ("interactive", "batch")]
    for t in threads:
        t.start()
    r = httpx.post(
        f"{fleet.base}/v1/chat/completions",
        headers={"Authorization": f"Bearer {fleet.key}"},
        json={"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert r.status_code == 404
    for t in threads:
        t.join()
    return tokens


def test_every_metrics_endpoint_is_well_formed_and_prometheus_scrapes_them(
    fleet: Fleet, prometheus: str
) -> None:
    targets = httpx.get(f"{fleet.base}/prometheus/targets").json()
    assert len(targets) == 1 and targets[0]["labels"]["role"] in ("laptop", "server")
    agent_url = f"http://{targets[0]['targets'][0]}/metrics"
    for url in (f"{fleet.base}/metrics", agent_url):
        promtool_check_metrics(httpx.get(url).content)
    jobs = wait_for(
        lambda: (
            (j := targets_up(prometheus)).keys() >= {"mlxfleet-coordinator", "mlxfleet-agents"}
            and j
        ),
        30,
        "Prometheus to scrape the coordinator and the agent found by http_sd",
    )
    [agent] = jobs["mlxfleet-agents"]
    assert agent["labels"]["node"] == targets[0]["labels"]["node"]
    # a model that never loaded is pending with its reason, and the scrape stays well-formed
    data = query(prometheus, f'mlxfleet_unit_pending{{model="{NEVER_LOADS}"}}')
    assert [r["metric"]["reason"] for r in data["result"]] == ["sizing_error"]


def test_tokens_counted_equal_usage_and_every_dashboard_panel_returns_data(
    fleet: Fleet, prometheus: str
) -> None:
    before = _scalar(prometheus, 'sum(mlxfleet_generation_tokens_total{model="demo"})')
    answered = _scalar(prometheus, OK_REQUESTS)
    tokens = serve_traffic(fleet, TRAFFIC_S)
    assert len(tokens) >= 4
    after = wait_for(
        lambda: (
            (v := _scalar(prometheus, 'sum(mlxfleet_generation_tokens_total{model="demo"})'))
            >= before + sum(tokens)
            and v
        ),
        10,
        "Prometheus to see every generated token",
    )
    assert after - before == sum(tokens)  # the gateway counts exactly what usage reported
    # every stream counted once as a 200, the unknown model as a 404 without a model label
    assert _scalar(prometheus, OK_REQUESTS) - answered == len(tokens)
    assert _scalar(prometheus, 'sum(mlxfleet_requests_total{model="", status="404"})') == 1

    node = httpx.get(f"{fleet.base}/prometheus/targets").json()[0]["labels"]["node"]
    empty = []
    checked = 0
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        for title, expr in panel_exprs(dashboard):
            result = query(prometheus, substitute(expr, node))["result"]
            checked += 1
            if not result:
                empty.append(f"{path.name} / {title}: {expr}")
        for annotation in dashboard.get("annotations", {}).get("list", []):
            if annotation.get("expr"):
                query(prometheus, substitute(annotation["expr"], node))  # valid PromQL
    assert checked >= 30, f"only {checked} panel expressions found in {DASHBOARDS}"
    assert not empty, "panels without data:\n" + "\n".join(empty)


def _scalar(prometheus: str, expr: str) -> float:
    result = query(prometheus, expr)["result"]
    return float(result[0]["value"][1]) if result else 0.0


def test_an_agent_restart_keeps_every_scrape_well_formed_and_queries_error_free(
    fleet: Fleet, prometheus: str
) -> None:
    """The agent goes away (its models with it) and comes back: the coordinator's metrics stay
    valid with the node offline and nothing placed, every panel query still succeeds (empty is
    fine, an error is not), and Prometheus finds the agent again through discovery."""
    node = httpx.get(f"{fleet.base}/prometheus/targets").json()[0]["labels"]["node"]
    agent_home = fleet.agent_home(fleet.agent)
    fleet.agent.stop()
    wait_for(
        lambda: httpx.get(f"{fleet.base}/prometheus/targets").json() == [],
        15,
        "the stopped agent to leave service discovery",
    )
    promtool_check_metrics(httpx.get(f"{fleet.base}/metrics").content)
    wait_for(
        lambda: _scalar(prometheus, 'sum(mlxfleet_nodes{state="offline"})') == 1,
        10,
        "Prometheus to see the node offline",
    )
    for path in DASHBOARDS:
        for _title, expr in panel_exprs(json.loads(path.read_text())):
            query(prometheus, substitute(expr, node))  # asserts status success

    fleet.start_agent(home=agent_home)
    wait_for(
        lambda: fleet.models().get("demo", {}).get("interactive") == "ready",
        120,
        "the restarted agent to serve the demo model again",
    )
    jobs = wait_for(
        lambda: (j := targets_up(prometheus)).get("mlxfleet-agents") and j,
        20,
        "Prometheus to scrape the restarted agent",
    )
    assert jobs["mlxfleet-agents"][0]["labels"]["node"] == node  # the same node, not a new one
    promtool_check_metrics(httpx.get(f"{fleet.base}/metrics").content)

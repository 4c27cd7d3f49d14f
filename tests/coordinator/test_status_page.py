"""The status page: the chart math (pure), its JSON on real in-memory objects, its routes."""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry, Counter, Histogram

from coordinator import status_page
from coordinator.config import Config, ModelSpec
from coordinator.pki import FleetPki
from coordinator.reconcile import Reconciler
from coordinator.registry import Engine, EngineId, NodeId, NodeStatus, Registry
from coordinator.routing import Routing
from coordinator.status_page import (
    StatusPage,
    Totals,
    bucket_deltas,
    counter_rate,
    histogram_quantile,
    read_totals,
    sample_point,
)
from coordinator.store import Store
from mlxfleet.facts import NodeFacts
from tests.coordinator.test_placement_units import GIB, Fleet, facts, model_folder

INF = math.inf
BUCKETS = [(0.1, 2.0), (0.5, 6.0), (1.0, 8.0), (INF, 10.0)]
ENGINE_SECRET = "engine-secret-5f0c1e"  # must never reach the JSON


# The quantile math, against hand-computed Prometheus histogram_quantile answers
def test_quantile_interpolates_within_the_bucket_that_holds_the_rank() -> None:
    # rank 5 of 10 falls in (0.1, 0.5], which holds observations 3..6: 3/4 of the way in.
    assert histogram_quantile(0.5, BUCKETS) == pytest.approx(0.4)
    # rank 7 of 10 falls in (0.5, 1.0], which holds observations 7..8: half way.
    assert histogram_quantile(0.7, BUCKETS) == pytest.approx(0.75)


def test_quantile_in_the_first_bucket_starts_at_zero() -> None:
    assert histogram_quantile(0.5, [(0.2, 4.0), (INF, 4.0)]) == pytest.approx(0.1)
    assert histogram_quantile(0.15, BUCKETS) == pytest.approx(0.1 * 1.5 / 2)  # rank 1.5 of 2
    assert histogram_quantile(0.25, BUCKETS) == pytest.approx(0.1 + 0.4 * 0.5 / 4)  # just past


def test_quantile_in_the_inf_bucket_is_the_highest_finite_bound() -> None:
    # rank 9.5 of 10: only the +Inf bucket reaches it.
    assert histogram_quantile(0.95, BUCKETS) == 1.0


def test_quantile_is_none_without_observations_or_an_inf_bucket() -> None:
    assert histogram_quantile(0.5, [(0.1, 0.0), (INF, 0.0)]) is None
    assert histogram_quantile(0.5, [(0.1, 3.0), (1.0, 5.0)]) is None
    assert histogram_quantile(0.5, []) is None


def test_bucket_deltas_are_the_interval_and_a_reset_starts_again() -> None:
    before = {0.1: 1.0, 0.5: 3.0, INF: 4.0}
    now = {0.1: 3.0, 0.5: 7.0, INF: 9.0}
    assert bucket_deltas(now, before) == [(0.1, 2.0), (0.5, 4.0), (INF, 5.0)]
    assert bucket_deltas({0.1: 1.0, INF: 2.0}, before) == [(0.1, 1.0), (INF, 2.0)]
    assert bucket_deltas(now, {}) == [(0.1, 3.0), (0.5, 7.0), (INF, 9.0)]


def test_counter_rate() -> None:
    assert counter_rate(130.0, 100.0, 2.0) == 15.0
    assert counter_rate(10.0, 100.0, 2.0) == 5.0  # restarted from 0
    assert counter_rate(130.0, 100.0, 0.0) == 0.0


def contract_metrics() -> tuple[CollectorRegistry, Histogram, Counter]:
    """The two coordinator metrics the charts read, named as in the metrics contract."""
    registry = CollectorRegistry()
    ttft = Histogram(
        "mlxfleet_ttft_seconds",
        "ttft",
        ["model", "tier"],
        buckets=(0.1, 0.5, 1.0),
        registry=registry,
    )
    tokens = Counter("mlxfleet_generation_tokens", "tokens", ["model", "tier"], registry=registry)
    return registry, ttft, tokens


def test_read_totals_sums_a_tier_over_its_models_and_sample_point_uses_the_interval() -> None:
    registry, ttft, tokens = contract_metrics()
    ttft.labels("a", "interactive").observe(0.05)
    tokens.labels("a", "interactive").inc(100)
    before = read_totals(registry.collect())
    for model, seconds in [("a", 0.2), ("a", 0.3), ("b", 0.4), ("b", 0.7)]:
        ttft.labels(model, "interactive").observe(seconds)
    tokens.labels("a", "interactive").inc(30)
    tokens.labels("b", "interactive").inc(20)
    tokens.labels("b", "batch").inc(8)
    now = read_totals(registry.collect())

    assert now["interactive"] == Totals({0.1: 1.0, 0.5: 4.0, 1.0: 5.0, INF: 5.0}, 150.0)
    point = sample_point(1000.0, before["interactive"], now["interactive"], 2.0)
    # Interval: 0.2, 0.3, 0.4 in (0.1, 0.5], 0.7 in (0.5, 1.0]. p50: rank 2 of 3 in the first.
    assert point.ttft_p50_s == pytest.approx(0.1 + 0.4 * 2 / 3, abs=1e-6)
    # p95: rank 3.8 of 4, in (0.5, 1.0] which holds only the 4th: 0.8 of the way.
    assert point.ttft_p95_s == pytest.approx(0.9)
    assert point.tokens_per_s == 25.0
    batch = sample_point(1000.0, before["batch"], now["batch"], 2.0)
    assert (batch.ttft_p50_s, batch.ttft_p95_s, batch.tokens_per_s) == (None, None, 4.0)


# The JSON, on the real registry, router, reconciler and store
FACTS = NodeFacts("mini.local", "M2 Pro", "macOS", 32 * 2**30, 8, 0, 0.0, 0, "server")
STATUS = NodeStatus(20 * 2**30, 0, "normal", "nominal", "ac", False)


def status_page_on(tmp_path: Path) -> tuple[StatusPage, Histogram, Counter, list[str]]:
    """A page over one node serving demo/interactive; demo/batch cannot be placed.

    Returns the secrets the coordinator holds, which the JSON must never carry.
    """
    routing = Routing(FleetPki.load_or_create(tmp_path).ca_cert_pem)
    registry = Registry(routing)
    store = Store(tmp_path / "s.sqlite3")
    models = (ModelSpec("demo", str(tmp_path)), ModelSpec("demo", str(tmp_path), tier="batch"))
    reconciler = Reconciler(Config(home=tmp_path, models=models), registry, store)
    registry.connect(NodeId("mini-1"), FACTS, [])
    registry.heartbeat(NodeId("mini-1"), STATUS, {})
    engine = Engine(
        EngineId("e1"),
        "demo",
        NodeId("mini-1"),
        "interactive",
        "ready",
        url="http://127.0.0.1:1",
        secret=ENGINE_SECRET,
    )
    registry.upsert_engine(engine)
    reconciler.step()
    store.add_event("mini-1", "engine_ready", "demo http://127.0.0.1:1")
    secrets = [ENGINE_SECRET, store.create_api_key("team"), store.create_join_token(60, 1)]
    metrics, ttft, tokens = contract_metrics()
    page = StatusPage(metrics, reconciler, registry, routing, store)
    return page, ttft, tokens, secrets


def sample(page: StatusPage) -> None:
    page.record(*page.read())


def test_status_json_shows_nodes_units_knobs_events_and_series(tmp_path: Path) -> None:
    page, ttft, tokens, _ = status_page_on(tmp_path)
    sample(page)  # the base reading
    ttft.labels("demo", "interactive").observe(0.3)
    tokens.labels("demo", "interactive").inc(12)
    sample(page)
    status = json.loads(json.dumps(page.status()))  # what the page receives

    assert set(status) == {
        "time", "sample_s", "window_s", "nodes", "models", "tiers", "events", "series"
    }  # fmt: skip
    [node] = status["nodes"]
    assert node["id"] == "mini-1" and node["state"] == "live" and node["chip"] == "M2 Pro"
    assert node["role"] == "server" and node["available_gib"] == 20.0
    assert node["thermal"] == "nominal" and node["models"] == ["demo (ready)"]
    units = {(m["model"], m["tier"]): m for m in status["models"]}
    assert units["demo", "interactive"]["state"] == "ready"
    assert units["demo", "interactive"]["engines"] == ["mini-1: ready"]
    assert units["demo", "batch"]["state"] == "pending" and units["demo", "batch"]["pending"]
    assert status["tiers"]["interactive"] == {
        "max_concurrency": 4, "batch_window_ms": 0, "max_batch_size": 4, "queue_limit": 64
    }  # fmt: skip
    assert status["tiers"]["batch"]["batch_window_ms"] == 80
    assert status["events"][0]["kind"] == "engine_ready"
    assert status["events"][0]["node_id"] == "mini-1"
    [point] = status["series"]["interactive"]
    assert set(point) == {"t", "ttft_p50_s", "ttft_p95_s", "tokens_per_s"}
    assert point["ttft_p50_s"] == pytest.approx(0.1 + 0.4 * 0.5)
    assert point["tokens_per_s"] > 0
    assert point["t"] == pytest.approx(time.time(), abs=5)
    [idle] = status["series"]["batch"]
    assert idle["ttft_p50_s"] is None and idle["tokens_per_s"] == 0.0


def group_page(tmp_path: Path) -> tuple[StatusPage, Reconciler]:
    """A page over two 48 GiB nodes and a model that neither holds alone: the reconciler
    places it as a group of two (coordinator/groups.py), rank 0 on studio-1."""
    big = model_folder(tmp_path, "big", 40 * GIB)  # 32 layers; ~45 GiB, a budget is 40 GiB
    fleet = Fleet(tmp_path, ModelSpec("big", big))
    fleet.join("studio-1", facts(48))
    fleet.join("studio-2", facts(48))
    fleet.reconciler.step()
    metrics, _, _ = contract_metrics()
    page = StatusPage(metrics, fleet.reconciler, fleet.registry, fleet.routing, fleet.store)
    return page, fleet.reconciler


def test_status_json_shows_a_groups_members(tmp_path: Path) -> None:
    page, reconciler = group_page(tmp_path)
    [(group_id, running)] = reconciler.groups.groups.items()
    status = json.loads(json.dumps(page.status()))
    [unit] = status["models"]
    assert (unit["model"], unit["state"]) == ("big", "loading")
    assert unit["engines"] == ["studio-1: starting (rank 0)", "studio-2: starting (rank 1)"]
    share = running.placement.shares[0].bytes
    assert unit["groups"] == [
        {
            "group": group_id,
            "members": [
                {"node": "studio-1", "rank": 0, "layers": "16-31", "bytes": share},
                {"node": "studio-2", "rank": 1, "layers": "0-15", "bytes": share},
            ],
        }
    ]
    # the page's script reads exactly these fields into its groups table
    html = Path(status_page.__file__).with_suffix(".html").read_text()
    assert '<table id="groups">' in html
    for field in ("m.groups", "g.group", "g.members", "r.rank", "r.node", "r.layers", "r.bytes"):
        assert field in html


def test_status_json_carries_no_secret(tmp_path: Path) -> None:
    """/ui/status is unauthenticated: no engine secret, team key or join token in it."""
    page, _, _, secrets = status_page_on(tmp_path)
    text = json.dumps(page.status())
    for secret in secrets:
        assert secret not in text
    assert "secret" not in text


def test_the_series_keeps_the_last_window(tmp_path: Path) -> None:
    page, _, _, _ = status_page_on(tmp_path)
    keep = round(status_page.STATUS_WINDOW_S / status_page.STATUS_SAMPLE_S)
    for _ in range(keep + 5):
        sample(page)
    assert len(page.series["interactive"]) == keep


# The routes and the sampler task, on a real aiohttp server
async def test_routes_serve_the_page_and_the_sampler_runs_with_the_app(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(status_page, "STATUS_SAMPLE_S", 0.02)
    page, ttft, _, _ = status_page_on(tmp_path)
    app = web.Application()
    page.add_routes(app)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        html = await client.get("/ui")
        assert html.status == 200 and html.content_type == "text/html"
        assert "default-src 'none'" in html.headers["Content-Security-Policy"]
        body = await html.text()
        assert 'id="chart-ttft"' in body and 'id="chart-tps"' in body
        ttft.labels("demo", "interactive").observe(0.3)
        deadline = time.monotonic() + 5
        while not any(p.ttft_p50_s for p in page.series["interactive"]):
            assert time.monotonic() < deadline, "no TTFT point sampled within 5 s"
            await asyncio.sleep(0.02)
        status = await client.get("/ui/status")
        assert status.status == 200
        assert (await status.json())["nodes"][0]["id"] == "mini-1"
    task = next((t for t in asyncio.all_tasks() if t.get_name() == "status-sampler"), None)
    assert task is None  # stopped with the app


def test_the_page_loads_nothing_from_elsewhere_and_inserts_text_only() -> None:
    html = Path(status_page.__file__).with_suffix(".html").read_text()
    assert "innerHTML" not in html and "outerHTML" not in html and "insertAdjacentHTML" not in html
    assert "document.write" not in html and "eval(" not in html
    assert re.findall(r"""(?:src|href)\s*=\s*["'](?!data:)""", html) == []
    assert "http://" not in html and "https://" not in html and "@import" not in html

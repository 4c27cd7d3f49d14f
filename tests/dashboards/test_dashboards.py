"""The dashboards and the Prometheus/Grafana deploy files: generated, on contract, consistent."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

# PyYAML is not pinned by us: it comes with litellm, mlx-lm and huggingface-hub.
import yaml

from dashboards import generate
from tests.conftest import REPO
from tests.metrics_contract import CONTRACT_HISTOGRAMS, CONTRACT_METRICS

DEPLOY = REPO / "deploy"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# Variables an expression may use: the e2e test substitutes exactly these.
EXPR_VARIABLES = {"node", "model", "tier", "__rate_interval"}

# Counters of rare events: their panels must show 0, not "no data", before the first one.
RARE_COUNTERS = (
    "mlxfleet_failovers_total",
    "mlxfleet_engine_exits_total",
    "mlxfleet_trigger_events_total",
    "mlxfleet_router_cooldowns",
    "mlxfleet_node_oom_kills_total",
)


def boards() -> dict[str, dict[str, Any]]:
    return {d["uid"]: d for d in generate.dashboards().values()}


def query_panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in board["panels"] if p["type"] != "row"]


def all_queries() -> list[tuple[str, str, str]]:
    """Panel targets, annotations and variable queries: every PromQL the dashboards hold."""
    variables = [
        (uid, v["name"], v["query"])
        for uid, d in boards().items()
        for v in d["templating"]["list"]
        if v["type"] == "query"
    ]
    return generate.panel_queries() + generate.annotation_queries() + variables


def metric_names(expr: str) -> set[str]:
    return {re.sub(r"_bucket$", "", m) for m in re.findall(r"mlxfleet_[a-z_]+", expr)}


def test_committed_json_is_the_generators_output() -> None:
    assert generate.stale() == []
    assert sorted(p.name for p in (REPO / "dashboards").glob("*.json")) == [
        "mlxfleet-fleet.json",
        "mlxfleet-node.json",
        "mlxfleet-slo.json",
    ]


def test_check_names_a_drifted_or_extra_file(tmp_path: Path) -> None:
    for f in (REPO / "dashboards").glob("*.json"):
        shutil.copy(f, tmp_path)
    node = tmp_path / "mlxfleet-node.json"
    node.write_text(node.read_text().replace("82", "83"))
    (tmp_path / "old.json").write_text("{}\n")
    assert generate.stale(tmp_path) == ["mlxfleet-node.json", "old.json"]


def test_check_script_passes_on_the_committed_files() -> None:
    """Runs the script as a person would, so its imports work outside pytest too."""
    done = subprocess.run(
        [sys.executable, "dashboards/generate.py", "--check"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr


def test_uids_and_variables() -> None:
    names = {uid: [v["name"] for v in d["templating"]["list"]] for uid, d in boards().items()}
    assert names == {
        "mlxfleet-fleet": ["datasource"],
        "mlxfleet-slo": ["datasource", "model", "tier"],
        "mlxfleet-node": ["datasource", "node"],
    }
    for d in boards().values():
        source = d["templating"]["list"][0]
        assert (source["type"], source["query"]) == ("datasource", "prometheus")
        for v in d["templating"]["list"][1:]:
            assert v["type"] == "query"
            assert v["datasource"] == DATASOURCE


def test_every_panel_and_annotation_uses_the_datasource_variable() -> None:
    for uid, d in boards().items():
        for p in query_panels(d):
            assert p["datasource"] == DATASOURCE, (uid, p["title"])
            assert p["targets"], (uid, p["title"])
            for t in p["targets"]:
                assert t["datasource"] == DATASOURCE, (uid, p["title"])
        for a in d["annotations"]["list"]:
            assert a["datasource"] == DATASOURCE, (uid, a["name"])


def test_queries_use_only_the_allowed_variables() -> None:
    defined = {uid: {v["name"] for v in d["templating"]["list"]} for uid, d in boards().items()}
    for uid, where, expr in all_queries():
        used = set(re.findall(r"\$\{?(\w+)", expr))
        assert used <= EXPR_VARIABLES, (uid, where, expr)
        # A variable is only used on a dashboard that defines it.
        assert used - {"__rate_interval"} <= defined[uid], (uid, where, expr)


def test_every_metric_is_in_the_contract() -> None:
    for uid, where, expr in all_queries():
        names = metric_names(expr)
        assert names, (uid, where, expr)
        assert names <= CONTRACT_METRICS, (uid, where, names - CONTRACT_METRICS)
        for bucket in re.findall(r"(mlxfleet_[a-z_]+)_bucket", expr):
            assert bucket in CONTRACT_HISTOGRAMS, (uid, where, bucket)


def test_rare_event_counters_fall_back_to_zero() -> None:
    for uid, title, expr in generate.panel_queries():
        if any(c in expr for c in RARE_COUNTERS):
            assert expr.endswith("or on() vector(0)"), (uid, title, expr)


def test_panel_and_annotation_queries() -> None:
    panels = generate.panel_queries()
    assert {uid for uid, _, _ in panels} == set(boards())
    assert len(panels) == sum(len(p["targets"]) for d in boards().values() for p in query_panels(d))
    assert [(uid, name) for uid, name, _ in generate.annotation_queries()] == [
        ("mlxfleet-node", "Trigger events"),
        ("mlxfleet-node", "Engine exits"),
    ]


def test_threshold_lines_are_the_seed_triggers() -> None:
    def line(uid: str, title: str) -> tuple[float, str]:
        p = next(p for p in query_panels(boards()[uid]) if p["title"] == title)
        defaults = p["fieldConfig"]["defaults"]
        mode = defaults["custom"]["thresholdsStyle"]["mode"]
        return defaults["thresholds"]["steps"][-1]["value"], mode

    assert line("mlxfleet-node", "Memory used") == (82, "dashed")
    assert line("mlxfleet-fleet", "Memory used per node") == (82, "dashed")
    assert line("mlxfleet-node", "Swap used") == (768 * 1024 * 1024, "dashed")
    assert line("mlxfleet-fleet", "Swap used per node") == (768 * 1024 * 1024, "dashed")
    assert line("mlxfleet-slo", "TTFT p95 / p50") == (2.8, "dashed")


def test_promtool_accepts_the_prometheus_config() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        print("SKIP: promtool is not installed (Debian package prometheus)")
        pytest.skip("promtool is not installed (Debian package prometheus)")
    config = DEPLOY / "prometheus" / "prometheus.yml"
    done = subprocess.run(
        [promtool, "check", "config", str(config)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_prometheus_config_scrapes_the_coordinator_and_its_discovery() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert config["global"]["scrape_interval"] == "15s"
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    assert jobs["mlxfleet-coordinator"]["static_configs"] == [{"targets": ["localhost:8400"]}]
    assert jobs["mlxfleet-coordinator"]["metrics_path"] == "/metrics"
    assert jobs["mlxfleet-agents"]["http_sd_configs"] == [
        {"url": "http://localhost:8400/prometheus/targets", "refresh_interval": "30s"}
    ]


def test_compose_mounts_files_that_exist_where_provisioning_looks() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"prometheus", "grafana"}
    mounts: dict[str, Path] = {}
    for name, service in services.items():
        image, _, tag = service["image"].partition(":")
        assert image in {"prom/prometheus", "grafana/grafana"}, name
        assert tag and tag != "latest", service["image"]
        assert service["network_mode"] == "host"
        for volume in service["volumes"]:
            source, target = volume.split(":")[:2]
            if source.startswith("."):  # a bind mount; the others are named volumes
                assert (DEPLOY / source).exists(), volume
                mounts[target] = (DEPLOY / source).resolve()
    assert mounts["/etc/prometheus/prometheus.yml"] == DEPLOY / "prometheus" / "prometheus.yml"
    provisioning = DEPLOY / "grafana" / "provisioning"
    assert mounts["/etc/grafana/provisioning/datasources"] == provisioning / "datasources"
    assert mounts["/etc/grafana/provisioning/dashboards"] == provisioning / "dashboards"

    sources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    [source] = sources["datasources"]
    named = (source["name"], source["type"], source["uid"], source["url"])
    assert named == ("Prometheus", "prometheus", "prometheus", "http://localhost:9090")

    providers = yaml.safe_load((provisioning / "dashboards" / "mlxfleet.yml").read_text())
    [provider] = providers["providers"]
    assert provider["type"] == "file"
    assert mounts[provider["options"]["path"]] == REPO / "dashboards"

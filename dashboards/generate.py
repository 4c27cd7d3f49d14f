"""The Grafana dashboards in this folder, built in code with grafana-foundation-sdk.

`python dashboards/generate.py` writes dashboards/*.json; `--check` exits 1 naming each file that
differs from what this script would write. Every panel and annotation queries the `datasource`
dashboard variable, so the JSON imports into any Grafana. Expressions use only the `node`,
`model` and `tier` variables and Grafana's `$__rate_interval`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from grafana_foundation_sdk.builders import common as common_b
from grafana_foundation_sdk.builders import dashboard as dash_b
from grafana_foundation_sdk.builders import prometheus as prom_b
from grafana_foundation_sdk.builders import stat, statetimeline, table, timeseries
from grafana_foundation_sdk.cog.builder import Builder
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.cog.variants import Dataquery
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as dash
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

HERE = Path(__file__).resolve().parent
RATE = "$__rate_interval"
DATASOURCE = dash.DataSourceRef(type_val="prometheus", uid="${datasource}")

# The seeds' trigger thresholds (docs/operations.md, "Triggers"): drawn as lines on the panels.
MEMORY_FIRE_PERCENT = 82
SWAP_FIRE_BYTES = 768 * 1024 * 1024
TAIL_RATIO_FIRE = 2.8
# The tail trigger judges TTFT p95/p50 over this window, so the ratio panel uses it too.
TAIL_WINDOW = "5m"
# Annotation queries run at this step; their windows match it so each event shows once.
ANNOTATION_STEP = "1m"

NODE = 'node=~"$node"'
UNIT = 'model=~"$model", tier=~"$tier"'
# Level gauges are absent when the OS gives no reading; -1 ("unknown") stands in for them.
Names = dict[int, tuple[str, str]]  # value -> (text, color)
PRESSURE_NAMES: Names = {
    -1: ("unknown", "gray"),
    0: ("normal", "green"),
    1: ("warning", "orange"),
    2: ("critical", "red"),
}
THERMAL_NAMES: Names = {
    -1: ("unknown", "gray"),
    0: ("nominal", "green"),
    1: ("fair", "yellow"),
    2: ("serious", "orange"),
    3: ("critical", "red"),
}
ACTIVE_NAMES: Names = {0: ("clear", "green"), 1: ("active", "red")}
QUANTILES = ((0.5, 50), (0.95, 95), (0.99, 99))
MEMORY_TRIGGER = (
    f"the memory trigger, used > {MEMORY_FIRE_PERCENT} % for 10 min halves the node's concurrency "
    "and relocates its heaviest model (seed threshold, docs/operations.md)."
)
SWAP_TRIGGER = (
    "the swap trigger, > 768 MiB for 90 s halts new placements and moves the batch tier away "
    "(seed threshold, docs/operations.md)."
)
UNKNOWN = "unknown: the node reports no reading."
# A counter of rare events may have no series yet; 0 then (and only then: on() matches any).
OR_ZERO = "or on() vector(0)"

Targets = list[Builder[Dataquery]]
# An annotation and the fields the SDK's model cannot hold (added to its JSON by build()).
Annotation = tuple[dash_b.AnnotationQuery, dict[str, str]]
Annotations = Sequence[Annotation]
P = TypeVar("P", timeseries.Panel, stat.Panel, table.Panel, statetimeline.Panel)


def query(expr: str, legend: str = "", ref: str = "A", instant: bool = False) -> prom_b.Dataquery:
    """One Prometheus target on the dashboard's datasource variable."""
    q = prom_b.Dataquery().expr(expr).ref_id(ref).datasource(DATASOURCE)
    if legend:
        q = q.legend_format(legend)
    return q.instant() if instant else q.range()


def targets(*pairs: tuple[str, str], instant: bool = False) -> Targets:
    """(expr, legend) pairs as targets A, B, C..."""
    return [query(e, lg, chr(ord("A") + i), instant) for i, (e, lg) in enumerate(pairs)]


def panel(
    p: P, title: str, description: str, qs: Targets, unit: str = "short", w: int = 12, h: int = 8
) -> P:
    return (
        p.title(title)
        .description(description)
        .datasource(DATASOURCE)
        .targets(qs)
        .unit(unit)
        .span(w)
        .height(h)
    )


def line_at(value: float) -> dash_b.ThresholdsConfig:
    """Green below `value`, red from it: with a dashed threshold style, a line on the graph."""
    steps = [dash.Threshold(value=None, color="green"), dash.Threshold(value=value, color="red")]
    return dash_b.ThresholdsConfig().mode(dash.ThresholdsMode.ABSOLUTE).steps(steps)


def graph(
    title: str,
    description: str,
    qs: Targets,
    unit: str = "short",
    threshold: float | None = None,
    w: int = 12,
) -> timeseries.Panel:
    p = panel(timeseries.Panel(), title, description, qs, unit, w)
    if threshold is not None:
        mode = common.GraphThresholdsStyleMode.DASHED
        p = p.thresholds(line_at(threshold)).thresholds_style(
            common_b.GraphThresholdsStyleConfig().mode(mode)
        )
    return p


def mapped(names: Names) -> list[dash.ValueMapping]:
    options = {
        str(v): dash.ValueMappingResult(text=t, color=c, index=i)
        for i, (v, (t, c)) in enumerate(sorted(names.items()))
    }
    return [dash.ValueMap(options=options)]


def levels(
    title: str, description: str, qs: Targets, names: Names, w: int = 12
) -> statetimeline.Panel:
    return panel(statetimeline.Panel(), title, description, qs, w=w).mappings(mapped(names))


def current(
    title: str,
    description: str,
    qs: Targets,
    unit: str = "short",
    w: int = 6,
    text: common.BigValueTextMode = common.BigValueTextMode.VALUE_AND_NAME,
    names: Names | None = None,
) -> stat.Panel:
    p = panel(stat.Panel(), title, description, qs, unit, w, h=5)
    p = (
        p.text_mode(text)
        .graph_mode(common.BigValueGraphMode.NONE)
        .reduce_options(common_b.ReduceDataOptions().calcs(["lastNotNull"]))
    )
    return p.mappings(mapped(names)) if names else p


def listing(
    title: str, description: str, expr: str, w: int = 8, value: tuple[str, str] | None = None
) -> table.Panel:
    """A table of the label sets `expr` returns now (its time column hidden, and its value
    column too unless `value` gives the column's name and unit)."""
    qs: Targets = [query(expr, instant=True).format(PromQueryFormat.TABLE)]
    options: dict[str, Any] = {"excludeByName": {"Time": True, "Value": value is None}}
    if value is not None:
        options["renameByName"] = {"Value": value[0]}
    p = panel(table.Panel(), title, description, qs, value[1] if value else "short", w=w)
    return p.with_transformation(dash.DataTransformerConfig(id_val="organize", options=options))


def quantile(q: float, metric: str, window: str = RATE) -> str:
    """histogram_quantile of a contract histogram per model and tier."""
    buckets = f"rate({metric}_bucket{{{UNIT}}}[{window}])"
    return f"histogram_quantile({q}, sum by (le, model, tier) ({buckets}))"


def either_level(metric: str, selector: str = "") -> str:
    """The level per node, or -1 for a connected node that reports none."""
    braces = f"{{{selector}}}" if selector else ""
    known = f"max by (node) ({metric}{braces})"
    return f"{known} or max by (node) (mlxfleet_agent_connected{braces}) * 0 - 1"


def datasource_variable() -> dash_b.DatasourceVariable:
    return dash_b.DatasourceVariable("datasource").label("Data source").type("prometheus")


def label_variable(name: str, query_expr: str, include_all: bool) -> dash_b.QueryVariable:
    v = (
        dash_b.QueryVariable(name)
        .label(name)
        .query(query_expr)
        .datasource(DATASOURCE)
        .refresh(dash.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(dash.VariableSort.ALPHABETICAL_ASC)
    )
    if include_all:
        # Every expression matches with =~, so "All" is the regex .* (series with model="" too).
        v = v.include_all(True).multi(True).all_value(".*")
        v = v.current(dash.VariableOption(text="All", value="$__all"))
    return v


def event_annotation(name: str, expr: str, title: str, tags: list[str], color: str) -> Annotation:
    """An annotation from a Prometheus query, one marker per event."""
    a = dash_b.AnnotationQuery().name(name).datasource(DATASOURCE).enable(True).hide(False)
    extra = {"step": ANNOTATION_STEP, "titleFormat": title, "tagKeys": ",".join(tags)}
    return a.icon_color(color).expr(expr), extra


def new_events(counter: str, selector: str) -> str:
    """Steps of a counter within one annotation step, including a series' first appearance
    (a labelled counter is born at 1, which neither changes() nor increase() sees)."""
    s, w = f"{counter}{{{selector}}}", ANNOTATION_STEP
    return f"changes({s}[{w}]) > 0 or ({s} unless {s} offset {w})"


def build(
    uid: str,
    title: str,
    description: str,
    rows: list[tuple[str, list[Any]]],
    variables: list[dash_b.QueryVariable],
    annotations: Annotations = (),
) -> dict[str, Any]:
    """The dashboard as JSON-ready dicts; panel ids are assigned in order."""
    d = (
        dash_b.Dashboard(title)
        .uid(uid)
        .description(description)
        .tags(["mlxfleet"])
        .time("now-1h", "now")
        .refresh("30s")
        .tooltip(dash.DashboardCursorSync.CROSSHAIR)
        .with_variable(datasource_variable())
    )
    for v in variables:
        d = d.with_variable(v)
    for a, _ in annotations:
        d = d.annotation(a)
    ids = iter(range(1, 1000))
    for row_title, panels in rows:
        d = d.with_row(dash_b.Row(row_title).id(next(ids)))
        for p in panels:
            d = d.with_panel(p.id(next(ids)))
    data: dict[str, Any] = json.loads(json.dumps(d.build(), cls=JSONEncoder))
    listed = data["annotations"].setdefault("list", [])
    for entry, (_, extra) in zip(listed, annotations, strict=True):
        entry.update(extra)
    return data


def fleet() -> dict[str, Any]:
    available, total = "mlxfleet_node_memory_available_bytes", "mlxfleet_node_memory_total_bytes"
    used = f"100 * (1 - max by (node) ({available}) / max by (node) ({total}))"
    swap = "max by (node) (mlxfleet_node_swap_used_bytes)"
    active = "sum by (node, trigger) (mlxfleet_trigger_active) or on() vector(0)"
    exits = f"sum by (node, reason) (increase(mlxfleet_engine_exits_total[{RATE}])) {OR_ZERO}"
    copy_rate = "sum by (node, model, origin) (mlxfleet_model_copy_rate_bytes_per_second)"
    copy_rate = f"{copy_rate} {OR_ZERO}"
    reqs = f"sum by (tier) (rate(mlxfleet_requests_total[{RATE}]))"
    by_api = f"sum by (api) (rate(mlxfleet_requests_total[{RATE}]))"
    failed = f'mlxfleet_requests_total{{status!~"2.."}}[{RATE}]'
    errors = f"sum by (tier) (rate({failed}))"
    by_status = f"sum by (tier, status) (rate({failed})) {OR_ZERO}"
    failovers = f"sum by (model, tier, cause) (rate(mlxfleet_failovers_total[{RATE}])) {OR_ZERO}"
    keyed = 'key!=""'  # a request with no valid key has no usage to attribute
    prompt_by_key = f"sum by (key) (rate(mlxfleet_prompt_tokens_total{{{keyed}}}[{RATE}]))"
    out_by_key = f"sum by (key) (rate(mlxfleet_generation_tokens_total{{{keyed}}}[{RATE}]))"
    reqs_by_key = f"sum by (key) (rate(mlxfleet_requests_total{{{keyed}}}[{RATE}]))"
    deployments = "sum by (model, tier, order) (mlxfleet_router_deployments)"
    cooldowns = f"sum by (model, tier) (mlxfleet_router_cooldowns) {OR_ZERO}"
    nodes = [
        current(
            "Nodes by state and role",
            "Connected nodes per state (live, suspect, cordoned) and role (laptop, server).",
            targets(("sum by (state, role) (mlxfleet_nodes)", "{{state}} {{role}}"), instant=True),
            w=24,
        ),
        graph(
            "Memory used per node",
            f"100 × (1 − available / total RAM). Dashed line: {MEMORY_TRIGGER}",
            targets((used, "{{node}}")),
            "percent",
            MEMORY_FIRE_PERCENT,
        ),
        graph(
            "Swap used per node",
            f"Swap in use on each node. Dashed line: {SWAP_TRIGGER}",
            targets((swap, "{{node}}")),
            "bytes",
            SWAP_FIRE_BYTES,
        ),
        levels(
            "Thermal level per node",
            f"The OS thermal state: serious moves batch away, critical drains the node. {UNKNOWN}",
            targets((either_level("mlxfleet_node_thermal_level"), "{{node}}")),
            THERMAL_NAMES,
        ),
        levels(
            "Triggers active",
            "Each trigger on each node: active while it holds (docs/operations.md, Triggers).",
            targets((active, "{{node}} {{trigger}}")),
            ACTIVE_NAMES,
        ),
    ]
    models = [
        listing(
            "Units by state",
            "Each configured model × tier and its state: ready, asleep, loading or pending.",
            "sum by (model, tier, state) (mlxfleet_units) > 0",
        ),
        listing(
            "Placements",
            "Engines the coordinator knows: which node runs which model × tier, and their state.",
            "sum by (node, model, tier, state) (mlxfleet_placements) > 0",
        ),
        listing(
            "Pending units",
            "Units not (fully) placed and why: no_node, no_eligible_node, insufficient_memory, "
            "insufficient_disk, restoring, sizing, sizing_error, load_failed or other.",
            "sum by (model, tier, reason) (mlxfleet_unit_pending) > 0",
        ),
        listing(
            "Model files",
            "Bytes of each model's files on each node, complete and verified: placement "
            "prefers these nodes (no copy to wait for).",
            "sum by (node, model) (mlxfleet_model_files_bytes) > 0",
        ),
        graph(
            "Model copies",
            "Copies of model files under way, by node, model and origin (peer: another node "
            "of the fleet; hub: Hugging Face). 0 when nothing is being copied.",
            targets((copy_rate, "{{node}} {{model}} from {{origin}}")),
            "Bps",
            w=8,
        ),
        graph(
            "Disk room for model files",
            "Bytes of model files each node can take now: free disk within its disk budget, "
            "files no engine uses counted as free (they are evicted least recently used first).",
            targets(("mlxfleet_node_disk_room_bytes", "{{node}}")),
            "bytes",
            w=8,
        ),
        graph(
            "Engine exits",
            "Engine processes that ended, by node and reason (oom, crash, killed, load_failed, "
            "stopped, ...).",
            targets((exits, "{{node}} {{reason}}")),
            w=24,
        ),
    ]
    traffic = [
        graph(
            "Request rate by tier",
            "Requests per second through the gateway, any status. An empty tier: the request "
            "failed before its tier was known.",
            targets((reqs, "{{tier}}")),
            "reqps",
        ),
        graph(
            "Request rate by API",
            "Requests per second by dialect: chat, completions (OpenAI), messages (Anthropic: "
            "Claude Code), responses (OpenAI Responses: Codex, the Agents SDK).",
            targets((by_api, "{{api}}")),
            "reqps",
        ),
        graph(
            "Error ratio by tier",
            "Share of requests answered with a non-2xx status; 0 for a tier without errors.",
            targets((f"({errors} or 0 * {reqs}) / {reqs}", "{{tier}}")),
            "percentunit",
        ),
        graph(
            "Errors by tier and status",
            "Non-2xx answers per second: 429 queue full, 499 client left, 502 stream failed, "
            "503 paused (no engine), 404 unknown model, ...",
            targets((by_status, "{{tier}} {{status}}")),
            "reqps",
        ),
        graph(
            "Usage by key",
            "Tokens per second each team key used, prompt and generated (its name, chosen at "
            "`mlxfleet keys create`). Totals over any range: `mlxfleet usage`.",
            targets((out_by_key, "{{key}} generated"), (prompt_by_key, "{{key}} prompt")),
        ),
        graph(
            "Requests by key",
            "Requests per second per team key, any status.",
            targets((reqs_by_key, "{{key}}")),
            "reqps",
        ),
        graph(
            "Failovers",
            "Requests moved off a failing engine: retry (before the first byte), continued (a "
            "stream carried on elsewhere), cloud (served by the cloud fallback).",
            targets((failovers, "{{model}} {{tier}} {{cause}}")),
            "reqps",
        ),
    ]
    routing = [
        graph(
            "Router deployments",
            "Deployments in the LiteLLM Router per model × tier and order: 1 local (the "
            "coordinator's host), 2 remote nodes, 3 cloud fallback.",
            targets((deployments, "{{model}} {{tier}} order {{order}}")),
        ),
        graph(
            "Router cooldowns",
            "Deployments the Router is cooling down after failures.",
            targets((cooldowns, "{{model}} {{tier}}")),
        ),
    ]
    return build(
        "mlxfleet-fleet",
        "mlxfleet: fleet overview",
        "Nodes, memory, placements, groups, traffic and routing across the whole fleet.",
        [
            ("Nodes", nodes),
            ("Models", models),
            ("Groups: models over several nodes", groups()),
            ("Traffic", traffic),
            ("Routing", routing),
        ],
        [],
    )


def groups() -> list[Any]:
    """Models that run as a pipeline group over several nodes (issue 19): who holds which
    layers, each rank's memory and step time, and what the rank links carry. Each panel is 0
    while no model runs as a group (a fleet whose nodes each hold whole models)."""
    by_rank = "model, group, rank, node"
    members = "model, tier, group, node, rank, first_layer, layers"
    rss = f"sum by ({by_rank}) (mlxfleet_group_rank_rss_bytes) {OR_ZERO}"
    share = f"sum by ({by_rank}) (mlxfleet_group_member_bytes) {OR_ZERO}"
    step_s = f"sum by ({by_rank}) (rate(mlxfleet_group_step_seconds_total[{RATE}]))"
    steps = f"sum by ({by_rank}) (rate(mlxfleet_group_steps_total[{RATE}]))"
    sent = f'rate(mlxfleet_group_link_bytes_total{{direction="sent"}}[{RATE}])'
    # A group's tokens are its rank 0's: the engine on the node that runs rank 0 of the group.
    rank_0 = 'on (node, model, tier) mlxfleet_group_rank_info{rank="0"}'
    tokens = f"rate(mlxfleet_engine_generation_tokens_total[{RATE}]) and {rank_0}"
    per_token = f"sum by (model) ({sent}) / (sum by (model) ({tokens}) > 0) {OR_ZERO}"
    traffic = f"sum by (node, group, direction) (rate(mlxfleet_group_link_bytes_total[{RATE}]))"
    rank = "{{node}} {{group}} rank {{rank}}"
    return [
        listing(
            "Group members",
            "Each group's members as placed: node, rank, layers (first_layer, and how many; "
            "rank 0 serves requests and runs the last layers) and the bytes the member's share "
            "takes on its node. 0 alone: no model runs as a group.",
            f"sum by ({members}) (mlxfleet_group_member_bytes) {OR_ZERO}",
            w=12,
            value=("Bytes", "bytes"),
        ),
        graph(
            "Memory per rank",
            "Resident memory of each rank's process, and the share placement counted for it.",
            targets((rss, rank), (share, f"{rank} share")),
            "bytes",
        ),
        graph(
            "Step time per rank",
            "Mean time of one decode step on each rank (seconds in steps over steps). A rank "
            "far slower than the others holds the whole group back.",
            targets((f"{step_s} / ({steps} > 0) {OR_ZERO}", rank)),
            "s",
            w=8,
        ),
        graph(
            "Link bytes per generated token",
            "Bytes the groups' rank links sent between members for each token the model's "
            "groups generated (activations and rank 0's step messages).",
            targets((per_token, "{{model}}")),
            "bytes",
            w=8,
        ),
        graph(
            "Rank link traffic",
            "Bytes per second each node's rank link sent to and received from the other "
            "members' agents, per group (mutual TLS between agents).",
            targets((f"{traffic} {OR_ZERO}", "{{node}} {{group}} {{direction}}")),
            "Bps",
            w=8,
        ),
    ]


def slo() -> dict[str, Any]:
    ttft, tpot = "mlxfleet_ttft_seconds", "mlxfleet_time_per_output_token_seconds"
    unit, node_unit = "{{model}} {{tier}}", "{{node}} {{model}} {{tier}}"
    ratio = f"{quantile(0.95, ttft, TAIL_WINDOW)} / {quantile(0.5, ttft, TAIL_WINDOW)}"
    reqs = f"sum by (model, tier) (rate(mlxfleet_requests_total{{{UNIT}}}[{RATE}]))"
    in_flight = f"sum by (model, tier) (mlxfleet_in_flight_requests{{{UNIT}}})"
    tokens = f"sum by (model, tier) (rate(mlxfleet_generation_tokens_total{{{UNIT}}}[{RATE}]))"
    queued = f"sum by (node, model, tier) (mlxfleet_engine_queue_depth{{{UNIT}}})"
    batch = f"sum by (node, model, tier) (mlxfleet_engine_batch_size{{{UNIT}}})"
    batch_max = f"max by (node, model, tier) (mlxfleet_engine_max_batch_size{{{UNIT}}})"
    window = f"max by (model, tier) (mlxfleet_engine_batch_window_seconds{{{UNIT}}})"
    tier_window = 'max by (tier) (mlxfleet_tier_batch_window_seconds{tier=~"$tier"})'

    def three(metric: str) -> Targets:
        return targets(*((quantile(q, metric), f"{unit} p{n}") for q, n in QUANTILES))

    latency = [
        graph(
            "Time to first token",
            "Gateway arrival to first content token, streams only: p50, p95, p99.",
            three(ttft),
            "s",
        ),
        graph(
            "TTFT p95 / p50",
            f"The tail gate: TTFT p95 over p50 across {TAIL_WINDOW}. Dashed line: the tail "
            f"trigger, interactive tier > {TAIL_RATIO_FIRE} with ≥ 20 samples moves batch away "
            "(seed threshold, docs/operations.md).",
            targets((ratio, unit)),
            threshold=TAIL_RATIO_FIRE,
        ),
        graph(
            "End-to-end latency",
            "Gateway arrival to response finished, every request that reached an engine.",
            three("mlxfleet_request_duration_seconds"),
            "s",
        ),
        graph(
            "Requests and in flight",
            "Requests per second, and requests the gateway is serving now.",
            targets((reqs, f"{unit} req/s"), (in_flight, f"{unit} in flight")),
        ),
    ]
    decode = [
        graph(
            "Decode speed per sequence",
            "Tokens per second one sequence sees, 1 / time per output token (streams of 2+ "
            "tokens): median = 1 / TPOT p50, slowest 5 % = 1 / TPOT p95.",
            targets(
                (f"1 / {quantile(0.5, tpot)}", f"{unit} median"),
                (f"1 / {quantile(0.95, tpot)}", f"{unit} slowest 5 %"),
            ),
            "tokens/s",
        ),
        graph(
            "Generated tokens per second",
            "Aggregate completion tokens sent to clients.",
            targets((tokens, unit)),
            "tokens/s",
        ),
    ]
    batching = [
        graph(
            "Queue depth",
            "Requests an engine has taken but not yet admitted to its batch.",
            targets((queued, node_unit)),
            w=8,
        ),
        graph(
            "Batch size",
            "Sequences decoding together now, and the max_batch_size knob in force.",
            targets((batch, node_unit), (batch_max, f"{node_unit} max")),
            w=8,
        ),
        graph(
            "Batch window",
            "How long an engine waits to fill a batch: each engine's knob, and the tier's "
            "setting on the coordinator.",
            targets((window, f"{unit} engine"), (tier_window, "{{tier}} tier")),
            "s",
            w=8,
        ),
    ]
    return build(
        "mlxfleet-slo",
        "mlxfleet: model and tier SLOs",
        "Latency, decode speed and batching per model and tier.",
        [("Latency", latency), ("Decode", decode), ("Batching", batching)],
        [
            label_variable("model", "label_values(mlxfleet_units, model)", include_all=True),
            label_variable("tier", "label_values(mlxfleet_units, tier)", include_all=True),
        ],
    )


def node() -> dict[str, Any]:
    def gauge(metric: str, by: str = "node") -> str:
        return f"max by ({by}) (mlxfleet_node_{metric}{{{NODE}}})"

    used = f"100 * (1 - {gauge('memory_available_bytes')} / {gauge('memory_total_bytes')})"
    rss = f"sum by (model, tier) (mlxfleet_engine_rss_bytes{{{NODE}}})"
    cached = f"sum by (model, tier) (mlxfleet_engine_prefix_cache_bytes{{{NODE}}})"
    budget = f"max by (model, tier) (mlxfleet_engine_prefix_cache_budget_bytes{{{NODE}}})"
    hits = f"sum by (model, tier) (rate(mlxfleet_engine_prefix_cache_hits_total{{{NODE}}}[{RATE}]))"
    misses = (
        f"sum by (model, tier) (rate(mlxfleet_engine_prefix_cache_misses_total{{{NODE}}}[{RATE}]))"
    )
    ooms = f"sum(increase(mlxfleet_node_oom_kills_total{{{NODE}}}[{RATE}])) {OR_ZERO}"
    source = f"{gauge('power_source', 'source')} == 1"
    engines = f"sum by (model, tier, state) (mlxfleet_engine_state{{{NODE}}}) > 0"
    active = f"sum by (trigger) (mlxfleet_trigger_active{{{NODE}}}) {OR_ZERO}"
    memory = [
        graph(
            "Memory used",
            f"100 × (1 − available / total RAM). Dashed line: {MEMORY_TRIGGER} Clears < 75 %.",
            targets((used, "used")),
            "percent",
            MEMORY_FIRE_PERCENT,
            w=8,
        ),
        graph(
            "Swap used",
            f"Dashed line: {SWAP_TRIGGER} Clears < 512 MiB.",
            targets((gauge("swap_used_bytes"), "swap")),
            "bytes",
            SWAP_FIRE_BYTES,
            w=8,
        ),
        levels(
            "Memory pressure",
            f"The OS memory pressure: warning moves batch away, critical drains. {UNKNOWN}",
            targets((either_level("mlxfleet_node_memory_pressure_level", NODE), "pressure")),
            PRESSURE_NAMES,
            w=8,
        ),
        graph(
            "Wired, compressed and available",
            "Wired (macOS vm_stat wired; Linux Unevictable), held by the compressor (Linux: "
            "zswap) and available to new work.",
            targets(
                (gauge("memory_wired_bytes"), "wired"),
                (gauge("memory_compressed_bytes"), "compressed"),
                (gauge("memory_available_bytes"), "available"),
            ),
            "bytes",
        ),
        graph(
            "Engine memory (RSS)",
            "Resident memory of each engine process on this node.",
            targets((rss, "{{model}} {{tier}}")),
            "bytes",
        ),
        graph(
            "Prefix cache",
            "KV of finished requests each engine keeps for the next one that starts the same "
            "way, and its budget (part of the engine's size in placement).",
            targets((cached, "{{model}} {{tier}}"), (budget, "{{model}} {{tier}} budget")),
            "bytes",
        ),
        graph(
            "Prefix cache hit ratio",
            "Share of requests that started from a cached prefix.",
            targets((f"{hits} / ({hits} + {misses})", "{{model}} {{tier}}")),
            "percentunit",
        ),
        current(
            "GPU wired limit",
            "The most memory the GPU may wire; none: no separate GPU limit (Linux).",
            targets((gauge("gpu_wired_limit_bytes"), "limit"), instant=True),
            "bytes",
            text=common.BigValueTextMode.VALUE,
            names={0: ("none", "text")},
        ),
        graph(
            "Kernel OOM kills",
            "Kills the kernel made for memory; 2 within 7 days trip the oom trigger "
            "(docs/operations.md).",
            targets((ooms, "OOM kills")),
            w=18,
        ),
    ]
    health = [
        levels(
            "Thermal level",
            f"The OS thermal state: serious moves batch away, critical drains. {UNKNOWN}",
            targets((either_level("mlxfleet_node_thermal_level", NODE), "thermal")),
            THERMAL_NAMES,
        ),
        current(
            "Power source",
            "What powers the node now; on battery, the power trigger moves batch away.",
            targets((source, "{{source}}"), instant=True),
            text=common.BigValueTextMode.NAME,
        ),
        current(
            "Low Power Mode",
            "macOS Low Power Mode; on, the power trigger moves batch away.",
            targets((gauge("low_power_mode"), "low power"), instant=True),
            text=common.BigValueTextMode.VALUE,
            names={0: ("off", "green"), 1: ("on", "orange")},
        ),
        listing(
            "Engine states",
            "Each engine on this node and its state, as the agent reports it.",
            engines,
            w=12,
        ),
        levels(
            "Triggers active",
            "Each trigger on this node: active while it holds.",
            targets((active, "{{trigger}}")),
            ACTIVE_NAMES,
        ),
    ]
    annotations = [
        event_annotation(
            "Trigger events",
            new_events("mlxfleet_trigger_events_total", NODE),
            "{{trigger}} {{event}}",
            ["trigger", "event"],
            "orange",
        ),
        event_annotation(
            "Engine exits",
            new_events("mlxfleet_engine_exits_total", NODE),
            "{{model}} {{tier}} exited: {{reason}}",
            ["model", "tier", "reason"],
            "red",
        ),
    ]
    return build(
        "mlxfleet-node",
        "mlxfleet: node detail",
        "One node's memory, thermal and power state and its engines; trigger firings and "
        "clearings and engine exits as annotations.",
        [("Memory", memory), ("Thermal, power and engines", health)],
        [label_variable("node", "label_values(mlxfleet_node_memory_total_bytes, node)", False)],
        annotations,
    )


def dashboards() -> dict[str, dict[str, Any]]:
    """File name -> dashboard JSON."""
    return {f"{d['uid']}.json": d for d in (fleet(), slo(), node())}


def render(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def _panels(data: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in data.get("panels", []):
        out.append(p)
        out.extend(p.get("panels", []))  # a collapsed row keeps its panels inside
    return out


def panel_queries() -> list[tuple[str, str, str]]:
    """(dashboard uid, panel title, expr) for every panel target."""
    return [
        (d["uid"], p["title"], t["expr"])
        for d in dashboards().values()
        for p in _panels(d)
        for t in p.get("targets", [])
    ]


def annotation_queries() -> list[tuple[str, str, str]]:
    """(dashboard uid, annotation name, expr) for every annotation."""
    return [
        (d["uid"], a["name"], a["expr"])
        for d in dashboards().values()
        for a in d["annotations"]["list"]
    ]


def stale(folder: Path = HERE) -> list[str]:
    """JSON files in `folder` that differ from the generator's output, are missing or extra."""
    wanted = {name: render(d) for name, d in dashboards().items()}
    differ = {n for n, text in wanted.items() if not _reads(folder / n, text)}
    return sorted(differ | {p.name for p in folder.glob("*.json") if p.name not in wanted})


def _reads(path: Path, text: str) -> bool:
    return path.is_file() and path.read_text() == text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a file would change")
    if not parser.parse_args(argv).check:
        for name, data in dashboards().items():
            (HERE / name).write_text(render(data))
        return 0
    names = stale()
    for name in names:
        print(f"dashboards/{name} differs from what dashboards/generate.py writes", file=sys.stderr)
    return 1 if names else 0


if __name__ == "__main__":
    sys.exit(main())

"""Where a benchmark ran: the snapshot of this machine and of the fleet behind the endpoint.

An endpoint is "the fleet" when its GET /ui/status answers the mlxfleet status JSON: then the
knobs come from the coordinator and the server side (chips, versions, RAM, engine RSS, swap)
from its agents' Prometheus /metrics, found through GET /prometheus/targets. Any other
endpoint is taken to run on this machine, which the probe the caller passes in reads
(machine.py). The memory sampled during the run is sampler.py's.
"""

from __future__ import annotations

import asyncio
import json
import logging
import platform
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from coordinator.bench.machine import MachineProbe, process_table, top_processes
from coordinator.bench.results import Snapshot, Workload
from mlxfleet.facts import NodeFacts
from mlxfleet.version import package_version

logger = logging.getLogger(__name__)

HTTP_TIMEOUT_S = 5.0  # one status, targets or agent scrape; a slower one counts as failed
MS_PER_S = 1000
# Engine gauges (agent /metrics, per model and tier) -> the knob names of /admin/v1/tiers.
ENGINE_KNOBS = {
    "mlxfleet_engine_batch_window_seconds": "batch_window_ms",
    "mlxfleet_engine_max_batch_size": "max_batch_size",
    "mlxfleet_engine_max_concurrency": "max_concurrency",
    "mlxfleet_engine_kv_quantization": "kv_bits",
    "mlxfleet_engine_kv_bits": "kv_bits",  # the name in the metrics contract
}
TRIO = ("batch_window_ms", "max_batch_size", "max_concurrency")


# The fleet: coordinator status and agents' metrics
@dataclass(frozen=True, slots=True)
class AgentReading:
    """What one agent's /metrics says about its node and its engines."""

    node: str
    chip: str = ""
    os: str = ""
    mlx_version: str = ""
    mlx_lm_version: str = ""
    ram_bytes: int = 0
    swap_bytes: int = 0
    engine_rss_bytes: int = 0  # all its engines together
    # (model, tier) -> knob -> value in force (batch_window_ms, max_batch_size, ...)
    engines: dict[tuple[str, str], dict[str, int]] = field(default_factory=dict)


def parse_agent_metrics(text: str, node: str) -> AgentReading:
    """An agent's exposition text (node_agent/metrics.py names) as an AgentReading."""
    info: dict[str, str] = {}
    values: dict[str, float] = {}
    rss = 0.0
    engines: dict[tuple[str, str], dict[str, int]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            unit = (s.labels.get("model", ""), s.labels.get("tier", ""))
            if s.name == "mlxfleet_agent_info":
                info = dict(s.labels)
            elif s.name == "mlxfleet_engine_rss_bytes":
                rss += s.value
            elif s.name == "mlxfleet_engine_state":
                engines.setdefault(unit, {})
            elif s.name in ENGINE_KNOBS:
                knob = ENGINE_KNOBS[s.name]
                scale = MS_PER_S if knob == "batch_window_ms" else 1
                engines.setdefault(unit, {})[knob] = round(s.value * scale)
            else:
                values[s.name] = s.value
    return AgentReading(
        node=node,
        chip=info.get("chip", ""),
        os=info.get("os", ""),
        mlx_version=info.get("mlx_version", ""),
        mlx_lm_version=info.get("mlx_lm_version", ""),
        ram_bytes=int(values.get("mlxfleet_node_memory_total_bytes", 0)),
        swap_bytes=int(values.get("mlxfleet_node_swap_used_bytes", 0)),
        engine_rss_bytes=int(rss),
        engines=engines,
    )


async def _get(session: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    timeout = aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S)
    async with session.get(url, timeout=timeout) as reply:
        return reply.status, await reply.text()


async def fleet_status(session: aiohttp.ClientSession, root: str) -> dict[str, Any] | None:
    """The coordinator's GET /ui/status; None when the endpoint is not an mlxfleet gateway."""
    try:
        status, text = await _get(session, f"{root}/ui/status")
        body = json.loads(text) if status == 200 else None
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        logger.debug("%s/ui/status: %s", root, exc)
        return None
    if not isinstance(body, dict) or not isinstance(body.get("tiers"), dict):
        return None
    return body


async def scrape_agents(
    session: aiohttp.ClientSession, root: str
) -> tuple[list[AgentReading], int]:
    """Every agent the coordinator lists as a scrape target, and how many scrapes failed
    (the target list counts as one). Raises nothing for a network failure."""
    try:
        status, text = await _get(session, f"{root}/prometheus/targets")
        if status != 200:
            raise ValueError(f"answered {status}")
        groups = json.loads(text)
        targets = [
            (target, str(group.get("labels", {}).get("node", target)))
            for group in groups
            for target in group["targets"]
        ]
    except (aiohttp.ClientError, TimeoutError, ValueError, TypeError, KeyError) as exc:
        logger.debug("%s/prometheus/targets: %s", root, exc)
        return [], 1

    async def scrape(target: str, node: str) -> AgentReading:
        status, text = await _get(session, f"http://{target}/metrics")
        if status != 200:
            raise ValueError(f"{target}/metrics answered {status}")
        return parse_agent_metrics(text, node)

    answers = await asyncio.gather(*(scrape(t, n) for t, n in targets), return_exceptions=True)
    readings = [a for a in answers if isinstance(a, AgentReading)]
    for answer in answers:
        if not isinstance(answer, AgentReading):
            logger.debug("agent scrape failed: %r", answer)
    return readings, len(answers) - len(readings)


def _in_force(tier_value: Any, engine_values: list[int]) -> int | None:
    """The engines' value when they all agree (a node may run lowered knobs), else the tier's."""
    if len(set(engine_values)) == 1:
        return engine_values[0]
    return tier_value if isinstance(tier_value, int) else None


def serving(agents: list[AgentReading], workload: Workload) -> list[AgentReading]:
    """The agents that run engines of the workload's tier; all of them when none does."""
    return [a for a in agents if any(tier == workload for _, tier in a.engines)] or agents


def fleet_knobs(
    status: dict[str, Any], agents: list[AgentReading], workload: Workload
) -> tuple[dict[str, int | None], dict[str, Any]]:
    """The trio in force, and the knobs to record: the tier's (from /ui/status) and, under
    "engines", what each of the tier's engines reports in force."""
    tier_knobs = status["tiers"].get(workload)
    tier_knobs = dict(tier_knobs) if isinstance(tier_knobs, dict) else {}
    in_tier = [
        (a.node, model, values)
        for a in agents
        for (model, tier), values in sorted(a.engines.items())
        if tier == workload
    ]
    trio = {
        name: _in_force(tier_knobs.get(name), [v[name] for _, _, v in in_tier if name in v])
        for name in TRIO
    }
    engines = [{"node": node, "model": model, **values} for node, model, values in in_tier]
    return trio, {**tier_knobs, "engines": engines}


async def knobs_in_force(
    session: aiohttp.ClientSession, root: str, workload: Workload
) -> dict[str, int | None]:
    """The trio as take_snapshot would record it now, without reading this machine (cheap
    to poll after a sweep change); {} when `root` is not our fleet."""
    root = root.rstrip("/")
    status = await fleet_status(session, root)
    if status is None:
        return {}
    agents, _ = await scrape_agents(session, root)
    return fleet_knobs(status, serving(agents, workload), workload)[0]


async def take_snapshot(
    session: aiohttp.ClientSession,
    root: str,
    workload: Workload,
    probe: MachineProbe | None = None,
) -> Snapshot:
    """The snapshot of one run: this machine (read by `probe`; None: only what the platform
    module says), and the fleet behind `root` (the endpoint without /v1) when it is ours. The
    fleet part covers the nodes that run engines of the `workload` tier (every agent when none
    does); RAM is the smallest of theirs."""
    root = root.rstrip("/")
    facts, rows = await asyncio.gather(_facts(probe), asyncio.to_thread(process_table))
    client_chip = facts.chip if facts else platform.machine()
    client_os = facts.os if facts else platform.platform()
    client_ram = facts.ram_bytes if facts else 0
    status = await fleet_status(session, root)
    if status is None:  # the server is this machine
        chips, oses, ram = _named(client_chip), _named(client_os), client_ram
        mlx, mlx_lm = _named(package_version("mlx")), _named(package_version("mlx-lm"))
        trio: dict[str, int | None] = dict.fromkeys(TRIO)
        knobs: dict[str, Any] = {}
    else:
        agents, failed = await scrape_agents(session, root)
        if failed:
            logger.warning("%d agent scrape(s) failed: the snapshot leaves those nodes out", failed)
        servers = serving(agents, workload)
        trio, knobs = fleet_knobs(status, servers, workload)
        if agents:
            chips = sorted({a.chip for a in servers if a.chip})
            rams = [a.ram_bytes for a in servers if a.ram_bytes]
        else:  # no agent answered: the coordinator's node rows still name the chips
            nodes = [n for n in status.get("nodes", []) if n.get("state") in ("live", "suspect")]
            chips = sorted({str(n["chip"]) for n in nodes if n.get("chip")})
            rams = [int(n["ram_gib"]) * 2**30 for n in nodes if n.get("ram_gib")]
        oses = sorted({a.os for a in servers if a.os})
        mlx = sorted({a.mlx_version for a in servers if a.mlx_version})
        mlx_lm = sorted({a.mlx_lm_version for a in servers if a.mlx_lm_version})
        ram = min(rams, default=0)
    return Snapshot(
        taken_at=time.time(),
        client_host=socket.gethostname(),
        client_os=client_os,
        client_chip=client_chip,
        client_ram_bytes=client_ram,
        fleet=status is not None,
        chips=chips,
        oses=oses,
        mlx_versions=mlx,
        mlx_lm_versions=mlx_lm,
        ram_bytes=ram,
        batch_window_ms=trio["batch_window_ms"],
        max_batch_size=trio["max_batch_size"],
        max_concurrency=trio["max_concurrency"],
        knobs=knobs,
        top_processes=top_processes(rows),
    )


async def _facts(probe: MachineProbe | None) -> NodeFacts | None:
    return await asyncio.to_thread(probe.facts) if probe is not None else None


def _named(value: str) -> list[str]:
    """[value], or [] when it is empty (a version of a package that is not installed)."""
    return [value] if value else []

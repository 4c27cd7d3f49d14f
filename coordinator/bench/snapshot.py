"""Where a benchmark ran: the machine snapshot and the memory sampled during the run.

An endpoint is "the fleet" when its GET /ui/status answers the mlxfleet status JSON: then the
knobs come from the coordinator and the server side (chips, versions, RAM, engine RSS, swap)
from its agents' Prometheus /metrics, found through GET /prometheus/targets. Any other
endpoint is taken to run on this machine, which the node agent's probe reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from coordinator.bench.gates import longest_stretch_s
from coordinator.bench.results import ProcessMemory, Resources, Snapshot, Workload
from mlxfleet.facts import NodeFacts
from mlxfleet.version import package_version
from node_agent.errors import Error as ProbeError
from node_agent.probes import local_probe
from node_agent.probes.base import Probe

logger = logging.getLogger(__name__)

HTTP_TIMEOUT_S = 5.0  # one status, targets or agent scrape; a slower one counts as failed
TOP_PROCESSES = 5
PS_TIMEOUT_S = 5.0
KIB = 1024
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


# This machine's processes
@dataclass(frozen=True, slots=True)
class ProcessRow:
    """One process of this machine's process table."""

    pid: int
    ppid: int
    rss_bytes: int
    name: str


def parse_ps(text: str) -> list[ProcessRow]:
    """Rows of `ps -axo pid=,ppid=,rss=,comm=` (macOS: rss in KiB, comm an executable path)."""
    rows = []
    for line in text.splitlines():
        parts = line.split(None, 3)
        if len(parts) < 4:
            continue
        try:
            pid, ppid, rss_kib = int(parts[0]), int(parts[1]), int(parts[2])
        except ValueError:
            continue
        rows.append(ProcessRow(pid, ppid, rss_kib * KIB, os.path.basename(parts[3].strip())))
    return rows


def linux_processes(proc_root: str = "/proc") -> list[ProcessRow]:
    """Rows from /proc/<pid>/status (Name, PPid, VmRSS); kernel threads have no VmRSS."""
    rows = []
    for status in Path(proc_root).glob("[0-9]*/status"):
        try:
            text = status.read_text(errors="replace")
        except OSError:  # it exited while we looked
            continue
        keyed = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        if "VmRSS" not in keyed:
            continue
        try:
            ppid, rss_kib = int(keyed["PPid"]), int(keyed["VmRSS"].split()[0])
        except (KeyError, ValueError, IndexError):
            continue
        name = keyed.get("Name", "").strip()
        rows.append(ProcessRow(int(status.parent.name), ppid, rss_kib * KIB, name))
    return rows


def process_table(system: str | None = None) -> list[ProcessRow]:
    """This machine's processes (`system`: a sys.platform value); [] where ps fails."""
    if (system if system is not None else sys.platform).startswith("linux"):
        return linux_processes()
    try:
        done = subprocess.run(
            ["ps", "-axo", "pid=,ppid=,rss=,comm="],
            capture_output=True,
            text=True,
            timeout=PS_TIMEOUT_S,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        logger.warning("cannot list processes: %s", exc)
        return []
    return parse_ps(done.stdout)


def top_processes(rows: Iterable[ProcessRow], n: int = TOP_PROCESSES) -> list[ProcessMemory]:
    """The n largest by RSS, largest first (pid breaks ties)."""
    ordered = sorted(rows, key=lambda r: (-r.rss_bytes, r.pid))[:n]
    return [ProcessMemory(r.pid, r.name, r.rss_bytes) for r in ordered]


def tree_rss(rows: Iterable[ProcessRow], pid: int) -> int:
    """RSS of a process and all its descendants; 0 when it is not in the table."""
    table = list(rows)
    children: dict[int, list[ProcessRow]] = {}
    for row in table:
        children.setdefault(row.ppid, []).append(row)
    todo = [r for r in table if r.pid == pid]
    total = 0
    while todo:
        row = todo.pop()
        total += row.rss_bytes
        todo.extend(children.get(row.pid, []))
    return total


def local_facts() -> NodeFacts | None:
    """This machine's probe facts; None on an OS without a probe."""
    try:
        return local_probe().facts()
    except ProbeError as exc:
        logger.warning("cannot read this machine: %s", exc)
        return None


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


async def take_snapshot(session: aiohttp.ClientSession, root: str, workload: Workload) -> Snapshot:
    """The snapshot of one run: this machine, and the fleet behind `root` (the endpoint
    without /v1) when it is ours. The fleet part covers the nodes that run engines of the
    `workload` tier (every agent when none does); RAM is the smallest of theirs."""
    root = root.rstrip("/")
    facts, rows = await asyncio.gather(
        asyncio.to_thread(local_facts), asyncio.to_thread(process_table)
    )
    client_chip = facts.chip if facts else platform.machine()
    client_os = facts.os if facts else platform.platform()
    client_ram = facts.ram_bytes if facts else 0
    status = await fleet_status(session, root)
    if status is None:
        mlx, mlx_lm = package_version("mlx"), package_version("mlx-lm")
        return Snapshot(
            taken_at=time.time(),
            client_host=socket.gethostname(),
            client_os=client_os,
            client_chip=client_chip,
            client_ram_bytes=client_ram,
            fleet=False,
            chips=[client_chip] if client_chip else [],
            oses=[client_os] if client_os else [],
            mlx_versions=[mlx] if mlx else [],
            mlx_lm_versions=[mlx_lm] if mlx_lm else [],
            ram_bytes=client_ram,
            batch_window_ms=None,
            max_batch_size=None,
            max_concurrency=None,
            knobs={},
            top_processes=top_processes(rows),
        )
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
    return Snapshot(
        taken_at=time.time(),
        client_host=socket.gethostname(),
        client_os=client_os,
        client_chip=client_chip,
        client_ram_bytes=client_ram,
        fleet=True,
        chips=chips,
        oses=sorted({a.os for a in servers if a.os}),
        mlx_versions=sorted({a.mlx_version for a in servers if a.mlx_version}),
        mlx_lm_versions=sorted({a.mlx_lm_version for a in servers if a.mlx_lm_version}),
        ram_bytes=min(rams, default=0),
        batch_window_ms=trio["batch_window_ms"],
        max_batch_size=trio["max_batch_size"],
        max_concurrency=trio["max_concurrency"],
        knobs=knobs,
        top_processes=top_processes(rows),
    )


# Memory during the run
def _percent(part: int, whole: int) -> float:
    return 100.0 * part / whole if whole > 0 else 0.0


class ResourceSampler:
    """Samples RSS and swap every `interval_s` while entered (`async with sampler:`).

    Use from the event loop; it owns one background task, started on enter and ended on exit.
    Fleet: per node the sum of its engines' RSS (% of that node's RAM) and its swap; a point
    holds the largest node's values. Local: the RSS of `pid` and its descendants when given,
    else the memory in use (ram_bytes - available), and this machine's swap. A failed sample
    or agent scrape is counted in `failures`; sampling goes on.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        root: str,
        fleet: bool,
        ram_bytes: int,
        swap_limit_bytes: int,
        interval_s: float = 1.0,
        pid: int | None = None,
        *,
        probe: Probe | None = None,
    ) -> None:
        self._session = session
        self._root = root.rstrip("/")
        self._fleet = fleet
        self._ram_bytes = ram_bytes
        self._swap_limit_bytes = swap_limit_bytes
        self._interval_s = interval_s
        self._pid = pid
        self._probe = probe  # this machine's, made on first use (tests pass one)
        self.failures = 0
        self._series: list[tuple[float, int, int]] = []  # (s since enter, rss, swap)
        self._peak_percent = 0.0
        self._t0 = time.monotonic()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> ResourceSampler:
        self._t0 = time.monotonic()
        self._task = asyncio.create_task(self._sample_forever(), name="bench-resources")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    @property
    def samples(self) -> int:
        return len(self._series)

    async def _sample_forever(self) -> None:
        while True:
            began = time.monotonic()
            try:
                await self.sample()
            except Exception as exc:  # one bad sample must not end the run
                self.failures += 1
                logger.debug("resource sample failed: %r", exc)
            await asyncio.sleep(max(0.0, self._interval_s - (time.monotonic() - began)))

    async def sample(self) -> None:
        """Take one sample now (the background task calls this every interval)."""
        t = round(time.monotonic() - self._t0, 3)
        if self._fleet:
            readings, failed = await scrape_agents(self._session, self._root)
            self.failures += failed
            if not readings:
                return
            rss = max(a.engine_rss_bytes for a in readings)
            swap = max(a.swap_bytes for a in readings)
            percent = max(
                _percent(a.engine_rss_bytes, a.ram_bytes or self._ram_bytes) for a in readings
            )
        else:
            rss, swap = await asyncio.to_thread(self._local)
            percent = _percent(rss, self._ram_bytes)
        self._series.append((t, rss, swap))
        self._peak_percent = max(self._peak_percent, percent)

    def _local(self) -> tuple[int, int]:
        """(rss, swap) of this machine now; runs in a thread (the probe and /proc block)."""
        if self._probe is None:
            self._probe = local_probe()
        reading = self._probe.reading()
        if self._pid is not None:
            rss = tree_rss(process_table(), self._pid)
        else:
            rss = max(0, self._ram_bytes - reading.available_bytes)
        return rss, reading.swap_used_bytes

    def result(self) -> Resources | None:
        """What was sampled so far; None before the first good sample. Series times are
        seconds since the sampler was entered."""
        if not self._series:
            return None
        series = list(self._series)
        return Resources(
            source="fleet" if self._fleet else "local",
            samples=len(series),
            rss_peak_bytes=max(rss for _, rss, _ in series),
            rss_peak_percent=self._peak_percent,
            swap_peak_bytes=max(swap for _, _, swap in series),
            swap_over_limit_s=longest_stretch_s(series, self._swap_limit_bytes) or 0.0,
            series=series,
        )

"""The bench snapshot and resource sampler, over real HTTP on 127.0.0.1.

The fleet is the real gateway app (its /ui/status, /prometheus/targets and admin API over the
real registry, reconciler and store) and real agent /metrics servers (AgentMetrics). Only
the agents' engines (a supervisor that reports given engines) and the agents' OS readings are
test doubles. The local path reads this machine for real, through the Linux probe passed in.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from coordinator.bench import snapshot as snapshot_module
from coordinator.bench.gates import MIB
from coordinator.bench.machine import (
    ProcessRow,
    linux_processes,
    parse_ps,
    top_processes,
    tree_rss,
)
from coordinator.bench.results import ProcessMemory
from coordinator.bench.sampler import ResourceSampler
from coordinator.bench.snapshot import parse_agent_metrics, take_snapshot
from coordinator.catalog import Catalog
from coordinator.config import Config, ModelSpec
from coordinator.gateway.app import Gateway
from coordinator.pki import FleetPki
from coordinator.reconcile import Reconciler
from coordinator.registry import NodeId, Registry
from coordinator.routing import Routing
from coordinator.store import Store
from mlxfleet.facts import NodeFacts
from mlxfleet.facts import NodeFacts as CoordinatorFacts
from mlxfleet.tiers import DEFAULT_KNOBS
from mlxfleet.version import package_version
from node_agent.metrics import AgentMetrics
from node_agent.probes.base import NodeReading
from node_agent.probes.linux import LinuxProbe
from node_agent.supervisor import EngineInfo, Supervisor

GIB = 2**30
ADMIN_TOKEN = "bench-admin-token-3c9d"
READING = NodeReading(
    available_bytes=10 * GIB,
    swap_used_bytes=0,
    wired_bytes=GIB,
    compressed_bytes=0,
    memory_pressure="normal",
    thermal_state="nominal",
    power_source="ac",
    low_power_mode=False,
    oom_kills=0,
)


class Engines(Supervisor):
    """A supervisor that reports the engines it is given (no engine process): their RSS and
    the stats JSON each would answer on GET /v1/engine/stats."""

    def __init__(self, log_dir: Path) -> None:
        super().__init__(LinuxProbe(), lambda event: None, log_dir)
        self.engines: dict[str, tuple[EngineInfo, int, dict[str, Any]]] = {}

    def add(
        self, engine_id: str, model: str, tier: str, rss: int, window_ms: int, **knobs: int
    ) -> None:
        knobs["batch_window_ms"] = window_ms
        stats = {
            "queued": 0,
            "active": 1,
            "kv_bits": knobs.pop("kv_bits", 16),
            "requests_total": 5,
            "generated_tokens_total": 100,
            "knobs": knobs,
        }
        self.engines[engine_id] = (EngineInfo(engine_id, model, tier, "ready"), rss, stats)

    def infos(self) -> list[EngineInfo]:
        return [info for info, _, _ in self.engines.values()]

    def rss(self) -> dict[str, tuple[Any, int, int]]:
        return {eid: (info.state, rss, 0) for eid, (info, rss, _) in self.engines.items()}

    async def engine_request(
        self, engine_id: str, method: str, path: str, body: Any = None, timeout_s: float = 1.0
    ) -> tuple[int, str] | None:
        assert (method, path) == ("GET", "/v1/engine/stats")
        return 200, json.dumps(self.engines[engine_id][2])


class FixedProbe(LinuxProbe):
    """This machine's probe, except that reading() returns a set reading."""

    def reading(self) -> NodeReading:
        return READING


@dataclass
class Agent:
    """One real agent /metrics server."""

    node: str
    metrics: AgentMetrics
    engines: Engines
    port: int

    def read(self, **changes: int) -> None:
        """What a heartbeat hands over: a new reading."""
        self.metrics.note_reading(replace(READING, **changes))


@dataclass
class Fleet:
    """The gateway and its agents, all on 127.0.0.1."""

    root: str
    home: Path
    reconciler: Reconciler
    registry: Registry
    agents: dict[str, Agent]
    requests: list[tuple[str, str, str, Any]]  # (method, path, Authorization, JSON body)


async def start_agent(tmp_path: Path, node: str, chip: str, ram: int) -> Agent:
    facts = NodeFacts(node, chip, "macOS 15.1", ram, 8, 19, 200.0, 0, "server")
    engines = Engines(tmp_path / node)
    metrics = AgentMetrics(facts, FixedProbe(), engines, connected=lambda: True)
    port = await metrics.start("127.0.0.1", 0)
    agent = Agent(node, metrics, engines, port)
    agent.read()
    return agent


@contextlib.asynccontextmanager
async def running_fleet(tmp_path: Path) -> AsyncIterator[Fleet]:
    """The real gateway app with two nodes whose agents serve /metrics:
    mini-1 (Apple M2 Pro, 32 GiB) runs demo/interactive at a 25 ms window, 8-bit KV;
    mini-2 (Apple M4, 16 GiB) runs demo/interactive at a 50 ms window and demo/batch."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "admin_token").write_text(ADMIN_TOKEN + "\n")
    routing = Routing(FleetPki.load_or_create(home).ca_cert_pem)
    registry = Registry(routing)
    store = Store(home / "s.sqlite3")
    models = (ModelSpec("demo", str(tmp_path)), ModelSpec("demo", str(tmp_path), tier="batch"))
    config = Config(home=home, models=models)
    reconciler = Reconciler(config, registry, store)
    agents = {
        "mini-1": await start_agent(tmp_path, "mini-1", "Apple M2 Pro", 32 * GIB),
        "mini-2": await start_agent(tmp_path, "mini-2", "Apple M4", 16 * GIB),
    }
    one = dict(max_concurrency=2, max_batch_size=2)
    batch = dict(max_concurrency=12, max_batch_size=12)
    agents["mini-1"].engines.add("e1", "demo", "interactive", 20 * GIB, 25, kv_bits=8, **one)
    agents["mini-2"].engines.add("e2", "demo", "interactive", 2 * GIB, 50, **one)
    agents["mini-2"].engines.add("e3", "demo", "batch", 2 * GIB, 80, **batch)
    for agent in agents.values():
        facts = CoordinatorFacts(agent.node, "", "", 0, 8, 0, 0.0, 0, "server")
        registry.connect(NodeId(agent.node), facts, [])
        registry.nodes[NodeId(agent.node)].metrics_target = f"127.0.0.1:{agent.port}"
    requests: list[tuple[str, str, str, Any]] = []

    @web.middleware
    async def record(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path.startswith("/admin/"):
            body = await request.json() if request.can_read_body else None
            auth = request.headers.get("Authorization", "")
            requests.append((request.method, request.path, auth, body))
        return await handler(request)

    catalog = Catalog(config, store, reconciler, routing)
    app = Gateway(config, store, routing, registry, reconciler, catalog, ADMIN_TOKEN).app()
    app.middlewares.insert(0, record)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    root = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield Fleet(root, home, reconciler, registry, agents, requests)
    finally:
        await runner.cleanup()
        for agent in agents.values():
            await agent.metrics.stop()


async def wait_until(check: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def meminfo(proc: Path = Path("/proc")) -> dict[str, int]:
    """/proc/meminfo in bytes."""
    lines = (proc / "meminfo").read_text().splitlines()
    return {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in lines)}


ENGINE = {"max_batch_size": 2, "max_concurrency": 2, "kv_bits": 16}
linux_only = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")


# The snapshot of our fleet
async def test_fleet_snapshot_reads_the_knobs_in_force_and_the_serving_agents(
    tmp_path: Path,
) -> None:
    versions = [package_version("mlx")], [package_version("mlx-lm")]
    async with running_fleet(tmp_path) as fleet, aiohttp.ClientSession() as session:
        fleet.reconciler.set_tier_knobs("interactive", {"batch_window_ms": 40})
        snap = await take_snapshot(session, fleet.root + "/", "interactive")
        assert snap.fleet
        # Both nodes run interactive engines: both show; RAM is the smaller node's.
        assert snap.chips == ["Apple M2 Pro", "Apple M4"]
        assert snap.oses == ["macOS 15.1"]
        assert (snap.mlx_versions, snap.mlx_lm_versions) == versions
        assert snap.ram_bytes == 16 * GIB
        # The engines disagree on the window (25, 50 ms): the tier's 40 ms is the trio's;
        # they agree on 2 slots, which the tier (4) does not have: that is what is in force.
        assert (snap.batch_window_ms, snap.max_batch_size, snap.max_concurrency) == (40, 2, 2)
        assert snap.knobs == {
            "max_concurrency": 4,
            "batch_window_ms": 40,
            "max_batch_size": 4,
            "queue_limit": 64,
            "engines": [
                {"node": "mini-1", "model": "demo", **ENGINE, "batch_window_ms": 25, "kv_bits": 8},
                {"node": "mini-2", "model": "demo", **ENGINE, "batch_window_ms": 50},
            ],
        }

        snap = await take_snapshot(session, fleet.root, "batch", probe=LinuxProbe())
        assert (snap.chips, snap.ram_bytes) == (["Apple M4"], 16 * GIB)  # only mini-2 serves
        assert (snap.batch_window_ms, snap.max_batch_size, snap.max_concurrency) == (80, 12, 12)
        assert snap.knobs["queue_limit"] == DEFAULT_KNOBS["batch"].queue_limit
    # The client side is this machine, whatever the endpoint.
    assert snap.client_ram_bytes == LinuxProbe().facts().ram_bytes
    assert snap.client_chip == LinuxProbe().facts().chip
    assert snap.top_processes and len(snap.top_processes) <= 5


async def test_fleet_snapshot_without_reachable_agents_names_chips_from_the_coordinator(
    tmp_path: Path,
) -> None:
    async with running_fleet(tmp_path) as fleet, aiohttp.ClientSession() as session:
        for agent in fleet.agents.values():
            await agent.metrics.stop()  # the client cannot reach the agents' metrics port
        fleet.registry.nodes[NodeId("mini-1")].facts = CoordinatorFacts(
            "mini-1", "Apple M2 Pro", "macOS", 32 * GIB, 8, 0, 0.0, 0, "server"
        )
        snap = await take_snapshot(session, fleet.root, "interactive")
    assert snap.fleet
    assert (snap.chips, snap.ram_bytes) == (["Apple M2 Pro"], 32 * GIB)
    assert snap.mlx_versions == []
    # No engine answered: the trio is the tier's.
    knobs = DEFAULT_KNOBS["interactive"]
    assert (snap.batch_window_ms, snap.max_batch_size, snap.max_concurrency) == (
        knobs.batch_window_ms,
        knobs.max_batch_size,
        knobs.max_concurrency,
    )
    assert snap.knobs["engines"] == []


# Not our fleet: this machine
@linux_only
async def test_other_endpoints_snapshot_this_machine() -> None:
    """A stand-in OpenAI server (no /ui/status), then nothing listening at all."""

    async def models(_: web.Request) -> web.Response:
        return web.json_response({"data": []})

    async def page(_: web.Request) -> web.Response:
        return web.Response(text="<html>not ours</html>", content_type="text/html")

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_get("/ui/status", page)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    facts = LinuxProbe().facts()
    try:
        async with aiohttp.ClientSession() as session:
            snap = await take_snapshot(
                session, f"http://127.0.0.1:{port}", "interactive", probe=LinuxProbe()
            )
    finally:
        await runner.cleanup()
    assert not snap.fleet
    assert snap.ram_bytes == snap.client_ram_bytes == meminfo()["MemTotal"]
    assert snap.chips == [facts.chip] and snap.client_chip == facts.chip
    assert snap.oses == [facts.os]
    assert snap.mlx_versions == [package_version("mlx")]
    assert snap.mlx_lm_versions == [package_version("mlx-lm")]
    assert (snap.batch_window_ms, snap.max_batch_size, snap.max_concurrency) == (None,) * 3
    assert snap.knobs == {}
    assert abs(snap.taken_at - time.time()) < 60
    async with aiohttp.ClientSession() as session:
        snap = await take_snapshot(session, f"http://127.0.0.1:{port}", "batch")  # closed now
    assert not snap.fleet


# Memory during the run, from the fleet
async def test_fleet_sampler_takes_the_largest_node_and_survives_a_failed_scrape(
    tmp_path: Path,
) -> None:
    async with running_fleet(tmp_path) as fleet, aiohttp.ClientSession() as session:
        one, two = fleet.agents["mini-1"], fleet.agents["mini-2"]
        sampler = ResourceSampler(session, fleet.root, True, 0, swap_limit_bytes=GIB)
        assert sampler.result() is None
        one.read(swap_used_bytes=GIB // 2)
        two.read(swap_used_bytes=3 * GIB)
        await sampler.sample()
        # mini-2's engines grow to 14 GiB of its 16: the percent peak is mini-2's 87.5 %,
        # the byte peak stays mini-1's 20 GiB (62.5 % of 32 GiB).
        two.engines.add(
            "e2", "demo", "interactive", 12 * GIB, 50, max_concurrency=2, max_batch_size=2
        )
        two.read(swap_used_bytes=GIB)
        await sampler.sample()
        await two.metrics.stop()  # one agent fails: counted, the other still sampled
        await sampler.sample()
        result = sampler.result()
        assert result is not None
        assert sampler.failures == 1
        assert result.source == "fleet"
        assert result.samples == 3
        assert [(rss, swap) for _, rss, swap in result.series] == [
            (20 * GIB, 3 * GIB),
            (20 * GIB, GIB),
            (20 * GIB, GIB // 2),
        ]
        assert result.rss_peak_bytes == 20 * GIB
        assert result.rss_peak_percent == 87.5
        assert result.swap_peak_bytes == 3 * GIB
        assert result.swap_over_limit_s == 0.0  # only the first sample is above 1 GiB
        times = [t for t, _, _ in result.series]
        assert times == sorted(times) and times[0] >= 0.0


async def test_the_sampler_runs_in_the_background_and_keeps_going_when_all_fail(
    tmp_path: Path,
) -> None:
    async with running_fleet(tmp_path) as fleet, aiohttp.ClientSession() as session:
        sampler = ResourceSampler(session, fleet.root, True, 0, 768 * MIB, interval_s=0.01)
        async with sampler:
            await wait_until(lambda: sampler.samples >= 3, "3 samples")
            for agent in fleet.agents.values():
                await agent.metrics.stop()
            failed = sampler.failures
            await wait_until(lambda: sampler.failures >= failed + 6, "3 failed rounds")
        assert not any(t.get_name() == "bench-resources" for t in asyncio.all_tasks())
        result = sampler.result()
        assert result is not None and result.samples >= 3
        assert result.rss_peak_percent == 62.5  # 20 of 32 GiB; mini-2: 4 of 16 (25 %)
        times = [t for t, _, _ in result.series]
        assert times == sorted(times)
    # Against an endpoint with nothing behind it: no sample, only failures.
    async with aiohttp.ClientSession() as session:
        sampler = ResourceSampler(session, fleet.root, True, 0, 0, interval_s=0.01)
        async with sampler:
            await wait_until(lambda: sampler.failures >= 3, "3 failures")
        assert sampler.result() is None


# Memory during the run, from this machine
@linux_only
async def test_local_sampler_reads_meminfo(tmp_path: Path) -> None:
    """Exactly, on a copy of this machine's /proc/meminfo; then on the live file."""
    proc = tmp_path / "proc"
    proc.mkdir()
    shutil.copy("/proc/meminfo", proc / "meminfo")
    frozen = meminfo(proc)
    ram = frozen["MemTotal"]
    async with aiohttp.ClientSession() as session:
        sampler = ResourceSampler(
            session, "http://unused", False, ram, 0, probe=LinuxProbe(proc_root=str(proc))
        )
        await sampler.sample()
        result = sampler.result()
        assert result is not None and result.source == "local"
        used = ram - frozen["MemAvailable"]
        swap = frozen["SwapTotal"] - frozen["SwapFree"]
        assert [(rss, s) for _, rss, s in result.series] == [(used, swap)]
        assert result.rss_peak_percent == 100.0 * used / ram
        # The live file: the same numbers give or take what moved between the two reads.
        live = ResourceSampler(session, "http://unused", False, ram, 0, probe=LinuxProbe())
        await live.sample()
        now = meminfo()
        result = live.result()
        assert result is not None
        _, rss, swap = result.series[0]
        assert abs(rss - (ram - now["MemAvailable"])) < 256 * MIB
        assert abs(swap - (now["SwapTotal"] - now["SwapFree"])) < 256 * MIB


@linux_only
async def test_local_sampler_with_a_pid_takes_its_process_tree() -> None:
    """A real parent (sh) and child (sleep): their VmRSS, summed."""
    parent = subprocess.Popen(["sh", "-c", "sleep 60 & wait"])
    try:
        await wait_until(lambda: any(r.ppid == parent.pid for r in linux_processes()), "sleep")
        rows = {r.pid: r for r in linux_processes()}
        child = next(r for r in rows.values() if r.ppid == parent.pid)
        assert child.name == "sleep"
        vmrss = {
            pid: int(Path(f"/proc/{pid}/status").read_text().split("VmRSS:")[1].split()[0]) * 1024
            for pid in (parent.pid, child.pid)
        }
        assert rows[parent.pid].rss_bytes == vmrss[parent.pid]
        assert rows[child.pid].rss_bytes == vmrss[child.pid]
        async with aiohttp.ClientSession() as session:
            sampler = ResourceSampler(
                session, "http://unused", False, 2**40, 0, pid=parent.pid, probe=LinuxProbe()
            )
            await sampler.sample()
        result = sampler.result()
        assert result is not None
        assert result.rss_peak_bytes == sum(vmrss.values())
        assert result.rss_peak_percent == 100.0 * sum(vmrss.values()) / 2**40
    finally:
        parent.kill()
        parent.wait()


# The process table
@linux_only
def test_linux_processes_are_proc_status() -> None:
    rows = {r.pid: r for r in linux_processes()}
    me = rows[os.getpid()]
    assert me.name == Path("/proc/self/comm").read_text().strip()
    assert me.ppid == os.getppid()
    assert me.rss_bytes > 0
    assert all(r.rss_bytes >= 0 for r in rows.values())
    top = top_processes(rows.values())
    assert len(top) == min(5, len(rows))
    largest = sorted((r.rss_bytes for r in rows.values()), reverse=True)[:5]
    assert [p.rss_bytes for p in top] == largest


def test_top_processes_and_tree_rss() -> None:
    rows = [
        ProcessRow(1, 0, 10, "init"),
        ProcessRow(20, 1, 500, "engine"),
        ProcessRow(21, 20, 70, "helper"),
        ProcessRow(22, 21, 30, "grandchild"),
        ProcessRow(30, 1, 500, "browser"),
        ProcessRow(40, 1, 80, "editor"),
    ]
    assert top_processes(rows, 3) == [
        ProcessMemory(20, "engine", 500),
        ProcessMemory(30, "browser", 500),  # ties: lower pid first
        ProcessMemory(40, "editor", 80),
    ]
    assert tree_rss(rows, 20) == 600
    assert tree_rss(rows, 22) == 30
    assert tree_rss(rows, 99) == 0


# A hand-written sample of `ps -axo pid=,ppid=,rss=,comm=` in the format ps(1) documents on
# macOS (right-aligned numbers, rss in KiB, comm the executable's path, which may hold
# spaces) -- written for this test, not captured from a Mac.
PS_SAMPLE = """\
    1     0  14256 /sbin/launchd
  312     1   5120 /usr/libexec/logd
  845     1 1843200 /Applications/Google Chrome.app/Contents/MacOS/Google Chrome
  901   845  402112 /Applications/Google Chrome.app/Contents/Frameworks/Google Chrome Helper (Renderer)
 1203     1 9437184 /Users/dev/.venv/bin/python3.11
garbage line
"""  # noqa: E501


def test_parse_ps_reads_the_macos_format() -> None:
    rows = parse_ps(PS_SAMPLE)
    assert rows == [
        ProcessRow(1, 0, 14256 * 1024, "launchd"),
        ProcessRow(312, 1, 5120 * 1024, "logd"),
        ProcessRow(845, 1, 1843200 * 1024, "Google Chrome"),
        ProcessRow(901, 845, 402112 * 1024, "Google Chrome Helper (Renderer)"),
        ProcessRow(1203, 1, 9437184 * 1024, "python3.11"),
    ]
    assert [p.pid for p in top_processes(rows, 2)] == [1203, 845]
    assert tree_rss(rows, 845) == (1843200 + 402112) * 1024


def test_parse_agent_metrics_sums_engines_and_reads_knobs() -> None:
    text = """\
# TYPE mlxfleet_agent_info gauge
mlxfleet_agent_info{agent_version="0.1.0",chip="Apple M2 Pro",mlx_lm_version="0.32.2",mlx_version="0.32.4",os="macOS 15.1"} 1.0
# TYPE mlxfleet_node_memory_total_bytes gauge
mlxfleet_node_memory_total_bytes 3.4359738368e+010
# TYPE mlxfleet_node_swap_used_bytes gauge
mlxfleet_node_swap_used_bytes 1.073741824e+09
# TYPE mlxfleet_engine_rss_bytes gauge
mlxfleet_engine_rss_bytes{model="a",tier="interactive"} 1.0e+09
mlxfleet_engine_rss_bytes{model="b",tier="batch"} 2.5e+09
# TYPE mlxfleet_engine_batch_window_seconds gauge
mlxfleet_engine_batch_window_seconds{model="a",tier="interactive"} 0.025
# TYPE mlxfleet_engine_kv_bits gauge
mlxfleet_engine_kv_bits{model="a",tier="interactive"} 4.0
"""  # noqa: E501
    agent = parse_agent_metrics(text, "mini-1")
    assert agent == snapshot_module.AgentReading(
        node="mini-1",
        chip="Apple M2 Pro",
        os="macOS 15.1",
        mlx_version="0.32.4",
        mlx_lm_version="0.32.2",
        ram_bytes=32 * GIB,
        swap_bytes=GIB,
        engine_rss_bytes=3_500_000_000,
        engines={("a", "interactive"): {"batch_window_ms": 25, "kv_bits": 4}},
    )

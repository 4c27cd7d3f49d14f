"""The agent's GET /metrics, scraped over real HTTP on 127.0.0.1.

Only the OS readings are a test double (a Mac's numbers on this Linux machine); the server,
the supervisor and, where named, a real engine process with the demo model are real.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from mlxfleet.facts import NodeFacts
from mlxfleet.version import package_version
from node_agent import metrics as metrics_module
from node_agent.agent import Agent, AgentConfig
from node_agent.coordinator_client import Session
from node_agent.errors import AgentError
from node_agent.groups import GroupRole
from node_agent.metrics import AgentMetrics, GroupStatsView, parse_stats
from node_agent.probes.base import NodeReading
from node_agent.probes.linux import LinuxProbe
from node_agent.rank_link import Member
from node_agent.supervisor import EngineEvent, LoadRequest, Supervisor
from tests.metrics_contract import ENGINE_STATS_METRICS, GROUP_RANK_METRICS
from tests.node_agent.test_file_server import Certs, make_certs
from tests.node_agent.test_rank_link import make_link

GIB = 2**30
PROMTOOL = "/usr/bin/promtool"
ENGINE_READY_S = 120.0  # cold start on 2 cores: imports, model load, kernel compile
FACTS = NodeFacts(
    hostname="mini",
    chip="Apple M2 Pro",
    os="macOS 15.1",
    ram_bytes=32 * GIB,
    performance_cores=8,
    gpu_cores=19,
    memory_bandwidth_gbps=200.0,
    gpu_wired_limit_bytes=24 * GIB,
    role="server",
)
READING = NodeReading(
    available_bytes=20 * GIB,
    swap_used_bytes=3 * GIB,
    wired_bytes=5 * GIB,
    compressed_bytes=2 * GIB,
    memory_pressure="warning",
    thermal_state="serious",
    power_source="battery",
    low_power_mode=True,
    oom_kills=3,
)
KNOBS = {"max_concurrency": 2, "batch_window_ms": 25, "max_batch_size": 3, "queue_limit": 8}
GROUP_STALL_S = 10.0  # a rank stuck this long in a collective exits (a busy 2-core box)
# An engine's GET /v1/engine/stats, as node_agent/engine/server.py answers (fields we read),
# and a rank's `group` block in it (node_agent/engine/group.py, Rank.stats).
STATS = {
    "queued": 0,
    "active": 0,
    "knobs": {"max_batch_size": 4, "batch_window_ms": 0, "max_concurrency": 4},
    "kv_bits": 16,
    "requests_total": 0,
    "generated_tokens_total": 0,
    "prefix_cache": None,
    "group": None,
}
RANK_STATS = {
    "group_id": "g-1",
    "rank": 1,
    "size": 2,
    "first_layer": 0,
    "layers": 3,
    "steps": 12,
    "step_seconds_total": 0.25,
    "control_bytes_sent": 0,
}


class FixedReadings(LinuxProbe):
    """This machine's probe, except that reading() returns a set reading and counts calls."""

    def __init__(self, reading: NodeReading) -> None:
        super().__init__()
        self.value = reading
        self.calls = 0

    def reading(self) -> NodeReading:
        self.calls += 1
        return self.value


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample as (name, labels) -> value."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def names(samples: Samples) -> set[str]:
    return {name for name, _ in samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[name, frozenset(labels.items())]


async def scrape(port: int) -> httpx.Response:
    async with httpx.AsyncClient() as client:
        reply = await client.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    assert reply.status_code == 200
    assert reply.headers["content-type"] == CONTENT_TYPE_LATEST
    return reply


def promtool_check(text: str) -> None:
    """`promtool check metrics` parses the exposition and finds no lint problem."""
    if not os.path.exists(PROMTOOL):
        print(f"SKIP: {PROMTOOL} is not installed: cannot check the exposition")
        pytest.skip(f"{PROMTOOL} is not installed: cannot check the exposition")
    done = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture
def probe() -> FixedReadings:
    return FixedReadings(READING)


@pytest.fixture
def supervisor(tmp_path: Path, probe: FixedReadings) -> Supervisor:
    return Supervisor(probe, lambda event: None, tmp_path / "logs")


@pytest.fixture
async def served(probe: FixedReadings, supervisor: Supervisor) -> AsyncIterator[int]:
    """AgentMetrics on 127.0.0.1, a free port; yields that port."""
    agent_metrics = AgentMetrics(FACTS, probe, supervisor, connected=lambda: True)
    port = await agent_metrics.start("127.0.0.1", 0)
    yield port
    await agent_metrics.stop()


async def test_node_metrics_have_the_readings_values(served: int, probe: FixedReadings) -> None:
    text = (await scrape(served)).text
    samples = parse(text)
    versions = {
        "mlx_version": package_version("mlx"),
        "mlx_lm_version": package_version("mlx-lm"),
        "agent_version": package_version("mlxfleet"),
    }
    assert value(samples, "mlxfleet_agent_info", chip="Apple M2 Pro", os="macOS 15.1", **versions)
    assert value(samples, "mlxfleet_node_memory_total_bytes") == 32 * GIB
    assert value(samples, "mlxfleet_node_memory_available_bytes") == 20 * GIB
    assert value(samples, "mlxfleet_node_memory_wired_bytes") == 5 * GIB
    assert value(samples, "mlxfleet_node_memory_compressed_bytes") == 2 * GIB
    assert value(samples, "mlxfleet_node_swap_used_bytes") == 3 * GIB
    assert value(samples, "mlxfleet_node_memory_pressure_level") == 1  # warning
    assert value(samples, "mlxfleet_node_thermal_level") == 2  # serious
    assert value(samples, "mlxfleet_node_power_source", source="battery") == 1
    assert value(samples, "mlxfleet_node_low_power_mode") == 1
    assert value(samples, "mlxfleet_node_gpu_wired_limit_bytes") == 24 * GIB
    assert value(samples, "mlxfleet_node_oom_kills_total") == 3
    assert value(samples, "mlxfleet_agent_connected") == 1
    # No engines: no engine series; the node label comes from service discovery, not us.
    assert not {n for n in names(samples) if n.startswith(("mlxfleet_engine_", "mlxfleet_group_"))}
    assert all("node" not in dict(labels) for _, labels in samples)
    assert probe.calls == 1  # the first scrape reads once; the second uses that reading
    await scrape(served)
    assert probe.calls == 1
    promtool_check(text)


async def test_heartbeat_readings_are_used_and_unknown_levels_are_absent(
    probe: FixedReadings, supervisor: Supervisor, monkeypatch: pytest.MonkeyPatch
) -> None:
    connected = False
    agent_metrics = AgentMetrics(FACTS, probe, supervisor, connected=lambda: connected)
    port = await agent_metrics.start("127.0.0.1", 0)
    try:
        unknown = replace(
            READING, memory_pressure="unknown", thermal_state="unknown", power_source="unknown"
        )
        agent_metrics.note_reading(unknown)  # what the heartbeat hands over
        samples = parse((await scrape(port)).text)
        assert probe.calls == 0
        assert "mlxfleet_node_memory_pressure_level" not in names(samples)
        assert "mlxfleet_node_thermal_level" not in names(samples)
        assert value(samples, "mlxfleet_node_power_source", source="unknown") == 1
        assert value(samples, "mlxfleet_agent_connected") == 0
        # No heartbeat for a while (no session): a scrape reads the probe itself.
        monkeypatch.setattr(metrics_module, "READING_MAX_AGE_S", 0.0)
        connected = True
        samples = parse((await scrape(port)).text)
        assert probe.calls == 1
        assert value(samples, "mlxfleet_node_memory_pressure_level") == 1
        assert value(samples, "mlxfleet_agent_connected") == 1
    finally:
        await agent_metrics.stop()


async def test_model_file_metrics_show_the_store(
    tmp_path: Path, served: int, supervisor: Supervisor
) -> None:
    """Bytes held (a folder used in place counts), the room for more, and bytes copied by
    origin: both origins from the start, at 0 before any copy."""
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"\0" * 1000)
    supervisor.store.budget_bytes = 64 * 2**20
    await supervisor.store.ensure(str(folder))
    await supervisor.store.settle()
    text = (await scrape(served)).text
    samples = parse(text)
    assert value(samples, "mlxfleet_agent_model_files_bytes") == 1002
    assert value(samples, "mlxfleet_agent_disk_room_bytes") == 64 * 2**20  # in place: not counted
    assert value(samples, "mlxfleet_agent_copy_bytes_total", origin="peer") == 0
    assert value(samples, "mlxfleet_agent_copy_bytes_total", origin="hub") == 0
    promtool_check(text)


async def wait_ready(events: list[EngineEvent]) -> None:
    deadline = time.monotonic() + ENGINE_READY_S
    while not any(e.kind in ("ready", "load_failed") for e in events):
        assert time.monotonic() < deadline, "the demo engine never became ready"
        await asyncio.sleep(0.1)
    assert [e.kind for e in events] == ["started", "ready"], events


async def test_engine_metrics_from_a_real_engine(tmp_path: Path, demo_model: Path) -> None:
    """Needs a real engine process: its stats answer is what the gauges show; a stopped
    (SIGSTOP) engine loses its stats gauges for that scrape but never fails it."""
    events: list[EngineEvent] = []
    probe = FixedReadings(READING)
    supervisor = Supervisor(probe, events.append, tmp_path / "logs")
    agent_metrics = AgentMetrics(FACTS, probe, supervisor, connected=lambda: True)
    port = await agent_metrics.start("127.0.0.1", 0)
    try:
        await supervisor.load(LoadRequest("e1", "demo", str(demo_model), "batch", 512, KNOBS))
        await wait_ready(events)
        [info] = supervisor.infos()
        body = {"model": "demo", "prompt": "Once upon", "max_tokens": 3, "temperature": 0}
        reply = await supervisor.engine_request("e1", "POST", "/v1/completions", body)
        assert reply is not None and reply[0] == 200, reply
        generated = json.loads(reply[1])["usage"]["completion_tokens"]
        assert generated >= 1

        text = (await scrape(port)).text
        samples = parse(text)
        unit = {"model": "demo", "tier": "batch"}
        assert value(samples, "mlxfleet_engine_state", state="ready", **unit) == 1
        assert value(samples, "mlxfleet_engine_rss_bytes", **unit) > 50 * 2**20
        assert value(samples, "mlxfleet_engine_queue_depth", **unit) == 0
        assert value(samples, "mlxfleet_engine_batch_size", **unit) == 0
        assert value(samples, "mlxfleet_engine_max_batch_size", **unit) == 3
        assert value(samples, "mlxfleet_engine_batch_window_seconds", **unit) == 0.025
        assert value(samples, "mlxfleet_engine_max_concurrency", **unit) == 2
        assert value(samples, "mlxfleet_engine_kv_quantization", **unit) == 16
        assert value(samples, "mlxfleet_engine_requests_total", **unit) == 1
        assert value(samples, "mlxfleet_engine_generation_tokens_total", **unit) == generated
        assert info.secret and info.secret not in text
        assert not GROUP_RANK_METRICS & names(samples)  # a whole model is no group's rank
        promtool_check(text)

        os.kill(info.pid, signal.SIGSTOP)  # alive, listening, answering nothing
        try:
            started = time.monotonic()
            stopped = parse((await scrape(port)).text)
            assert time.monotonic() - started < 5  # the ~1 s stats timeout, not the client's
        finally:
            os.kill(info.pid, signal.SIGCONT)
        assert value(stopped, "mlxfleet_engine_state", state="ready", **unit) == 1
        assert value(stopped, "mlxfleet_engine_rss_bytes", **unit) > 50 * 2**20
        assert not ENGINE_STATS_METRICS & names(stopped)
        assert value(stopped, "mlxfleet_node_memory_available_bytes") == 20 * GIB
    finally:
        await supervisor.stop_all()
        await agent_metrics.stop()


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


def group_load(rank: int, members: tuple[Member, ...], model: Path) -> LoadRequest:
    """Rank `rank` of group g-1: the 2-layer demo model, a layer each."""
    role = GroupRole("g-1", rank, members, (1, 1), GROUP_STALL_S)
    engine_id = "g-1" if rank == 0 else f"g-1-r{rank}"
    return LoadRequest(engine_id, "demo", str(model), "interactive", 512, KNOBS, group=role)


async def test_group_metrics_from_a_real_group(
    tmp_path: Path, demo_model: Path, certs: Certs
) -> None:
    """Needs two real rank processes: the demo model as a group of two on two agents'
    supervisors and rank links (real mutual TLS on 127.0.0.1). Each agent shows its own rank's
    layers, memory and steps, and the group's bytes through its link; rank 1 serves nothing."""
    nodes = ("node-a", "node-b")
    links = {n: make_link(certs, n) for n in nodes}
    link_ports = [await links[n].start() for n in nodes]
    members = tuple(Member(r, n, f"127.0.0.1:{link_ports[r]}") for r, n in enumerate(nodes))
    probe = FixedReadings(READING)
    events: dict[str, list[EngineEvent]] = {n: [] for n in nodes}
    supervisors = {
        n: Supervisor(probe, events[n].append, tmp_path / n / "logs", link=links[n]) for n in nodes
    }
    served = {n: AgentMetrics(FACTS, probe, supervisors[n], lambda: True) for n in nodes}
    ports = {n: await served[n].start("127.0.0.1", 0) for n in nodes}
    unit = {"model": "demo", "tier": "interactive"}
    group = {**unit, "group": "g-1"}

    async def scrape_both() -> dict[str, str]:
        return {n: (await scrape(ports[n])).text for n in nodes}

    def steps(texts: dict[str, str]) -> list[float]:
        return [
            value(parse(texts[n]), "mlxfleet_group_steps_total", **group, rank=str(rank))
            for rank, n in enumerate(nodes)
        ]

    try:
        loads = (
            supervisors[n].load(group_load(r, members, demo_model)) for r, n in enumerate(nodes)
        )
        await asyncio.gather(*loads)
        await asyncio.gather(*(wait_ready(events[n]) for n in nodes))
        body = {"model": "demo", "prompt": "Once upon", "max_tokens": 4, "temperature": 0}
        reply = await supervisors["node-a"].engine_request("g-1", "POST", "/v1/completions", body)
        assert reply is not None and reply[0] == 200, reply
        generated = json.loads(reply[1])["usage"]["completion_tokens"]
        assert generated >= 1

        # Rank 1 counts a step as it ends, a moment after rank 0 may have: scrape again.
        deadline = time.monotonic() + 10
        while len(set(steps(texts := await scrape_both()))) > 1:
            assert time.monotonic() < deadline, f"the ranks' steps differ: {steps(texts)}"
            await asyncio.sleep(0.1)
        for rank, n in enumerate(nodes):
            samples, me = parse(texts[n]), {**group, "rank": str(rank)}
            layers = {"first_layer": "1" if rank == 0 else "0", "layers": "1"}  # 0 runs the last
            info = [labels for name, labels in samples if name == "mlxfleet_group_rank_info"]
            assert info == [frozenset({**me, **layers}.items())]
            assert value(samples, "mlxfleet_group_rank_info", **me, **layers) == 1
            assert value(samples, "mlxfleet_group_rank_rss_bytes", **me) > 50 * 2**20
            assert value(samples, "mlxfleet_group_steps_total", **me) >= generated
            assert value(samples, "mlxfleet_group_step_seconds_total", **me) > 0
            for direction in ("sent", "received"):
                link_bytes = value(
                    samples, "mlxfleet_group_link_bytes_total", **group, direction=direction
                )
                assert link_bytes > 0
            assert value(samples, "mlxfleet_engine_state", **unit, state="ready") == 1
            promtool_check(texts[n])
        tokens = [
            value(parse(texts[n]), "mlxfleet_engine_generation_tokens_total", **unit) for n in nodes
        ]
        assert tokens == [generated, 0]  # only rank 0 serves requests
        # What one agent's link sent, the other's received (beats may be on their way).
        later = {n: parse(text) for n, text in (await scrape_both()).items()}

        def link(n: str, direction: str) -> float:
            return value(later[n], "mlxfleet_group_link_bytes_total", **group, direction=direction)

        assert link("node-a", "sent") == pytest.approx(link("node-b", "received"), rel=0.01)
        assert link("node-b", "sent") == pytest.approx(link("node-a", "received"), rel=0.01)
    finally:
        await asyncio.gather(*(s.stop_all() for s in supervisors.values()))
        for n in nodes:
            await served[n].stop()
            await links[n].close()


def test_parse_stats_reads_a_ranks_group_block() -> None:
    whole = parse_stats(json.dumps(STATS))
    assert whole is not None and whole.group is None
    view = parse_stats(json.dumps({**STATS, "group": RANK_STATS}))
    assert view is not None and view.group == GroupStatsView("g-1", 1, 0, 3, 12, 0.25)


def test_parse_stats_rejects_another_shape(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="node_agent.metrics"):
        assert parse_stats('{"active": 1}') is None
        assert parse_stats("not json") is None
        assert parse_stats(json.dumps({**STATS, "group": {"rank": 1}})) is None
    assert "unexpected engine stats" in caplog.text


async def test_agent_serves_metrics_until_it_stops(
    tmp_path: Path, probe: FixedReadings, caplog: pytest.LogCaptureFixture
) -> None:
    """serve() binds the metrics port first and closes it on the way out (here: at once, as
    the node has not enrolled and no token was given)."""
    agent = Agent(AgentConfig(home=tmp_path, metrics_host="127.0.0.1", metrics_port=0), probe)
    with (
        caplog.at_level(logging.INFO, logger="node_agent.agent"),
        pytest.raises(AgentError, match="has not enrolled yet"),
    ):
        await agent.serve(install_signals=False)
    assert agent.metrics_port > 0
    assert f"metrics on http://127.0.0.1:{agent.metrics_port}/metrics" in caplog.text
    with pytest.raises(httpx.ConnectError):
        await scrape(agent.metrics_port)


async def test_a_busy_metrics_port_is_one_warning_and_no_metrics(
    tmp_path: Path, probe: FixedReadings, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        config = AgentConfig(home=tmp_path, metrics_host="127.0.0.1", metrics_port=busy)
        agent = Agent(config, probe)
        with (
            caplog.at_level(logging.WARNING, logger="node_agent.agent"),
            pytest.raises(AgentError, match="has not enrolled yet"),
        ):
            await agent.serve(install_signals=False)
    assert agent.metrics_port == 0
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert (
        warning
        == f"not serving metrics: cannot listen on 127.0.0.1:{busy} (Address already in use)"
    )


async def test_hello_carries_the_metrics_port() -> None:
    session = Session(
        "127.0.0.1:1",
        None,  # type: ignore[arg-type]  # Hello needs no identity
        FACTS,
        lambda: READING,
        lambda: [],
        lambda: {},
        metrics_port=40123,
    )
    first = await anext(session._requests())
    assert first.hello.metrics_port == 40123

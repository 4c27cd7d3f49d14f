"""How an engine's exit is classified (the supervisor's report to the coordinator)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from node_agent.liveness import DEFAULT_ENGINE_STALL_S, HEALTH_CHECK_INTERVAL_S
from node_agent.model_source import HUB_ALLOW_PATTERNS
from node_agent.probes import local_probe, macos
from node_agent.probes.linux import LinuxProbe
from node_agent.supervisor import (
    EngineEvent,
    LoadRequest,
    Supervisor,
    classify_exit,
    rss_bytes,
)

FIXTURES = Path(__file__).parents[1] / "fixtures" / "macos"


@pytest.mark.parametrize(
    ("returncode", "before", "after", "reason"),
    [
        (0, 0, 0, "clean"),
        (1, 0, 0, "crash"),
        (-signal.SIGSEGV, 0, 0, "crash"),
        (-signal.SIGKILL, 3, 3, "sigkill"),
        (-signal.SIGKILL, 3, 4, "oom"),
    ],
)
def test_classify_exit(returncode: int, before: int, after: int, reason: str) -> None:
    assert classify_exit(returncode, before, after) == reason


def test_rss_of_this_process_is_plausible() -> None:
    rss = rss_bytes(os.getpid())
    assert 10 * 2**20 < rss < 8 * 2**30
    assert rss_bytes(2**22 + 7) == 0  # no such pid


async def test_unreachable_hub_model_is_a_load_failure_with_a_reason(tmp_path: Path) -> None:
    """A Hugging Face id that cannot be fetched (no internet here, or no such repo) becomes one
    LOAD_FAILED event naming the model; no engine process is started."""
    events: list[EngineEvent] = []
    supervisor = Supervisor(local_probe(), events.append, tmp_path / "logs")
    await supervisor.load(LoadRequest("e1", "ghost", "mlxfleet-test/no-such-model", "batch", 512))
    [event] = events
    assert event.kind == "load_failed"
    assert event.engine.engine_id == "e1" and event.engine.state == "exited"
    assert "mlxfleet-test/no-such-model" in event.detail
    assert supervisor.infos() == []


async def test_the_prefix_cache_budget_reaches_the_engine(tmp_path: Path, demo_model: Path) -> None:
    """Needs an engine process: the budget the coordinator sent (and placement counted) is
    the one the engine keeps, through its --prefix-cache-mib flag. The engine holds its model
    folder in the store while it runs (never evicted), and lets go when it exits."""
    events: list[EngineEvent] = []
    supervisor = Supervisor(local_probe(), events.append, tmp_path / "logs")
    try:
        request = LoadRequest("e1", "demo", str(demo_model), "interactive", 512, prefix_cache_mib=3)
        await supervisor.load(request)
        for _ in range(600):
            if any(e.kind in ("ready", "load_failed") for e in events):
                break
            await asyncio.sleep(0.1)
        assert [e.kind for e in events] == ["started", "ready"], events
        reply = await supervisor.engine_request("e1", "GET", "/v1/engine/stats")
        assert reply is not None and reply[0] == 200, reply
        assert json.loads(reply[1])["prefix_cache"]["budget_bytes"] == 3 * 2**20
        await supervisor.store.settle()
        [held] = supervisor.store.held()
        assert (held.source, held.in_use, held.evictable) == (str(demo_model), True, False)
    finally:
        await supervisor.stop_all()
    assert [h.in_use for h in supervisor.store.held()] == [False]


def test_hub_downloads_fetch_the_files_mlx_lm_loads() -> None:
    from mlx_lm.utils import DEFAULT_ALLOW_PATTERNS

    assert list(HUB_ALLOW_PATTERNS) == DEFAULT_ALLOW_PATTERNS


def test_the_agent_side_of_the_supervisor_does_not_start_mlx() -> None:
    """Importing the agent and its supervisor must not import MLX (a failed hub download
    neither: tests/node_agent/test_model_store.py)."""
    code = (
        "import sys, node_agent.agent, node_agent.supervisor\n"
        "print(sorted(m for m in sys.modules if m == 'mlx' or m.startswith(('mlx.', 'mlx_lm'))))"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


class JetsamLog(LinuxProbe):
    """This machine's readings, plus the unified log a Mac would show after a jetsam kill:
    the captured kernel line, for the pid the test killed."""

    def memory_kill(self, pid: int) -> str | None:
        text = (FIXTURES / "log-jetsam-per-process-limit-ios26.txt").read_text()
        return macos.parse_jetsam_kills(text.replace("pid 994", f"pid {pid}")).get(pid)


async def test_a_jetsam_kill_is_an_oom_exit_with_its_cause(
    tmp_path: Path, demo_model: Path
) -> None:
    events: list[EngineEvent] = []
    supervisor = Supervisor(JetsamLog(), events.append, tmp_path / "logs")
    await supervisor.load(LoadRequest("e1", "demo", str(demo_model), "interactive", 512))
    for _ in range(600):
        if any(e.kind == "ready" for e in events):
            break
        await asyncio.sleep(0.1)
    [(_, pid)] = [(info.engine_id, info.pid) for info in supervisor.infos()]
    os.kill(pid, signal.SIGKILL)  # what jetsam does
    for _ in range(100):
        if any(e.kind == "exited" for e in events):
            break
        await asyncio.sleep(0.1)
    [exited] = [e for e in events if e.kind == "exited"]
    assert exited.exit_reason == "oom" and exited.signal == signal.SIGKILL
    assert exited.detail.startswith("killed by jetsam (per-process-limit)")


async def test_a_stopped_engine_is_killed_and_reported_hung(
    tmp_path: Path, demo_model: Path
) -> None:
    """Needs an engine process: SIGSTOP it (from outside, a Mac deep in swap looks the same:
    its socket accepts, nothing answers). With the default stall limit the supervisor kills it
    within the limit plus one health-check interval (and a margin for this machine) and
    reports an exit whose reason is hung, which the coordinator handles as a crash."""
    events: list[EngineEvent] = []
    supervisor = Supervisor(local_probe(), events.append, tmp_path / "logs")
    try:
        await supervisor.load(LoadRequest("e1", "demo", str(demo_model), "interactive", 512))
        for _ in range(600):
            if any(e.kind in ("ready", "load_failed") for e in events):
                break
            await asyncio.sleep(0.1)
        assert [e.kind for e in events] == ["started", "ready"], events
        [info] = supervisor.infos()
        await asyncio.sleep(HEALTH_CHECK_INTERVAL_S * 1.5)  # it has answered a check or two
        os.kill(info.pid, signal.SIGSTOP)
        stopped = time.monotonic()
        for _ in range(int(DEFAULT_ENGINE_STALL_S * 40)):
            if any(e.kind == "exited" for e in events):
                break
            await asyncio.sleep(0.05)
        taken_s = time.monotonic() - stopped
        [exited] = [e for e in events if e.kind == "exited"]
        assert exited.exit_reason == "hung" and exited.signal == signal.SIGKILL, exited
        assert exited.detail.startswith("no answer to GET /health for "), exited.detail
        limit_s = DEFAULT_ENGINE_STALL_S + HEALTH_CHECK_INTERVAL_S
        assert DEFAULT_ENGINE_STALL_S - HEALTH_CHECK_INTERVAL_S <= taken_s <= limit_s + 1.0
        assert supervisor.infos() == []
        with pytest.raises(ProcessLookupError):
            os.kill(info.pid, 0)  # killed and reaped, though it was stopped
        print(f"hung engine found and killed {taken_s:.2f} s after its SIGSTOP")
    finally:
        await supervisor.stop_all()
